"""Prediction of new molecules through the TaskModule protocol (a tiny stand-in module)."""

import argparse
import csv
import json

import lightning as L
import pytest
import torch

from molkern.data.featurize import embed_smiles
from molkern.predict import (
    add_predict_arguments,
    format_table,
    graph_options,
    predict,
    run_predict,
    write_csv,
    write_json,
    write_predictions,
)

Chem = pytest.importorskip("rdkit.Chem")


class CountingModule(L.LightningModule):
    """Stand-in for a trained module: exact, checkable 'properties' of each graph."""

    property_names = ("atoms", "bonds", "heavy")
    property_units = ("", "", "count")

    def __init__(self, graph="bonds", cutoff=None, edge_attr=None, fail_on_fluorine=False):
        super().__init__()
        self.graph_spec = {"graph": graph, "cutoff": cutoff, "elements": (1, 6, 7, 8, 9)}
        if edge_attr is not None:
            self.graph_spec["edge_attr"] = edge_attr
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.fail_on_fluorine = fail_on_fluorine
        self.seen_edge_attr = []

    def predict_properties(self, batch):
        assert not torch.is_grad_enabled() and not self.training
        if self.fail_on_fluorine and (batch.z == 9).any():
            raise RuntimeError("no fluorine, please")
        self.seen_edge_attr.append(batch.edge_attr.shape[1])
        ones = torch.ones(batch.num_nodes)
        atoms = torch.zeros(batch.num_graphs).index_add_(0, batch.batch, ones)
        heavy = torch.zeros(batch.num_graphs).index_add_(0, batch.batch, (batch.z > 1).float())
        bonded = batch.edge_attr.sum(1) if batch.edge_attr.shape[1] else torch.zeros(batch.edge_index.shape[1])
        bonds = torch.zeros(batch.num_graphs).index_add_(0, batch.batch[batch.edge_index[1]], bonded) / 2
        return torch.stack([atoms, bonds, heavy], dim=1) * self.scale  # (B, 3)


def test_batch_with_a_bad_smiles_predicts_the_rest():
    module = CountingModule()
    module.train()
    rows, failures = predict(module, ["CCO", "C1CC", "c1ccccc1O", "CCCl", "C#N"], batch_size=2)
    assert module.training  # mode restored
    assert [r["input"] for r in rows] == ["CCO", "c1ccccc1O", "C#N"]
    assert [(r["atoms"], r["bonds"], r["heavy"]) for r in rows] == [(9, 8, 3), (13, 13, 7), (3, 2, 2)]
    assert [r["index"] for r in rows] == [0, 2, 4] and rows[0]["num_atoms"] == 9
    assert [f[0] for f in failures] == ["C1CC", "CCCl"]
    assert "cannot be parsed" in failures[0][1] and "Cl outside" in failures[1][1]
    same, _ = predict(module, ["CCO", "C1CC", "c1ccccc1O", "CCCl", "C#N"], batch_size=32)
    assert same == rows
    single, none = predict(module, "CCO")
    assert single[0]["atoms"] == 9 and none == []


def test_prediction_failure_is_isolated():
    module = CountingModule(fail_on_fluorine=True)
    rows, failures = predict(module, ["CCO", "CF", "C"], batch_size=8)
    assert [r["input"] for r in rows] == ["CCO", "C"]
    assert failures == [("CF", "prediction failed: RuntimeError: no fluorine, please")]


def test_graph_spec_drives_featurization():
    assert graph_options(CountingModule()) == {"elements": (1, 6, 7, 8, 9), "graph": "bonds", "cutoff": None,
                                               "edge_attr": "bonds"}
    radius = CountingModule(graph="radius", cutoff=3.0)
    rows, _ = predict(radius, ["CCO"])
    assert rows[0]["bonds"] == 8 and radius.seen_edge_attr == [3]  # bond one-hot on the radius graph
    bare = CountingModule(graph="radius", cutoff=3.0, edge_attr="none")
    rows, _ = predict(bare, ["CCO"])
    assert rows[0]["bonds"] == 0 and bare.seen_edge_attr == [0]
    with pytest.raises(TypeError, match="graph_spec"):
        predict(CountingModule(), ["CCO"], cutoff=5.0)


def test_files_and_options(tmp_path):
    sdf = tmp_path / "two.sdf"
    with Chem.SDWriter(str(sdf)) as w:
        for s in ("CCO", "CC=O"):
            m = embed_smiles(s)[0]
            m.SetProp("_Name", s)
            w.write(m)
    rows, failures = predict(CountingModule(), sdf, kind="sdf")
    assert [(r["name"], r["bonds"]) for r in rows] == [("CCO", 8), ("CC=O", 6)] and not failures
    xyz = tmp_path / "water.xyz"
    xyz.write_text("3\nwater\nO 0 0 0.1173\nH 0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n")
    rows, _ = predict(CountingModule(), [str(xyz)], kind="xyz", smiles="O")
    assert rows[0]["name"] == "water" and rows[0]["bonds"] == 2
    a, _ = predict(CountingModule(), ["OCCCCO"], num_conformers=3, seed=1)
    assert a[0]["atoms"] == 16


def _sample():
    rows = [
        {"index": 0, "input": "CCO", "name": "CCO", "smiles": "CCO", "num_atoms": 9, "homo": -7012.345678, "mu": 1.5},
        {"index": 2, "input": "c1ccccc1O", "name": "c1ccccc1O", "smiles": "c1ccccc1O", "num_atoms": 13,
         "homo": -6123.5, "mu": 0.00012},
    ]
    return rows, ("homo", "mu"), ("meV", "D"), [("C1CC", "cannot be parsed by RDKit")]


def test_format_table():
    rows, names, units, failures = _sample()
    text = format_table(rows, names, units, failures)
    lines = text.splitlines()
    assert lines[0].split() == ["smiles", "homo", "[meV]", "mu", "[D]"]
    assert lines[2].split() == ["CCO", "-7012.3457", "1.5000"]
    assert lines[3].split() == ["c1ccccc1O", "-6123.5000", "0.00012"]
    assert lines[-2:] == ["failed (1):", "  C1CC: cannot be parsed by RDKit"]
    named = format_table([dict(rows[0], name="ethanol")], names, units)
    assert named.splitlines()[0].split()[:2] == ["name", "smiles"] and "failed" not in named
    assert "no molecule predicted" in format_table([], names, units, failures)


def test_writers_are_atomic_and_complete(tmp_path):
    rows, names, units, failures = _sample()
    path = write_csv(tmp_path / "out" / "pred.csv", rows, names, units, failures)
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["index", "input", "name", "smiles", "num_atoms", "homo [meV]", "mu [D]", "error"]
    assert float(table[0]["homo [meV]"]) == rows[0]["homo"] and float(table[1]["mu [D]"]) == rows[1]["mu"]
    assert table[2]["input"] == "C1CC" and table[2]["error"] == "cannot be parsed by RDKit" and table[2]["mu [D]"] == ""
    doc = json.loads(write_json(tmp_path / "pred.json", rows, names, units, failures).read_text())
    assert doc["properties"] == [{"name": "homo", "unit": "meV"}, {"name": "mu", "unit": "D"}]
    assert doc["molecules"] == rows and doc["failures"] == [{"input": "C1CC", "reason": "cannot be parsed by RDKit"}]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["pred.csv", "pred.json"]  # no temp files
    with pytest.raises(ValueError, match="use .csv or .json"):
        write_predictions(tmp_path / "pred.txt", rows, names, units)


def test_cli_run_predict(tmp_path, capsys):
    parser = add_predict_arguments(argparse.ArgumentParser(prog="molkern predict"))
    out = tmp_path / "pred.json"
    xyz = tmp_path / "water.xyz"
    xyz.write_text("3\nwater\nO 0 0 0.1173\nH 0 0.7572 -0.4692\nH 0 -0.7572 -0.4692\n")
    args = parser.parse_args(["--ckpt", "unused.ckpt", "--smiles", "CCO", "C1CC", "--xyz", str(xyz),
                              "--output", str(out)])
    assert run_predict(args, module=CountingModule()) == 0
    printed = capsys.readouterr().out
    assert "atoms" in printed and "heavy [count]" in printed and "C1CC: cannot be parsed" in printed
    doc = json.loads(out.read_text())
    assert [(m["input"], m["index"]) for m in doc["molecules"]] == [("CCO", 0), (f"file '{xyz}'", 2)]
    assert run_predict(parser.parse_args(["--ckpt", "x", "--smiles", "C1CC"]), module=CountingModule()) == 1
    with pytest.raises(SystemExit, match="give molecules"):
        run_predict(parser.parse_args(["--ckpt", "x"]), module=CountingModule())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_predict(parser.parse_args(["--ckpt", str(tmp_path / "none.ckpt"), "--smiles", "C"]))
