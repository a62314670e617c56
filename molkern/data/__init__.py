"""Datasets and featurisation: simulations, molecules, point clouds -> PyG ``Data``."""

from .atoms import AtomsDataset, atoms_to_data
from .bonds import ATOM_TYPES, BOND_TYPES, BondPerceptionError, encode_atoms, encode_bonds, perceive_bonds
from .featurize import (
    FeaturizationError,
    embed_smiles,
    featurize_file,
    featurize_many,
    from_atoms,
    from_file,
    from_rdkit,
    from_smiles,
)
from .graph import molecule_graph
from .nbody import NBody, Trajectories, simulate
from .modelnet import ModelNet, write_procedural_dataset
from .qm9 import QM9, QM9CacheWarning

__all__ = [
    "ATOM_TYPES",
    "AtomsDataset",
    "BOND_TYPES",
    "BondPerceptionError",
    "FeaturizationError",
    "NBody",
    "QM9",
    "QM9CacheWarning",
    "Trajectories",
    "atoms_to_data",
    "embed_smiles",
    "encode_atoms",
    "encode_bonds",
    "featurize_file",
    "featurize_many",
    "from_atoms",
    "from_file",
    "from_rdkit",
    "from_smiles",
    "molecule_graph",
    "perceive_bonds",
    "simulate",
]
