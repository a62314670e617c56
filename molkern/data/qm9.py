"""QM9 (130,831 molecules) as PyTorch Geometric graphs, processed once and cached, with no download.

Sources (`source=`):
    * ``"qm9pack"`` (default): the CSV files shipped by the PyPI package ``qm9pack`` (coordinates in Angstrom,
      the B3LYP-relaxed SMILES, properties in Hartree / Debye / bohr units). The package is located with
      ``importlib.metadata`` and never imported (its ``__init__`` needs setuptools' ``pkg_resources``).
    * ``"xyz"``: the original ``dsgdb9nsd_*.xyz`` files, as a folder or as the ``dsgdb9nsd.xyz.tar.bz2``
      archive (``raw_path=``). Numbers written like ``1.2*^-6`` are read. The B3LYP-relaxed SMILES (second
      SMILES of the file) is the bond-order template. The 3,054 "uncharacterized" molecules are skipped, using
      ``uncharacterized=`` or an ``uncharacterized.txt`` next to the files, else the list implied by qm9pack.
    * ``"pyg"``: PyTorch Geometric's raw files ``gdb9.sdf``, ``gdb9.sdf.csv`` and ``uncharacterized.txt`` in
      ``raw_path`` (default ``root/raw``). Coordinates come from the sdf; the bond-order template is the
      SMILES of the sdf record (when it sanitizes; otherwise bond orders come from RDKit alone).

Molecule ordering: ``idx`` is the position of a molecule among the 130,831 characterised GDB-9 molecules
sorted by their GDB number (the ordering of PyG, qm9pack and every published split). Each item keeps it
in ``data.idx`` (and ``data.name = "gdb_<GDB number>"``).

Bonds (see :mod:`molkern.data.bonds`): connectivity from the 3D structure with RDKit's
``DetermineConnectivity`` (the distance rule, then extended Hueckel when that does not give the SMILES graph),
bond orders and formal charges from the molecule's SMILES used as a template; the SMILES graph must match the
perceived connectivity exactly.
On the bundled data 4 of 130,831 molecules fail this way (strained polycyclic cages whose relaxed geometry
does not give the SMILES graph). **Aromatic convention:** molecules are
kekulized (``clearAromaticFlags=True``) before encoding, so ``edge_attr`` is a 3-column one-hot (single,
double, triple) and aromatic rings appear as alternating single/double bonds.

Molecules whose bonds cannot be perceived are *not* items of the dataset, but they are never dropped in
silence: ``dataset.report["failed"]`` (also written as JSON next to the cache) lists each one with its
``idx``, GDB name and reason, and ``dataset.report["failed_per_split"]`` says how many fall in each part of
the named splits. Splits are defined over the full 130,831 ordering (so they equal the literature's);
:meth:`QM9.subset` and :meth:`QM9.splits` skip the molecules that have no item.

Targets (``data.y``, shape (1, 12), float32), the 12 standard ones, in the units results are reported in:
    mu (D), alpha (bohr^3), homo, lumo, gap (meV), r2 (bohr^2), zpve (meV), U0, U, H, G (meV, *atomization*
    energies: the molecule's energy minus the free-atom reference energies of its atoms), Cv (cal/(mol K)).
    Hartree -> meV uses 27.211386246 eV/Ha (CODATA 2018, as PyG). The atom references are the GDB-9
    B3LYP/6-31G(2df,p) free-atom energies in Hartree (:data:`ATOM_REF_HARTREE`, the values behind PyG's
    ``QM9.atomref``).

Graphs (``graph=``):
    * ``"bonds"`` (default, the paper's): ``edge_index`` holds the covalent bonds in both directions.
    * ``"radius"``: every ordered pair of distinct atoms closer than ``cutoff`` Angstrom (vesin neighbour
      list); ``edge_attr`` is the bond one-hot when the pair is bonded and all zeros otherwise, so models
      see the same 3 columns with either graph. Bonded pairs farther apart than the cutoff are not added.

Cache: ``root/processed/qm9_<source>[_first<N>].pt`` holds a header (format version, source kind, a hash of
the raw source, ``max_molecules``, a sha256 of the payload) and the tensors; it is written atomically (a
temporary file in the same directory, then ``os.replace``). A cache whose header or checksum does not match
is reported with a :class:`QM9CacheWarning` and rebuilt; it is never used silently. Source hashes: sha256 of
the bytes of each raw file; for a folder of xyz files, of the names, sizes and modification times.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data, Dataset

from ..io import atomic_write
from .bonds import ATOMIC_NUMBERS, BondPerceptionError, atom_type_index, bond_arrays, perceive_bonds
from .graph import molecule_edges, molecule_graph

__all__ = [
    "ATOM_REF_HARTREE",
    "FORMAT_VERSION",
    "HARTREE_TO_EV",
    "NUM_MOLECULES",
    "QM9",
    "QM9CacheWarning",
    "TARGET_NAMES",
    "TARGET_UNITS",
    "qm9pack_files",
]

FORMAT_VERSION = 1  # bump whenever processing (parsing, bond perception, units) or the payload layout changes
NUM_MOLECULES = 130_831  # characterised molecules
NUM_GDB9 = 133_885  # all GDB-9 molecules, 3,054 of them uncharacterized
HARTREE_TO_EV = 27.211386246
HARTREE_TO_MEV = HARTREE_TO_EV * 1000.0

TARGET_NAMES: Tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")
TARGET_UNITS: Tuple[str, ...] = (
    "D", "bohr^3", "meV", "meV", "meV", "bohr^2", "meV", "meV", "meV", "meV", "meV", "cal/(mol K)",
)
_MEV_TARGETS = {"homo", "lumo", "gap", "zpve", "U0", "U", "H", "G"}

# free-atom energies (Hartree) of H, C, N, O, F: B3LYP/6-31G(2df,p), as in PyG's QM9.atomref
# (its eV values / 27.211386246, rounded to 1e-6 Ha)
ATOM_REF_HARTREE: Dict[str, Dict[int, float]] = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064578, 9: -99.718729},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063162, 9: -99.717313},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062218, 9: -99.716369},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079531, 9: -99.733543},
}

SOURCES = ("qm9pack", "xyz", "pyg")
GRAPHS = ("bonds", "radius")
_MAGIC = b"MOLKERN-QM9-CACHE\n"
_CHUNKSIZE = 32

_QM9PACK_COLUMNS = (  # qm9pack header names of the 12 targets, in TARGET_NAMES order
    "Dipole_debye", "Polarizability_bohr3", "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)
_PYG_COLUMNS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "u0", "u298", "h298", "g298", "cv")


class QM9CacheWarning(UserWarning):
    """A cached QM9 file was stale or corrupt and is being rebuilt."""


class _StaleCache(Exception):
    pass


# =============================================================================================== targets


def _targets(z: np.ndarray, props: Sequence[float]) -> np.ndarray:
    """Raw properties (D, bohr^3, Ha x5, bohr^2, Ha, Ha x4 totals, cal/(mol K)) -> the 12 targets in their units."""
    y = np.array(props, dtype=np.float64)
    if y.shape != (12,):
        raise ValueError(f"expected 12 properties, got {y.shape}")
    for k, name in enumerate(TARGET_NAMES):
        if name in ATOM_REF_HARTREE:
            ref = ATOM_REF_HARTREE[name]
            y[k] -= sum(ref[int(zi)] for zi in z)
        if name in _MEV_TARGETS:
            y[k] *= HARTREE_TO_MEV
    if not np.isfinite(y).all():
        raise ValueError("non-finite target values")
    return y


# ============================================================================================ raw files


def qm9pack_files() -> List[Path]:
    """The qm9pack CSV files (qm9_part1..3.csv), located without importing qm9pack.

    Raises:
        FileNotFoundError: qm9pack is not installed (``pip install qm9pack``).
    """
    found: List[Path] = []
    try:
        for f in importlib.metadata.files("qm9pack") or []:
            if re.fullmatch(r"qm9pack/data/qm9_part\d+\.csv", str(f).replace("\\", "/")):
                found.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not found:
        spec = importlib.util.find_spec("qm9pack")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                found += list(Path(loc, "data").glob("qm9_part*.csv"))
    found = sorted({p.resolve() for p in found if p.is_file()}, key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if not found:
        raise FileNotFoundError("QM9 source 'qm9pack' needs the PyPI package qm9pack: pip install qm9pack")
    return found


def _qm9pack_version() -> str:
    try:
        return importlib.metadata.version("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _qm9pack_gdb_indices() -> np.ndarray:
    """GDB numbers (1-based) of the 130,831 characterised molecules, from qm9pack's Index column (sorted)."""
    out = []
    for path in qm9pack_files():
        with open(path, "rb") as f:
            header = next(f).decode().strip().split(",")
            col = header.index("Index")
            if col != 1:
                raise ValueError(f"unexpected qm9pack header in {path}")
            for line in f:
                out.append(int(line.split(b",", 2)[1]))
    return np.unique(np.array(out, dtype=np.int64))


def read_uncharacterized(path) -> np.ndarray:
    """GDB numbers (1-based) listed in the figshare ``uncharacterized.txt`` (3,054 in the real file)."""
    lines = Path(path).read_text().split("\n")
    body = lines[9:-2]  # the file's layout, as PyG reads it
    try:
        values = [int(line.split()[0]) for line in body]
    except (ValueError, IndexError):
        values = []
    if not values:  # any other layout: rows that start with an integer followed by more fields
        values = [int(t[0]) for t in (line.split() for line in lines) if len(t) >= 2 and t[0].isdigit()]
    if not values:
        raise ValueError(f"no molecule numbers found in {path}")
    return np.unique(np.array(values, dtype=np.int64))


def _characterized_from(uncharacterized: Optional[Path]) -> np.ndarray:
    if uncharacterized is not None:
        bad = read_uncharacterized(uncharacterized)
        good = np.setdiff1d(np.arange(1, NUM_GDB9 + 1, dtype=np.int64), bad)
    else:
        good = _qm9pack_gdb_indices()
    if good.size != NUM_MOLECULES:
        warnings.warn(
            f"the characterised-molecule list has {good.size} entries, not {NUM_MOLECULES}: idx values (and the "
            "named splits) will not match the standard QM9 ordering",
            UserWarning,
            stacklevel=3,
        )
    return good


def _sha256_files(paths: Iterable[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(f"\0{Path(p).name}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _float(token: str) -> float:
    return float(token.replace("*^", "e"))


def _parse_symbol_list(text: str) -> List[str]:
    return [t.strip().strip("'\"") for t in text.strip().strip("[]").split(",") if t.strip()]


def _parse_float_list(text: str) -> List[float]:
    return [_float(t) for t in text.replace("[", " ").replace("]", " ").split(",") if t.strip()]


class _Source:
    """A raw QM9 source: its fingerprint and the work items (one per molecule) it yields."""

    kind: str

    def fingerprint(self) -> str:
        raise NotImplementedError

    def tasks(self, max_molecules: Optional[int]) -> Tuple[Iterator[tuple], int, dict]:
        """(iterator of work items, number of items, extra report entries)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class _Qm9packSource(_Source):
    kind = "qm9pack"

    def __init__(self, raw_path: Optional[Path] = None):
        self.custom = raw_path is not None
        if self.custom:
            self.files = sorted(Path(raw_path).glob("qm9_part*.csv"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
            if not self.files:
                raise FileNotFoundError(f"no qm9pack-style qm9_part*.csv files in {raw_path}")
        else:
            self.files = qm9pack_files()

    def describe(self):
        if self.custom:
            return f"qm9pack-style CSV files in {self.files[0].parent}"
        return f"qm9pack {_qm9pack_version()} ({self.files[0].parent})"

    def fingerprint(self):
        return _sha256_files(self.files, extra="qm9pack" if self.custom else f"qm9pack {_qm9pack_version()}")

    def tasks(self, max_molecules):
        import csv

        csv.field_size_limit(1 << 30)
        limit = NUM_MOLECULES if max_molecules is None else max_molecules
        # the installed package is the full list, so its row number is idx; other files are mapped onto it
        good = _characterized_from(None) if self.custom else None
        info = {"skipped_uncharacterized": 0}

        def rows():
            last_gdb = 0
            for path in self.files:
                with open(path, newline="") as f:
                    reader = csv.reader(f)
                    header = next(reader)
                    try:
                        cols = [header.index(c) for c in ("Index", "SMILES", "Elements", "XYZ_Ang", *_QM9PACK_COLUMNS)]
                    except ValueError as err:
                        raise ValueError(f"unexpected qm9pack CSV header in {path}: {err}") from None
                    for row in reader:
                        gdb, smiles, elements, xyz, *props = (row[c] for c in cols)
                        gdb = int(gdb)
                        if gdb <= last_gdb:
                            raise ValueError(f"qm9pack rows are not sorted by Index ({gdb} after {last_gdb})")
                        last_gdb = gdb
                        yield gdb, smiles, elements, xyz, props

        if not self.custom:
            total = min(limit, NUM_MOLECULES)

            def gen():
                for idx, (gdb, *rest) in enumerate(rows()):
                    if idx >= limit:
                        return
                    yield ("qm9pack", idx, gdb, *rest)

            return gen(), total, info

        items = []
        for gdb, *rest in rows():
            k = int(np.searchsorted(good, gdb))
            if k >= good.size or good[k] != gdb:
                info["skipped_uncharacterized"] += 1
            elif k < limit:
                items.append(("qm9pack", k, gdb, *rest))
        return iter(items), len(items), info


class _XyzSource(_Source):
    kind = "xyz"
    _NAME = re.compile(r"(?:^|/)dsgdb9nsd_(\d+)\.xyz$")

    def __init__(self, raw_path: Path, uncharacterized: Optional[Path]):
        self.path = Path(raw_path)
        if self.path.is_dir():
            tars = sorted(self.path.glob("*.tar*"))
            if not any(self.path.glob("*.xyz")) and tars:
                self.path = tars[0]
        if not self.path.exists():
            raise FileNotFoundError(f"QM9 xyz source not found: {self.path}")
        if uncharacterized is None:
            cand = (self.path if self.path.is_dir() else self.path.parent) / "uncharacterized.txt"
            uncharacterized = cand if cand.is_file() else None
        self.uncharacterized = Path(uncharacterized) if uncharacterized is not None else None

    def describe(self):
        return f"xyz files in {self.path}"

    def _files(self) -> List[Tuple[int, Path]]:
        out = []
        for p in self.path.iterdir():
            m = self._NAME.search(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def fingerprint(self):
        h = hashlib.sha256(b"xyz\0")
        if self.path.is_dir():
            for gdb, p in self._files():
                st = p.stat()
                h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            h.update(_sha256_files([self.path]).encode())
        if self.uncharacterized is not None:
            h.update(_sha256_files([self.uncharacterized]).encode())
        else:  # characterised list from qm9pack
            h.update(f"qm9pack {_qm9pack_version()} {[p.stat().st_size for p in qm9pack_files()]}".encode())
        return h.hexdigest()

    def tasks(self, max_molecules):
        good = _characterized_from(self.uncharacterized)
        limit = NUM_MOLECULES if max_molecules is None else max_molecules
        info = {"skipped_uncharacterized": 0}

        def index_of(gdb):
            k = int(np.searchsorted(good, gdb))
            if k < good.size and good[k] == gdb:
                return k
            info["skipped_uncharacterized"] += 1
            return None

        if self.path.is_dir():
            items = []
            for gdb, p in self._files():
                k = index_of(gdb)
                if k is not None and k < limit:
                    items.append((k, gdb, p))

            def gen():
                for k, gdb, p in items:
                    yield ("xyz", k, gdb, p.read_text())

            return gen(), len(items), info

        # an archive: read it in its own order; the results are sorted by idx afterwards
        with tarfile.open(self.path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and self._NAME.search(m.name)]
        wanted = []
        for m in members:
            gdb = int(self._NAME.search(m.name).group(1))
            k = index_of(gdb)
            if k is not None and k < limit:
                wanted.append((m.name, k, gdb))
        names = {name: (k, gdb) for name, k, gdb in wanted}

        def gen():
            with tarfile.open(self.path, "r:*") as tar:
                for m in tar:
                    if m.name in names:
                        k, gdb = names[m.name]
                        yield ("xyz", k, gdb, tar.extractfile(m).read().decode())

        return gen(), len(wanted), info


class _PygSource(_Source):
    kind = "pyg"
    FILES = ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt")

    def __init__(self, raw_path: Path):
        self.path = Path(raw_path)
        missing = [f for f in self.FILES if not (self.path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"QM9 source 'pyg' needs {missing} in {self.path}")

    def describe(self):
        return f"PyG raw files in {self.path}"

    def fingerprint(self):
        return _sha256_files([self.path / f for f in self.FILES], extra="pyg")

    def tasks(self, max_molecules):
        good = _characterized_from(self.path / "uncharacterized.txt")
        limit = NUM_MOLECULES if max_molecules is None else max_molecules
        props: Dict[int, List[float]] = {}
        with open(self.path / "gdb9.sdf.csv") as f:
            header = [h.strip() for h in next(f).strip().split(",")]
            cols = [header.index(c) for c in _PYG_COLUMNS]
            for pos, line in enumerate(f):
                if not line.strip():
                    continue
                row = line.strip().split(",")
                m = re.search(r"(\d+)$", row[0])
                gdb = int(m.group(1)) if m else pos + 1
                props[gdb] = [_float(row[c]) for c in cols]
        text = (self.path / "gdb9.sdf").read_text()
        records = [r for r in text.split("$$$$") if r.strip()]
        items, skipped = [], 0
        for pos, rec in enumerate(records):
            rec = rec[2:] if rec.startswith("\r\n") else rec[1:] if rec.startswith("\n") else rec  # after "$$$$"
            title = rec.split("\n", 1)[0].strip()
            m = re.search(r"(\d+)$", title)
            gdb = int(m.group(1)) if m else pos + 1
            k = int(np.searchsorted(good, gdb))
            if k >= good.size or good[k] != gdb:
                skipped += 1
                continue
            if k < limit:
                items.append(("pyg", k, gdb, rec, props.get(gdb)))
        return iter(items), len(items), {"skipped_uncharacterized": skipped}


# ============================================================================================ processing


def _parse_xyz(text: str):
    lines = text.splitlines()
    n = int(lines[0].split()[0])
    head = lines[1].split()
    if len(head) < 17:
        raise ValueError(f"property line has {len(head)} fields, expected 17")
    props = [_float(t) for t in head[5:17]]
    symbols, pos = [], []
    for line in lines[2 : 2 + n]:
        t = line.split()
        symbols.append(t[0])
        pos.append([_float(t[1]), _float(t[2]), _float(t[3])])
    smiles = lines[3 + n].split()
    return symbols, np.array(pos, dtype=np.float64), smiles[1] if len(smiles) > 1 else smiles[0], props


def _parse_task(task):
    """A work item -> (z, positions (N, 3) in Angstrom, template SMILES or None, 12 raw properties)."""
    from .bonds import symbols_to_z

    kind = task[0]
    if kind == "qm9pack":
        _, _, _, smiles, elements, xyz, props = task
        symbols = _parse_symbol_list(elements)
        coords = np.array(_parse_float_list(xyz), dtype=np.float64)
        if coords.size != 3 * len(symbols):
            raise ValueError(f"{len(symbols)} elements but {coords.size} coordinates")
        return symbols_to_z(symbols), coords.reshape(-1, 3), smiles, [_float(p) for p in props]
    if kind == "xyz":
        symbols, pos, smiles, props = _parse_xyz(task[3])
        return symbols_to_z(symbols), pos, smiles, props
    if kind == "pyg":
        from rdkit import Chem

        _, _, _, block, props = task
        if props is None:
            raise ValueError("no row in gdb9.sdf.csv")
        mol = Chem.MolFromMolBlock(block, removeHs=False, sanitize=False)
        if mol is None:
            raise ValueError("unreadable sdf record")
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        pos = mol.GetConformer().GetPositions()
        try:
            Chem.SanitizeMol(mol)
            smiles = Chem.MolToSmiles(Chem.RemoveHs(mol))
        except Exception:  # the sdf's own bond orders do not sanitize: let RDKit assign them
            smiles = None
        return z, pos, smiles, props
    raise ValueError(f"unknown task kind {kind!r}")


def _process_task(task):
    """One molecule -> (idx, gdb, result tuple) or (idx, gdb, reason string). Never raises."""
    idx, gdb = task[1], task[2]
    try:
        z, pos, smiles, props = _parse_task(task)
    except Exception as err:
        return idx, gdb, f"unreadable record: {type(err).__name__}: {err}", None
    try:
        y = _targets(z, props)
    except Exception as err:
        return idx, gdb, f"bad targets: {err}", smiles
    try:
        mol = perceive_bonds(z, pos, smiles=smiles)
    except BondPerceptionError as err:
        return idx, gdb, f"bond perception: {err}", smiles
    except Exception as err:  # RDKit errors of any type
        return idx, gdb, f"bond perception: {type(err).__name__}: {err}", smiles
    edge_index, bond_type = bond_arrays(mol)  # (2, E) sorted, both directions; (E,)
    edge_index, bond_type = edge_index.astype(np.int16), bond_type.astype(np.int8)
    if smiles is None:
        from rdkit import Chem

        smiles = Chem.MolToSmiles(Chem.RemoveHs(mol))
    return idx, gdb, (z.astype(np.uint8), pos.astype(np.float32), edge_index, bond_type, y, smiles), smiles


def _run(tasks: Iterator[tuple], total: int, num_workers: int, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="QM9: perceiving bonds", unit="mol", disable=not progress, mininterval=0.5)
    results = []
    try:
        if num_workers > 1 and total >= 4 * _CHUNKSIZE:
            ctx = multiprocessing.get_context()
            with ctx.Pool(num_workers) as pool:
                for res in pool.imap_unordered(_process_task, tasks, chunksize=_CHUNKSIZE):
                    results.append(res)
                    bar.update()
        else:
            for task in tasks:
                results.append(_process_task(task))
                bar.update()
    finally:
        bar.close()
    results.sort(key=lambda r: r[0])
    return results


def _encode_cache(header: dict, payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = dict(header, payload_sha256=hashlib.sha256(body).hexdigest(), payload_size=len(body))
    return _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


def _decode_cache(path: Path, expected: dict) -> Tuple[dict, dict]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _StaleCache(f"unreadable ({err})") from None
    if not raw.startswith(_MAGIC):
        raise _StaleCache("not a molkern QM9 cache (bad magic)")
    end = raw.find(b"\n", len(_MAGIC))
    try:
        header = json.loads(raw[len(_MAGIC) : end])
    except ValueError:
        raise _StaleCache("corrupt header") from None
    for key, value in expected.items():
        if header.get(key) != value:
            raise _StaleCache(f"{key} is {header.get(key)!r}, expected {value!r}")
    body = raw[end + 1 :]
    if len(body) != header.get("payload_size") or hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        raise _StaleCache("checksum mismatch (corrupt or truncated file)")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as err:
        raise _StaleCache(f"unreadable payload ({err})") from None
    return header, payload


# ================================================================================================ splits


def split_indices(
    name: str, num_molecules: int = NUM_MOLECULES, train_subset: Optional[int] = None
) -> Dict[str, np.ndarray]:
    """See :meth:`QM9.split_indices`."""
    name = name.lower()
    if name == "cormorant":
        # = np.random.seed(0); np.random.permutation(n), without touching numpy's global generator
        perm = np.random.RandomState(0).permutation(num_molecules)
        n_train = 100_000 if num_molecules == NUM_MOLECULES else int(round(num_molecules * 100_000 / NUM_MOLECULES))
        n_test = int(0.1 * num_molecules)
        n_val = num_molecules - n_train - n_test
        train, val, test = np.split(perm, [n_train, n_train + n_val])
    elif name == "dimenet":
        perm = np.random.RandomState(42).permutation(num_molecules)
        if num_molecules == NUM_MOLECULES:
            n_train, n_val = 110_000, 10_000
        else:
            n_train = int(round(num_molecules * 110_000 / NUM_MOLECULES))
            n_val = int(round(num_molecules * 10_000 / NUM_MOLECULES))
        train, val, test = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    else:
        raise ValueError(f"unknown QM9 split {name!r}; choose 'cormorant' or 'dimenet'")
    if train_subset is not None:
        if not 0 < int(train_subset) <= len(train):
            raise ValueError(f"train_subset must be in 1..{len(train)}, got {train_subset}")
        train = train[: int(train_subset)]
    return {"train": train.astype(np.int64), "val": val.astype(np.int64), "test": test.astype(np.int64)}


# =============================================================================================== dataset


class QM9(Dataset):
    r"""QM9 molecules as PyG graphs with the 12 standard targets; see the module docstring for conventions.

    Args:
        root: directory of the cache (``root/processed``) and, for ``source="pyg"`` / ``"xyz"``, the
            default raw folder ``root/raw``.
        source: ``"qm9pack"`` (default; no download), ``"xyz"`` or ``"pyg"``.
        raw_path: raw files of the ``"xyz"`` source (a folder of ``dsgdb9nsd_*.xyz`` or the ``.tar.bz2``;
            default ``root/raw``), the folder with PyG's ``gdb9.sdf``, ``gdb9.sdf.csv`` and
            ``uncharacterized.txt`` (default ``root/raw``), or, for ``"qm9pack"``, a folder of
            qm9pack-style ``qm9_part*.csv`` files (default: the installed package's).
        uncharacterized: path of ``uncharacterized.txt`` for the ``"xyz"`` source (optional).
        graph: ``"bonds"`` (covalent bonds) or ``"radius"`` (all pairs within ``cutoff``).
        cutoff: radius in Angstrom, required by ``graph="radius"``.
        max_molecules: process only the molecules with ``idx < max_molecules`` (debugging, quick looks);
            cached separately.
        num_workers: processes for the one-time processing (default ``os.cpu_count()``).
        progress: show a tqdm progress bar while processing.
        force_reload: rebuild the cache even when it is valid.
        transform: PyG transform applied to each item on access.

    Items (``dataset[i]``, i = item position, 0..len-1) are ``Data`` with
        z (N,) long, pos (N, 3) float32 Angstrom, node_attr (N, 5) float32 one-hot (H, C, N, O, F),
        edge_index (2, E) long (row 0 source j, row 1 target i), edge_attr (E, 3) float32 bond one-hot
        (single, double, triple; zeros for non-bonded radius-graph pairs), y (1, 12) float32 in
        ``target_units``, idx (int, position in the 130,831 ordering), smiles (str), name ("gdb_<n>").
        The fields are named ``node_attr`` / ``edge_attr`` (PyG's singular style, as in
        :class:`molkern.data.NBody`): PyG's ``Data`` has methods ``node_attrs()`` / ``edge_attrs()`` that
        would shadow fields of those names. Pass them to the model's ``node_attrs`` / ``edge_attrs``.

    Attributes:
        report: the processing report (counts, failed molecules with reasons, failures per split, timing).
        cache_path, report_path: files under ``root/processed``.
        cache_status: ``"loaded"``, ``"built"`` or ``"rebuilt"`` (for this instantiation).
        mol_idx: (num_items,) int64 array, the ``idx`` of each item.

    Example:
        >>> ds = QM9("data/qm9")                       # doctest: +SKIP
        >>> parts = ds.splits("cormorant")             # {"train", "val", "test"} -> QM9 views
        >>> mean, std = ds.target_stats(QM9.split_indices("cormorant")["train"])
    """

    target_names: Tuple[str, ...] = TARGET_NAMES
    target_units: Tuple[str, ...] = TARGET_UNITS
    num_molecules: int = NUM_MOLECULES
    atom_ref_hartree = ATOM_REF_HARTREE

    def __init__(
        self,
        root: Union[str, os.PathLike],
        source: str = "qm9pack",
        raw_path: Optional[Union[str, os.PathLike]] = None,
        uncharacterized: Optional[Union[str, os.PathLike]] = None,
        graph: str = "bonds",
        cutoff: Optional[float] = None,
        max_molecules: Optional[int] = None,
        num_workers: Optional[int] = None,
        progress: bool = True,
        force_reload: bool = False,
        transform=None,
    ):
        if source not in SOURCES:
            raise ValueError(f"unknown QM9 source {source!r}; choose one of {SOURCES}")
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}; choose one of {GRAPHS}")
        if graph == "radius":
            if cutoff is None or not float(cutoff) > 0:
                raise ValueError("graph='radius' needs a positive cutoff (Angstrom)")
        elif cutoff is not None:
            raise ValueError("cutoff is only used with graph='radius'")
        if max_molecules is not None and int(max_molecules) < 1:
            raise ValueError("max_molecules must be positive")
        self.source = source
        self.graph = graph
        self.cutoff = None if cutoff is None else float(cutoff)
        self.max_molecules = None if max_molecules is None else int(max_molecules)
        self.num_workers = int(num_workers) if num_workers is not None else (os.cpu_count() or 1)
        self.progress = progress
        super().__init__(os.fspath(root), transform=transform, force_reload=force_reload)
        root = Path(self.root)
        if source == "qm9pack":
            self._source: _Source = _Qm9packSource(Path(raw_path) if raw_path is not None else None)
        elif source == "xyz":
            self._source = _XyzSource(Path(raw_path) if raw_path is not None else root / "raw",
                                      Path(uncharacterized) if uncharacterized is not None else None)
        else:
            self._source = _PygSource(Path(raw_path) if raw_path is not None else root / "raw")
        stem = f"qm9_{source}" + (f"_first{self.max_molecules}" if self.max_molecules else "")
        self.cache_path = root / "processed" / f"{stem}.pt"
        self.report_path = root / "processed" / f"{stem}.report.json"
        self._load_or_build(force_reload)

    # ------------------------------------------------------------------------------------ cache

    def _expected_header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "source_hash": self._source.fingerprint(),
            "max_molecules": self.max_molecules,
        }

    def _load_or_build(self, force_reload: bool) -> None:
        expected = self._expected_header()
        status = "built"
        if self.cache_path.exists() and not force_reload:
            try:
                header, payload = _decode_cache(self.cache_path, expected)
                self._set_payload(payload)
                self.cache_status = "loaded"
                return
            except _StaleCache as err:
                warnings.warn(f"QM9 cache {self.cache_path} is stale or corrupt ({err}); rebuilding it",
                              QM9CacheWarning, stacklevel=3)
                status = "rebuilt"
        elif self.cache_path.exists():
            status = "rebuilt"
        payload = self._build(expected)
        atomic_write(self.cache_path, _encode_cache(expected, payload))
        atomic_write(self.report_path, json.dumps(json.loads(payload["report"]), indent=1).encode())
        self._set_payload(payload)
        self.cache_status = status
        failed = self.report["num_failed"]
        if failed:
            warnings.warn(f"QM9: {failed} molecule(s) could not be processed (bond perception) and are not "
                          f"items; they are listed with reasons in {self.report_path}", UserWarning, stacklevel=3)

    def _build(self, header: dict) -> dict:
        t0 = time.perf_counter()
        tasks, total, info = self._source.tasks(self.max_molecules)
        results = _run(tasks, total, self.num_workers, self.progress)
        seen = set()
        z, pos, edge_index, bond_type, y, idx, gdb, smiles, failed = [], [], [], [], [], [], [], [], []
        for k, g, res, smi in results:
            if k in seen:
                raise ValueError(f"QM9 source {self._source.describe()} holds molecule idx {k} twice")
            seen.add(k)
            if isinstance(res, str):
                failed.append({"idx": int(k), "name": f"gdb_{g}", "smiles": smi, "reason": res})
                continue
            zi, pi, ei, bi, yi, si = res
            z.append(zi), pos.append(pi), edge_index.append(ei), bond_type.append(bi), y.append(yi)
            idx.append(k), gdb.append(g), smiles.append(si)
        n_atoms = np.array([len(a) for a in z], dtype=np.int64)
        n_edges = np.array([e.shape[1] for e in edge_index], dtype=np.int64)
        cat = lambda xs, shape, dtype: np.concatenate(xs) if xs else np.zeros(shape, dtype)  # noqa: E731
        payload = {
            "z": torch.from_numpy(cat(z, (0,), np.uint8)),
            "pos": torch.from_numpy(cat(pos, (0, 3), np.float32)),
            "atom_ptr": torch.from_numpy(np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)),
            "edge_index": torch.from_numpy(
                np.concatenate(edge_index, axis=1) if edge_index else np.zeros((2, 0), np.int16)
            ),
            "bond_type": torch.from_numpy(cat(bond_type, (0,), np.int8)),
            "edge_ptr": torch.from_numpy(np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64)),
            "y": torch.from_numpy(np.stack(y) if y else np.zeros((0, 12))),
            "idx": torch.tensor(idx, dtype=torch.long),
            "gdb": torch.tensor(gdb, dtype=torch.long),
            "smiles": smiles,
        }
        failed_idx = np.array([f["idx"] for f in failed], dtype=np.int64)
        per_split = {}
        for name in ("cormorant", "dimenet"):
            parts = split_indices(name)
            per_split[name] = {part: int(np.isin(failed_idx, ind).sum()) for part, ind in parts.items()}
        from rdkit import rdBase

        report = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "source_description": self._source.describe(),
            "source_hash": header["source_hash"],
            "max_molecules": self.max_molecules,
            "num_source_molecules": len(results),
            "num_items": len(idx),
            "num_failed": len(failed),
            "failed": failed,
            "failed_per_split": per_split,
            **info,
            "num_bonds": int(n_edges.sum() // 2),
            "num_atoms": int(n_atoms.sum()),
            "seconds": round(time.perf_counter() - t0, 2),
            "num_workers": self.num_workers,
            "rdkit_version": rdBase.rdkitVersion,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "conventions": {
                "targets": dict(zip(TARGET_NAMES, TARGET_UNITS)),
                "energies": "U0, U, H, G are atomization energies (minus free-atom references); "
                "Hartree -> meV with 27.211386246",
                "bonds": "DetermineConnectivity (distance rule, then extended Hueckel) + SMILES template, "
                "exact match with the SMILES graph required; kekulized (single/double/triple)",
                "failed molecules": "not items; splits are over the full 130,831 ordering and skip them",
            },
        }
        payload["report"] = json.dumps(report)
        return payload

    def _set_payload(self, payload: dict) -> None:
        self._z = payload["z"].long()
        self._pos = payload["pos"]
        self._atom_ptr = payload["atom_ptr"]
        self._edge_index = payload["edge_index"].long()
        self._bond_type = payload["bond_type"].long()
        self._edge_ptr = payload["edge_ptr"]
        self._y = payload["y"]
        self._idx = payload["idx"]
        self._gdb = payload["gdb"]
        self._smiles = list(payload["smiles"])
        self._type = atom_type_index(self._z) if self._z.numel() else self._z
        self.report = json.loads(payload["report"])
        lookup = np.full(max(NUM_MOLECULES, int(self._idx.max()) + 1 if self._idx.numel() else 0), -1, np.int64)
        lookup[self._idx.numpy()] = np.arange(self._idx.numel())
        self._item_of_mol = lookup

    # ------------------------------------------------------------------------------ PyG Dataset

    @property
    def raw_file_names(self):
        return []

    @property
    def processed_file_names(self):
        return [self.cache_path.name]

    def len(self) -> int:
        return int(self._idx.numel())

    def get(self, i: int) -> Data:
        a0, a1 = int(self._atom_ptr[i]), int(self._atom_ptr[i + 1])
        e0, e1 = int(self._edge_ptr[i]), int(self._edge_ptr[i + 1])
        node_attr = torch.nn.functional.one_hot(self._type[a0:a1], len(ATOMIC_NUMBERS)).to(torch.float32)
        return molecule_graph(  # the graph construction shared with molkern.data.featurize
            self._z[a0:a1],  # (N,)
            self._pos[a0:a1],  # (N, 3)
            self._edge_index[:, e0:e1],  # (2, B) both directions
            self._bond_type[e0:e1],  # (B,)
            graph=self.graph,
            cutoff=self.cutoff,
            node_attr=node_attr,  # (N, 5)
            y=self._y[i : i + 1].to(torch.float32),  # (1, 12)
            idx=int(self._idx[i]),
            name=f"gdb_{int(self._gdb[i])}",
            smiles=self._smiles[i],
        )

    def _radius_graph(self, pos: torch.Tensor, bonds: torch.Tensor, btype: torch.Tensor):
        """Radius-graph edges with bond one-hots (:func:`molkern.data.graph.molecule_edges`)."""
        return molecule_edges(pos, bonds, btype, graph="radius", cutoff=self.cutoff)

    # --------------------------------------------------------------------------- indices/splits

    @property
    def mol_idx(self) -> np.ndarray:
        """``idx`` (position in the 130,831 ordering) of every item of this dataset (or view)."""
        return self._idx.numpy()[np.asarray(self.indices(), dtype=np.int64)]

    def items_of(self, mol_indices) -> np.ndarray:
        """Item positions (in the full dataset) of the given molecule indices; molecules without an item
        (failed bond perception, or beyond ``max_molecules``) are skipped."""
        mol = np.asarray(mol_indices, dtype=np.int64).reshape(-1)
        ok = (mol >= 0) & (mol < self._item_of_mol.size)
        items = self._item_of_mol[mol[ok]]
        return items[items >= 0]

    def subset(self, mol_indices) -> "QM9":
        """A view holding the molecules with these ``idx`` values (130,831 ordering), in that order,
        skipping the ones without an item. Works on the full dataset, also when called on a view."""
        view = copy.copy(self)
        view._indices = self.items_of(mol_indices).tolist()
        return view

    def splits(self, name: str = "cormorant", train_subset: Optional[int] = None) -> Dict[str, "QM9"]:
        """``{"train", "val", "test"}`` -> views of the named split (see :meth:`split_indices`)."""
        return {part: self.subset(ind) for part, ind in self.split_indices(name, train_subset=train_subset).items()}

    @staticmethod
    def split_indices(
        name: str, num_molecules: int = NUM_MOLECULES, train_subset: Optional[int] = None
    ) -> Dict[str, np.ndarray]:
        """Molecule indices (130,831 ordering) of a named literature split.

        * ``"cormorant"`` (Cormorant, EGNN, SEGNN, the implicit-kernels paper): ``np.random.seed(0)``
          permutation; 100,000 train / 17,748 val / 13,083 test (``np.split(perm, [100000, 117748])``).
        * ``"dimenet"`` (DimeNet, PaiNN, SchNetPack, TorchMD-Net): ``np.random.RandomState(42)`` permutation;
          ``[:110000]`` / ``[110000:120000]`` / ``[120000:]``.

        numpy's global generator is not touched. For another ``num_molecules`` the part sizes scale in
        proportion (cormorant: test = int(0.1 n)). ``train_subset=N`` keeps the first N training indices
        (for CPU budgets); val and test are unchanged. Failed molecules are included (the split is over the
        full ordering); :meth:`splits` / :meth:`subset` skip them, and ``report["failed_per_split"]`` counts them.

        Returns:
            {"train": (n_train,), "val": (n_val,), "test": (n_test,)} int64 arrays.
        """
        return split_indices(name, num_molecules, train_subset)

    @classmethod
    def save_splits(cls, path, name: str = "cormorant", train_subset: Optional[int] = None,
                    num_molecules: int = NUM_MOLECULES) -> Path:
        """Write a split as ``splits.npz`` (keys ``train_idx``, ``val_idx``, ``test_idx``, ``name``, as in
        SchNetPack / TorchMD-Net). ``path`` is a directory (``path/splits.npz``) or a ``.npz`` file name."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path / "splits.npz"
        parts = split_indices(name, num_molecules, train_subset)
        buf = io.BytesIO()
        np.savez(buf, train_idx=parts["train"], val_idx=parts["val"], test_idx=parts["test"], name=np.array(name))
        atomic_write(path, buf.getvalue())
        return path

    @staticmethod
    def load_splits(path) -> Dict[str, np.ndarray]:
        """Read a ``splits.npz`` written by :meth:`save_splits` -> {"train", "val", "test"}."""
        with np.load(Path(path), allow_pickle=False) as f:
            return {"train": f["train_idx"], "val": f["val_idx"], "test": f["test_idx"]}

    # ---------------------------------------------------------------------------------- targets

    @classmethod
    def target_index(cls, name: str) -> int:
        """Column of a target in ``y`` (e.g. ``"U0"`` -> 7)."""
        try:
            return cls.target_names.index(name)
        except ValueError:
            raise ValueError(f"unknown QM9 target {name!r}; choose one of {cls.target_names}") from None

    @classmethod
    def atomref(cls, name: str) -> Optional[torch.Tensor]:
        """Free-atom reference energies of U0/U/H/G in meV as a (10,) tensor indexed by Z (None for other
        targets): total energy = atomization energy (``y``) + sum of atomref[z]."""
        if name not in ATOM_REF_HARTREE:
            cls.target_index(name)
            return None
        out = torch.zeros(10, dtype=torch.float64)
        for z, e in ATOM_REF_HARTREE[name].items():
            out[z] = e * HARTREE_TO_MEV
        return out

    def targets(self, mol_indices=None) -> torch.Tensor:
        """Targets (float64, in ``target_units``) of the given molecules (default: this dataset/view).

        Shapes:
            -> (M, 12)
        """
        items = np.asarray(self.indices(), dtype=np.int64) if mol_indices is None else self.items_of(mol_indices)
        return self._y[torch.from_numpy(items)]

    def num_atoms(self) -> np.ndarray:
        """Atom count of every item of this dataset or view.

        Shapes:
            -> (num_items,) int64
        """
        items = torch.as_tensor(np.asarray(self.indices(), dtype=np.int64))
        return (self._atom_ptr[items + 1] - self._atom_ptr[items]).numpy().astype(np.int64)

    def target_stats(self, indices=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-target mean and (population, ddof=0) standard deviation over the given molecules.

        Args:
            indices: molecule indices in the 130,831 ordering, normally the training split only
                (``QM9.split_indices(...)["train"]``); molecules without an item are skipped.
                None: every item of this dataset or view.

        Shapes:
            -> mean (12,), std (12,), float32, in ``target_units``
        """
        y = self.targets(indices)
        if y.shape[0] == 0:
            raise ValueError("no molecules to compute target statistics from")
        return y.mean(0).to(torch.float32), y.std(0, unbiased=False).to(torch.float32)

    def __repr__(self) -> str:
        extra = f", cutoff={self.cutoff}" if self.graph == "radius" else ""
        return f"QM9({len(self)}, source={self.source!r}, graph={self.graph!r}{extra})"
