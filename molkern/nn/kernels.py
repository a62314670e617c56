"""Steerable kernels applied to source node features: implicit (depthwise, factorised or full) and standard.

A kernel maps the gathered source features f_j and the edge tensors to messages k(x_ij, z) f_j
without materialising a (d_out x d_in) matrix per edge; `kernel_matrix` materialises it for tests and plots.
"""

from typing import List

import torch
from e3nn import nn as enn
from e3nn import o3
from torch import nn

from .channelwise import ChannelwiseProduct
from .depthwise import DepthwiseProduct
from .depthwise_head import InvariantDepthwiseHead
from .edges import Edges
from .mlp import EquivariantMLP, InvariantWeightedLinear, filter_irreps, irreps_up_to, reachable_irreps
from .eager import eager_e3nn
from .fused import extension
from .scatter import scatter_sum
from .tracing import fused_sums_in_trace, is_tracing_for_compile


def kernel_irreps(irreps_in: o3.Irreps, irreps_out: o3.Irreps) -> List[o3.Irrep]:
    """The irreps in rho_in (x) rho_out, sorted: the blocks a kernel rho_in -> rho_out can have."""
    found = set()
    for _, ir_in in o3.Irreps(irreps_in):
        for _, ir_out in o3.Irreps(irreps_out):
            found.update(ir_in * ir_out)
    return sorted(found)


def channelwise_tensor_product(irreps_in: o3.Irreps, irreps_edge: o3.Irreps, irreps_out: o3.Irreps) -> o3.TensorProduct:
    """'uvu' product f_j (x) e_ij with per-edge weights, keeping only outputs whose irrep is in irreps_out.

    Each channel u of f_j is combined with the (multiplicity-1) edge irreps; outputs are sorted by irrep.
    """
    keep = {ir for _, ir in o3.Irreps(irreps_out)}
    mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(o3.Irreps(irreps_in)):
        for j, (_, ir_edge) in enumerate(o3.Irreps(irreps_edge)):
            for ir in ir_in * ir_edge:
                if ir in keep:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir))
    if not mid:
        raise ValueError(f"no path connects {irreps_in} (x) {irreps_edge} to {irreps_out}")
    mid = o3.Irreps(mid)
    mid_sorted, perm, _ = mid.sort()
    instructions = [(i, j, perm[k], mode, w) for i, j, k, mode, w in instructions]
    return o3.TensorProduct(
        irreps_in, irreps_edge, mid_sorted, instructions, shared_weights=False, internal_weights=False
    )


IMPLICIT_FORMS = ("depthwise", "factorised", "full")


class ImplicitKernel(nn.Module):
    """Implicit steerable kernel k(x, z_ij, z_i, z_j) produced by an equivariant MLP (paper eq. 3-5).

    The MLP reads `edges.kernel_in` (see EdgeEmbedding: harmonics, radial basis, attributes, the group's
    references); fed constant references, it is equivariant to their stabiliser G, hence so is the kernel.

    Forms:
        "depthwise" (default): the paper's kernel matrix in Hom(rho_in, rho_out) per edge and head: the MLP emits,
            per head, one vector per kernel path l1 x l2 -> l3 (`DepthwiseProduct`), reshaped by Clebsch-Gordan
            coefficients into a (d_out x d_in) matrix that multiplies every channel of its head. Channels are
            mixed on nodes, before gather and after scatter.
        "full": the paper-exact kernel. The MLP emits h_ij (mlp_width copies of every irrep in
            rho_in (x) rho_out); the kernel applied to f_j is TP(f_j, h_ij) with shared "uvw" weights,
            i.e. any equivariant linear map of h_ij into rho_in (x) rho_out, reshaped and contracted with f_j.
        "factorised": the MLP emits one angular vector a_ij (one copy of every irrep in rho_in (x) rho_out)
            and per-edge, per-channel path weights w_ij; messages are the channel-wise product
            TP_uvu(f_j, a_ij; w_ij). Channel mixing happens on nodes, before gather and after scatter.
    The MLP's hidden band limit is the largest l in rho_in (x) rho_out, so no kernel block is identically zero
    (an error otherwise). Blocks of an irrep type absent from the MLP input (e.g. 1e, 2o for O(3) without
    vector attributes) are zero by symmetry and are left out.

    Args:
        irreps_in: irreps of the source features f_j.
        irreps_out: irreps of the messages wanted (the factorised form's `irreps_out` is the sorted
            channel-wise product restricted to these irreps; its multiplicities follow irreps_in).
        irreps_kernel_in: `EdgeEmbedding.irreps_kernel_in`.
        form: "depthwise", "factorised" or "full".
        mlp_width: multiplicity of each hidden irrep of the kernel MLP.
        mlp_layers: number of gated hidden layers.
        batch_norm: e3nn BatchNorm after each hidden gate.
        heads: kernel matrices per edge of the depthwise form (divides the multiplicity of irreps_in).
        channel_weights: the depthwise form also scales each channel by an invariant of the edge (the MLP emits
            U more scalars).
        invariant_head: with mlp_layers = 0, the head is an `InvariantWeightedLinear` (weights from the
            invariants of the kernel input, e.g. an "invariant" EdgeEmbedding trunk) instead of an e3nn Linear;
            the depthwise form then builds its kernel matrices straight from the weights (`InvariantDepthwiseHead`).
        fused: the depthwise form's convolution sums run as one C++ pass (`molkern.nn.fused`, default); False
            keeps the torch operations (same values; for benchmarks).

    Shapes:
        node_feats_src: (E, irreps_in.dim), edges.kernel_in: (E, irreps_kernel_in.dim) -> (E, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_kernel_in: o3.Irreps,
        form: str = "depthwise",
        mlp_width: int = 8,
        mlp_layers: int = 2,
        batch_norm: bool = False,
        heads: int = 1,
        channel_weights: bool = False,
        invariant_head: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        self.fused = fused
        if form not in IMPLICIT_FORMS:
            raise ValueError(f"form must be one of {IMPLICIT_FORMS}, got {form!r}")
        self.form = form
        self.irreps_in = o3.Irreps(irreps_in)
        blocks = kernel_irreps(self.irreps_in, irreps_out)
        self.lmax_band = max(ir.l for ir in blocks)
        # blocks whose irrep type the MLP cannot produce are identically zero by symmetry: leave them out
        reachable = reachable_irreps(irreps_kernel_in)
        blocks = [ir for ir in blocks if ir in reachable]
        lmax_input = max((ir.l for _, ir in o3.Irreps(irreps_kernel_in)), default=0)
        if lmax_input < self.lmax_band:
            raise ValueError(
                f"the kernel input reaches l = {lmax_input} but rho_in (x) rho_out needs l = {self.lmax_band}: "
                f"build the EdgeEmbedding with lmax >= {self.lmax_band}"
            )
        hidden = filter_irreps(irreps_up_to(mlp_width, self.lmax_band, "both"), reachable)

        def make_mlp(irreps_mlp_out):
            if invariant_head and mlp_layers == 0:
                return InvariantWeightedLinear(irreps_kernel_in, irreps_mlp_out)
            return EquivariantMLP(irreps_kernel_in, hidden, irreps_mlp_out, mlp_layers, batch_norm)

        if form == "depthwise":
            self.tp = DepthwiseProduct(self.irreps_in, irreps_out, heads, allowed=blocks)
            self.irreps_out = self.tp.irreps_out
            self.irreps_angular = self.tp.irreps_coefficients
            self.num_channel_weights = self.irreps_in[0].mul if channel_weights else 0
            if invariant_head and mlp_layers == 0:  # same map as make_mlp's InvariantWeightedLinear, fewer ops
                self.mlp = InvariantDepthwiseHead(irreps_kernel_in, self.tp, self.num_channel_weights)
            else:
                self.mlp = make_mlp(self.irreps_angular + o3.Irreps(f"{self.num_channel_weights}x0e"))
        elif form == "full":
            irreps_h = o3.Irreps([(mlp_width, ir) for ir in blocks])
            self.mlp = make_mlp(irreps_h)
            self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, irreps_h, irreps_out)
            self.irreps_out = self.tp.irreps_out
            self.irreps_angular = irreps_h
        else:
            self.irreps_angular = o3.Irreps([(1, ir) for ir in blocks])
            self.tp = ChannelwiseProduct(self.irreps_in, self.irreps_angular, irreps_out)
            self.irreps_out = self.tp.irreps_out
            irreps_mlp_out = self.irreps_angular + o3.Irreps(f"{self.tp.weight_numel}x0e")
            self.mlp = make_mlp(irreps_mlp_out)

    def forward(self, node_feats_src: torch.Tensor, edges: Edges) -> torch.Tensor:
        """Messages k(x_ij, z) f_j: (E, irreps_in.dim) -> (E, irreps_out.dim)."""
        return self.arrange(self.messages(self.prepare(node_feats_src), edges))

    def prepare(self, node_feats: torch.Tensor) -> torch.Tensor:
        """Node (or source) features from e3nn's layout into the one `messages` reads."""
        return self.tp.prepare(node_feats) if self.form == "depthwise" else node_feats

    def arrange(self, messages: torch.Tensor) -> torch.Tensor:
        """Messages (or sums of them) from `messages`' column order into irreps_out's layout."""
        return messages if self.form == "full" else self.tp.arrange(messages)

    def aggregate(self, node_feats: torch.Tensor, edges: Edges, edge_index: torch.Tensor, num_nodes: int):
        """Sums of `messages` over each node's incoming edges, in messages' column order: (num_nodes, irreps_out.dim).

        node_feats: (N, irreps_in.dim) in the layout `prepare` gives; edge_index: (2, E) [source, target]. The
        depthwise form runs as one fused pass (molkern.nn.fused) unless fused=False (or, when traced for
        torch.compile, the C++ extension is unavailable or the trace asks for the torch form: Inductor then fuses
        the torch operations).
        """
        fused = not is_tracing_for_compile() or (fused_sums_in_trace() and extension() is not None)
        if self.form == "depthwise" and self.fused and fused:
            if isinstance(self.mlp, InvariantDepthwiseHead):  # the matrices built inside the fused pass
                _, d_in, _, per_head = self.tp.dims
                x = node_feats.view(-1, self.tp.heads, d_in, per_head)
                sums = self.mlp.aggregate(x, edges.kernel_in, edges.envelope, edge_index, num_nodes,
                                          edges.kernel_in_parts)
                return sums.view(num_nodes, self.irreps_out.dim)
            kernels, channel_weights = self._depthwise_kernels(edges)
            return self.tp.aggregate(node_feats, kernels, edge_index, num_nodes, channel_weights)
        messages = self.messages(node_feats.index_select(0, edge_index[0]), edges)  # (E, irreps_out.dim)
        return scatter_sum(messages, edge_index[1], num_nodes)

    def _depthwise_kernels(self, edges: Edges):
        """The depthwise form's (E, H, d_out, d_in) kernel matrices, times the cutoff envelope (the messages are
        linear in them), and (E, U) channel weights or None."""
        if isinstance(self.mlp, InvariantDepthwiseHead):
            return self.mlp(edges.kernel_in, edges.envelope, edges.kernel_in_parts)
        h = self.mlp(edges.kernel_in)  # (E, irreps_mlp_out.dim)
        if not self.num_channel_weights:
            return self.tp.kernel_matrices(h * edges.envelope), None
        coefficients, channel_weights = torch.split(h, [self.irreps_angular.dim, self.num_channel_weights], dim=1)
        return self.tp.kernel_matrices(coefficients * edges.envelope), channel_weights

    def messages(self, node_feats_src: torch.Tensor, edges: Edges) -> torch.Tensor:
        """Messages in the product's column order (see ChannelwiseProduct, DepthwiseProduct): (E, irreps_out.dim).

        node_feats_src: source features in the layout `prepare` gives.
        """
        if self.form == "depthwise":
            return self.tp(node_feats_src, *self._depthwise_kernels(edges))  # (E, irreps_out.dim), head-major
        h = self.mlp(edges.kernel_in)  # (E, irreps_mlp_out.dim)
        # the messages are linear in h (full) or in the path weights (factorised): apply the cutoff
        # envelope there, on the narrower tensor
        if self.form == "full":
            return self.tp(node_feats_src, h * edges.envelope)  # (E, irreps_out.dim)
        angular, weights = torch.split(h, [self.irreps_angular.dim, self.tp.weight_numel], dim=1)
        weights = weights * edges.envelope  # (E, tp.weight_numel)
        return self.tp(node_feats_src, angular, weights)  # (E, irreps_out.dim), internal order


class StandardKernel(nn.Module):
    """NequIP's kernel: radial MLP weights x spherical harmonics, TP_uvu(f_j, Y(x/|x|); R(|x|)). O(3) only.

    Args:
        irreps_in: irreps of the source features.
        irreps_out: irreps allowed in the messages (multiplicities follow irreps_in).
        irreps_sh: `EdgeEmbedding.irreps_sh`.
        num_radial: width of `edges.radial`.
        mlp_width, mlp_layers: hidden width and depth of the radial MLP.
        fused: use molkern's fused ChannelwiseProduct (default); False runs e3nn's TensorProduct, as NequIP does
            (same map, slower; kept for benchmarks).

    Shapes:
        node_feats_src: (E, irreps_in.dim) -> (E, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_radial: int,
        mlp_width: int = 64,
        mlp_layers: int = 2,
        fused: bool = True,
    ):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.fused = fused
        product = ChannelwiseProduct if fused else channelwise_tensor_product
        self.tp = product(self.irreps_in, self.irreps_sh, irreps_out)
        self.irreps_out = self.tp.irreps_out
        self.radial_mlp = enn.FullyConnectedNet(
            [num_radial] + [mlp_width] * mlp_layers + [self.tp.weight_numel], torch.nn.functional.silu
        )

    def forward(self, node_feats_src: torch.Tensor, edges: Edges) -> torch.Tensor:
        """Messages R(|x|) Y(x) f_j: (E, irreps_in.dim) -> (E, irreps_out.dim)."""
        return self.arrange(self.messages(node_feats_src, edges))

    def prepare(self, node_feats: torch.Tensor) -> torch.Tensor:
        """The layout `messages` reads: e3nn's (unchanged)."""
        return node_feats

    def arrange(self, messages: torch.Tensor) -> torch.Tensor:
        """Messages (or sums of them) from `messages`' column order into irreps_out's layout."""
        return self.tp.arrange(messages) if self.fused else messages

    def messages(self, node_feats_src: torch.Tensor, edges: Edges) -> torch.Tensor:
        """Messages in the product's column order: (E, irreps_out.dim)."""
        if edges.sh is None:
            raise ValueError("StandardKernel needs edges.sh: build its EdgeEmbedding with kernel_input=False")
        weights = self.radial_mlp(edges.radial) * edges.envelope  # (E, tp.weight_numel)
        return self.tp(node_feats_src, edges.sh, weights)  # (E, irreps_out.dim)


def kernel_matrix(kernel: nn.Module, edges: Edges) -> torch.Tensor:
    """Materialise k(x_e) as a (E, d_out, d_in) matrix by applying the kernel to the basis of rho_in.

    Costs d_in kernel evaluations per edge; for tests, plots and small irreps only.
    """
    num_edges = edges.vec.shape[0]
    d_in = kernel.irreps_in.dim
    eye = torch.eye(d_in, dtype=edges.vec.dtype, device=edges.vec.device)
    basis = eye.repeat_interleave(num_edges, dim=0)  # (d_in * E, d_in)
    edges = edges._replace(kernel_in_parts=None)  # the head then splits the repeated kernel_in itself
    repeated = Edges(*[None if t is None else t.repeat((d_in,) + (1,) * (t.dim() - 1)) for t in edges])
    columns = kernel(basis, repeated).view(d_in, num_edges, -1)  # (d_in, E, d_out)
    return columns.permute(1, 2, 0)  # (E, d_out, d_in)
