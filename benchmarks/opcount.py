"""Count the ATen operations (and matmul-class FLOPs) one call issues, forward and backward alike."""

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active (autograd's backward ops included) and, for the ops in
    torch's flop registry (mm, bmm, addmm, baddbmm, convolutions, ...), their FLOPs.

    ``count`` total ops; ``by_name`` Counter of op names; ``matmul_flops`` FLOPs of the registered ops.
    """

    def __init__(self):
        super().__init__()
        self.count, self.by_name, self.matmul_flops = 0, Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        self.count += 1
        self.by_name[str(packet)] += 1
        if packet in flop_registry:
            self.matmul_flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def count_ops(fn) -> dict:
    """{"ops": ATen ops in one fn(), "top_ops": the 8 most frequent, "matmul_flops": matmul-class FLOPs}.

    matmul_flops counts matmul-class ops only (as torch.utils.flop_counter does), zeros of dense contractions
    included. Uses a TorchDispatchMode rather than FlopCounterMode, whose module hooks fail under autograd.grad.
    """
    with OpCounter() as counter:
        fn()
    return {"ops": counter.count, "top_ops": dict(counter.by_name.most_common(8)),
            "matmul_flops": counter.matmul_flops}
