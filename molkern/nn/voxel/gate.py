"""Gated nonlinearity on voxel fields."""

import torch
from e3nn import o3
from torch import nn

from ..eager import eager_e3nn
from ..mlp import make_gate


class VoxelGate(nn.Module):
    """The e3nn gate of `molkern.nn.make_gate` applied at every voxel (equivariant pointwise nonlinearity).

    Scalars 0e -> SiLU, 0o -> tanh; every l > 0 field is multiplied by sigmoid of its own extra 0e gate.
    Feed it fields laid out as `irreps_in` (the gate's sorted layout: scalars, gates, gated fields), e.g.
    the output of a DenseSteerableConv3d built with irreps_out=gate.irreps_in.

    Shapes:
        x: (B, irreps_in.dim, X, Y, Z) -> (B, irreps_out.dim, X, Y, Z)
    """

    @eager_e3nn
    def __init__(self, irreps_out: o3.Irreps):
        super().__init__()
        self.gate = make_gate(irreps_out)
        self.irreps_in = self.gate.irreps_in
        self.irreps_out = self.gate.irreps_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.irreps_in.dim:
            raise ValueError(f"x must have shape (B, {self.irreps_in.dim}, ...) for {self.irreps_in}, got {tuple(x.shape)}")
        return self.gate(x.movedim(1, -1)).movedim(-1, 1)  # (B, irreps_out.dim, X, Y, Z)
