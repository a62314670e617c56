"""Energy/force training: ASE files as datasets, splits, fitted shifts, a tiny EMT run, checkpoint -> calculator."""

import json

import ase.io
import lightning as L
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron
from torch_geometric.loader import DataLoader

from molkern.calculator import MolkernCalculator
from molkern.data.atoms import AtomsDataset
from molkern.train.checkpoint import load_module
from molkern.train.energy import AtomsDataModule, EnergyModule, energy_forces_stress

MODEL = dict(cutoff=4.0, num_channels=8, lmax=1, num_layers=2, num_radial=6, kernel_mlp_width=4)


def labelled(atoms, stress=True):
    atoms = atoms.copy()
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if stress:
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def emt_frames(num_bulk=16, num_cluster=4, seed=0):
    """Rattled, strained 4-atom Cu cells (periodic, with stress) and rattled 13-atom Cu icosahedra."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(num_bulk):
        atoms = bulk("Cu", "fcc", a=3.61 * rng.uniform(0.97, 1.03), cubic=True)
        atoms.rattle(0.1, seed=int(rng.integers(2**31)))
        frames.append(labelled(atoms))
    for k in range(num_cluster):
        atoms = Icosahedron("Cu", 2)
        atoms.rattle(0.1, seed=int(rng.integers(2**31)))
        frames.append(labelled(atoms, stress=False))
    return frames


@pytest.fixture(scope="module")
def emt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("emt") / "cu.extxyz"
    ase.io.write(path, emt_frames(), format="extxyz")
    return path


# ---------------------------------------------------------------------------------------------- dataset


def test_dataset_fields_and_periodic_edges(emt_file):
    ds = AtomsDataset(emt_file, elements=["Cu"], cutoff=4.0)
    assert len(ds) == 20 and ds.elements == (29,)
    d = ds[0]
    assert d.pos.shape == (4, 3) and d.node_attr.shape == (4, 1) and d.forces.shape == (4, 3)
    assert d.energy.dtype == torch.float64 and d.stress.shape == (1, 3, 3) and bool(d.has_stress)
    assert not bool(ds[19].has_stress) and not bool(ds[19].pbc.any())
    vec = d.pos[d.edge_index[0]] - d.pos[d.edge_index[1]] + d.edge_shift  # (E, 3)
    frame = ase.io.read(emt_file, index=0)
    from ase.neighborlist import neighbor_list

    ref = np.sort(neighbor_list("d", frame, 4.0))
    np.testing.assert_allclose(np.sort(vec.norm(dim=1).numpy()), ref, atol=1e-5)
    np.testing.assert_allclose(d.stress[0].numpy(), frame.get_stress(voigt=False), atol=1e-7)


def test_dataset_cache_round_trip(emt_file, tmp_path):
    a = AtomsDataset(emt_file, elements=["Cu"], cutoff=4.0, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("atoms-*.pt"))) == 1
    b = AtomsDataset(emt_file, elements=["Cu"], cutoff=4.0, cache_dir=tmp_path / "cache")
    assert len(a) == len(b) and b.sources == a.sources
    for key in ("pos", "edge_index", "edge_shift", "energy", "forces", "stress"):
        assert torch.equal(a[3][key], b[3][key]), key


def test_dataset_errors_name_the_file(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    no_energy = tmp_path / "no_energy.extxyz"
    ase.io.write(no_energy, atoms, format="extxyz")
    with pytest.raises(ValueError, match=r"no_energy.extxyz frame 0: no energy"):
        AtomsDataset(no_energy, elements=["Cu"], cutoff=4.0)
    no_forces = tmp_path / "no_forces.extxyz"
    atoms.info["energy"] = -1.0
    ase.io.write(no_forces, atoms, format="extxyz")
    with pytest.raises(ValueError, match=r"no_forces.extxyz frame 0: no forces"):
        AtomsDataset(no_forces, elements=["Cu"], cutoff=4.0)
    assert len(AtomsDataset(no_forces, elements=["Cu"], cutoff=4.0, require_forces=False)) == 1
    with pytest.raises(ValueError, match=r"no_forces.extxyz frame 0: element\(s\) \['Cu'\] not in"):
        AtomsDataset(no_forces, elements=["Pt"], cutoff=4.0, require_forces=False)
    with pytest.raises(FileNotFoundError, match="missing.extxyz"):
        AtomsDataset(tmp_path / "missing.extxyz", cutoff=4.0)


def test_datamodule_splits_are_seeded_and_saved(emt_file, tmp_path):
    def split(seed):
        dm = AtomsDataModule(str(emt_file), elements=["Cu"], cutoff=4.0, train_fraction=0.6, val_fraction=0.2,
                             test_fraction=0.2, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = split(0), split(0), split(1)
    assert a.split_indices == b.split_indices != c.split_indices
    sizes = {k: len(v) for k, v in a.split_indices.items()}
    assert sizes == {"train": 12, "val": 4, "test": 4}
    assert not set(a.split_indices["train"]) & set(a.split_indices["val"])
    saved = json.loads(a.save_split(tmp_path / "split.json").read_text())
    assert saved["val"] == a.split_indices["val"] and len(saved["sources"]) == 20
    with pytest.raises(ValueError, match="fractions"):
        AtomsDataModule(str(emt_file), train_fraction=0.8, val_fraction=0.3)


# -------------------------------------------------------------------------------------------- the module


def test_species_energies_are_least_squares(tmp_path):
    rng = np.random.default_rng(0)
    frames = []
    for k in range(12):
        n_cu, n_pt = int(rng.integers(1, 6)), int(rng.integers(0, 6))
        atoms = bulk("Cu", "fcc", a=3.6) * (n_cu + n_pt, 1, 1)
        atoms.numbers[:n_pt] = 78
        atoms.calc = SinglePointCalculator(atoms, energy=-1.5 * n_cu - 4.0 * n_pt,
                                           forces=np.full((len(atoms), 3), 0.3))
        frames.append(atoms)
    path = tmp_path / "linear.extxyz"
    ase.io.write(path, frames, format="extxyz")
    ds = AtomsDataset(path, elements=["Cu", "Pt"], cutoff=3.0)
    module = EnergyModule(["Cu", "Pt"], model=dict(MODEL, cutoff=3.0))
    stats = module.fit_statistics(DataLoader(ds, batch_size=5))
    np.testing.assert_allclose(module.species_energy.numpy(), [-1.5, -4.0], atol=1e-9)
    assert stats["energy_scale"] == pytest.approx(0.3) and float(module.energy_scale) == pytest.approx(0.3)
    assert bool(module.fitted)


def test_module_rejects_config_it_sets():
    with pytest.raises(ValueError, match="irreps_out"):
        EnergyModule(["Cu"], model={"irreps_out": "2x0e"})
    with pytest.raises(ValueError, match="unknown model config"):
        EnergyModule(["Cu"], model={"num_chanels": 8})


def _trainer(tmp_path, epochs):
    return L.Trainer(max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     accelerator="cpu")


def _train_loss(module, loader):
    module.eval()
    total, n = 0.0, 0
    for batch in loader:
        loss, _ = module.loss_and_metrics(batch)
        total, n = total + float(loss) * batch.num_graphs, n + batch.num_graphs
    return total / n


def test_training_lowers_the_loss_and_checkpoint_reproduces_energies(emt_file, tmp_path):
    torch.manual_seed(0)
    dm = AtomsDataModule(str(emt_file), elements=["Cu"], cutoff=4.0, train_fraction=0.8, val_fraction=0.2,
                         test_fraction=0.0, batch_size=4)
    module = EnergyModule(["Cu"], model=MODEL, forces_weight=1.0, stress_weight=1.0, lr=3e-3, scheduler="none")
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, datamodule=dm)  # fits shifts, scale, avg_num_neighbors, LSUV; one epoch
    assert bool(module.fitted) and module.hparams.model["avg_num_neighbors"] > 5
    assert (tmp_path / "split_indices.json").is_file()
    loader = DataLoader(dm.train_dataset, batch_size=8)
    before = _train_loss(module, loader)
    trainer = _trainer(tmp_path, 4)
    trainer.fit(module, datamodule=dm)
    after = _train_loss(module, loader)
    print(f"train loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)
    for key in ("val_loss", "val_energy_mae", "val_forces_mae", "val_stress_mae"):
        assert np.isfinite(float(trainer.callback_metrics[key])), key

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert raw["molkern"]["task"] == "energy"
    loaded = load_module(path)
    assert torch.equal(loaded.species_energy, module.species_energy)
    fresh = EnergyModule(["Cu"], model=MODEL)  # avg_num_neighbors "auto": restored from the state_dict
    fresh.load_state_dict(raw["state_dict"])
    assert fresh.model.blocks[0].conv.avg_num_neighbors == module.hparams.model["avg_num_neighbors"] > 5
    module.eval()
    batch = next(iter(DataLoader(dm.parts["val"], batch_size=4)))
    ref = energy_forces_stress(module, batch, forces=True, stress=True)
    calc = MolkernCalculator.from_checkpoint(path)
    frames = [ase.io.read(emt_file, index=dm.split_indices["val"][k]) for k in range(4)]
    for k, atoms in enumerate(frames):
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"][k]), abs=1e-5)
        rows = batch.batch == k
        np.testing.assert_allclose(atoms.get_forces(), ref["forces"][rows].numpy(), atol=1e-5)
        if atoms.pbc.all():
            np.testing.assert_allclose(atoms.get_stress(voigt=False), ref["stress"][k].numpy(), atol=1e-6)

    from molkern.experiments import emt_md  # the MD / relaxation comparison runs on this checkpoint

    result = emt_md.main(["--ckpt", str(path), "--out", str(tmp_path / "md"), "--quick"])
    saved = json.loads((tmp_path / "md" / "emt_md.json").read_text())
    assert saved["checkpoint"] == str(path) and saved["compiled"] is False
    print(json.dumps(result)[:300])


@pytest.mark.parametrize("name", ["emt_cu", "emt_cluster"])
def test_emt_configs_parse(name, tmp_path, monkeypatch):
    from pathlib import Path

    from molkern.cli import lightning_main

    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    monkeypatch.chdir(tmp_path)  # loggers would create runs/ here
    cli = lightning_main(["--config", str(path)], run=False)
    assert isinstance(cli.model, EnergyModule) and isinstance(cli.datamodule, AtomsDataModule)
    assert cli.model.elements == (29,) and cli.model.graph_spec["cutoff"] == cli.datamodule.hparams.cutoff
