"""`make demo` (molkern.demo): fit the quick QM9 config, test the best checkpoint, print the MAE table."""

import json
from pathlib import Path

import pytest
import yaml

from molkern.data import QM9
from molkern.demo import CONFIG, main


def test_demo_fits_and_tests_the_quick_config_scaled_down(tmp_path, capsys):
    root = tmp_path / "qm9"
    QM9(root, max_molecules=400, num_workers=1, progress=False)
    config = yaml.safe_load(CONFIG.read_text())  # the real quick config, with smaller data and model
    config["data"]["init_args"].update(root=str(root), max_molecules=400, train_subset=64, val_subset=32,
                                       processing_workers=1)
    config["model"]["init_args"]["model"].update(num_channels=8, num_layers=1)
    config["trainer"].update(max_epochs=1, enable_progress_bar=False)
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(config))

    result = main([], config=str(path))
    report = json.loads((Path(result["log_dir"]) / "test_mae.json").read_text())
    assert set(report["mae"]) == set(QM9.target_names)
    assert report["num_molecules"] == 40  # the whole test part of the first 400 molecules
    assert report["mae"]["homo"]["unit"] == "meV"
    assert result["test"]["test_mae_homo"] == pytest.approx(report["mae"]["homo"]["value"], rel=1e-3)
    assert "Test MAE over 40 molecules" in capsys.readouterr().out
