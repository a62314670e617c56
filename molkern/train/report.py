"""Test report: MAE per target in the targets' units (printed and JSON) and a parity plot."""

import json
from pathlib import Path
from typing import Sequence

import torch

from ..io import atomic_write, save_figure


def mae_table(names: Sequence[str], units: Sequence[str], mae: Sequence[float], count: int) -> str:
    """A plain-text table: target, unit, MAE."""
    lines = [f"Test MAE over {count} molecules", f"{'target':<8} {'unit':<12} {'MAE':>12}"]
    lines += [f"{n:<8} {u:<12} {m:>12.4g}" for n, u, m in zip(names, units, mae)]
    return "\n".join(lines)


def write_test_report(folder: Path, names: Sequence[str], units: Sequence[str],
                      pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Print the MAE table, write ``test_mae.json`` and ``parity.png`` into ``folder`` (atomically).

    Shapes:
        pred, target: (M, T) in the targets' units
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    folder.mkdir(parents=True, exist_ok=True)
    mae = (pred - target).abs().mean(0).tolist() if len(pred) else [float("nan")] * len(names)
    result = {"num_molecules": int(pred.shape[0]),
              "mae": {n: {"value": m, "unit": u} for n, u, m in zip(names, units, mae)}}
    print(mae_table(names, units, mae, int(pred.shape[0])))
    atomic_write(folder / "test_mae.json", json.dumps(result, indent=2))

    cols = min(len(names), 4)
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        x, y = target[:, k].numpy(), pred[:, k].numpy()
        ax.scatter(x, y, s=2, alpha=0.4)
        if len(x):
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{names[k]}: MAE {mae[k]:.3g} {units[k]}", fontsize=9)
        ax.set_xlabel(f"true [{units[k]}]")
        ax.set_ylabel(f"predicted [{units[k]}]")
    fig.tight_layout()
    save_figure(fig, folder / "parity.png")
    return result
