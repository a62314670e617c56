"""Benchmarks run end to end (quick mode, tiny data; no timing assertions) and their non-timing helpers are right."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qm9_throughput():
    return load_benchmark("qm9_throughput")


def test_qm9_throughput_quick(qm9_throughput, tmp_path, capsys):
    """Quick mode on 40 molecules, one model per code path (implicit on bonds, standard on a radius graph, SchNet).

    DimeNet++ is left out here only because PyG builds its basis with sympy (~20 s); its forward is checked
    below with a small basis.
    """
    models = ["factorised-l1-bonds", "standard-l1-radius", "schnet"]
    out = tmp_path / "qm9_throughput.json"
    qm9_throughput.main(["--quick", "--in-process", "--root", str(tmp_path / "qm9"), "--max-molecules", "40",
                         "--batch-size", "4", "--models", ",".join(models), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["rows"]] == models
    for row in result["rows"]:
        assert row["status"] == "ok", row["status"]
        for key in ("params", "atoms_per_batch", "edges_per_batch", "train_mol_per_s", "eval_mol_per_s",
                    "train_ms_per_batch", "eval_ms_per_batch", "baseline_rss_mb"):
            assert row[key] > 0, (row["model"], key)
        assert row["train_peak_mb"] >= 0 and row["eval_peak_mb"] >= 0
    assert result["settings"]["quick"] and result["method"]["memory"]
    printed = capsys.readouterr().out
    assert "| model | graph | params |" in printed and all(f"| {m} |" in printed for m in models)


def test_qm9_throughput_rejects_unknown_model(qm9_throughput, tmp_path):
    with pytest.raises(SystemExit, match="unknown model"):
        qm9_throughput.main(["--models", "schnet,painn", "--root", str(tmp_path), "--out", str(tmp_path / "x.json")])


def brute_force_triplets(edge_index):
    """(i, j, k, index of k->j, index of j->i) for every pair of edges k->j, j->i with k != i, PyG's order."""
    out = []
    src, dst = edge_index.tolist()
    for e, (j, i) in enumerate(zip(src, dst)):
        for k, f in sorted((src[f], f) for f in range(len(src)) if dst[f] == j and src[f] != i):
            out.append((i, j, k, f, e))
    return out


def test_benchmark_processes_flush_denormals(qm9_throughput):
    """Benchmark workers flush denormals to zero (on Intel CPUs they made PyG SchNet's training step 5x slower)."""
    threads = torch.get_num_threads()
    try:
        if not qm9_throughput.set_threads(threads):
            pytest.skip("this CPU cannot flush denormals")
        assert torch.get_num_threads() == threads
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0  # a float32 denormal times one
    finally:
        torch.set_flush_denormal(False)
    assert float(torch.tensor([1e-39]) * 1.0) > 0.0


def test_triplets_match_brute_force(qm9_throughput):
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(9, 3, generator=g) * 4
    adj = (torch.cdist(pos, pos) < 2.5) & ~torch.eye(9, dtype=torch.bool)
    edge_index = adj.nonzero().t()[:, torch.randperm(int(adj.sum()), generator=g)]  # any edge order
    i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = qm9_throughput.triplets(edge_index, 9)
    assert torch.equal(i, edge_index[1]) and torch.equal(j, edge_index[0])
    got = list(zip(idx_i.tolist(), idx_j.tolist(), idx_k.tolist(), idx_kj.tolist(), idx_ji.tolist()))
    assert got == brute_force_triplets(edge_index) and len(got) > 20


def test_dimenet_given_edges_equals_pyg_forward(qm9_throughput, monkeypatch):
    """The subclass's forward == PyG's own DimeNet.forward with radius_graph / triplets swapped for the given ones."""
    import torch_geometric.nn.models.dimenet as dimenet

    _, DimeNetPlusPlusGivenEdges = qm9_throughput.make_pyg_models()
    torch.manual_seed(0)
    model = DimeNetPlusPlusGivenEdges(hidden_channels=16, out_channels=1, num_blocks=2, int_emb_size=8,
                                      basis_emb_size=4, out_emb_channels=16, num_spherical=2, num_radial=3,
                                      output_initializer="glorot_orthogonal")
    z = torch.tensor([6, 1, 1, 8, 1, 7, 1, 1])
    pos = torch.randn(8, 3) * 1.5
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    same = batch[:, None] == batch[None, :]
    edge_index = (same & ~torch.eye(8, dtype=torch.bool)).nonzero().t()
    ours = model(z, pos, batch, edge_index)  # (2, 1)

    monkeypatch.setattr(dimenet, "radius_graph", lambda *args, **kwargs: edge_index)
    monkeypatch.setattr(dimenet, "triplets", qm9_throughput.triplets)
    reference = dimenet.DimeNet.forward(model, z, pos, batch)
    assert ours.shape == (2, 1) and ours.abs().sum() > 0
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


# ------------------------------------------------------------------------------- the suite (python -m benchmarks)


@pytest.fixture(scope="module")
def bench():
    """The benchmarks package, imported from the repository root."""
    import sys

    root = str(BENCHMARKS.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    import benchmarks.flops
    import benchmarks.models
    import benchmarks.peers.painn
    import benchmarks.report
    import benchmarks.suite
    import benchmarks.systems

    return benchmarks


@pytest.mark.slow  # ~50 s: one process per model
def test_suite_quick(bench, tmp_path, monkeypatch):
    """`python -m benchmarks run --quick` on 40 molecules: every table and file exists, skipped peers have a reason.

    schnetpack's PaiNN is reported as unavailable here to check the skip path; nequip runs if installed, else is
    skipped with the reason.
    """
    real = bench.suite.unavailable_reason
    monkeypatch.setattr(bench.suite, "unavailable_reason",
                        lambda name: "not installed (test)" if name == "painn" else real(name))
    models = ["molkern-factorised-l1", "schnet", "painn", "painn-reimpl", "nequip-l1"]
    out = tmp_path / "results"
    result = bench.suite.run(["--quick", "--threads", "1", "--root", str(tmp_path / "qm9"), "--max-molecules", "40",
                              "--models", ",".join(models), "--out", str(out)])
    assert result["settings"]["quick"] and list(result["models"]) == models
    assert result["models"]["painn"]["status"] == "skipped: not installed (test)"
    nequip_missing = real("nequip-l1")
    assert (result["models"]["nequip-l1"]["status"] != "run") == (nequip_missing is not None)
    ran = [m for m in models if result["models"][m]["status"] == "run"]
    assert "painn" not in ran and {"molkern-factorised-l1", "schnet", "painn-reimpl"} <= set(ran)
    assert result["results"]["machine"]["-"]["matmul_gflop_per_s"] > 0
    for name in ran:
        qm9 = result["results"]["qm9"][name]
        assert qm9["status"] == "ok", qm9["status"]
        for key in ("params", "train_energy_mol_per_s", "train_forces_mol_per_s", "inference_mol_per_s",
                    "train_energy_ops", "train_forces_ops"):
            assert qm9[key] > 0, (name, key)
        latency = result["results"]["latency"][name]
        assert latency["status"] == "ok" and latency["latency_ms"] > 0 and latency["md_step_ops"] > 0
        assert latency["threads"] == 1
        points = result["results"]["scaling"][name]["points"]
        assert [p["atoms"] for p in points] == [24, 81] and all(p["us_per_atom"] > 0 for p in points)
    conv = result["results"]["conv"]
    assert list(conv) == ["molkern-factorised-l1"] and conv["molkern-factorised-l1"]["fwd_gflop_per_s"] > 0
    assert any("latency" in t["target"] for t in result["targets"])

    saved = json.loads((out / "benchmarks.json").read_text())
    assert saved["results"].keys() == result["results"].keys()
    table = (out / "benchmarks.md").read_text()
    for heading in ("## Summary", "## Energy+forces cost per atom", "## Convolution", "## Issue 7 targets", "## Method"):
        assert heading in table
    assert "| painn | skipped: not installed (test) |" in table and "| painn-reimpl (re-implementation) |" in table
    assert all(f"| {m} |" in table or f"| {m} (re-implementation) |" in table for m in ran)
    snippet = (out / "README_snippet.md").read_text()
    assert snippet.startswith("### Performance (CPU)") and "python -m benchmarks run --quick" in snippet
    assert (out / "scaling.png").stat().st_size > 0 and (out / "throughput.png").stat().st_size > 0

    (out / "benchmarks.md").unlink()  # `python -m benchmarks report DIR` rebuilds the tables from the JSON
    again = bench.suite.report([str(out)])
    assert again["targets"] == json.loads(json.dumps(result["targets"])) and (out / "benchmarks.md").read_text() == table

    for key in ("wall_time_s", "loadavg_1_5_15_at_end"):  # as saved by a run cut short after the latency task
        del saved["settings"][key]
    del saved["rounds"]["scaling"], saved["rounds"]["conv"]
    (out / "benchmarks.json").write_text(json.dumps(saved))
    bench.suite.report([str(out)])
    table = (out / "benchmarks.md").read_text()
    assert "run cut short" in table and "| molkern-factorised-l1 |" in table


def test_targets_compare_kernels_and_peers(bench):
    """The targets rows: ratios of the rates that ran, in the right direction; missing measurements give no verdict."""
    models = {"molkern-depthwise-l2": {"family": "molkern", "lmax": 2, "kernel": "depthwise", "status": "run"},
              "molkern-standard-l2": {"family": "molkern", "lmax": 2, "kernel": "standard", "status": "run"},
              "nequip-l2": {"family": "nequip", "lmax": 2, "status": "run"}}
    qm9 = {"molkern-depthwise-l2": {"status": "ok", "train_energy_mol_per_s": 600.0, "train_forces_mol_per_s": 200.0},
           "molkern-standard-l2": {"status": "ok", "train_energy_mol_per_s": 300.0},
           "nequip-l2": {"status": "ok", "train_energy_mol_per_s": 150.0, "train_forces_mol_per_s": 80.0}}
    boxes = [(81, 300.0), (192, 200.0), (10125, 210.0)]  # the range starts at 100 atoms
    scaling = {"molkern-depthwise-l2": {"status": "ok", "points": [
        {"status": "ok", "atoms": n, "us_per_atom": us} for n, us in boxes]}}
    results = {"qm9": qm9, "scaling": scaling}
    rows = {r["target"]: r for r in bench.report.targets({"models": models, "results": results})}
    flat = rows["molkern-depthwise-l2 E+F us/atom max/min, 192-10125 atoms"]
    assert flat["value"] == 1.05 and flat["met"] is True
    step = rows["molkern-depthwise-l2 training step time / molkern-standard-l2"]
    assert step["value"] == 0.5 and step["met"] is True
    assert rows["molkern-depthwise-l2 training mol/s / nequip-l2"]["value"] == 4.0
    e_f = rows["molkern-depthwise-l2 E+F training mol/s / nequip-l2"]
    assert e_f["value"] == 2.5 and e_f["met"] is False
    assert rows["molkern-standard-l2 training mol/s / nequip-l2"]["met"] is False  # 2x < 3x
    assert rows["molkern-depthwise-l2 conv fwd GFLOP/s / matmul peak"]["met"] is None  # not measured


def test_suite_rejects_unknown_model(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.suite.run(["--models", "schnet,mace", "--out", str(tmp_path)])


def test_water_box(bench):
    box = bench.systems.water_box(3)
    assert box.num_nodes == 81 and box.z.tolist()[:3] == [8, 1, 1]
    side = 3 * bench.systems.WATER_SPACING
    assert torch.allclose(box.cell[0], torch.eye(3) * side)
    assert (box.pos >= 0).all() and (box.pos < side).all()
    vec = box.pos[box.edge_index[0]] - box.pos[box.edge_index[1]] + box.edge_shift  # (E, 3)
    dist = vec.norm(dim=1)
    assert dist.max() < 5.0 and dist.min() > 0.9  # O-H bonds 0.957 A are the shortest pairs
    assert 30 < box.edge_index.shape[1] / box.num_nodes < 80  # liquid-water density at a 5 A cutoff: ~50


def rotation(seed=0):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.det(q)


def test_painn_invariant_energy_equivariant_forces(bench):
    from torch_geometric.data import Batch, Data

    torch.manual_seed(0)
    model = bench.peers.painn.PaiNN(num_features=16, num_interactions=2, num_rbf=8)
    from ase.build import molecule

    atoms = molecule("CH3OH")  # all pairs well inside the cutoff: the same graph after rotating
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions)
    model.double()

    def energy_forces(p):
        graph = Batch.from_data_list([bench.systems.molecule_graph(z, p)])
        p = graph.pos.requires_grad_(True)
        e = model(graph.z, p, graph.batch, graph.edge_index, graph.edge_shift, 1)
        return e.detach(), -torch.autograd.grad(e.sum(), p)[0]

    R = rotation().double()
    e, f = energy_forces(pos)
    e_rot, f_rot = energy_forces(pos @ R.T)
    torch.testing.assert_close(e_rot, e)
    torch.testing.assert_close(f_rot, f @ R.T)
    assert f.abs().sum() > 0


def periodic_models(bench):
    """name -> energy(batch), small weights; the models whose periodic edge handling is checked."""
    from molkern.train import EnergyModule

    _, DimeNet = bench.qm9_throughput.make_pyg_models()
    SchNet, _ = bench.qm9_throughput.make_pyg_models()
    torch.manual_seed(0)
    schnet = SchNet(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=8, cutoff=5.0)
    dimenet = DimeNet(hidden_channels=16, out_channels=1, num_blocks=1, int_emb_size=8, basis_emb_size=4,
                      out_emb_channels=16, num_spherical=2, num_radial=3, cutoff=5.0)
    painn = bench.peers.painn.PaiNN(num_features=16, num_interactions=2, num_rbf=8)
    molkern = EnergyModule(elements=bench.models.ELEMENTS, model={"num_channels": 8, "num_layers": 2, "lmax": 1,
                                                                   "avg_num_neighbors": 40.0}, data_init=False)
    models = {
        "schnet": lambda b: schnet(b.z, b.pos, b.batch, b.edge_index, b.edge_shift)[:, 0],
        "dimenet++": lambda b: dimenet(b.z, b.pos, b.batch, b.edge_index, b.edge_shift)[:, 0],
        "painn": lambda b: painn(b.z, b.pos, b.batch, b.edge_index, b.edge_shift, b.num_graphs),
        "molkern": molkern.energy,
    }
    for name in ("nequip-l1", "painn"):  # the optional peer packages, when installed
        if bench.models.unavailable_reason(name) is None:
            models[name + " (package)"] = bench.models.build(name, 40.0).energy
    return models


def test_periodic_images_handled_by_every_adapter(bench):
    """Wrapping atoms into a neighbouring cell (another set of edge shifts, same structure) leaves E unchanged."""
    from torch_geometric.data import Batch

    from molkern.data.neighbors import radius_edges

    box = bench.systems.water_box(2)
    side = float(box.cell[0, 0, 0])
    moved = box.clone()
    moved.pos = box.pos.clone()
    moved.pos[::2] += torch.tensor([side, -side, 0.0])  # half of the atoms in another image of the cell
    edge_index, shift = radius_edges(moved.pos, 5.0, box.cell[0], True)
    moved.edge_index, moved.edge_shift = edge_index, shift.float()
    assert not torch.equal(moved.edge_shift, box.edge_shift)
    for name, energy in periodic_models(bench).items():
        e0 = energy(Batch.from_data_list([box]))
        e1 = energy(Batch.from_data_list([moved]))
        torch.testing.assert_close(e1.double(), e0.double(), rtol=1e-4, atol=1e-4, msg=name)


def test_product_flops_counts_nonzero_cg(bench):
    """uvu path 32x1o x 1o -> 0e: 3 non-zero CG entries, 2 FLOPs each plus the weight: 32 * (2 * 3 + 1)."""
    from e3nn import o3

    from molkern.nn.channelwise import ChannelwiseProduct

    assert bench.flops.cg_nnz(1, 1, 0) == 3 and bench.flops.cg_nnz(1, 1, 2) == 11
    tp = ChannelwiseProduct(o3.Irreps("32x1o"), o3.Irreps("1o"), o3.Irreps("1x0e"))
    assert bench.flops.product_flops_per_edge(tp) == 32 * (2 * 3 + 1)
    e3 = o3.FullyConnectedTensorProduct("4x1o", "2x1o", "3x0e", shared_weights=True)
    assert bench.flops.product_flops_per_edge(e3) == 2 * 3 * 4 * 2 + 2 * 4 * 2 * 3 * 1


def test_op_counter_sees_backward(bench):
    from benchmarks.opcount import count_ops

    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(4, 4)
    forward_only = count_ops(lambda: x @ w)
    both = count_ops(lambda: torch.autograd.grad((x @ w).sum(), x))
    assert forward_only["ops"] >= 1 and both["ops"] > forward_only["ops"]
    assert forward_only["matmul_flops"] == 2 * 8 * 4 * 4


def test_painn_reimplementation_equals_schnetpack(bench, monkeypatch):
    """With schnetpack's weights copied in, the re-implementation gives schnetpack PaiNN's energies and forces.

    schnetpack is not a dependency (2.1.1 needs sympy <= 1.12; 2.0.3 imports the private name
    torch.utils.data.dataloader.T_co, gone in torch 2.13): this runs where it is installed by hand, with that
    typing alias put back for the import.
    """
    import typing

    import torch.utils.data.dataloader as dataloader

    if not hasattr(dataloader, "T_co"):
        monkeypatch.setattr(dataloader, "T_co", typing.TypeVar("T_co", covariant=True), raising=False)
    pytest.importorskip("schnetpack")
    from benchmarks.peers.schnetpack_adapter import SchNetPackPaiNN
    from torch_geometric.data import Batch

    torch.manual_seed(0)
    F, T = 16, 2
    ref = SchNetPackPaiNN(num_features=F, num_interactions=T, num_rbf=8).double()
    ours = bench.peers.painn.PaiNN(num_features=F, num_interactions=T, num_rbf=8).double()

    def chunks(t, order):  # reorder the F-row blocks of an output dimension
        return torch.cat([t[k * F:(k + 1) * F] for k in order])

    rep = ref.representation
    with torch.no_grad():
        ours.embedding.weight.zero_()[:100] = rep.embedding.weight
        filt_w, filt_b = rep.filter_net.weight, rep.filter_net.bias  # (T * 3F, rbf), all blocks at once
        for t in range(T):
            # schnetpack splits messages (dq, dmuR, dmumu), ours (x_vv, x_s, x_vs); mixing (V, W) vs ours (U v, V v)
            w, b = filt_w[3 * F * t:3 * F * (t + 1)], filt_b[3 * F * t:3 * F * (t + 1)]
            ours.filters[t].weight.copy_(chunks(w, [2, 0, 1]))
            ours.filters[t].bias.copy_(chunks(b, [2, 0, 1]))
            net = rep.interactions[t].interatomic_context_net
            ours.phi[t][0].load_state_dict(net[0].state_dict())
            ours.phi[t][2].weight.copy_(chunks(net[1].weight, [2, 0, 1]))
            ours.phi[t][2].bias.copy_(chunks(net[1].bias, [2, 0, 1]))
            mix = rep.mixing[t]
            ours.mix_uv[t].weight.copy_(chunks(mix.mu_channel_mix.weight, [1, 0]))
            ours.update[t][0].load_state_dict(mix.intraatomic_context_net[0].state_dict())
            ours.update[t][2].weight.copy_(chunks(mix.intraatomic_context_net[1].weight, [1, 2, 0]))
            ours.update[t][2].bias.copy_(chunks(mix.intraatomic_context_net[1].bias, [1, 2, 0]))
        ours.readout[0].load_state_dict(ref.readout.outnet[0].state_dict())
        ours.readout[2].load_state_dict(ref.readout.outnet[1].state_dict())

    box = bench.systems.water_box(2)
    box.pos, box.edge_shift = box.pos.double(), box.edge_shift.double()
    batch = Batch.from_data_list([box, box])
    pos = batch.pos.requires_grad_(True)
    e_ref = ref(batch)
    e_ours = ours(batch.z, pos, batch.batch, batch.edge_index, batch.edge_shift, 2)
    torch.testing.assert_close(e_ours, e_ref)
    f_ref, f_ours = (torch.autograd.grad(e.sum(), pos)[0] for e in (e_ref, e_ours))
    torch.testing.assert_close(f_ours, f_ref)
    assert e_ref.abs().min() > 0


def test_worker_exit_reason_names_a_silent_kill(bench):
    import subprocess

    killed = subprocess.CompletedProcess([], -9, "", "")
    assert bench.suite._exit_reason(killed) == "worker killed by SIGKILL (likely out of memory)"
    assert bench.suite._exit_reason(subprocess.CompletedProcess([], 1, "", "Traceback: boom\n")) == "Traceback: boom"
    assert "code 3" in bench.suite._exit_reason(subprocess.CompletedProcess([], 3, "", ""))


def test_merge_rounds_keeps_the_best_time_of_every_point():
    """Best over rounds: the smaller time per box (key "ms" too), per-atom costs recomputed from it."""
    from benchmarks.suite import merge_rounds

    rounds = [{"status": "ok", "points": [{"atoms": 100, "ms": 20.0, "compiled_ms": 9.0, "us_per_atom": 200.0}]},
              {"status": "ok", "points": [{"atoms": 100, "ms": 15.0, "compiled_ms": 12.0, "us_per_atom": 150.0}]}]
    point = merge_rounds(rounds)["points"][0]
    assert point["ms"] == 15.0 and point["compiled_ms"] == 9.0 and point["us_per_atom"] == 150.0


def test_merge_rounds_keeps_a_box_measured_in_one_round_only():
    from benchmarks.suite import merge_rounds

    failed = {"atoms": 100, "status": "failed: worker killed by SIGKILL (likely out of memory)"}
    rounds = [{"status": "ok", "points": [{"atoms": 10, "status": "ok", "ms": 1.0}, failed]},
              {"status": "ok", "points": [{"atoms": 10, "status": "ok", "ms": 2.0},
                                          {"atoms": 100, "status": "ok", "ms": 30.0}]}]
    points = merge_rounds(rounds)["points"]
    assert [p["ms"] for p in points] == [1.0, 30.0] and points[1]["us_per_atom"] == 300.0
    assert merge_rounds(rounds[::-1])["points"][1]["ms"] == 30.0


def test_killed_scaling_worker_keeps_the_boxes_it_measured(bench, tmp_path):
    """A worker killed in its second box (as the OOM killer would) leaves the first box's result; the suite keeps
    it and gives the second box the failure."""
    import subprocess
    import sys

    settings = bench.suite.settings_for(bench.suite.parse_args(["--quick", "--root", str(tmp_path / "qm9")]))
    settings["box_sizes"] = [2, 3]
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    out = tmp_path / "rows.json"
    script = (  # the second measurement kills the process with SIGKILL
        "import os, signal, sys\n"
        "import benchmarks.worker as w\n"
        "from benchmarks.__main__ import worker\n"
        "real, calls = w.measure, []\n"
        "def measure(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "w.measure = measure\n"
        f"worker(['scaling', 'schnet', '--settings', {str(tmp_path / 'settings.json')!r}, '--out', {str(out)!r}])\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=BENCHMARKS.parent, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    error = f"failed: {bench.suite._exit_reason(proc)}"
    [row] = bench.suite.worker_rows(out, ["scaling"], "schnet", error)
    assert row["status"] == "ok" and row["cut_short"] == error
    first, second = row["points"]
    assert first["status"] == "ok" and first["us_per_atom"] > 0 and first["atoms"] == 24
    assert second["status"] == "failed: worker killed by SIGKILL (likely out of memory)" and "ms" not in second
    lost = bench.suite.worker_rows(tmp_path / "missing.json", ["qm9", "scaling"], "schnet", error)
    assert [r["status"] for r in lost] == [error, error]
