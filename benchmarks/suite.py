"""The benchmark suite: every model, every measurement, one run; writes JSON, markdown and PNG plots.

    .venv/bin/python -m benchmarks run [--quick] [--out DIR] [--models a,b,...] [--tasks qm9,latency,...]
        [--threads 2] [--rounds R] [--box-sizes 3,4,5,7,10,15] [--scaling-budget-s 30] [--scaling-memory-mb 8000]
        [--scaling-largest] [--root data/qm9] [--max-molecules 5000]

Each (task, model) runs in a fresh process (benchmarks.worker: own peak memory, own allocator state, glibc
malloc trimming off); --quick runs all of a model's tasks in one process instead (fewer start-ups; its peak
memory is then not per task). Rounds alternate models: round r runs task 1 for every model, then task 2 for every
model, ...; the reported number is the best over rounds (least disturbed by other jobs), every round is kept
in the JSON. Models that cannot be built here (a peer package not installed) are skipped with the reason.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from molkern.io import atomic_write

from .models import model_specs, unavailable_reason
from .qm9_throughput import cpu_model, worker_env

REPO = Path(__file__).resolve().parents[1]
TASK_ORDER = ("machine", "qm9", "latency", "scaling", "conv")
QUICK_MODELS = ("molkern-depthwise-l1", "molkern-standard-l1", "schnet", "painn", "painn-reimpl", "nequip-l1")
QUICK = {"batch_size": 8, "num_batches": 2, "warmup": 1, "repeats": 2, "latency_molecules": 2,
         "latency_repeats": 3, "compile": False, "box_sizes": [2, 3], "scaling_warmup": 1, "scaling_warmup_max": 1,
         "scaling_first_warmup": 1, "scaling_repeats": 1, "scaling_largest": False,
         "scaling_budget_s": 5.0, "scaling_memory_budget_mb": 1000, "rounds": 1, "matmul_n": 512,
         "worker_timeout_s": 600, "one_process_per_model": True}
FULL = {"batch_size": 32, "num_batches": 4, "warmup": 2, "repeats": 3, "latency_molecules": 8,
        "latency_repeats": 10, "compile": True, "box_sizes": [3, 4, 5, 7, 10, 15], "scaling_warmup": 1,
        "scaling_warmup_max": 5, "scaling_first_warmup": 3, "scaling_repeats": 5, "scaling_largest": False,
        "scaling_budget_s": 30.0, "scaling_memory_budget_mb": 8000, "rounds": 2, "matmul_n": 2048,
        "worker_timeout_s": 3600, "one_process_per_model": False}
METHOD = {
    "inputs": "QM9 molecules drawn with numpy seed 0 (training / inference batches) and seed 1 (latency) from "
              "molkern.data.QM9(root, max_molecules=N); 5 A radius graphs from vesin for every model; periodic "
              "water boxes (benchmarks.systems.water_box) for scaling. float32, random (seed-0) weights.",
    "training": "energy-only step = forward, L1 loss on the normalised U0 target, backward, AdamW step; "
                "energy+forces step = the same plus forces = -dE/dpos by autograd (create_graph) with an L1 "
                "loss against zero force labels (QM9 has no forces; only the cost matters). mol/s = molecules "
                "per pass over the fixed batches / median pass time. 'compiled' (molkern, full mode): each of the "
                "two steps with forward and backward (for E+F: the forces' double backward) as one compiled graph "
                "(molkern.train.CompiledLoss; compiled once, untimed, its CPU seconds in the JSON); the peers run "
                "eagerly.",
    "inference": "model.eval(), energies under torch.no_grad().",
    "latency": "one molecule, energy + forces by autograd, one torch thread, graph prebuilt; median over "
               "repeats, then median over the molecules. The vesin neighbour list of the same molecule is timed "
               "separately (an ASE MD step pays both). molkern runs as its calculator runs it: eager, within "
               "molkern.nn.constant_parameters (weights folded into cached matrices; without it, as in training: "
               "unfolded_latency_ms in the JSON). 'ASE step ms' (molkern only): the whole step through "
               "molkern.calculator.MolkernCalculator, atoms moved before each get_forces() (neighbour list, graph "
               "build and conversions included). 'compiled' (molkern, full mode): the same two measurements with "
               "molkern.train.compiled.CompiledEnergyForces / MolkernCalculator(compile=True), one graph compiled "
               "once for all the molecules (its compile CPU seconds and largest force deviation from eager are "
               "in the JSON).",
    "scaling": "energy + forces of one periodic water box, torch threads = --threads; us/atom = median time / "
               "atoms; the neighbour list is timed separately. Untimed warm-up: scaling_warmup to "
               "scaling_warmup_max calls per box, until a call page-faults in (almost) no new memory (a new size's "
               "first calls do; an MD run's steady state does not), plus scaling_first_warmup calls on the first box "
               "(one-off costs of a fresh process: lazy caches, TorchScript profiling runs); their times and page "
               "faults are kept (warmup_calls). molkern eagerly as its calculator runs it (constant_parameters, as in the "
               "latency task) and, in full mode, also compiled (CompiledEnergyForces, one graph "
               "compiled on the first box, not timed). A size is skipped when the previous size's time or peak "
               "memory, scaled linearly with the atom count, exceeds its budget (settings); with --scaling-largest "
               "the largest box ignores the time budget (not the memory budget).",
    "ops": "ATen ops dispatched in one call (benchmarks.opcount: a TorchDispatchMode, backward included; one "
           "energy-only training step on the first QM9 batch, one energy+forces call of the first latency "
           "molecule) and the matmul-class FLOPs of torch.utils.flop_counter's registry (zeros included).",
    "conv_flops": "molkern only: each block's SteerableConv timed alone on the first QM9 batch; useful "
                  "tensor-product FLOPs counted analytically (benchmarks.flops); fraction = achieved / measured "
                  "fp32 torch.mm peak with the same threads. fwd+bwd GFLOP/s assumes 3x the forward's useful FLOPs "
                  "(the backward of a bilinear product computes two products of the forward's size).",
    "memory": "Resident set size from /proc/self/status, one process per (task, model) in full mode. After the "
              "model is built and the inputs are in memory: gc, baseline = VmRSS; the peak (VmHWM) is reset "
              "(/proc/self/clear_refs) before each phase (inference, energy-only training, energy+forces "
              "training, each scaling box); '<phase> peak MB' = VmHWM after the phase - baseline: the extra memory "
              "the phase needed at its peak (activations, autograd buffers, gradients, AdamW state, allocator "
              "slack), not the runtime, parameters or data. In --quick mode the tasks share a process and later "
              "phases reuse freed memory: too low, smoke test only.",
    "rounds": "best over rounds: max of rates (mol/s, GFLOP/s), min of times (ms); every round kept in 'rounds'.",
}


def settings_for(args) -> dict:
    settings = dict(QUICK if args.quick else FULL)
    settings.update(root=str(Path(args.root).resolve()), max_molecules=args.max_molecules, threads=args.threads,
                    quick=args.quick)
    overrides = {"rounds": args.rounds, "scaling_budget_s": args.scaling_budget_s,
                 "scaling_memory_budget_mb": args.scaling_memory_mb, "scaling_largest": args.scaling_largest or None,
                 "box_sizes": [int(k) for k in args.box_sizes.split(",")] if args.box_sizes else None,
                 "compile": False if args.no_compile else None}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def spawn(tasks: list, name: str, settings: dict) -> list:
    """benchmarks.worker.run(task, name, settings) for each task, in one fresh process; rows in task order.

    When the process fails, the tasks it finished keep their rows, a scaling task cut short keeps the boxes it
    measured (the box it died in gets the failure as its status), and every other task gets a 'failed: ...' row."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = Path(tmp) / "settings.json", Path(tmp) / "rows.json"
        cfg.write_text(json.dumps(settings))
        cmd = [sys.executable, "-m", "benchmarks", "worker", ",".join(tasks), name, "--settings", str(cfg),
               "--out", str(out)]
        env = {**worker_env(),
               "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=settings["worker_timeout_s"])
            error = None if proc.returncode == 0 and out.is_file() else f"failed: {_exit_reason(proc)}"
        except subprocess.TimeoutExpired:
            error = f"failed: timeout after {settings['worker_timeout_s']} s"
        rows = worker_rows(out, tasks, name, error)
        for row in rows:
            row["process_wall_s"] = time.perf_counter() - start
        return rows


def worker_rows(out: Path, tasks: list, name: str, error: Optional[str]) -> list:
    """The rows a worker saved in ``out``; after its failure (``error``), completed by `spawn`'s rules."""
    rows = json.loads(out.read_text()) if out.is_file() else []
    if error:
        rows = [_cut_short(row, error) if row.get("status") == "partial" else row for row in rows]
        done = {row["task"] for row in rows}
        rows += [{"model": name, "task": task, "status": error} for task in tasks if task not in done]
    return rows


def _cut_short(row: dict, error: str) -> dict:
    """A scaling row saved while its worker ran ("partial"): the box being measured gets ``error`` as its status;
    the row is "ok" if an earlier box was measured."""
    points = [{**p, "status": error} if p.get("status") == "running" else p for p in row["points"]]
    status = "ok" if any(p.get("status") == "ok" for p in points) else error
    return {**row, "status": status, "points": points, "cut_short": error}


def _exit_reason(proc: subprocess.CompletedProcess) -> str:
    """The worker's error output, or how it ended when it wrote none (e.g. killed by the OOM killer: SIGKILL)."""
    if proc.stderr.strip():
        return proc.stderr.strip()[-2000:]
    if proc.returncode < 0:
        import signal

        name = signal.Signals(-proc.returncode).name
        hint = " (likely out of memory)" if name == "SIGKILL" else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {proc.returncode} and no output"


def _better(key: str, a, b):
    """The better of two measurements of ``key`` (rates: larger, times: smaller), else the first."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool):
        return a
    if "_per_s" in key:
        return max(a, b)
    if key == "ms" or key.endswith("_ms") or key.endswith("us_per_atom"):
        return min(a, b)
    return a


def _better_point(p: dict, q: dict) -> dict:
    """Two rounds' measurements of one scaling box: the best of each timing when both are measured, else the
    measured one."""
    if p.get("ms") is None or q.get("ms") is None:
        return p if q.get("ms") is None else q
    return {k: _better(k, p.get(k), q.get(k)) for k in p}


def merge_rounds(rows: list) -> dict:
    """One row per (task, model): the best value of every timing over the successful rounds."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return dict(rows[-1])
    best = dict(ok[0])
    for r in ok[1:]:
        for key, value in r.items():
            if key == "points":
                best["points"] = [_better_point(p, q) for p, q in zip(best["points"], value)]
            elif key == "layers":
                best["layers"] = [{k: _better(k, p.get(k), q.get(k)) for k in p} for p, q in zip(best["layers"], value)]
            else:
                best[key] = _better(key, best.get(key), value)
    if "points" in best:  # recompute per-atom costs from the best times
        for p in best["points"]:
            if p.get("ms") is not None:
                p["us_per_atom"] = 1e3 * p["ms"] / p["atoms"]
    return best


def machine_info() -> dict:
    import e3nn
    import torch
    import torch_geometric

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "e3nn": e3nn.__version__,
            "torch_geometric": torch_geometric.__version__, "cpu_count": os.cpu_count(), "flush_denormal": True}
    model = cpu_model()
    if model:
        info["cpu_model"] = model
    try:
        import nequip

        info["nequip"] = nequip.__version__
    except Exception:
        pass
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: models {', '.join(QUICK_MODELS)}, tiny batches and boxes, one round")
    parser.add_argument("--out", default="benchmarks/results", help="directory for JSON, markdown and PNG files")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of: {', '.join(model_specs())}")
    parser.add_argument("--tasks", default=",".join(TASK_ORDER), help=f"comma-separated subset of {TASK_ORDER}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (latency always uses 1)")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds (quick 1, full 2)")
    parser.add_argument("--box-sizes", default=None,
                        help="water boxes of k^3 molecules (3 k^3 atoms), comma-separated k (quick 2,3; full "
                             "3,4,5,7,10,15)")
    parser.add_argument("--scaling-budget-s", type=float, default=None,
                        help="skip a box whose projected energy+forces time exceeds this (quick 5, full 30)")
    parser.add_argument("--scaling-memory-mb", type=float, default=None,
                        help="skip a box whose projected peak memory exceeds this (quick 1000, full 8000)")
    parser.add_argument("--scaling-largest", action="store_true",
                        help="measure the largest box whatever its projected time (e.g. the 10,125-atom box, "
                             "~20 s per call for molkern lmax 2); the memory budget still applies")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip molkern's compiled latency and scaling measurements (full mode compiles once "
                             "per molkern model and task, about a minute of CPU each)")
    parser.add_argument("--root", default="data/qm9", help="QM9 cache directory (molkern.data.QM9 root)")
    parser.add_argument("--max-molecules", type=int, default=5000, help="load the first N QM9 molecules")
    args = parser.parse_args(argv)
    specs = model_specs()
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else specs)
    else:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in specs]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(specs)}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.tasks if t not in TASK_ORDER]
    if bad:
        parser.error(f"unknown task(s) {bad}; choose from {list(TASK_ORDER)}")
    return args


def report_from(result: dict, out: Path) -> dict:
    """Merge the rounds of ``result`` (the suite's JSON), evaluate the targets and write JSON, markdown and plots."""
    from . import report

    result["results"] = {task: {name: merge_rounds(rows) for name, rows in by_model.items()}
                         for task, by_model in result["rounds"].items()}
    result["targets"] = report.targets(result)
    report.write_all(result, out)
    print(f"wrote {out}/benchmarks.json, benchmarks.md, README_snippet.md and plots", file=sys.stderr)
    return result


def report(argv=None) -> dict:
    """``python -m benchmarks report DIR``: the tables and plots again from DIR/benchmarks.json (e.g. of a run
    that was cut short: every finished measurement is in it)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks report", description=report.__doc__)
    parser.add_argument("dir", help="output directory of a `python -m benchmarks run`")
    out = Path(parser.parse_args(argv).dir)
    path = out / "benchmarks.json"
    if not path.is_file():
        parser.error(f"{path} does not exist")
    return report_from(json.loads(path.read_text()), out)


def run(argv=None) -> dict:
    """The suite's entry point (``python -m benchmarks run``); returns the result dict it wrote."""
    args = parse_args(argv)
    settings = settings_for(args)
    specs = model_specs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from molkern.data import QM9

    QM9(settings["root"], max_molecules=settings["max_molecules"], progress=False)  # process once, before workers
    skipped = {name: reason for name in args.models if (reason := unavailable_reason(name))}
    models = [m for m in args.models if m not in skipped]
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    raw = {}
    tasks = [t for t in TASK_ORDER if t in args.tasks]

    def applies(task, name):
        return task != "conv" or specs[name]["family"] == "molkern"

    if settings["one_process_per_model"]:  # quick: all of a model's tasks in one process (fewer start-ups)
        plan = [(["machine"], "-")] * ("machine" in tasks) + [
            ([t for t in tasks if t != "machine" and applies(t, m)], m) for m in models]
    else:  # one process per (task, model); models alternate within each task
        plan = [([t], m) for t in tasks for m in (["-"] if t == "machine" else models) if m == "-" or applies(t, m)]
    plan = [(ts, m) for ts, m in plan if ts]
    result = {
        "command": "python -m benchmarks run " + " ".join(argv if argv is not None else sys.argv[2:]),
        "machine": machine_info(),
        "settings": {**settings, "models": args.models, "tasks": args.tasks,
                     "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "method": METHOD,
        "models": {name: {**specs[name], "status": f"skipped: {skipped[name]}" if name in skipped else "run"}
                   for name in args.models},
        "rounds": raw,
    }
    for r in range(settings["rounds"]):
        for task_list, name in plan:
            for row in spawn(task_list, name, settings):
                raw.setdefault(row["task"], {}).setdefault(name, []).append(row)
                state = "ok" if row.get("status") == "ok" else row.get("status", "?").strip().splitlines()[-1][:200]
                print(f"round {r + 1}/{settings['rounds']} {row['task']} {name}: {state} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            # every measurement so far, in case the run is cut short (`python -m benchmarks report DIR`)
            atomic_write(out / "benchmarks.json", json.dumps(result, indent=2))
    result["settings"].update(wall_time_s=time.perf_counter() - start, loadavg_1_5_15_at_end=os.getloadavg())
    atomic_write(out / "benchmarks.json", json.dumps(result, indent=2))
    report_from(result, out)
    return result
