"""The compiled MD path against eager over thousands of force calls: ``python -m benchmarks.compiled_check``.

torch.compile on CPU once crashed ("double free") on repeated force calls of an e3nn model, so molkern's
compiled energy+forces (``MolkernCalculator(compile=True)``) is checked here the way MD uses it: ``--steps``
calls through ASE on QM9 molecules taken in turn, their atoms displaced at random each call (so edge counts
change every step and the one compiled graph serves every size), each call's energy and forces compared with
the eager calculator's. The model is the suite's ``molkern-depthwise-l2`` (random seed-0 weights; the check is
about the compiled graph, not the potential). Prints a table and writes JSON (atomically).

    .venv/bin/python -m benchmarks.compiled_check --steps 5000 --out benchmarks/results/compiled_check.json
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def run(steps: int, molecules: int, displacement: float, threads: int, root: str, max_molecules: int) -> dict:
    """Eager and compiled calculators on the same displaced molecules, ``steps`` calls each; returns the summary."""
    import ase

    from molkern.calculator import MolkernCalculator

    from .models import build
    from .systems import qm9_molecules

    torch.set_num_threads(threads)
    mols = qm9_molecules(root, max_molecules, molecules, seed=2)
    degree = sum(m.edge_index.shape[1] for m in mols) / sum(m.num_nodes for m in mols)
    module = build("molkern-depthwise-l2", degree).module.eval()
    eager, compiled = MolkernCalculator(module), MolkernCalculator(module, compile=True)
    systems = [ase.Atoms(numbers=m.z.numpy(), positions=m.pos.double().numpy()) for m in mols]
    start = [a.get_positions() for a in systems]
    rng = np.random.default_rng(0)
    force_dev = energy_dev = force_scale = 0.0
    seconds = {"eager": [], "compiled": []}  # per call
    sizes = set()  # (atoms, edges) of the calls
    t0 = time.process_time()
    compiled.get_forces(systems[0].copy())  # traces and compiles the one graph
    compile_s = time.process_time() - t0
    for step in range(steps):
        k = step % len(systems)
        atoms = systems[k]
        atoms.set_positions(start[k] + rng.normal(0.0, displacement, start[k].shape))
        out = {}
        for name, calc in (("eager", eager), ("compiled", compiled)):
            calc.reset()  # a new evaluation even for identical positions
            t = time.perf_counter()
            out[name] = (calc.get_potential_energy(atoms), calc.get_forces(atoms))
            seconds[name].append(time.perf_counter() - t)
        (e_eager, f_eager), (e_comp, f_comp) = out["eager"], out["compiled"]
        if not (math.isfinite(e_comp) and np.isfinite(f_comp).all()):
            raise RuntimeError(f"call {step}: the compiled calculator returned non-finite energy or forces")
        force_dev = max(force_dev, float(np.abs(f_comp - f_eager).max()))
        force_scale = max(force_scale, float(np.abs(f_eager).max()))
        energy_dev = max(energy_dev, abs(e_comp - e_eager) / len(atoms))
        sizes.add((len(atoms), eager.batch(atoms).edge_index.shape[1]))  # the graph the calculators built
    return {
        "steps": steps, "molecules": len(systems), "atoms": [len(a) for a in systems], "displacement_A": displacement,
        "threads": threads, "compile_cpu_s": compile_s, "graphs_compiled": len(compiled._compiled.graphs),
        "distinct_sizes": len(sizes),
        "max_force_deviation_eV_per_A": force_dev, "max_abs_force_eV_per_A": force_scale,
        "max_force_deviation_relative": force_dev / force_scale if force_scale else None,
        "max_energy_deviation_eV_per_atom": energy_dev,
        "eager_ms_median": 1e3 * statistics.median(seconds["eager"]),
        "compiled_ms_median": 1e3 * statistics.median(seconds["compiled"]),
        # calls far slower than the median: Dynamo compiling again for a size its guards did not cover
        "compiled_slow_calls": [(i, round(1e3 * t, 1)) for i, t in enumerate(seconds["compiled"])
                                if t > 10 * statistics.median(seconds["compiled"])],
        "torch": torch.__version__,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="force calls of each calculator (default 5000)")
    parser.add_argument("--molecules", type=int, default=8, help="QM9 molecules, taken in turn (default 8)")
    parser.add_argument("--displacement", type=float, default=0.1, help="random displacement per call, A (0.1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the ASE MD step)")
    parser.add_argument("--root", default="data/qm9", help="QM9 cache directory (molkern.data.QM9 root)")
    parser.add_argument("--max-molecules", type=int, default=5000, help="load the first N QM9 molecules")
    parser.add_argument("--out", default="benchmarks/results/compiled_check.json", help="JSON output file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.molecules < 1 or args.displacement < 0:
        parser.error("--steps and --molecules must be >= 1 and --displacement >= 0")
    result = run(args.steps, args.molecules, args.displacement, args.threads, args.root, args.max_molecules)
    from molkern.io import atomic_write

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result, indent=2))
    print("| calls | molecules (atoms) | (atoms, edges) sizes | graphs | max force dev / max force | max energy dev "
          "(eV/atom) | eager ms (median) | compiled ms (median) | compiled calls > 10x median |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {result['steps']} | {result['molecules']} ({min(result['atoms'])}-{max(result['atoms'])}) "
          f"| {result['distinct_sizes']} | {result['graphs_compiled']} "
          f"| {result['max_force_deviation_eV_per_A']:.2e} / {result['max_abs_force_eV_per_A']:.2e} eV/A "
          f"| {result['max_energy_deviation_eV_per_atom']:.2e} | {result['eager_ms_median']:.2f} "
          f"| {result['compiled_ms_median']:.2f} | {len(result['compiled_slow_calls'])} "
          f"{result['compiled_slow_calls'][:5]} |")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
