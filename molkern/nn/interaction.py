"""NequIP-style interaction block around a steerable convolution."""

import torch
from e3nn import o3
from torch import nn

from .conv import SteerableConv
from .edges import Edges
from .mlp import make_gate
from .self_connection import ScalarAttributeTensorProduct
from .eager import eager_e3nn
from .block_linear import block_matmul
from .linear import Linear
from .constants import cached, parameters_constant


SELF_CONNECTIONS = ("attributes", "linear")


class InteractionBlock(nn.Module):
    """linear -> convolution -> linear, + self-connection (conditioned on node attributes) -> gate (+ residual).

        h = Linear_2(Conv(Linear_1(x))) + SC(x)      (laid out as gate.irreps_in)
        SC(x) = TP(x, node_attrs)  ("attributes", NequIP's)  or  Linear(x)  ("linear")
        out = Gate(h) + x   if irreps_out == irreps_in and resnet, else Gate(h)

    Within `molkern.nn.constant_parameters`, Linear_2(Conv(Linear_1(x))) runs as product, the convolution's
    sums, product: the kernel's column permutations and 1 / avg_num_neighbors are folded into the two linear
    layers' cached matrices (`Linear.constant_matrix`: their dense blocks).

    Args:
        irreps_in: node feature irreps.
        irreps_out: wanted output irreps (the block's `irreps_out` is the gate's layout of them).
        irreps_node_attr: fixed node attributes (e.g. "5x0e" atom-type one-hot) for the self-connection.
        conv: a SteerableConv with conv.irreps_in == irreps_in.
        resnet: add the input when shapes allow.
        self_connection: "attributes" (default): the tensor product of x with the node attributes (with a
            one-hot atom type, one linear map per element); "linear": one linear map for all nodes, 1 / (number
            of attribute channels) of the parameters and multiply-adds (the attributes then enter through the
            embedding and the kernels only).

    Shapes:
        node_feats: (N, irreps_in.dim), node_attrs: (N, irreps_node_attr.dim) -> (N, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_node_attr: o3.Irreps,
        conv: SteerableConv,
        resnet: bool = True,
        self_connection: str = "attributes",
    ):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        if conv.irreps_in != self.irreps_in:
            raise ValueError(f"conv.irreps_in {conv.irreps_in} must equal the block's irreps_in {self.irreps_in}")
        self.gate = make_gate(irreps_out)
        self.irreps_out = self.gate.irreps_out
        self.linear_1 = Linear(self.irreps_in, self.irreps_in)
        self.conv = conv
        # conv.irreps_out is sorted (one block per path): merging equal neighbours keeps the memory layout, the
        # weights (same flat order) and the initialisation, and makes e3nn emit one matmul per irrep, not per path
        self.linear_2 = Linear(conv.irreps_out.simplify(), self.gate.irreps_in)
        if self_connection not in SELF_CONNECTIONS:
            raise ValueError(f"self_connection must be one of {SELF_CONNECTIONS}, got {self_connection!r}")
        self.attribute_self_connection = self_connection == "attributes"
        if self.attribute_self_connection:
            scalar_attrs = all(ir.l == 0 for _, ir in o3.Irreps(irreps_node_attr))
            product = ScalarAttributeTensorProduct if scalar_attrs else o3.FullyConnectedTensorProduct
            self.self_connection = product(self.irreps_in, irreps_node_attr, self.gate.irreps_in)
        else:
            self.self_connection = Linear(self.irreps_in, self.gate.irreps_in)
        self.resnet = resnet and self.irreps_out == self.irreps_in

    def forward(
        self, node_feats: torch.Tensor, node_attrs: torch.Tensor, edges: Edges, edge_index: torch.Tensor
    ) -> torch.Tensor:
        if parameters_constant() and self._foldable(node_feats.shape[0]):
            h = self._folded_linear_conv_linear(node_feats, edges, edge_index)
        else:
            h = self.linear_2(self.conv(self.linear_1(node_feats), edges, edge_index))  # (N, gate.irreps_in.dim)
        skip = self.self_connection(node_feats, node_attrs) if self.attribute_self_connection else \
            self.self_connection(node_feats)  # (N, gate.irreps_in.dim)
        h = h + skip
        out = self.gate(h)  # (N, irreps_out.dim)
        return out + node_feats if self.resnet else out

    def _foldable(self, rows: int) -> bool:
        kernel = self.conv.kernel
        return (hasattr(kernel, "prepare") and hasattr(kernel, "arrange")
                and all(isinstance(lin, Linear) and lin.constant_rows_ok(rows)
                        for lin in (self.linear_1, self.linear_2)))

    def _folded_linear_conv_linear(self, node_feats, edges, edge_index):
        """linear_2(conv(linear_1(x))) with constant parameters: the kernel's column permutations (`prepare`,
        `arrange`) and the 1 / avg_num_neighbors folded into the cached dense matrices of the two linear layers,
        so that what is left is matmul, the convolution's sums, matmul."""
        kernel = self.conv.kernel
        l1, l2 = self.linear_1, self.linear_2

        def first():  # prepare permutes columns: prepare(x @ M) = x @ prepare(M)
            return l1.constant_matrix(kernel.prepare(l1.dense_matrix()))

        def second():  # arrange(s) / avg @ M = s @ (A M / avg), A = arrange(I)
            matrix = l2.dense_matrix()
            dim = self.conv.irreps_out.dim
            arranged = kernel.arrange(torch.eye(dim, dtype=matrix.dtype, device=matrix.device))
            return l2.constant_matrix(torch.cat([arranged @ matrix[:dim] / self.conv.avg_num_neighbors, matrix[dim:]]))

        m1 = cached(self, "linear_1", (l1.weight, l1.bias), first)
        m2 = cached(self, "linear_2", (l2.weight, l2.bias), second)
        sums = self.conv.sums(block_matmul(node_feats, m1), edges, edge_index, node_feats.shape[0])
        return block_matmul(sums, m2)
