"""A small G-steerable voxel classifier: [dense conv -> gate -> pool] x N -> invariant readout -> MLP."""

from typing import List, Sequence, Union

import torch
from e3nn import o3
from torch import nn

from .. import groups as groups_lib
from ..nn.eager import eager_e3nn
from ..nn.mlp import irreps_up_to
from ..nn.voxel import DenseSteerableConv3d, VoxelAvgPool, VoxelGate, VoxelInvariantReadout, VoxelNormPool

POOLS = {"avg": VoxelAvgPool, "norm": VoxelNormPool}


class VoxelClassifier(nn.Module):
    """Classify voxel grids (e.g. 32^3 occupancy) with G-equivariant dense convolutions, G-invariant logits.

    input_pool (average, exact under the cube symmetries) -> for each block: DenseSteerableConv3d ->
    VoxelGate -> pooling (not after the last block) -> VoxelInvariantReadout -> BatchNorm1d-Linear-SiLU-Linear.
    Block b has num_channels[b] copies of every hidden irrep with l <= lmax (irreps_up_to).

    Args:
        num_classes: number of logits.
        group: molkern.groups.Group or name ("o3", "so2", "c1", ...).
        irreps_in: irreps of the input fields ("1x0e" for occupancy).
        num_channels: multiplicity per block (a sequence: one entry per block).
        lmax, parity: hidden irreps of every block (see molkern.nn.irreps_up_to).
        kernel_size: odd window of every convolution; the kernels vanish at its edge.
        pooling: "avg" or "norm" (max-norm) pooling between blocks, factor 2.
        input_pool: average-pooling factor applied to the input first (1: none).
        form, mlp_width, mlp_layers, num_radial: the implicit kernels (DenseSteerableConv3d).
        hidden: width of the invariant MLP head.

    Shapes:
        x: (B, irreps_in.dim, X, Y, Z) -> (B, num_classes) logits
    """

    @eager_e3nn
    def __init__(
        self,
        num_classes: int,
        group: Union[str, "groups_lib.Group"] = "o3",
        irreps_in: Union[str, o3.Irreps] = "1x0e",
        num_channels: Sequence[int] = (4, 8, 16),
        lmax: int = 1,
        parity: str = "natural",
        kernel_size: int = 5,
        pooling: str = "avg",
        input_pool: int = 2,
        form: str = "full",
        mlp_width: int = 8,
        mlp_layers: int = 2,
        num_radial: int = 4,
        hidden: int = 64,
    ):
        super().__init__()
        if pooling not in POOLS:
            raise ValueError(f"pooling must be one of {sorted(POOLS)}, got {pooling!r}")
        if num_classes < 1 or not num_channels:
            raise ValueError(f"need num_classes >= 1 and at least one block, got {num_classes}, {num_channels}")
        if input_pool < 1:
            raise ValueError(f"input_pool must be >= 1, got {input_pool}")
        self.group = groups_lib.get(group) if isinstance(group, str) else group
        self.irreps_in = o3.Irreps(irreps_in)
        self.input_pool = VoxelAvgPool(self.irreps_in, input_pool) if input_pool > 1 else None
        layers = []
        irreps = self.irreps_in
        for b, mul in enumerate(num_channels):
            gate = VoxelGate(irreps_up_to(mul, lmax, parity))
            conv = DenseSteerableConv3d(
                irreps, gate.irreps_in, kernel_size, self.group, form=form, num_radial=num_radial,
                mlp_width=mlp_width, mlp_layers=mlp_layers,
            )
            layers += [conv, gate]
            irreps = gate.irreps_out
            if b < len(num_channels) - 1:
                layers.append(POOLS[pooling](irreps, 2))
        self.layers = nn.ModuleList(layers)
        self.readout = VoxelInvariantReadout(irreps)
        # the invariants (means of 0e channels and of field norms) differ in scale: standardise them (invariant)
        self.head = nn.Sequential(
            nn.BatchNorm1d(self.readout.irreps_out.dim), nn.Linear(self.readout.irreps_out.dim, hidden), nn.SiLU(),
            nn.Linear(hidden, num_classes),
        )
        self.irreps_out = o3.Irreps(f"{num_classes}x0e")

    def features(self, x: torch.Tensor) -> list:
        """The fields after every layer (for initialisation checks). Shapes: list of (B, C_l, X_l, Y_l, Z_l)."""
        if x.dim() != 5 or x.shape[1] != self.irreps_in.dim:
            raise ValueError(f"x must have shape (B, {self.irreps_in.dim}, X, Y, Z), got {tuple(x.shape)}")
        outs = []
        if self.input_pool is not None:
            x = self.input_pool(x)  # (B, d_in, X/p, Y/p, Z/p)
        for layer in self.layers:
            x = layer(x)  # (B, layer.irreps_out.dim, ...)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fields = self.features(x)[-1]  # (B, irreps.dim, X', Y', Z')
        return self.head(self.readout(fields))  # (B, num_classes)


@torch.no_grad()
def normalize_voxel_activations(model: nn.Module, x: torch.Tensor, target: float = 1.0) -> List[float]:
    """Data-dependent initialisation (LSUV) of every DenseSteerableConv3d in `model`, in forward order.

    Each conv's `weight_scale` is multiplied, per irrep block of its output, so that its output (bias
    excluded) has second moment `target` on the batch `x`, given the already rescaled earlier layers. The
    layers' own data-free initialisation gives unit gain on white noise; on smooth, sparse or correlated
    fields (occupancy grids) the gain differs (measured by the voxel_shapes experiment), hence this step.
    A constant per irrep block commutes with the group action: equivariance is untouched.

    Args:
        model: any module whose forward(x) runs the convolutions (e.g. VoxelClassifier).
        x: one batch of inputs of model.forward.

    Returns:
        the second moment of each conv's output before its rescaling.
    """
    convs = [m for m in model.modules() if isinstance(m, DenseSteerableConv3d)]
    before = []
    for conv in convs:
        out = {}
        hook = conv.register_forward_hook(lambda mod, args, y: out.__setitem__("y", y))
        try:
            model(x)
        finally:
            hook.remove()
        y = out["y"]
        bias = conv.full_bias()
        if bias is not None:
            y = y - bias.view(1, -1, 1, 1, 1)
        before.append(float(y.pow(2).mean()))
        for sl in conv.irreps_out.slices():
            m2 = float(y[:, sl].pow(2).mean())
            if m2 > 0:
                conv.weight_scale[sl] *= (target / m2) ** 0.5
    return before
