"""Scatter (segment) reductions in plain torch: no torch-scatter needed."""

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """out[k] = sum of src[e] over e with index[e] == k.

    Shapes:
        src: (E, F), index: (E,) long -> (dim_size, F)
    """
    out = src.new_zeros((dim_size,) + tuple(src.shape[1:]))
    return out.index_add_(0, index, src)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Mean of src over equal index (0 for empty segments). Shapes as scatter_sum."""
    total = scatter_sum(src, index, dim_size)
    count = torch.zeros(dim_size, dtype=src.dtype, device=src.device).index_add_(
        0, index, torch.ones_like(index, dtype=src.dtype)
    )
    return total / count.clamp_min(1).view((-1,) + (1,) * (src.dim() - 1))
