"""Equivariance and kernel checks users can run on their own modules."""

from .equivariance import DEFAULT_TOL, POSITIONS, assert_equivariant, equivariance_error
from .kernels import full_kernel_reference, kernel_steerability_error

__all__ = [
    "DEFAULT_TOL",
    "POSITIONS",
    "assert_equivariant",
    "equivariance_error",
    "full_kernel_reference",
    "kernel_steerability_error",
]
