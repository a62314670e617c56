"""The channel-wise ("uvu") tensor product of the kernels, fused into a few batched matrix products.

Both kernel forms and the standard kernel apply, per edge e and channel u of the source features,

    out_p[e, u, k] = w[e, p, u] * c_p * sum_{i,j} C^{l1 l2 l3}[i, j, k] x_{l1}[e, u, i] a_{l2}[e, j]

for every path p = (l1, l2 -> l3), with a the angular vector (multiplicity one) and w per-edge weights.
e3nn's `o3.TensorProduct` runs this as one chain of einsums per path (14 paths for lmax = 2 features and
an l <= 4 band). Here all paths that read the same input irrep l1 are one product: the angular vector is
contracted with the Clebsch-Gordan coefficients of all of them (one matmul against a constant), giving per
edge a K x (2 l1 + 1) matrix (K = the summed output sizes), which multiplies the features seen as a
(2 l1 + 1) x U matrix (one batched matmul); the weights then scale each path's rows (one broadcast product
per run of paths of equal output size).

Values are e3nn's (tested to 1e-12 in float64, gradients included). The weights are ordered per input irrep,
path (sorted by output size), channel (`e3nn_weight_order` maps e3nn's order to ours); the output columns
come in an internal order that `arrange` permutes into irreps_out's layout (callers that sum over edges
arrange the sums, on far fewer rows).
"""

from typing import List

import torch
from e3nn import o3
from torch import nn

from .tracing import is_tracing_for_compile


class ChannelwiseProduct(nn.Module):
    """Fused uvu product with per-edge weights; numerically the same map as `o3.TensorProduct`.

    Args:
        irreps_in: irreps of x (multiplicities U_i).
        irreps_angular: irreps of a, every multiplicity 1.
        irreps_out: wanted output irreps; every path l1 x l2 -> l3 with l3 in irreps_out is kept and gets its
            own output block of multiplicity U_i; blocks are sorted by irrep (as `channelwise_tensor_product`).

    Attributes:
        irreps_out: the sorted output layout; weight_numel: width of the weights; instructions:
            (i_in, i_angular, i_out, path_weight) per path, in e3nn's order.

    Shapes:
        x: (E, irreps_in.dim), angular: (E, irreps_angular.dim), weights: (E, weight_numel)
            -> (E, irreps_out.dim) in the internal column order
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_angular: o3.Irreps, irreps_out: o3.Irreps):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_angular = o3.Irreps(irreps_angular)
        if any(mul != 1 for mul, _ in self.irreps_angular):
            raise ValueError(f"irreps_angular must have multiplicity 1 everywhere, got {self.irreps_angular}")
        keep = {ir for _, ir in o3.Irreps(irreps_out)}
        paths = [(i, j, ir) for i, (_, ir_in) in enumerate(self.irreps_in)
                 for j, (_, ir_a) in enumerate(self.irreps_angular) for ir in ir_in * ir_a if ir in keep]
        if not paths:
            raise ValueError(f"no path connects {self.irreps_in} (x) {self.irreps_angular} to {irreps_out}")
        mid = o3.Irreps([(self.irreps_in[i].mul, ir) for i, _, ir in paths])
        self.irreps_out, perm, _ = mid.sort()  # perm[p]: output block of path p
        # e3nn's normalisation ("component" irreps, "element" paths): c_p^2 = (2 l3 + 1) / (number of
        # paths into the block) = 2 l3 + 1, since every block here has exactly one path
        self.instructions = [(i, j, perm[p], (2 * ir.l + 1) ** 0.5) for p, (i, j, ir) in enumerate(paths)]
        self.weight_numel = sum(self.irreps_in[i].mul for i, _, _ in paths)

        a_slices, out_slices = self.irreps_angular.slices(), self.irreps_out.slices()
        # per input irrep: (index, U, d1, K, runs); its paths sorted by output size d3, so that each run
        # (first row, number of paths n, d3, first path) of equal d3 shares one broadcast of its weights
        self._groups = []
        source_of_column = torch.empty(self.irreps_out.dim, dtype=torch.long)
        e3nn_weight_order = torch.empty(self.weight_numel, dtype=torch.long)  # ours, at e3nn's weight columns
        e3nn_start = torch.tensor([0] + [self.irreps_in[i].mul for i, _, _ in paths]).cumsum(0)
        weight_offset = offset = 0  # column offsets in the weights and in the concatenated (E, K * U) products
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            mine = sorted((p for p, path in enumerate(paths) if path[0] == i), key=lambda p: paths[p][2].dim)
            if not mine:
                continue
            d1, K = ir_in.dim, sum(paths[p][2].dim for p in mine)
            cg = torch.zeros(self.irreps_angular.dim, K, d1, dtype=torch.float64)
            runs, row = [], 0
            for n, p in enumerate(mine):
                _, j, i_out, c = self.instructions[p]
                d3 = paths[p][2].dim
                w3j = o3.wigner_3j(ir_in.l, self.irreps_angular[j].ir.l, paths[p][2].l, dtype=torch.float64)
                cg[a_slices[j], row : row + d3, :] = c * w3j.permute(1, 2, 0)  # (d2, d3, d1)
                e3nn_weight_order[e3nn_start[p] : e3nn_start[p] + mul] = weight_offset + n * mul + torch.arange(mul)
                # output block i_out holds (u, k) at u * d3 + k; the product has it at offset + (row + k) * U + u
                u, k = torch.meshgrid(torch.arange(mul), torch.arange(d3), indexing="ij")
                source_of_column[out_slices[i_out].start + (u * d3 + k).flatten()] = (offset + (row + k) * mul + u).flatten()
                if runs and runs[-1][2] == d3:
                    runs[-1][1] += 1
                else:
                    runs.append([row, 1, d3, n])
                row += d3
            # float64 whatever the default dtype: a model built in float32 and then .double()-ed stays exact
            self.register_buffer(f"_cg_{i}", cg.flatten(1), persistent=False)
            self._groups.append((i, mul, d1, K, [tuple(r) for r in runs]))
            weight_offset, offset = weight_offset + mul * len(mine), offset + mul * K
        self.register_buffer("_source_of_column", source_of_column, persistent=False)
        self.register_buffer("_column_of_source", torch.argsort(source_of_column), persistent=False)
        self.register_buffer("e3nn_weight_order", e3nn_weight_order, persistent=False)
        self._in_dims = [mul_ir.dim for mul_ir in self.irreps_in]
        self._run_widths = [n * mul for _, mul, _, _, runs in self._groups for _, n, _, _ in runs]

    def forward(self, x: torch.Tensor, angular: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The products in the internal layout (E, irreps_out.dim); `arrange` puts them in irreps_out's layout.

        Both are linear in the rows, so sums over edges can run before `arrange` (on far fewer rows).
        """
        num_edges = x.shape[0]
        parts: List[torch.Tensor] = []
        # torch.split, not slicing: the backward of a split is one cat, each slice's would be a zero-filled copy
        x_blocks = torch.split(x, self._in_dims, dim=1)
        w_runs = iter(torch.split(weights, self._run_widths, dim=1))
        for i, mul, d1, K, runs in self._groups:
            cg = getattr(self, f"_cg_{i}").to(angular.dtype)
            G = (angular @ cg).view(num_edges, K, d1)  # (E, K, d1): the angular vector through every path's CG
            x_i = x_blocks[i].view(num_edges, mul, d1).transpose(1, 2)  # (E, d1, U)
            y = G * x_i if d1 == 1 else torch.bmm(G, x_i)  # (E, K, U); bmm is slow for inner size 1
            y_runs = torch.split(y, [n * d3 for _, n, d3, _ in runs], dim=1)
            for y_run, w, (_, n, d3, _) in zip(y_runs, w_runs, runs):  # weights (E, n, 1, U) broadcast over d3
                run = y_run.view(num_edges, n, d3, mul) * w.view(num_edges, n, 1, mul)
                parts.append(run.view(num_edges, n * d3 * mul))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def arrange(self, products: torch.Tensor) -> torch.Tensor:
        """(R, irreps_out.dim) internal layout -> irreps_out's layout (a column permutation)."""
        return permute_columns(products, self._source_of_column, self._column_of_source)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} x {self.irreps_angular} -> {self.irreps_out}, {len(self.instructions)} paths"


@torch.library.custom_op("molkern::permute_columns", mutates_args=())
def _permute_columns_op(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return x.index_select(-1, perm)


@_permute_columns_op.register_fake
def _(x, perm, inverse):
    return x.new_empty(x.shape[:-1] + perm.shape)


def _permute_columns_backward(ctx, grad):
    return _permute_columns_op(grad, ctx.inverse, ctx.perm), None, None


def _permute_columns_setup(ctx, inputs, output):
    _, ctx.perm, ctx.inverse = inputs


_permute_columns_op.register_autograd(_permute_columns_backward, setup_context=_permute_columns_setup)


class _PermuteColumns(torch.autograd.Function):
    """The operator's forward and backward for eager calls, without its Python dispatch (~15 us per call)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        _permute_columns_setup(ctx, (x, perm, inverse), None)
        return x.index_select(-1, perm)

    @staticmethod
    def backward(ctx, grad):
        return _PermuteColumns.apply(grad, ctx.inverse, ctx.perm), None, None


def permute_columns(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[..., perm] for a permutation perm (inverse = argsort(perm)), as one opaque operation.

    Its backward is the inverse gather (autograd's default backward of index_select, index_add_, is several
    times slower), differentiable again (force training). In graphs traced for torch.compile it is the operator
    `torch.ops.molkern.permute_columns`, opaque to compilers: a compiled graph stores the result instead of
    fusing the permutation into its consumer (a row gather of permuted columns compiles into a slow element-wise
    gather).
    """
    if is_tracing_for_compile():
        return _permute_columns_op(x, perm, inverse)
    return _PermuteColumns.apply(x, perm, inverse)
