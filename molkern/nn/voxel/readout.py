"""Invariant global readout of voxel fields."""

import torch
from e3nn import o3
from torch import nn


class VoxelInvariantReadout(nn.Module):
    """O(3)-invariant summary of a field over the whole grid: the spatial mean of every 0e channel and the
    spatial mean of the norm of every other field (irrep copy).

    Invariant under every grid permutation (so under the cube symmetries exactly) and, for fields that are
    G-equivariant, G-invariant. Put the G-specific information into 0e channels with a last convolution.

    Args:
        irreps_in: irreps of the fields.
        eps: the norm is sqrt(|f|^2 + eps^2) - eps (smooth at 0), in the fields' units.

    Shapes:
        x: (B, irreps_in.dim, X, Y, Z) -> (B, irreps_out.dim) with irreps_out = num_fields x 0e
    """

    def __init__(self, irreps_in: o3.Irreps, eps: float = 1e-6):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(f"{self.irreps_in.num_irreps}x0e")
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.irreps_in.dim:
            raise ValueError(f"x must have shape (B, {self.irreps_in.dim}, X, Y, Z) for {self.irreps_in}, got {tuple(x.shape)}")
        b = x.shape[0]
        outs = []
        for (mul, ir), sl in zip(self.irreps_in, self.irreps_in.slices()):
            block = x[:, sl].reshape(b, mul, ir.dim, -1)  # (B, mul, d, XYZ)
            if ir == o3.Irrep("0e"):
                outs.append(block[:, :, 0].mean(-1))  # (B, mul)
            else:
                norm = (block.pow(2).sum(2) + self.eps**2).sqrt() - self.eps  # (B, mul, XYZ)
                outs.append(norm.mean(-1))  # (B, mul)
        return torch.cat(outs, dim=1)  # (B, num_fields)
