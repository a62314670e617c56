"""ModelNet-40 point clouds as users have them on disk, and an offline procedural dataset in the same format.

Two on-disk layouts are read (nothing is downloaded):

* **text** (the widely used ``modelnet40_normal_resampled``): ``<root>/<prefix>_shape_names.txt`` (one class
  per line), ``<prefix>_train.txt`` / ``<prefix>_test.txt`` (one shape id per line, e.g. ``night_stand_0001``)
  and ``<root>/<class>/<id>.txt`` with one point per line: ``x,y,z,nx,ny,nz``.
* **OFF** (the original ``ModelNet40``): ``<root>/<class>/train|test/<id>.off`` triangle/polygon meshes,
  sampled here to points with normals (area-weighted, :func:`molkern.data.shapes.sample_surface`).

:func:`write_procedural_dataset` writes the shapes of :mod:`molkern.data.shapes` in either layout, so the
whole pipeline runs on a fresh machine. :class:`ModelNet` loads either layout, normalises each cloud to
the unit ball, splits the training list 80/20 into train/val (stratified, seeded) and rotates clouds by
random elements of a chosen group (paper section 5.3: rotations about z).

Units: ModelNet coordinates are arbitrary; after normalisation the cloud is centred at its centroid and
its farthest point lies at distance 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data

from ..io import atomic_path, atomic_write
from .shapes import SHAPE_CLASSES, generate_mesh, sample_surface

__all__ = [
    "SPLITS",
    "ModelNet",
    "detect_format",
    "list_shapes",
    "read_off",
    "read_points_txt",
    "write_off",
    "write_points_txt",
    "write_procedural_dataset",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------------- file formats
def read_off(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Read an OFF mesh; polygons are fan-triangulated. Accepts ModelNet's ``OFF<nv> <nf> <ne>`` first line.

    Shapes:
        -> vertices (V, 3) float64, faces (F, 3) int64.
    """
    path = Path(path)
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines or not lines[0].startswith("OFF"):
        first = lines[0][:40] if lines else "<empty file>"
        raise ValueError(f"{path}: broken OFF header: first line must start with 'OFF', got {first!r}")
    head, body = lines[0][3:].split(), lines[1:]
    if not head and body:  # counts on their own line (the usual case)
        head, body = body[0].split(), body[1:]
    try:
        num_vertices, num_faces = int(head[0]), int(head[1])
    except (IndexError, ValueError):
        expected = "'num_vertices num_faces num_edges'"
        raise ValueError(f"{path}: broken OFF header: expected {expected}, got {head}") from None
    if num_vertices <= 0 or num_faces <= 0:
        raise ValueError(f"{path}: empty mesh ({num_vertices} vertices, {num_faces} faces)")
    if len(body) < num_vertices + num_faces:
        raise ValueError(
            f"{path}: truncated OFF file: header announces {num_vertices} vertices and {num_faces} faces, "
            f"found {len(body)} data lines"
        )
    try:
        vertices = np.array([line.split()[:3] for line in body[:num_vertices]], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: bad vertex line ({err})") from None
    if vertices.shape != (num_vertices, 3):
        raise ValueError(f"{path}: every vertex line needs 3 coordinates")
    faces = []
    for k, line in enumerate(body[num_vertices : num_vertices + num_faces]):
        tokens = line.split()
        try:
            n = int(tokens[0])
            idx = [int(t) for t in tokens[1 : 1 + n]]
        except ValueError:
            raise ValueError(f"{path}: bad face line {k + 1}: {line[:60]!r}") from None
        if n < 3 or len(idx) != n:
            raise ValueError(f"{path}: face line {k + 1} needs a count >= 3 and that many indices, got {line[:60]!r}")
        faces.extend((idx[0], idx[i], idx[i + 1]) for i in range(1, n - 1))
    faces = np.asarray(faces, dtype=np.int64)
    if faces.min() < 0 or faces.max() >= num_vertices:
        raise ValueError(f"{path}: face indices must lie in [0, {num_vertices}), got [{faces.min()}, {faces.max()}]")
    return vertices, faces


def read_points_txt(path: PathLike, max_points: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read a resampled ModelNet text file (``x,y,z,nx,ny,nz`` per line), the first ``max_points`` lines.

    Shapes:
        -> points (n, 3) float64, normals (n, 3) float64 (as stored, normally unit length).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            data = np.loadtxt(path, delimiter=",", max_rows=max_points, ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: expected 6 comma-separated numbers per line (x,y,z,nx,ny,nz): {err}") from None
    if data.size == 0:
        raise ValueError(f"{path}: no points")
    if data.shape[1] != 6:
        raise ValueError(f"{path}: expected 6 columns (x,y,z,nx,ny,nz), got {data.shape[1]}")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: non-finite values")
    return data[:, :3], data[:, 3:]


def write_points_txt(path: PathLike, points: np.ndarray, normals: np.ndarray) -> None:
    """Write points and normals in the resampled ModelNet text format (atomically)."""
    rows = np.concatenate([np.asarray(points), np.asarray(normals)], axis=1)
    atomic_write(Path(path), "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n")


def write_off(path: PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh as OFF (atomically)."""
    lines = ["OFF", f"{len(vertices)} {len(faces)} 0"]
    lines += [f"{x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"3 {a} {b} {c}" for a, b, c in faces]
    atomic_write(Path(path), "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- dataset layouts
def _text_prefix(root: Path, prefix: Optional[str] = None) -> Optional[str]:
    """The list prefix of a text-layout root: ``prefix`` if given, else "modelnet40" if present, else the only one."""
    found = sorted(p.name[: -len("_shape_names.txt")] for p in root.glob("*_shape_names.txt"))
    if prefix is not None:
        if prefix not in found:
            raise ValueError(f"{root}: no {prefix}_shape_names.txt (found prefixes {found})")
        return prefix
    if "modelnet40" in found:
        return "modelnet40"
    if len(found) > 1:
        raise ValueError(f"{root}: several list prefixes {found}; choose one with prefix=")
    return found[0] if found else None


def detect_format(root: PathLike) -> str:
    """"txt" if ``root`` holds a ``*_shape_names.txt`` list, "off" if it holds ``<class>/train`` mesh folders."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory (ModelNet is never downloaded; give the folder you have)")
    if any(root.glob("*_shape_names.txt")):
        return "txt"
    if any((d / "train").is_dir() or (d / "test").is_dir() for d in root.iterdir() if d.is_dir()):
        return "off"
    raise ValueError(
        f"{root}: neither the text layout (<prefix>_shape_names.txt, <prefix>_train.txt, <class>/<id>.txt) "
        "nor the OFF layout (<class>/train/*.off, <class>/test/*.off) was found"
    )


def _read_list(path: Path) -> List[str]:
    if not path.is_file():
        raise ValueError(f"{path}: missing list file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def list_shapes(root: PathLike, part: str, prefix: Optional[str] = None) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """Class names and the (file, label) pairs of the ``part`` ("train" or "test") list of a dataset root.

    ``prefix`` picks the lists of a text layout (e.g. "modelnet10"; default "modelnet40" or the only one).
    """
    root = Path(root)
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    if detect_format(root) == "txt":
        prefix = _text_prefix(root, prefix)
        classes = _read_list(root / f"{prefix}_shape_names.txt")
        label = {c: i for i, c in enumerate(classes)}
        items = []
        for shape_id in _read_list(root / f"{prefix}_{part}.txt"):
            cls = shape_id.rsplit("_", 1)[0]
            if cls not in label:
                raise ValueError(f"{root / f'{prefix}_{part}.txt'}: shape {shape_id!r} has unknown class {cls!r}")
            items.append((root / cls / f"{shape_id}.txt", label[cls]))
        return classes, items
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c / part).glob("*.off"))]
    return classes, items


def write_procedural_dataset(
    root: PathLike,
    num_train_per_class: int = 40,
    num_test_per_class: int = 10,
    num_points: int = 1024,
    classes: Sequence[str] = SHAPE_CLASSES,
    seed: int = 0,
    format: str = "txt",
    prefix: str = "shapes",
) -> Path:
    """Write the procedural shapes of :mod:`molkern.data.shapes` under ``root`` in a ModelNet layout.

    "txt": ``num_points`` surface samples with normals per shape, as resampled ModelNet-40 (lists named
    ``<prefix>_shape_names.txt``, ``<prefix>_train.txt``, ``<prefix>_test.txt``); "off": the meshes, as the
    original ModelNet-40. Deterministic in ``seed``; every file is written atomically and the lists last,
    with ``<prefix>_meta.json`` holding the parameters: a second call with the same parameters does nothing.

    Returns:
        root as a Path.
    """
    root = Path(root)
    if format not in ("txt", "off"):
        raise ValueError(f"format must be 'txt' or 'off', got {format!r}")
    unknown = sorted(set(classes) - set(SHAPE_CLASSES))
    if unknown:
        raise ValueError(f"unknown shape classes {unknown}; choose from {SHAPE_CLASSES}")
    params = {"version": FORMAT_VERSION, "num_train_per_class": num_train_per_class, "seed": seed,
              "num_test_per_class": num_test_per_class, "num_points": num_points, "classes": list(classes),
              "format": format}  # fmt: skip
    meta = root / f"{prefix}_meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == params:
        return root
    lists: Dict[str, List[str]] = {"train": [], "test": []}
    for c, name in enumerate(classes):
        rng = np.random.default_rng([seed, c])
        for i in range(num_train_per_class + num_test_per_class):
            part = "train" if i < num_train_per_class else "test"
            shape_id = f"{name}_{i + 1:04d}"
            vertices, faces = generate_mesh(name, rng)
            if format == "off":
                write_off(root / name / part / f"{shape_id}.off", vertices, faces)
            else:
                write_points_txt(root / name / f"{shape_id}.txt", *sample_surface(vertices, faces, num_points, rng))
            lists[part].append(shape_id)
    if format == "txt":
        atomic_write(root / f"{prefix}_shape_names.txt", "\n".join(classes) + "\n")
        for part, ids in lists.items():
            atomic_write(root / f"{prefix}_{part}.txt", "\n".join(ids) + "\n")
    atomic_write(meta, json.dumps(params, indent=1))
    return root


# ------------------------------------------------------------------------------------------------- loading
def _normalize(points: np.ndarray) -> np.ndarray:
    points = points - points.mean(0)
    return points / max(np.linalg.norm(points, axis=1).max(), 1e-12)


def _load_file(path: Path, num_points: int, seed: int) -> np.ndarray:
    """(num_points, 6) [points, unit normals] of one file."""
    if path.suffix == ".off":
        vertices, faces = read_off(path)
        try:
            points, normals = sample_surface(vertices, faces, num_points, np.random.default_rng(seed))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    else:
        if not path.is_file():
            raise ValueError(f"{path}: missing point file (listed in the split list)")
        points, normals = read_points_txt(path, max_points=num_points)
        if len(points) < num_points:
            raise ValueError(f"{path}: has {len(points)} points, fewer than the {num_points} requested")
        norm = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = normals / np.where(norm > 0, norm, 1.0)
    return np.concatenate([_normalize(points), normals], axis=1)


def _load_part(root: Path, part: str, num_points: int, seed: int, cache_dir: Optional[Path], prefix=None):
    """Classes, clouds (S, num_points, 6) float32, labels (S,) of the train or test list, cached as .npz."""
    classes, items = list_shapes(root, part, prefix)
    if not items:
        raise ValueError(f"{root}: the {part} list is empty")
    key = json.dumps([FORMAT_VERSION, part, num_points, seed, classes, [str(p.relative_to(root)) for p, _ in items]])
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"{part}_{num_points}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
        if cache.is_file():
            try:
                with np.load(cache) as f:
                    return classes, f["clouds"], f["labels"]
            except Exception as err:  # noqa: BLE001 - a broken cache is rebuilt, never used
                log.warning("ignoring unreadable cache %s (%s)", cache, err)
    clouds = np.stack([_load_file(p, num_points, seed + i).astype(np.float32) for i, (p, _) in enumerate(items)])
    labels = np.array([label for _, label in items], dtype=np.int64)
    if cache is not None:
        try:
            with atomic_path(cache) as tmp:
                np.savez(tmp, clouds=clouds, labels=labels)
        except OSError as err:
            log.warning("could not write cache %s (%s); continuing without it", cache, err)
    return classes, clouds, labels


def _val_indices(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Stratified, seeded choice of round(val_fraction * n_c) shapes of every class c."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        picked.append(idx[: int(round(val_fraction * len(idx)))])
    return np.sort(np.concatenate(picked))


class ModelNet(torch.utils.data.Dataset):
    """ModelNet-40 (text or OFF layout, auto-detected) or the procedural dataset, as PyG ``Data`` items.

    The test split is the ``test`` list; train and val split the ``train`` list ``1 - val_fraction`` /
    ``val_fraction`` per class (seeded by ``split_seed``). Each cloud is the first ``num_points`` points of
    a text file, or ``num_points`` area-weighted samples of an OFF mesh (seeded), centred and scaled to the
    unit ball. Loaded clouds are cached under ``cache_dir`` (default ``<root>/processed``; None: no cache).
    ``prefix`` selects the lists of a text layout ("modelnet10"; default "modelnet40" or the only one).

    Augmentation: each item is rotated by an element R of ``augment`` (a group name such as "so2", a
    molkern Group, or None): ``pos <- pos R^T``, ``normal <- normal R^T`` (normals are "1o"). The train split
    draws a fresh element at every access (from a generator seeded by ``augment_seed``, or by the DataLoader
    worker's per-epoch seed inside workers); val and test use
    one fixed element per item (seeded), so evaluation is deterministic.

    Shapes (per item):
        pos (num_points, 3), normal (num_points, 3) unit, y (1,) int64 class index, idx (1,) int64,
        rot (1, 3, 3) the group element applied (identity without augmentation).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        num_points: int = 1024,
        augment=None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment_seed: int = 0,
        sample_seed: int = 0,
        cache_dir: Optional[PathLike] = "default",
        prefix: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.root, self.split, self.num_points, self.dtype = Path(root), split, int(num_points), dtype
        self.format = detect_format(self.root)
        cache = self.root / "processed" if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        part = "test" if split == "test" else "train"
        self.classes, clouds, labels = _load_part(self.root, part, self.num_points, sample_seed, cache, prefix)
        if split != "test":
            val = _val_indices(labels, val_fraction, split_seed)
            keep = val if split == "val" else np.setdiff1d(np.arange(len(labels)), val)
            clouds, labels = clouds[keep], labels[keep]
        if len(labels) == 0:
            raise ValueError(f"{self.root}: the {split} split is empty")
        self.clouds = torch.from_numpy(np.ascontiguousarray(clouds)).to(dtype)  # (S, num_points, 6)
        self.labels = torch.from_numpy(labels)  # (S,)
        if isinstance(augment, str):
            from .. import groups

            augment = groups.get(augment)
        self.augment = augment
        self._generator = torch.Generator().manual_seed(augment_seed)
        self._worker_seed = None
        self._fixed = None
        if augment is not None and split != "train":
            gen = torch.Generator().manual_seed(augment_seed + 7919 * (1 + SPLITS.index(split)))
            self._fixed = augment.sample(len(self.labels), generator=gen, dtype=torch.float64)  # (S, 3, 3)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> Data:
        cloud = self.clouds[idx]  # (num_points, 6)
        pos, normal = cloud[:, :3], cloud[:, 3:]
        R = torch.eye(3, dtype=self.dtype)
        if self.augment is not None:
            if self._fixed is not None:
                R = self._fixed[idx]
            else:
                info = torch.utils.data.get_worker_info()
                if info is not None and info.seed != self._worker_seed:  # DataLoader workers: own stream per epoch
                    self._worker_seed = info.seed
                    self._generator.manual_seed(info.seed)
                R = self.augment.sample(1, generator=self._generator, dtype=torch.float64)[0]
            R = R.to(self.dtype)
            pos, normal = pos @ R.T, normal @ R.T
        return Data(pos=pos, normal=normal, y=self.labels[idx].view(1), idx=torch.tensor([idx]), rot=R[None])

    def __repr__(self) -> str:
        return (f"ModelNet({str(self.root)!r}, split={self.split!r}, format={self.format!r}, "
                f"shapes={len(self)}, classes={self.num_classes}, num_points={self.num_points})")
