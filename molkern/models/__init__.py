"""Networks and the config-driven builder."""

from .build import MODEL_KEYS, build_model
from .init import normalize_activations
from .network import KERNELS, MolkernNet, average_num_neighbors

__all__ = ["KERNELS", "MODEL_KEYS", "MolkernNet", "average_num_neighbors", "build_model", "normalize_activations"]
