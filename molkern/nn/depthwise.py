"""Depthwise application of per-edge kernel matrices: the implicit kernel's default, cheapest form.

For heads h = 1..H, every kernel block (input irrep l1 -> output irrep l3) and every irrep l2 in l1 x l3 (a
"path"), the kernel MLP emits one vector c[e, h, path] of type l2. The kernel matrix of head h on edge e is
the paper's (eq. 4: the MLP output, reshaped by Clebsch-Gordan coefficients into Hom(rho_in, rho_out))

    K[e, h][(l3, k), (l1, i)] = sum_{paths l1 x l2 -> l3} s_path sum_j C^{l1 l2 l3}[i, j, k] c[e, h, path][j]

and each channel u of the source features is multiplied by its head's matrix: m[e, u] = K[e, head(u)] x[e, u]
(channels u = h * U / H + q). Channels are mixed on nodes (the interaction block's linear layers), not on
edges, so per edge there is one (d_out x d_in) matrix per head and one batched matmul: for lmax = 2 features
81 numbers per head, against 48 rows per channel for the channel-wise product of the factorised form.

Node features enter and leave in e3nn's layout; on edges they live in a head-major layout (H, d, U / H)
(`prepare` permutes node features before the gather, `arrange` permutes node sums after the scatter).
"""

import torch
from e3nn import o3
from torch import nn

from .channelwise import permute_columns
from .fused import depthwise_aggregate
from .tracing import is_tracing_for_compile


def _single_multiplicity(irreps: o3.Irreps, name: str) -> int:
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1 or len({ir for _, ir in irreps}) != len(irreps):
        raise ValueError(f"{name} must hold each irrep once, all with the same multiplicity; got {irreps}")
    return muls.pop()


def _head_major_columns(irreps: o3.Irreps, heads: int) -> torch.Tensor:
    """e3nn column (block, channel u, component m) of each position of the (H, d, U / H) layout."""
    mul = irreps[0].mul
    per_head = mul // heads
    columns = torch.empty(irreps.dim, dtype=torch.long)
    row = 0  # position of component m of block b in the d rows
    for (mul_ir, sl) in zip(irreps, irreps.slices()):
        d = mul_ir.ir.dim
        h, m, q = torch.meshgrid(torch.arange(heads), torch.arange(d), torch.arange(per_head), indexing="ij")
        internal = h * (irreps.dim // heads) + (row + m) * per_head + q
        columns[internal.flatten()] = (sl.start + (h * per_head + q) * d + m).flatten()
        row += d
    return columns


class DepthwiseProduct(nn.Module):
    """Kernel matrices K[e, h] built from coefficients, applied to the channels of head h.

    Args:
        irreps_in: source feature irreps, each irrep once with one multiplicity U (e.g. "32x0e+32x1o+32x2e").
        irreps_out: message irreps, each once with multiplicity U.
        heads: number of kernel matrices per edge (divides U).
        allowed: irreps the coefficients may have (e.g. those the kernel MLP can produce); paths through
            other irreps are left out (None: all).

    Attributes:
        irreps_coefficients: what the kernel MLP emits, H x (paths through l2) copies of each l2, e3nn layout.
        dims: (coefficients per head, d_in, d_out, channels per head U / H).
        cg: (coefficients per head, d_out * d_in) float64 buffer: row (path, j) is s_path C^{l1 l2 l3}[:, j, :].

    Shapes:
        prepare: (N, irreps_in.dim) -> (N, irreps_in.dim) head-major
        kernel_matrices: coefficients (E, irreps_coefficients.dim) -> (E, H, d_out, d_in)
        forward: x (E, irreps_in.dim) head-major, kernels (E, H, d_out, d_in) -> (E, irreps_out.dim) head-major
        arrange: (R, irreps_out.dim) head-major -> e3nn layout
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, heads: int, allowed=None):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        mul = _single_multiplicity(self.irreps_in, "irreps_in")
        if _single_multiplicity(self.irreps_out, "irreps_out") != mul:
            raise ValueError(f"irreps_in {self.irreps_in} and irreps_out {self.irreps_out} need equal multiplicities")
        if heads < 1 or mul % heads:
            raise ValueError(f"heads must divide the multiplicity {mul}, got {heads}")
        self.heads = heads
        allowed = None if allowed is None else {o3.Irrep(ir) for ir in allowed}
        paths = [(i, o, ir) for i, (_, ir_in) in enumerate(self.irreps_in) for o, (_, ir_out) in enumerate(self.irreps_out)
                 for ir in ir_in * ir_out if allowed is None or ir in allowed]
        if not paths:
            raise ValueError(f"no kernel path connects {self.irreps_in} to {self.irreps_out} through {allowed}")
        self.paths = paths
        types = sorted({ir for _, _, ir in paths})
        count = {ir: sum(1 for _, _, t in paths if t == ir) for ir in types}
        self.irreps_coefficients = o3.Irreps([(heads * count[ir], ir) for ir in types])
        into = {o: sum(1 for _, t, _ in paths if t == o) for o in range(len(self.irreps_out))}

        d_in, d_out = self.irreps_in.dim // mul, self.irreps_out.dim // mul
        row_in = torch.tensor([0] + [ir.dim for _, ir in self.irreps_in]).cumsum(0)
        row_out = torch.tensor([0] + [ir.dim for _, ir in self.irreps_out]).cumsum(0)
        per_head = sum(ir.dim for _, _, ir in paths)  # coefficients per head
        cg = torch.zeros(per_head, d_out, d_in, dtype=torch.float64)
        coef_columns = torch.empty(heads * per_head, dtype=torch.long)
        block_start = dict(zip(types, (sl.start for sl in self.irreps_coefficients.slices())))
        seen = {ir: 0 for ir in types}
        offset = 0
        for i, o, ir in paths:
            l1, l3 = self.irreps_in[i].ir.l, self.irreps_out[o].ir.l
            # e3nn's "component" normalisation: unit-variance inputs give unit-variance outputs
            scale = ((2 * l3 + 1) / into[o]) ** 0.5
            w3j = o3.wigner_3j(l1, ir.l, l3, dtype=torch.float64)  # (d1, d2, d3)
            cg[offset : offset + ir.dim, row_out[o] : row_out[o + 1], row_in[i] : row_in[i + 1]] = scale * w3j.permute(1, 2, 0)
            q, n = seen[ir], count[ir]
            for h in range(heads):  # e3nn layout of the block: copy u = h * n + q at u * d2
                start = block_start[ir] + (h * n + q) * ir.dim
                coef_columns[h * per_head + offset + torch.arange(ir.dim)] = start + torch.arange(ir.dim)
            seen[ir] += 1
            offset += ir.dim
        self.dims = (per_head, d_in, d_out, mul // heads)
        # float64 whatever the default dtype: a model built in float32 and then .double()-ed stays exact
        self.register_buffer("cg", cg.flatten(1), persistent=False)
        self.register_buffer("_coef_columns", coef_columns, persistent=False)
        self.register_buffer("_coef_inverse", torch.argsort(coef_columns), persistent=False)
        in_columns = _head_major_columns(self.irreps_in, heads)
        self.register_buffer("_in_columns", in_columns, persistent=False)
        self.register_buffer("_in_inverse", torch.argsort(in_columns), persistent=False)
        out_columns = _head_major_columns(self.irreps_out, heads)  # e3nn column of each head-major position
        self.register_buffer("_out_columns", torch.argsort(out_columns), persistent=False)
        self.register_buffer("_out_inverse", out_columns, persistent=False)

    def prepare(self, node_feats: torch.Tensor) -> torch.Tensor:
        """e3nn layout -> head-major (H, d_in, U / H) layout, on nodes (before the gather)."""
        return permute_columns(node_feats, self._in_columns, self._in_inverse)

    def kernel_matrices(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(E, irreps_coefficients.dim) -> (E, H, d_out, d_in): K[e, h]."""
        per_head, d_in, d_out, _ = self.dims
        c = permute_columns(coefficients, self._coef_columns, self._coef_inverse)  # (E, H * per_head)
        return (c.view(-1, per_head) @ self.cg.to(c.dtype)).view(-1, self.heads, d_out, d_in)

    def forward(self, x: torch.Tensor, kernels: torch.Tensor, channel_weights=None) -> torch.Tensor:
        """Messages K[e, head(u)] x[e, u] (times channel_weights[e, u] if given), head-major: (E, irreps_out.dim).

        kernels: (E, H, d_out, d_in) kernel matrices (`kernel_matrices`); channel_weights: optional (E, U)
        invariant per-channel factors (U = multiplicity; channel u = h U/H + q).
        """
        _, d_in, d_out, per_head_channels = self.dims
        num_edges = x.shape[0]
        kernels = kernels.reshape(-1, d_out, d_in)  # (E * H, d_out, d_in)
        x = x.view(-1, d_in, per_head_channels)  # (E * H, d_in, U / H)
        if channel_weights is not None:
            x = x * channel_weights.reshape(-1, 1, per_head_channels)
        if is_tracing_for_compile():  # one fused loop in Inductor (eager would materialise the 4-d product)
            messages = (kernels[:, :, :, None] * x[:, None, :, :]).sum(2)  # (E * H, d_out, U / H)
        else:
            messages = torch.bmm(kernels, x)  # (E * H, d_out, U / H)
        return messages.reshape(num_edges, self.irreps_out.dim)

    def aggregate(self, node_feats: torch.Tensor, kernels: torch.Tensor, edge_index: torch.Tensor,
                  num_nodes: int, channel_weights=None) -> torch.Tensor:
        """Sums over each node's incoming edges of `forward`'s messages, in one fused pass (`depthwise_aggregate`).

        node_feats: (N_src, irreps_in.dim) head-major (from `prepare`); kernels, channel_weights: as forward;
        edge_index: (2, E) [source, target] -> (num_nodes, irreps_out.dim) head-major.
        """
        _, d_in, _, per_head_channels = self.dims
        x = node_feats.view(-1, self.heads, d_in, per_head_channels)
        weights = None if channel_weights is None else channel_weights.view(-1, self.heads, per_head_channels)
        sums = depthwise_aggregate(x, kernels, weights, edge_index[0], edge_index[1], num_nodes)
        return sums.view(num_nodes, self.irreps_out.dim)

    def arrange(self, products: torch.Tensor) -> torch.Tensor:
        """(R, irreps_out.dim) head-major -> irreps_out's e3nn layout."""
        return permute_columns(products, self._out_columns, self._out_inverse)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, {self.heads} heads, {len(self.paths)} paths"
