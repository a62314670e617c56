"""QM9 training and inference throughput (molecules/s) and peak memory, molkern next to PyG's SchNet and DimeNet++.

Rows: MolkernNet through QM9Module (kernel factorised / full / standard, lmax 1 and 2, bond graph and 5 A radius
graph; 32 channels, 3 blocks) and PyG's SchNet and DimeNet++ (3 interaction blocks, about 0.2 M parameters, 5 A
radius graph). Batches of 32 real QM9 molecules drawn (seed 0) from `molkern.data.QM9(root, max_molecules=N)`;
the same molecules for every model. Energy-only (U0) training step = forward + L1 loss + backward + AdamW step;
inference = forward in eval mode under torch.no_grad(). Each model runs in a fresh subprocess (its own peak memory,
its own allocator state) with glibc's malloc trimming off, as `make bench` does. Prints a markdown table and
writes JSON (default benchmarks/results/qm9_throughput.json).

    .venv/bin/python benchmarks/qm9_throughput.py [--root data/qm9] [--max-molecules 5000] [--threads 2]
        [--repeats 3] [--num-batches 4] [--models schnet,dimenet++,factorised-l1-bonds] [--quick] [--in-process]

PyG's models build their graph with `radius_graph` (torch-cluster / pyg-lib, not installable here) and DimeNet++
finds its triplets with torch_sparse's SparseTensor (not installed): both are given the dataset's precomputed
radius-graph edges (`molkern.data.neighbors.radius_edges`, 5 A) instead, SchNet through its `interaction_graph`
argument and DimeNet++ through a subclass whose forward is PyG 2.8.1's with `radius_graph` replaced by the given
edges and `triplets` by the plain-torch `triplets` below (same triplets, same order). The neighbour list is
excluded for every model; DimeNet++'s triplet search is included (it is part of its forward).
"""

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

CUTOFF = 5.0  # Angstrom, radius graph of every model that uses one
TARGET = "U0"
MOLKERN = {"num_channels": 32, "num_layers": 3, "kernel_mlp_width": 8}
SCHNET = {"hidden_channels": 128, "num_filters": 128, "num_interactions": 3, "num_gaussians": 50, "cutoff": CUTOFF}
DIMENET = {"hidden_channels": 64, "out_channels": 1, "num_blocks": 3, "int_emb_size": 32, "basis_emb_size": 8,
           "out_emb_channels": 64, "num_spherical": 7, "num_radial": 6, "cutoff": CUTOFF}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}


def set_threads(threads: int) -> bool:
    """Torch threads for a benchmark process, and denormal floats flushed to zero (`torch.set_flush_denormal`;
    returns False where the CPU cannot).

    Intel CPUs take far longer for arithmetic on denormals: PyG SchNet's training step, whose filter-network
    gradients underflow, took 366 ms of CPU time instead of 77 ms on an Intel Xeon (Sapphire Rapids, 1 thread,
    2026-12-06); molkern's took 124 ms either way. Flushing changes results by < 1e-38 per number.
    """
    torch.set_num_threads(threads)
    return torch.set_flush_denormal(True)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def worker_env() -> dict:
    """This process's environment with glibc malloc trimming off (MALLOC_ENV, unless already set): for workers."""
    return {**os.environ, **{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}}
MEMORY_METHOD = (
    "Resident set size from /proc/self/status. After the model is built and the batches are in memory: gc, then "
    "baseline = VmRSS. The peak (VmHWM) is reset (`echo 5 > /proc/self/clear_refs`) before the inference phase "
    "and again before the training phase; '<phase> peak MB' = VmHWM after the phase - baseline, i.e. the extra "
    "memory the phase needed at its peak (activations, autograd buffers, gradients, AdamW state, allocator "
    "slack), not counting the Python/torch runtime, the model's parameters or the data. Inference runs first. "
    "Only meaningful with one model per process (the default); with --in-process earlier models' freed memory "
    "is reused and the numbers are too low. Where clear_refs is not available: ru_maxrss (lifetime peak) - baseline."
)


def model_specs():
    """name -> spec; every name is a row of the table."""
    specs = {}
    for graph in ("bonds", "radius"):
        for kernel in ("depthwise", "factorised", "full", "standard"):
            for lmax in (1, 2):
                specs[f"{kernel}-l{lmax}-{graph}"] = {"family": "molkern", "kernel": kernel, "lmax": lmax,
                                                      "graph": graph}
    specs["schnet"] = {"family": "schnet", "graph": "radius"}
    specs["dimenet++"] = {"family": "dimenet++", "graph": "radius"}
    return specs


# ----------------------------------------------------------------------------------------- PyG models


def triplets(edge_index: torch.Tensor, num_nodes: int):
    """Plain-torch replacement for `torch_geometric.nn.models.dimenet.triplets` (which needs torch_sparse).

    For every edge j -> i (edge_index[0] = j, edge_index[1] = i), every edge k -> j with k != i. Returns the same
    tuple in the same order as PyG's: (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji), triplets grouped by the edge
    j -> i in edge order and, within a group, sorted by k.

    Shapes:
        edge_index (2, E) -> i (E,), j (E,), idx_i / idx_j / idx_k / idx_kj / idx_ji (T,)
    """
    row, col = edge_index  # j -> i
    num_edges = row.numel()
    # edges sorted by target, then source: the rows of PyG's adj_t (row = target, col = source)
    order = torch.sort(col * num_nodes + row, stable=True).indices  # (E,)
    count = torch.bincount(col, minlength=num_nodes)  # (num_nodes,) in-degree
    ptr = torch.cumsum(count, 0) - count  # (num_nodes,) first sorted edge with that target
    num_triplets = count[row]  # (E,) edges k -> j for each edge j -> i
    idx_ji = torch.repeat_interleave(torch.arange(num_edges, device=row.device), num_triplets)  # (T',)
    start = torch.repeat_interleave(ptr[row] - (torch.cumsum(num_triplets, 0) - num_triplets), num_triplets)
    idx_kj = order[start + torch.arange(idx_ji.numel(), device=row.device)]  # (T',)
    idx_i, idx_j, idx_k = col[idx_ji], row[idx_ji], row[idx_kj]
    mask = idx_i != idx_k  # remove i == k
    return col, row, idx_i[mask], idx_j[mask], idx_k[mask], idx_kj[mask], idx_ji[mask]


def make_pyg_models():
    """(SchNet and DimeNet++ subclasses that take precomputed edges) -- imported lazily."""
    from torch_geometric.nn.models import DimeNetPlusPlus, SchNet
    from torch_geometric.utils import scatter

    class GivenEdges(torch.nn.Module):
        """Stands in for SchNet's RadiusInteractionGraph: the edges set by the caller, their lengths from pos."""

        def __init__(self):
            super().__init__()
            self.edge_index, self.edge_shift = None, None

        def forward(self, pos, batch):
            row, col = self.edge_index
            vec = pos[row] - pos[col]  # (E, 3) Angstrom
            if self.edge_shift is not None:  # periodic images: pos[j] - pos[i] + shift
                vec = vec + self.edge_shift.to(vec.dtype)
            return self.edge_index, vec.norm(dim=-1)  # (2, E), (E,) Angstrom

    class SchNetGivenEdges(SchNet):
        def __init__(self, **kwargs):
            super().__init__(interaction_graph=GivenEdges(), **kwargs)

        def forward(self, z, pos, batch, edge_index, edge_shift=None):
            self.interaction_graph.edge_index, self.interaction_graph.edge_shift = edge_index, edge_shift
            try:
                return super().forward(z, pos, batch)
            finally:
                self.interaction_graph.edge_index, self.interaction_graph.edge_shift = None, None

    class DimeNetPlusPlusGivenEdges(DimeNetPlusPlus):
        def forward(self, z, pos, batch, edge_index, edge_shift=None):
            """PyG 2.8.1 DimeNet.forward (DimeNet++ branch), with the given edges and plain-torch triplets.

            With ``edge_shift`` (E, 3) Angstrom (periodic images, edge vector pos[j] - pos[i] + shift), distances
            and angles come from the shifted edge vectors; triplets k -> j -> i still exclude k == i by index.
            """
            i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = triplets(edge_index, num_nodes=z.size(0))
            if edge_shift is None:
                dist = (pos[i] - pos[j]).pow(2).sum(dim=-1).sqrt()
                pos_jk, pos_ij = pos[idx_j] - pos[idx_k], pos[idx_i] - pos[idx_j]
            else:
                vec = pos[j] - pos[i] + edge_shift.to(pos.dtype)  # (E, 3) x_j - x_i
                dist = vec.pow(2).sum(dim=-1).sqrt()
                pos_jk, pos_ij = -vec[idx_kj], -vec[idx_ji]  # x_j - x_k, x_i - x_j
            a = (pos_ij * pos_jk).sum(dim=-1)
            b = torch.cross(pos_ij, pos_jk, dim=1).norm(dim=-1)
            angle = torch.atan2(b, a)
            rbf = self.rbf(dist)
            sbf = self.sbf(dist, angle, idx_kj)
            x = self.emb(z, rbf, i, j)
            P = self.output_blocks[0](x, rbf, i, num_nodes=pos.size(0))
            for interaction_block, output_block in zip(self.interaction_blocks, self.output_blocks[1:]):
                x = interaction_block(x, rbf, sbf, idx_kj, idx_ji)
                P = P + output_block(x, rbf, i, num_nodes=pos.size(0))
            return scatter(P, batch, dim=0, reduce="sum")

    return SchNetGivenEdges, DimeNetPlusPlusGivenEdges


# -------------------------------------------------------------------------------------------- memory


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def rss_mb() -> float:
    try:
        return _status_mb("VmRSS")
    except (OSError, KeyError):  # not Linux: no current RSS, fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


# ------------------------------------------------------------------------------------------ one model


def load_batches(args, graph: str):
    """The benchmark's fixed batches (same molecules for every model) on the given graph."""
    from torch_geometric.data import Batch

    from molkern.data import QM9

    kwargs = {"graph": "radius", "cutoff": CUTOFF} if graph == "radius" else {}
    ds = QM9(args.root, max_molecules=args.max_molecules, progress=False, **kwargs)
    need = args.num_batches * args.batch_size
    if len(ds) < need:
        raise ValueError(f"{len(ds)} molecules loaded, {need} needed ({args.num_batches} batches of {args.batch_size})")
    pick = np.random.default_rng(0).choice(len(ds), need, replace=False)
    batches = [Batch.from_data_list([ds[int(k)] for k in pick[b * args.batch_size:(b + 1) * args.batch_size]])
               for b in range(args.num_batches)]
    # normalised U0 (extensive: per-atom mean removed), the same regression target for every model
    col = QM9.target_index(TARGET)
    y = torch.cat([b.y[:, col] for b in batches]).double()  # (M,) meV
    n = torch.cat([torch.bincount(b.batch) for b in batches]).double()  # (M,)
    per_atom = (y / n).mean()
    std = (y - n * per_atom).std()
    for b in batches:
        b.target = ((b.y[:, col].double() - torch.bincount(b.batch).double() * per_atom) / std).float()[:, None]
    return batches


def build(spec, batches):
    """(model, forward(batch) -> (B, 1), parameter count, description)."""
    if spec["family"] == "molkern":
        from molkern.models import average_num_neighbors
        from molkern.train import QM9Module

        config = {**MOLKERN, "kernel": spec["kernel"], "lmax": spec["lmax"],
                  "irreps_edge_attr": "" if spec["kernel"] == "standard" else "3x0e",  # bond one-hot
                  "avg_num_neighbors": average_num_neighbors([b.edge_index for b in batches],
                                                             [b.num_nodes for b in batches])}
        graph = {"graph": "radius", "cutoff": CUTOFF} if spec["graph"] == "radius" else {"graph": "bonds"}
        model = QM9Module(model=config, targets=[TARGET], data_init=False, **graph)
        desc = f"MolkernNet {spec['kernel']} kernel, lmax {spec['lmax']}, " + ", ".join(
            f"{k}={v}" for k, v in MOLKERN.items())
        forward = model  # QM9Module.forward: the network, then the per-molecule sum -> (B, 1)
    else:
        SchNetGivenEdges, DimeNetPlusPlusGivenEdges = make_pyg_models()
        if spec["family"] == "schnet":
            model, kw = SchNetGivenEdges(**SCHNET), SCHNET
        else:
            model, kw = DimeNetPlusPlusGivenEdges(**DIMENET), DIMENET
        desc = f"PyG {type(model).__mro__[1].__name__}, " + ", ".join(f"{k}={v}" for k, v in kw.items())

        def forward(batch):
            return model(batch.z, batch.pos, batch.batch, batch.edge_index)  # (B, 1)

    return model, forward, sum(p.numel() for p in model.parameters()), desc


def run_model(name: str, args) -> dict:
    spec = model_specs()[name]
    set_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    batches = load_batches(args, spec["graph"])
    model, forward, params, desc = build(spec, batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)

    def train_step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss = (forward(batch) - batch.target).abs().mean()
        loss.backward()
        optimizer.step()

    def eval_step(batch):
        with torch.no_grad():
            forward(batch)

    def timed(step, train: bool) -> list:
        model.train(train)
        for k in range(args.warmup):
            step(batches[k % len(batches)])
        passes = []
        for _ in range(args.repeats):  # one repeat = one pass over all batches
            t0 = time.perf_counter()
            for batch in batches:
                step(batch)
            passes.append(time.perf_counter() - t0)
        return passes

    gc.collect()
    baseline = rss_mb()
    resettable = reset_peak()
    eval_s = timed(eval_step, train=False)
    eval_peak = peak_mb() - baseline
    gc.collect()
    reset_peak()
    train_s = timed(train_step, train=True)
    train_peak = peak_mb() - baseline

    num_mols = args.num_batches * args.batch_size
    return {
        "model": name, **spec, "description": desc, "params": params,
        "atoms_per_batch": statistics.mean(b.num_nodes for b in batches),
        "edges_per_batch": statistics.mean(b.edge_index.shape[1] for b in batches),
        "train_mol_per_s": num_mols / statistics.median(train_s),
        "eval_mol_per_s": num_mols / statistics.median(eval_s),
        "train_ms_per_batch": 1e3 * statistics.median(train_s) / args.num_batches,
        "eval_ms_per_batch": 1e3 * statistics.median(eval_s) / args.num_batches,
        # best pass: less sensitive to other jobs on a shared machine than the median
        "train_mol_per_s_best": num_mols / min(train_s), "eval_mol_per_s_best": num_mols / min(eval_s),
        "train_pass_s": train_s, "eval_pass_s": eval_s,
        "train_peak_mb": train_peak, "eval_peak_mb": eval_peak, "baseline_rss_mb": baseline,
        "peak_reset": resettable, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}, "status": "ok",
    }


def run_isolated(name: str, args) -> dict:
    """run_model in a fresh Python process (own peak RSS, own allocator), glibc malloc trimming off."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(out),
               *forward_args(args)]
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            return {"model": name, **model_specs()[name], "status": f"failed: {proc.stderr.strip()[-2000:]}"}
        return json.loads(out.read_text())


def forward_args(args) -> list:
    return ["--root", str(args.root), "--max-molecules", str(args.max_molecules), "--batch-size", str(args.batch_size),
            "--num-batches", str(args.num_batches), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--threads", str(args.threads)]


# ------------------------------------------------------------------------------------------------ main


def markdown_table(rows) -> str:
    lines = ["| model | graph | params | atoms / edges per batch | train mol/s | inference mol/s | train ms/batch "
             "| inference ms/batch | train peak MB | inference peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        graph = "bonds" if r["graph"] == "bonds" else f"radius {CUTOFF:g} A"
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {graph} | | | failed: {r['status'][8:].splitlines()[-1][:80]} "
                         "| | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {graph} | {r['params']:,} | {r['atoms_per_batch']:.0f} / {r['edges_per_batch']:.0f} "
            f"| {r['train_mol_per_s']:.0f} | {r['eval_mol_per_s']:.0f} | {r['train_ms_per_batch']:.0f} "
            f"| {r['eval_ms_per_batch']:.0f} | {r['train_peak_mb']:.0f} | {r['eval_peak_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/qm9", help="QM9 cache directory (molkern.data.QM9 root)")
    parser.add_argument("--max-molecules", type=int, default=5000, help="load the first N QM9 molecules")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=4, help="fixed batches; one repeat = one pass over them")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each phase")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="all", help=f"comma-separated subset of: {', '.join(model_specs())}")
    parser.add_argument("--quick", action="store_true", help="2 batches, 1 warm-up step, 2 repeats (smoke test)")
    parser.add_argument("--in-process", action="store_true",
                        help="run all models in this process (faster start; peak memory then not per model)")
    parser.add_argument("--out", default="benchmarks/results/qm9_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_batches, args.warmup, args.repeats = 2, 1, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:  # subprocess of run_isolated
        Path(args.worker_out).write_text(json.dumps(run_model(args.worker, args)))
        return
    specs = model_specs()
    names = list(specs) if args.models == "all" else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in specs]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(specs)}")

    from molkern.data import QM9

    QM9(args.root, max_molecules=args.max_molecules, progress=False)  # process and cache once, before the workers
    set_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name in names:
        if args.in_process:
            try:
                row = run_model(name, args)
            except Exception:
                row = {"model": name, **specs[name], "status": f"failed: {traceback.format_exc()[-2000:]}"}
        else:
            row = run_isolated(name, args)
        rows.append(row)
        state = "ok" if row["status"] == "ok" else "FAILED"
        print(f"{name}: {state} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    import e3nn
    import torch_geometric

    print(f"QM9 (first {args.max_molecules} molecules), batches of {args.batch_size}, {args.num_batches} batches, "
          f"{args.threads} threads, float32; median of {args.repeats} passes after {args.warmup} warm-up steps")
    print(markdown_table(rows))
    print(f"wall time {wall:.0f} s; load average (1/5/15 min) at end: {os.getloadavg()}")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__, "e3nn": e3nn.__version__,
                    "torch_geometric": torch_geometric.__version__, "cpu_count": os.cpu_count(),
                    "loadavg_1_5_15_at_end": os.getloadavg()},
        "settings": {"root": str(args.root), "max_molecules": args.max_molecules, "batch_size": args.batch_size,
                     "num_batches": args.num_batches, "repeats": args.repeats, "warmup": args.warmup,
                     "threads": args.threads, "quick": args.quick, "in_process": args.in_process,
                     "cutoff": CUTOFF, "target": TARGET, "molkern": MOLKERN, "schnet": SCHNET, "dimenet++": DIMENET,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "wall_time_s": wall},
        "method": {
            "time": "per model: fixed batches of QM9 molecules (rng seed 0, same molecules for every model); "
                    "inference = model.eval() forward under torch.no_grad(); training = model.train() forward, "
                    "L1 loss on normalised U0, backward, AdamW step; warm-up steps untimed; a repeat = one pass "
                    "over all batches timed with time.perf_counter; median over repeats; mol/s = molecules per "
                    "pass / median pass time. Neighbour lists are precomputed (excluded) for every model.",
            "memory": MEMORY_METHOD,
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
