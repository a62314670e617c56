"""Datasets and featurisation: simulations, molecules, point clouds -> PyG ``Data``."""

from .nbody import NBody, Trajectories, simulate

__all__ = ["NBody", "Trajectories", "simulate"]
