"""Energy and forces of a molkern energy module as one compiled graph (the fast path for MD and relaxations).

    fast = CompiledEnergyForces(module)   # module: TaskModule protocol (``energy(batch)``), in eval mode
    energy, forces = fast(batch)          # first call: trace + compile (about a minute for an lmax 2 model)

The whole energy+forces call (:func:`molkern.train.energy.energy_forces_stress`: the forward pass and the
autograd backward for -dE/dpos) is traced once into ATen operations (``make_fx`` with symbolic shapes, so
one graph serves every atom and edge count) and compiled by ``torch.compile(dynamic=True)`` (Inductor with
its C++ wrapper, which calls the generated kernels without a Python step between them). Eager PyTorch spends
most of a small molecule's energy+forces call dispatching ~1,400 ATen ops one by one; the compiled graph
fuses the elementwise ones into C++ loops.

The module's weights are frozen into the graph at the first call: after changing them, call :meth:`reset`.
One graph is kept per set of batch fields (name, dtype, rank), e.g. with and without periodic shifts.
Structures without edges (a lone atom, atoms farther apart than the cutoff) are evaluated eagerly.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Tuple

import torch

from .energy import energy_forces_stress

__all__ = ["CompiledEnergyForces"]


class CompiledEnergyForces:
    """Callable ``(batch) -> (energy (G,) eV, forces (N, 3) eV/A)``, equal to eager to float32 rounding.

    Args:
        module: has ``energy(batch) -> (num_graphs,)`` (molkern's TaskModule protocol); not modified.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.graphs: Dict[tuple, Callable] = {}  # batch fields -> compiled graph

    def reset(self) -> None:
        """Forget the compiled graphs (after the module's weights changed); the next call compiles again."""
        self.graphs = {}

    def __call__(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        if batch.edge_index.shape[1] == 0 or batch.num_nodes < 2:  # no edges: eager (the graph assumes some)
            with torch.inference_mode(False), torch.enable_grad():
                out = energy_forces_stress(self.module, batch, forces=True)
            return out["energy"], out["forces"]
        keys = sorted(k for k in batch.keys() if torch.is_tensor(batch[k]))
        tensors = [batch[k] for k in keys]
        key = tuple((k, t.dtype, t.dim()) for k, t in zip(keys, tensors))  # sizes are symbolic in the graph
        fn = self.graphs.get(key)
        if fn is None:
            fn = self.graphs[key] = self._compile(batch, keys, tensors)
        with torch.inference_mode(False), torch.no_grad():  # the graph holds the backward ops itself
            return fn(*tensors)

    def _compile(self, batch, keys, tensors) -> Callable:
        from torch.fx.experimental.proxy_tensor import make_fx

        with torch.inference_mode(False), torch.enable_grad():  # fills the modules' lazy caches first
            energy_forces_stress(self.module, batch, forces=True)

        def energy_forces(*values):
            traced = copy.copy(batch)
            for k, v in zip(keys, values):
                traced[k] = v
            with torch.enable_grad():
                out = energy_forces_stress(self.module, traced, forces=True)
            return out["energy"], out["forces"]

        with torch.inference_mode(False), torch.no_grad():
            graph = make_fx(energy_forces, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*tensors)
        return torch.compile(graph, dynamic=True, options={"cpp_wrapper": True})
