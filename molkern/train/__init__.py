"""Training: LightningModules, DataModules and single-run helpers."""

from .checkpoint import load_checkpoint, load_module
from .compiled import CompiledEnergyForces, CompiledLoss
from .energy import AtomsDataModule, EnergyModule
from .nbody import GROUPS, NBodyDataModule, NBodyModule, build_nbody_model, parameter_counts, train_nbody
from .qm9 import QM9Module
from .qm9_datamodule import QM9DataModule

__all__ = [
    "AtomsDataModule",
    "CompiledEnergyForces",
    "CompiledLoss",
    "EnergyModule",
    "GROUPS",
    "NBodyDataModule",
    "NBodyModule",
    "QM9DataModule",
    "QM9Module",
    "build_nbody_model",
    "load_checkpoint",
    "load_module",
    "parameter_counts",
    "train_nbody",
]
