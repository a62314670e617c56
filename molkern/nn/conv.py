"""Steerable point convolution (paper eq. 5) with an injected kernel."""

import torch
from torch import nn

from .edges import Edges
from .scatter import scatter_sum


class SteerableConv(nn.Module):
    """f_out(x_i) = 1/avg_num_neighbors * sum_{j in N(i)} k(x_j - x_i, z_i, z_j, z_ij) f_in(x_j).

    Edges follow PyG: edge_index[0] = source j, edge_index[1] = target i.

    Args:
        kernel: an ImplicitKernel or StandardKernel (anything with irreps_in/irreps_out and
            forward(node_feats_src, edges); if it also has `prepare`, `messages` and `arrange`, node features are
            prepared before the gather, messages summed in their own column order and the node sums arranged;
            with `aggregate` too, the kernel gathers, computes and sums the messages itself).
        avg_num_neighbors: normalisation of the neighbour sum (mean in-degree of the training graphs).

    Shapes:
        node_feats: (N, irreps_in.dim), edge_index: (2, E) -> (N, irreps_out.dim)
    """

    def __init__(self, kernel: nn.Module, avg_num_neighbors: float = 1.0):
        super().__init__()
        if avg_num_neighbors <= 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {avg_num_neighbors}")
        self.kernel = kernel
        self.irreps_in = kernel.irreps_in
        self.irreps_out = kernel.irreps_out
        self.avg_num_neighbors = float(avg_num_neighbors)

    def forward(self, node_feats: torch.Tensor, edges: Edges, edge_index: torch.Tensor) -> torch.Tensor:
        if hasattr(self.kernel, "prepare"):
            sums = self.sums(self.kernel.prepare(node_feats), edges, edge_index, node_feats.shape[0])
            return self.kernel.arrange(sums) / self.avg_num_neighbors
        messages = self.kernel(node_feats.index_select(0, edge_index[0]), edges)  # (E, irreps_out.dim)
        return scatter_sum(messages, edge_index[1], node_feats.shape[0]) / self.avg_num_neighbors

    def sums(self, prepared: torch.Tensor, edges: Edges, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """Each node's sum of messages, in the kernel's own column order (neither arranged nor normalised).

        prepared: (N, irreps_in.dim) node features in the layout `kernel.prepare` gives -> (num_nodes, irreps_out.dim)
        """
        if hasattr(self.kernel, "aggregate"):  # gather, messages and sum in the kernel's own way (maybe fused)
            return self.kernel.aggregate(prepared, edges, edge_index, num_nodes)
        messages = self.kernel.messages(prepared.index_select(0, edge_index[0]), edges)  # (E, irreps_out.dim)
        return scatter_sum(messages, edge_index[1], num_nodes)

    def extra_repr(self) -> str:
        return f"avg_num_neighbors={self.avg_num_neighbors:g}"
