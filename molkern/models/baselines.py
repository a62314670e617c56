"""Non-equivariant baselines and helpers to match their size to the equivariant networks."""

from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["MPNN", "count_parameters", "match_width"]


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _mlp(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim_out))


class MPNN(nn.Module):
    """Plain message-passing network (no symmetry built in), EGNN/SEGNN's "MPNN" baseline.

        h_i^0 = Linear([L_i, v_i])                                     (node_attrs as given)
        m_ij  = MLP_msg([h_i, h_j, x_j - x_i, |x_j - x_i|, e_ij])      (E, width)
        h_i  <- h_i + MLP_upd([h_i, sum_j m_ij / avg_num_neighbors])   (num_layers times)
        out_i = MLP_out(h_i)                                           (N, dim_out), e.g. a displacement

    The raw coordinates enter the messages, so the network is translation invariant but not rotation
    equivariant: it must learn the symmetry from data.

    Args:
        dim_node_attr: size of the node attributes (4 for N-body: L_i and the velocity).
        dim_edge_attr: size of the edge attributes (1 for N-body: the spring indicator); 0 for none.
        dim_out: output size per node (3 for a vector).
        width: hidden width; num_layers: message-passing layers.
        avg_num_neighbors: divides the neighbour sum.

    Shapes:
        pos: (N, 3), node_attrs: (N, dim_node_attr), edge_index: (2, E) [source j, target i],
        edge_attrs: (E, dim_edge_attr) -> (N, dim_out)
    """

    def __init__(
        self,
        dim_node_attr: int = 4,
        dim_edge_attr: int = 1,
        dim_out: int = 3,
        width: int = 32,
        num_layers: int = 3,
        avg_num_neighbors: float = 1.0,
    ):
        super().__init__()
        self.dim_edge_attr = dim_edge_attr
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.embedding = nn.Linear(dim_node_attr, width)
        self.messages = nn.ModuleList(_mlp(2 * width + 4 + dim_edge_attr, width, width) for _ in range(num_layers))
        self.updates = nn.ModuleList(_mlp(2 * width, width, width) for _ in range(num_layers))
        self.output = _mlp(width, width, dim_out)

    def forward(
        self,
        pos: torch.Tensor,
        node_attrs: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attrs: Optional[torch.Tensor] = None,
        batch: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        src, dst = edge_index
        edge_vec = pos[src] - pos[dst]  # (E, 3) x_j - x_i
        geometry = [edge_vec, edge_vec.norm(dim=-1, keepdim=True)]  # (E, 3), (E, 1)
        if self.dim_edge_attr > 0:
            geometry.append(edge_attrs)  # (E, dim_edge_attr)
        geometry = torch.cat(geometry, dim=-1)  # (E, 4 + dim_edge_attr)
        h = self.embedding(node_attrs)  # (N, width)
        for message, update in zip(self.messages, self.updates):
            m = message(torch.cat([h[dst], h[src], geometry], dim=-1))  # (E, width)
            agg = torch.zeros_like(h).index_add_(0, dst, m) / self.avg_num_neighbors  # (N, width)
            h = h + update(torch.cat([h, agg], dim=-1))  # (N, width)
        return self.output(h)  # (N, dim_out)


def match_width(build: Callable[[int], nn.Module], target: int, lo: int = 1, hi: int = 1024) -> int:
    """The width w in [lo, hi] for which ``count_parameters(build(w))`` is closest to ``target``.

    Parameter counts of MLP networks grow monotonically with the width, so a bisection suffices.
    """
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_parameters(build(mid)) < target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda w: abs(count_parameters(build(w)) - target))
