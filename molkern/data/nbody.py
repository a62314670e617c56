"""Spring N-body system with a plane spring (the paper's N-body task), and its dataset.

The simulator follows the generator of the paper's authors (derived from the EGNN / SEGNN
``SpringSim``): 5 unit-mass particles, zero-rest-length Hooke springs between random pairs, and a
vertical spring of stiffness ``k`` per particle whose anchor slides freely in the XY plane. With
``k > 0`` the dynamics are equivariant to rotations about z, reflections in vertical planes and XY
translations only; with ``k = 0`` to all of E(3).

Units: dimensionless simulation units (mass 1, time step 0.001, spring constant 0.1). Everything
here is float64 until the dataset hands tensors out in the requested dtype.

Equations of motion (e_ij in {0, 1}, symmetric, e_ii = 0; kappa = 0.1)::

    F_i = clip( -kappa sum_j e_ij (x_i - x_j) + (0, 0, -k (z_i - L_i)), -100, 100 )   # per component

integrated by semi-implicit (symplectic) Euler exactly as the authors' code does it::

    v <- v + dt F(x)                              # initial kick
    for i in 1 .. num_steps - 1:
        x <- x + dt v
        if i % sample_every == 0: record (x, v)    # frame m holds the state at step sample_every (m + 1)
        v <- v + dt F(x)

so the default 5000 steps give 49 frames. The authors' code also reflects the initial positions at a
box of half-width 5; at a position spread of 0.5 that never triggers (10 standard deviations), so it
is omitted.

Task (SEGNN's "nbody_small"): from positions and velocities at frame 30 predict the positions at
frame 40 (1.0 time units later). The model outputs a displacement (one ``1o`` vector per particle).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data, Dataset
from tqdm.auto import tqdm

__all__ = [
    "NUM_PARTICLES",
    "SPRING_CONSTANT",
    "DT",
    "NUM_STEPS",
    "SAMPLE_EVERY",
    "MAX_FORCE",
    "FRAME_IN",
    "FRAME_OUT",
    "DEFAULT_SIZES",
    "SPLITS",
    "FORMAT_VERSION",
    "IRREPS_NODE_ATTRS",
    "IRREPS_EDGE_ATTRS",
    "IRREPS_OUT",
    "Trajectories",
    "sample_initial_conditions",
    "forces",
    "simulate",
    "split_seed",
    "full_edge_index",
    "NBody",
]

logger = logging.getLogger(__name__)

# --- protocol constants (background.md section 4.1) -------------------------------------------------
NUM_PARTICLES = 5
LOC_STD = 0.5  # x(0) ~ N(0, LOC_STD^2) per coordinate
VEL_NORM = 0.5  # |v(0)| = VEL_NORM in a uniformly random direction
SPRING_PROB = 0.5  # probability that a pair is joined by a spring
SPRING_CONSTANT = 0.1  # kappa of the inter-particle springs
MAX_FORCE = 100.0  # per-component force clip (0.1 / dt in the authors' code)
DT = 0.001
NUM_STEPS = 5000
SAMPLE_EVERY = 100
FRAME_IN = 30
FRAME_OUT = 40

SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 3000, "val": 2000, "test": 2000}

#: Bump whenever the cache content or the way it is generated changes; old caches are then regenerated.
FORMAT_VERSION = 1

#: Layout of ``Data.node_attr``: [L_i, vx, vy, vz].
IRREPS_NODE_ATTRS = "1x0e+1x1o"
#: Layout of ``Data.edge_attr``: the spring indicator e_ij.
IRREPS_EDGE_ATTRS = "1x0e"
#: What a model predicts per particle: the displacement from frame ``frame_in`` to ``frame_out``.
IRREPS_OUT = "1x1o"

SeedLike = Union[None, int, np.random.SeedSequence]


class Trajectories(NamedTuple):
    """Output of :func:`simulate` (numpy float64 arrays).

    Shapes:
        positions: (num_sims, num_frames, 5, 3)
        velocities: (num_sims, num_frames, 5, 3)
        springs: (num_sims, 5, 5) symmetric spring indicator e_ij, zero diagonal
        rest_lengths: (num_sims, 5) plane-spring rest lengths L_i
    """

    positions: np.ndarray
    velocities: np.ndarray
    springs: np.ndarray
    rest_lengths: np.ndarray


# --- argument checks --------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_stiffness(stiffness: Any) -> float:
    try:
        k = float(stiffness)
    except (TypeError, ValueError):
        raise ValueError(f"stiffness must be a non-negative number, got {stiffness!r}") from None
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"stiffness must be a finite number >= 0, got {stiffness!r}")
    return k


def _check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _seed_sequence(seed: SeedLike) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if seed is None:
        return np.random.SeedSequence()
    return np.random.SeedSequence(_check_int("seed", seed, 0))


# --- simulation -------------------------------------------------------------------------------------
def sample_initial_conditions(
    num_sims: int, seed: SeedLike = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw initial conditions as the authors' generator does.

    Springs, positions, velocities and rest lengths come from four independent streams spawned from
    ``seed``, each filled one simulation after the other, so the first n systems drawn with a seed are
    the same whatever ``num_sims`` >= n is (a 3000-sample set is a prefix of a 10000-sample set).

    Args:
        num_sims: number of independent systems (>= 1).
        seed: int, ``numpy.random.SeedSequence`` or None (fresh entropy, not reproducible).

    Returns:
        ``(pos0, vel0, springs, rest_lengths)``.

    Shapes:
        pos0, vel0: (num_sims, 5, 3); springs: (num_sims, 5, 5); rest_lengths: (num_sims, 5).
    """
    num_sims = _check_int("num_sims", num_sims, 1)
    n = NUM_PARTICLES
    rng_springs, rng_pos, rng_vel, rng_len = (np.random.default_rng(s) for s in _seed_sequence(seed).spawn(4))

    lower = np.tril(rng_springs.random((num_sims, n, n)) < SPRING_PROB, k=-1).astype(np.float64)
    springs = lower + lower.transpose(0, 2, 1)  # (S, 5, 5), symmetric, zero diagonal
    pos0 = LOC_STD * rng_pos.standard_normal((num_sims, n, 3))
    g = rng_vel.standard_normal((num_sims, n, 3))
    vel0 = VEL_NORM * g / np.linalg.norm(g, axis=-1, keepdims=True)
    rest_lengths = rng_len.random((num_sims, n))
    return pos0, vel0, springs, rest_lengths


def _laplacian(springs: np.ndarray) -> np.ndarray:
    """(S, 5, 5) matrix A with A @ x = -kappa sum_j e_ij (x_i - x_j)."""
    degree = springs.sum(axis=-1)  # (S, 5)
    return SPRING_CONSTANT * (springs - degree[..., :, None] * np.eye(springs.shape[-1]))


def _forces(
    x: np.ndarray, lap: np.ndarray, rest_lengths: np.ndarray, stiffness: float, clip: bool
) -> np.ndarray:
    f = np.matmul(lap, x)  # (S, 5, 3)
    if stiffness != 0.0:
        f[..., 2] -= stiffness * (x[..., 2] - rest_lengths)
    if clip:
        np.clip(f, -MAX_FORCE, MAX_FORCE, out=f)
    return f


def forces(
    pos: np.ndarray, springs: np.ndarray, rest_lengths: np.ndarray, stiffness: float, clip: bool = True
) -> np.ndarray:
    """Forces on every particle (unit masses, so also the accelerations).

    Shapes:
        pos: (S, 5, 3); springs: (S, 5, 5); rest_lengths: (S, 5) -> (S, 5, 3).
    """
    k = _check_stiffness(stiffness)
    pos, springs, rest_lengths = (np.asarray(a, dtype=np.float64) for a in (pos, springs, rest_lengths))
    return _forces(pos, _laplacian(springs), rest_lengths, k, clip)


def _check_initial(initial: Sequence[Any], num_sims: Optional[int]):
    try:
        pos0, vel0, springs, rest_lengths = (np.array(a, dtype=np.float64) for a in initial)
    except (TypeError, ValueError) as err:
        raise ValueError("initial must be a tuple (pos0, vel0, springs, rest_lengths) of arrays") from err
    n = NUM_PARTICLES
    s = pos0.shape[0] if pos0.ndim == 3 else -1
    expected = {"pos0": (s, n, 3), "vel0": (s, n, 3), "springs": (s, n, n), "rest_lengths": (s, n)}
    for name, arr in zip(expected, (pos0, vel0, springs, rest_lengths)):
        if s < 1 or arr.shape != expected[name]:
            raise ValueError(
                f"initial: {name} has shape {arr.shape}, expected (num_sims, ...) = {expected[name]} with num_sims >= 1"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"initial: {name} contains non-finite values")
    if num_sims is not None and _check_int("num_sims", num_sims, 1) != s:
        raise ValueError(f"num_sims={num_sims} does not match the {s} systems given in initial")
    if not np.array_equal(springs, springs.transpose(0, 2, 1)):
        raise ValueError("initial: springs must be symmetric")
    if np.any(np.diagonal(springs, axis1=1, axis2=2) != 0):
        raise ValueError("initial: springs must have a zero diagonal (no self springs)")
    return pos0, vel0, springs, rest_lengths


def simulate(
    num_sims: Optional[int],
    stiffness: float,
    seed: SeedLike = None,
    *,
    num_steps: int = NUM_STEPS,
    sample_every: int = SAMPLE_EVERY,
    dt: float = DT,
    clip: bool = True,
    initial: Optional[Sequence[Any]] = None,
    progress: bool = False,
) -> Trajectories:
    """Simulate many spring systems at once (numpy float64, vectorised over systems).

    Args:
        num_sims: number of systems (>= 1). May be None when ``initial`` is given.
        stiffness: plane-spring stiffness k >= 0 (0 recovers the EGNN/SEGNN N-body system).
        seed: int, ``numpy.random.SeedSequence`` or None; ignored when ``initial`` is given.
        num_steps: integration steps T (the default 5000 gives 49 frames).
        sample_every: record a frame every this many steps.
        dt: time step.
        clip: clip each force component to [-100, 100] as the authors' code does.
        initial: optional explicit ``(pos0, vel0, springs, rest_lengths)`` with the shapes returned by
            :func:`sample_initial_conditions`.
        progress: show a tqdm bar over the integration steps.

    Returns:
        :class:`Trajectories`; frame m holds the state at step ``sample_every * (m + 1)``.

    Shapes:
        positions, velocities: (num_sims, (num_steps - 1) // sample_every, 5, 3);
        springs: (num_sims, 5, 5); rest_lengths: (num_sims, 5).
    """
    k = _check_stiffness(stiffness)
    num_steps = _check_int("num_steps", num_steps, 2)
    sample_every = _check_int("sample_every", sample_every, 1)
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    num_frames = (num_steps - 1) // sample_every
    if num_frames < 1:
        raise ValueError(
            f"num_steps={num_steps} records no frame with sample_every={sample_every}; need num_steps > sample_every"
        )
    if initial is None:
        if num_sims is None:
            raise ValueError("num_sims must be given when initial is None")
        pos0, vel0, springs, rest_lengths = sample_initial_conditions(num_sims, seed)
    else:
        pos0, vel0, springs, rest_lengths = _check_initial(initial, num_sims)

    s, n = pos0.shape[:2]
    lap = _laplacian(springs)  # (S, 5, 5)
    positions = np.empty((s, num_frames, n, 3))
    velocities = np.empty((s, num_frames, n, 3))
    x = pos0.copy()  # (S, 5, 3)
    v = vel0 + dt * _forces(x, lap, rest_lengths, k, clip)  # initial kick
    step = np.empty_like(x)
    frame = 0
    for i in tqdm(range(1, num_steps), desc="N-body steps", disable=not progress, leave=False):
        np.multiply(v, dt, out=step)
        x += step
        if i % sample_every == 0:
            positions[:, frame] = x
            velocities[:, frame] = v
            frame += 1
            if frame == num_frames:
                break  # the remaining kicks and drifts would never be recorded
        f = _forces(x, lap, rest_lengths, k, clip)
        np.multiply(f, dt, out=step)
        v += step
    return Trajectories(positions, velocities, springs, rest_lengths)


# --- graph ------------------------------------------------------------------------------------------
def full_edge_index(num_nodes: int = NUM_PARTICLES) -> torch.Tensor:
    """Fully connected directed graph without self loops, sorted by source.

    ``edge_index[0]`` is the source j, ``edge_index[1]`` the target i (PyG convention).

    Shapes:
        -> (2, num_nodes * (num_nodes - 1)) int64
    """
    src, dst = torch.meshgrid(torch.arange(num_nodes), torch.arange(num_nodes), indexing="ij")
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


def split_seed(seed: int, split: str) -> np.random.SeedSequence:
    """The seed sequence a split is generated from (independent streams per split, same for every k).

    Because it does not depend on the stiffness, the datasets for different k share their initial
    conditions, so differences between them come from the plane spring alone.
    """
    return np.random.SeedSequence(_check_int("seed", seed, 0), spawn_key=(SPLITS.index(_check_split(split)),))


# --- dataset ----------------------------------------------------------------------------------------
_ARRAY_KEYS = ("pos", "vel", "pos_out", "vel_out", "springs", "rest_lengths")


class NBody(Dataset):
    """The paper's N-body task as a PyG dataset, generated locally and cached under ``root``.

    Each item is a :class:`torch_geometric.data.Data` for one 5-particle system with the fields
    ``pos`` (positions at ``frame_in``), ``vel`` (velocities at ``frame_in``), ``node_attr``
    ``[L_i, vx, vy, vz]`` laid out as :data:`IRREPS_NODE_ATTRS`, ``edge_index`` (the 20 directed edges
    of the complete graph, source first), ``edge_attr`` (the spring indicator e_ij of each edge), ``y``
    (positions at ``frame_out``) and ``target_displacement = y - pos``. Predict
    ``pos + model(...)`` and compare with ``y`` (MSE, as SEGNN and the paper report).
    The fields are named ``node_attr`` / ``edge_attr`` (PyG's singular style): PyG's ``Data`` has
    methods ``node_attrs()`` / ``edge_attrs()`` that would shadow fields of those names.

    Generation is deterministic: the split's systems come from :func:`split_seed` ``(seed, split)``
    (train, val and test use different streams; every stiffness uses the same initial conditions) and
    the first n systems do not depend on ``num_samples`` >= n. The simulation is cached as one file per
    (split, stiffness, size, seed) under ``root``, written atomically with the format version and all
    generation parameters inside. A file that fails to load or whose version or parameters differ is
    regenerated with a logged warning, never used.

    Args:
        root: cache directory (created if missing).
        split: "train", "val" or "test".
        stiffness: plane-spring stiffness k >= 0.
        num_samples: number of systems; default 3000 / 2000 / 2000 for train / val / test (the
            paper's 3000 training systems).
        seed: base seed (the authors' default is 42).
        frame_in, frame_out: input and target frames (0-based, frame m = step 100 (m + 1)).
        clip: clip force components at +-100 as the authors' code does.
        dtype: floating dtype of the tensors handed out (the cache is float64).
        transform: PyG transform applied on access.
        force_reload: regenerate even if a valid cache exists.
        progress: show a tqdm bar while simulating.

    Attributes:
        path: the cache file.
        loaded_from_cache: True if this instance read the cache, False if it (re)generated it.
        params: the generation parameters stored in the cache.

    Shapes (per item):
        pos, vel, y, target_displacement: (5, 3); node_attr: (5, 4); edge_index: (2, 20);
        edge_attr: (20, 1).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        *,
        stiffness: float,
        num_samples: Optional[int] = None,
        seed: int = 42,
        frame_in: int = FRAME_IN,
        frame_out: int = FRAME_OUT,
        clip: bool = True,
        dtype: torch.dtype = torch.float32,
        transform=None,
        force_reload: bool = False,
        progress: bool = False,
    ):
        self.split = _check_split(split)
        self.stiffness = _check_stiffness(stiffness)
        self.num_samples = DEFAULT_SIZES[split] if num_samples is None else _check_int("num_samples", num_samples, 1)
        self.seed = _check_int("seed", seed, 0)
        self.frame_in = _check_int("frame_in", frame_in, 0)
        self.frame_out = _check_int("frame_out", frame_out, 0)
        max_frame = (NUM_STEPS - 1) // SAMPLE_EVERY - 1
        if self.frame_out > max_frame:
            raise ValueError(f"frame_out must be <= {max_frame}, got {frame_out}")
        if self.frame_in >= self.frame_out:
            raise ValueError(f"frame_in ({frame_in}) must be < frame_out ({frame_out})")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.clip = bool(clip)
        self.dtype = dtype
        self.progress = progress
        super().__init__(os.fspath(root), transform=transform, log=False, force_reload=force_reload)

        self.params = self._generation_params()
        self.path = Path(self.root) / self._file_name()
        self.loaded_from_cache = False
        cache = None if force_reload else self._load_cache()
        if cache is None:
            cache = self._generate()
            self._write_cache(cache)
        else:
            self.loaded_from_cache = True
        self._set_tensors(cache)

    # -- cache ---------------------------------------------------------------------------------------
    def _generation_params(self) -> Dict[str, Any]:
        return {
            "system": "springs5+plane",
            "split": self.split,
            "stiffness": self.stiffness,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "split_index": SPLITS.index(self.split),
            "frame_in": self.frame_in,
            "frame_out": self.frame_out,
            "clip": self.clip,
            "num_steps": NUM_STEPS,
            "sample_every": SAMPLE_EVERY,
            "dt": DT,
            "num_particles": NUM_PARTICLES,
            "spring_constant": SPRING_CONSTANT,
            "spring_prob": SPRING_PROB,
            "loc_std": LOC_STD,
            "vel_norm": VEL_NORM,
            "max_force": MAX_FORCE,
        }

    def _file_name(self) -> str:
        name = f"nbody_{self.split}_k{self.stiffness!r}_n{self.num_samples}_seed{self.seed}"
        if (self.frame_in, self.frame_out) != (FRAME_IN, FRAME_OUT):
            name += f"_f{self.frame_in}-{self.frame_out}"
        if not self.clip:
            name += "_noclip"
        return name + ".pt"

    def _load_cache(self) -> Optional[Dict[str, Any]]:
        if not self.path.exists():
            return None
        try:
            cache = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt, truncated or not a torch file
            logger.warning("N-body cache %s could not be loaded (%s); regenerating it", self.path, err)
            return None
        problem = self._validate(cache)
        if problem is not None:
            logger.warning("N-body cache %s is not valid (%s); regenerating it", self.path, problem)
            return None
        return cache

    def _validate(self, cache: Any) -> Optional[str]:
        if not isinstance(cache, dict):
            return f"expected a dict, got {type(cache).__name__}"
        if cache.get("version") != FORMAT_VERSION:
            return f"format version {cache.get('version')!r}, expected {FORMAT_VERSION}"
        if cache.get("params") != self.params:
            return f"generation parameters {cache.get('params')!r} differ from {self.params!r}"
        s, n = self.num_samples, NUM_PARTICLES
        shapes = {
            "pos": (s, n, 3),
            "vel": (s, n, 3),
            "pos_out": (s, n, 3),
            "vel_out": (s, n, 3),
            "springs": (s, n, n),
            "rest_lengths": (s, n),
        }
        for key, shape in shapes.items():
            value = cache.get(key)
            if not isinstance(value, torch.Tensor):
                return f"{key!r} missing"
            if tuple(value.shape) != shape or value.dtype != torch.float64:
                return f"{key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, expected {shape} float64"
            if not bool(torch.isfinite(value).all()):
                return f"{key!r} has non-finite values"
        return None

    def _generate(self) -> Dict[str, Any]:
        traj = simulate(
            self.num_samples,
            self.stiffness,
            split_seed(self.seed, self.split),
            num_steps=SAMPLE_EVERY * (self.frame_out + 1) + 1,  # stop after the last frame needed
            sample_every=SAMPLE_EVERY,
            dt=DT,
            clip=self.clip,
            progress=self.progress,
        )
        arrays = {
            "pos": traj.positions[:, self.frame_in],
            "vel": traj.velocities[:, self.frame_in],
            "pos_out": traj.positions[:, self.frame_out],
            "vel_out": traj.velocities[:, self.frame_out],
            "springs": traj.springs,
            "rest_lengths": traj.rest_lengths,
        }
        cache: Dict[str, Any] = {"version": FORMAT_VERSION, "params": dict(self.params)}
        cache.update({key: torch.from_numpy(np.ascontiguousarray(a)) for key, a in arrays.items()})
        return cache

    def _write_cache(self, cache: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(cache, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; a data cache is readable like any other file
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    # -- items ---------------------------------------------------------------------------------------
    def _set_tensors(self, cache: Dict[str, Any]) -> None:
        dt = self.dtype
        self._pos = cache["pos"].to(dt)  # (S, 5, 3)
        self._vel = cache["vel"].to(dt)  # (S, 5, 3)
        self._y = cache["pos_out"].to(dt)  # (S, 5, 3)
        self._displacement = (cache["pos_out"] - cache["pos"]).to(dt)  # (S, 5, 3)
        self._node_attrs = torch.cat([cache["rest_lengths"].unsqueeze(-1), cache["vel"]], dim=-1).to(dt)  # (S, 5, 4)
        self._edge_index = full_edge_index(NUM_PARTICLES)  # (2, 20)
        src, dst = self._edge_index
        self._edge_attrs = cache["springs"][:, src, dst].unsqueeze(-1).to(dt)  # (S, 20, 1)
        self.springs = cache["springs"].to(dt)  # (S, 5, 5)
        self.rest_lengths = cache["rest_lengths"].to(dt)  # (S, 5)

    def len(self) -> int:
        return self._pos.shape[0]

    def get(self, idx: int) -> Data:
        return Data(
            pos=self._pos[idx],
            vel=self._vel[idx],
            node_attr=self._node_attrs[idx],
            edge_index=self._edge_index.clone(),
            edge_attr=self._edge_attrs[idx],
            y=self._y[idx],
            target_displacement=self._displacement[idx],
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)}, split={self.split!r}, stiffness={self.stiffness!r}, "
            f"seed={self.seed}, frames={self.frame_in}->{self.frame_out})"
        )
