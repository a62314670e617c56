"""Subgroups of O(3) specified through constant reference tensors.

An O(3)-equivariant function that also receives constant inputs ``r`` (in e3nn
irreps) is exactly equivariant to the stabiliser ``{g in O(3): D(g) r = r}``.
A :class:`Group` carries such references, samples random elements exactly in
the group and tests membership.

Representation matrices follow e3nn's convention (``Irreps.D_from_matrix``:
"1o" acts as ``R`` in the x, y, z basis, "1e" as ``det(R) R``). They are
computed here in float64 directly from ``R`` through the equivariance of
``o3.spherical_harmonics``, which avoids both Euler-angle singularities and
e3nn's float32 generators.

Example:
    >>> g = get("cn", n=3, axis=(1.0, 1.0, 0.0))
    >>> R = g.sample(8)                     # (8, 3, 3), all in C_3
    >>> bool(g.contains(R).all())
    True
"""

import functools
import math

import torch
from e3nn import o3

_F64 = torch.float64
_ALIASES = {"cone": "o2", "cinfv": "o2", "trivial": "c1", "inversion": "ci", "mirror": "cs"}
_PARAMS = {"o3": (), "so3": (), "so2": ("axis",), "o2": ("axis",), "cinfh": ("axis",),
           "dinf": ("axis",), "cn": ("n", "axis"), "dn": ("n", "axis"), "ci": (), "cs": ("normal",), "c1": ()}


def available():
    """Canonical names of the built-in groups (aliases excluded)."""
    return list(_PARAMS)


@functools.lru_cache(maxsize=None)
def _sh(l):
    """Cached ``Y_l`` (``o3.spherical_harmonics(l, x, normalize=False)``): ``(..., 3) -> (..., 2l+1)``."""
    return o3.SphericalHarmonics(l, normalize=False, normalization="integral")


@functools.lru_cache(maxsize=None)
def _sh_fit(l):
    """Fixed unit points ``(N, 3)`` and the pseudo-inverse ``(2l+1, N)`` of ``Y_l`` on them."""
    x = torch.randn(4 * l + 10, 3, dtype=_F64, generator=torch.Generator().manual_seed(l))
    x = x / x.norm(dim=-1, keepdim=True)
    return x, torch.linalg.pinv(_sh(l)(x))


def representation(irreps, R):
    """float64 representation matrices ``(..., dim, dim)`` of ``irreps`` for orthogonal ``R (..., 3, 3)``.

    Uses ``Y_l(x R^T) = Y_l(x) D_sh(R)^T``, where ``D_sh`` has parity ``(-1)^l``. Accurate to ~1e-14,
    unlike e3nn's ``Irreps.D_from_matrix`` (float32 generators, Euler angles).
    """
    irreps = o3.Irreps(irreps)
    R = R.to(_F64)
    k = torch.linalg.det(R) < 0
    D = R.new_zeros(R.shape[:-2] + (irreps.dim, irreps.dim))
    i = 0
    for mul, ir in irreps:
        x, pinv = _sh_fit(ir.l)
        Dl = (pinv @ _sh(ir.l)(x @ R.transpose(-1, -2))).transpose(-1, -2)
        if ir.p != (-1) ** ir.l:
            Dl = torch.where(k[..., None, None], -Dl, Dl)
        for _ in range(mul):
            D[..., i:i + ir.dim, i:i + ir.dim] = Dl
            i += ir.dim
    return D


def _lie_action(irreps, r):
    """``(dim, 3)`` matrix whose column k is the infinitesimal rotation about e_k applied to ``r``."""
    L = torch.zeros(3, 3, 3, dtype=_F64)  # L[k] v = e_k x v
    for k, (a, b) in enumerate([(1, 2), (2, 0), (0, 1)]):
        L[k, b, a], L[k, a, b] = 1.0, -1.0
    cols, i = [], 0
    for mul, ir in irreps:
        x, pinv = _sh_fit(ir.l)
        G = torch.stack([(pinv @ torch.func.jvp(_sh(ir.l), (x,), (x @ L[k].T,))[1]).T for k in range(3)])
        v = r[i:i + mul * ir.dim].reshape(mul, ir.dim)
        cols.append(torch.einsum("kij,mj->mik", G, v).reshape(-1, 3))
        i += mul * ir.dim
    return torch.cat(cols) if cols else torch.zeros(0, 3, dtype=_F64)


def _frame(axis):
    """Rotation ``Q (3, 3)``, det +1, with third column ``axis`` (Q = I for the z axis)."""
    a = axis / axis.norm()
    e = torch.zeros(3, dtype=_F64)
    e[int(a.abs().argmin())] = 1.0
    u = e - (e @ a) * a
    u = u / u.norm()
    return torch.stack([u, torch.linalg.cross(a, u), a], dim=1)


def _rot_z(theta):
    """Rotations ``(..., 3, 3)`` about z by angles ``theta (...)``."""
    c, s, o, z = torch.cos(theta), torch.sin(theta), torch.ones_like(theta), torch.zeros_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(theta.shape + (3, 3))


@functools.lru_cache(maxsize=None)
def _harmonic(n):
    """Coefficients ``(2, 2n+1)`` of Re and Im of ``(x+iy)^n`` in the basis ``Y_n(normalize=False)``."""
    x = torch.randn(4 * n + 10, 3, dtype=_F64, generator=torch.Generator().manual_seed(1000 + n))
    p = torch.complex(x[:, 0], x[:, 1]) ** n
    Y = _sh(n)(x)
    c = torch.linalg.lstsq(Y, torch.stack([p.real, p.imag], 1)).solution
    assert (Y @ c - torch.stack([p.real, p.imag], 1)).abs().max() < 1e-10, "harmonic fit failed"
    return c.T.contiguous()


def _as_axis(value, name):
    try:
        a = torch.as_tensor(value, dtype=_F64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"parameter {name!r} must be a 3-vector, got {value!r}") from err
    if a.numel() != 3 or not bool(torch.isfinite(a).all()) or float(a.norm()) < 1e-12:
        raise ValueError(f"parameter {name!r} must be a finite nonzero 3-vector, got {value!r}")
    return a / a.norm()


class Group:
    """A subgroup of O(3): the stabiliser of constant reference tensors.

    Elements are ``c @ f`` with ``c`` in the identity component (``"trivial"``,
    ``"so2"`` about ``frame[:, 2]`` or ``"so3"``) and ``f`` one of the coset
    representatives. Build with :func:`get` or :meth:`from_references`.

    Attributes:
        name (str): canonical name. params (dict): parameters (axis normalised).
        irreps_ref (o3.Irreps): irreps of the references.
        references (Tensor): ``(irreps_ref.dim,)`` float64 reference values.
        frame (Tensor): ``(3, 3)`` rotation; the group is ``frame @ G_z @ frame.T``
            for the z-axis version ``G_z`` (third column = axis or mirror normal).
    """

    def __init__(self, name, params, irreps, references, identity, cosets, frame=None):
        self.name, self.params = name, dict(params)
        self.irreps_ref = o3.Irreps(irreps)
        self.references = torch.as_tensor(references, dtype=_F64).reshape(-1)
        self.frame = torch.eye(3, dtype=_F64) if frame is None else frame
        self._identity, self._cosets = identity, cosets  # str, (k, 3, 3) float64

    def __repr__(self):
        return f"Group({', '.join([repr(self.name)] + [f'{k}={v!r}' for k, v in self.params.items()])})"

    @property
    def is_finite(self):
        return self._identity == "trivial"

    @property
    def order(self):
        """Number of elements (``math.inf`` for continuous groups)."""
        return len(self._cosets) if self.is_finite else math.inf

    def sample(self, n, generator=None, dtype=torch.float64):
        """Uniform random elements (Haar on the identity component, uniform over cosets).

        Args:
            n (int): number of samples. generator (torch.Generator, optional): for reproducibility.
            dtype: output dtype (computed in float64).

        Returns:
            Tensor ``(n, 3, 3)`` of matrices exactly in the group.
        """
        f = self._cosets[torch.randint(len(self._cosets), (n,), generator=generator)]
        if self._identity == "so2":
            c = self.frame @ _rot_z(2 * math.pi * torch.rand(n, dtype=_F64, generator=generator)) @ self.frame.T
            f = c @ f
        elif self._identity == "so3":  # same distribution as o3.rand_angles, with a generator
            a, g, b = torch.rand(3, n, dtype=_F64, generator=generator)
            f = o3.angles_to_matrix(2 * math.pi * a, torch.acos(2 * b - 1), 2 * math.pi * g) @ f
        return f.to(dtype)

    def contains(self, R, atol=1e-6):
        """Membership test.

        Args:
            R (Tensor): ``(n, 3, 3)`` or ``(3, 3)`` matrices. atol (float): tolerance.

        Returns:
            bool Tensor ``(n,)`` (or 0-dim): R orthogonal within ``atol`` and
            ``||D_ref(R) r - r||_inf <= atol * max(1, ||r||_inf)``.
        """
        R = torch.as_tensor(R).to(_F64)
        if R.shape[-2:] != (3, 3) or R.dim() not in (2, 3):
            raise ValueError(f"R must have shape (n, 3, 3) or (3, 3), got {tuple(R.shape)}")
        single, R = R.dim() == 2, R.reshape(-1, 3, 3)
        eye = torch.eye(3, dtype=_F64)
        ok = (R.transpose(-1, -2) @ R - eye).abs().amax((-2, -1)) <= atol  # False for nan/inf
        if self.irreps_ref.dim > 0:
            U, _, Vh = torch.linalg.svd(torch.where(ok[:, None, None], R, eye))
            r = self.references
            err = (representation(self.irreps_ref, U @ Vh) @ r - r).abs().amax(-1)
            ok = ok & (err <= atol * max(1.0, float(r.abs().max())))
        return ok[0] if single else ok

    @classmethod
    def from_references(cls, irreps, values, generators=(), name="custom"):
        """User-defined group: the stabiliser of ``values`` (in ``irreps``).

        The identity component (trivial, SO(2) or SO(3)) is found from the null
        space of the Lie-algebra action on the references. Without
        ``generators`` the sampled group is only this identity component;
        ``contains`` always answers for the full stabiliser. ``generators``
        (3x3 matrices, each in the stabiliser) add discrete elements; their
        closure modulo the identity component must have at most 1000 elements.

        Args:
            irreps (str or o3.Irreps): irreps of the references.
            values (array-like): ``(irreps.dim,)`` reference values.
            generators (sequence of (3, 3) arrays): discrete generators.
            name (str): name of the group.
        """
        irreps = o3.Irreps(irreps)
        values = torch.as_tensor(values, dtype=_F64).reshape(-1)
        if values.numel() != irreps.dim:
            raise ValueError(f"values: length {values.numel()} does not match irreps {irreps} (dim {irreps.dim})")
        M = _lie_action(irreps, values)
        s, Vh = (torch.linalg.svd(M)[1:]) if M.shape[0] else (torch.zeros(0, dtype=_F64), None)
        scale = max([1.0] + values.abs().tolist())
        rank = int((s > 1e-8 * scale).sum())
        identity = {3: "trivial", 2: "so2", 0: "so3"}.get(rank)
        if identity is None:
            raise ValueError(f"values: stabiliser Lie algebra of dimension {3 - rank} (numerically ill-posed)")
        frame = _frame(Vh[-1]) if identity == "so2" else torch.eye(3, dtype=_F64)
        group = cls(name, {"irreps": str(irreps)}, irreps, values, identity, torch.eye(3, dtype=_F64)[None], frame)
        gens = [torch.as_tensor(g, dtype=_F64).reshape(3, 3) for g in generators]
        if gens:
            G = torch.stack(gens)
            if not bool(group.contains(G).all()):
                raise ValueError("generators: not all generators are in the stabiliser of the references")
            U, _, Vh2 = torch.linalg.svd(G)
            group._cosets = group._closure(U @ Vh2)
        return group

    def _canonical(self, g):
        """Canonical representative ``(3, 3)`` of the coset ``g C``."""
        if self._identity == "so3":
            return torch.linalg.det(g).sign() * torch.eye(3, dtype=_F64)
        if self._identity == "trivial":
            return g
        h = self.frame.T @ g @ self.frame  # block diag(B, s) with B in O(2)
        d = torch.tensor([1.0, float(torch.linalg.det(h[:2, :2]).sign()), float(h[2, 2].sign())], dtype=_F64)
        return self.frame @ torch.diag(d) @ self.frame.T

    def _closure(self, gens, cap=1000):
        elems = [self._canonical(torch.eye(3, dtype=_F64))]
        todo = list(elems)
        while todo:
            a = todo.pop()
            for g in gens:
                b = self._canonical(a @ g)
                if not any((b - e).abs().max() < 1e-6 for e in elems):
                    elems.append(b)
                    todo.append(b)
                    if len(elems) > cap:
                        raise ValueError(f"generators: closure exceeds {cap} elements (infinite group?)")
        return torch.stack(elems)


def get(name, **params):
    """Built-in group by name (see :func:`available`; aliases cone, cinfv, trivial, inversion, mirror).

    Args:
        name (str): group name. axis (3-seq, default z): for so2, o2, cinfh, dinf, cn, dn.
        n (int >= 2): for cn, dn. normal (3-seq, default z): mirror normal for cs.
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in _PARAMS:
        raise ValueError(f"unknown group name {name!r}; valid names: {available()}, aliases: {sorted(_ALIASES)}")
    extra = set(params) - set(_PARAMS[key])
    if extra:
        raise ValueError(f"unexpected parameter(s) {sorted(extra)} for group {key!r}; allowed: {list(_PARAMS[key])}")
    out, eye = {}, torch.eye(3, dtype=_F64)
    if key in ("cn", "dn"):
        n = params.get("n")
        if n is None:
            raise ValueError(f"parameter 'n' is required for group {key!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"parameter 'n' must be an integer >= 2, got {n!r}")
        out["n"] = n
    pname = "normal" if key == "cs" else "axis"
    Q = eye
    if pname in _PARAMS[key]:
        a = _as_axis(params.get(pname, (0.0, 0.0, 1.0)), pname)
        out[pname], Q = tuple(float(v) for v in a), _frame(a)
    ez, ex, one = eye[2], eye[0], torch.ones(1, dtype=_F64)
    flip_x, mirror_y, mirror_z = (torch.diag(torch.tensor(d, dtype=_F64))
                                  for d in ([1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0]))
    # (irreps, z-frame references, identity component, z-frame coset representatives)
    if key in ("cn", "dn"):
        p = "e" if n % 2 == 0 else "o"
        c, rots = _harmonic(n), _rot_z(2 * math.pi * torch.arange(n, dtype=_F64) / n)
        spec = ((f"2x{n}{p}+0o", torch.cat([c[0], c[1], one]), "trivial", rots) if key == "cn" else
                (f"{n}{p}+0o", torch.cat([c[0], one]), "trivial", torch.cat([rots, rots @ flip_x])))
    else:
        spec = {
            "o3": ("", torch.zeros(0, dtype=_F64), "so3", torch.stack([eye, -eye])),
            "so3": ("0o", one, "so3", eye[None]),
            "so2": ("1o+0o", torch.cat([ez, one]), "so2", eye[None]),
            "o2": ("1o", ez, "so2", torch.stack([eye, mirror_y])),
            "cinfh": ("1e", ez, "so2", torch.stack([eye, -eye])),
            "dinf": ("2e+0o", torch.cat([o3.spherical_harmonics(2, ez, normalize=False), one]), "so2",
                     torch.stack([eye, flip_x])),
            "ci": ("2x1e", torch.cat([ez, ex]), "trivial", torch.stack([eye, -eye])),
            "cs": ("2x1o", torch.cat([ex, eye[1]]), "trivial", torch.stack([eye, mirror_z])),
            "c1": ("2x1o+0o", torch.cat([ez, ex, one]), "trivial", eye[None]),
        }[key]
    irreps, r_z, identity, cosets = spec
    irreps = o3.Irreps(irreps)
    refs = representation(irreps, Q) @ r_z if irreps.dim else r_z
    return Group(key, out, irreps, refs, identity, Q @ cosets @ Q.T, Q)
