"""Self-connection TP(x, z) with scalar node attributes z, in one matmul per path."""

from typing import List

import torch
from e3nn import o3

from .constants import cached, parameters_constant
from .fused import extension
from .tracing import is_tracing_for_compile
from .eager import eager_e3nn


class ScalarAttributeTensorProduct(o3.FullyConnectedTensorProduct):
    """e3nn's FullyConnectedTensorProduct(irreps_in, irreps_attr, irreps_out) for scalar attributes (l = 0 only).

    Same parameters, initialisation and values as the parent (NequIP's self-connection when z is the atom-type
    one-hot); the forward pass forms the products x_u z_v and applies each path's weights in one matmul,
    instead of e3nn's einsum chains (about 100 operations per call at lmax 2, 44 here). Within
    `molkern.nn.constant_parameters`, each node's weight matrices sum_v z_v W_v are formed from cached stacked
    weights and applied in one C++ pass (forward and backward; 1.7x faster than the torch form at 14 nodes, 10x
    faster than the ordinary forward at 50 to 10,000), or, without the extension, for up to `max_constant_rows`
    nodes, one matmul and one bmm per irrep.

    Shapes:
        x: (N, irreps_in.dim), z: (N, irreps_attr.dim) -> (N, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(self, irreps_in: o3.Irreps, irreps_attr: o3.Irreps, irreps_out: o3.Irreps):
        super().__init__(irreps_in, irreps_attr, irreps_out)
        if any(ir.l != 0 for _, ir in self.irreps_in2):
            raise ValueError(f"irreps_attr must be scalars (l = 0), got {self.irreps_in2}")
        # per output block: the (input block, attribute block, weight slice, coefficient) of its paths
        starts = torch.tensor([0] + [ins.path_shape[0] * ins.path_shape[1] * ins.path_shape[2]
                                     for ins in self.instructions]).cumsum(0).tolist()
        self._paths: List[list] = [[] for _ in self.irreps_out]
        for ins, start, stop in zip(self.instructions, starts[:-1], starts[1:]):
            l = self.irreps_in1[ins.i_in1].ir.l
            coefficient = ins.path_weight * float(o3.wigner_3j(l, 0, l)[0, 0, 0])  # w3j(l, 0, l) = I / sqrt(2l + 1)
            self._paths[ins.i_out].append((ins.i_in1, ins.i_in2, start, stop, coefficient))
        self._in1_dims = [mul_ir.dim for mul_ir in self.irreps_in1]
        self._in2_dims = [mul_ir.dim for mul_ir in self.irreps_in2]
        # per output block: (input block, first column in `_weights_by_attribute`) of each input block feeding it
        self._pairs: List[list] = []
        columns = 0
        for (mul, _), paths in zip(self.irreps_out, self._paths):
            inputs = sorted({i1 for i1, *_ in paths})
            self._pairs.append([])
            for i1 in inputs:
                self._pairs[-1].append((i1, columns))
                columns += self.irreps_in1[i1].mul * mul
        self._pair_columns = columns
        self._plan = [(mul, ir.dim, [(i1, self.irreps_in1[i1].mul, start) for i1, start in pairs])
                      for (mul, ir), pairs in zip(self.irreps_out, self._pairs)]
        # the same for the C++ pass: rows (x column start, U, out column start, W, d, first column of the pair)
        x_start, out_start = [sl.start for sl in self.irreps_in1.slices()], [sl.start for sl in self.irreps_out.slices()]
        plan = torch.tensor([[x_start[i1], u, out_start[o], mul, d, start]
                             for o, (mul, d, pairs) in enumerate(self._plan) for i1, u, start in pairs], dtype=torch.long)
        self.register_buffer("_plan_tensor", plan.view(-1, 6), persistent=False)
        # within constant_parameters, up to this many rows (~50 at lmax 2 and 32 channels): the bound of the torch
        # form's per-node weights (N x columns numbers; measured, 1 thread, forward and input gradient: 1.5x
        # faster than the ordinary form at 14 rows, even at 64); the C++ pass has no bound
        self.max_constant_rows = (1 << 18) // max(columns, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor, weight=None) -> torch.Tensor:
        if weight is not None:
            raise ValueError("ScalarAttributeTensorProduct uses its internal weights")
        n = x.shape[0]
        if parameters_constant() and (n <= self.max_constant_rows or self._fused(z)):
            return self._forward_per_node_weights(x, z)
        x_blocks = torch.split(x, self._in1_dims, dim=-1)
        z_blocks = torch.split(z, self._in2_dims, dim=-1)
        out = []
        for (mul, ir), paths in zip(self.irreps_out, self._paths):
            block = x.new_zeros(n, mul * ir.dim) if not paths else None
            for i1, i2, start, stop, c in paths:
                u, v = self.irreps_in1[i1].mul, self.irreps_in2[i2].mul
                xz = x_blocks[i1].view(n, u, 1, ir.dim) * z_blocks[i2].view(n, 1, v, 1)  # (N, U, V, d)
                w = self.weight[start:stop].view(u * v, mul) * c  # (U V, W)
                # one mm on (N d, U V) rows (a 3-d @ 2-d matmul whose second factor needs no gradient is a bmm
                # against N copies of it)
                y = xz.view(n, u * v, ir.dim).transpose(1, 2).reshape(n * ir.dim, u * v) @ w  # (N d, W)
                y = y.view(n, ir.dim, mul).transpose(1, 2).reshape(n, mul * ir.dim)
                block = y if block is None else block + y
            out.append(block)
        return torch.cat(out, dim=-1)

    @staticmethod
    def _fused(z: torch.Tensor) -> bool:
        """Whether the constant-parameter forward is the C++ pass (10x faster than the ordinary form from 50 to
        10,000 rows: it reads only each node's own attribute matrices)."""
        return extension() is not None and not z.requires_grad and not is_tracing_for_compile()

    def _forward_per_node_weights(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Constant parameters: each node's (W, U) matrix of every (input block -> output block) pair is
        sum_v z_v W_v, one matmul of z with the cached stacked weights' (W, U) half; then one bmm per pair (or all
        of it in one C++ pass: an autograd function in C++ whose input gradient is the adjoint pass, so derivatives
        of any order work)."""
        n = z.shape[0]
        stacked = cached(self, "weights_by_attribute", (self.weight,), self._weights_by_attribute)
        if self._fused(z):
            return extension().attribute_linear(x.contiguous(), z.contiguous(), stacked, self._plan_tensor,
                                                self.irreps_out.dim, self.irreps_in1.dim)
        per_node = z @ stacked[:, self._pair_columns:]  # (N, columns)
        x_blocks = torch.split(x, self._in1_dims, dim=-1)
        out = []
        for mul, d, pairs in self._plan:  # plain ints: this loop runs at every call
            block = per_node.new_zeros(n, mul * d) if not pairs else None
            for i1, u, start in pairs:
                w = per_node[:, start : start + u * mul].view(n, mul, u)  # (N, W, U)
                y = torch.bmm(w, x_blocks[i1].view(n, u, d)).view(n, mul * d)  # (N, W d)
                block = y if block is None else block + y
            out.append(block)
        return torch.cat(out, dim=-1)

    def _weights_by_attribute(self) -> torch.Tensor:
        """(irreps_in2.dim, 2 columns) matrix: row v holds, for every (input, output block) pair, the (U, W) weights
        of attribute component v (times the path coefficient) at the pair's columns in `_pairs`, then the same
        matrices transposed to (W, U) (for the C++ adjoint pass) at those columns + `columns`."""
        stacked = self.weight.new_zeros(self.irreps_in2.dim, 2, self._pair_columns)
        z_start = [sl.start for sl in self.irreps_in2.slices()]
        for (mul, _), paths, pairs in zip(self.irreps_out, self._paths, self._pairs):
            column = dict(pairs)
            for i1, i2, start, stop, c in paths:
                u, v = self.irreps_in1[i1].mul, self.irreps_in2[i2].mul
                w = self.weight[start:stop].view(u, v, mul) * c
                rows, columns = slice(z_start[i2], z_start[i2] + v), slice(column[i1], column[i1] + u * mul)
                stacked[rows, 0, columns] += w.permute(1, 0, 2).reshape(v, u * mul)
                stacked[rows, 1, columns] += w.permute(1, 2, 0).reshape(v, u * mul)
        return stacked.view(self.irreps_in2.dim, -1)
