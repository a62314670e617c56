"""QM9 raw sources: the bundled qm9pack CSV files, the original dsgdb9nsd xyz files, PyG's raw sdf/csv."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import tarfile
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .constants import NUM_GDB9, NUM_MOLECULES, _PYG_COLUMNS, _QM9PACK_COLUMNS


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
