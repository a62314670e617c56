"""Inference with constant parameters: layers fold their weights into a few dense matrices, computed once.

An energy-and-forces call (an MD step, a relaxation step) differentiates with respect to positions only. Within
`constant_parameters()`, layers treat their parameters and buffers as constants: e.g. an e3nn Linear becomes one
matmul with a cached dense matrix instead of a dozen operations per irrep forward and again backward, and the
per-irrep scales of an eval-mode BatchNorm become one multiplication. Values are those of the ordinary forward
(up to float rounding); only the number of PyTorch operations per call changes, which is what one small
molecule's latency on a CPU is made of. `molkern.calculator.MolkernCalculator` runs in this mode.

Gradients with respect to the parameters are incomplete inside the block (the cached matrices are detached
constants): do not train in it. A cached matrix is rebuilt whenever a tensor it was derived from changes (an
optimizer step, `load_state_dict`, a dtype or device change), so keeping the block open across such changes is
safe. Graphs traced for torch.compile ignore the mode.
"""

import threading
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from .tracing import is_tracing_for_compile

_state = threading.local()  # per thread: an MD thread's block does not change another thread's training


@contextmanager
def constant_parameters(enabled: bool = True):
    """Within this block (if enabled), molkern layers treat parameters and buffers as constants (see the module).

    The setting is per thread."""
    previous = getattr(_state, "active", False)
    _state.active = bool(enabled)
    try:
        yield
    finally:
        _state.active = previous


def parameters_constant() -> bool:
    """Whether layers may use `cached` matrices now (inside `constant_parameters`, not while tracing for compile)."""
    return getattr(_state, "active", False) and not is_tracing_for_compile()


def cached(module: nn.Module, name: str, sources: Iterable[torch.Tensor], build: Callable[[], torch.Tensor]):
    """`build()` (a tensor, a tuple or named tuple of them, nested, or None; run under no_grad), kept on `module`
    until one of `sources` changes.

    sources: the tensors the result is derived from (parameters, buffers); a change of any one's storage,
    in-place version, dtype or device rebuilds it.
    """
    key = [(t.data_ptr(), t._version, t.dtype, t.device) for t in sources]
    store = module.__dict__.setdefault("_constant_cache", {})
    hit = store.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            built = _detached(build())
        # the sources are kept with the result, so that their storage cannot be freed and reused by another tensor
        hit = (key, built, [t.detach() for t in sources])
        store[name] = hit
    return hit[1]


def _detached(built):
    """built with every tensor in it detached (tuples and named tuples, nested, keep their type)."""
    if isinstance(built, torch.Tensor):
        return built.detach()
    if isinstance(built, tuple):
        items = [_detached(t) for t in built]
        return type(built)(*items) if hasattr(built, "_fields") else tuple(items)
    return built
