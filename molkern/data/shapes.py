"""Procedural triangle meshes: parametric solids and composites for an offline point-cloud dataset.

Every shape is built upright (its axis along z, like aligned ModelNet-40), with random size,
proportions and vertex noise, centred at its bounding-box centre and scaled to fit a ball of radius
~1 (0.75 to 1.0). Faces are oriented so that ``cross(b - a, c - a)`` points outwards.

    >>> rng = np.random.default_rng(0)
    >>> vertices, faces = generate_mesh("table", rng)
    >>> points, normals = sample_surface(vertices, faces, 1024, rng)
"""

from __future__ import annotations

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = (
    "sphere",
    "box",
    "cylinder",
    "cone",
    "pyramid",
    "prism",
    "torus",
    "capsule",
    "table",
    "lamp",
    "dumbbell",
    "cross",
)

Mesh = tuple[np.ndarray, np.ndarray]


def _lathe(r, z, segments: int, closed: bool = False) -> Mesh:
    """Surface of revolution about z of the profile (r_k, z_k); r_k = 0 makes a pole (one vertex).

    The profile runs bottom to top (outer side on the right when walking it in the (r, z) plane);
    ``closed`` joins its last point to its first (a torus).
    """
    r, z = np.asarray(r, float), np.asarray(z, float)
    phi = 2 * np.pi * np.arange(segments) / segments
    rings, vertices = [], []
    for rk, zk in zip(r, z):
        start = sum(len(v) for v in vertices)
        if rk == 0:
            vertices.append(np.array([[0.0, 0.0, zk]]))
            rings.append(np.full(segments, start))
        else:
            vertices.append(np.stack([rk * np.cos(phi), rk * np.sin(phi), np.full(segments, zk)], 1))
            rings.append(start + np.arange(segments))
    faces = []
    pairs = list(zip(rings[:-1], rings[1:])) + ([(rings[-1], rings[0])] if closed else [])
    for lo, hi in pairs:
        lo1, hi1 = np.roll(lo, -1), np.roll(hi, -1)
        for tri in (np.stack([lo, lo1, hi1], 1), np.stack([lo, hi1, hi], 1)):
            keep = (tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])
            faces.append(tri[keep])
    return np.concatenate(vertices), np.concatenate(faces).astype(np.int64)


def _box(size, center=(0.0, 0.0, 0.0)) -> Mesh:
    """Axis-aligned box with side lengths ``size`` (3,) centred at ``center``."""
    corners = np.array([[i, j, k] for i in (-0.5, 0.5) for j in (-0.5, 0.5) for k in (-0.5, 0.5)])
    faces = np.array(
        [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
         [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
    )  # fmt: skip
    return corners * np.asarray(size, float) + np.asarray(center, float), faces.astype(np.int64)


def _cylinder(radius, z0, z1, segments=24) -> Mesh:
    return _lathe([0, radius, radius, 0], [z0, z0, z1, z1], segments)


def _sphere(radius, center=(0.0, 0.0, 0.0), rings=12, segments=24) -> Mesh:
    theta = np.linspace(np.pi, 0, rings + 1)  # south pole to north pole
    v, f = _lathe(radius * np.sin(theta).round(12), radius * np.cos(theta), segments)
    return v + np.asarray(center, float), f


def _rotate_to_x(mesh: Mesh) -> Mesh:
    """Rotate a z-axis part so its axis lies along x (proper rotation: keeps face orientation)."""
    v, f = mesh
    return v @ np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]]), f


def _merge(*meshes: Mesh) -> Mesh:
    vertices, faces, offset = [], [], 0
    for v, f in meshes:
        vertices.append(v)
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(vertices), np.concatenate(faces)


def _raw_mesh(name: str, rng: np.random.Generator) -> Mesh:
    u = rng.uniform
    if name == "sphere":
        v, f = _sphere(1.0)
        return v * u(0.85, 1.15, size=3), f
    if name == "box":
        return _box(u(0.4, 1.0, size=3))
    if name == "cylinder":
        h = u(0.8, 2.0)
        return _cylinder(u(0.3, 0.6), -h / 2, h / 2)
    if name == "cone":
        h = u(0.8, 1.6)
        return _lathe([0, u(0.4, 0.7), 0], [-h / 2, -h / 2, h / 2], 24)
    if name == "pyramid":
        h = u(0.6, 1.4)
        return _lathe([0, u(0.5, 0.8), 0], [-h / 2, -h / 2, h / 2], 4)
    if name == "prism":
        h = u(0.4, 1.6)
        return _cylinder(u(0.4, 0.7), -h / 2, h / 2, segments=6)
    if name == "torus":
        big, small = u(0.6, 0.9), u(0.12, 0.3)
        t = np.linspace(-np.pi / 2, 3 * np.pi / 2, 16, endpoint=False)  # bottom, outside, top, inside
        return _lathe(big + small * np.cos(t), small * np.sin(t), 32, closed=True)
    if name == "capsule":
        radius, h = u(0.2, 0.45), u(0.4, 1.2)
        tb, tt = np.linspace(np.pi, np.pi / 2, 7), np.linspace(np.pi / 2, 0, 7)  # bottom, top hemisphere
        r = (radius * np.sin(np.concatenate([tb, tt]))).round(12)
        z = radius * np.cos(np.concatenate([tb, tt])) + np.repeat([-h / 2, h / 2], 7)
        return _lathe(r, z, 24)
    if name == "table":
        w, d, h, t, leg = u(1.0, 1.6), u(0.6, 1.2), u(0.6, 1.0), u(0.04, 0.1), u(0.05, 0.12)
        top = _box([w, d, t], [0, 0, h - t / 2])
        legs = [_box([leg, leg, h - t], [sx * (w - leg) / 2, sy * (d - leg) / 2, (h - t) / 2])
                for sx in (-1, 1) for sy in (-1, 1)]  # fmt: skip
        return _merge(top, *legs)
    if name == "lamp":  # base disc, thin pole, cone shade open at the bottom
        h, base, pole = u(1.0, 1.6), u(0.25, 0.4), u(0.02, 0.05)
        shade_r, shade_h = u(0.3, 0.55), u(0.3, 0.5)
        return _merge(
            _cylinder(base, 0, u(0.04, 0.1)),
            _cylinder(pole, 0, h),
            _lathe([shade_r, 0], [h - shade_h / 2, h + shade_h / 2], 24),
        )
    if name == "dumbbell":  # two balls joined by a bar along x
        reach, bar, ball = u(0.5, 0.9), u(0.05, 0.12), u(0.2, 0.35)
        rod = _rotate_to_x(_cylinder(bar, -reach, reach))
        return _merge(rod, _sphere(ball, (-reach, 0, 0)), _sphere(ball * u(0.8, 1.2), (reach, 0, 0)))
    if name == "cross":  # three orthogonal bars of different lengths
        t = u(0.1, 0.25)
        return _merge(*(_box(np.where(np.arange(3) == k, u(1.0, 2.0), t)) for k in range(3)))
    raise ValueError(f"unknown shape class {name!r}; choose from {SHAPE_CLASSES}")


def generate_mesh(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random triangle mesh of class ``name`` (one of ``SHAPE_CLASSES``).

    Random proportions, per-vertex Gaussian noise (0.5% of the size), centred at the bounding-box
    centre, scaled so the farthest vertex lies at a random radius in [0.75, 1.0] (dimensionless).

    Shapes:
        returns vertices (V, 3) float64 and faces (F, 3) int64 (vertex indices, outward orientation).
    """
    vertices, faces = _raw_mesh(name, rng)
    vertices = vertices + rng.normal(scale=0.005 * np.abs(vertices).max(), size=vertices.shape)
    vertices = vertices - (vertices.min(0) + vertices.max(0)) / 2
    vertices = vertices * rng.uniform(0.75, 1.0) / np.linalg.norm(vertices, axis=1).max()
    return vertices.astype(np.float64), faces.astype(np.int64)


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points drawn uniformly (area-weighted) on a triangle mesh, with the faces' unit normals.

    Shapes:
        vertices (V, 3), faces (F, 3) int -> points (n, 3) float64 (units of ``vertices``),
        normals (n, 3) float64, unit length, ``cross(b - a, c - a)`` direction of the sampled face.
    """
    vertices, faces = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3) and faces (F, 3), got {vertices.shape} and {faces.shape}")
    if len(faces) == 0:
        raise ValueError("mesh has no faces")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"face indices must lie in [0, {len(vertices)}), got [{faces.min()}, {faces.max()}]")
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    cross = np.cross(b - a, c - a)  # (F, 3)
    area2 = np.linalg.norm(cross, axis=1)  # (F,) twice the area
    if not np.isfinite(area2).all() or area2.sum() <= 0:
        raise ValueError("mesh has zero surface area (or non-finite vertices)")
    idx = rng.choice(len(faces), size=n, p=area2 / area2.sum())  # (n,)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], 1)  # (n, 3) uniform barycentric coordinates
    points = w[:, :1] * a[idx] + w[:, 1:2] * b[idx] + w[:, 2:] * c[idx]  # (n, 3)
    normals = cross[idx] / area2[idx, None]  # (n, 3)
    return points, normals
