"""Whether a molkern module is being traced into a compiled graph (see molkern.train.compiled).

Some layers then take forms that Inductor compiles into fused loops but that would be slow or memory-hungry as
eager PyTorch operations, e.g. a batched product of small matrices written as a broadcast multiply and sum.
"""

from contextlib import contextmanager

_tracing = False


@contextmanager
def tracing_for_compile():
    """Within this block, layers build the operations meant for Inductor."""
    global _tracing
    previous, _tracing = _tracing, True
    try:
        yield
    finally:
        _tracing = previous


def is_tracing_for_compile() -> bool:
    return _tracing
