"""Featurizer: SMILES / RDKit / ase.Atoms / sdf / mol / xyz -> the same graphs as the QM9 loader."""

from pathlib import Path

import numpy as np
import pytest
import torch

from molkern.data import QM9
from molkern.data.bonds import perceive_bonds
from molkern.data.featurize import (
    FeaturizationError,
    embed_smiles,
    featurize_file,
    featurize_many,
    from_atoms,
    from_file,
    from_rdkit,
    from_smiles,
)
from molkern.data.graph import atom_one_hot, molecule_edges

Chem = pytest.importorskip("rdkit.Chem")
ase = pytest.importorskip("ase")
import ase.build  # noqa: E402

FIELDS = {"z", "pos", "node_attr", "edge_index", "edge_attr", "name", "smiles"}


@pytest.fixture(scope="module")
def qm9_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qm9")
    QM9(root, max_molecules=20, num_workers=1, progress=False)  # builds the cache once
    return root


def _same_graph(a, b, pos_atol=0.0):
    assert torch.equal(a.z, b.z)
    assert torch.equal(a.node_attr, b.node_attr)
    assert torch.equal(a.edge_index, b.edge_index)
    assert torch.equal(a.edge_attr, b.edge_attr)
    assert a.pos.dtype == b.pos.dtype == torch.float32
    assert torch.allclose(a.pos, b.pos, atol=pos_atol, rtol=0)


def _sdf_block(mol, name):
    mol = Chem.Mol(mol)
    mol.SetProp("_Name", name)
    return Chem.MolToMolBlock(mol) + "$$$$\n"


def _xyz_block(z, pos, comment=""):
    lines = [str(len(z)), comment]
    lines += [f"{Chem.GetPeriodicTable().GetElementSymbol(int(a))} {x:.8f} {y:.8f} {w:.8f}" for a, (x, y, w) in zip(z, pos)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- shared path with QM9


def test_same_graphs_as_qm9_items(qm9_root, tmp_path):
    ds = QM9(qm9_root, max_molecules=20, progress=False)
    assert ds.cache_status == "loaded"
    for item in ds:  # ase.Atoms of the QM9 structure + its SMILES -> the QM9 item
        atoms = ase.Atoms(numbers=item.z.numpy(), positions=item.pos.double().numpy())
        data = from_atoms(atoms, smiles=item.smiles)
        _same_graph(data, item)
        assert set(data.keys()) == FIELDS and set(item.keys()) == FIELDS | {"y", "idx"}
        assert data.smiles == item.smiles
    # three molecules with a triple, a double and only single bonds, through RDKit and sdf / xyz files
    for k in (4, 11, 16):
        item = ds[k]
        mol = perceive_bonds(item.z.tolist(), item.pos.double().numpy(), smiles=item.smiles)
        _same_graph(from_rdkit(mol), item)
        sdf = tmp_path / f"{item.name}.sdf"
        sdf.write_text(_sdf_block(mol, item.name))
        data = from_file(sdf)
        _same_graph(data, item, pos_atol=1e-4)  # molfile coordinates have 4 decimals
        assert data.name == item.name
        xyz = tmp_path / f"{item.name}.xyz"
        xyz.write_text(_xyz_block(item.z.tolist(), item.pos.double().numpy(), item.name))
        _same_graph(from_file(xyz, smiles=item.smiles), item, pos_atol=1e-7)
        _same_graph(from_file(xyz), item, pos_atol=1e-7)  # these small ones need no template


def test_same_radius_graphs_as_qm9(qm9_root):
    ds = QM9(qm9_root, max_molecules=20, graph="radius", cutoff=2.5, progress=False)
    for item in (ds[3], ds[13], ds[19]):
        atoms = ase.Atoms(numbers=item.z.numpy(), positions=item.pos.numpy())
        _same_graph(from_atoms(atoms, smiles=item.smiles, graph="radius", cutoff=2.5), item)


# ---------------------------------------------------------------------------------------------- SMILES


def test_from_smiles_fields_and_bonds():
    d = from_smiles("CCO")
    assert set(d.keys()) == FIELDS
    assert d.name == "CCO" and d.smiles == "CCO"
    assert d.z.tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]
    assert d.z.dtype == torch.long and d.pos.shape == (9, 3) and d.pos.dtype == torch.float32
    assert torch.equal(d.node_attr, atom_one_hot(d.z))
    assert d.node_attr.shape == (9, 5) and d.edge_attr.shape == (16, 3)
    assert d.edge_attr.sum(0).tolist() == [16, 0, 0]
    n = d.num_nodes
    key = d.edge_index[0] * n + d.edge_index[1]
    assert torch.equal(key, key.sort().values)  # sorted by source, then target, as QM9
    bond = (d.pos[d.edge_index[0]] - d.pos[d.edge_index[1]]).norm(dim=1)
    assert ((bond > 0.9) & (bond < 1.6)).all()  # relaxed geometry in Angstrom


def test_aromatic_rings_are_kekulized():
    d = from_smiles("c1ccccc1O")
    assert d.edge_attr.sum(0).tolist() == [2 * 10, 2 * 3, 0]  # 6 C-H / C-O / O-H + 3 ring single; 3 double


def test_radius_graph_carries_bond_types():
    bonds = from_smiles("C#CC=O")
    wide = from_smiles("C#CC=O", graph="radius", cutoff=3.0)
    assert torch.equal(wide.pos, bonds.pos)
    n = bonds.num_nodes
    table = {(int(s), int(t)): a for s, t, a in zip(*bonds.edge_index, bonds.edge_attr)}
    assert wide.edge_index.shape[1] > bonds.edge_index.shape[1]
    for s, t, a in zip(*wide.edge_index, wide.edge_attr):
        assert torch.equal(a, table.get((int(s), int(t)), torch.zeros(3)))
    assert len(table) == int(wide.edge_attr.sum())  # every bond (all shorter than 3 A) is present
    key = wide.edge_index[0] * n + wide.edge_index[1]
    assert torch.equal(key, key.sort().values)
    bare = from_smiles("C#CC=O", graph="radius", cutoff=3.0, edge_attr="none")
    assert torch.equal(bare.edge_index, wide.edge_index) and bare.edge_attr.shape == (wide.edge_attr.shape[0], 0)
    with pytest.raises(ValueError, match="cutoff"):
        from_smiles("CCO", graph="radius")
    with pytest.raises(ValueError, match="graph must be"):
        from_smiles("CCO", graph="knn")


def test_seeded_embedding_is_deterministic():
    a, b = from_smiles("CC(=O)NC1CCCC1", seed=3), from_smiles("CC(=O)NC1CCCC1", seed=3)
    assert torch.equal(a.pos, b.pos)
    c = from_smiles("CC(=O)NC1CCCC1", seed=4)
    assert not torch.allclose(a.pos, c.pos, atol=1e-3)
    m1, i1 = embed_smiles("OCC(O)CO", seed=0, num_conformers=4)
    m2, i2 = embed_smiles("OCC(O)CO", seed=0, num_conformers=4)
    assert i1 == i2 and np.array_equal(m1.GetConformer().GetPositions(), m2.GetConformer().GetPositions())


def test_several_conformers_keep_the_lowest_mmff_energy():
    from rdkit.Chem import rdForceFieldHelpers as FF

    mol, info = embed_smiles("CCOC(=O)CCCN", seed=0, num_conformers=6)
    energies = info["energies"]
    assert info["force_field"] == "MMFF94" and len(energies) == 6
    assert max(energies) - min(energies) > 0.5  # distinct conformers (seed 0 must not repeat one)
    assert info["energy"] == min(energies) and energies[info["conformer"]] == min(energies)
    assert mol.GetNumConformers() == 1
    ff = FF.MMFFGetMoleculeForceField(mol, FF.MMFFGetMoleculeProperties(mol))
    assert ff.CalcEnergy() == pytest.approx(info["energy"], abs=1e-6)
    single, one = embed_smiles("CCOC(=O)CCCN", seed=0)
    assert one["energy"] >= info["energy"] - 1e-9
    d = from_smiles("CCOC(=O)CCCN", num_conformers=6)
    assert np.allclose(d.pos.numpy(), mol.GetConformer().GetPositions(), atol=1e-6)


def test_uff_fallback_and_forced_force_fields():
    # MMFF94 has no boron type: "auto" falls back to UFF
    mol, info = embed_smiles("B(C)(C)C")
    assert info["force_field"] == "UFF" and info["converged"]
    d = from_smiles("B(C)(C)C", elements=(1, 5, 6))
    assert d.node_attr.shape == (13, 3) and d.node_attr.sum(0).tolist() == [9, 1, 3]
    with pytest.raises(FeaturizationError, match=r"SMILES 'B\(C\)\(C\)C': MMFF94 cannot type"):
        embed_smiles("B(C)(C)C", force_field="mmff")
    assert embed_smiles("O=O")[1]["force_field"] == "UFF"  # in the QM9 vocabulary too: MMFF has no O2 type
    assert embed_smiles("CCO", force_field="uff")[1]["force_field"] == "UFF"
    none = embed_smiles("CCO", force_field="none")[1]
    assert none["force_field"] == "none" and none["energy"] is None
    with pytest.raises(ValueError, match="force_field"):
        embed_smiles("CCO", force_field="gaff")


@pytest.mark.parametrize(
    "smiles, message",
    [
        ("C1CC", "cannot be parsed"),
        ("CC(C", "cannot be parsed"),
        ("C(C)(C)(C)(C)C", "cannot be parsed"),  # pentavalent carbon
        ("C[Si](C)(C)C", r"element\(s\) Si outside the model's element vocabulary \(H, C, N, O, F\)"),
        ("CCS", r"element\(s\) S outside"),
        ("ClCCl", r"element\(s\) Cl outside"),
        ("", "empty molecule"),
        ("F[C@]12C[C@@]1(F)C2", "3D embedding .* failed"),  # impossible stereochemistry
    ],
)
def test_bad_smiles_errors_name_the_input(smiles, message):
    with pytest.raises(FeaturizationError, match=message) as err:
        from_smiles(smiles, max_attempts=2)
    assert str(err.value).startswith(f"SMILES {smiles!r}: ")
    assert isinstance(err.value, ValueError) and err.value.input == f"SMILES {smiles!r}"


def test_batch_reports_failures_and_keeps_going():
    graphs, failures = featurize_many(["CCO", "C1CC", "c1ccccc1O", "CCCl", "C#N"])
    assert [g.smiles for g in graphs] == ["CCO", "c1ccccc1O", "C#N"]
    assert [f[0] for f in failures] == ["C1CC", "CCCl"]
    assert "cannot be parsed" in failures[0][1] and "Cl" in failures[1][1]
    with pytest.raises(TypeError, match="unknown featurization option"):
        featurize_many(["CCO"], seeds=1)


def test_batch_of_mixed_inputs(tmp_path):
    mol, _ = embed_smiles("CC=O")
    mol.SetProp("_Name", "acetaldehyde")
    xyz = tmp_path / "water.xyz"
    xyz.write_text(_xyz_block([8, 1, 1], [[0, 0, 0.1173], [0, 0.7572, -0.4692], [0, -0.7572, -0.4692]], "water"))
    atoms = ase.build.molecule("CH3OH")
    graphs, failures = featurize_many(["CCO", mol, atoms, xyz, Path(tmp_path / "missing.sdf"), 3.5])
    assert [g.name for g in graphs] == ["CCO", "acetaldehyde", "CH4O", "water"]
    assert [g.smiles for g in graphs] == ["CCO", "CC=O", "CO", "O"]
    assert failures[0][0].startswith("file '") and "no such file" in failures[0][1]
    assert "cannot tell what kind of input" in failures[1][1]


# -------------------------------------------------------------------------------------- RDKit / ase


def test_from_rdkit_errors():
    with pytest.raises(FeaturizationError, match="missing 3D coordinates"):
        from_rdkit(Chem.AddHs(Chem.MolFromSmiles("CCO")))
    flat = Chem.MolFromMolBlock(Chem.MolToMolBlock(Chem.MolFromSmiles("CCO")))  # 2D depiction
    with pytest.raises(FeaturizationError, match="2D"):
        from_rdkit(flat)
    heavy = Chem.RemoveHs(embed_smiles("CCO")[0])
    heavy.SetProp("_Name", "ethanol")
    with pytest.raises(FeaturizationError, match=r"RDKit Mol 'ethanol': 6 hydrogen\(s\) are implicit"):
        from_rdkit(heavy)
    d = from_rdkit(heavy, add_hs=True)
    assert d.num_nodes == 9 and d.name == "ethanol" and d.smiles == "CCO"
    with pytest.raises(FeaturizationError, match="empty molecule"):
        from_rdkit(Chem.Mol())
    chloro = embed_smiles("CCl")[0]
    with pytest.raises(FeaturizationError, match="Cl outside"):
        from_rdkit(chloro)


def test_from_atoms():
    atoms = ase.build.molecule("CH3CH2OH")
    d = from_atoms(atoms)
    assert d.name == "C2H6O" and d.smiles == "CCO" and d.edge_attr.sum(0).tolist() == [16, 0, 0]
    assert np.allclose(d.pos.numpy(), atoms.positions, atol=1e-6)
    t = from_atoms(atoms, smiles="OCC", name="ethanol")
    assert torch.equal(t.edge_index, d.edge_index) and t.name == "ethanol" and t.smiles == "OCC"
    bare = from_atoms(atoms, graph="radius", cutoff=2.0, edge_attr="none")  # no bonds needed
    assert bare.edge_attr.shape[1] == 0 and bare.edge_index.shape[1] > 16
    # benzene from ase: kekulized like a SMILES
    ring = from_atoms(ase.build.molecule("C6H6"))
    assert ring.edge_attr.sum(0).tolist() == [18, 6, 0]
    with pytest.raises(FeaturizationError, match=r"ase.Atoms 'empty': empty molecule"):
        from_atoms(ase.Atoms())
    with pytest.raises(FeaturizationError, match=r"ase.Atoms 'CH3Cl': element\(s\) Cl outside"):
        from_atoms(ase.build.molecule("CH3Cl"))
    with pytest.raises(FeaturizationError, match="periodic"):
        from_atoms(ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[5, 5, 5], pbc=True))
    with pytest.raises(FeaturizationError, match="bond perception failed.*SMILES"):
        from_atoms(ase.build.molecule("CH3CH2OH"), smiles="CC=O")  # template of another molecule


# ------------------------------------------------------------------------------------------------ files


def test_sdf_mol_files(tmp_path):
    mols = {s: embed_smiles(s)[0] for s in ("CCO", "CCCl", "O=C=O")}
    sdf = tmp_path / "three.sdf"
    sdf.write_text("".join(_sdf_block(m, f"mol{k}") for k, m in enumerate(mols.values())))
    graphs, failures = featurize_file(sdf)
    assert [g.name for g in graphs] == ["mol0", "mol2"] and [g.smiles for g in graphs] == ["CCO", "O=C=O"]
    assert failures == [(f"file '{sdf}' molecule 1 (mol1)", "element(s) Cl outside the model's element vocabulary "
                                                            "(H, C, N, O, F)")]
    with pytest.raises(FeaturizationError, match=r"holds 3 molecules; .*featurize_file"):
        from_file(sdf)
    assert from_file(sdf, index=2).smiles == "O=C=O"
    with pytest.raises(FeaturizationError, match="index 5 out of range"):
        from_file(sdf, index=5)
    one = tmp_path / "ethanol.mol"
    Chem.MolToMolFile(mols["CCO"], str(one))
    d = from_file(one)
    assert d.name == "ethanol" and d.smiles == "CCO"
    ref = from_rdkit(mols["CCO"])
    assert torch.equal(d.edge_index, ref.edge_index) and torch.allclose(d.pos, ref.pos, atol=1e-4)
    flat = tmp_path / "flat.mol"
    Chem.MolToMolFile(Chem.MolFromSmiles("CCO"), str(flat))
    with pytest.raises(FeaturizationError, match=r"file '.*flat.mol': missing 3D coordinates"):
        from_file(flat)
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    with pytest.raises(FeaturizationError, match="holds no molecule"):
        from_file(empty)
    with pytest.raises(FeaturizationError, match="no such file"):
        from_file(tmp_path / "nope.sdf")
    with pytest.raises(FeaturizationError, match="unsupported file type '.pdb'"):
        from_file(tmp_path / "x.pdb")


def test_xyz_files(tmp_path):
    frames = [(s, embed_smiles(s)[0]) for s in ("CCO", "c1ccccc1", "C[Si](C)(C)C", "CC#N")]
    path = tmp_path / "frames.xyz"
    path.write_text("".join(_xyz_block([a.GetAtomicNum() for a in m.GetAtoms()], m.GetConformer().GetPositions(), s)
                            for s, m in frames))
    graphs, failures = featurize_file(path)
    assert [g.name for g in graphs] == ["CCO", "c1ccccc1", "CC#N"]
    assert [g.smiles for g in graphs] == ["CCO", "c1ccccc1", "CC#N"]  # perceived, canonical
    for g, (s, m) in zip(graphs, [frames[0], frames[1], frames[3]]):
        ref = from_rdkit(m)
        assert torch.equal(g.edge_index, ref.edge_index) and torch.equal(g.edge_attr, ref.edge_attr)
    assert len(failures) == 1 and failures[0][0] == f"file '{path}' molecule 2" and "Si" in failures[0][1]
    with pytest.raises(FeaturizationError, match="holds 4 molecules"):
        from_file(path)
    # templates, one per frame
    graphs, failures = featurize_file(path, smiles=["OCC", "C1=CC=CC=C1", "C[Si](C)(C)C", "N#CC"])
    assert [g.smiles for g in graphs] == ["OCC", "C1=CC=CC=C1", "N#CC"]
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\nwater\nO 0 0 0\nH 0 0\n")
    with pytest.raises(FeaturizationError, match=r"file '.*bad.xyz': unreadable xyz: line 1: frame of 3 atoms is truncated"):
        from_file(bad)
    bad.write_text("3\nwater\nO 0 0 0\nH 0 0\nH 0 1 x\n")
    with pytest.raises(FeaturizationError, match=r"unreadable xyz: line 4: expected 'symbol x y z', got 'H 0 0'"):
        from_file(bad)


def test_graph_module_matches_qm9_radius_rule():
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]])
    bonds = torch.tensor([[0, 1], [1, 0]])
    ei, ea = molecule_edges(pos, bonds, torch.tensor([1, 1]), graph="radius", cutoff=2.5)
    assert ei.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    assert ea.tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"atomic numbers \[17\]"):
        atom_one_hot([6, 17])
