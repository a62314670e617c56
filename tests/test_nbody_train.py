"""N-body training: models, parameter matching, equivariance on the data, tiny training runs."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from e3nn import o3

import molkern.groups as groups
from molkern.data import NBody
from molkern.testing import POSITIONS, assert_equivariant, equivariance_error
from molkern.train import GROUPS, NBodyDataModule, NBodyModule, build_nbody_model, parameter_counts, train_nbody
from molkern.train.nbody import _BASELINE_WIDTHS, rescale_blocks, velocity_features


@pytest.fixture(scope="module")
def data64(tmp_path_factory):
    """One float64 N-body system at k = 2 (pos, node_attr, edge_index, edge_attr)."""
    ds = NBody(tmp_path_factory.mktemp("nbody"), "test", stiffness=2.0, num_samples=2, dtype=torch.float64)
    d = ds[1]
    return d.pos, d.node_attr, d.edge_index, d.edge_attr


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_velocity_features_speed_and_unit_direction():
    node_attr = torch.tensor([[0.3, 3.0, 0.0, 4.0], [0.7, 0.0, 0.0, 0.0]])
    f = velocity_features(node_attr)
    assert f.shape == (2, 5)
    torch.testing.assert_close(f[0], torch.tensor([0.3, 5.0, 0.6, 0.0, 0.8]))
    torch.testing.assert_close(f[1], torch.tensor([0.7, 0.0, 0.0, 0.0, 0.0]))  # v = 0: no NaN


def test_baseline_init_does_not_depend_on_the_width_cache():
    kwargs = {"num_channels": 4, "num_layers": 1}
    _BASELINE_WIDTHS.clear()
    torch.manual_seed(0)
    first = build_nbody_model("baseline", **kwargs)  # searches the width (builds other models)
    torch.manual_seed(0)
    second = build_nbody_model("baseline", **kwargs)  # width from the cache
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_parameter_counts_within_ten_percent():
    counts = parameter_counts()
    assert set(counts) == set(GROUPS)
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts


def _displacement(model, edge_index, edge_attr):
    return lambda pos, node_attr: model(pos, node_attr, edge_index, edge_attr)


@pytest.mark.parametrize("name", ["o3", "so2", "o2"])
def test_model_equivariant_on_nbody_data(name, data64, float64):
    pos, node_attr, edge_index, edge_attr = data64
    torch.manual_seed(0)
    model = build_nbody_model(name).eval()
    func = _displacement(model, edge_index, edge_attr)
    assert_equivariant(func, groups.get(name), [pos, node_attr], [POSITIONS, "1x0e+1x1o"], "1x1o")


def test_so2_model_not_equivariant_outside_so2(data64, float64):
    pos, node_attr, edge_index, edge_attr = data64
    torch.manual_seed(0)
    model = build_nbody_model("so2").eval()
    R = o3.matrix_x(torch.tensor(math.pi / 2, dtype=torch.float64))[None]
    func = _displacement(model, edge_index, edge_attr)
    err = equivariance_error(func, R, [pos, node_attr], [POSITIONS, "1x0e+1x1o"], "1x1o")
    assert float(err[0]) > 1e-5


def _mse(module, loader):
    module.eval()
    with torch.no_grad():
        return sum(F.mse_loss(module(b), b.y, reduction="sum").item() for b in loader) / sum(
            b.y.numel() for b in loader
        )


@pytest.mark.parametrize("name", ["so2", "baseline"])
def test_tiny_training_lowers_loss(name, tmp_path):
    L.seed_everything(0, verbose=False)
    dm = NBodyDataModule(str(tmp_path), 2.0, num_train=40, num_val=20, num_test=20, batch_size=10)
    dm.prepare_data()
    dm.setup("fit")
    module = NBodyModule(name, model={"num_channels": 8, "num_layers": 2}, lr=3e-3)
    rescale_blocks(module.model, next(iter(dm.train_dataloader())))
    before = _mse(module, dm.train_dataloader())
    module.train()
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    after = _mse(module, dm.train_dataloader())
    assert after < before, (before, after)


def test_train_nbody_reports_test_mse_at_best_val(tmp_path):
    r = train_nbody("baseline", 0.0, str(tmp_path), seed=0, max_epochs=2, check_val_every_n_epoch=1,
                    data={"num_train": 20, "num_val": 10, "num_test": 10, "batch_size": 10}, progress=False)
    assert r["group"] == "baseline" and r["best_epoch"] in (0, 1)
    assert [e for e, _ in r["val_curve"]] == [0, 1]
    assert r["best_val_mse"] == min(v for _, v in r["val_curve"])
    assert math.isfinite(r["test_mse"]) and math.isfinite(r["best_val_mse"])


def _sweep_config(tmp_path, seeds):
    import yaml

    config = {
        "data_root": str(tmp_path / "data"), "stiffness": [0, 2], "groups": ["baseline"], "seeds": seeds,
        "data": {"num_train": 20, "num_val": 10, "num_test": 10, "batch_size": 10},
        "model": {"num_channels": 4, "num_layers": 1},
        "trainer": {"max_epochs": 2, "check_val_every_n_epoch": 1},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_sweep_writes_results_and_resumes_with_more_seeds(tmp_path):
    import json

    from molkern.experiments import nbody_sweep

    out = tmp_path / "out"
    nbody_sweep.main(["--config", _sweep_config(tmp_path, [0]), "--out", str(out), "--no-progress"])
    first = json.loads((out / "results.json").read_text())
    assert [(r["stiffness"], r["seed"]) for r in first["runs"]] == [(0.0, 0), (2.0, 0)]
    assert {s["num_seeds"] for s in first["summary"]} == {1} and (out / "nbody_sweep.png").exists()

    nbody_sweep.main(["--config", _sweep_config(tmp_path, [0, 1]), "--out", str(out), "--no-progress", "--resume"])
    second = json.loads((out / "results.json").read_text())
    assert [(r["stiffness"], r["seed"]) for r in second["runs"]] == [(0.0, 0), (2.0, 0), (0.0, 1), (2.0, 1)]
    assert second["runs"][:2] == first["runs"]  # kept, not retrained
    assert {s["num_seeds"] for s in second["summary"]} == {2}
    (out / "nbody_sweep.png").unlink()
    nbody_sweep.main(["--config", _sweep_config(tmp_path, [0, 1]), "--out", str(out), "--replot"])
    assert (out / "nbody_sweep.png").exists()
    assert json.loads((out / "results.json").read_text()) == second  # replot trains nothing


@pytest.mark.slow
def test_sweep_runs_identical_with_two_jobs(tmp_path):
    """Two worker processes (spawned, fresh width caches) give exactly the runs of one process."""
    import json

    from molkern.experiments import nbody_sweep

    config = _sweep_config(tmp_path, [0])
    results = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        nbody_sweep.main(["--config", config, "--out", str(out), "--no-progress", "--jobs", str(jobs)])
        runs = json.loads((out / "results.json").read_text())["runs"]
        results.append([(r["stiffness"], r["test_mse"], r["val_curve"]) for r in runs])
    assert results[0] == results[1]
