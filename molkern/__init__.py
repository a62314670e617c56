"""molkern: implicit steerable kernels for symmetry-aware learning on molecules and point clouds.

Importing molkern changes no global state (default dtype, threads, seeds, environment).
"""

__version__ = "0.1.0"
