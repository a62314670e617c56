"""The QM9 dataset class (see the package docstring for conventions)."""

from __future__ import annotations

import copy
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data, Dataset

from ...io import atomic_write
from ..bonds import ATOMIC_NUMBERS, atom_type_index
from ..graph import molecule_edges, molecule_graph
from .constants import (
    ATOM_REF_HARTREE, FORMAT_VERSION, GRAPHS, HARTREE_TO_MEV, NUM_MOLECULES, SOURCES, TARGET_NAMES, TARGET_UNITS,
    QM9CacheWarning, _StaleCache,
)
from .processing import _decode_cache, _encode_cache, _run
from .sources import _PygSource, _Qm9packSource, _Source, _XyzSource
from .splits import split_indices


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
