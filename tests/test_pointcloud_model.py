"""Point-cloud classifier: kNN graphs, index-based downsampling, exact G-invariance of the logits, the sweep."""

import json
import math

import numpy as np
import pytest
import torch
from e3nn import o3
from scipy.spatial import cKDTree

import molkern.groups as groups
from molkern.models.pointcloud import PointCloudClassifier, knn_graph, subsample
from molkern.testing import POSITIONS, assert_equivariant, equivariance_error

SMALL = dict(num_points=(24, 12, 6), k=4, num_channels=4, lmax=1, readout_width=8, head_hidden=8, num_radial=4,
             kernel_mlp_width=4, kernel_trunk_layers=0)  # fmt: skip


def _clouds(num_graphs=2, n=24, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(num_graphs * n, 3, generator=g, dtype=dtype)
    pos = pos / pos.norm(dim=1).max()
    normal = torch.randn(num_graphs * n, 3, generator=g, dtype=dtype)
    normal = normal / normal.norm(dim=1, keepdim=True)
    batch = torch.arange(num_graphs).repeat_interleave(n)
    return pos, normal, batch


def test_knn_graph_matches_brute_force_per_graph():
    pos, _, batch = _clouds(3, 20, seed=1)
    batch = torch.tensor([0] * 20 + [1] * 15 + [2] * 25)  # unequal sizes, contiguous
    edge_index = knn_graph(pos, 5, batch, 3)
    src, dst = edge_index
    assert (src != dst).all() and (batch[src] == batch[dst]).all()
    assert torch.bincount(dst, minlength=60).eq(5).all()  # k incoming edges per target i (PyG: [source, target])
    for g in range(3):
        idx = torch.nonzero(batch == g).flatten()
        _, nbr = cKDTree(pos[idx].numpy()).query(pos[idx].numpy(), 6)
        for a, i in enumerate(idx.tolist()):
            assert set(src[dst == i].tolist()) == set(idx[nbr[a, 1:]].tolist())


def test_knn_graph_small_graphs_connect_all_pairs():
    pos = torch.randn(3, 3)
    edge_index = knn_graph(pos, 10, torch.zeros(3, dtype=torch.long), 1)
    assert edge_index.shape == (2, 6)


def test_subsample_counts_order_and_determinism():
    batch = torch.tensor([0] * 10 + [1] * 3 + [2] * 8)
    keep = subsample(batch, 3, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(batch[keep], minlength=3).tolist() == [5, 3, 5]
    assert (keep.diff() > 0).all()  # sorted: graphs stay contiguous
    assert torch.equal(keep, subsample(batch, 3, 5, torch.Generator().manual_seed(0)))
    assert not torch.equal(keep, subsample(batch, 3, 5, torch.Generator().manual_seed(1)))


GROUPS = ["c1", "so2", "o2", "cinfh", "so3", "o3"]
OUTSIDE = {  # an element outside each proper subgroup (None: O(3) has none)
    "c1": o3.matrix_z(torch.tensor(0.9, dtype=torch.float64)),
    "so2": o3.matrix_x(torch.tensor(math.pi / 2, dtype=torch.float64)),
    "o2": -torch.eye(3, dtype=torch.float64),
    "cinfh": torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)),
    "so3": -torch.eye(3, dtype=torch.float64),
    "o3": None,
}


CASES = [(g, "factorised") for g in GROUPS] + [("so2", "full"), ("o3", "standard")]


@pytest.mark.parametrize("group_name, kernel", CASES)
def test_logits_are_invariant_under_the_group_only(group_name, kernel):
    torch.manual_seed(0)
    group = groups.get(group_name)
    model = PointCloudClassifier(5, group, kernel, **SMALL).double()
    pos, normal, batch = _clouds()
    model.train()  # one pass in training mode so the harmonics' BatchNorm holds non-trivial running statistics
    model(pos, normal, batch, 2)
    model.eval()

    def logits(p, n):
        return model(p, n, batch, 2)  # (2, 5)

    out = logits(pos, normal)
    assert out.shape == (2, 5) and out.abs().max() > 1e-6
    assert_equivariant(logits, group, [pos, normal], [POSITIONS, "1x1o"], "5x0e", num_samples=3,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    if OUTSIDE[group_name] is not None:
        err = equivariance_error(logits, OUTSIDE[group_name][None], [pos, normal], [POSITIONS, "1x1o"], "5x0e")
        assert err.item() > 1e-6, f"{group_name} model should not be invariant to an element outside the group"


def test_training_mode_downsampling_is_random_eval_is_deterministic():
    model = PointCloudClassifier(3, "so2", **SMALL).double()
    pos, normal, batch = _clouds()
    model.eval()
    assert torch.equal(model(pos, normal, batch, 2), model(pos, normal, batch, 2))
    model.train()
    torch.manual_seed(0)
    a = model(pos, normal, batch, 2)
    assert not torch.allclose(a, model(pos, normal, batch, 2))


def test_standard_kernel_rejects_subgroups_and_bad_arguments():
    with pytest.raises(ValueError, match="standard kernel is O\\(3\\)-equivariant only"):
        PointCloudClassifier(3, "so2", "standard", **SMALL)
    with pytest.raises(ValueError, match="kernel must be one of"):
        PointCloudClassifier(3, "so2", "fancy", **SMALL)
    with pytest.raises(ValueError, match="num_points"):
        PointCloudClassifier(3, "so2", **dict(SMALL, num_points=()))


def test_gradients_reach_every_parameter():
    model = PointCloudClassifier(3, "o2", **SMALL)
    pos, normal, batch = _clouds(dtype=torch.float32)
    model(pos, normal, batch, 2).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.numel() and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_sweep_end_to_end_on_a_tiny_procedural_dataset(tmp_path):
    from molkern.experiments import pointcloud_sweep

    config = {
        "procedural": {"root": str(tmp_path / "shapes"), "num_train_per_class": 5, "num_test_per_class": 2,
                       "num_points": 24, "classes": ["box", "torus", "cone"]},
        "groups": ["so2", "o3"], "seeds": [0], "augment": "so2",
        "data": {"num_points": 24, "batch_size": 8},
        "model": SMALL, "optim": {"lr": 1e-2}, "trainer": {"max_epochs": 1},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    pointcloud_sweep.main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--no-progress"])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = {(s["group"], s["kernel"]) for s in result["summary"]}
    assert cells == {("so2", "factorised"), ("o3", "factorised"), ("o3", "standard")}
    assert all(0 <= r["test_acc"] <= 1 for r in result["runs"])
    counts = result["parameter_counts"]["procedural"]
    assert abs(counts["o3/standard"] / counts["o3/factorised"] - 1) < 0.35  # widths matched to similar sizes
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| so2 |" in table and "n/a (not defined)" in table
    assert (tmp_path / "out" / "pointcloud_procedural.png").stat().st_size > 1000
    (tmp_path / "out" / "results.md").unlink()
    pointcloud_sweep.main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--replot"])
    assert (tmp_path / "out" / "results.md").read_text() == table


def test_summarise_and_table():
    from molkern.experiments.pointcloud_sweep import summarise, table

    run = {"dataset": "d", "group": "o3", "kernel": "factorised", "num_parameters": 10}
    runs = [dict(run, test_acc=a) for a in (0.5, 0.7)]
    (s,) = summarise(runs)
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and s["num_seeds"] == 2
    text = table([s], ["so3", "o3"], "factorised")
    assert "60.0 +- 10.0" in text and "= O(3) network" in text
    assert np.isfinite(s["mean"])
