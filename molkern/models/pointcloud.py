"""Point-cloud classifier (paper section 5.3): kNN graphs per level, random downsampling, invariant readout.

    level l = 0 .. L-1:  keep num_points[l] points of each cloud (random subset; the first level keeps all
                         if the cloud is not larger) -> kNN graph (k neighbours, recomputed on the kept
                         points) -> blocks_per_level interaction blocks (implicit or standard kernels)
    readout:             per-point invariant scalars -> mean and max over each cloud -> MLP -> logits

Normals enter as "1o" node attributes: in the node embedding and the blocks' self-connections, and
(implicit kernels) in the kernel MLP at both ends of each edge, so the kernel sees x . n_i, n_i . n_j, ...
The downsampling picks points by their index in the batch, never by their coordinates: with a fixed
generator (eval mode uses ``subsample_seed``) a rotated cloud keeps the same subset, and kNN graphs depend
only on distances, so the logits are exactly G-invariant (up to ties in distances).

Units: coordinates of clouds normalised to the unit ball (molkern.data.ModelNet); cutoffs in those units.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from e3nn import o3
from torch import nn

from .. import groups as groups_lib
from ..nn import (
    EdgeEmbedding,
    ImplicitKernel,
    InteractionBlock,
    Readout,
    StandardKernel,
    SteerableConv,
    irreps_up_to,
    scatter_mean,
)
from ..nn.eager import eager_e3nn
from ..nn.linear import Linear
from .network import KERNELS

__all__ = ["PointCloudClassifier", "knn_graph", "subsample"]

IRREPS_NODE_ATTR = o3.Irreps("1x0e+1x1o")  # [1, normal]


def _dense_index(batch: torch.Tensor, num_graphs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-node position inside its graph, graph sizes and offsets (nodes of a graph must be contiguous)."""
    counts = torch.bincount(batch, minlength=num_graphs)  # (B,)
    ptr = torch.cumsum(counts, 0) - counts  # (B,)
    local = torch.arange(batch.numel(), device=batch.device) - ptr[batch]  # (N,)
    return local, counts, ptr


def knn_graph(pos: torch.Tensor, k: int, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Edges from each node's k nearest neighbours (same graph, no self-loops) to the node.

    Graphs with fewer than k + 1 nodes connect all their pairs. Nodes of a graph must be contiguous in
    ``batch`` (as in PyG batches). Indices only: no gradient flows through the choice.

    Shapes:
        pos (N, 3), batch (N,) -> edge_index (2, E) [source j (neighbour), target i], E <= N k
    """
    local, counts, ptr = _dense_index(batch, num_graphs)
    n_max = int(counts.max())
    with torch.no_grad():
        dense = pos.new_full((num_graphs, n_max, 3), 0.0)
        dense[batch, local] = pos.detach()
        dist = torch.cdist(dense, dense)  # (B, n_max, n_max)
        valid = local.new_zeros(num_graphs, n_max, dtype=torch.bool)
        valid[batch, local] = True
        dist = dist.masked_fill(~valid[:, None, :], math.inf)
        dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
        kk = min(k, n_max - 1)
        if kk <= 0:
            return torch.zeros(2, 0, dtype=torch.long, device=pos.device)
        d, nbr = dist.topk(kk, dim=-1, largest=False)  # (B, n_max, kk)
        d, nbr = d[batch, local], nbr[batch, local]  # (N, kk)
        keep = torch.isfinite(d)  # graphs smaller than kk + 1
        dst = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(nbr)
        src = nbr + ptr[batch][:, None]
    return torch.stack([src[keep], dst[keep]])


def subsample(
    batch: torch.Tensor, num_graphs: int, num_keep: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Indices of a uniformly random subset of ``num_keep`` nodes of every graph (all nodes if fewer).

    Chosen from the nodes' indices only (not their coordinates); the result is sorted by graph, so the kept
    nodes of a graph stay contiguous.

    Shapes:
        batch (N,) -> keep (M,) int64, M = sum over graphs of min(n_g, num_keep)
    """
    keys = torch.rand(batch.shape[0], generator=generator, device=batch.device)  # (N,)
    order = torch.argsort(keys)
    order = order[torch.argsort(batch[order], stable=True)]  # by graph, random within a graph
    local, _, _ = _dense_index(batch[order], num_graphs)
    return torch.sort(order[local < num_keep]).values


class PointCloudClassifier(nn.Module):
    """G-invariant point-cloud classifier with implicit (or standard) steerable kernels.

    Args:
        num_classes: number of logits.
        group: a molkern.groups.Group or a name ("c1", "so2", "o2", "cinfh", "so3", "o3", ...).
        kernel: "factorised", "full" (implicit) or "standard" (radial x harmonics, O(3) groups only).
        num_points: points kept per cloud at each level, e.g. (256, 128, 64) (gradual random downsampling).
        blocks_per_level: interaction blocks at each level.
        k: neighbours of the kNN graph, recomputed at each level.
        num_channels, lmax, parity: hidden irreps (irreps_up_to).
        cutoff_factor: the level with n points uses cutoff = min(cutoff_factor * sqrt(k / n), 2) (unit-ball
            clouds: beyond the distances of nearly all k-th neighbours; measured on the procedural shapes).
        num_radial: Bessel functions; kernel_mlp_width, kernel_trunk_layers, kernel_head_layers: implicit MLP.
        radial_mlp_width: hidden width of the standard kernel's radial MLP (2 layers, as NequIP).
        readout_width: invariant scalars per point before pooling; head_hidden, dropout: the MLP head.
        subsample_seed: seed of the downsampling in eval mode (training draws fresh subsets from torch's RNG).

    Shapes:
        pos (N, 3), normal (N, 3) unit, batch (N,) (nodes of a cloud contiguous) -> logits (num_graphs, num_classes)
    """

    @eager_e3nn
    def __init__(
        self,
        num_classes: int,
        group: Union[str, "groups_lib.Group"] = "o3",
        kernel: str = "factorised",
        num_points: Sequence[int] = (256, 128, 64),
        blocks_per_level: int = 1,
        k: int = 10,
        num_channels: int = 16,
        lmax: int = 1,
        parity: str = "natural",
        cutoff_factor: float = 2.5,
        num_radial: int = 8,
        kernel_mlp_width: int = 8,
        kernel_trunk_layers: int = 1,
        kernel_head_layers: int = 0,
        radial_mlp_width: int = 64,
        readout_width: int = 32,
        head_hidden: int = 64,
        dropout: float = 0.0,
        subsample_seed: int = 0,
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
        if not num_points or any(int(n) < 1 for n in num_points):
            raise ValueError(f"num_points must be a non-empty list of positive sizes, got {num_points}")
        self.num_points = [int(n) for n in num_points]
        self.k, self.kernel, self.subsample_seed = int(k), kernel, int(subsample_seed)
        self.irreps_hidden = irreps_up_to(num_channels, lmax, parity)
        implicit = kernel != "standard"
        self.cutoffs = [min(cutoff_factor * math.sqrt(k / n), 2.0) for n in self.num_points]
        self.edge_embeddings = nn.ModuleList(
            EdgeEmbedding(
                cutoff,
                lmax=2 * lmax if implicit else lmax,
                num_radial=num_radial,
                group=self.group,
                irreps_node_attr="1x1o" if implicit else "",
                kernel_input=implicit,
                trunk_width=kernel_mlp_width,
                trunk_layers=kernel_trunk_layers if implicit else 0,
            )
            for cutoff in self.cutoffs
        )
        self.embedding = Linear(IRREPS_NODE_ATTR, self.irreps_hidden)
        self.blocks = nn.ModuleList()
        self.block_levels = []
        irreps = self.embedding.irreps_out
        for level, edge_embedding in enumerate(self.edge_embeddings):
            for _ in range(blocks_per_level):
                if implicit:
                    kern = ImplicitKernel(irreps, self.irreps_hidden, edge_embedding.irreps_kernel_in, kernel,
                                          kernel_mlp_width, kernel_head_layers)  # fmt: skip
                else:
                    kern = StandardKernel(irreps, self.irreps_hidden, edge_embedding.irreps_sh, num_radial,
                                          radial_mlp_width)  # fmt: skip
                block = InteractionBlock(irreps, self.irreps_hidden, IRREPS_NODE_ATTR, SteerableConv(kern, k))
                self.blocks.append(block)
                self.block_levels.append(level)
                irreps = block.irreps_out
        self.readout = Readout(irreps, f"{readout_width}x0e", pooling=None)
        self.head = nn.Sequential(
            nn.Linear(2 * readout_width, head_hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, num_classes),
        )
        self.num_classes = num_classes

    def forward(
        self,
        pos: torch.Tensor,
        normal: torch.Tensor,
        batch: Optional[torch.Tensor] = None,
        num_graphs: Optional[int] = None,
    ) -> torch.Tensor:
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1
        generator = None
        if not self.training:
            generator = torch.Generator(device=pos.device).manual_seed(self.subsample_seed)
        attrs = torch.cat([pos.new_ones(pos.shape[0], 1), normal], dim=-1)  # (N, 4) [1, n] as 1x0e+1x1o
        feats = self.embedding(attrs)  # (N, irreps_hidden.dim)
        level = -1
        for block, block_level in zip(self.blocks, self.block_levels):
            if block_level != level:  # new level: downsample, kNN graph, edge geometry
                level = block_level
                keep = subsample(batch, num_graphs, self.num_points[level], generator)  # (M,)
                pos, attrs, feats, batch = pos[keep], attrs[keep], feats[keep], batch[keep]
                edge_index = knn_graph(pos, self.k, batch, num_graphs)  # (2, E)
                edge_vec = pos[edge_index[0]] - pos[edge_index[1]]  # (E, 3) x_j - x_i
                edges = self.edge_embeddings[level](edge_vec, None, attrs[:, 1:], edge_index)
            feats = block(feats, attrs, edges, edge_index)  # (M, irreps_hidden.dim)
        scalars = self.readout(feats, batch, num_graphs)  # (M, readout_width) invariant
        mean = scatter_mean(scalars, batch, num_graphs)  # (B, readout_width)
        index = batch[:, None].expand_as(scalars)
        amax = scalars.new_full(mean.shape, -math.inf).scatter_reduce(0, index, scalars, "amax")  # (B, readout_width)
        return self.head(torch.cat([mean, amax], dim=-1))  # (B, num_classes)
