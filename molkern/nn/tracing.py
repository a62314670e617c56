"""Whether a molkern module is being traced into a compiled graph (see molkern.train.compiled).

Some layers then take forms that Inductor compiles into fused loops but that would be slow or memory-hungry as
eager PyTorch operations, e.g. a batched product of small matrices written as a broadcast multiply and sum.
"""

from contextlib import contextmanager

_tracing = False
_fused_sums = True


@contextmanager
def tracing_for_compile(fused_sums: bool = True):
    """Within this block, layers build the operations meant for Inductor.

    fused_sums: keep the fused C++ convolution sums (molkern.nn.fused) as calls in the graph; False: their torch
    form, which Inductor fuses (faster for a few hundred edges, where each call's fixed cost dominates).
    """
    global _tracing, _fused_sums
    previous = _tracing, _fused_sums
    _tracing, _fused_sums = True, fused_sums
    try:
        yield
    finally:
        _tracing, _fused_sums = previous


def is_tracing_for_compile() -> bool:
    return _tracing


def fused_sums_in_trace() -> bool:
    """Whether a graph being traced (`tracing_for_compile`) keeps the fused C++ sums."""
    return _fused_sums
