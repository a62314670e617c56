"""Training: LightningModules, DataModules and single-run helpers."""

from .nbody import GROUPS, NBodyDataModule, NBodyModule, build_nbody_model, parameter_counts, train_nbody

__all__ = ["GROUPS", "NBodyDataModule", "NBodyModule", "build_nbody_model", "parameter_counts", "train_nbody"]
