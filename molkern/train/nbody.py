"""Training on the N-body task (paper section 5.1): models, LightningModule, LightningDataModule, one run.

Protocol (SEGNN's loop, background.md section 4.6): the model predicts a displacement per particle,
prediction = pos + model(...), loss = MSE against the positions at frame 40 (averaged over particles
and coordinates); validation every ``check_val_every_n_epoch`` epochs; the reported number is the test
MSE at the epoch of best validation MSE (``ModelCheckpoint(monitor="val_mse")`` then
``trainer.test(ckpt_path="best")``). Units: dimensionless simulation units (MSE in length^2).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch_geometric.loader import DataLoader

from ..data.nbody import IRREPS_EDGE_ATTRS, IRREPS_OUT, NUM_PARTICLES, NBody
from ..models import MolkernNet, normalize_activations
from ..models.baselines import MPNN, count_parameters, match_width

__all__ = [
    "GROUPS",
    "IRREPS_MODEL_ATTRS",
    "velocity_features",
    "NBodyNet",
    "build_nbody_model",
    "parameter_counts",
    "rescale_blocks",
    "NBodyModule",
    "NBodyDataModule",
    "train_nbody",
]

#: Model names of the sweep: three groups (about z) and the non-equivariant baseline.
GROUPS = ("o3", "so2", "o2", "baseline")
#: Fully connected 5-particle graph: 4 neighbours per particle.
AVG_NUM_NEIGHBORS = float(NUM_PARTICLES - 1)

_BASELINE_WIDTHS: Dict[tuple, int] = {}

#: Node attributes the equivariant networks see: [L_i, |v_i|, v_i / |v_i|] (see `velocity_features`).
IRREPS_MODEL_ATTRS = "2x0e+1x1o"


def velocity_features(node_attr: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[L, v] -> [L, |v|, v / |v|]: the speed as a scalar and the direction as a unit vector.

    The network multiplies its node attributes into the features in every block (the self-connection
    tensor product) and into the kernel (velocity x edge-vector products), so raw velocities make it a
    high-degree polynomial in v: with speeds up to ~3 at k > 0 the first N-body runs diverged on
    validation systems (val MSE 5.2 vs train 0.24 for O(3) at k = 2). A unit direction keeps those products bounded;
    the speed enters as an invariant, as in SEGNN's N-body model. Equivariant: v / |v| is a 1o vector.

    Shapes:
        node_attr: (N, 4) [L_i, vx, vy, vz] ("1x0e+1x1o") -> (N, 5) [L_i, |v_i|, v_i/|v_i|] ("2x0e+1x1o")
    """
    rest, vel = node_attr[:, :1], node_attr[:, 1:4]  # (N, 1), (N, 3)
    speed = torch.linalg.norm(vel, dim=-1, keepdim=True)  # (N, 1)
    return torch.cat([rest, speed, vel / speed.clamp_min(eps)], dim=-1)  # (N, 5)


class NBodyNet(nn.Module):
    """A MolkernNet on the N-body inputs: node_attr [L, v] is turned into `velocity_features` first.

    Shapes:
        pos (N, 3), node_attr (N, 4) [L_i, v_i], edge_index (2, E), edge_attr (E, 1), batch (N,) -> (N, 3)
    """

    def __init__(self, net: MolkernNet):
        super().__init__()
        self.net = net

    def forward(self, pos, node_attr, edge_index, edge_attr=None, batch=None) -> torch.Tensor:
        return self.net(pos, velocity_features(node_attr), edge_index, edge_attr, batch)  # (N, 3)


def build_nbody_model(
    group: str,
    num_channels: int = 16,
    num_layers: int = 3,
    lmax: int = 1,
    kernel: str = "factorised",
    cutoff: float = 10.0,
    baseline_width: Optional[int] = None,
) -> nn.Module:
    """The N-body network for ``group`` in GROUPS; it maps (pos, node_attrs, edge_index, edge_attrs, batch)
    to a displacement per particle.

    The equivariant models are an NBodyNet: a MolkernNet with node attributes "2x0e+1x1o" ([L_i, |v_i|,
    v_i/|v_i|], from `velocity_features`), edge attributes "1x0e" (spring indicator) and output "1x1o";
    the group acts about the z axis. The baseline is a plain
    MPNN whose width (if ``baseline_width`` is None) is chosen so that its parameter count is closest to
    that of the O(3) model with the same settings.

    Shapes:
        model(pos (N, 3), node_attrs (N, 4), edge_index (2, E), edge_attrs (E, 1), batch (N,)) -> (N, 3)
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if group == "baseline":
        if baseline_width is None:
            key = (num_channels, num_layers, lmax, kernel, cutoff)
            if key not in _BASELINE_WIDTHS:
                with torch.random.fork_rng():  # the width search must not move the RNG: same init with or without cache
                    target = count_parameters(build_nbody_model("o3", num_channels, num_layers, lmax, kernel, cutoff))
                    _BASELINE_WIDTHS[key] = match_width(lambda w: _baseline(w, num_layers), target)
            baseline_width = _BASELINE_WIDTHS[key]
        return _baseline(baseline_width, num_layers)
    return NBodyNet(MolkernNet(
        irreps_node_attr=IRREPS_MODEL_ATTRS,
        irreps_edge_attr=IRREPS_EDGE_ATTRS,
        irreps_out=IRREPS_OUT,
        pooling=None,
        group=group,
        kernel=kernel,
        kernel_trunk="gated",  # the trunk the README's N-body study was run with
        num_channels=num_channels,
        lmax=lmax,
        num_layers=num_layers,
        cutoff=cutoff,
        avg_num_neighbors=AVG_NUM_NEIGHBORS,
    ))


def _baseline(width: int, num_layers: int) -> MPNN:
    return MPNN(4, 1, 3, width=width, num_layers=num_layers, avg_num_neighbors=AVG_NUM_NEIGHBORS)


def parameter_counts(groups: Sequence[str] = GROUPS, **model_kwargs) -> Dict[str, int]:
    """Trainable parameter count of the N-body model of every group (same kwargs as build_nbody_model)."""
    return {g: count_parameters(build_nbody_model(g, **model_kwargs)) for g in groups}


@torch.no_grad()
def rescale_blocks(model: nn.Module, batch, target_rms: float = 0.5) -> List[float]:
    """`molkern.models.normalize_activations` on one N-body batch (a no-op for the baseline)."""
    if not isinstance(model, NBodyNet):
        return []
    attrs = velocity_features(batch.node_attr)  # (N, 5)
    return normalize_activations(
        model.net, batch.pos, attrs, batch.edge_index, batch.edge_attr, batch.batch, target_rms=target_rms
    )


class NBodyModule(L.LightningModule):
    """Predict positions after 1.0 time unit: ``pos + model(pos, [L, v], edges)``, MSE loss against ``y``.

    Args:
        group: one of GROUPS ("o3", "so2", "o2", "baseline").
        model: keyword arguments of :func:`build_nbody_model` (num_channels, num_layers, ...).
        lr, weight_decay: AdamW.
        milestones, gamma: MultiStepLR, stepped per epoch (lr *= gamma at each milestone epoch).

    Logged metrics (per-sample means): ``train_mse``, ``val_mse``, ``test_mse``.
    """

    def __init__(
        self,
        group: str = "o3",
        model: Optional[Dict[str, Any]] = None,
        lr: float = 5e-4,
        weight_decay: float = 1e-8,
        milestones: Sequence[int] = (),
        gamma: float = 0.5,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_nbody_model(group, **(model or {}))

    def forward(self, batch) -> torch.Tensor:
        """Predicted positions (N, 3)."""
        displacement = self.model(batch.pos, batch.node_attr, batch.edge_index, batch.edge_attr, batch.batch)
        return batch.pos + displacement  # (N, 3)

    def _step(self, batch, name: str) -> torch.Tensor:
        loss = F.mse_loss(self(batch), batch.y)
        on_step = name == "train"
        self.log(f"{name}_mse", loss, batch_size=batch.num_graphs, on_step=False, on_epoch=True, prog_bar=not on_step)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class NBodyDataModule(L.LightningDataModule):
    """Train / val / test splits of :class:`molkern.data.NBody` at one plane stiffness, generated under ``root``.

    Args:
        root: data cache directory. stiffness: plane-spring stiffness k.
        num_train, num_val, num_test: split sizes (paper: 3000 / 2000 / 2000).
        data_seed: base seed of the simulations (independent of the training seed).
        batch_size: graphs per batch. num_workers: DataLoader workers.
    """

    def __init__(
        self,
        root: str,
        stiffness: float,
        num_train: int = 3000,
        num_val: int = 2000,
        num_test: int = 2000,
        data_seed: int = 42,
        batch_size: int = 100,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.datasets: Dict[str, NBody] = {}

    def _dataset(self, split: str) -> NBody:
        hp = self.hparams
        sizes = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
        return NBody(hp.root, split, stiffness=hp.stiffness, num_samples=sizes[split], seed=hp.data_seed)

    def prepare_data(self):
        for split in ("train", "val", "test"):
            self._dataset(split)  # generates and caches

    def setup(self, stage: Optional[str] = None):
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.datasets[split], batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


class _ValCurve(Callback):
    """Records (epoch, val_mse) after every validation."""

    def __init__(self):
        self.curve: List[List[float]] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val_mse" in trainer.callback_metrics:
            self.curve.append([trainer.current_epoch, float(trainer.callback_metrics["val_mse"])])


def train_nbody(
    group: str,
    stiffness: float,
    root: str,
    seed: int = 0,
    model: Optional[Dict[str, Any]] = None,
    optim: Optional[Dict[str, Any]] = None,
    data: Optional[Dict[str, Any]] = None,
    max_epochs: int = 100,
    check_val_every_n_epoch: int = 5,
    gradient_clip_val: Optional[float] = None,
    data_init: bool = True,
    progress: bool = True,
    ckpt_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Train one model at one stiffness and return its test MSE at the best validation epoch.

    Args:
        group: one of GROUPS. stiffness: plane stiffness k. root: data cache directory.
        seed: training seed (initialisation and batch order; the data comes from ``data["data_seed"]``).
        model: kwargs of build_nbody_model; optim: kwargs of NBodyModule (lr, weight_decay, milestones, gamma);
        data: kwargs of NBodyDataModule (num_train, num_val, num_test, data_seed, batch_size).
        max_epochs, check_val_every_n_epoch, gradient_clip_val: Lightning Trainer settings.
        data_init: rescale the equivariant models' blocks on the first training batch (:func:`rescale_blocks`).
        progress: show Lightning's progress bar. ckpt_dir: where checkpoints go (default: a temporary dir).

    Returns:
        dict with group, stiffness, seed, num_parameters, best_val_mse, test_mse, best_epoch (0-based),
        max_epochs, val_curve ([epoch, val_mse] at every validation) and seconds.
    """
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = NBodyDataModule(root, stiffness, **(data or {}))
    module = NBodyModule(group, model=model, **(optim or {}))
    if data_init:
        datamodule.prepare_data()
        datamodule.setup("fit")
        rescale_blocks(module.model, next(iter(datamodule.train_dataloader())))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir or tmp, monitor="val_mse", mode="min", save_top_k=1)
        curve = _ValCurve()
        trainer = L.Trainer(
            max_epochs=max_epochs,
            check_val_every_n_epoch=check_val_every_n_epoch,
            gradient_clip_val=gradient_clip_val,
            callbacks=[checkpoint, curve],
            logger=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=datamodule)
        best_path = checkpoint.best_model_path
        best_epoch = torch.load(best_path, map_location="cpu", weights_only=False)["epoch"] if best_path else None
        (result,) = trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    return {
        "group": group,
        "stiffness": float(stiffness),
        "seed": seed,
        "num_parameters": count_parameters(module.model),
        "best_val_mse": float(checkpoint.best_model_score),
        "test_mse": float(result["test_mse"]),
        "best_epoch": best_epoch,
        "max_epochs": max_epochs,
        "val_curve": curve.curve,
        "seconds": time.perf_counter() - start,
    }
