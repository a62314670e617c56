"""Fixed-budget accuracy: molkern, SchNet and DimeNet++ trained for the same time on the same QM9 split; test HOMO MAE.

    .venv/bin/python -m benchmarks.fixed_budget [--budget-s 1200] [--clock wall|cpu] [--threads 2]
        [--models molkern,schnet,dimenet++] [--train-subset N] [--val-subset 1000] [--test-subset N]
        [--root data/qm9] [--max-molecules N] [--lr molkern=3e-3,schnet=1e-3] [--val-every 0.1] [--seed 0]
        [--molkern lmax=1,num_channels=48] [--compile]
        [--out benchmarks/results/fixed_budget.json] [--quick]

Every model trains in its own subprocess, one after the other (they never share cores), with ``--threads`` torch
threads, on the same data: ``molkern.data.QM9`` (bundled qm9pack source) with the 5 A radius graph
(``graph="radius", cutoff=5.0``; no bond attributes for any model), the cormorant split (``QM9.split_indices``,
prefixes of its parts for ``--*-subset``), target HOMO in meV normalised by the training part's mean and std.
The same seed gives every model the same batches of 32 in the same order (a numpy permutation per epoch).

Models: molkern = ``QM9Module`` around ``MolkernNet`` with ``qm9_throughput.MOLKERN`` (32 channels, 3 blocks) at
lmax 2 and the package's default kernel (``--molkern key=value,...`` overrides MolkernNet arguments); SchNet and
DimeNet++ = ``qm9_throughput``'s PyG adapters (given radius-graph edges, plain-torch triplets) with its
``SCHNET`` / ``DIMENET`` settings. HOMO is intensive, so every model's
per-atom outputs are averaged over the molecule (molkern's QM9Module does this; the PyG models' summed output is
divided by the atom count).

Training: AdamW (weight decay 0), per-model learning rate (``LR``), linear warm-up over the first 5 % of the budget
then cosine decay to 1 % at the end of the budget (the schedule follows the budget spent, not steps), gradient-norm
clipping at 10, L1 loss on the normalised target. molkern's data-dependent initialisation (LSUV on the first batch,
as ``QM9Module`` does at the start of a fit) is counted in its budget.

``--compile``: molkern's training steps run as one compiled graph each (``molkern.train.CompiledLoss``: forward
and backward traced once and compiled by Inductor). The compilation happens in the first step and is counted in
the budget (``first_step_s``; with ``--clock cpu`` only this process's share of it, Inductor's C++ compiler runs in
child processes: use the wall clock with --compile). The PyG models run eagerly.

Budget: the time spent in training steps (forward, loss, backward, clipping, optimizer step; DimeNet++'s triplet
search is part of its forward), by ``time.perf_counter`` (``--clock wall``) or by this process's CPU time,
all threads summed (``time.process_time``, ``--clock cpu``; fair on a shared machine, and with 2 threads a CPU
budget of B s is about B/2 s of wall time). Not counted: assembling batches (the dataset's radius graph and PyG
collation, identical for every model) and validation. Training stops at the first step that ends with the
budget spent (overshoot < one step, recorded). Validation on the val subset every ``--val-every`` of the budget and
at the end; the best-validation weights are kept and evaluated on the test part (all 13,083 cormorant test
molecules unless ``--test-subset``).

Output: a markdown table on stdout, the JSON (``--out``, written atomically) and a markdown file next to it.
"""

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from benchmarks.qm9_throughput import (CUTOFF, DIMENET, MOLKERN, SCHNET, cpu_model, make_pyg_models, set_threads,
                                        worker_env)

TARGET = "homo"
SPLIT = "cormorant"
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 128
LR = {"molkern": 3e-3, "schnet": 1e-3, "dimenet++": 1e-3}
MOLKERN_CONFIG = {**MOLKERN, "lmax": 2}  # default kernel, no edge attributes (radius graph)
WEIGHT_DECAY = 0.0
WARMUP_FRACTION = 0.05
MIN_LR_RATIO = 0.01
GRAD_CLIP = 10.0
REPO = Path(__file__).resolve().parents[1]


def lr_factor(fraction: float) -> float:
    """Learning-rate multiplier after ``fraction`` (0..1) of the budget: linear warm-up, then cosine decay."""
    if fraction < WARMUP_FRACTION:
        return max(fraction / WARMUP_FRACTION, MIN_LR_RATIO)
    t = min((fraction - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION), 1.0)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------------ data


def load_parts(args):
    """{"train", "val", "test"} -> QM9 views (radius graph), as QM9DataModule.split_indices builds them."""
    from molkern.data import QM9

    ds = QM9(args.root, graph="radius", cutoff=CUTOFF, max_molecules=args.max_molecules, progress=False)
    parts = QM9.split_indices(SPLIT, num_molecules=args.max_molecules or QM9.num_molecules)
    for part, size in (("train", args.train_subset), ("val", args.val_subset), ("test", args.test_subset)):
        if size is not None:
            parts[part] = parts[part][: int(size)]
    return {part: ds.subset(ind) for part, ind in parts.items()}


def make_batch(view, items):
    from torch_geometric.data import Batch

    return Batch.from_data_list([view[int(i)] for i in items])


def eval_batches(view):
    n = len(view)
    return [make_batch(view, range(k, min(k + EVAL_BATCH_SIZE, n))) for k in range(0, n, EVAL_BATCH_SIZE)]


# ---------------------------------------------------------------------------------------------- models


def build(name: str, train_view, molkern_overrides: dict):
    """(model, forward(batch) -> (B,) normalised prediction, description)."""
    if name == "molkern":
        from molkern.models import average_num_neighbors
        from molkern.train import QM9Module

        sample = [train_view[i] for i in range(min(len(train_view), 2000))]  # as QM9Module.setup
        avg = average_num_neighbors([d.edge_index for d in sample], [d.num_nodes for d in sample])
        config = {**MOLKERN_CONFIG, **molkern_overrides}
        model = QM9Module(model={**config, "avg_num_neighbors": avg}, targets=TARGET, graph="radius",
                          cutoff=CUTOFF, data_init=False)
        kernel = config.get("kernel", f"{molkern_kernel_name()} (package default)")
        desc = f"MolkernNet (QM9Module), kernel {kernel}, " + ", ".join(
            f"{k}={v}" for k, v in config.items() if k != "kernel") + f", avg_num_neighbors={avg:.2f}"

        def forward(batch):
            return model(batch)[:, 0]  # (B,) QM9Module averages an intensive target over atoms

        return model, forward, desc
    SchNetGivenEdges, DimeNetPlusPlusGivenEdges = make_pyg_models()
    model, kw = (SchNetGivenEdges(**SCHNET), SCHNET) if name == "schnet" else (DimeNetPlusPlusGivenEdges(**DIMENET),
                                                                             DIMENET)
    desc = f"PyG {type(model).__mro__[1].__name__}, " + ", ".join(f"{k}={v}" for k, v in kw.items()) + \
        ", sum readout / atom count"

    def forward(batch):
        counts = torch.bincount(batch.batch, minlength=batch.num_graphs).to(batch.pos.dtype)  # (B,)
        return model(batch.z, batch.pos, batch.batch, batch.edge_index)[:, 0] / counts  # (B,)

    return model, forward, desc


def molkern_kernel_name() -> str:
    """MolkernNet's default kernel (the benchmark does not set one)."""
    import inspect

    from molkern.models import MolkernNet

    return str(inspect.signature(MolkernNet.__init__).parameters["kernel"].default)


# --------------------------------------------------------------------------------------------- one model


def run_model(name: str, args) -> dict:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    set_threads(args.threads)  # and denormals flushed (SchNet's step is 5x slower without on Intel CPUs)
    torch.manual_seed(args.seed)
    from molkern.data import QM9

    parts = load_parts(args)
    train, col = parts["train"], QM9.target_index(TARGET)
    y_train = train.targets()[:, col]  # (M,) float64 meV
    mean, std = float(y_train.mean()), float(y_train.std(unbiased=False))
    model, forward, desc = build(name, train, args.molkern_map)
    params = sum(p.numel() for p in model.parameters())
    lr = args.lr_map[name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    val_batches = eval_batches(parts["val"])

    def target(batch):
        return ((batch.y[:, col].double() - mean) / std).float()  # (B,)

    def l1_loss(module, batch):  # module: the model (forward closes over it; the argument is for CompiledLoss)
        return (forward(batch) - target(batch)).abs().mean()

    compiled = None
    if args.compile and name == "molkern":
        from molkern.train import CompiledLoss

        compiled = CompiledLoss(model, l1_loss)

    def mae_mev(batches) -> float:
        model.eval()
        err, n = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                err += float(((forward(batch).double() - target(batch).double()).abs() * std).sum())
                n += batch.num_graphs
        model.train()
        return err / max(n, 1)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    budget, n_train = float(args.budget_s), len(train)
    rng = np.random.default_rng(args.seed)
    order, pos, epoch = rng.permutation(n_train), 0, 0
    used, steps, seen, skipped, max_step, first_step = 0.0, 0, 0, 0, 0.0, 0.0
    next_val, curve, best, best_state = args.val_every * budget, [], math.inf, None
    loss_sum, loss_n = 0.0, 0
    train_wall0 = time.perf_counter()
    model.train()
    while used < budget:
        if pos >= n_train:
            order, pos, epoch = rng.permutation(n_train), 0, epoch + 1
        batch = make_batch(train, order[pos:pos + BATCH_SIZE])  # not counted
        pos += BATCH_SIZE
        t0 = clock()
        if steps == 0 and name == "molkern":  # QM9Module's data_init (LSUV on the first batch), counted
            from molkern.models import normalize_activations

            edge_attr = batch.edge_attr if model.model.irreps_edge_attr.dim > 0 else None  # bond-conditioned
            with torch.no_grad():
                normalize_activations(model.model, batch.pos, batch.node_attr, batch.edge_index, edge_attr, batch.batch)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(used / budget)
        optimizer.zero_grad(set_to_none=True)
        loss = compiled(batch) if compiled is not None else l1_loss(model, batch)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
        else:
            skipped += 1
        dt = clock() - t0
        if steps == 0:
            first_step = dt  # with --compile: tracing and compiling the training step
        used, max_step = used + dt, max(max_step, dt)
        steps, seen = steps + 1, seen + batch.num_graphs
        if used >= next_val or used >= budget:  # validation: not counted
            val = mae_mev(val_batches)
            if val < best:
                best, best_state = val, copy.deepcopy(model.state_dict())
            curve.append({"budget_s": used, "train_wall_s": time.perf_counter() - train_wall0, "step": steps,
                          "epochs": seen / n_train, "train_l1": loss_sum / max(loss_n, 1), "val_mae_mev": val})
            print(f"[{name}] {used:7.1f}/{budget:.0f} s ({args.clock}) step {steps:6d} epoch {seen / n_train:6.2f} "
                  f"train L1 {loss_sum / max(loss_n, 1):.3f}  val MAE {val:7.1f} meV (best {best:.1f})",
                  file=sys.stderr, flush=True)
            loss_sum, loss_n = 0.0, 0
            while next_val <= used:
                next_val += args.val_every * budget
    train_wall = time.perf_counter() - train_wall0
    if best_state is not None:
        model.load_state_dict(best_state)
    test = mae_mev(eval_batches(parts["test"]))
    print(f"[{name}] test MAE {test:.1f} meV ({len(parts['test'])} molecules)", file=sys.stderr, flush=True)
    return {
        "model": name, "description": desc, "params": params, "lr": lr,
        "kernel": args.molkern_map.get("kernel", molkern_kernel_name()) if name == "molkern" else None,
        "molkern_overrides": args.molkern_map if name == "molkern" else None,
        "n_train": n_train, "n_val": len(parts["val"]), "n_test": len(parts["test"]),
        "target_mean_mev": mean, "target_std_mev": std,
        "steps": steps, "epochs": seen / n_train, "molecules_seen": seen, "skipped_nonfinite_steps": skipped,
        "budget_s": budget, "clock": args.clock, "budget_used_s": used, "max_step_s": max_step,
        "compiled": compiled is not None, "first_step_s": first_step,
        "val_curve": curve, "best_val_mae_mev": best, "test_mae_mev": test,
        "train_loop_wall_s": train_wall, "wall_s": time.perf_counter() - start_wall,
        "cpu_s": time.process_time() - start_cpu, "threads": args.threads, "status": "ok",
    }


def run_isolated(name: str, args) -> dict:
    """run_model in a fresh process; its progress lines (stderr) are passed through."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.fixed_budget", "--worker", name, "--worker-out", str(out),
               *forward_args(args)]
        env = worker_env()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        tail = []
        with subprocess.Popen(cmd, env=env, cwd=str(REPO), stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
                tail = (tail + [line])[-40:]
        if proc.returncode != 0 or not out.is_file():
            return {"model": name, "status": f"failed (exit {proc.returncode}): {''.join(tail)[-2000:]}"}
        return json.loads(out.read_text())


def forward_args(args) -> list:
    out = ["--root", str(Path(args.root).resolve()), "--budget-s", repr(args.budget_s), "--clock", args.clock,
           "--threads", str(args.threads), "--val-every", repr(args.val_every), "--seed", str(args.seed),
           "--lr", ",".join(f"{k}={v!r}" for k, v in args.lr_map.items()), "--molkern", args.molkern]
    if args.compile:
        out.append("--compile")
    for flag, value in (("--max-molecules", args.max_molecules), ("--train-subset", args.train_subset),
                        ("--val-subset", args.val_subset), ("--test-subset", args.test_subset)):
        if value is not None:
            out += [flag, str(value)]
    return out


# ------------------------------------------------------------------------------------------------ main


def markdown_table(rows) -> str:
    lines = ["| model | params | lr | steps | epochs | molecules seen | best val MAE (meV) | **test MAE (meV)** "
             "| budget used (s) | train loop wall (s) | process CPU (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['status'].splitlines()[0][:80]} | | | | | | | | | |")
            continue
        label = r["model"] + (" (compiled)" if r.get("compiled") else "")
        lines.append(f"| {label} | {r['params']:,} | {r['lr']:g} | {r['steps']:,} | {r['epochs']:.2f} "
                     f"| {r['molecules_seen']:,} | {r['best_val_mae_mev']:.1f} | **{r['test_mae_mev']:.1f}** "
                     f"| {r['budget_used_s']:.1f} | {r['train_loop_wall_s']:.1f} | {r['cpu_s']:.1f} |")
    return "\n".join(lines)


def parse_lr(text: str) -> dict:
    lrs = dict(LR)
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, _, value = item.partition("=")
        if key not in LR or not value:
            raise SystemExit(f"--lr takes name=value pairs with names from {list(LR)}, got {item!r}")
        lrs[key] = float(value)
    return lrs


def parse_overrides(text: str) -> dict:
    """"lmax=1,kernel=factorised" -> {"lmax": 1, "kernel": "factorised"} (numbers and booleans parsed)."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, _, value = item.partition("=")
        if not key or not value:
            raise SystemExit(f"--molkern takes key=value pairs of MolkernNet arguments, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fixed_budget", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, help="training budget per model in seconds (default 1200; "
                                                       "15 with --quick)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: process CPU time of all threads (time.process_time)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(LR), help=f"comma-separated subset of {list(LR)}")
    parser.add_argument("--train-subset", type=int, help="first N molecules of the training part (default all; "
                                                         "2000 with --quick)")
    parser.add_argument("--val-subset", type=int, help="first N of the val part (default 1000; 200 with --quick)")
    parser.add_argument("--test-subset", type=int, help="first N of the test part (default all; 500 with --quick)")
    parser.add_argument("--val-every", type=float, default=0.1, help="validate every this fraction of the budget")
    parser.add_argument("--lr", default="", help=f"per-model learning rates, e.g. schnet=5e-4 (defaults {LR})")
    parser.add_argument("--molkern", default="", help="MolkernNet arguments overriding the benchmark's, "
                                                      "e.g. lmax=1,num_channels=48")
    parser.add_argument("--compile", action="store_true", help="molkern's training steps as one compiled graph "
                                                               "(compilation counted in the budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data/qm9", help="QM9 cache directory (molkern.data.QM9 root)")
    parser.add_argument("--max-molecules", type=int, help="process only the first N QM9 molecules (tests)")
    parser.add_argument("--out", default="benchmarks/results/fixed_budget.json")
    parser.add_argument("--quick", action="store_true", help="15 s per model, small subsets (smoke test)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"budget_s": 15.0, "train_subset": 2000, "val_subset": 200, "test_subset": 500}
    full = {"budget_s": 1200.0, "train_subset": None, "val_subset": 1000, "test_subset": None}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.budget_s > 0 or not 0 < args.val_every <= 1:
        raise SystemExit("--budget-s must be positive and --val-every in (0, 1]")
    args.lr_map = parse_lr(args.lr)
    args.molkern_map = parse_overrides(args.molkern)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:  # subprocess of run_isolated
        Path(args.worker_out).write_text(json.dumps(run_model(args.worker, args)))
        return
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in LR]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(LR)}")

    from molkern.data import QM9

    QM9(args.root, max_molecules=args.max_molecules, progress=False)  # process and cache once, before the workers
    start = time.perf_counter()
    rows = []
    for name in names:
        try:
            row = run_isolated(name, args)
        except Exception:
            row = {"model": name, "status": f"failed: {traceback.format_exc()[-2000:]}"}
        rows.append(row)
        print(f"{name}: {'ok' if row['status'] == 'ok' else 'FAILED'} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    import torch_geometric

    ok = [r for r in rows if r["status"] == "ok"]
    header = (f"QM9 {TARGET} (meV), {SPLIT} split, {ok[0]['n_train'] if ok else '?'} training / "
              f"{ok[0]['n_val'] if ok else '?'} val / {ok[0]['n_test'] if ok else '?'} test molecules, "
              f"{args.budget_s:g} s {args.clock} budget per model, {args.threads} threads, batches of {BATCH_SIZE}, "
              f"{CUTOFF:g} A radius graph")
    table = markdown_table(rows)
    print(header)
    print(table)
    settings = {
        "budget_s": args.budget_s, "clock": args.clock, "threads": args.threads, "models": names,
        "train_subset": args.train_subset, "val_subset": args.val_subset, "test_subset": args.test_subset,
        "val_every": args.val_every, "seed": args.seed, "compile_molkern": args.compile, "root": str(args.root),
        "max_molecules": args.max_molecules,
        "quick": args.quick, "target": TARGET, "units": "meV", "split": SPLIT, "graph": "radius", "cutoff": CUTOFF,
        "edge_attr": "none", "batch_size": BATCH_SIZE, "eval_batch_size": EVAL_BATCH_SIZE,
        "optimizer": {"name": "AdamW", "lr": args.lr_map, "weight_decay": WEIGHT_DECAY,
                      "schedule": f"linear warm-up over {WARMUP_FRACTION:g} of the budget, then cosine to "
                                  f"{MIN_LR_RATIO:g} x lr at the end of the budget (lr follows budget spent)",
                      "grad_clip_norm": GRAD_CLIP, "loss": "L1 on (y - train mean) / train std"},
        "readout": "mean over atoms for every model (HOMO is intensive)",
        "molkern": {**MOLKERN_CONFIG, **args.molkern_map}, "schnet": SCHNET, "dimenet++": DIMENET,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "wall_time_s": wall,
    }
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_model": cpu_model(), "flush_denormal": True,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_geometric": torch_geometric.__version__, "cpu_count": os.cpu_count(),
                    "loadavg_1_5_15_at_end": os.getloadavg()},
        "settings": settings,
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "rows": rows,
    }
    from molkern.io import atomic_write

    out = Path(args.out)
    atomic_write(out, json.dumps(result, indent=2))
    md = (f"# Fixed-budget accuracy\n\n{header}.\n\n{table}\n\nBest-validation weights evaluated on the test "
          f"molecules. Settings and per-model validation curves: `{out.name}`.\n\n{result['method']}\n")
    atomic_write(out.with_suffix(".md"), md)
    print(f"wall time {wall:.0f} s; wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
