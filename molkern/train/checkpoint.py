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
from typing import Any, Dict, Protocol, Tuple, Union, runtime_checkable

import torch

from .. import __version__

FORMAT = 1

# task name -> "module:Class" of its LightningModule
TASKS: Dict[str, str] = {
    "qm9": "molkern.train.qm9:QM9Module",
    "energy": "molkern.train.energy:EnergyModule",
}

__all__ = ["FORMAT", "TASKS", "CheckpointMixin", "TaskModule", "load_checkpoint", "load_module"]


@runtime_checkable
class TaskModule(Protocol):
    """What prediction (`molkern predict`), the ASE calculator and notebooks need from a trained module.

    Implemented by QM9Module (task "qm9") and EnergyModule (task "energy").

    Attributes:
        graph_spec: dict(graph="bonds" | "radius", cutoff=float Angstrom or None, elements=tuple of atomic
            numbers, in the order of the node_attr one-hot columns). "bonds": edges = covalent bonds in both
            directions, edge_attr = bond-type one-hot (E, 3) (molkern.data.bonds.encode_bonds); "radius":
            edges from molkern.data.neighbors.radius_edges, edge_attr (E, 0) unless the module says otherwise.
        property_names, property_units: e.g. ("homo", "gap"), ("meV", "meV"); EnergyModule: ("energy",), ("eV",).

    Batch fields (PyG Batch): z (N,) long, pos (N, 3) float32 Angstrom, node_attr (N, len(elements)) float32
    one-hot, edge_index (2, E) long [source j, target i], edge_attr (E, k) float32, optional edge_shift (E, 3)
    Angstrom (edge_vec = pos[src] - pos[dst] + edge_shift), batch (N,), num_graphs.
    """

    graph_spec: Dict[str, Any]
    property_names: Tuple[str, ...]
    property_units: Tuple[str, ...]

    def predict_properties(self, batch) -> torch.Tensor:
        """(num_graphs, len(property_names)) in property_units."""

    def energy(self, batch) -> torch.Tensor:
        """(num_graphs,) eV, differentiable w.r.t. batch.pos and batch.edge_shift (QM9Module: only for U0/U/H/G)."""


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
