"""The fixed-budget accuracy benchmark (benchmarks/fixed_budget.py) in quick mode on 300 bundled QM9 molecules."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # the benchmarks package lives at the repository root, outside the installed molkern
    sys.path.insert(0, ROOT)

from benchmarks.fixed_budget import LR, lr_factor, main, parse_args  # noqa: E402


def test_lr_schedule_follows_budget():
    assert lr_factor(0.0) == pytest.approx(0.01)
    assert lr_factor(0.05) == pytest.approx(1.0)
    assert lr_factor(1.0) == pytest.approx(0.01)
    assert lr_factor(2.0) == pytest.approx(0.01)
    values = [lr_factor(k / 100) for k in range(5, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically after the warm-up


def test_args():
    args = parse_args(["--quick", "--lr", "schnet=5e-4"])
    assert args.budget_s == 15 and args.test_subset == 500
    assert args.lr_map == {**LR, "schnet": 5e-4}
    full = parse_args([])
    assert full.budget_s == 1200 and full.test_subset is None and full.val_subset == 1000


@pytest.mark.slow
def test_quick_run(tmp_path, capsys):
    out = tmp_path / "results" / "fixed_budget.json"
    budget = 2.0
    main(["--quick", "--budget-s", str(budget), "--threads", "1", "--val-every", "0.5", "--root", str(tmp_path / "qm9"),
          "--max-molecules", "300", "--out", str(out)])
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert "test MAE" in capsys.readouterr().out
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == set(LR)
    for name, row in rows.items():
        assert row["status"] == "ok", row["status"]
        assert math.isfinite(row["test_mae_mev"]) and row["test_mae_mev"] > 0
        assert row["n_test"] > 0 and row["n_train"] > 0
        # the budget was spent and training stopped within one step of it
        assert row["steps"] > 0 and row["molecules_seen"] > 0
        assert budget <= row["budget_used_s"] <= budget + row["max_step_s"] + 1e-9
        assert row["val_curve"] and row["val_curve"][-1]["budget_s"] == row["budget_used_s"]
        assert row["best_val_mae_mev"] == min(p["val_mae_mev"] for p in row["val_curve"])
    assert rows["molkern"]["kernel"]
    assert not list(out.parent.glob(".*tmp*"))  # atomic writes left no temporary files


@pytest.mark.slow  # one Inductor compilation of a one-block molkern model
def test_compiled_molkern_run(tmp_path):
    """--compile: molkern's first step traces and compiles (counted in the budget); the run trains and tests."""
    # the budget leaves room for steps after a cold compilation on a loaded 2-core machine (41 s seen)
    out = tmp_path / "fixed_budget.json"
    main(["--quick", "--budget-s", "90", "--threads", "1", "--val-every", "1", "--models", "molkern", "--compile",
          "--molkern", "lmax=1,num_channels=8,num_layers=1", "--root", str(tmp_path / "qm9"),
          "--max-molecules", "300", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok", row["status"]
    assert row["compiled"] and row["first_step_s"] == row["max_step_s"]  # the compiling step is the longest
    assert row["budget_used_s"] >= row["first_step_s"] and row["steps"] > 1
    assert math.isfinite(row["test_mae_mev"])
    assert "molkern (compiled)" in out.with_suffix(".md").read_text()
