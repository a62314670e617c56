"""Readouts: per-node outputs (scalars, vectors, logits), optionally pooled per graph."""

from typing import Optional

import torch
from e3nn import o3
from torch import nn

from .mlp import EquivariantMLP
from .scatter import scatter_mean, scatter_sum
from .eager import eager_e3nn

POOLINGS = ("sum", "mean", None)


class Readout(nn.Module):
    """Equivariant MLP from node features to `irreps_out` per node, then optional sum/mean pooling per graph.

    With scalar `irreps_out` ("1x0e", "40x0e", ...) the outputs are G-invariant; with "1x1o" they are
    per-node vectors (use pooling=None).

    Shapes:
        node_feats: (N, irreps_in.dim), batch: (N,) -> (num_graphs, irreps_out.dim) or (N, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, pooling: Optional[str] = "sum", hidden: int = 16):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.pooling = pooling
        lmax = max(ir.l for _, ir in self.irreps_out)
        irreps_hidden = o3.Irreps([(hidden, ir) for _, ir in self.irreps_in if ir.l <= lmax]).simplify()
        self.mlp = EquivariantMLP(self.irreps_in, irreps_hidden, self.irreps_out, num_layers=1)

    def forward(self, node_feats: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        out = self.mlp(node_feats)  # (N, irreps_out.dim)
        if self.pooling == "sum":
            return scatter_sum(out, batch, num_graphs)
        if self.pooling == "mean":
            return scatter_mean(out, batch, num_graphs)
        return out
