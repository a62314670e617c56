"""N-body sweep: test MSE (at the best validation epoch) against the plane stiffness k, per group.

Reproduces the protocol of the paper's Figure 2: O(3), SO(2) about z, O(2) about z (C_inf_v, the
system's true symmetry) and a non-equivariant MPNN of about the same size, trained on
molkern.data.NBody at each stiffness for several seeds.

Usage:
    python -m molkern.experiments.nbody_sweep --config configs/nbody_quick.yaml [--out DIR] [--num-threads 1] [--no-progress]

Writes DIR/results.json (config, parameter counts, every run, mean/std per (group, k), total seconds)
and DIR/nbody_sweep.png (test MSE vs k, one line per model, error bars = std over seeds, log y).
"""

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import yaml

KEYS = {"data_root", "stiffness", "groups", "seeds", "data", "model", "optim", "trainer"}


def summarise(runs):
    """Mean and std (over seeds) of the test MSE per (group, stiffness)."""
    cells = {}
    for r in runs:
        cells.setdefault((r["group"], r["stiffness"]), []).append(r["test_mse"])
    return [
        {"group": g, "stiffness": k, "mean": statistics.fmean(v), "std": statistics.pstdev(v), "num_seeds": len(v)}
        for (g, k), v in cells.items()
    ]


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"o3": "O(3)", "so2": "SO(2)", "o2": "O(2) (C$_{\\infty v}$)", "baseline": "MPNN (no symmetry)"}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for group in dict.fromkeys(s["group"] for s in summary):
        rows = sorted((s for s in summary if s["group"] == group), key=lambda s: s["stiffness"])
        ax.errorbar([s["stiffness"] for s in rows], [s["mean"] for s in rows], yerr=[s["std"] for s in rows],
                    marker="o", capsize=3, label=labels.get(group, group))
    ax.set_yscale("log")
    ax.set_xlabel("plane stiffness k")
    ax.set_ylabel("test MSE")
    ax.set_title("N-body: test MSE at best validation epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/nbody_quick.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: results/<config name>)")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the graphs are tiny, more threads mostly add overhead)")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args(argv)

    config = yaml.safe_load(Path(args.config).read_text())
    unknown = set(config) - KEYS
    if unknown:
        raise SystemExit(f"unknown config key(s) {sorted(unknown)}; valid: {sorted(KEYS)}")
    out = Path(args.out or Path("results") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.num_threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from molkern.train import parameter_counts, train_nbody

    groups = config.get("groups", ["o3", "so2", "o2", "baseline"])
    counts = parameter_counts(groups, **config.get("model", {}))
    print("parameters:", counts, flush=True)
    trainer = dict(config.get("trainer", {}))
    runs, start = [], time.perf_counter()
    for k in config["stiffness"]:
        for seed in config.get("seeds", [0]):
            for group in groups:
                run = train_nbody(group, k, config.get("data_root", "data/nbody"), seed=seed,
                                  model=config.get("model"), optim=config.get("optim"), data=config.get("data"),
                                  progress=not args.no_progress, **trainer)
                runs.append(run)
                print(f"k={k} seed={seed} {group:9s} test_mse={run['test_mse']:.5f} "
                      f"(best val {run['best_val_mse']:.5f} at epoch {run['best_epoch']}, {run['seconds']:.0f} s)",
                      flush=True)
                summary = summarise(runs)
                result = {"config": config, "parameter_counts": counts, "runs": runs, "summary": summary,
                          "seconds": time.perf_counter() - start}
                (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(summary, out / "nbody_sweep.png")
    print(f"\n{'group':9s} " + " ".join(f"k={k:<9g}" for k in config["stiffness"]))
    for group in groups:
        cells = {s["stiffness"]: s for s in summary if s["group"] == group}
        print(f"{group:9s} " + " ".join(f"{cells[float(k)]['mean']:<11.5f}" for k in config["stiffness"]))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out / 'results.json'} and {out / 'nbody_sweep.png'}")


if __name__ == "__main__":
    main()
