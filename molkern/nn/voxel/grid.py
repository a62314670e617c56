"""Grid symmetries: the 48 symmetries of the cube and their action on voxel fields (for tests and users)."""

import itertools

import torch
from e3nn import o3

from ...groups import representation


def cube_symmetries() -> torch.Tensor:
    """The 48 signed permutation matrices (the octahedral group O_h), identity first.

    Shapes:
        -> (48, 3, 3) float64
    """
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            m[list(range(3)), list(perm)] = torch.tensor(signs, dtype=torch.float64)
            mats.append(m)
    return torch.stack(mats)


def voxel_centres(shape, voxel_size: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Positions of the voxel centres relative to the grid centre, in the C order of the grid.

    Shapes:
        shape: (X, Y, Z) -> (X * Y * Z, 3) in units of voxel_size
    """
    axes = [(torch.arange(n, dtype=dtype) - (n - 1) / 2) * voxel_size for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def transform_voxel_field(x: torch.Tensor, irreps: o3.Irreps, R: torch.Tensor) -> torch.Tensor:
    """(g f)(p) = D(R) f(R^-1 p) for a grid symmetry R about the grid centre (e.g. from `cube_symmetries`).

    D(R) = molkern.groups.representation(irreps, R) acts on the channels; tensor dims 2, 3, 4 are x, y, z.

    Shapes:
        x: (B, irreps.dim, X, Y, Z), R: (3, 3) -> (B, irreps.dim, X, Y, Z)
    """
    irreps = o3.Irreps(irreps)
    if x.dim() != 5 or x.shape[1] != irreps.dim:
        raise ValueError(f"x must have shape (B, {irreps.dim}, X, Y, Z) for irreps {irreps}, got {tuple(x.shape)}")
    R = torch.as_tensor(R, dtype=torch.float64)
    shape = x.shape[2:]
    pos = voxel_centres(shape)  # (XYZ, 3)
    src = pos @ R  # rows (R^T p)^T
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    idx = src + centre
    rounded = idx.round()
    size = torch.tensor(list(shape), dtype=torch.float64)
    if (idx - rounded).abs().max() > 1e-9 or (rounded < 0).any() or (rounded >= size).any():
        raise ValueError(f"R does not map the grid {tuple(shape)} onto itself:\n{R}")
    rounded = rounded.long()
    flat = (rounded[:, 0] * shape[1] + rounded[:, 1]) * shape[2] + rounded[:, 2]  # (XYZ,)
    moved = x.flatten(2)[:, :, flat]  # (B, d, XYZ)
    D = representation(irreps, R).to(x.dtype)  # (d, d)
    return torch.einsum("oc,bcn->bon", D, moved).reshape(x.shape)
