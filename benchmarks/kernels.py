"""Benchmark one SteerableConv layer (gather -> kernel -> scatter) per 10,000 edges on QM9-sized molecules.

Compares the standard (NequIP) kernel, the depthwise (default), factorised and full implicit kernels at matched
width and lmax,
plus the shared EdgeEmbedding fronts. Prints a table and writes JSON (default benchmarks/results/kernels.json).

    .venv/bin/python benchmarks/kernels.py [--channels 32] [--lmax 2] [--threads 2] [--repeats 10]
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import time
from pathlib import Path

import e3nn
import torch
from ase.build import molecule
from ase.collections import g2
from e3nn import o3
from torch.profiler import ProfilerActivity, profile

from molkern.models import MolkernNet
from molkern.nn import EdgeEmbedding, Edges, ImplicitKernel, StandardKernel, SteerableConv

CUTOFF = 5.0
PER = 10_000  # results are normalised per this many edges
HEADS = inspect.signature(MolkernNet).parameters["kernel_heads"].default  # the model's default
FULL_LIMIT_S, FULL_LIMIT_MB = 10.0, 4000.0  # above these (projected per call), time the full kernel on fewer edges
MEMORY_METHOD = (
    "torch.profiler(profile_memory=True) over one fwd+bwd call: the '[memory]' allocation/free records "
    "(kineto_results.events(), nbytes signed) sorted by time and summed cumulatively; peak = running max. "
    "Counts CPU tensor allocations made during the call (inputs/parameters allocated before are excluded)."
)


def qm9_like_batch(min_edges: int, dtype: torch.dtype):
    """G2 molecules with elements in {H,C,N,O,F} and 5..29 atoms, concatenated (cycling) until E >= min_edges.

    Returns pos (N, 3) and edge_index (2, E) of radius graphs (cutoff 5 A, no self loops), offset like a PyG batch.
    """
    mols = [molecule(n) for n in g2.names]
    mols = [m for m in mols if set(m.get_chemical_symbols()) <= {"H", "C", "N", "O", "F"} and 5 <= len(m) <= 29]
    positions, edges, num_nodes, num_edges, k = [], [], 0, 0, 0
    while num_edges < min_edges:
        pos = torch.tensor(mols[k % len(mols)].positions, dtype=dtype)
        adj = (torch.cdist(pos, pos) < CUTOFF) & ~torch.eye(len(pos), dtype=torch.bool)
        ei = adj.nonzero().t() + num_nodes  # (2, e): rows = source j, cols = target i (symmetric)
        positions.append(pos)
        edges.append(ei)
        num_nodes, num_edges, k = num_nodes + len(pos), num_edges + ei.shape[1], k + 1
    return torch.cat(positions), torch.cat(edges, dim=1)


def median_times(fns, repeats: int, warmup: int = 3) -> list:
    """Median wall time (s) of each fn() after warm-up, timed round-robin so load drifts hit all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def peak_memory_mb(fn) -> float:
    """Peak of cumulative CPU allocations (MB) during one fn() call, from the profiler's memory records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    total = peak = 0
    for _, nbytes in records:
        total += nbytes
        peak = max(peak, total)
    return peak / 1e6


def conv_case(make_kernel, emb: EdgeEmbedding, pos, edge_index, irreps: o3.Irreps):
    """(module, forward, forward+backward, E) for one SteerableConv layer; the edge embedding is precomputed."""
    kernel = make_kernel()
    conv = SteerableConv(kernel, avg_num_neighbors=edge_index.shape[1] / pos.shape[0])
    edge_vec = pos[edge_index[0]] - pos[edge_index[1]]
    with torch.no_grad():
        edges = Edges(*[None if t is None else t.detach() for t in emb(edge_vec)._replace(kernel_in_parts=None)])
    x = irreps.randn(pos.shape[0], -1, dtype=pos.dtype).requires_grad_(True)

    def forward():
        return conv(x, edges, edge_index)

    def forward_backward():
        x.grad = None
        conv.zero_grad(set_to_none=True)
        forward().pow(2).sum().backward()

    return conv, forward, forward_backward, edge_index.shape[1]


def embedding_case(emb: EdgeEmbedding, pos, edge_index):
    """(module, forward, forward+backward, E) for the EdgeEmbedding; backward w.r.t. edge vectors and parameters."""
    edge_vec = (pos[edge_index[0]] - pos[edge_index[1]]).detach().requires_grad_(True)

    def forward():
        return emb(edge_vec)

    def forward_backward():
        edge_vec.grad = None
        emb.zero_grad(set_to_none=True)
        sum(t.pow(2).sum() for t in forward() if t is not None).backward()

    return emb, forward, forward_backward, edge_index.shape[1]


def measure(cases, repeats):
    """Time (round-robin) and profile (name, case, note) triples; rows normalised per 10,000 edges."""
    fns = [fn for _, case, _ in cases for fn in case[1:3]]
    seconds = median_times(fns, repeats)
    rows = []
    for i, (name, (module, _, forward_backward, num_edges), note) in enumerate(cases):
        scale = PER / num_edges
        rows.append({
            "kernel": name,
            "params": sum(p.numel() for p in module.parameters()),
            "E": num_edges,
            "fwd_ms_per_10k": 1e3 * scale * seconds[2 * i],
            "fwd_bwd_ms_per_10k": 1e3 * scale * seconds[2 * i + 1],
            "peak_mb_per_10k": scale * peak_memory_mb(forward_backward),
            "note": note,
        })
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--lmax", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as every benchmark process (benchmarks.qm9_throughput.set_threads)
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)

    lmax, band = args.lmax, 2 * args.lmax
    irreps = o3.Irreps([(args.channels, (l, (-1) ** l)) for l in range(lmax + 1)])
    pos, edge_index = qm9_like_batch(PER, dtype)
    emb_std = EdgeEmbedding(CUTOFF, lmax, num_radial=8, kernel_input=False)
    emb_band = EdgeEmbedding(CUTOFF, band, num_radial=8, kernel_input=False)
    # the kernel MLP's trunk runs once per forward in the shared front, each layer's implicit kernel keeps a head
    # of its own (factorised and full: on the gated trunk with e3nn Linear heads, as before the invariant trunk)
    emb_imp = EdgeEmbedding(CUTOFF, band, num_radial=8, kernel_input=True, trunk_width=8, trunk_layers=2)
    # MolkernNet's default front: the invariant trunk (64 units, 2 layers), heads weighting the harmonics
    emb_inv = EdgeEmbedding(CUTOFF, band, num_radial=8, kernel_input=True, trunk_width=64, trunk_layers=2,
                            trunk_type="invariant")
    kernels = {
        "standard (e3nn TensorProduct, as NequIP)": (
            lambda: StandardKernel(irreps, irreps, emb_std.irreps_sh, 8, mlp_width=64, fused=False), emb_std),
        "standard (fused product)": (
            lambda: StandardKernel(irreps, irreps, emb_std.irreps_sh, 8, mlp_width=64), emb_std),
        "standard at the implicit band (fused product)": (
            lambda: StandardKernel(irreps, irreps, emb_band.irreps_sh, 8, mlp_width=64), emb_band),
        "implicit depthwise (default)": (lambda: ImplicitKernel(
            irreps, irreps, emb_inv.irreps_kernel_in, "depthwise", mlp_width=8, mlp_layers=0,
            heads=HEADS, channel_weights=True, invariant_head=True), emb_inv),
        "implicit depthwise, unfused (torch operations)": (lambda: ImplicitKernel(
            irreps, irreps, emb_inv.irreps_kernel_in, "depthwise", mlp_width=8, mlp_layers=0,
            heads=HEADS, channel_weights=True, invariant_head=True, fused=False), emb_inv),
        "implicit factorised": (lambda: ImplicitKernel(
            irreps, irreps, emb_imp.irreps_kernel_in, "factorised", mlp_width=8, mlp_layers=0), emb_imp),
        "implicit full": (lambda: ImplicitKernel(
            irreps, irreps, emb_imp.irreps_kernel_in, "full", mlp_width=8, mlp_layers=0), emb_imp),
    }

    cases = []
    for name, (make_kernel, emb) in kernels.items():
        p, ei, note = pos, edge_index, ""
        if name == "implicit full":  # probe on ~1,000 edges; fall back to them if a full-size call is too costly
            p_small, ei_small = qm9_like_batch(1000, dtype)
            _, _, fb, _ = conv_case(make_kernel, emb, p_small, ei_small, irreps)
            factor = edge_index.shape[1] / ei_small.shape[1]
            seconds = median_times([fb], 1, warmup=2)[0] * factor
            megabytes = peak_memory_mb(fb) * factor
            if seconds > FULL_LIMIT_S or megabytes > FULL_LIMIT_MB:
                p, ei = p_small, ei_small
                note = f"timed on E={ei.shape[1]} (projected {seconds:.0f} s, {megabytes:.0f} MB per call at full E), scaled"
        cases.append((name, conv_case(make_kernel, emb, p, ei, irreps), note))
    for name, emb in [("edge embedding (shared, once per forward): standard front", emb_std),
                      (f"edge embedding (shared, once per forward): implicit front + invariant trunk (lmax={band}, "
                       "default)", emb_inv),
                      (f"edge embedding (shared, once per forward): implicit front + gated trunk (lmax={band})",
                       emb_imp)]:
        cases.append((name, embedding_case(emb, pos, edge_index), ""))
    rows = measure(cases, args.repeats)
    ref, ref_fused = rows[0]["fwd_bwd_ms_per_10k"], rows[1]["fwd_bwd_ms_per_10k"]
    for row in rows:
        row["ratio_to_standard"] = row["fwd_bwd_ms_per_10k"] / ref
        row["ratio_to_fused_standard"] = row["fwd_bwd_ms_per_10k"] / ref_fused

    header = (f"{'kernel':<66}{'params':>9}{'E':>8}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ratio':>8}{'ratio f':>9}"
              f"{'peak MB':>10}")
    print(f"SteerableConv, {irreps}, lmax={lmax}, {args.dtype}, {args.threads} threads; per 10,000 edges")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        flag = " *" if r["note"] else ""
        print(f"{r['kernel'] + flag:<66}{r['params']:>9}{r['E']:>8}{r['fwd_ms_per_10k']:>10.1f}"
              f"{r['fwd_bwd_ms_per_10k']:>12.1f}{r['ratio_to_standard']:>8.2f}{r['ratio_to_fused_standard']:>9.2f}"
              f"{r['peak_mb_per_10k']:>10.1f}")
    for r in rows:
        if r["note"]:
            print(f"* {r['kernel']}: {r['note']}")
    print("ratio: fwd+bwd / standard (e3nn, as NequIP); ratio f: fwd+bwd / standard (fused product)")
    default = next(r for r in rows if r["kernel"] == "implicit depthwise (default)")
    for key, what in [("ratio_to_standard", "the NequIP-style standard kernel"),
                      ("ratio_to_fused_standard", "the standard kernel on molkern's fused product")]:
        verdict = "met" if default[key] <= 1.0 else "NOT met"
        print(f"target: default implicit kernel <= standard kernel, against {what}: {verdict} ({default[key]:.2f}x)")

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__, "e3nn": e3nn.__version__,
                    "cpu_count": os.cpu_count(), "flush_denormal": True, "loadavg_1_5_15_at_end": os.getloadavg()},
        "settings": {"threads": args.threads, "dtype": args.dtype, "channels": args.channels, "lmax": lmax,
                     "irreps": str(irreps), "cutoff": CUTOFF, "repeats": args.repeats, "warmup": 3,
                     "num_nodes": pos.shape[0], "num_edges": edge_index.shape[1],
                     "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "method": {"time": "median of repeats of time.perf_counter after 3 warm-up calls, all cases timed round-robin; forward run with autograd "
                           "enabled; fwd+bwd loss = sum(out**2), backward w.r.t. inputs and parameters; ms * 10000/E",
                   "memory": MEMORY_METHOD + " Scaled by 10000/E."},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load average (1/5/15 min) at end: {os.getloadavg()}; wrote {out}")


if __name__ == "__main__":
    main()
