"""Equivariant layers: radial basis, equivariant MLP, kernels, convolution, interaction block, readout; inference
with constant parameters (`constant_parameters`)."""

from .constants import constant_parameters
from .conv import SteerableConv
from .edges import EdgeEmbedding, Edges
from .interaction import InteractionBlock
from .channelwise import ChannelwiseProduct
from .kernels import ImplicitKernel, StandardKernel, channelwise_tensor_product, kernel_irreps, kernel_matrix
from .mlp import EquivariantMLP, irreps_up_to, make_gate
from .radial import BesselBasis, PolynomialCutoff
from .readout import Readout
from .scatter import scatter_mean, scatter_sum
from .voxel import DenseSteerableConv3d, VoxelAvgPool, VoxelGate, VoxelInvariantReadout, VoxelNormPool

__all__ = [
    "BesselBasis",
    "ChannelwiseProduct",
    "DenseSteerableConv3d",
    "EdgeEmbedding",
    "Edges",
    "EquivariantMLP",
    "ImplicitKernel",
    "InteractionBlock",
    "PolynomialCutoff",
    "Readout",
    "StandardKernel",
    "SteerableConv",
    "VoxelAvgPool",
    "VoxelGate",
    "VoxelInvariantReadout",
    "VoxelNormPool",
    "channelwise_tensor_product",
    "constant_parameters",
    "irreps_up_to",
    "kernel_irreps",
    "kernel_matrix",
    "make_gate",
    "scatter_mean",
    "scatter_sum",
]
