"""One (model, task) measurement, run by the suite in a fresh process: ``python -m benchmarks worker ...``.

Tasks (each returns a dict of numbers; times are medians over repeats after untimed warm-up calls):
    qm9      training mol/s (energy-only; energy+forces), inference mol/s, peak memory of each phase, and the
             ATen op count / matmul-class FLOPs of one training step, on fixed batches of QM9 molecules; for
             molkern (settings["compile"]) also both training steps compiled, see compiled_training.
    latency  one molecule's energy+forces (the ASE MD step; one torch thread) on fixed QM9 molecules, the
             vesin neighbour-list time for the same molecule, the op count of one such call (molkern as its
             calculator runs it, within molkern.nn.constant_parameters; without it: unfolded_latency_ms) and,
             for molkern, a whole step through molkern.calculator.MolkernCalculator (atoms moved, get_forces()),
             eager and (settings["compile"]) compiled, see compiled_latency.
    scaling  energy+forces time per atom of periodic water boxes of growing size (settings["box_sizes"]), eager
             and (molkern, settings["compile"]) compiled; warm-up until the calls stop page-faulting, see
             task_scaling.
    conv     molkern only: each block's convolution timed alone on a QM9 batch, useful tensor-product
             FLOPs (benchmarks.flops) -> achieved GFLOP/s.
    machine  fp32 torch.mm peak GFLOP/s with 1 and ``threads`` threads (model ignored).
"""

import copy
import gc
import os
import statistics
import time
from types import SimpleNamespace

import torch
from molkern.nn.constants import constant_parameters

from . import qm9_throughput as qt
from .flops import conv_flops, matmul_peak
from .models import build
from .opcount import count_ops
from .systems import as_batch, molecule_graph, qm9_molecules, water_box

TASKS = ("qm9", "latency", "scaling", "conv", "machine")


def timed(fn, warmup: int, repeats: int) -> list:
    """Wall times (s) of ``repeats`` calls of fn() after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def energy_forces(model, batch, create_graph: bool = False):
    """(energy (G,), forces (N, 3)) with forces = -dE/dpos by autograd; ``batch`` itself is not changed."""
    pos = batch.pos.detach().requires_grad_(True)
    batch = copy.copy(batch)
    batch.pos = pos
    energy = model.energy(batch)
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -grad


def qm9_batches(settings: dict):
    args = SimpleNamespace(root=settings["root"], max_molecules=settings["max_molecules"],
                           num_batches=settings["num_batches"], batch_size=settings["batch_size"])
    return qt.load_batches(args, "radius")


def mean_in_degree(batches) -> float:
    return sum(b.edge_index.shape[1] for b in batches) / sum(b.num_nodes for b in batches)


def task_qm9(name: str, settings: dict) -> dict:
    batches = qm9_batches(settings)
    model = build(name, mean_in_degree(batches))
    optimizer = torch.optim.AdamW(model.module.parameters(), lr=5e-4)
    warmup, repeats = settings["warmup"], settings["repeats"]

    def infer():
        model.module.eval()
        with torch.no_grad():
            for b in batches:
                model.energy(b)

    def energy_loss(module, batch):  # module is model.module (the argument CompiledLoss passes)
        return (model.energy(batch) - batch.target[:, 0]).abs().mean()

    def forces_loss(module, batch):  # QM9 has no forces: zero force labels, the cost is what is measured
        energy, forces = energy_forces(model, batch, create_graph=True)
        return (energy - batch.target[:, 0]).abs().mean() + forces.abs().mean()

    def step_of(loss_fn):
        def step(batch):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model.module, batch).backward()
            optimizer.step()
        return step

    losses = {"train_energy": energy_loss, "train_forces": forces_loss}

    def passes(step):
        def run():
            model.module.train()
            for b in batches:
                step(b)
        return run

    row = {"params": model.params, "description": model.description,
           "atoms_per_batch": statistics.mean(b.num_nodes for b in batches),
           "edges_per_batch": statistics.mean(b.edge_index.shape[1] for b in batches)}
    num_mols = len(batches) * settings["batch_size"]
    gc.collect()
    baseline = qt.rss_mb()
    for phase, run in (("inference", infer), *((key, passes(step_of(loss))) for key, loss in losses.items())):
        gc.collect()
        qt.reset_peak()
        seconds = timed(run, warmup, repeats)
        row[f"{phase}_mol_per_s"] = num_mols / statistics.median(seconds)
        row[f"{phase}_mol_per_s_best"] = num_mols / min(seconds)
        row[f"{phase}_peak_mb"] = qt.peak_mb() - baseline
    row["baseline_rss_mb"] = baseline
    if settings["compile"] and hasattr(model.module, "graph_spec"):  # molkern: also the compiled training steps
        for key, loss in losses.items():
            row.update(compiled_training(key, model, loss, batches, optimizer, warmup, repeats, num_mols, baseline))
    model.module.train()
    for key, loss in losses.items():
        counted = count_ops(lambda: step_of(loss)(batches[0]))
        row[f"{key}_ops"], row[f"{key}_matmul_flops"] = counted["ops"], counted["matmul_flops"]
        row[f"{key}_top_ops"] = counted["top_ops"]
    return row


def compiled_training(phase: str, model, loss_fn, batches, optimizer, warmup: int, repeats: int, num_mols: int,
                      baseline: float) -> dict:
    """A training step (``phase``: train_energy, train_forces) with forward and backward as one compiled graph
    (molkern.train.CompiledLoss over ``loss_fn``, one graph for every batch): one-off compile CPU seconds, then
    mol/s and peak MB (over the eager phases' ``baseline`` RSS) as the eager phases."""
    from molkern.train import CompiledLoss

    compiled = CompiledLoss(model.module, loss_fn)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        compiled(batch).backward()
        optimizer.step()

    model.module.train()
    t0 = time.process_time()
    step(batches[0])
    compile_s = time.process_time() - t0

    def run():
        for b in batches:
            step(b)

    gc.collect()
    qt.reset_peak()
    seconds = timed(run, warmup, repeats)
    return {f"{phase}_compiled_compile_cpu_s": compile_s,
            f"{phase}_compiled_mol_per_s": num_mols / statistics.median(seconds),
            f"{phase}_compiled_mol_per_s_best": num_mols / min(seconds),
            f"{phase}_compiled_peak_mb": qt.peak_mb() - baseline}


def task_latency(name: str, settings: dict) -> dict:
    torch.set_num_threads(1)
    mols = qm9_molecules(settings["root"], settings["max_molecules"], settings["latency_molecules"], seed=1)
    graphs = [as_batch([molecule_graph(m.z, m.pos)]) for m in mols]
    model = build(name, mean_in_degree(graphs))
    model.module.eval()
    warmup, repeats = settings["warmup"], settings["latency_repeats"]
    molkern = hasattr(model.module, "graph_spec")
    per_mol, per_nl, unfolded = [], [], []
    # molkern as its ASE calculator runs it: weights folded into cached matrices (molkern.nn.constant_parameters);
    # also without, as in training, for comparison
    with constant_parameters(molkern):
        for g, m in zip(graphs, mols):
            per_mol.append(statistics.median(timed(lambda: energy_forces(model, g), warmup, repeats)))
            per_nl.append(statistics.median(timed(lambda: molecule_graph(m.z, m.pos), 1, repeats)))
        counted = count_ops(lambda: energy_forces(model, graphs[0]))
    if molkern:
        unfolded = [statistics.median(timed(lambda: energy_forces(model, g), warmup, repeats)) for g in graphs]
    ase = ase_step_ms(model, mols, warmup, repeats) if molkern else None
    compile_too = molkern and settings["compile"]
    compiled = compiled_latency(model, graphs, mols, warmup, repeats) if compile_too else {}
    return {**compiled, "params": model.params, "description": model.description, "threads": 1, "ase_step_ms": ase,
            "atoms_mean": statistics.mean(g.num_nodes for g in graphs),
            "latency_ms": 1e3 * statistics.median(per_mol), "latency_ms_each": [1e3 * t for t in per_mol],
            "neighbor_list_ms": 1e3 * statistics.median(per_nl),
            "unfolded_latency_ms": 1e3 * statistics.median(unfolded) if unfolded else None,
            "md_step_ops": counted["ops"], "md_step_matmul_flops": counted["matmul_flops"],
            "md_step_top_ops": counted["top_ops"]}


def compiled_latency(model, graphs, mols, warmup: int, repeats: int) -> dict:
    """molkern's compiled energy+forces (molkern.train.compiled.CompiledEnergyForces; one graph for all the
    molecules): one-off compile CPU seconds, per-call latency as task_latency's, the largest force deviation
    from eager (eV/A) and the ASE step with ``MolkernCalculator(compile=True)``."""
    from molkern.train.compiled import CompiledEnergyForces

    fast = CompiledEnergyForces(model.module)
    t0 = time.process_time()
    fast(graphs[0])
    compile_s = time.process_time() - t0
    per_mol = [statistics.median(timed(lambda: fast(g), warmup, repeats)) for g in graphs]
    deviation = max(float((fast(g)[1] - energy_forces(model, g)[1]).abs().max()) for g in graphs)
    return {"compiled_compile_cpu_s": compile_s, "compiled_latency_ms": 1e3 * statistics.median(per_mol),
            "compiled_latency_ms_each": [1e3 * t for t in per_mol], "compiled_max_force_deviation": deviation,
            "compiled_ase_step_ms": ase_step_ms(model, mols, warmup, repeats, compile=True)}


def ase_step_ms(model, mols, warmup: int, repeats: int, compile: bool = False) -> float:
    """Median ms of one MD step through molkern's ASE calculator (atoms moved, then energy + forces), which
    includes the neighbour list, the graph build and the calculator's conversions; median over molecules.
    ``compile``: MolkernCalculator(compile=True) (its one compilation happens in the first warm-up call)."""
    import ase
    import numpy as np

    from molkern.calculator import MolkernCalculator

    calc = MolkernCalculator(model.module, compile=compile)
    rng = np.random.default_rng(0)
    per_mol = []
    for m in mols:
        atoms = ase.Atoms(numbers=m.z.numpy(), positions=m.pos.double().numpy())
        atoms.calc = calc

        def step():
            atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)  # a new structure every call
            atoms.get_forces()

        per_mol.append(statistics.median(timed(step, warmup, repeats)))
    return 1e3 * statistics.median(per_mol)


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory pages touched)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(fn, minimum: int, maximum: int) -> list:
    """Untimed-for-the-result calls of fn: at least ``minimum``, then until a call touches almost no fresh memory
    pages (at most 1 % of the first call's minor page faults, or 100 pages) or ``maximum`` calls; [(ms, page
    faults)] per call.

    A new, larger box's first calls page-fault in the allocator's new memory (the second often still does, as
    freed blocks are re-split); the steady state of an MD run at that size has no faults."""
    calls = []
    while len(calls) < maximum:
        faults, t0 = minor_faults(), time.perf_counter()
        fn()
        calls.append((1e3 * (time.perf_counter() - t0), minor_faults() - faults))
        if len(calls) >= minimum and calls[-1][1] <= max(0.01 * calls[0][1], 100):
            break
    return calls


def measure(fn, minimum: int, maximum: int, repeats: int) -> tuple:
    """(median ms of ``repeats`` calls after :func:`warm_up`, peak MB above the resident set at the start, the
    warm-up calls) of fn."""
    gc.collect()
    base = qt.rss_mb()
    qt.reset_peak()
    calls = warm_up(fn, minimum, maximum)
    ms = 1e3 * statistics.median(timed(fn, 0, repeats))
    return ms, qt.peak_mb() - base, calls


def task_scaling(name: str, settings: dict, report=None) -> dict:
    """Energy+forces time of each water box (settings["box_sizes"]), one model built once for all boxes.

    Warm-up (:func:`warm_up`): every box gets ``scaling_warmup`` to ``scaling_warmup_max`` untimed calls, until
    a call no longer page-faults in new memory; the first measured box gets ``scaling_first_warmup`` more, for
    the one-off costs of a fresh process (lazy caches, TorchScript profiling-executor runs, allocator growth),
    which otherwise land in the smallest box's time. The untimed calls' times and page faults are kept per box
    (``warmup_calls``). molkern runs eagerly as its ASE calculator does (`constant_parameters`: weights folded
    into cached matrices on small graphs) and, with ``settings["compile"]``, the same boxes through
    molkern.train.compiled.CompiledEnergyForces too (one graph for every box, compiled on the first box and not
    timed), as ``compiled_ms`` / ``compiled_us_per_atom``. ``report(points)``, if given, is called before each
    box is measured with the points so far and that box (status "running").
    Budgets: a box is skipped when the last measured box's time or peak memory, scaled linearly with the atom
    count, exceeds ``scaling_budget_s`` / ``scaling_memory_budget_mb``; with ``scaling_largest`` the largest box
    is measured whatever the time projection (the memory budget still applies: an out-of-memory worker dies).
    """
    model, fast, points = None, None, []
    largest = max(settings["box_sizes"])
    low, high = settings["scaling_warmup"], max(settings["scaling_warmup"], settings.get("scaling_warmup_max", 1))
    for k in settings["box_sizes"]:
        box = water_box(k)
        point = {"k": k, "atoms": box.num_nodes, "edges": box.edge_index.shape[1],
                 "neighbor_list_ms": 1e3 * box.neighbor_list_s}
        last = next((p for p in reversed(points) if p.get("status") == "ok"), None)
        forced = bool(settings.get("scaling_largest")) and k == largest and last is not None
        if points and points[-1].get("status") != "ok" and not forced:
            points.append({**point, "status": "skipped: a smaller box was not measured"})
            continue
        if last is not None:  # linear projection from the previous box: stay within the time and memory budgets
            grow = box.num_nodes / last["atoms"]
            over_time = last["ms"] / 1e3 * grow > settings["scaling_budget_s"] and not forced
            peak = max(last["peak_mb"], last.get("compiled_peak_mb", 0.0))  # eager or compiled, whichever is larger
            if over_time or peak * grow > settings["scaling_memory_budget_mb"]:
                points.append({**point, "status": f"skipped: projected {last['ms'] / 1e3 * grow:.0f} s, "
                                                  f"{peak * grow:.0f} MB per call (budgets "
                                                  f"{settings['scaling_budget_s']:g} s"
                                                  f"{' (not applied: --scaling-largest)' if forced else ''}, "
                                                  f"{settings['scaling_memory_budget_mb']:g} MB)"})
                continue
        if report is not None:
            report(points + [{**point, "status": "running"}])
        batch = as_batch([box])
        extra = 0
        if model is None:  # the same weights for every size; normalised by the first box's mean in-degree
            model = build(name, batch.edge_index.shape[1] / batch.num_nodes)
            model.module.eval()
            extra = settings.get("scaling_first_warmup", 0)
            if settings.get("compile") and hasattr(model.module, "graph_spec"):
                from molkern.train.compiled import CompiledEnergyForces

                fast = CompiledEnergyForces(model.module)
                fast(batch)  # trace + compile once (not timed)
        repeats = settings["scaling_repeats"]
        try:
            with constant_parameters(hasattr(model.module, "graph_spec")):  # molkern as its calculator runs it
                ms, peak_mb, cold = measure(lambda: energy_forces(model, batch), low + extra, high + extra, repeats)
        except (RuntimeError, MemoryError) as exc:
            points.append({**point, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
            continue
        point.update(status="ok", ms=ms, us_per_atom=1e3 * ms / box.num_nodes, peak_mb=peak_mb, warmup_calls=cold)
        if fast is not None:
            ms, peak_mb, warm = measure(lambda: fast(batch), low + extra, high + extra, repeats)
            point.update(compiled_ms=ms, compiled_us_per_atom=1e3 * ms / box.num_nodes, compiled_peak_mb=peak_mb,
                         compiled_warmup_calls=warm)
        points.append(point)
    return {"params": model.params if model else None, "description": model.description if model else None,
            "points": points}


def task_conv(name: str, settings: dict) -> dict:
    batches = qm9_batches(settings)
    model = build(name, mean_in_degree(batches))
    if not hasattr(model.module, "model") or not hasattr(model.module.model, "blocks"):
        return {"status": "skipped: conv GFLOP/s is measured for molkern models only"}
    convs = [block.conv for block in model.module.model.blocks]
    captured = []
    hooks = [c.register_forward_hook(lambda mod, args, out: captured.append((mod, args))) for c in convs]
    with torch.no_grad():
        model.energy(batches[0])
    for h in hooks:
        h.remove()
    layers = []
    for conv, (node_feats, edges, edge_index) in captured:
        x = node_feats.detach().requires_grad_(True)

        def fwd(conv=conv, x=x, edges=edges, edge_index=edge_index):
            return conv(x, edges, edge_index)

        def fwd_bwd(fwd=fwd):
            fwd().pow(2).sum().backward()

        fwd_s = statistics.median(timed(fwd, settings["warmup"], settings["repeats"] * 3))
        fwd_bwd_s = statistics.median(timed(fwd_bwd, settings["warmup"], settings["repeats"] * 3))
        flops = conv_flops(conv, edge_index.shape[1])
        layers.append({"irreps_in": str(conv.irreps_in), "irreps_out": str(conv.irreps_out),
                       "edges": edge_index.shape[1], "useful_mflop": flops / 1e6, "fwd_ms": 1e3 * fwd_s,
                       "fwd_bwd_ms": 1e3 * fwd_bwd_s, "fwd_gflop_per_s": flops / fwd_s / 1e9,
                       "matmul_mflop_fwd": count_ops(fwd)["matmul_flops"] / 1e6})
    flops = sum(l["useful_mflop"] for l in layers) * 1e6
    fwd_s = sum(l["fwd_ms"] for l in layers) / 1e3
    fwd_bwd_s = sum(l["fwd_bwd_ms"] for l in layers) / 1e3
    return {"params": model.params, "description": model.description, "layers": layers,
            "useful_mflop": flops / 1e6, "fwd_ms": 1e3 * fwd_s, "fwd_gflop_per_s": flops / fwd_s / 1e9,
            # backward of a bilinear product does about twice the forward's work: 3x useful FLOPs in fwd+bwd
            "fwd_bwd_ms": 1e3 * fwd_bwd_s, "fwd_bwd_gflop_per_s": 3 * flops / fwd_bwd_s / 1e9}


def task_machine(name: str, settings: dict) -> dict:
    n = settings["matmul_n"]
    return {"matmul_n": n, "matmul_gflop_per_s_1_thread": matmul_peak(1, n),
            "matmul_gflop_per_s": matmul_peak(settings["threads"], n), "threads": settings["threads"]}


def run(task: str, name: str, settings: dict, progress=None) -> dict:
    """One measurement in this process: sets threads and seeds, returns the row (with load averages).

    progress: called with the row so far (status "partial") before each scaling box, e.g. to save it."""
    qt.set_threads(settings["threads"])
    torch.manual_seed(0)
    load = os.getloadavg()
    if task == "scaling":
        def report(points):
            if progress is not None:
                progress({"model": name, "task": task, "status": "partial", "points": points, "loadavg_start": load})

        row = task_scaling(name, settings, report)
    else:
        row = {"task_qm9": task_qm9, "task_latency": task_latency, "task_conv": task_conv,
               "task_machine": task_machine}[f"task_{task}"](name, settings)
    row.setdefault("status", "ok")
    return {"model": name, "task": task, **row, "loadavg_start": load, "loadavg_end": os.getloadavg()}
