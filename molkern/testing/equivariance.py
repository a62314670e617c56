"""Check equivariance of any function or module under elements of a group, as users of molkern can too."""

from typing import Callable, Optional, Sequence, Union

import torch
from e3nn import o3

from ..groups import representation

# How an argument transforms: e3nn irreps (string or Irreps), POSITIONS (rotated and translated points),
# or None (invariant: indices, batch vectors, counts).
POSITIONS = "positions"
ArgSpec = Union[None, str, o3.Irreps]

DEFAULT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _transform(x, spec: ArgSpec, R: torch.Tensor, shift: torch.Tensor):
    if spec is None or not torch.is_tensor(x):
        return x
    if spec == POSITIONS:
        return x @ R.T.to(x.dtype) + shift.to(x.dtype)
    irreps = o3.Irreps(spec)
    if x.shape[-1] != irreps.dim:
        raise ValueError(f"tensor of shape {tuple(x.shape)} does not match irreps {irreps} (dim {irreps.dim})")
    D = representation(irreps, R).to(x.dtype)  # (dim, dim)
    return x @ D.T


def _as_tuple(x):
    """Outputs or output specs as a tuple (an o3.Irreps is itself a tuple: keep it whole)."""
    return tuple(x) if isinstance(x, (tuple, list)) and not isinstance(x, o3.Irreps) else (x,)


def equivariance_error(
    func: Callable,
    rotations: torch.Tensor,
    args_in: Sequence,
    irreps_in: Sequence[ArgSpec],
    irreps_out: Union[ArgSpec, Sequence[ArgSpec]],
    translate: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Relative equivariance error max|f(g.x) - g.f(x)| / max|f(x)| for each g in `rotations`.

    Args:
        func: the function or module (called as func(*args_in)).
        rotations: (n, 3, 3) orthogonal matrices (proper or improper).
        args_in: the inputs.
        irreps_in: one ArgSpec per input: irreps, molkern.testing.POSITIONS, or None (invariant).
        irreps_out: ArgSpec of the output, or a sequence of them for a tuple output.
        translate: also translate POSITIONS arguments by a random vector (translation invariance).

    Returns:
        (n,) tensor of relative errors (worst output for each element).
    """
    if len(args_in) != len(irreps_in):
        raise ValueError(f"got {len(args_in)} inputs but {len(irreps_in)} irreps_in entries")
    out = _as_tuple(func(*args_in))
    specs_out = _as_tuple(irreps_out)
    if len(specs_out) != len(out):
        raise ValueError(f"func returned {len(out)} outputs but irreps_out has {len(specs_out)} entries")
    errors = []
    for R in rotations:
        shift = torch.randn(3, generator=generator, dtype=torch.float64) if translate else torch.zeros(3, dtype=torch.float64)
        args_g = [_transform(x, spec, R, shift) for x, spec in zip(args_in, irreps_in)]
        out_g = _as_tuple(func(*args_g))
        worst = 0.0
        for y, y_g, spec in zip(out, out_g, specs_out):
            expected = _transform(y, spec, R, shift)
            scale = y.abs().max().clamp_min(1e-12)
            worst = max(worst, float((y_g - expected).abs().max().detach() / scale.detach()))
        errors.append(worst)
    return torch.tensor(errors, dtype=torch.float64)


def assert_equivariant(
    func: Callable,
    group,
    args_in: Sequence,
    irreps_in: Sequence[ArgSpec],
    irreps_out: Union[ArgSpec, Sequence[ArgSpec]],
    num_samples: int = 4,
    tol: Optional[float] = None,
    translate: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Assert f(g.x) == g.f(x) for random g in `group` (relative tolerance by dtype unless `tol` is given).

    Example:
        >>> net.eval()
        >>> assert_equivariant(lambda pos: net(pos, attrs, edge_index), groups.get("so2"),
        ...                    [pos], [POSITIONS], "1x0e")

    Returns:
        (num_samples,) relative errors. Raises AssertionError naming the group and the worst error.
    """
    dtype = next((x.dtype for x in args_in if torch.is_tensor(x) and x.is_floating_point()), torch.float64)
    tol = DEFAULT_TOL.get(dtype, 1e-4) if tol is None else tol
    rotations = group.sample(num_samples, generator=generator, dtype=torch.float64)
    errors = equivariance_error(func, rotations, args_in, irreps_in, irreps_out, translate, generator)
    worst = int(errors.argmax())
    if errors[worst] > tol:
        raise AssertionError(
            f"not equivariant under {group!r}: relative error {errors[worst]:.3g} > tol {tol:g} "
            f"({dtype}) for the element\n{rotations[worst]}"
        )
    return errors
