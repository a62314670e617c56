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
        old = dict(e3nn.get_optimization_defaults())
        e3nn.set_optimization_defaults(jit_script_fx=False)
        try:
            return init(*args, **kwargs)
        finally:
            # restore both: setting jit_script_fx=True alone also switches e3nn's jit_mode to "script"
            e3nn.set_optimization_defaults(jit_script_fx=old["jit_script_fx"])
            e3nn.set_optimization_defaults(jit_mode=old["jit_mode"])

    return wrapped
