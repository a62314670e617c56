"""Any ASE-readable file of labelled structures (extxyz with energies, forces, optionally stress) as a dataset.

Each frame becomes a PyG ``Data`` with a radius graph (periodic images included, :func:`radius_edges`):

    z (N,) long, pos (N, 3) float32 Angstrom, node_attr (N, K) float32 one-hot over ``elements``,
    edge_index (2, E) long [source j, target i], edge_attr (E, 0) float32, edge_shift (E, 3) float32 Angstrom
    (edge_vec = pos[j] - pos[i] + edge_shift), cell (1, 3, 3) float32 Angstrom (rows = lattice vectors; zeros
    without a cell), pbc (1, 3) bool, energy (1,) float64 eV, forces (N, 3) float32 eV/A, has_forces (1,) bool,
    stress (1, 3, 3) float32 eV/A^3 (ASE sign: positive = tensile; zeros if absent), has_stress (1,) bool,
    frame (1,) long (index of the frame in the dataset).

Labels are read from the frame's calculator results (what ``ase.io.read`` gives for extxyz ``energy``,
``forces``, ``stress`` columns), else from ``atoms.info`` / ``atoms.arrays`` under the same keys. Processing
can be cached (``cache_dir``): the cache key covers the file contents, elements, cutoff and label keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data

from ..io import atomic_path
from .neighbors import radius_edges

__all__ = ["AtomsDataset", "atoms_to_data", "element_numbers", "elements_in_files", "one_hot_elements"]

PathLike = Union[str, os.PathLike]
_CACHE_VERSION = 1


def element_numbers(elements: Sequence[Union[str, int]]) -> Tuple[int, ...]:
    """Element symbols or atomic numbers -> atomic numbers (in the given order, no duplicates)."""
    from ase.data import atomic_numbers

    out = []
    for e in elements:
        if isinstance(e, str):
            if e not in atomic_numbers:
                raise ValueError(f"unknown element symbol {e!r}")
            out.append(int(atomic_numbers[e]))
        else:
            out.append(int(e))
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"elements must be a non-empty list without duplicates, got {list(elements)}")
    return tuple(out)


def one_hot_elements(z, elements: Sequence[int], source: str = "structure") -> torch.Tensor:
    """One-hot node attributes over ``elements`` (atomic numbers in column order).

    Raises:
        ValueError: naming ``source`` and the elements not in the vocabulary.

    Shapes:
        z: (N,) -> (N, len(elements)) float32
    """
    from ase.data import chemical_symbols

    z = np.asarray(z, dtype=np.int64).reshape(-1)
    lut = {int(e): i for i, e in enumerate(elements)}
    unknown = sorted({int(x) for x in z} - set(lut))
    if unknown:
        names = [chemical_symbols[x] for x in unknown]
        known = [chemical_symbols[e] for e in elements]
        raise ValueError(f"{source}: element(s) {names} not in the model's elements {known}")
    idx = torch.tensor([lut[int(x)] for x in z], dtype=torch.long)
    return torch.nn.functional.one_hot(idx, len(elements)).to(torch.float32)


def _label(atoms, key: str):
    """A label from the calculator results, else atoms.info / atoms.arrays; None if absent."""
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", {}) if calc is not None else {}
    if key in results and results[key] is not None:
        return np.asarray(results[key])
    if key in atoms.info:
        return np.asarray(atoms.info[key])
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key])
    return None


def _stress_3x3(value) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape == (6,):
        xx, yy, zz, yz, xz, xy = value  # ASE Voigt order
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if value.size == 9:
        return value.reshape(3, 3)
    raise ValueError(f"stress must have 6 (Voigt) or 9 components, got shape {value.shape}")


def atoms_to_data(
    atoms,
    elements: Sequence[int],
    cutoff: float,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    require_forces: bool = True,
    source: str = "structure",
) -> Data:
    """One labelled ``ase.Atoms`` -> ``Data`` (fields in the module docstring).

    Args:
        elements: atomic numbers of the one-hot columns. cutoff: radius graph cutoff, Angstrom.
        energy_key, forces_key, stress_key: label names. require_forces: error if forces are missing.
        source: names the structure in error messages (e.g. "data/cu.extxyz frame 3").
    """
    energy = _label(atoms, energy_key)
    if energy is None:
        raise ValueError(f"{source}: no energy (looked for {energy_key!r} in calculator results, info, arrays)")
    n = len(atoms)
    forces = _label(atoms, forces_key)
    if forces is None and require_forces:
        raise ValueError(f"{source}: no forces (looked for {forces_key!r}); set require_forces=False to train on "
                         "energies only")
    if forces is not None and np.shape(forces) != (n, 3):
        raise ValueError(f"{source}: forces must have shape ({n}, 3), got {np.shape(forces)}")
    stress = _label(atoms, stress_key)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    if stress is not None and not pbc.all():
        raise ValueError(f"{source}: stress given for a structure that is not periodic in all directions")
    edge_index, shifts = radius_edges(atoms.positions, cutoff, cell if pbc.any() else None, pbc)
    z = torch.as_tensor(atoms.numbers, dtype=torch.long)
    return Data(
        z=z,
        pos=torch.as_tensor(atoms.positions, dtype=torch.float32),
        node_attr=one_hot_elements(atoms.numbers, elements, source),
        edge_index=edge_index,
        edge_attr=torch.zeros(edge_index.shape[1], 0, dtype=torch.float32),
        edge_shift=shifts.to(torch.float32),
        cell=torch.as_tensor(cell, dtype=torch.float32)[None],
        pbc=torch.as_tensor(pbc)[None],
        energy=torch.tensor([float(np.asarray(energy).reshape(-1)[0])], dtype=torch.float64),
        forces=torch.as_tensor(forces if forces is not None else np.zeros((n, 3)), dtype=torch.float32),
        has_forces=torch.tensor([forces is not None]),
        stress=torch.as_tensor(_stress_3x3(stress) if stress is not None else np.zeros((3, 3)),
                               dtype=torch.float32)[None],
        has_stress=torch.tensor([stress is not None]),
    )


def _read(path: Path, index: str):
    import ase.io

    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    try:
        frames = ase.io.read(str(path), index=index)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read by ase.io.read: {err}") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path}: holds no structures (index {index!r})")
    return frames


def elements_in_files(paths: Sequence[PathLike], index: str = ":") -> Tuple[int, ...]:
    """Sorted atomic numbers occurring in the files."""
    found = set()
    for p in paths:
        for atoms in _read(Path(p), index):
            found.update(int(x) for x in atoms.numbers)
    return tuple(sorted(found))


class AtomsDataset(torch.utils.data.Dataset):
    """All frames of one or more ASE-readable files, as radius graphs with energy / force / stress labels.

    Args:
        paths: one file or a list (any format ``ase.io.read`` knows; labels as in extxyz).
        elements: element symbols or atomic numbers of the one-hot columns (None: those in the files, by Z).
        cutoff: radius-graph cutoff in Angstrom (at least the model's cutoff).
        index: ``ase.io.read`` index for every file (":" = all frames).
        energy_key, forces_key, stress_key, require_forces: see :func:`atoms_to_data`.
        cache_dir: if given, processed graphs are saved there and reused while the inputs are unchanged.

    Attributes:
        elements (atomic numbers), sources (list of (file, frame in file)), num_atoms (M,) long.
    """

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        elements: Optional[Sequence[Union[str, int]]] = None,
        cutoff: float = 5.0,
        index: str = ":",
        energy_key: str = "energy",
        forces_key: str = "forces",
        stress_key: str = "stress",
        require_forces: bool = True,
        cache_dir: Optional[PathLike] = None,
    ):
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("paths is empty: give at least one structure file")
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"structure file {p} does not exist")
        if not float(cutoff) > 0:
            raise ValueError(f"cutoff must be positive (Angstrom), got {cutoff}")
        self.cutoff = float(cutoff)
        self.elements = element_numbers(elements) if elements is not None else None
        options = dict(index=index, energy_key=energy_key, forces_key=forces_key, stress_key=stress_key,
                       require_forces=require_forces)
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) / f"atoms-{self._fingerprint(options)}.pt"
            if cache.is_file():
                self._load(cache)
                return
        self._process(options)
        if cache is not None:
            self._save(cache)

    def _fingerprint(self, options: dict) -> str:
        h = hashlib.sha256()
        for p in self.paths:
            h.update(str(p.resolve()).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(json.dumps([_CACHE_VERSION, self.cutoff, self.elements, options], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def _process(self, options: dict) -> None:
        frames = [(p, i, atoms) for p in self.paths for i, atoms in enumerate(_read(p, options["index"]))]
        if self.elements is None:
            self.elements = tuple(sorted({int(x) for _, _, a in frames for x in a.numbers}))
        keys = {k: options[k] for k in ("energy_key", "forces_key", "stress_key", "require_forces")}
        self.items: List[Data] = [
            atoms_to_data(a, self.elements, self.cutoff, source=f"{p} frame {i}", **keys) for p, i, a in frames
        ]
        self.sources = [(str(p), i) for p, i, _ in frames]
        for k, d in enumerate(self.items):
            d.frame = torch.tensor([k])

    def _save(self, path: Path) -> None:
        payload = {
            "elements": list(self.elements),
            "sources": [[s, i] for s, i in self.sources],
            "items": [{k: v for k, v in d.items()} for d in self.items],
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    def _load(self, path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        self.elements = tuple(int(e) for e in payload["elements"])
        self.sources = [(s, int(i)) for s, i in payload["sources"]]
        self.items = [Data(**fields) for fields in payload["items"]]

    @property
    def num_atoms(self) -> torch.Tensor:
        return torch.tensor([d.num_nodes for d in self.items], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Data:
        return self.items[idx]

    def __repr__(self) -> str:
        return f"AtomsDataset({len(self)} structures from {[str(p) for p in self.paths]}, cutoff={self.cutoff})"
