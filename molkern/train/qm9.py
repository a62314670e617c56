"""QM9 property prediction as a LightningModule: normalised L1 training, MAE in the literature's units."""

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning as L
import torch

from ..data.bonds import ATOMIC_NUMBERS
from ..data.qm9 import QM9
from ..models import average_num_neighbors, build_model, normalize_activations
from ..nn.scatter import scatter_count, scatter_sum
from .checkpoint import CheckpointMixin
from .compiled import CompiledLoss
from .optim import configure_adamw
from .report import write_test_report

# summed over atoms (per-atom mean removed); the others are averaged over atoms
EXTENSIVE = ("alpha", "r2", "zpve", "U0", "U", "H", "G", "Cv")
ENERGY_TARGETS = ("U0", "U", "H", "G")
AUTO = "auto"


class QM9Module(CheckpointMixin, L.LightningModule):
    """Predict QM9 targets with a MolkernNet.

    Args:
        model: MolkernNet config (see :func:`molkern.models.build_model`) without irreps_node_attr, irreps_out
            and pooling, which this module sets (5x0e atom one-hot; one scalar per target; pooled here).
            ``avg_num_neighbors: auto`` (default) measures it on the training set.
        targets: QM9 target names ("homo", ...) or "all" for the 12.
        lr, weight_decay, scheduler ("cosine" | "step" | "plateau" | "none"), warmup_epochs, min_lr_ratio,
            step_size, gamma: AdamW and its schedule (see molkern.train.optim.configure_adamw).
        data_init: rescale the blocks on the first training batch (LSUV) at the start of a fresh fit.
        graph, cutoff: the molecular graph the model reads ("bonds" or "radius" with a cutoff in Angstrom);
            taken from the datamodule at fit time and kept in the checkpoint for prediction.
        compile: run each training step's forward and backward as one compiled graph
            (:class:`molkern.train.compiled.CompiledLoss`; same gradients; QM9 steps of the lmax 2 default model
            1.8x faster on one CPU thread, 1.4x on two) after a one-off compilation of one to three minutes.
            Validation, test and prediction are eager.

    Normalisation (buffers, fitted on the training split): intensive targets y = std * out_mean + mean;
    extensive targets (EXTENSIVE) y = std * out_sum / sqrt(mean N) + N * mean_per_atom.

    ``molkern test`` prints the MAE table and writes test_mae.json and parity.png into the run's log directory.

    Logged metrics: ``{stage}_loss`` (mean normalised L1) and ``{stage}_mae_<target>`` in target units.
    """

    task = "qm9"

    def __init__(
        self,
        model: Optional[Dict[str, Any]] = None,
        targets: Union[str, Sequence[str]] = ("homo",),
        lr: float = 5e-4,
        weight_decay: float = 1e-8,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        step_size: int = 25,
        gamma: float = 0.5,
        data_init: bool = True,
        graph: str = "bonds",
        cutoff: Optional[float] = None,
        compile: bool = False,
    ):
        super().__init__()
        names = list(QM9.target_names) if targets == "all" else [targets] if isinstance(targets, str) else list(targets)
        for name in names:
            QM9.target_index(name)  # raises on unknown names
        if not names:
            raise ValueError("targets is empty; give QM9 target names or 'all'")
        config = dict(model or {})
        for key in ("irreps_node_attr", "irreps_out", "pooling"):
            if key in config:
                raise ValueError(f"model.{key} is set by QM9Module; remove it from the config")
        config.setdefault("avg_num_neighbors", AUTO)
        if graph not in ("bonds", "radius"):
            raise ValueError(f"graph must be 'bonds' or 'radius', got {graph!r}")
        self.save_hyperparameters()
        self.hparams.model, self.hparams.targets = config, names
        self.target_names = tuple(names)
        self.target_cols = [QM9.target_index(t) for t in names]
        built = {k: v for k, v in config.items() if k != "avg_num_neighbors" or v != AUTO}
        self.model = build_model({**built, "irreps_node_attr": f"{len(ATOMIC_NUMBERS)}x0e",
                                  "irreps_out": f"{len(names)}x0e", "pooling": None})
        self.register_buffer("extensive", torch.tensor([t in EXTENSIVE for t in names]))
        self.register_buffer("mean", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("std", torch.ones(len(names), dtype=torch.float64))
        # extensive outputs are sums of ~N unit-scale atom terms: scaled by 1/sqrt(mean N) to start near unit scale
        self.register_buffer("sum_scale", torch.tensor(18.0**-0.5))
        self._test_outputs: List[torch.Tensor] = []
        self._compiled_loss: Optional[CompiledLoss] = None  # built on the first compiled training step

    # ------------------------------------------------------------------ protocol (see checkpoint.TaskModule)

    @property
    def graph_spec(self) -> Dict[str, Any]:
        edge_attr = "bonds" if self.model.irreps_edge_attr.dim > 0 else "none"
        return {"graph": self.hparams.graph, "cutoff": self.hparams.cutoff, "elements": ATOMIC_NUMBERS,
                "edge_attr": edge_attr}

    @property
    def property_names(self):
        return self.target_names

    @property
    def property_units(self):
        return tuple(QM9.target_units[c] for c in self.target_cols)

    def forward(self, batch) -> torch.Tensor:
        """Normalised predictions (num_graphs, T)."""
        edge_attr = batch.edge_attr if self.model.irreps_edge_attr.dim > 0 else None
        node_out = self.model(batch.pos, batch.node_attr, batch.edge_index, edge_attr, batch.batch,
                              batch.num_graphs, getattr(batch, "edge_shift", None))  # (N, T)
        summed = scatter_sum(node_out, batch.batch, batch.num_graphs)  # (B, T)
        counts = self._atoms_per_graph(batch).to(summed.dtype)  # (B, 1)
        return torch.where(self.extensive, summed * self.sum_scale, summed / counts)

    def _atoms_per_graph(self, batch) -> torch.Tensor:
        return scatter_count(batch.batch, batch.num_graphs, self.mean.dtype)[:, None]  # (B, 1)

    def _offset(self, batch) -> torch.Tensor:
        counts = self._atoms_per_graph(batch)  # (B, 1)
        return torch.where(self.extensive, counts * self.mean, self.mean)  # (B, T)

    def predict_properties(self, batch) -> torch.Tensor:
        """(num_graphs, T) in property_units (float64)."""
        return self(batch).to(self.std.dtype) * self.std + self._offset(batch)

    def energy(self, batch) -> torch.Tensor:
        """Atomization energy (num_graphs,) in eV of the first of U0/U/H/G among the targets."""
        for i, name in enumerate(self.target_names):
            if name in ENERGY_TARGETS:
                return self.predict_properties(batch)[:, i] / 1000.0  # meV -> eV
        raise ValueError(f"this QM9 model predicts {self.target_names}, no energy (train on U0, U, H or G)")

    # ------------------------------------------------------------------------------------ training

    def setup(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "target_stats"):
            return
        if stage != "fit":
            return
        self.hparams.graph, self.hparams.cutoff = dm.hparams.graph, dm.hparams.cutoff
        stats = dm.target_stats(self.target_names, self.extensive.tolist())
        self.mean.copy_(stats["mean"])
        self.std.copy_(stats["std"])
        self.sum_scale.fill_(float(dm.parts["train"].num_atoms().mean()) ** -0.5)
        if self.hparams.model.get("avg_num_neighbors") == AUTO:
            train = dm.parts["train"]
            sample = [train[i] for i in range(min(len(train), 2000))]
            value = average_num_neighbors([d.edge_index for d in sample], [d.num_nodes for d in sample])
            self.set_avg_num_neighbors(value)

    def set_avg_num_neighbors(self, value: float) -> None:
        """Set the convolutions' neighbour normalisation and record it in the hyper-parameters."""
        for block in self.model.blocks:
            block.conv.avg_num_neighbors = float(value)
        self.hparams.model["avg_num_neighbors"] = float(value)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Restore what lives in the hyper-parameters rather than the weights (module built from a config)."""
        saved = checkpoint.get("hyper_parameters", {})
        value = saved.get("model", {}).get("avg_num_neighbors")
        if isinstance(value, (int, float)):
            self.set_avg_num_neighbors(value)
        for key in ("graph", "cutoff"):
            if key in saved:
                self.hparams[key] = saved[key]

    def on_fit_start(self):
        if self.hparams.data_init and self.trainer.ckpt_path is None:
            batch = next(iter(self.trainer.datamodule.train_dataloader())).to(self.device)
            edge_attr = batch.edge_attr if self.model.irreps_edge_attr.dim > 0 else None
            normalize_activations(self.model, batch.pos, batch.node_attr, batch.edge_index, edge_attr, batch.batch)

    def _normalized_target(self, batch) -> torch.Tensor:
        return (batch.y[:, self.target_cols].to(self.std.dtype) - self._offset(batch)) / self.std  # (B, T)

    def loss(self, batch) -> torch.Tensor:
        """The training loss: mean L1 error of the normalised predictions (0-dim)."""
        return self._predictions_and_loss(batch)[2]

    def _predictions_and_loss(self, batch):
        """(normalised predictions (B, T), normalised targets (B, T), loss)."""
        target = self._normalized_target(batch)  # (B, T)
        pred = self(batch)  # (B, T)
        return pred, target, (pred - target.to(pred.dtype)).abs().mean()

    def _step(self, batch, stage: str) -> torch.Tensor:
        pred, target, loss = self._predictions_and_loss(batch)
        self.log(f"{stage}_loss", loss, batch_size=batch.num_graphs, prog_bar=True, on_step=False, on_epoch=True,
                 sync_dist=True)
        mae = ((pred.detach().to(self.std.dtype) - target).abs() * self.std).mean(0)  # (T,) target units
        for name, value in zip(self.target_names, mae):
            self.log(f"{stage}_mae_{name}", value.float(), batch_size=batch.num_graphs, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        if self.hparams.compile:
            if self._compiled_loss is None:
                self._compiled_loss = CompiledLoss(self, QM9Module.loss)
            loss = self._compiled_loss(batch)
        else:
            loss = self.loss(batch)
        self.log("train_loss", loss, batch_size=batch.num_graphs, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def on_fit_end(self):
        self._compiled_loss = None  # the compiled graphs hold the module: not kept past the fit

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")
        y = batch.y[:, self.target_cols].to(torch.float64)
        self._test_outputs.append(torch.stack([self.predict_properties(batch).detach(), y], dim=1))  # (B, 2, T)

    def on_test_epoch_start(self):
        self._test_outputs = []

    def on_test_epoch_end(self):
        out = torch.cat(self._test_outputs) if self._test_outputs else torch.zeros(0, 2, len(self.target_names))
        out = _gather_rows(self, out.to(torch.float64))
        folder = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: all ranks
        if self.trainer.is_global_zero:
            write_test_report(Path(folder), self.target_names, self.property_units, out[:, 0], out[:, 1])
        self._test_outputs = []

    def predict_step(self, batch, batch_idx):
        return self.predict_properties(batch)

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.scheduler, hp.warmup_epochs, hp.min_lr_ratio,
                               hp.step_size, hp.gamma)


def _gather_rows(module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate per-process row tensors of different lengths across DDP processes (identity otherwise)."""
    if module.trainer.world_size == 1:
        return rows
    n = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = module.all_gather(n).flatten()  # (world,)
    padded = rows.new_zeros((int(sizes.max()),) + rows.shape[1:])
    padded[: rows.shape[0]] = rows
    gathered = module.all_gather(padded)  # (world, max, ...)
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(gathered.shape[0])])
