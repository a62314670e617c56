"""Spherical harmonics equal to e3nn's `o3.spherical_harmonics`, in a few tensor operations.

e3nn 0.6.0 evaluates the harmonics by a recursion written out per component: about a hundred ATen ops for
l <= 3 forward and backward, each costing ~5-25 us on a CPU, which weighs on the latency of one small
molecule's energy and forces. Here Y_l (a homogeneous polynomial of degree l in x, y, z) is one matrix
product: the monomials x^a y^b z^c of degree <= lmax times a constant coefficient matrix, fitted once in
float64 against e3nn itself, so column order, signs and normalisation are e3nn's by construction.
"""

import functools
from typing import Dict, List, Sequence, Tuple, Union

import torch
from e3nn import o3
from torch import nn


def _degrees(l: Union[int, Sequence[int], str, o3.Irreps]) -> List[int]:
    """The degree of each output block, as e3nn reads its first argument (int, list of int, or irreps)."""
    if isinstance(l, str):
        l = o3.Irreps(l)
    if isinstance(l, o3.Irreps):
        return [ir.l for mul, ir in l for _ in range(mul)]
    if isinstance(l, int):
        return [l]
    return [int(x) for x in l]


def _monomial_exponents(lmax: int) -> List[Tuple[int, int, int]]:
    """(a, b, c) of every monomial x^a y^b z^c of degree 0..lmax, by degree."""
    return [(a, b, d - a - b) for d in range(lmax + 1) for a in range(d, -1, -1) for b in range(d - a, -1, -1)]


@functools.lru_cache(maxsize=None)
def _coefficients(ls: Tuple[int, ...], normalization: str) -> torch.Tensor:
    """(M, sum(2l+1)) float64 matrix C with e3nn's Y(v) = monomials(v) @ C (v unnormalised), whose M rows
    follow `_monomial_exponents(max(ls))`.

    Fitted per degree by least squares on random points; e3nn's harmonics are homogeneous polynomials, so
    the fit is exact up to float64 rounding (checked here).
    """
    exponents = _monomial_exponents(max(ls))
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(512, 3, generator=gen, dtype=torch.float64)
    blocks = []
    for l in ls:
        rows = [k for k, e in enumerate(exponents) if sum(e) == l]
        powers = torch.tensor([exponents[k] for k in rows], dtype=torch.float64)  # (m, 3)
        basis = points.unsqueeze(-2).pow(powers).prod(-1)  # (P, m)
        target = o3.spherical_harmonics(l, points, normalize=False, normalization=normalization)  # (P, 2l+1)
        fit = torch.linalg.lstsq(basis, target).solution
        for _ in range(2):  # iterative refinement: the last bits (e.g. Y_0 = 1 exactly)
            fit = fit + torch.linalg.lstsq(basis, target - basis @ fit).solution
        residual = (basis @ fit - target).abs().max() / target.abs().max()
        if residual > 1e-12:
            raise RuntimeError(f"e3nn's Y_{l} is not a homogeneous polynomial of degree {l} (residual {residual:.1e})")
        fit[fit.abs() < 1e-12 * fit.abs().max()] = 0.0  # rounding noise of the fit: the polynomials are sparse
        block = torch.zeros(len(exponents), 2 * l + 1, dtype=torch.float64)
        block[rows] = fit
        blocks.append(block)
    return torch.cat(blocks, dim=1)


_EPS = 1e-12  # as torch.nn.functional.normalize, which e3nn uses


def _normalize(vec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(vec / r, r) with r = max(|vec|, eps), exactly as torch.nn.functional.normalize (zero vectors stay zero)."""
    r = torch.linalg.vector_norm(vec, dim=-1, keepdim=True).clamp_min(_EPS)  # (E, 1)
    return vec / r, r


def _monomials(vec: torch.Tensor, lmax: int, columns: torch.Tensor) -> torch.Tensor:
    """(E, 3) -> (M, E), edges last so that every product runs over long contiguous rows.

    columns: (3M,) the rows of the power table (row 3k + i holds vec_i^k) whose products are the monomials.
    """
    num = vec.shape[0]
    powers = vec.t().unsqueeze(0).expand(lmax, 3, num).cumprod(0)  # (lmax, 3, E): vec_i^k, k = 1..lmax
    powers = nn.functional.pad(powers, (0, 0, 0, 0, 1, 0), value=1.0).view(3 * (lmax + 1), num)  # k = 0..lmax
    return powers.index_select(0, columns).view(columns.shape[0] // 3, 3, num).prod(1)  # (M, E)


class _Harmonics(torch.autograd.Function):
    """Y = monomials(v)^T @ C (v normalised first when `normalize`), with a hand-written backward.

    The derivative of a monomial is a monomial: d(x^a y^b z^c)/dx = a x^(a-1) y^b z^c, so the backward is
    one matmul (the incoming gradient onto the monomials), one gather of the lower-degree monomials and a
    contraction. With normalisation, Y(v/|v|) depends on the direction only and its gradient is the
    tangential part of that, divided by |v| (at v = 0: divided by eps, as torch's normalize gives). Under
    create_graph (training on forces) the backward recomputes the monomials from v with differentiable
    operations, so higher derivatives are exact too.
    """

    @staticmethod
    def forward(ctx, vec, coeff, columns, lower, factor, lmax: int, normalize: bool):
        u, r = _normalize(vec) if normalize else (vec, None)
        monomials = _monomials(u, lmax, columns)  # (M, E)
        ctx.lmax, ctx.normalize = lmax, normalize
        ctx.save_for_backward(vec, monomials, u, r, coeff, columns, lower, factor)
        return monomials.t() @ coeff  # (E, dim)

    @staticmethod
    def backward(ctx, grad):
        vec, monomials, u, r, coeff, columns, lower, factor = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable in vec as well as in grad
            u, r = _normalize(vec) if ctx.normalize else (vec, None)
            monomials = _monomials(u, ctx.lmax, columns)
        grad_monomials = coeff @ grad.t()  # (M, E)
        derivatives = monomials.index_select(0, lower) * factor  # (3M, E): d monomial_k / d u_i at row i*M + k
        g = (derivatives.view(3, lower.shape[0] // 3, vec.shape[0]) * grad_monomials).sum(1).t()  # (E, 3)
        if ctx.normalize:  # d(u)/d(vec) = (I - u u^T) / r
            g = (g - (g * u).sum(-1, keepdim=True) * u) / r
        return g, None, None, None, None, None, None


class SphericalHarmonics(nn.Module):
    """e3nn's `o3.spherical_harmonics(l, vec, normalize, normalization)` (same values, columns and signs).

    Ops per call: the normalisation (normalize=True only), a cumulative product for the powers of each
    coordinate, one gather and one product for the monomials, one matmul; the backward is one matmul, one
    gather and a contraction (see `_Harmonics`). The constants are not buffers (a state_dict is unchanged
    by using this module): a float64 master is kept and cast once per dtype and device.

    Args:
        l: degrees as e3nn takes them: an int, a list of ints, or irreps such as
            `o3.Irreps.spherical_harmonics(lmax)` or `o3.Irreps.spherical_harmonics(lmax)[1:]`.
        normalize: divide vec by its norm first (zero vectors give Y_0 = 1 and Y_l = 0, as e3nn).
        normalization: "component" (default here), "norm" or "integral", as e3nn.
        scale: optional constant per output column (or per entry of `l`) folded into the coefficients.
        input_scale: a constant s such that the output is Y(s * vec), folded into the coefficients (Y_l is
            homogeneous of degree l); ignored with normalize=True, where it changes nothing.

    Shapes:
        vec: (..., 3) -> (..., sum(2l+1))
    """

    def __init__(
        self,
        l: Union[int, Sequence[int], str, o3.Irreps],
        normalize: bool,
        normalization: str = "component",
        scale=None,
        input_scale: float = 1.0,
    ):
        super().__init__()
        if normalization not in ("component", "norm", "integral"):
            raise ValueError(f"normalization must be 'component', 'norm' or 'integral', got {normalization!r}")
        self.ls = _degrees(l)
        if not self.ls or min(self.ls) < 0:
            raise ValueError(f"need at least one degree l >= 0, got {l!r}")
        self.lmax = max(self.ls)
        self.normalize = bool(normalize)
        self.normalization = normalization
        coeff = _coefficients(tuple(self.ls), normalization).clone()
        if not self.normalize and input_scale != 1.0:
            column_l = torch.tensor([l for l in self.ls for _ in range(2 * l + 1)], dtype=torch.float64)
            coeff = coeff * float(input_scale) ** column_l
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float64).flatten()
            if scale.numel() == len(self.ls):
                scale = torch.repeat_interleave(scale, torch.tensor([2 * l + 1 for l in self.ls]))
            if scale.numel() != coeff.shape[1]:
                raise ValueError(f"scale needs {len(self.ls)} or {coeff.shape[1]} entries, got {scale.numel()}")
            coeff = coeff * scale
        self.dim = coeff.shape[1]
        exponents = _monomial_exponents(self.lmax)
        index = {e: k for k, e in enumerate(exponents)}
        lower, factor = [], []  # per coordinate i and monomial k: the monomial with one power of u_i less
        for i in range(3):
            for e in exponents:
                below = tuple(p - (j == i) for j, p in enumerate(e))
                lower.append(index[below] if e[i] > 0 else 0)
                factor.append(float(e[i]))
        self._coeff64 = coeff  # (M, dim)
        self._columns = torch.tensor([3 * e[i] + i for e in exponents for i in range(3)])  # (3M,)
        self._lower = torch.tensor(lower)  # (3M,)
        self._factor64 = torch.tensor(factor, dtype=torch.float64).unsqueeze(-1)  # (3M, 1)
        self._constants: Dict[Tuple[torch.dtype, torch.device], tuple] = {}

    def constants(self, like: torch.Tensor) -> tuple:
        """(coeff (M, dim), columns (3M,), lower (3M,), factor (3M, 1)) in like's dtype and device (see `_Harmonics`)."""
        key = (like.dtype, like.device)
        if key not in self._constants:
            to = dict(device=like.device, dtype=like.dtype)
            self._constants[key] = (self._coeff64.to(**to), self._columns.to(like.device),
                                    self._lower.to(like.device), self._factor64.to(**to))
        return self._constants[key]

    def forward(self, vec: torch.Tensor) -> torch.Tensor:
        if vec.shape[-1] != 3:
            raise ValueError(f"vec must have shape (..., 3), got {tuple(vec.shape)}")
        batch = vec.shape[:-1]
        if vec.dim() != 2:
            vec = vec.reshape(-1, 3)
        out = _Harmonics.apply(vec, *self.constants(vec), self.lmax, self.normalize)  # (E, dim)
        return out if len(batch) == 1 else out.view(*batch, self.dim)

    def extra_repr(self) -> str:
        return f"ls={self.ls}, normalize={self.normalize}, normalization={self.normalization!r}"

    def __getstate__(self):  # the per-dtype cache is rebuilt on demand
        state = self.__dict__.copy()
        state["_constants"] = {}
        return state


def harmonics_module(l: Union[int, Sequence[int], str, o3.Irreps], normalize: bool, normalization: str = "component",
                     input_scale: float = 1.0) -> SphericalHarmonics:
    """The `SphericalHarmonics` module `spherical_harmonics` calls for these arguments (one per set of options)."""
    return _module(tuple(_degrees(l)), bool(normalize), normalization, float(input_scale))


@functools.lru_cache(maxsize=64)
def _module(ls: Tuple[int, ...], normalize: bool, normalization: str, input_scale: float) -> SphericalHarmonics:
    return SphericalHarmonics(list(ls), normalize, normalization, input_scale=input_scale)


def spherical_harmonics(
    l: Union[int, Sequence[int], str, o3.Irreps],
    vec: torch.Tensor,
    normalize: bool,
    normalization: str = "component",
    input_scale: float = 1.0,
) -> torch.Tensor:
    """Functional form of `SphericalHarmonics` (modules cached per degrees and options): equals
    `o3.spherical_harmonics(l, input_scale * vec, normalize, normalization)`. Note the default normalization
    is "component", not e3nn's "integral".

    Shapes:
        vec: (..., 3) -> (..., sum(2l+1))
    """
    return harmonics_module(l, normalize, normalization, input_scale)(vec)
