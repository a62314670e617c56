"""Benchmark the dense steerable 3D convolution against a plain torch.nn.Conv3d with the same weight shape.

For each case (irreps, grid, kernel size, group) it times, per forward+backward (loss = sum(out**2), input
and parameters require grad):
  * dense: DenseSteerableConv3d in training mode (kernel sampled at every call: EdgeEmbedding -> kernel MLP ->
    kernel_matrix -> conv3d, and the backward through all of it);
  * conv3d: torch.nn.Conv3d(d_in, d_out, K, padding=K//2) with the same weight shape;
  * sampling: the kernel sampling alone (layer.weight() forward + backward), i.e. the steerable overhead;
and the eval-mode forward (cached weight, no grad) of both. Prints a table and writes JSON
(default benchmarks/results/voxel_conv.json).

    .venv/bin/python benchmarks/voxel_conv.py [--threads 2] [--repeats 5] [--quick]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import e3nn
import torch

from molkern.nn.voxel import DenseSteerableConv3d

# (name, irreps_in, irreps_out, grid, kernel_size, batch)
CASES = [
    ("first layer", "1x0e", "12x0e+4x1o", 16, 5, 8),
    ("hidden l<=1", "8x0e+8x1o", "16x0e+8x1o", 16, 5, 8),
    ("hidden l<=2", "4x0e+4x1o+2x2e", "10x0e+4x1o+2x2e", 16, 5, 8),
    ("hidden, K=3, 32^3", "4x0e+4x1o", "8x0e+4x1o", 32, 3, 4),
]
QUICK_CASES = [("hidden l<=1", "4x0e+2x1o", "6x0e+2x1o", 8, 3, 2)]


def median_times(fns, repeats: int, warmup: int = 2) -> list:
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


def bench_case(name, irreps_in, irreps_out, grid, k, batch, group, repeats):
    torch.manual_seed(0)
    layer = DenseSteerableConv3d(irreps_in, irreps_out, k, group=group)
    d_in, d_out = layer.irreps_in.dim, layer.irreps_out.dim
    plain = torch.nn.Conv3d(d_in, d_out, k, padding=k // 2)
    x = torch.randn(batch, d_in, grid, grid, grid, requires_grad=True)

    def fwd_bwd(module):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).pow(2).sum().backward()
        return run

    def sampling():
        layer.zero_grad(set_to_none=True)
        layer.weight().pow(2).sum().backward()

    layer.train()
    t_dense, t_plain, t_sample = median_times([fwd_bwd(layer), fwd_bwd(plain), sampling], repeats)
    layer.eval()
    with torch.no_grad():
        t_dense_eval, t_plain_eval = median_times([lambda: layer(x), lambda: plain(x)], repeats)
    return {
        "case": name, "group": group, "irreps_in": str(layer.irreps_in), "irreps_out": str(layer.irreps_out),
        "weight_shape": list(plain.weight.shape), "grid": grid, "kernel_size": k, "batch": batch,
        "taps_sampled": int(layer._support.numel()),
        "kernel_parameters": sum(p.numel() for p in layer.parameters()),
        "conv3d_parameters": sum(p.numel() for p in plain.parameters()),
        "dense_fwd_bwd_ms": 1e3 * t_dense, "conv3d_fwd_bwd_ms": 1e3 * t_plain, "sampling_fwd_bwd_ms": 1e3 * t_sample,
        "ratio_fwd_bwd": t_dense / t_plain,
        "dense_eval_fwd_ms": 1e3 * t_dense_eval, "conv3d_eval_fwd_ms": 1e3 * t_plain_eval,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--groups", default="o3,c1")
    parser.add_argument("--quick", action="store_true", help="one tiny case (smoke test)")
    parser.add_argument("--out", default="benchmarks/results/voxel_conv.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    start = time.perf_counter()
    for case in QUICK_CASES if args.quick else CASES:
        for group in args.groups.split(","):
            rows.append(bench_case(*case, group=group, repeats=args.repeats))
            print(f"  done {case[0]} / {group} ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\nDenseSteerableConv3d vs torch.nn.Conv3d (same weight shape), float32, {args.threads} threads, "
          f"median of {args.repeats}; ms per call")
    head = (f"{'case':18s} {'group':5s} {'weight (out,in,K^3)':>20s} {'batch x grid':>12s} {'dense f+b':>10s} "
            f"{'conv3d f+b':>10s} {'ratio':>6s} {'sampling f+b':>12s} {'dense eval':>10s} {'conv3d eval':>11s}")
    print(head)
    for r in rows:
        shape = "{},{},{}^3".format(*r["weight_shape"][:3])
        size = "{}x{}^3".format(r["batch"], r["grid"])
        print(f"{r['case']:18s} {r['group']:5s} {shape:>20s} {size:>12s} "
              f"{r['dense_fwd_bwd_ms']:10.1f} {r['conv3d_fwd_bwd_ms']:10.1f} {r['ratio_fwd_bwd']:6.2f} "
              f"{r['sampling_fwd_bwd_ms']:12.1f} {r['dense_eval_fwd_ms']:10.1f} {r['conv3d_eval_fwd_ms']:11.1f}")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__, "e3nn": e3nn.__version__,
                    "cpu_count": os.cpu_count(), "loadavg_1_5_15_at_end": os.getloadavg()},
        "settings": {"threads": args.threads, "repeats": args.repeats, "warmup": 2, "dtype": "float32",
                     "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "method": "median wall time (time.perf_counter) after 2 warm-up calls, cases timed round-robin; fwd+bwd: "
                  "loss = sum(out**2), backward w.r.t. input and parameters; the dense layer in training mode "
                  "re-samples its kernel every call; eval: forward under no_grad, dense weight cached",
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load average (1/5/15 min) at end: {os.getloadavg()}; wrote {out}")


if __name__ == "__main__":
    main()
