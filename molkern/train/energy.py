"""Energy-and-force training (task "energy"): a MolkernNet potential, its LightningModule and DataModule.

Model: E = sum_i [ e0(Z_i) + scale * u_i ], with u_i the per-atom output of a MolkernNet (sum-pooled),
e0 per-species energy shifts (eV, least squares of the training energies on element counts) and ``scale``
the rms of the training force components (eV/A, used as eV), both fitted at the start of a fresh fit and
stored as buffers. Forces F = -dE/dpos and stress (1/V) dE/d(strain) (ASE sign, eV/A^3) by autograd
(:func:`energy_forces_stress`, shared with :class:`molkern.calculator.MolkernCalculator`).

Loss (dimensionless): w_E * mean(((E - E_ref) / N / scale)^2) + w_F * mean(((F - F_ref) / scale)^2)
+ w_S * mean(((S - S_ref) * V / N / scale)^2), each mean over the structures / components that have labels.

Logged metrics: ``{stage}_loss``, ``{stage}_energy_mae`` (meV/atom), ``{stage}_forces_mae`` (meV/A, per
component), ``{stage}_stress_mae`` (meV/A^3, when the data has stress).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning as L
import torch
from torch_geometric.loader import DataLoader

from ..io import atomic_write
from ..data.atoms import AtomsDataset, element_numbers
from ..models import MolkernNet, average_num_neighbors, build_model, normalize_activations
from ..nn.scatter import scatter_count, scatter_sum
from .checkpoint import CheckpointMixin
from .optim import configure_adamw

__all__ = ["AtomsDataModule", "EnergyModule", "energy_forces_stress"]

AUTO = "auto"
_DEFAULT_CUTOFF = float(inspect.signature(MolkernNet.__init__).parameters["cutoff"].default)


def energy_forces_stress(module, batch, forces: bool = True, stress: bool = False,
                         create_graph: bool = False) -> Dict[str, torch.Tensor]:
    """Energy and its derivatives for any module with ``energy(batch)`` (the TaskModule protocol).

    Stress is the derivative with respect to a symmetric strain eps applied to positions, periodic shifts
    and the cell (pos -> pos (1 + eps)), divided by the cell volume: ASE's sign convention (positive =
    tensile), eV/A^3; it is NaN for structures whose cell has zero volume.

    Args:
        module: has ``energy(batch) -> (num_graphs,)`` eV, differentiable w.r.t. batch.pos / batch.edge_shift.
        batch: a PyG Batch (``pos``, ``batch``, ``num_graphs``, optional ``edge_shift``, ``cell`` for stress).
        create_graph: keep the graph of the derivatives (training on forces).

    Shapes:
        -> energy (G,) eV, forces (N, 3) eV/A, stress (G, 3, 3) eV/A^3 (only the requested ones)
    """
    if not (forces or stress):
        return {"energy": module.energy(batch)}
    pos = batch.pos if batch.pos.requires_grad else batch.pos.detach().requires_grad_(True)  # (N, 3)
    strained = copy.copy(batch)
    inputs = [pos]
    if stress:
        eps = torch.zeros(batch.num_graphs, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
        sym = 0.5 * (eps + eps.transpose(1, 2))  # (G, 3, 3)
        strained.pos = pos + torch.einsum("ni,nij->nj", pos, sym[batch.batch])  # (N, 3)
        shift = getattr(batch, "edge_shift", None)
        if shift is not None:
            shift = shift.to(pos.dtype)
            graph_of_edge = batch.batch[batch.edge_index[1]]  # (E,)
            strained.edge_shift = shift + torch.einsum("ei,eij->ej", shift, sym[graph_of_edge])  # (E, 3)
        inputs.append(eps)
    else:
        strained.pos = pos
    energy = module.energy(strained)  # (G,)
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
    out = {"energy": energy if create_graph else energy.detach()}
    if forces:
        out["forces"] = -grads[0]  # (N, 3)
    if stress:
        volume = torch.linalg.det(batch.cell.to(grads[1].dtype)).abs()[:, None, None]  # (G, 1, 1)
        ok = volume > 0
        # the where keeps gradients finite for the zero-volume structures of a mixed batch
        out["stress"] = torch.where(ok, grads[1] / torch.where(ok, volume, torch.ones_like(volume)),
                                    torch.full_like(grads[1], float("nan")))  # (G, 3, 3)
    return out


class EnergyModule(CheckpointMixin, L.LightningModule):
    """Interatomic potential: energies, forces (and stress) of structures made of ``elements``.

    Args:
        elements: element symbols or atomic numbers (node one-hot columns, in this order).
        model: MolkernNet config (:func:`molkern.models.build_model`) without irreps_node_attr, irreps_edge_attr,
            irreps_out and pooling, which this module sets. ``avg_num_neighbors: auto`` (default) measures the
            mean in-degree on the training set. ``cutoff`` (Angstrom) is the graph cutoff the model reads.
        energy_weight, forces_weight, stress_weight: loss weights (see the module docstring).
        lr, weight_decay, scheduler ("cosine" | "plateau" | "none"), warmup_epochs, min_lr_ratio: AdamW and its
            schedule (:func:`molkern.train.optim.configure_adamw`).
        data_init: LSUV-rescale the blocks on a training batch at the start of a fresh fit.
        compile: run each training step (energy, forces by autograd, loss, and the gradients of it all) as one
            compiled graph (:class:`molkern.train.compiled.CompiledLoss`; same gradients) after a one-off
            compilation of a few minutes; one graph for batches with stress labels, one for those without.
            Only ``train_loss`` is logged for training steps. Validation, test and prediction are eager.

    Buffers (fitted on the training split at the start of a fresh fit): ``species_energy`` (K,) eV,
    ``energy_scale`` () eV/A, ``avg_num_neighbors`` () (mean in-degree, restored into the convolutions
    whenever a state_dict is loaded), ``fitted`` () bool.
    """

    task = "energy"

    def __init__(
        self,
        elements: Sequence[Union[str, int]],
        model: Optional[Dict[str, Any]] = None,
        energy_weight: float = 1.0,
        forces_weight: float = 1.0,
        stress_weight: float = 0.0,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.01,
        data_init: bool = True,
        compile: bool = False,
    ):
        super().__init__()
        self.elements = element_numbers(elements)
        config = dict(model or {})
        for key in ("irreps_node_attr", "irreps_edge_attr", "irreps_out", "pooling"):
            if key in config:
                raise ValueError(f"model.{key} is set by EnergyModule; remove it from the config")
        config.setdefault("avg_num_neighbors", AUTO)
        for name, w in (("energy_weight", energy_weight), ("forces_weight", forces_weight),
                        ("stress_weight", stress_weight)):
            if not w >= 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        self.save_hyperparameters()
        self.hparams.model, self.hparams.elements = config, list(elements)
        built = {k: v for k, v in config.items() if k != "avg_num_neighbors" or v != AUTO}
        self.model = build_model({**built, "irreps_node_attr": f"{len(self.elements)}x0e",
                                  "irreps_out": "1x0e", "pooling": "sum"})
        self.cutoff = float(config.get("cutoff", _DEFAULT_CUTOFF))
        self.register_buffer("species_energy", torch.zeros(len(self.elements), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))
        # the neighbour normalisation measured at fit time travels with the weights (a fresh module built with
        # avg_num_neighbors "auto" and loaded from a state_dict, e.g. by trainer.test(ckpt_path=...), gets it)
        avg = config["avg_num_neighbors"]
        self.register_buffer("avg_num_neighbors", torch.tensor(1.0 if avg == AUTO else float(avg), dtype=torch.float64))
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_avg_num_neighbors())
        self._compiled_losses: Dict[bool, Any] = {}  # with stress? -> CompiledLoss, built on first use

    # ------------------------------------------------------------------ protocol (see checkpoint.TaskModule)

    @property
    def graph_spec(self) -> Dict[str, Any]:
        return {"graph": "radius", "cutoff": self.cutoff, "elements": self.elements}

    property_names = ("energy",)
    property_units = ("eV",)

    def forward(self, batch) -> torch.Tensor:
        """Total energies (num_graphs,) eV (float64 unless the module was cast)."""
        out = self.model(batch.pos, batch.node_attr, batch.edge_index, None, batch.batch, batch.num_graphs,
                         getattr(batch, "edge_shift", None))  # (G, 1)
        e0 = batch.node_attr.to(self.species_energy.dtype) @ self.species_energy  # (N,)
        return scatter_sum(e0, batch.batch, batch.num_graphs) + self.energy_scale * out[:, 0].to(e0.dtype)

    def energy(self, batch) -> torch.Tensor:
        """(num_graphs,) eV, differentiable w.r.t. batch.pos and batch.edge_shift."""
        return self(batch)

    def predict_properties(self, batch) -> torch.Tensor:
        """(num_graphs, 1) eV."""
        return self(batch)[:, None]

    # ------------------------------------------------------------------------------------ fitting

    def set_avg_num_neighbors(self, value: float) -> None:
        """Set the convolutions' neighbour normalisation; record it in the hyper-parameters and the buffer."""
        self.avg_num_neighbors.fill_(float(value))
        self._sync_avg_num_neighbors()

    def _sync_avg_num_neighbors(self) -> None:
        value = float(self.avg_num_neighbors)
        for block in self.model.blocks:
            block.conv.avg_num_neighbors = value
        self.hparams.model["avg_num_neighbors"] = value

    @torch.no_grad()
    def fit_statistics(self, loader) -> Dict[str, Any]:
        """Fit ``species_energy`` (least squares of E on element counts) and ``energy_scale`` (rms of the force
        components; without forces the std of the per-atom residual energies) on the batches of ``loader``.

        Marks the module ``fitted``: a later ``trainer.fit`` neither refits nor LSUV-initialises (call
        :meth:`initialize` yourself when training without a datamodule)."""
        counts, energies, sq, num = [], [], 0.0, 0
        for batch in loader:
            counts.append(scatter_sum(batch.node_attr.double(), batch.batch, batch.num_graphs))  # (G, K)
            energies.append(batch.energy.double())
            mask = batch.has_forces[batch.batch]
            sq += float(batch.forces[mask].double().pow(2).sum())
            num += int(mask.sum()) * 3
        if not counts:
            raise ValueError("the training set is empty: cannot fit the energy shifts")
        A, y = torch.cat(counts), torch.cat(energies)
        shifts = torch.linalg.lstsq(A, y[:, None], driver="gelsd").solution[:, 0]  # (K,)
        residual = (y - A @ shifts) / A.sum(1)  # (M,) eV/atom
        scale = (sq / num) ** 0.5 if num > 0 and sq > 0 else float(residual.std()) if len(y) > 1 else 1.0
        if not scale > 0:
            scale = 1.0
        self.species_energy.copy_(shifts)
        self.energy_scale.fill_(scale)
        self.fitted.fill_(True)
        return {"species_energy": shifts.tolist(), "energy_scale": scale,
                "residual_rms_mev_atom": 1000 * float(residual.pow(2).mean().sqrt())}

    @torch.no_grad()
    def initialize(self, batch) -> List[float]:
        """LSUV-rescale the blocks on one batch (:func:`molkern.models.normalize_activations`)."""
        return normalize_activations(self.model, batch.pos, batch.node_attr, batch.edge_index, None, batch.batch,
                                     batch.num_graphs, getattr(batch, "edge_shift", None))

    def setup(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "train_dataset"):
            return
        data_elements = tuple(dm.elements)
        if data_elements != self.elements:
            raise ValueError(f"the datamodule's elements {data_elements} differ from the model's {self.elements} "
                             "(give the same `elements` to both, in the same order)")
        if float(dm.hparams.cutoff) < self.cutoff - 1e-9:
            raise ValueError(f"the datamodule's cutoff {dm.hparams.cutoff} A is smaller than the model's "
                             f"{self.cutoff} A: edges the model reads would be missing")
        if stage == "fit" and self.hparams.model.get("avg_num_neighbors") == AUTO:
            train = dm.train_dataset
            sample = [train[i] for i in range(min(len(train), 2000))]
            self.set_avg_num_neighbors(average_num_neighbors([d.edge_index for d in sample],
                                                             [d.num_nodes for d in sample]))

    def on_fit_start(self):
        if bool(self.fitted):
            return  # resumed, or fine-tuning a fitted module
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ValueError("EnergyModule fits its energy shifts on the datamodule's training set: pass a "
                             "datamodule to trainer.fit, or call fit_statistics(loader) (and initialize(batch)) "
                             "first")
        loader = dm.train_dataloader()
        stats = self.fit_statistics(_to_device(loader, self.device))
        if self.hparams.data_init:
            self.initialize(next(iter(loader)).to(self.device))
        if self.trainer.is_global_zero:
            print(f"EnergyModule: species energies {dict(zip(self.elements, stats['species_energy']))} eV, "
                  f"energy scale {stats['energy_scale']:.4f} eV/A, shifts-only residual "
                  f"{stats['residual_rms_mev_atom']:.2f} meV/atom rms")

    # ------------------------------------------------------------------------------------ training

    def _needs_stress(self, batch, train: bool) -> bool:
        return bool(batch.has_stress.any()) and (self.hparams.stress_weight > 0 or not train)

    def _errors(self, batch, train: bool, stress: bool) -> Dict[str, tuple]:
        """Per-label errors and their label masks, without data-dependent shapes (traceable by CompiledLoss).

        Returns {name: (error, error the loss weighs, mask)}: "energy" (G,) eV/atom (weighed as is), "forces"
        (N, 3) eV/A (as is), "stress" (G, 3, 3) eV/A^3 (weighed as the virial error per atom, eV/atom); errors
        are 0 where the mask is 0.
        ``train=True`` keeps the graph for backward and skips forces whose loss weight is zero.
        """
        need_forces = self.hparams.forces_weight > 0 or not train
        out = energy_forces_stress(self, batch, need_forces, stress, create_graph=train)
        natoms = scatter_count(batch.batch, batch.num_graphs, torch.float64)  # (G,)
        e_err = (out["energy"].double() - batch.energy.double()) / natoms  # (G,) eV/atom
        errors = {"energy": (e_err, e_err, torch.ones_like(e_err))}
        if need_forces:
            mask = batch.has_forces[batch.batch, None].expand(-1, 3)  # (N, 3)
            f_err = torch.where(mask, out["forces"] - batch.forces.to(out["forces"].dtype), 0.0)  # (N, 3) eV/A
            errors["forces"] = (f_err, f_err, mask.to(f_err.dtype))
        if stress:
            mask = batch.has_stress[:, None, None].expand(-1, 3, 3)  # (G, 3, 3)
            # where, not a product: unlabelled structures may have zero volume (NaN stress)
            s_err = torch.where(mask, out["stress"] - batch.stress.to(out["stress"].dtype), 0.0)  # eV/A^3
            volume = torch.linalg.det(batch.cell.double()).abs()  # (G,)
            virial = s_err.double() * (volume / natoms)[:, None, None]  # (G, 3, 3) eV/atom
            errors["stress"] = (s_err, virial, mask.to(s_err.dtype))
        return errors

    def loss(self, batch, stress: bool = False) -> torch.Tensor:
        """The training loss (0-dim, dimensionless; see the module docstring), traceable for CompiledLoss.

        stress: include the stress term (the batch has stress labels and ``stress_weight > 0``).
        """
        return self._loss(self._errors(batch, True, stress))

    def _loss(self, errors: Dict[str, tuple]) -> torch.Tensor:
        hp, scale = self.hparams, self.energy_scale
        weights = {"energy": hp.energy_weight, "forces": hp.forces_weight, "stress": hp.stress_weight}
        loss = torch.zeros((), dtype=torch.float64, device=scale.device)
        for name, (_, err, mask) in errors.items():
            mean_sq = (err.double() / scale).pow(2).sum() / mask.sum().clamp(min=1)  # over the labelled components
            loss = loss + weights[name] * mean_sq
        return loss

    def loss_and_metrics(self, batch, train: bool = False):
        """The loss (dimensionless, see the module docstring) and the metrics of one batch.

        Returns:
            (loss, {name: (value, weight)}) with names energy_mae (meV/atom), forces_mae (meV/A) and
            stress_mae (meV/A^3, when the batch has stress); ``train=True`` keeps the graph for backward and
            skips derivatives whose loss weight is zero.
        """
        errors = self._errors(batch, train, self._needs_stress(batch, train))
        metrics = {}
        for name, (err, _, mask) in errors.items():
            count = int(mask.sum())
            if count:
                metrics[f"{name}_mae"] = (1000 * err.detach().abs().sum() / count, count)
        return self._loss(errors), metrics

    def _step(self, batch, stage: str) -> torch.Tensor:
        train = stage == "train"
        loss, metrics = self.loss_and_metrics(batch, train)
        for name, (value, weight) in metrics.items():
            self.log(f"{stage}_{name}", value.float(), batch_size=int(weight), sync_dist=not train)
        self.log(f"{stage}_loss", loss.detach().float(), batch_size=batch.num_graphs, prog_bar=True,
                 sync_dist=not train)
        return loss

    def training_step(self, batch, batch_idx):
        if not self.hparams.compile:
            return self._step(batch, "train")
        from .compiled import CompiledLoss  # compiled imports this module

        stress = self._needs_stress(batch, True)
        if stress not in self._compiled_losses:
            self._compiled_losses[stress] = CompiledLoss(self, functools.partial(EnergyModule.loss, stress=stress))
        loss = self._compiled_losses[stress](batch)
        self.log("train_loss", loss.float(), batch_size=batch.num_graphs, prog_bar=True)
        return loss

    def on_fit_end(self):
        self._compiled_losses = {}  # the compiled graphs hold the module: not kept past the fit

    def _eval_step(self, batch, stage: str):
        # Lightning evaluates under inference mode; forces need autograd on ordinary (cloned) tensors
        with torch.inference_mode(False), torch.enable_grad():
            self._step(batch.clone(), stage)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        """dict(energy (G,) eV, forces (N, 3) eV/A)."""
        with torch.inference_mode(False), torch.enable_grad():
            out = energy_forces_stress(self, batch.clone(), forces=True)
        return {k: v.detach() for k, v in out.items()}

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.scheduler, hp.warmup_epochs, hp.min_lr_ratio)


def _to_device(loader, device):
    for batch in loader:
        yield batch.to(device)


class AtomsDataModule(L.LightningDataModule):
    """Random train / val / test splits of the frames of ASE-readable files (:class:`AtomsDataset`).

    Args:
        paths: one structure file or a list (extxyz with energy, forces, optionally stress).
        elements: element symbols or atomic numbers, in the model's order (None: the files' elements by Z).
        cutoff: radius-graph cutoff in Angstrom (at least the model's cutoff).
        train_fraction, val_fraction, test_fraction: shares of the frames (sum <= 1), drawn with ``seed``.
        batch_size: structures per training batch; eval_batch_size: for val/test (default: batch_size).
        num_workers: DataLoader workers. cache_dir: cache of processed graphs (None: none).
        index, energy_key, forces_key, stress_key, require_forces: see :class:`AtomsDataset`.

    The split indices (into the concatenated frames) and the frame sources are written to
    ``split_indices.json`` in the trainer's log dir when a trainer is attached.
    """

    def __init__(
        self,
        paths: Union[str, List[str]],
        elements: Optional[List[Union[str, int]]] = None,
        cutoff: float = 5.0,
        train_fraction: float = 0.8,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        index: str = ":",
        energy_key: str = "energy",
        forces_key: str = "forces",
        stress_key: str = "stress",
        require_forces: bool = True,
    ):
        super().__init__()
        fractions = (train_fraction, val_fraction, test_fraction)
        if any(not 0 <= f <= 1 for f in fractions) or sum(fractions) > 1 + 1e-9 or train_fraction <= 0:
            raise ValueError("train/val/test fractions must lie in [0, 1], sum to <= 1, with train > 0; "
                             f"got {fractions}")
        self.save_hyperparameters()
        self.dataset: Optional[AtomsDataset] = None
        self.split_indices: Dict[str, List[int]] = {}
        self.parts: Dict[str, torch.utils.data.Subset] = {}

    @property
    def elements(self):
        if self.dataset is None:
            self.setup("fit")
        return self.dataset.elements

    def setup(self, stage: Optional[str] = None):
        hp = self.hparams
        if self.dataset is None:
            self.dataset = AtomsDataset(hp.paths, hp.elements, hp.cutoff, hp.index, hp.energy_key, hp.forces_key,
                                        hp.stress_key, hp.require_forces, hp.cache_dir)
            m = len(self.dataset)
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val, n_test = round(hp.val_fraction * m), round(hp.test_fraction * m)
            n_train = min(round(hp.train_fraction * m), m - n_val - n_test)
            if n_train < 1:
                raise ValueError(f"{hp.paths}: {m} structures leave no training set with fractions "
                                 f"{hp.train_fraction}/{hp.val_fraction}/{hp.test_fraction}")
            self.split_indices = {"train": sorted(perm[:n_train]), "val": sorted(perm[n_train:n_train + n_val]),
                                  "test": sorted(perm[n_train + n_val:n_train + n_val + n_test])}
            self.parts = {k: torch.utils.data.Subset(self.dataset, v) for k, v in self.split_indices.items()}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            folder = trainer.log_dir or trainer.default_root_dir  # log_dir must be called on every process
            if folder and trainer.is_global_zero:
                self.save_split(Path(folder) / "split_indices.json")

    def save_split(self, path: Union[str, os.PathLike]) -> Path:
        """Write the split indices and frame sources as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"seed": self.hparams.seed, "paths": [str(p) for p in self.dataset.paths],
                   "sources": self.dataset.sources, **self.split_indices}
        return atomic_write(path, json.dumps(payload))

    @property
    def train_dataset(self):
        if not self.parts:
            self.setup("fit")
        return self.parts["train"]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        if not self.parts:
            self.setup()
        size = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        return DataLoader(self.parts[split], batch_size=size, shuffle=shuffle, num_workers=hp.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader("test", False)
