"""The depthwise convolution's gather, kernel product and scatter-sum as one C++ pass (built on first use).

Unfused, a convolution writes and reads several (E, H, d, U / H) per-edge tensors (gathered features, features
times channel weights, messages) and their gradients; on a CPU that memory traffic, not arithmetic, is most of its
cost. `depthwise_aggregate` reads per edge only the kernel matrices and channel weights, and the source node's
features, which stay in cache. The extension is compiled with torch.utils.cpp_extension the first time it is
needed (about 30 s; cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, one build per kind of
CPU). Where it cannot be built (no C++ compiler), or with MOLKERN_FUSED=0 in the environment, molkern uses the
plain torch operations, which compute the same sums (tests compare the two: values, first and second
derivatives).
"""

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import Optional

import torch

from .scatter import scatter_sum

_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "depthwise_aggregate.cpp"
_extension = None
_failed = False


def extension():
    """The compiled extension, or None where it is disabled (MOLKERN_FUSED=0) or cannot be built (warns once)."""
    global _extension, _failed
    if _extension is not None or _failed:
        return _extension
    if os.environ.get("MOLKERN_FUSED", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        try:  # the ninja build tool from PyPI, when the venv's bin directory is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        _extension = cpp_extension.load(  # -march=native: 1.7x faster than the generic x86-64 build
            name=f"molkern_depthwise_aggregate_{_cpu_tag()}", sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure: fall back to torch operations
        _failed = True
        warnings.warn(f"molkern: the fused convolution could not be built ({type(error).__name__}: "
                      f"{str(error)[:300]}); using plain torch operations (same results, slower)")
    return _extension


def _cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags: the build uses -march=native, so a build cache
    shared by different machines (a cluster's home directory) keeps one build per kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = sorted({line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))})
    except OSError:
        lines = [platform.machine(), platform.processor()]
    return hashlib.sha1("".join(lines).encode()).hexdigest()[:10]


def depthwise_aggregate_reference(x, kernels, channel_weights: Optional[torch.Tensor], src, dst, num_nodes: int):
    """out[i, h] = sum over edges e into i of kernels[e, h] @ (x[src[e], h] * channel_weights[e, h]), in torch ops.

    Shapes:
        x: (N, H, DI, P), kernels: (E, H, DO, DI), channel_weights: (E, H, P) or None, src, dst: (E,)
        -> (num_nodes, H, DO, P)
    """
    num_edges, heads, d_out, d_in = kernels.shape
    per_head = x.shape[-1]
    xs = torch.index_select(x.reshape(x.shape[0], -1), 0, src).view(num_edges * heads, d_in, per_head)
    if channel_weights is not None:
        xs = xs * channel_weights.reshape(num_edges * heads, 1, per_head)
    messages = torch.bmm(kernels.reshape(num_edges * heads, d_out, d_in), xs)  # (E * H, DO, P)
    return scatter_sum(messages.view(num_edges, -1), dst, num_nodes).view(num_nodes, heads, d_out, per_head)


class _DepthwiseAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels, channel_weights, src, dst, num_nodes):
        ctx.num_nodes = num_nodes
        ctx.save_for_backward(x, kernels, channel_weights, src, dst)
        empty = x.new_zeros(0) if channel_weights is None else channel_weights
        return extension().forward(x, kernels, empty, src, dst, num_nodes)

    @staticmethod
    def backward(ctx, grad_out):
        x, kernels, channel_weights, src, dst = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph (e.g. training on forces): differentiable torch operations
            inputs = [t for t, n in zip((x, kernels, channel_weights), need) if n]
            out = depthwise_aggregate_reference(x, kernels, channel_weights, src, dst, ctx.num_nodes)
            grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True))
            return tuple(next(grads) if n else None for n in need) + (None, None, None)
        empty = x.new_zeros(0) if channel_weights is None else channel_weights
        gx, gk, gc = extension().backward(grad_out.contiguous(), x, kernels, empty, src, dst, *need)
        return (gx if need[0] else None, gk if need[1] else None,
                gc if need[2] and channel_weights is not None else None, None, None, None)


def depthwise_aggregate(x, kernels, channel_weights: Optional[torch.Tensor], src, dst, num_nodes: int):
    """`depthwise_aggregate_reference`, by the C++ extension where it is available (same shapes)."""
    if extension() is None:
        return depthwise_aggregate_reference(x, kernels, channel_weights, src, dst, num_nodes)
    contiguous = None if channel_weights is None else channel_weights.contiguous()
    return _DepthwiseAggregate.apply(x.contiguous(), kernels.contiguous(), contiguous, src.long().contiguous(),
                                     dst.long().contiguous(), num_nodes)
