"""molkern's benchmarks: ``python -m benchmarks run [--quick]`` runs the suite (benchmarks.suite).

Scripts that also run on their own: qm9_throughput.py, kernels.py, voxel_conv.py.
"""
