"""Data-dependent initialisation (LSUV-style) of a MolkernNet's interaction blocks."""

from typing import List

import torch
from torch import nn


@torch.no_grad()
def normalize_activations(model: nn.Module, *inputs, target_rms: float = 0.5, **kw_inputs) -> List[float]:
    """Rescale each block's `linear_2` and `self_connection` weights on one batch so each adds `target_rms`
    to the gate's input.

    The data-free initialisation keeps the outputs of a fresh network within a factor of ~10 of one on
    molecules, but the convolution's gain depends on the data (short edges with a long cutoff, fully
    connected graphs with coherent messages); call this once on a training batch before training.

    Args:
        model: a MolkernNet (modules without `blocks` are left alone).
        inputs, kw_inputs: the arguments of model.forward for one batch.

    Returns:
        the rms of each block's gate input before rescaling.
    """
    before = []
    for block in getattr(model, "blocks", []):
        outs = {}
        hooks = [
            getattr(block, name).register_forward_hook(lambda mod, args, out, name=name: outs.__setitem__(name, out))
            for name in ("linear_2", "self_connection")
        ]
        try:
            model(*inputs, **kw_inputs)
        finally:
            for h in hooks:
                h.remove()
        before.append(float((outs["linear_2"] + outs["self_connection"]).pow(2).mean().sqrt()))
        for name, out in outs.items():
            rms = float(out.pow(2).mean().sqrt())
            if rms > 0:
                getattr(block, name).weight.mul_(target_rms / rms)
    return before
