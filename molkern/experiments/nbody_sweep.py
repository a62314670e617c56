"""N-body sweep: test MSE (at the best validation epoch) against the plane stiffness k, per group.

Reproduces the protocol of the paper's Figure 2: O(3), SO(2) about z, O(2) about z (C_inf_v, the
system's true symmetry) and a non-equivariant MPNN of about the same size, trained on
molkern.data.NBody at each stiffness for several seeds.

Usage:
    python -m molkern.experiments.nbody_sweep --config configs/nbody_quick.yaml [--out DIR] [--jobs 2]
        [--num-threads 1] [--no-progress] [--resume] [--replot]

Writes DIR/results.json (config, parameter counts, every run, mean/std per (group, k), total seconds)
and DIR/nbody_sweep.png (test MSE vs k, one line per model, error bars = std over seeds, log y).

``--jobs N`` trains N runs at once in separate processes (``--num-threads`` torch threads each); every
run seeds itself (``train_nbody(seed=...)``), so a run's numbers do not depend on N or on the order.
Runs go seed by seed (all k and groups of seed 0 first), and results.json is rewritten after each, so
an interrupted sweep still covers every k; ``--resume`` keeps the runs of an existing results.json
written with the same config (up to the list of seeds) and trains only the missing ones.
"""

import argparse
import json
import logging
import multiprocessing
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from ..io import atomic_write, save_figure

GROUPS = ["o3", "so2", "o2", "baseline"]  # default models of a sweep
KEYS = {"data_root", "stiffness", "groups", "seeds", "data", "model", "optim", "trainer"}


def summarise(runs):
    """Mean and std (population, over seeds) of the test MSE per (group, stiffness), and how many of the
    seeds had their best validation at the last validated epoch (a sign that training had not converged)."""
    cells = {}
    for r in runs:
        cells.setdefault((r["group"], r["stiffness"]), []).append(r)
    summary = []
    for (g, k), rs in cells.items():
        v = [r["test_mse"] for r in rs]
        last = sum(1 for r in rs if r.get("val_curve") and r["best_epoch"] == r["val_curve"][-1][0])
        summary.append({"group": g, "stiffness": k, "mean": statistics.fmean(v), "std": statistics.pstdev(v),
                        "num_seeds": len(v), "best_at_last_val": last})
    return summary


def _init_worker(num_threads):
    import torch

    torch.set_num_threads(num_threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def _train(kwargs):
    from molkern.train import train_nbody

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # again: importing Lightning resets it
    return train_nbody(**kwargs)


def plot(summary, path):
    """Test MSE against k, one line per model (error bars = std over seeds), written atomically to `path`."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    labels = {"o3": "O(3)", "so2": "SO(2)", "o2": "O(2) (C$_{\\infty v}$)", "baseline": "MPNN (no symmetry)"}
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
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
    save_figure(fig, path, dpi=150)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/nbody_quick.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: results/<config name>)")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch intra-op threads per run (default 1: tiny graphs, more threads mostly add overhead)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished runs of DIR/results.json (same config; the seeds may differ)")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    parser.add_argument("--replot", action="store_true", help="only redo the PNG and table from DIR/results.json")
    args = parser.parse_args(argv)

    config = yaml.safe_load(Path(args.config).read_text())
    unknown = set(config) - KEYS
    if unknown:
        raise SystemExit(f"unknown config key(s) {sorted(unknown)}; valid: {sorted(KEYS)}")
    out = Path(args.out or Path("results") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        result = json.loads((out / "results.json").read_text())
        return report(result["config"], summarise(result["runs"]), out, result["seconds"])

    if args.jobs < 1 or args.num_threads < 1:
        raise SystemExit("--jobs and --num-threads must be >= 1")
    _init_worker(args.num_threads)
    from molkern.train import NBodyDataModule, parameter_counts

    groups = config.get("groups", GROUPS)
    counts = parameter_counts(groups, **config.get("model", {}))
    print("parameters:", counts, flush=True)
    root = config.get("data_root", "data/nbody")
    for k in config["stiffness"]:  # generate the data once, before any parallel run reads it
        NBodyDataModule(root, k, **config.get("data", {})).prepare_data()
    jobs = [dict(group=group, stiffness=k, root=root, seed=seed, model=config.get("model"),
                 optim=config.get("optim"), data=config.get("data"), progress=not args.no_progress and args.jobs == 1,
                 **config.get("trainer", {}))
            for seed in config.get("seeds", [0]) for k in config["stiffness"] for group in groups]
    order = {(float(j["stiffness"]), j["seed"], j["group"]): i for i, j in enumerate(jobs)}  # seed-major
    runs, start, previous = [], time.perf_counter(), 0.0
    if args.resume and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        if {**old["config"], "seeds": None} != {**config, "seeds": None}:  # more seeds may be added
            raise SystemExit(f"--resume: {out / 'results.json'} was written with a different config")
        old["runs"] = [r for r in old["runs"] if r["seed"] in config.get("seeds", [0])]
        runs, previous = old["runs"], old["seconds"]
        done = {(r["stiffness"], r["seed"], r["group"]) for r in runs}
        jobs = [j for j in jobs if (float(j["stiffness"]), j["seed"], j["group"]) not in done]
        print(f"resuming: {len(runs)} runs kept, {len(jobs)} to train", flush=True)

    def record(run):
        runs.append(run)
        print(f"k={run['stiffness']:g} seed={run['seed']} {run['group']:9s} test_mse={run['test_mse']:.5f} "
              f"(best val {run['best_val_mse']:.5f} at epoch {run['best_epoch']}, {run['seconds']:.0f} s)", flush=True)
        runs.sort(key=lambda r: order[(r["stiffness"], r["seed"], r["group"])])
        result = {"config": config, "parameter_counts": counts, "jobs": args.jobs, "num_threads": args.num_threads,
                  "runs": runs, "summary": summarise(runs), "seconds": previous + time.perf_counter() - start}
        atomic_write(out / "results.json", json.dumps(result, indent=2))

    if args.jobs == 1:
        for job in jobs:
            record(_train(job))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(args.num_threads,)) as pool:
            for future in [pool.submit(_train, job) for job in jobs]:
                record(future.result())
    report(config, summarise(runs), out, previous + time.perf_counter() - start)


def report(config, summary, out, seconds):
    """Write DIR/nbody_sweep.png and print the table of mean +- std test MSE (n = number of seeds)."""
    if not summary:
        raise SystemExit("no runs")
    plot(summary, out / "nbody_sweep.png")
    header = " ".join(f"{f'k={k:g}':<24s}" for k in config["stiffness"])
    print(f"\ntest MSE, mean +- std over seeds\n{'group':9s} {header}")
    for group in config.get("groups", GROUPS):
        cells = {s["stiffness"]: s for s in summary if s["group"] == group}
        row = [f"{c['mean']:.5f} +- {c['std']:.5f} (n={c['num_seeds']})" if c else "-"
               for c in (cells.get(float(k)) for k in config["stiffness"])]
        print(f"{group:9s} " + " ".join(f"{x:<24s}" for x in row))
    print(f"total {seconds:.0f} s; wrote {out / 'results.json'} and {out / 'nbody_sweep.png'}")


if __name__ == "__main__":
    main()
