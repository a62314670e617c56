"""Equivariant spatial pooling of voxel fields: average pooling and norm (max-norm) pooling."""

import torch
import torch.nn.functional as F
from e3nn import o3
from torch import nn


def _check(x: torch.Tensor, irreps: o3.Irreps) -> None:
    if x.dim() != 5 or x.shape[1] != irreps.dim:
        raise ValueError(f"x must have shape (B, {irreps.dim}, X, Y, Z) for irreps {irreps}, got {tuple(x.shape)}")


class VoxelAvgPool(nn.Module):
    """Average of every component over k x k x k blocks (linear and channel-wise, so equivariant).

    Exactly equivariant under the cube symmetries when every grid size is a multiple of the stride and
    kernel_size == stride (the blocks are then permuted among themselves).

    Shapes:
        x: (B, irreps.dim, X, Y, Z) -> (B, irreps.dim, X // k, Y // k, Z // k)
    """

    def __init__(self, irreps: o3.Irreps, kernel_size: int = 2, stride=None):
        super().__init__()
        self.irreps_in = self.irreps_out = o3.Irreps(irreps)
        self.kernel_size, self.stride = kernel_size, stride or kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(x, self.irreps_in)
        return F.avg_pool3d(x, self.kernel_size, self.stride)


class VoxelNormPool(nn.Module):
    """Max-norm pooling: in each k x k x k block, keep every field (irrep copy) at the voxel where its norm
    is largest, with all its components (the norm is invariant, so the choice commutes with G).

    Scalars 0e/0o keep the value of largest magnitude (with its sign).

    Shapes:
        x: (B, irreps.dim, X, Y, Z) -> (B, irreps.dim, X', Y', Z') (as max_pool3d)
    """

    def __init__(self, irreps: o3.Irreps, kernel_size: int = 2, stride=None):
        super().__init__()
        self.irreps_in = self.irreps_out = o3.Irreps(irreps)
        self.kernel_size, self.stride = kernel_size, stride or kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check(x, self.irreps_in)
        b, _, nx, ny, nz = x.shape
        outs = []
        for (mul, ir), sl in zip(self.irreps_in, self.irreps_in.slices()):
            block = x[:, sl].reshape(b, mul, ir.dim, nx * ny * nz)  # (B, mul, d, XYZ)
            sq_norm = block.pow(2).sum(2).view(b, mul, nx, ny, nz)  # (B, mul, X, Y, Z)
            _, idx = F.max_pool3d(sq_norm.detach(), self.kernel_size, self.stride, return_indices=True)
            shape = idx.shape[-3:]
            idx = idx.reshape(b, mul, 1, -1).expand(-1, -1, ir.dim, -1)  # (B, mul, d, X'Y'Z')
            outs.append(torch.gather(block, 3, idx).reshape(b, mul * ir.dim, *shape))
        return torch.cat(outs, dim=1)  # (B, irreps.dim, X', Y', Z')
