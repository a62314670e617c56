"""Point-cloud sweep (paper section 5.3, Figure 3): test accuracy per symmetry group, implicit vs standard kernels.

Trains :class:`molkern.models.pointcloud.PointCloudClassifier` for every group of the config (default
c1, SO(2), O(2) = C_inf_v, C_inf_h, SO(3), O(3), all about z) with the implicit kernel, and with the
standard kernel where molkern defines it (O(3) only: MolkernNet and the classifier raise for subgroups;
for SO(3) the standard network would be the very same network as for O(3), since the standard kernel
takes no reference inputs, so it is reported once, under O(3)). The standard kernel's radial-MLP width
is chosen so its parameter count is closest to the implicit O(3) model's (same hidden irreps). Every
partition is rotated by random elements of the augmentation group (default rotations about z, as in
the paper); the reported number is the test accuracy at the epoch of best validation accuracy, mean and
std (population) over seeds.

Data: the offline procedural dataset (written under ``procedural.root`` if missing, see
molkern.data.write_procedural_dataset) and, if given (``--modelnet PATH`` or ``modelnet_root``), ModelNet-40
as you have it (resampled text or OFF layout; never downloaded).

Usage:
    python -m molkern.experiments.pointcloud_sweep --config configs/pointcloud_quick.yaml [--out DIR]
        [--modelnet PATH] [--jobs 2] [--no-progress]

Writes DIR/results.json (config, parameter counts, every run, mean/std per cell, seconds), DIR/results.md
(the accuracy table) and DIR/pointcloud_<dataset>.png (bars per group, implicit vs standard) per dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch_geometric.loader import DataLoader

from ..data.modelnet import ModelNet, write_procedural_dataset
from ..io import atomic_write, save_figure
from ..models import normalize_activations
from ..models.baselines import count_parameters, match_width
from ..models.pointcloud import PointCloudClassifier

__all__ = ["PointCloudDataModule", "PointCloudModule", "standard_width", "summarise", "train_pointcloud"]

KEYS = {"procedural", "modelnet_root", "datasets", "groups", "kernel", "standard", "seeds", "augment", "data",
        "model", "optim", "trainer"}  # fmt: skip
GROUP_LABELS = {"c1": "trivial", "so2": "SO(2)", "o2": "O(2)=C$_{\\infty v}$", "cinfh": "C$_{\\infty h}$",
                "so3": "SO(3)", "o3": "O(3)", "cn": "C$_n$", "dn": "D$_n$", "dinf": "D$_\\infty$"}  # fmt: skip
STANDARD_GROUPS = ("o3",)


# ------------------------------------------------------------------------------------------------ training
class PointCloudModule(L.LightningModule):
    """Cross-entropy classification of point clouds; AdamW with a cosine schedule over ``max_epochs``.

    Logged metrics: ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_acc`` (fractions).
    """

    def __init__(self, num_classes: int, model: Optional[Dict[str, Any]] = None, lr: float = 3e-3,
                 weight_decay: float = 1e-4, label_smoothing: float = 0.0, max_epochs: int = 10):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.model = PointCloudClassifier(num_classes, **(model or {}))

    def forward(self, batch):
        return self.model(batch.pos, batch.normal, batch.batch, batch.num_graphs)  # (B, num_classes)

    def _step(self, batch, name):
        logits = self(batch)
        smoothing = self.hparams.label_smoothing if name == "train" else 0.0
        loss = F.cross_entropy(logits, batch.y, label_smoothing=smoothing)
        acc = (logits.argmax(-1) == batch.y).float().mean()
        self.log(f"{name}_loss", loss, batch_size=batch.num_graphs, on_step=False, on_epoch=True)
        self.log(f"{name}_acc", acc, batch_size=batch.num_graphs, on_step=False, on_epoch=True, prog_bar=True)
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
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(hp.max_epochs, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class PointCloudDataModule(L.LightningDataModule):
    """Train / val / test splits of :class:`molkern.data.ModelNet` (any root in a ModelNet layout)."""

    def __init__(self, root: str, num_points: int = 1024, augment: Optional[str] = "so2", batch_size: int = 16,
                 val_fraction: float = 0.2, split_seed: int = 0, augment_seed: int = 0, prefix: Optional[str] = None,
                 num_workers: int = 0):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.datasets = {}

    def setup(self, stage=None):
        hp = self.hparams
        for split in ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = ModelNet(hp.root, split, hp.num_points, augment=hp.augment,
                                                val_fraction=hp.val_fraction, split_seed=hp.split_seed,
                                                augment_seed=hp.augment_seed, prefix=hp.prefix)  # fmt: skip

    def _loader(self, split, shuffle):
        hp = self.hparams
        return DataLoader(self.datasets[split], batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


def train_pointcloud(
    root: str,
    group: str,
    kernel: str = "factorised",
    seed: int = 0,
    model: Optional[Dict[str, Any]] = None,
    optim: Optional[Dict[str, Any]] = None,
    data: Optional[Dict[str, Any]] = None,
    augment: Optional[str] = "so2",
    max_epochs: int = 10,
    check_val_every_n_epoch: int = 1,
    gradient_clip_val: Optional[float] = None,
    data_init: bool = True,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train one classifier and return its test accuracy at the epoch of best validation accuracy.

    Args:
        root: dataset root in a ModelNet layout. group, kernel: of the classifier. seed: initialisation,
            batch order, augmentation and downsampling (the train/val split is fixed by ``data["split_seed"]``).
        model: kwargs of PointCloudClassifier (besides num_classes, group, kernel); optim: lr, weight_decay,
            label_smoothing; data: num_points, batch_size, val_fraction, split_seed, prefix.
        augment: group whose random elements rotate every partition (None: no augmentation).
        data_init: rescale the blocks on the first training batch (molkern.models.normalize_activations).

    Returns:
        dict with group, kernel, seed, num_parameters, best_val_acc, test_acc, best_epoch, epochs, seconds.
    """
    start = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = PointCloudDataModule(root, augment=augment, augment_seed=seed, **(data or {}))
    datamodule.setup("fit")
    num_classes = datamodule.datasets["train"].num_classes
    module = PointCloudModule(num_classes, model=dict(model or {}, group=group, kernel=kernel),
                              max_epochs=max_epochs, **(optim or {}))  # fmt: skip
    if data_init:
        b = next(iter(datamodule.train_dataloader()))
        with torch.no_grad():
            normalize_activations(module.model, b.pos, b.normal, b.batch, b.num_graphs)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ModelCheckpoint(dirpath=tmp, monitor="val_acc", mode="max", save_top_k=1)
        trainer = L.Trainer(max_epochs=max_epochs, check_val_every_n_epoch=check_val_every_n_epoch,
                            gradient_clip_val=gradient_clip_val, callbacks=[checkpoint], logger=False,
                            enable_progress_bar=progress, enable_model_summary=False, accelerator="cpu", devices=1,
                            num_sanity_val_steps=0, deterministic=False)  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        best_epoch = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)["epoch"]
        (result,) = trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
    return {"group": group, "kernel": kernel, "seed": seed, "num_parameters": count_parameters(module.model),
            "best_val_acc": float(checkpoint.best_model_score), "test_acc": float(result["test_acc"]),
            "best_epoch": best_epoch, "epochs": max_epochs, "seconds": time.perf_counter() - start}  # fmt: skip


def standard_width(num_classes: int, model: Dict[str, Any], target: int) -> int:
    """``radial_mlp_width`` of the standard-kernel O(3) classifier (same hidden irreps as ``model``) whose
    parameter count is closest to ``target``: the two networks then differ in their kernels only."""

    def build(width):
        return PointCloudClassifier(num_classes, **dict(model, group="o3", kernel="standard", radial_mlp_width=width))

    return match_width(build, target, lo=1, hi=256)


# ------------------------------------------------------------------------------------------------ reporting
def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and std (population, over seeds) of the test accuracy per (dataset, group, kernel)."""
    cells: Dict[tuple, list] = {}
    for r in runs:
        cells.setdefault((r["dataset"], r["group"], r["kernel"]), []).append(r)
    return [{"dataset": d, "group": g, "kernel": k, "mean": statistics.fmean(x["test_acc"] for x in v),
             "std": statistics.pstdev([x["test_acc"] for x in v]), "num_seeds": len(v),
             "num_parameters": v[0]["num_parameters"]} for (d, g, k), v in cells.items()]  # fmt: skip


def table(summary: List[Dict[str, Any]], groups: List[str], implicit: str) -> str:
    """Markdown table: test accuracy (%) mean +- std over seeds, one row per group, per dataset."""
    lines = []
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        cell = {(s["group"], s["kernel"]): s for s in summary if s["dataset"] == dataset}
        lines += [f"**{dataset}** (test accuracy %, mean +- std over seeds; parameters in brackets)", "",
                  f"| group | implicit ({implicit}) | standard |", "|---|---|---|"]  # fmt: skip
        for g in groups:
            row = []
            for k in (implicit, "standard"):
                s = cell.get((g, k))
                if s is None:
                    same_as_o3 = g == "so3" and k == "standard"
                    row.append("= O(3) network (not re-run)" if same_as_o3 else "n/a (not defined)")
                else:
                    acc = f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f}"
                    row.append(f"{acc} ({s['num_parameters']:,} p., n={s['num_seeds']})")
            lines.append(f"| {g} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], groups: List[str], implicit: str, dataset: str, path: Path) -> None:
    """Bars per group (implicit orange, standard blue, as in the paper's Figure 3), error bars = std."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    cell = {(s["group"], s["kernel"]): s for s in summary if s["dataset"] == dataset}
    fig = Figure(figsize=(1.3 * len(groups) + 1.5, 3.6))
    ax = fig.subplots()
    width = 0.38
    bars = [(-width / 2, "standard", "tab:blue", "standard kernel"),
            (width / 2, implicit, "tab:orange", f"implicit kernel ({implicit})")]
    pairs = {g for g in groups if (g, "standard") in cell and (g, implicit) in cell}
    for offset, kernel, color, label in bars:  # a group with one kernel gets one centred bar
        xs = [i + (offset if g in pairs else 0.0) for i, g in enumerate(groups) if (g, kernel) in cell]
        rows = [cell[(g, kernel)] for g in groups if (g, kernel) in cell]
        ax.bar(xs, [100 * r["mean"] for r in rows], width, yerr=[100 * r["std"] for r in rows], capsize=3,
               color=color, label=label)  # fmt: skip
        for x, r in zip(xs, rows):
            top = 100 * (r["mean"] + r["std"]) + 0.5
            ax.text(x, top, f"{100 * r['mean']:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [GROUP_LABELS.get(g, g) for g in groups])
    means = [100 * s["mean"] for s in cell.values()]
    ax.set_ylim(max(0.0, min(means) - 15), min(100.0, max(means) + 12))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{dataset}: accuracy per symmetry group G")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=150)


def _run(job: Dict[str, Any]) -> Dict[str, Any]:
    """One training run (in a worker process when --jobs > 1)."""
    torch.set_num_threads(job.pop("num_threads"))
    warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    dataset = job.pop("dataset")
    return dict(train_pointcloud(**job), dataset=dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pointcloud_quick.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: results/<config name>)")
    parser.add_argument("--modelnet", default=None, help="ModelNet-40 root (text or OFF layout) to run as well")
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one torch thread each)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite results.md and the PNGs from an existing DIR/results.json")
    args = parser.parse_args(argv)

    config = yaml.safe_load(Path(args.config).read_text())
    unknown = set(config) - KEYS
    if unknown:
        raise SystemExit(f"unknown config key(s) {sorted(unknown)}; valid: {sorted(KEYS)}")
    out = Path(args.out or Path("results") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        result = json.loads((out / "results.json").read_text())
        groups = list(result["config"].get("groups", ["c1", "so2", "o2", "cinfh", "so3", "o3"]))
        implicit = result["config"].get("kernel", "factorised")
        atomic_write(out / "results.md", table(result["summary"], groups, implicit)
                      + f"\nwall time {result['seconds']:.0f} s ({result.get('jobs', 1)} job(s))\n")  # fmt: skip
        for name in result["datasets"]:
            plot(result["summary"], groups, implicit, name, out / f"pointcloud_{name}.png")
        print((out / "results.md").read_text())
        return
    warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.num_threads)

    start = time.perf_counter()
    datasets = {}
    if "procedural" in config:
        proc = dict(config["procedural"])
        root = proc.pop("root", "data/shapes")
        print(f"procedural dataset under {root} ...", flush=True)
        datasets["procedural"] = str(write_procedural_dataset(root, **proc))
    modelnet = args.modelnet or config.get("modelnet_root")
    if modelnet:
        datasets["modelnet40"] = str(modelnet)
    if not datasets:
        raise SystemExit("nothing to run: give a 'procedural' section or a ModelNet path (--modelnet)")

    groups = list(config.get("groups", ["c1", "so2", "o2", "cinfh", "so3", "o3"]))
    implicit = config.get("kernel", "factorised")
    model, data = dict(config.get("model", {})), dict(config.get("data", {}))
    jobs, counts = [], {}
    for name, root in datasets.items():
        num_classes = ModelNet(root, "test", data.get("num_points", 1024), prefix=data.get("prefix")).num_classes
        counts[name] = {
            f"{g}/{implicit}": count_parameters(PointCloudClassifier(num_classes, group=g, kernel=implicit, **model))
            for g in groups
        }
        variants = [(g, implicit, model) for g in groups]
        if config.get("standard", True):
            target = counts[name].get(f"o3/{implicit}") or count_parameters(
                PointCloudClassifier(num_classes, group="o3", kernel=implicit, **model))  # fmt: skip
            std_model = dict(model, radial_mlp_width=standard_width(num_classes, model, target))
            for g in (g for g in groups if g in STANDARD_GROUPS):
                counts[name][f"{g}/standard"] = count_parameters(
                    PointCloudClassifier(num_classes, group=g, kernel="standard", **std_model))  # fmt: skip
                variants.append((g, "standard", std_model))
        print(f"{name}: {num_classes} classes; parameters {counts[name]}", flush=True)
        for seed in config.get("seeds", [0]):
            for g, kernel, m in variants:
                jobs.append({"dataset": name, "root": root, "group": g, "kernel": kernel, "seed": seed, "model": m,
                             "optim": config.get("optim"), "data": data, "augment": config.get("augment", "so2"),
                             "progress": not args.no_progress and args.jobs == 1, "num_threads": args.num_threads,
                             **config.get("trainer", {})})  # fmt: skip

    runs: List[Dict[str, Any]] = []

    def record(run):
        runs.append(run)
        print(f"{run['dataset']} seed={run['seed']} {run['group']:6s} {run['kernel']:10s} "
              f"test_acc={run['test_acc']:.4f} "
              f"(best val {run['best_val_acc']:.4f} at epoch {run['best_epoch']}, {run['seconds']:.0f} s)", flush=True)
        result = {"config": config, "datasets": datasets, "parameter_counts": counts, "runs": runs,
                  "summary": summarise(runs), "jobs": args.jobs, "seconds": time.perf_counter() - start}  # fmt: skip
        atomic_write(out / "results.json", json.dumps(result, indent=2))

    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for run in pool.map(_run, jobs):
                record(run)
    else:
        for job in jobs:
            record(_run(job))

    summary = summarise(runs)
    result = {"config": config, "datasets": datasets, "parameter_counts": counts, "runs": runs, "summary": summary,
              "jobs": args.jobs, "seconds": time.perf_counter() - start}  # fmt: skip
    atomic_write(out / "results.json", json.dumps(result, indent=2))
    text = table(summary, groups, implicit)
    atomic_write(out / "results.md", text + f"\nwall time {time.perf_counter() - start:.0f} s ({args.jobs} job(s))\n")
    for name in datasets:
        plot(summary, groups, implicit, name, out / f"pointcloud_{name}.png")
    print("\n" + text)
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out / 'results.json'}, {out / 'results.md'} and the PNGs")


if __name__ == "__main__":
    main()
