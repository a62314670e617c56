"""The default kernel head: depthwise kernel matrices from invariant path weights and a per-edge geometric basis.

With an invariant kernel trunk, the depthwise kernel's MLP head is an `InvariantWeightedLinear`: each coefficient
vector of type l2 is sum_k w_k(s) V_{l2,k}, with weights w affine in the invariants s and V_{l2,k} the kernel
input's vectors of that type (harmonics of the edge, references, attribute products). The kernel matrix is linear
in the coefficients, so

    K[e, h] = sum_{path, k, j} w[e, h, path, k] V_{l2,k}[e, j] CG_path[j]      (V = 1 for l2 = 0)

This head computes the same matrices as `DepthwiseProduct.kernel_matrices(InvariantWeightedLinear(...))` (same
parameters, same values) with one matmul for the weights w of all terms (path, k, j), one for the vector
components V of the terms (a 0/1 selection), their product and one matmul against the Clebsch-Gordan rows (plus
one matmul for the channel weights), instead of a dozen small per-block products, splits and concatenations.
Eagerly, `aggregate` goes further: the fused convolution builds the matrices from the weights, the vector
components and the envelope itself (`molkern.nn.fused.depthwise_terms_aggregate`), none of them stored per edge.
"""

from typing import NamedTuple, Optional

import torch
from e3nn import o3
from torch import nn

from .constants import cached, parameters_constant
from .depthwise import DepthwiseProduct
from .fused import TermPlan, depthwise_terms_aggregate
from .mlp import InvariantWeightedLinear


class FoldedHead(NamedTuple):
    """The head's weights as its products read them (cached with constant parameters)."""

    term_weight: torch.Tensor  # (S, H T)
    term_bias: torch.Tensor  # (H T,)
    channel_weight: Optional[torch.Tensor]  # (S, U)
    channel_bias: Optional[torch.Tensor]  # (U,)
    selection: torch.Tensor  # (V, T)
    constant: torch.Tensor  # (T,)
    cg: torch.Tensor  # (T, d_out d_in)
    cg_values: torch.Tensor  # (NZ,)
    term_weight_t: torch.Tensor  # (H T, S): the same, edges-last products
    term_bias_column: torch.Tensor  # (H T, 1)


class InvariantDepthwiseHead(nn.Module):
    """Kernel matrices (and channel weights) of a depthwise kernel whose head is an InvariantWeightedLinear.

    Args:
        irreps_kernel_in: the kernel input (`EdgeEmbedding.irreps_kernel_in`): one 0e block (the invariants s)
            and at most one block of each other irrep type.
        tp: the kernel's DepthwiseProduct (paths, heads, Clebsch-Gordan coefficients).
        num_channel_weights: U invariant per-channel factors to emit as well (0: none).

    Parameters `weight` (S, W) and `bias` (W,) are those of `InvariantWeightedLinear(irreps_kernel_in,
    tp.irreps_coefficients + U x 0e)` (same initialisation, same columns, interchangeable state dicts).

    Shapes:
        kernel_in: (E, irreps_kernel_in.dim), envelope: (E, 1), optional kernel_in_parts (`Edges.kernel_in_parts`)
            -> kernels (E, H, d_out, d_in) times the envelope, channel_weights (E, U) or None
    """

    def __init__(self, irreps_kernel_in: o3.Irreps, tp: DepthwiseProduct, num_channel_weights: int = 0):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_kernel_in)
        self.irreps_out = tp.irreps_coefficients + o3.Irreps(f"{num_channel_weights}x0e")
        linear = InvariantWeightedLinear(self.irreps_in, self.irreps_out)
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("_scale", linear._scale, persistent=False)

        in_slices = self.irreps_in.slices()
        scalar = linear.scalar_index
        if scalar not in (0, len(self.irreps_in) - 1):
            raise ValueError(f"irreps_kernel_in {self.irreps_in} must have its 0e block first or last")
        # one split (its backward one cat) rather than two slices (two zero-filled gradients) per layer
        self._scalars_first = scalar == 0
        num_scalars = self.irreps_in[scalar].dim
        self._split = [num_scalars, self.irreps_in.dim - num_scalars][:: 1 if self._scalars_first else -1]
        vector_columns = [c for i, sl in enumerate(in_slices) if i != scalar for c in range(sl.start, sl.stop)]
        vector_row = {c: r for r, c in enumerate(vector_columns)}  # kernel_in column -> row of `_selection`

        per_head, d_in, d_out, _ = tp.dims
        cg = tp.cg.view(per_head, d_out * d_in)  # float64, rows: (path, component) of one head
        block_of = {ir: b for b, (_, ir) in enumerate(tp.irreps_coefficients)}
        weight_start = [0] + torch.tensor(linear.widths).cumsum(0).tolist()
        count = {ir: mul // tp.heads for mul, ir in tp.irreps_coefficients}
        # one column per (path, vector k, component j) of a head: the product of weight w[h, path, k] and vector
        # component V_{l2,k}[j] (1 for 0e), contracted with the Clebsch-Gordan row of (path, j)
        terms = []  # (coefficient block, weight column within one head's part of it, vector row or None, cg row)
        seen, offset = {ir: 0 for ir in count}, 0
        for _, _, ir in tp.paths:
            b = block_of[ir]
            source, _, k, d = linear.blocks[b]
            for kk in range(k):
                for j in range(d):
                    row = None if source is None else vector_row[in_slices[source].start + kk * d + j]
                    terms.append((b, seen[ir] * k + kk, row, offset + j))
            seen[ir] += 1
            offset += ir.dim
        weight_columns = [weight_start[b] + h * count[tp.irreps_coefficients[b].ir] * linear.blocks[b][2] + c
                          for h in range(tp.heads) for b, c, _, _ in terms]
        selection = torch.zeros(len(vector_columns), len(terms), dtype=torch.float64)
        constant = torch.zeros(len(terms), dtype=torch.float64)
        for t, (_, _, row, _) in enumerate(terms):
            if row is None:
                constant[t] = 1.0
            else:
                selection[row, t] = 1.0
        self.heads, self.num_terms, self._matrix = tp.heads, len(terms), (d_out, d_in)
        self.num_channel_weights = num_channel_weights
        self.register_buffer("_weight_columns", torch.tensor(weight_columns, dtype=torch.long), persistent=False)
        start = weight_start[len(tp.irreps_coefficients)]
        self.register_buffer("_channel_columns", torch.arange(start, start + num_channel_weights), persistent=False)
        # float64 buffers whatever the default dtype (cast at use), as DepthwiseProduct's
        self.register_buffer("_selection", selection, persistent=False)  # (V, T): vector component of each term
        self.register_buffer("_constant", constant, persistent=False)  # (T,): 1 for the terms of 0e coefficients
        self.register_buffer("_cg", cg[[r for _, _, _, r in terms]], persistent=False)  # (T, d_out * d_in)
        # the same, for building the matrices inside the fused convolution: each term's vector row (-1: none)
        # and the nonzero Clebsch-Gordan entries (term, position, value)
        self.register_buffer("_term_rows", torch.tensor([-1 if r is None else r for _, _, r, _ in terms]),
                             persistent=False)
        cg_term, cg_pos = torch.nonzero(self._cg, as_tuple=True)
        self.register_buffer("_cg_term", cg_term, persistent=False)
        self.register_buffer("_cg_pos", cg_pos, persistent=False)

    def forward(self, kernel_in: torch.Tensor, envelope: torch.Tensor, kernel_in_parts=None):
        num_edges = kernel_in.shape[0]
        scalars, vectors, folded = self._inputs(kernel_in, kernel_in_parts)
        term_weight, term_bias, channel_weight, channel_bias, selection, constant, cg = folded[:7]
        term_weights = torch.addmm(term_bias, scalars, term_weight)  # (E, H T)
        vectors = torch.addmm(constant, vectors, selection) * envelope  # (E, T)
        # (the messages are linear in the kernels: the envelope goes on the narrowest factor)
        if self.heads == 1:  # (E, T): two view operations fewer, forward and backward
            terms = term_weights * vectors
        else:
            terms = term_weights.view(num_edges, self.heads, self.num_terms) * vectors.unsqueeze(1)  # (E, H, T)
            terms = terms.view(-1, self.num_terms)
        kernels = (terms @ cg).view(num_edges, self.heads, *self._matrix)  # (E, H, d_out, d_in)
        if not self.num_channel_weights:
            return kernels, None
        channel_weights = torch.addmm(channel_bias, scalars, channel_weight)
        return kernels, channel_weights  # (E, H, d_out, d_in), (E, U)

    def aggregate(self, node_feats: torch.Tensor, kernel_in: torch.Tensor, envelope: torch.Tensor,
                  edge_index: torch.Tensor, num_nodes: int, kernel_in_parts=None) -> torch.Tensor:
        """The convolution's sums with these kernels (`DepthwiseProduct.aggregate` of `forward`'s kernels and
        channel weights), the kernel matrices built inside the fused pass (`depthwise_terms_aggregate`).

        node_feats: (N, H, d_in, U / H) head-major features -> (num_nodes, H, d_out, U / H)
        """
        num_edges = kernel_in.shape[0]
        scalars, vectors, f = self._inputs(kernel_in, kernel_in_parts)
        # edges last: the fused pass reads the weights of consecutive edges as vectors
        term_weights = torch.addmm(f.term_bias_column, f.term_weight_t, scalars.t())  # (H T, E)
        channel_weights = None
        if self.num_channel_weights:
            channel_weights = torch.addmm(f.channel_bias, scalars, f.channel_weight)
            channel_weights = channel_weights.view(num_edges, self.heads, self.num_channel_weights // self.heads)
        plan = TermPlan(self._term_rows, self._cg_term, self._cg_pos, f.cg_values, f.cg, self._matrix[0], f.selection,
                        f.constant)
        return depthwise_terms_aggregate(node_feats, term_weights.view(self.heads, self.num_terms, num_edges),
                                         vectors, envelope, channel_weights, edge_index[0], edge_index[1], num_nodes,
                                         plan)

    def _inputs(self, kernel_in: torch.Tensor, kernel_in_parts=None):
        """The kernel input's invariants (E, S) and vector part (E, V) (kernel_in_parts, when given: the same
        columns as two tensors, invariants first), and `_folded` (cached with constant parameters)."""
        if kernel_in_parts is not None and self._scalars_first:
            scalars, vectors = kernel_in_parts
        else:
            scalars, vectors = torch.split(kernel_in, self._split, dim=1)
            if not self._scalars_first:
                scalars, vectors = vectors, scalars
        if parameters_constant():
            sources = (self.weight, self.bias, self._scale, self._selection, self._constant, self._cg)
            return scalars, vectors, cached(self, f"folded_{kernel_in.dtype}", sources,
                                            lambda: self._folded(kernel_in.dtype))
        return scalars, vectors, self._folded(kernel_in.dtype)

    def _folded(self, dtype: torch.dtype) -> FoldedHead:
        """The weights and biases of the terms and the channel weights (scaled), and the constant matrices in
        dtype."""
        weight = self.weight * self._scale  # (S, W)
        channels = (weight[:, self._channel_columns], self.bias[self._channel_columns]) if self.num_channel_weights \
            else (None, None)
        cg = self._cg.to(dtype)
        term_weight, term_bias = weight[:, self._weight_columns], self.bias[self._weight_columns]
        return FoldedHead(term_weight, term_bias, *channels, self._selection.to(dtype), self._constant.to(dtype), cg,
                          cg[self._cg_term, self._cg_pos], term_weight.t(), term_bias[:, None])

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.heads} heads x {self.num_terms} terms, {self.num_channel_weights} channel weights"
