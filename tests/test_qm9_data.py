"""QM9 loader: raw formats, units, bonds, cache invalidation, failed molecules, splits (tiny files in tmp_path)."""

import csv
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch

from molkern.data import bonds as B
from molkern.data import qm9 as Q
from molkern.data.qm9 import QM9, QM9CacheWarning

HA2MEV = 27.211386246 * 1000.0

# Real QM9 records (values copied from qm9pack's CSV): gdb number -> fields.
# props: A, B, C (GHz), mu (D), alpha (bohr^3), homo, lumo, gap (Ha), r2 (bohr^2), zpve, U0, U, H, G (Ha), Cv
MOLECULES = {
    1: dict(
        smiles="C", inchi="InChI=1S/CH4/h1H4", symbols=["C", "H", "H", "H", "H"],
        xyz=[[-0.0126981359, 1.0858041578, 0.0080009958], [0.002150416, -0.0060313176, 0.0019761204],
             [1.0117308433, 1.4637511618, 0.0002765748], [-0.540815069, 1.4475266138, -0.8766437152],
             [-0.5238136345, 1.4379326443, 0.9063972942]],
        props=[157.7118, 157.70997, 157.70699, 0.0, 13.21, -0.3877, 0.1171, 0.5048, 35.3641, 0.044749,
               -40.47893, -40.476062, -40.475117, -40.498597, 6.469],
        bonds=(4, 0, 0),
    ),
    2: dict(
        smiles="N", inchi="InChI=1S/H3N/h1H3", symbols=["N", "H", "H", "H"],
        xyz=[[-0.0404260543, 1.0241077531, 0.0625637998], [0.0172574639, 0.0125452063, -0.0273771593],
             [0.9157893661, 1.3587451948, -0.0287577581], [-0.5202777357, 1.3435321258, -0.7755426124]],
        props=[293.60975, 293.54111, 191.39397, 1.6256, 9.46, -0.257, 0.0829, 0.3399, 26.1563, 0.034358,
               -56.525887, -56.523026, -56.522082, -56.544961, 6.316],
        bonds=(3, 0, 0),
    ),
    3: dict(
        smiles="O", inchi="InChI=1S/H2O/h1H2", symbols=["O", "H", "H"],
        xyz=[[-0.0343604951, 0.9775395708, 0.0076015923], [0.0647664923, 0.0205721989, 0.0015346341],
             [0.8717903737, 1.3007924048, 0.0006931336]],
        props=[799.58812, 437.90386, 282.94545, 1.8511, 6.31, -0.2928, 0.0687, 0.3615, 19.0002, 0.021375,
               -76.404702, -76.401867, -76.400922, -76.422349, 6.002],
        bonds=(2, 0, 0),
    ),
    214: dict(
        smiles="C1=CC=CC=C1", inchi="InChI=1S/C6H6/c1-2-4-6-5-3-1/h1-6H", symbols=["C"] * 6 + ["H"] * 6,
        xyz=[[-0.0263621144, 1.3835086344, 0.0103870267], [1.1708019283, 2.0965810056, 0.0023045827],
             [2.3868915311, 1.4163752988, -0.0131380362], [2.4057296503, 0.0230978461, -0.0205116117],
             [1.2085609122, -0.6899726756, -0.0124063764], [-0.0075247651, -0.0097718365, 0.0030452239],
             [-0.9733414726, 1.9132329519, 0.0224498095], [1.1560436477, 3.1816075197, 0.0080224004],
             [3.3191394577, 1.9717268815, -0.0194567412], [3.3527113702, -0.5066219591, -0.0325112361],
             [1.223326423, -1.7750001478, -0.0181456652], [-0.9397757183, -0.565118069, 0.0093265237]],
        props=[5.71227, 5.71175, 2.85601, 0.0, 57.28, -0.2475, 0.0029, 0.2503, 456.6788, 0.100175,
               -232.164586, -232.160188, -232.159244, -232.192047, 17.214],
        bonds=(9, 3, 0),  # kekulized: 6 C-H + 3 ring single, 3 ring double
    ),
}
# HCN (gdb 5) with its H pulled 4 Angstrom away: the geometry no longer matches the SMILES "C#N"
BROKEN = {
    5: dict(
        smiles="C#N", inchi="InChI=1S/CHN/c1-2/h1H", symbols=["C", "N", "H"],
        xyz=[[-0.0133239314, 1.1324657151, 0.0082758861], [0.0023107217, -0.0191585871, 0.0019287305],
             [-0.0278026991, 6.1989492963, 0.0141537903]],
        props=[0.0, 44.593883, 44.593883, 2.8937, 12.99, -0.3604, 0.0191, 0.3796, 48.7476, 0.016601,
               -93.411888, -93.40937, -93.408425, -93.431246, 6.278],
        bonds=None,
    )
}
PYRROLE = dict(  # gdb 50: its SMILES template has an [nH]
    smiles="N1C=CC=C1", symbols=["N", "C", "C", "C", "C", "H", "H", "H", "H", "H"],
    xyz=[[-0.0082969396, 1.3536283762, 0.0099597114], [1.2803325407, 1.8245742139, -0.0002245919],
         [2.1221663909, 0.7369889796, -0.0144560017], [1.308499041, -0.4310958031, -0.0128415387],
         [-0.0034278156, -0.0183688392, 0.0023573641], [-0.8324323359, 1.9277266825, 0.0212299459],
         [1.4847182035, 2.8831263012, 0.0035431347], [3.200669182, 0.7734307713, -0.0248841554],
         [1.6481059949, -1.4553968264, -0.0218039432], [-0.925516472, -0.5769705361, 0.0083940248]],
)
REF_U0 = {"H": -0.500273, "C": -37.846772, "N": -54.583861, "O": -75.064578, "F": -99.718729}


@pytest.fixture(scope="module")
def characterized():
    """GDB numbers of the 130,831 characterised molecules (from the installed qm9pack)."""
    return Q.sources._qm9pack_gdb_indices()


def expected_idx(characterized, gdb):
    k = int(np.searchsorted(characterized, gdb))
    assert characterized[k] == gdb
    return k


# ------------------------------------------------------------------------------------------ writers


def _fmt(x, star=False):
    """Number as the original files write it; star=True uses Mathematica's '*^' exponent."""
    if star:
        mantissa, exp = f"{x:.9e}".split("e")
        return f"{mantissa}*^{int(exp)}"
    return repr(float(x)) if x != 0 else "0."


def write_xyz(folder, mols):
    folder.mkdir(parents=True, exist_ok=True)
    for gdb, m in mols.items():
        n = len(m["symbols"])
        props = m["props"]
        lines = [str(n), "gdb %d\t" % gdb + "\t".join(_fmt(p) for p in props) + "\t"]
        for k, (s, (x, y, z)) in enumerate(zip(m["symbols"], m["xyz"])):
            # one coordinate per molecule in the '*^' notation of the original files
            lines.append(f"{s}\t{_fmt(x)}\t{_fmt(y, star=(k == 1))}\t{_fmt(z)}\t0.0")
        lines.append("\t".join(["1000.0"] * max(1, 3 * n - 6)))
        lines.append(f"{m['smiles']}\t{m['smiles']}")
        lines.append(f"{m['inchi']}\t{m['inchi']}")
        (folder / f"dsgdb9nsd_{gdb:06d}.xyz").write_text("\n".join(lines) + "\n")
    return folder


def write_qm9pack(folder, mols):
    folder.mkdir(parents=True, exist_ok=True)
    header = ["XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang",
              "Mulliken_pop", "Harmonic_Freq_cmi", "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye",
              "Polarizability_bohr3", "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
              "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au",
              "Heatcapacity_Cv_cal_mol_K"]
    with open(folder / "qm9_part1.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        w.writerow(header)
        for gdb, m in sorted(mols.items()):
            elements = "[" + ",".join(f"'{s}'" for s in m["symbols"]) + "]"
            xyz = "[" + ",".join("[" + ",".join(_fmt(c) for c in row) + "]" for row in m["xyz"]) + "]"
            w.writerow([f"dsgdb9nsd_{gdb:06d}.xyz", gdb, m["smiles"], m["inchi"], len(m["symbols"]), "[]",
                        elements, xyz, "[]", "[]", *m["props"]])
    return folder


def write_pyg(folder, mols, characterized, extra_uncharacterized=()):
    """gdb9.sdf (+ one uncharacterized record), gdb9.sdf.csv and uncharacterized.txt in PyG's layout."""
    from rdkit import Chem

    folder.mkdir(parents=True, exist_ok=True)
    sdf = io.StringIO()
    rows = ["mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,u0_atom,u298_atom,h298_atom,g298_atom"]
    records = dict(mols)
    for gdb in extra_uncharacterized:
        records[gdb] = MOLECULES[3]
    for gdb, m in sorted(records.items()):
        mol = B.perceive_bonds(m["symbols"], m["xyz"], smiles=m["smiles"])
        mol.SetProp("_Name", f"gdb_{gdb}")
        sdf.write(Chem.MolToMolBlock(mol, kekulize=True) + "$$$$\n")
        rows.append(",".join([f"gdb_{gdb}", *(repr(p) for p in m["props"]), "0.0", "0.0", "0.0", "0.0"]))
    (folder / "gdb9.sdf").write_text(sdf.getvalue())
    (folder / "gdb9.sdf.csv").write_text("\n".join(rows) + "\n")
    bad = np.setdiff1d(np.arange(1, Q.NUM_GDB9 + 1), characterized)
    head = [" Uncharacterized molecules (fixture in the figshare layout)"] + [" --"] * 8
    body = [f"  {g:6d}   C   C   0.5   0.5" for g in bad]
    (folder / "uncharacterized.txt").write_text("\n".join(head + body + [" --", ""]))
    return folder


def write_source(kind, tmp_path, mols, characterized):
    if kind == "qm9pack":
        return dict(source="qm9pack", raw_path=write_qm9pack(tmp_path / "qm9pack", mols))
    if kind == "xyz_dir":
        return dict(source="xyz", raw_path=write_xyz(tmp_path / "xyz", mols))
    if kind == "xyz_tar":
        folder = write_xyz(tmp_path / "xyzfiles", mols)
        tar_path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
        with tarfile.open(tar_path, "w:bz2") as tar:
            for p in sorted(folder.iterdir(), reverse=True):  # archive order need not be sorted
                tar.add(p, arcname=p.name)
        return dict(source="xyz", raw_path=tar_path)
    if kind == "pyg":
        raw = write_pyg(tmp_path / "raw", mols, characterized, extra_uncharacterized=(58,))  # gdb 58: uncharacterized
        return dict(source="pyg", raw_path=raw)
    raise ValueError(kind)


def load(tmp_path, **kw):
    kw.setdefault("num_workers", 1)
    kw.setdefault("progress", False)
    return QM9(tmp_path / "root", **kw)


def expected_targets(m):
    A, Bc, C, mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, cv = m["props"]
    refs = {k: sum(Q.ATOM_REF_HARTREE[k][B.ATOMIC_NUMBERS[B.ATOM_TYPES.index(s)]] for s in m["symbols"])
            for k in ("U0", "U", "H", "G")}
    return np.array([mu, alpha, homo * HA2MEV, lumo * HA2MEV, gap * HA2MEV, r2, zpve * HA2MEV,
                     (U0 - refs["U0"]) * HA2MEV, (U - refs["U"]) * HA2MEV, (H - refs["H"]) * HA2MEV,
                     (G - refs["G"]) * HA2MEV, cv])


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("kind", ["qm9pack", "xyz_dir", "xyz_tar", "pyg"])
def test_formats(kind, tmp_path, characterized):
    ds = load(tmp_path, **write_source(kind, tmp_path, MOLECULES, characterized))
    assert len(ds) == 4 and ds.report["num_failed"] == 0 and ds.cache_status == "built"
    if kind == "pyg":
        assert ds.report["skipped_uncharacterized"] == 1  # gdb 58 is in the sdf but uncharacterized
    tol = 1e-4 if kind == "pyg" else 1e-6  # the sdf has 4 decimals
    for data, (gdb, m) in zip(ds, sorted(MOLECULES.items())):
        n = len(m["symbols"])
        assert data.idx == expected_idx(characterized, gdb) and data.name == f"gdb_{gdb}"
        assert data.z.dtype == torch.long and data.z.tolist() == B.symbols_to_z(m["symbols"]).tolist()
        assert data.pos.dtype == torch.float32 and data.pos.shape == (n, 3)
        torch.testing.assert_close(data.pos, torch.tensor(m["xyz"], dtype=torch.float32), atol=tol, rtol=0)
        assert data.node_attr.shape == (n, 5) and data.node_attr.dtype == torch.float32
        assert torch.equal(data.node_attr.argmax(1), B.atom_type_index(data.z))
        # bonds: both directions, sorted, one-hot single/double/triple
        ei, ea = data.edge_index, data.edge_attr
        assert ei.dtype == torch.long and ea.dtype == torch.float32 and ea.shape == (ei.shape[1], 3)
        assert ei.shape[1] == 2 * sum(m["bonds"])
        assert tuple((ea.sum(0) / 2).long().tolist()) == m["bonds"]
        assert torch.equal(ea.sum(1), torch.ones(ei.shape[1]))
        pairs = {tuple(p) for p in ei.t().tolist()}
        assert all((j, i) in pairs for i, j in pairs) and len(pairs) == ei.shape[1]
        assert torch.equal(ei[0] * n + ei[1], (ei[0] * n + ei[1]).sort().values)
        # targets, units, atomization energies
        assert data.y.shape == (1, 12) and data.y.dtype == torch.float32
        np.testing.assert_allclose(data.y[0].double().numpy(), expected_targets(m), rtol=1e-6, atol=1e-4)
        if kind != "pyg":
            assert data.smiles == m["smiles"]
    methane = ds[0]
    assert methane.edge_index.shape[1] == 8
    assert methane.y[0, QM9.target_index("homo")].item() == pytest.approx(-0.3877 * HA2MEV, abs=0.01)
    assert methane.y[0, QM9.target_index("homo")].item() == pytest.approx(-10549.854, abs=0.01)  # -0.3877 Ha
    u0_atom = (-40.47893 - (REF_U0["C"] + 4 * REF_U0["H"])) * HA2MEV
    assert methane.y[0, 7].item() == pytest.approx(u0_atom, abs=0.01)
    assert ds.report_path.is_file() and json.loads(ds.report_path.read_text())["num_items"] == 4


def test_bundled_qm9pack_first_molecules(tmp_path, characterized):
    assert len(characterized) == Q.NUM_MOLECULES == 130_831
    assert len(Q.qm9pack_files()) == 3
    ds = QM9(tmp_path / "q", max_molecules=50, num_workers=1, progress=False)
    assert len(ds) == 50 and ds.report["num_failed"] == 0 and ds.cache_path.name == "qm9_qm9pack_first50.pt"
    assert [d.idx for d in (ds[0], ds[49])] == [0, 49] and ds[0].smiles == "C"
    m = MOLECULES[1]
    torch.testing.assert_close(ds[0].pos, torch.tensor(m["xyz"], dtype=torch.float32))
    np.testing.assert_allclose(ds[0].y[0].double().numpy(), expected_targets(m), rtol=1e-6, atol=1e-4)
    assert ds[0].edge_index.shape[1] == 8
    # parallel processing gives the same result as in-process processing
    par = QM9(tmp_path / "p", max_molecules=200, num_workers=2, progress=False)
    seq = QM9(tmp_path / "s", max_molecules=200, num_workers=1, progress=False)
    assert len(par) == len(seq) == 200
    for i in range(0, 200, 7):
        a, b = par[i], seq[i]
        assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_attr, b.edge_attr)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) and a.idx == b.idx


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOLKERN_SLOW") != "1", reason="full QM9 processing (minutes); set MOLKERN_SLOW=1")
def test_bundled_qm9pack_full(tmp_path):
    ds = QM9(tmp_path / "full", progress=False)
    rep = ds.report
    assert rep["num_source_molecules"] == 130_831 and len(ds) == rep["num_items"] == 130_831 - rep["num_failed"]
    assert rep["num_failed"] < 100
    assert 18.0 < rep["num_bonds"] / len(ds) < 19.5  # 18.65 bonds per molecule
    assert sum(rep["failed_per_split"]["cormorant"].values()) == rep["num_failed"]
    assert len(ds.splits("cormorant")["train"]) == 100_000 - rep["failed_per_split"]["cormorant"]["train"]


# ---------------------------------------------------------------------------------------------- cache


def test_cache_reuse_and_invalidation(tmp_path, characterized):
    src = write_source("xyz_dir", tmp_path, MOLECULES, characterized)
    ds = load(tmp_path, **src)
    assert ds.cache_status == "built"
    mtime = ds.cache_path.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load(tmp_path, **src)
    assert again.cache_status == "loaded" and again.cache_path.stat().st_mtime_ns == mtime
    assert torch.equal(again[3].edge_index, ds[3].edge_index)
    assert not [p for p in ds.cache_path.parent.iterdir() if p.name.endswith(".tmp")]

    # corrupted bytes in the payload
    raw = bytearray(ds.cache_path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ds.cache_path.write_bytes(bytes(raw))
    with pytest.warns(QM9CacheWarning, match="checksum"):
        rebuilt = load(tmp_path, **src)
    assert rebuilt.cache_status == "rebuilt" and len(rebuilt) == 4

    # truncated file, garbage file
    ds.cache_path.write_bytes(ds.cache_path.read_bytes()[:100])
    with pytest.warns(QM9CacheWarning):
        assert load(tmp_path, **src).cache_status == "rebuilt"
    ds.cache_path.write_bytes(b"not a cache")
    with pytest.warns(QM9CacheWarning, match="magic"):
        assert load(tmp_path, **src).cache_status == "rebuilt"

    # changed source: new values must be picked up
    mols = {k: dict(v) for k, v in MOLECULES.items()}
    mols[3]["props"] = list(mols[3]["props"])
    mols[3]["props"][3] = 2.5  # mu of water
    write_xyz(src["raw_path"], mols)
    with pytest.warns(QM9CacheWarning, match="source_hash"):
        changed = load(tmp_path, **src)
    assert changed.cache_status == "rebuilt" and changed[2].y[0, 0].item() == pytest.approx(2.5)

    # format version bump
    old = Q.dataset.FORMAT_VERSION
    try:
        Q.dataset.FORMAT_VERSION = old + 1
        with pytest.warns(QM9CacheWarning, match="format_version"):
            assert load(tmp_path, **src).cache_status == "rebuilt"
    finally:
        Q.dataset.FORMAT_VERSION = old
    with pytest.warns(QM9CacheWarning, match="format_version"):
        assert load(tmp_path, **src).cache_status == "rebuilt"
    assert load(tmp_path, **src).cache_status == "loaded"
    assert load(tmp_path, force_reload=True, **src).cache_status == "rebuilt"


# ----------------------------------------------------------------------------------- failed molecules


def test_failed_molecule_is_reported_not_an_item(tmp_path, characterized):
    mols = {**MOLECULES, **BROKEN}
    with pytest.warns(UserWarning, match="1 molecule"):
        ds = load(tmp_path, **write_source("xyz_dir", tmp_path, mols, characterized))
    bad_idx = expected_idx(characterized, 5)
    assert len(ds) == 4 and bad_idx not in ds.mol_idx.tolist()
    rep = ds.report
    assert rep["num_failed"] == 1 and rep["num_source_molecules"] == 5
    (failed,) = rep["failed"]
    assert failed["idx"] == bad_idx and failed["name"] == "gdb_5" and "bond" in failed["reason"]
    assert json.loads(ds.report_path.read_text())["failed"] == rep["failed"]
    for name in ("cormorant", "dimenet"):
        per = rep["failed_per_split"][name]
        parts = QM9.split_indices(name)
        assert sum(per.values()) == 1
        assert per[next(p for p, ind in parts.items() if bad_idx in ind)] == 1
    # subsets skip it; the report survives a reload from the cache
    assert ds.items_of([bad_idx, 0]).tolist() == [0]
    assert [d.idx for d in ds.subset([bad_idx, 2, 0])] == [2, 0]
    assert load(tmp_path, source="xyz", raw_path=tmp_path / "xyz").report["failed"] == rep["failed"]


def test_perceive_bonds_errors():
    m = BROKEN[5]
    with pytest.raises(B.BondPerceptionError, match="bonds"):
        B.perceive_bonds(m["symbols"], m["xyz"], smiles=m["smiles"])
    w = MOLECULES[3]
    with pytest.raises(B.BondPerceptionError, match="atoms"):
        B.perceive_bonds(w["symbols"], w["xyz"], smiles="CO")
    with pytest.raises(B.BondPerceptionError, match="parse"):
        B.perceive_bonds(w["symbols"], w["xyz"], smiles="not a smiles((")
    with pytest.raises(ValueError, match="element"):
        B.perceive_bonds(["S", "H", "H"], w["xyz"])


# ---------------------------------------------------------------------------------------------- bonds


def test_bond_encoding_conventions(capfd):
    from rdkit import Chem

    # aromatic rings are kekulized: only single/double columns
    benzene = Chem.AddHs(Chem.MolFromSmiles("c1ccccc1"))
    ei, ea = B.encode_bonds(benzene)
    assert ei.shape == (2, 24) and ea.shape == (24, 3)
    assert (ea.sum(0) / 2).tolist() == [9.0, 3.0, 0.0]
    assert B.encode_atoms([1, 6, 7, 8, 9]).tolist() == torch.eye(5).tolist()
    assert B.encode_atoms(benzene).sum(0).tolist() == [6.0, 6.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        B.encode_atoms([16])
    # a SMILES template with [nH] (pyrrole), and no template at all (methane), from 3D
    capfd.readouterr()
    pyr = B.perceive_bonds(PYRROLE["symbols"], PYRROLE["xyz"], smiles=PYRROLE["smiles"])
    ei, ea = B.encode_bonds(pyr)
    assert (ea.sum(0) / 2).tolist() == [8.0, 2.0, 0.0]
    assert not any(b.GetIsAromatic() for b in pyr.GetBonds())
    methane = B.perceive_bonds(B.symbols_to_z(MOLECULES[1]["symbols"]), MOLECULES[1]["xyz"])
    assert methane.GetNumBonds() == 4
    # Hueckel first gives the same bonds as the default (distance rule first, both checked against the SMILES)
    for m in (PYRROLE, MOLECULES[3], MOLECULES[214]):
        auto = B.encode_bonds(B.perceive_bonds(m["symbols"], m["xyz"], smiles=m["smiles"]))
        hueckel = B.encode_bonds(B.perceive_bonds(m["symbols"], m["xyz"], smiles=m["smiles"], connectivity="hueckel"))
        assert all(torch.equal(x, y) for x, y in zip(auto, hueckel))
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""  # RDKit's C++ messages (Hueckel prints to the fds) are silenced
    with pytest.raises(ValueError, match="connectivity"):
        B.perceive_bonds(PYRROLE["symbols"], PYRROLE["xyz"], connectivity="magic")


def test_radius_graph(tmp_path, characterized):
    src = write_source("xyz_dir", tmp_path, MOLECULES, characterized)
    bonds = load(tmp_path, **src)[0]
    short = load(tmp_path, graph="radius", cutoff=1.2, **src)
    assert short.cache_status == "loaded"  # the graph choice does not change the cache
    m = short[0]
    assert m.edge_index.shape[1] == 8 and torch.equal(m.edge_index, bonds.edge_index)
    assert torch.equal(m.edge_attr, bonds.edge_attr)
    wide = load(tmp_path, graph="radius", cutoff=2.0, **src)[0]  # + the 6 H-H pairs (1.78 A), unbonded
    assert wide.edge_index.shape[1] == 20 and wide.edge_attr.shape == (20, 3)
    bonded = wide.edge_attr.sum(1) == 1
    assert int(bonded.sum()) == 8 and float(wide.edge_attr[~bonded].abs().sum()) == 0.0
    assert (wide.z[wide.edge_index[:, ~bonded]] == 1).all()
    d = (wide.pos[wide.edge_index[0]] - wide.pos[wide.edge_index[1]]).norm(dim=1)
    assert (d < 2.0).all() and (d > 0).all()
    with pytest.raises(ValueError, match="cutoff"):
        load(tmp_path, graph="radius", **src)


def test_batching(tmp_path, characterized):
    from torch_geometric.loader import DataLoader

    ds = load(tmp_path, **write_source("qm9pack", tmp_path, MOLECULES, characterized))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.y.shape == (4, 12) and batch.node_attr.shape == (24, 5) and batch.idx.shape == (4,)
    assert batch.edge_index.max() < 24 and batch.smiles == [m["smiles"] for _, m in sorted(MOLECULES.items())]


# ------------------------------------------------------------------------------------- splits, stats


@pytest.mark.parametrize(
    "name,sizes", [("cormorant", (100_000, 17_748, 13_083)), ("dimenet", (110_000, 10_000, 10_831))]
)
def test_splits(name, sizes, tmp_path):
    state = np.random.get_state()
    parts = QM9.split_indices(name)
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global generator untouched
    assert tuple(len(parts[k]) for k in ("train", "val", "test")) == sizes
    allidx = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(allidx), np.arange(130_831))
    again = QM9.split_indices(name)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    # the published recipes
    if name == "cormorant":
        try:
            np.random.seed(0)
            perm = np.random.permutation(130_831)
        finally:
            np.random.set_state(state)
        train, val, test = np.split(perm, [100_000, 117_748])
    else:
        perm = np.random.RandomState(42).permutation(130_831)
        train, val, test = perm[:110_000], perm[110_000:120_000], perm[120_000:]
    assert np.array_equal(parts["train"], train) and np.array_equal(parts["val"], val)
    assert np.array_equal(parts["test"], test)
    small = QM9.split_indices(name, train_subset=1000)
    assert np.array_equal(small["train"], train[:1000]) and np.array_equal(small["test"], test)
    with pytest.raises(ValueError):
        QM9.split_indices(name, train_subset=200_000)
    path = QM9.save_splits(tmp_path, name=name, train_subset=1000)
    assert path.name == "splits.npz"
    loaded = QM9.load_splits(path)
    assert all(np.array_equal(loaded[k], small[k]) for k in small)
    with pytest.raises(ValueError):
        QM9.split_indices("random")


def test_target_stats_and_subsets(tmp_path, characterized):
    ds = load(tmp_path, **write_source("xyz_dir", tmp_path, MOLECULES, characterized))
    idx = ds.mol_idx
    y = np.stack([expected_targets(m) for _, m in sorted(MOLECULES.items())])
    mean, std = ds.target_stats(idx[[0, 1, 3]])
    assert mean.shape == std.shape == (12,) and mean.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy(), y[[0, 1, 3]].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), y[[0, 1, 3]].std(0), rtol=1e-4, atol=1e-4)
    # unknown / missing molecules are skipped
    mean2, _ = ds.target_stats(np.concatenate([idx[[0, 1, 3]], [idx.max() + 1]]))
    assert torch.equal(mean, mean2)
    parts = ds.splits("cormorant")
    assert sum(len(p) for p in parts.values()) == 4
    for part, view in parts.items():
        assert set(view.mol_idx.tolist()) <= set(QM9.split_indices("cormorant")[part].tolist())
    assert QM9.target_names[7] == "U0" and QM9.target_units[7] == "meV" and len(QM9.target_units) == 12
    ref = QM9.atomref("U0")
    assert ref[6].item() == pytest.approx(REF_U0["C"] * HA2MEV) and QM9.atomref("mu") is None
