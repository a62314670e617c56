"""Networks and the config-driven builder."""

from .network import KERNELS, MolkernNet, average_num_neighbors

__all__ = ["KERNELS", "MolkernNet", "average_num_neighbors"]
