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
