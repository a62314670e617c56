"""Datasets and featurisation: simulations, molecules, point clouds -> PyG ``Data``."""

from .bonds import ATOM_TYPES, BOND_TYPES, BondPerceptionError, encode_atoms, encode_bonds, perceive_bonds
from .nbody import NBody, Trajectories, simulate
from .qm9 import QM9, QM9CacheWarning

__all__ = [
    "ATOM_TYPES",
    "BOND_TYPES",
    "BondPerceptionError",
    "NBody",
    "QM9",
    "QM9CacheWarning",
    "Trajectories",
    "encode_atoms",
    "encode_bonds",
    "perceive_bonds",
    "simulate",
]
