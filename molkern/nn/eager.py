"""Build e3nn modules in eager mode (no TorchScript) without changing e3nn's global defaults for the caller."""

import functools

import e3nn


def eager_e3nn(init):
    """Decorate an `__init__` so e3nn modules built inside it are not TorchScript-compiled.

    Scripted e3nn tensor products are no faster on CPU in steady state (measured) but cost seconds of
    profiling-executor warm-up on their first calls; eager modules also work with autograd.grad for forces.
    """

    @functools.wraps(init)
    def wrapped(*args, **kwargs):
        old = e3nn.get_optimization_defaults()["jit_script_fx"]
        e3nn.set_optimization_defaults(jit_script_fx=False)
        try:
            return init(*args, **kwargs)
        finally:
            e3nn.set_optimization_defaults(jit_script_fx=old)

    return wrapped
