"""Scatter (segment) reductions in plain torch: no torch-scatter needed."""

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """out[k] = sum of src[e] over e with index[e] == k.

    Shapes:
        src: (E, F), index: (E,) long -> (dim_size, F)
    """
    out = src.new_zeros((dim_size,) + tuple(src.shape[1:]))
    return out.index_add_(0, index, src)


def scatter_count(index: torch.Tensor, dim_size: int, dtype: torch.dtype) -> torch.Tensor:
    """out[k] = number of e with index[e] == k, as ``dtype`` (traceable with symbolic sizes, unlike bincount).

    Shapes:
        index: (E,) long -> (dim_size,)
    """
    return scatter_sum(torch.ones_like(index, dtype=dtype), index, dim_size)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Mean of src over equal index (0 for empty segments). Shapes as scatter_sum."""
    total = scatter_sum(src, index, dim_size)
    count = scatter_count(index, dim_size, src.dtype)
    return total / count.clamp_min(1).view((-1,) + (1,) * (src.dim() - 1))
