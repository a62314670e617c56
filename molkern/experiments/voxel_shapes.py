"""Voxel shape classification with dense steerable convolutions: O(3), SO(2) about z and the trivial group.

Procedural meshes (molkern.data.shapes, 12 classes, built upright along z) are rotated, surface-sampled
and voxelised to 32^3 occupancy grids. Training shapes get a random rotation about z ("z"); the test sets
get a random rotation about z ("z") or a uniformly random 3D rotation ("so3"), the ModelNet z/z and z/SO(3)
protocols. Each group's VoxelClassifier is initialised (data-free, then LSUV on one batch), trained with
Lightning (AdamW, cross-entropy) and evaluated on both test sets.

Usage:
    python -m molkern.experiments.voxel_shapes [--quick] [--groups o3,so2,c1] [--epochs 4] [--out DIR]

Prints the initialisation variances (per conv: output / input second moment on a training batch,
before and after LSUV) and the accuracy table; writes DIR/voxel_shapes.json (default results/).
"""

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write

GRID = 32
EXTENT = 1.0  # the grid spans [-EXTENT, EXTENT]^3 (dimensionless mesh units; meshes fit the unit ball)
POINTS_PER_SHAPE = 12_000
ORIENTATIONS = ("z", "so3", "none")


def voxelize(points: np.ndarray, size: int = GRID, extent: float = EXTENT) -> np.ndarray:
    """Occupancy of a size^3 grid over [-extent, extent]^3: 1 where a point falls, else 0.

    Axis order: grid[i, j, k] is the voxel at x_i, y_j, z_k (molkern's voxel convention).

    Shapes:
        points: (n, 3) -> (size, size, size) float32
    """
    idx = np.clip(np.floor((points + extent) / (2 * extent) * size).astype(np.int64), 0, size - 1)
    grid = np.zeros((size, size, size), np.float32)
    grid[idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return grid


def random_rotation(orientation: str, rng: np.random.Generator) -> np.ndarray:
    """A (3, 3) rotation: about z ("z"), uniform in SO(3) ("so3") or the identity ("none")."""
    if orientation == "none":
        return np.eye(3)
    if orientation == "z":
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    if orientation == "so3":
        q = rng.normal(size=4)
        w, x, y, z = q / np.linalg.norm(q)
        return np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])
    raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")


def make_split(num_per_class: int, orientation: str, seed: int, size: int = GRID):
    """Voxelised random shapes of every class, rotated as `orientation` says (about the origin).

    Returns:
        x (N, 1, size, size, size) float32 occupancy, y (N,) int64 class indices (SHAPE_CLASSES order).
    """
    from molkern.data.shapes import SHAPE_CLASSES, generate_mesh, sample_surface

    rng = np.random.default_rng(seed)
    grids, labels = [], []
    for _ in range(num_per_class):
        for label, name in enumerate(SHAPE_CLASSES):
            vertices, faces = generate_mesh(name, rng)
            points, _ = sample_surface(vertices, faces, POINTS_PER_SHAPE, rng)
            grids.append(voxelize(points @ random_rotation(orientation, rng).T, size))
            labels.append(label)
    return torch.from_numpy(np.stack(grids))[:, None], torch.tensor(labels)


def init_variances(model, x):
    """(input, output) second moments of every DenseSteerableConv3d of `model` on the batch x, and the logit variance."""
    from molkern.nn.voxel import DenseSteerableConv3d

    rows = []
    hooks = [m.register_forward_hook(lambda mod, args, y: rows.append((float(args[0].pow(2).mean()), float(y.pow(2).mean()))))
             for m in model.modules() if isinstance(m, DenseSteerableConv3d)]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return rows, float(out.var())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and one epoch (a smoke test, ~1 min)")
    parser.add_argument("--groups", default="o3,so2,c1", help="comma-separated molkern.groups names")
    parser.add_argument("--train-per-class", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--channels", default="4,8,16", help="multiplicity of 0e and 1o per block")
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--out", default="results", help="output directory (voxel_shapes.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_per_class, args.test_per_class, args.epochs = 2, 2, 1

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from molkern.data.shapes import SHAPE_CLASSES
    from molkern.models.voxel import VoxelClassifier, normalize_voxel_activations

    torch.set_num_threads(args.num_threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|jit.script).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    x_train, y_train = make_split(args.train_per_class, "z", args.seed)
    tests = {o: make_split(args.test_per_class, o, args.seed + 1 + k) for k, o in enumerate(("z", "so3"))}
    # occupancy scaled to unit second moment (a constant: invariant) so that the first layer sees unit variance
    input_scale = float(x_train.pow(2).mean().rsqrt())
    print(f"data: {len(x_train)} train, {len(tests['z'][0])} + {len(tests['so3'][0])} test grids of {GRID}^3, "
          f"occupancy {1 / input_scale**2:.4f}, {time.perf_counter() - start:.0f} s", flush=True)

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.model(x * input_scale), y)
            self.log("train_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=1e-4)
            steps = args.epochs * -(-len(x_train) // args.batch_size)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
                opt, args.lr, total_steps=steps, pct_start=0.15), "interval": "step"}}

    @torch.no_grad()
    def accuracy(model, x, y):
        model.eval()
        preds = torch.cat([model(xb * input_scale).argmax(-1) for xb in x.split(64)])
        return float((preds == y).float().mean())

    channels = tuple(int(c) for c in args.channels.split(","))
    runs = []
    for group in args.groups.split(","):
        L.seed_everything(args.seed, verbose=False)
        model = VoxelClassifier(len(SHAPE_CLASSES), group=group, num_channels=channels, kernel_size=args.kernel_size)
        model.eval()  # the measurements below leave the head's BatchNorm statistics alone
        probe = x_train[torch.randperm(len(x_train))[:32]] * input_scale
        data_free, _ = init_variances(model, probe)
        normalize_voxel_activations(model, probe)
        lsuv, logit_var = init_variances(model, probe)
        model.train()  # Lightning keeps the modes it finds
        num_params = sum(p.numel() for p in model.parameters())
        def fmt(rows):
            return ", ".join(f"{i:.2f} -> {o:.2f} (x{o / i:.2f})" for i, o in rows)

        print(f"\n[{group}] {num_params} parameters; per conv, input -> output second moment (gain) at init on a "
              f"training batch:\n  data-free (unit gain on white noise): {fmt(data_free)}\n"
              f"  after LSUV on that batch:             {fmt(lsuv)}; logit variance {logit_var:.3f}", flush=True)
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
        trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=not args.no_progress, enable_model_summary=False)
        t0 = time.perf_counter()
        trainer.fit(Module(model), loader)
        train_s = time.perf_counter() - t0
        acc = {o: accuracy(model, *tests[o]) for o in tests}
        acc_train = accuracy(model, x_train, y_train)
        runs.append({"group": group, "parameters": num_params, "train_seconds": train_s, "train_acc": acc_train,
                     "test_acc_z": acc["z"], "test_acc_so3": acc["so3"], "init_m2_in_out_data_free": data_free,
                     "init_m2_in_out_lsuv": lsuv, "final_train_loss": float(trainer.callback_metrics.get("train_loss", float("nan")))})
        print(f"[{group}] train acc {acc_train:.3f}, test acc z {acc['z']:.3f}, so3 {acc['so3']:.3f} "
              f"({train_s:.0f} s training)", flush=True)

    total = time.perf_counter() - start
    print(f"\nvoxel shapes, {len(SHAPE_CLASSES)} classes, {GRID}^3 occupancy, train: z-rotated, "
          f"{len(x_train)} shapes x {args.epochs} epochs")
    print(f"{'group':6s} {'params':>7s} {'train':>6s} {'test z':>7s} {'test SO3':>9s} {'train s':>8s}")
    for r in runs:
        print(f"{r['group']:6s} {r['parameters']:7d} {r['train_acc']:6.3f} {r['test_acc_z']:7.3f} "
              f"{r['test_acc_so3']:9.3f} {r['train_seconds']:8.0f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "grid": GRID, "classes": list(SHAPE_CLASSES), "runs": runs, "seconds": total,
              "threads": torch.get_num_threads()}
    atomic_write(out / "voxel_shapes.json", json.dumps(result, indent=2))
    print(f"total {total:.0f} s; wrote {out / 'voxel_shapes.json'}")


if __name__ == "__main__":
    main()
