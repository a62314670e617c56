"""QM9 training through the `molkern` CLI: loss goes down, checkpoints, resume, test report, DDP == 1 process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from molkern.cli import main
from molkern.data import QM9
from molkern.train import load_module
from molkern.train.checkpoint import load_checkpoint

MODEL = {"num_channels": 8, "lmax": 1, "num_layers": 2, "irreps_edge_attr": "3x0e", "kernel_mlp_width": 4}


@pytest.fixture(scope="module")
def qm9_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qm9")
    QM9(root, max_molecules=400, num_workers=1, progress=False)  # the cache every run below reads
    return root


def write_config(path: Path, root: Path, run_dir: Path, **overrides) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "molkern.train.QM9Module",
                  "init_args": {"targets": ["homo", "U0"], "model": dict(MODEL), "lr": 3e-3}},
        "data": {"class_path": "molkern.train.QM9DataModule",
                 "init_args": {"root": str(root), "max_molecules": 400, "train_subset": 64, "val_subset": 32,
                               "test_subset": 32, "batch_size": 16, "processing_workers": 1}},
        "trainer": {"max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(run_dir), "name": "run"}}]},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        target = config[section]["init_args"] if section in ("model", "data") else config[section]
        target[name] = value
    path.write_text(yaml.safe_dump(config))
    return path


def read_metric(run: Path, name: str):
    with open(run / "metrics.csv") as f:
        return [(int(r["epoch"]), float(r[name])) for r in csv.DictReader(f) if r.get(name)]


def test_fit_lowers_loss_and_checkpoint_round_trips(qm9_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", qm9_root, tmp_path / "runs")
    main(["fit", "--config", str(config)])
    run = tmp_path / "runs" / "run" / "version_0"
    losses = read_metric(run, "train_loss")
    assert losses[-1][1] < losses[0][1], losses
    assert (run / "splits.npz").is_file() and (run / "checkpoints" / "best.ckpt").is_file()

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # must not need pickled objects
    assert ckpt["molkern"]["task"] == "qm9"
    module = load_module(run / "checkpoints" / "last.ckpt")
    assert module.hparams.model["avg_num_neighbors"] > 1.0  # measured on the training set, kept in the file
    again = load_module(run / "checkpoints" / "last.ckpt")
    item = QM9(qm9_root, max_molecules=400, progress=False)[5]
    from torch_geometric.data import Batch

    batch = Batch.from_data_list([item])
    with torch.no_grad():
        assert torch.equal(module.predict_properties(batch), again.predict_properties(batch))
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)


def test_resume_continues_epoch_count(qm9_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", qm9_root, tmp_path / "runs", trainer__max_epochs=1)
    main(["fit", "--config", str(config)])
    last = tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 0
    main(["fit", "--config", str(config), "--trainer.max_epochs", "3", "--ckpt_path", str(last)])
    resumed = tmp_path / "runs" / "run" / "version_1"
    epochs = sorted({e for e, _ in read_metric(resumed, "train_loss")})
    assert epochs == [1, 2]
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["epoch"] == 2


def test_test_command_writes_mae_in_target_units(qm9_root, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", qm9_root, tmp_path / "runs", trainer__max_epochs=1)
    main(["fit", "--config", str(config)])
    best = tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "best.ckpt"
    main(["test", "--config", str(config), "--ckpt_path", str(best)])
    out = tmp_path / "runs" / "run" / "version_1"
    report = json.loads((out / "test_mae.json").read_text())
    assert report["num_molecules"] == 32
    assert report["mae"]["homo"]["unit"] == "meV" and report["mae"]["U0"]["unit"] == "meV"
    # the MAE is that of the checkpoint's predictions in meV, recomputed independently here
    module = load_module(best)
    from torch_geometric.data import Batch
    from molkern.train import QM9DataModule

    dm = QM9DataModule(root=str(qm9_root), max_molecules=400, train_subset=64, val_subset=32, test_subset=32)
    dm.setup("test")
    batch = Batch.from_data_list([dm.parts["test"][i] for i in range(32)])
    with torch.no_grad():
        pred = module.predict_properties(batch)
    true = batch.y[:, [QM9.target_index("homo"), QM9.target_index("U0")]].double()
    mae = (pred - true).abs().mean(0)
    assert report["mae"]["homo"]["value"] == pytest.approx(float(mae[0]), rel=1e-4)
    assert report["mae"]["U0"]["value"] == pytest.approx(float(mae[1]), rel=1e-4)
    assert (out / "parity.png").stat().st_size > 1000
    assert "Test MAE over 32 molecules" in capsys.readouterr().out


@pytest.mark.slow  # one Inductor compilation of the training step (~40 s of CPU)
def test_compiled_training_steps_follow_eager(qm9_root, tmp_path):
    """``--model.compile true``: the same fit (60 molecules: batches of 16, 16, 16, 12) to rounding."""
    runs = {}
    for compile in (False, True):
        config = write_config(tmp_path / f"{compile}.yaml", qm9_root, tmp_path / f"runs_{compile}",
                              trainer__max_epochs=2, data__train_subset=60, model__compile=compile)
        main(["fit", "--config", str(config)])
        runs[compile] = tmp_path / f"runs_{compile}" / "run" / "version_0"
    for metric in ("train_loss", "val_loss"):
        eager, compiled = read_metric(runs[False], metric), read_metric(runs[True], metric)
        assert len(eager) == len(compiled) == 2, (eager, compiled)
        for (_, a), (_, b) in zip(eager, compiled):
            assert b == pytest.approx(a, rel=1e-3), (metric, eager, compiled)
    assert load_module(runs[True] / "checkpoints" / "last.ckpt")._compiled_loss is None


def test_unknown_keys_are_rejected(qm9_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", qm9_root, tmp_path / "runs")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.init_args.learning_rate", "1e-3"])
    bad = write_config(tmp_path / "bad.yaml", qm9_root, tmp_path / "runs", model__model={**MODEL, "widht": 3})
    with pytest.raises((SystemExit, ValueError), match="widht|unknown"):
        main(["fit", "--config", str(bad)])


def test_ddp_two_processes_match_one(qm9_root, tmp_path):
    """2 CPU processes (gloo) with half the batch each take the same step as 1 process with the whole batch.

    One optimizer step is compared: Adam's update ~ lr * sign(grad) turns float round-off in near-zero
    gradients into lr-sized differences over later steps, so equality after many steps is not expected.
    """
    finals = {}
    for devices, batch_size in ((1, 16), (2, 8)):
        run_dir = tmp_path / f"runs{devices}"
        config = write_config(
            tmp_path / f"c{devices}.yaml", qm9_root, run_dir, trainer__max_epochs=1,
            data__train_subset=16, data__batch_size=batch_size, data__shuffle=False, model__data_init=False,
            model__model={**MODEL, "kernel_batch_norm": False},
        )
        cmd = [sys.executable, "-m", "molkern", "fit", "--config", str(config), "--trainer.devices", str(devices)]
        if devices > 1:
            cmd += ["--trainer.strategy", "ddp"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = load_checkpoint(run_dir / "run" / "version_0" / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 1
        finals[devices] = ckpt["state_dict"]
    for key, value in finals[1].items():
        torch.testing.assert_close(finals[2][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_ema_of_weights_is_what_the_checkpoint_serves(qm9_root, tmp_path):
    config = write_config(tmp_path / "c.yaml", qm9_root, tmp_path / "runs", trainer__max_epochs=1)
    ema = tmp_path / "ema.yaml"
    ema.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}}]}}))
    main(["fit", "--config", str(config), "--config", str(ema)])
    last = tmp_path / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    key = "model.readout.mlp.layers.0.weight"
    key = key if key in ckpt["state_dict"] else next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    assert not torch.equal(ckpt["state_dict"][key], ckpt["current_model_state"][key])  # averaged != raw
    module = load_module(last)
    torch.testing.assert_close(module.state_dict()[key], ckpt["state_dict"][key])
