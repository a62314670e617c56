"""Checkpoints that load with ``torch.load(weights_only=True)`` and rebuild their model from the file alone.

A molkern LightningModule mixes in :class:`CheckpointMixin`: its ``__init__`` arguments are plain
YAML-like values (saved by ``save_hyperparameters`` as ``hyper_parameters``), everything learned or
fitted on data (weights, target statistics, energy shifts) lives in the ``state_dict``, and the mixin adds
``checkpoint["molkern"] = {"format", "version", "task"}``. :func:`load_module` maps ``task`` to the class
through the fixed table :data:`TASKS` (never an import path read from the file), so loading a checkpoint
executes no code from it.
"""

import importlib
import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .. import __version__

FORMAT = 1

# task name -> "module:Class" of its LightningModule
TASKS: Dict[str, str] = {
    "qm9": "molkern.train.qm9:QM9Module",
    "energy": "molkern.train.energy:EnergyModule",
}

__all__ = ["FORMAT", "TASKS", "CheckpointMixin", "load_checkpoint", "load_module"]


class CheckpointMixin:
    """Adds the ``molkern`` header to Lightning checkpoints; subclasses set ``task`` (a key of TASKS)."""

    task: str = ""

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["molkern"] = {"format": FORMAT, "version": __version__, "task": self.task}


def load_checkpoint(path: Union[str, os.PathLike], map_location="cpu") -> Dict[str, Any]:
    """Read a molkern checkpoint with ``weights_only=True`` and check its header.

    Raises:
        FileNotFoundError: no such file. ValueError: not a molkern checkpoint, or a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be read with weights_only=True: {err}") from None
    header = ckpt.get("molkern") if isinstance(ckpt, dict) else None
    if not isinstance(header, dict) or "task" not in header:
        raise ValueError(f"{path} is not a molkern checkpoint (no 'molkern' header)")
    if int(header.get("format", 0)) > FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {header['format']}, this molkern ({__version__}) reads up to {FORMAT}"
        )
    if header["task"] not in TASKS:
        raise ValueError(f"checkpoint {path} has unknown task {header['task']!r}; known: {sorted(TASKS)}")
    return ckpt


def module_class(task: str):
    """The LightningModule class of a task name."""
    module_name, cls_name = TASKS[task].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def load_module(path: Union[str, os.PathLike], map_location="cpu"):
    """Rebuild the LightningModule of a checkpoint (hyper-parameters + weights), in eval mode.

    Example:
        >>> module = load_module("runs/qm9/checkpoints/best.ckpt")  # doctest: +SKIP
    """
    ckpt = load_checkpoint(path, map_location)
    cls = module_class(ckpt["molkern"]["task"])
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = cls(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
