"""Dense steerable convolutions on voxel grids (paper section 3.5) with implicit kernels.

Fields are tensors (B, irreps.dim, X, Y, Z): the e3nn irreps layout flattened into channels, tensor
dims 2, 3, 4 along x, y, z.
"""

from .conv import DenseSteerableConv3d, window_offsets
from .gate import VoxelGate
from .grid import cube_symmetries, transform_voxel_field, voxel_centres
from .pool import VoxelAvgPool, VoxelNormPool
from .readout import VoxelInvariantReadout

__all__ = [
    "DenseSteerableConv3d",
    "VoxelAvgPool",
    "VoxelGate",
    "VoxelInvariantReadout",
    "VoxelNormPool",
    "cube_symmetries",
    "transform_voxel_field",
    "voxel_centres",
    "window_offsets",
]
