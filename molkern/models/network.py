"""The network: node embedding -> N interaction blocks -> readout, for any subgroup G of O(3)."""

from typing import Optional, Union

import torch
from e3nn import o3
from torch import nn

from .. import groups as groups_lib
from ..nn.eager import eager_e3nn
from ..nn.linear import Linear
from ..nn import (
    EdgeEmbedding,
    ImplicitKernel,
    InteractionBlock,
    Readout,
    StandardKernel,
    SteerableConv,
    irreps_up_to,
)

KERNELS = ("depthwise", "factorised", "full", "standard")


class MolkernNet(nn.Module):
    """Steerable point-convolution network with implicit (or standard) kernels.

    Args:
        irreps_node_attr: fixed node inputs, e.g. "5x0e" (atom-type one-hot) or "1x0e+1x1o" (L_i, velocity).
            "" means no attributes (a constant 1 is used).
        irreps_edge_attr: per-edge inputs of the kernel, e.g. "4x0e" (bond one-hot); "" for none.
        irreps_out: output irreps per node: "1x0e" energy-like, "1x1o" vector, "40x0e" logits.
        pooling: "sum" or "mean" per graph, or None for per-node outputs.
        group: a molkern.groups.Group or a name for molkern.groups.get ("o3", "so2", ...).
        kernel: implicit "depthwise" (default, fastest: per edge, kernel_heads kernel matrices, each applied to
            its share of the channels), "factorised" (one angular vector, per-channel path weights) or "full"
            (paper-exact, channel mixing on edges); or "standard" (NequIP's radial x SH, O(3) only).
        num_channels: multiplicity of each hidden irrep; lmax: largest l of hidden features.
        parity: "natural" (0e, 1o, 2e, ...) or "both" hidden parities.
        num_layers: number of interaction blocks.
        cutoff: Angstrom; num_radial: Bessel functions.
        kernel_mlp_width: multiplicity of each hidden irrep of the kernel MLP.
        kernel_trunk: the kernel MLP's part shared by all blocks (run once per forward): "invariant" (default: an
            MLP of kernel_trunk_width units on the invariants, the heads weight the harmonics and other
            non-scalar inputs by functions of its output) or "gated" (e3nn gated layers on all irreps,
            kernel_mlp_width copies each; the heads are e3nn Linear layers).
        kernel_trunk_layers: layers of that trunk; kernel_trunk_width: units of the invariant trunk.
        kernel_head_layers: gated layers of each block's own kernel head (0: a Linear head).
        kernel_heads: kernel matrices per edge of the depthwise kernel (divides num_channels).
        kernel_channel_weights: the depthwise kernel also scales each channel by an invariant of the edge.
        kernel_batch_norm: batch-normalise the harmonic polynomials fed to the kernel MLP.
        kernel_node_attrs: feed node attributes of both ends to the kernel MLP.
        self_connection: each block's skip map, "attributes" (NequIP's tensor product with the node attributes:
            per element with a one-hot atom type) or "linear" (one map for all nodes; fewer parameters and
            multiply-adds, see InteractionBlock).
        readout_hidden: width of the readout MLP's hidden layer (per irrep of the output's degrees).
        avg_num_neighbors: normalisation of the neighbour sum (see `average_num_neighbors`).

    Shapes:
        pos: (N, 3) Angstrom, node_attrs: (N, irreps_node_attr.dim), edge_index: (2, E) [source, target],
        edge_attrs: (E, irreps_edge_attr.dim), batch: (N,), edge_shifts: (E, 3) Angstrom (periodic images:
        edge_vec = pos[src] - pos[dst] + shift, see molkern.data.neighbors) -> (num_graphs, irreps_out.dim)
        or (N, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(
        self,
        irreps_node_attr: Union[str, o3.Irreps] = "5x0e",
        irreps_edge_attr: Union[str, o3.Irreps] = "",
        irreps_out: Union[str, o3.Irreps] = "1x0e",
        pooling: Optional[str] = "sum",
        group: Union[str, "groups_lib.Group"] = "o3",
        kernel: str = "depthwise",
        num_channels: int = 16,
        lmax: int = 1,
        parity: str = "natural",
        num_layers: int = 3,
        cutoff: float = 5.0,
        num_radial: int = 8,
        kernel_mlp_width: int = 8,
        kernel_trunk: str = "invariant",
        kernel_trunk_layers: int = 2,
        kernel_trunk_width: int = 64,
        kernel_head_layers: int = 0,
        kernel_heads: int = 1,
        kernel_channel_weights: bool = True,
        kernel_batch_norm: bool = True,
        kernel_node_attrs: bool = True,
        self_connection: str = "attributes",
        readout_hidden: int = 16,
        avg_num_neighbors: float = 1.0,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.group = groups_lib.get(group) if isinstance(group, str) else group
        if kernel == "standard" and self.group.irreps_ref.dim > 0:
            raise ValueError(
                f"the standard kernel is O(3)-equivariant only and ignores the references of {self.group!r}; "
                "use kernel='factorised' or 'full' for a subgroup"
            )
        self.irreps_node_attr = o3.Irreps(irreps_node_attr)
        self.irreps_edge_attr = o3.Irreps(irreps_edge_attr)
        if kernel == "standard" and self.irreps_edge_attr.dim > 0:
            raise ValueError("the standard kernel takes no edge attributes; use an implicit kernel")
        attrs = self.irreps_node_attr if self.irreps_node_attr.dim > 0 else o3.Irreps("1x0e")
        self.irreps_hidden = irreps_up_to(num_channels, lmax, parity)
        implicit = kernel != "standard"
        self.edge_embedding = EdgeEmbedding(
            cutoff,
            lmax=2 * lmax if implicit else lmax,
            num_radial=num_radial,
            group=self.group,
            irreps_edge_attr=self.irreps_edge_attr,
            irreps_node_attr=self.irreps_node_attr if implicit and kernel_node_attrs else "",
            batch_norm=kernel_batch_norm,
            kernel_input=implicit,
            trunk_width=kernel_trunk_width if kernel_trunk == "invariant" else kernel_mlp_width,
            trunk_layers=kernel_trunk_layers if implicit else 0,
            trunk_type=kernel_trunk,
        )
        self.embedding = Linear(attrs, self.irreps_hidden)
        self.blocks = nn.ModuleList()
        irreps = self.embedding.irreps_out
        for _ in range(num_layers):
            if implicit:
                k = ImplicitKernel(
                    irreps, self.irreps_hidden, self.edge_embedding.irreps_kernel_in, kernel,
                    kernel_mlp_width, kernel_head_layers, heads=kernel_heads, channel_weights=kernel_channel_weights,
                    invariant_head=kernel_trunk == "invariant",
                )
            else:
                k = StandardKernel(irreps, self.irreps_hidden, self.edge_embedding.irreps_sh, num_radial)
            block = InteractionBlock(irreps, self.irreps_hidden, attrs, SteerableConv(k, avg_num_neighbors),
                                     self_connection=self_connection)
            self.blocks.append(block)
            irreps = block.irreps_out
        self.readout = Readout(irreps, irreps_out, pooling, hidden=readout_hidden)
        self.irreps_out = self.readout.irreps_out

    def forward(
        self,
        pos: torch.Tensor,
        node_attrs: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attrs: Optional[torch.Tensor] = None,
        batch: Optional[torch.Tensor] = None,
        num_graphs: Optional[int] = None,
        edge_shifts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        num_nodes = pos.shape[0]
        if batch is None:
            batch = torch.zeros(num_nodes, dtype=torch.long, device=pos.device)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if num_nodes > 0 else 0
        if self.irreps_node_attr.dim == 0:
            node_attrs = pos.new_ones(num_nodes, 1)  # (N, 1)
        elif node_attrs.shape != (num_nodes, self.irreps_node_attr.dim):
            raise ValueError(
                f"node_attrs must have shape ({num_nodes}, {self.irreps_node_attr.dim}) for irreps "
                f"{self.irreps_node_attr}, got {tuple(node_attrs.shape)}"
            )
        # (Tensor.index_select throughout molkern: torch_geometric replaces torch.index_select by a Python wrapper)
        edge_vec = pos.index_select(0, edge_index[0]) - pos.index_select(0, edge_index[1])  # (E, 3)
        if edge_shifts is not None:
            edge_vec = edge_vec + edge_shifts.to(edge_vec.dtype)  # (E, 3) periodic images
        edges = self.edge_embedding(edge_vec, edge_attrs, node_attrs, edge_index)
        feats = self.embedding(node_attrs)  # (N, irreps_hidden.dim)
        for block in self.blocks:
            feats = block(feats, node_attrs, edges, edge_index)  # (N, irreps_hidden.dim)
        return self.readout(feats, batch, num_graphs)


def average_num_neighbors(edge_indices, num_nodes) -> float:
    """Mean in-degree over a collection of graphs (the conv's `avg_num_neighbors`)."""
    edges = sum(int(e.shape[1]) for e in edge_indices)
    nodes = sum(int(n) for n in num_nodes)
    if nodes == 0:
        raise ValueError("cannot average over an empty collection of graphs")
    return max(edges / nodes, 1.0)
