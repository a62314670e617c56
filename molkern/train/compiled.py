"""Compiled graphs of a molkern module: energy+forces (the fast path for MD and relaxations) and training losses.

    fast = CompiledEnergyForces(module)   # module: TaskModule protocol (``energy(batch)``), in eval mode
    energy, forces = fast(batch)          # first call: trace + compile (about a minute for an lmax 2 model)

    step = CompiledLoss(module, loss_fn)  # loss_fn(module, batch) -> scalar, e.g. a normalised L1 loss
    loss = step(batch)                    # the loss; forward and backward both ran in one compiled graph
    loss.backward()                       # deposits the graph's parameter gradients into p.grad

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
import functools
import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..nn.tracing import tracing_for_compile
from .energy import energy_forces_stress

__all__ = ["CompiledEnergyForces", "CompiledLoss"]

SMALL_EDGES = 2048  # CompiledEnergyForces: batches up to this many edges use the graph without C++ sums


def batch_tensors(batch) -> Tuple[List[str], List[torch.Tensor]]:
    """The batch's tensor fields, sorted by name: (names, tensors)."""
    keys = sorted(k for k in batch.keys() if torch.is_tensor(batch[k]))
    return keys, [batch[k] for k in keys]


def graph_key(keys, tensors) -> tuple:
    """What a traced graph is specific to: the fields' names, dtypes and ranks (their sizes are symbolic)."""
    return tuple((k, t.dtype, t.dim()) for k, t in zip(keys, tensors))


def with_fields(batch, keys, values):
    """A shallow copy of ``batch`` holding ``values`` under ``keys``; its num_graphs follows ``ptr`` if present."""
    traced = copy.copy(batch)
    for k, v in zip(keys, values):
        traced[k] = v
    if "ptr" in keys:  # symbolic while tracing: the graph serves every number of structures
        traced._num_graphs = traced.ptr.shape[0] - 1
    return traced


def compile_traced(fn: Callable, *inputs, fused_sums: bool = True) -> Callable:
    """``fn`` traced into ATen operations with symbolic sizes (``make_fx``) and compiled by Inductor (C++ wrapper).

    fused_sums: keep molkern's fused C++ convolution sums in the graph (else their torch form; see tracing_for_compile).
    """
    from torch.fx.experimental import _config as fx_config
    from torch.fx.experimental.proxy_tensor import make_fx

    # no duck shaping: sizes equal by chance at trace time (3 molecules, 3 elements) must not become one symbol
    with torch.inference_mode(False), torch.no_grad(), tracing_for_compile(fused_sums), \
            fx_config.patch(use_duck_shape=False):
        graph = make_fx(fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs)
    _replace_sym_numel(graph)
    return _without_size_guards(torch.compile(graph, dynamic=True, options={"cpp_wrapper": True}))


def _without_size_guards(compiled: Callable) -> Callable:
    """``compiled`` run so that Dynamo and Inductor (which compile at the first call) keep sizes symbolic:

    - no duck shaping: Dynamo would otherwise give the number of molecules and e.g. the number of elements one
      symbol when they are equal at the first call, and specialise both;
    - Inductor's C++ code generator takes its precise (chunked) accumulation for every float sum whose length
      is not known to be <= 4096, instead of guarding on the length (each batch whose edge count crossed 4096,
      or 4096 / 5, ... would compile the graph again, a minute each). This patches
      ``CppKernel.need_use_acc_helper`` (torch 2.13) during the calls; if it is missing, sums keep their guards.
    """
    from torch.fx.experimental import _config as fx_config

    kernel, original, replacement = _sum_accumulation_without_guard()

    def call(*args):
        if kernel is not None:
            kernel.need_use_acc_helper = replacement
        try:
            with fx_config.patch(use_duck_shape=False):
                return compiled(*args)
        finally:
            if kernel is not None:
                kernel.need_use_acc_helper = original

    return call


def _sum_accumulation_without_guard():
    """(CppKernel, its need_use_acc_helper, a replacement that decides without a size guard); Nones without it."""
    try:
        from torch._inductor.codegen.cpp import CppKernel
        from torch._inductor.virtualized import V

        original = CppKernel.need_use_acc_helper
    except (ImportError, AttributeError):
        return None, None, None

    def need_use_acc_helper(self, reduction_type, dtype, use_scalar):
        if reduction_type == "sum" and dtype == torch.float:
            length = functools.reduce(operator.mul, self.call_ranges[self.reduction_depth:])
            return not V.graph.sizevars.statically_known_leq(length, 4096)
        return original(self, reduction_type, dtype, use_scalar)

    return CppKernel, original, need_use_acc_helper


def _replace_sym_numel(graph: torch.fx.GraphModule) -> None:
    """aten.sym_numel(x) (from a mean's backward) -> the product of x's sizes: Dynamo would split the graph there."""
    for node in list(graph.graph.nodes):
        if node.target is not torch.ops.aten.sym_numel.default:
            continue
        (x,) = node.args
        with graph.graph.inserting_before(node):
            total = 1
            for d in range(x.meta["val"].dim()):
                size = graph.graph.call_function(torch.ops.aten.sym_size.int, (x, d))
                total = size if total == 1 else graph.graph.call_function(operator.mul, (total, size))
        node.replace_all_uses_with(total)
        graph.graph.erase_node(node)
    graph.recompile()


class CompiledEnergyForces:
    """Callable ``(batch) -> (energy (G,) eV, forces (N, 3) eV/A)``, equal to eager to float32 rounding.

    A graph per set of batch fields, per single structure or batch of them, and per size class: one for batches
    of up to ``small_edges`` edges (a molecule's MD step), traced with the torch form of the fused convolution
    sums, which Inductor merges with their neighbours, and one for larger batches, which keeps the C++ sums.
    Measured (lmax 2 benchmark model): QM9 molecules and batches of up to 16 of them (110 to 2,452 edges, one
    thread), the torch form 1.2-1.4x faster (1.44 against 1.72 ms for one molecule); periodic water boxes
    (4,400 edges and more, two threads), the C++ sums 1.8x faster.

    Args:
        module: has ``energy(batch) -> (num_graphs,)`` (molkern's TaskModule protocol); not modified.
        small_edges: largest edge count served by the small-batch graph.
    """

    def __init__(self, module: torch.nn.Module, small_edges: int = SMALL_EDGES):
        self.module, self.small_edges = module, small_edges
        self.graphs: Dict[tuple, Callable] = {}  # batch fields -> compiled graph

    def reset(self) -> None:
        """Forget the compiled graphs (after the module's weights changed); the next call compiles again."""
        self.graphs = {}

    def __call__(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        if batch.edge_index.shape[1] == 0 or batch.num_nodes < 2:  # no edges: eager (the graph assumes some)
            with torch.inference_mode(False), torch.enable_grad():
                out = energy_forces_stress(self.module, batch, forces=True)
            return out["energy"], out["forces"]
        keys, tensors = batch_tensors(batch)
        small = batch.edge_index.shape[1] <= self.small_edges
        # a graph traced on one structure has that size specialised to 1 (as torch.compile does): its own graph
        key = graph_key(keys, tensors) + (small, batch.num_graphs == 1)
        fn = self.graphs.get(key)
        if fn is None:
            fn = self.graphs[key] = self._compile(batch, keys, tensors, fused_sums=not small)
        with torch.inference_mode(False), torch.no_grad():  # the graph holds the backward ops itself
            return fn(*tensors)

    def _compile(self, batch, keys, tensors, fused_sums: bool) -> Callable:
        with torch.inference_mode(False), torch.enable_grad():  # fills the modules' lazy caches first
            energy_forces_stress(self.module, batch, forces=True)

        def energy_forces(*values):
            with torch.enable_grad():
                out = energy_forces_stress(self.module, with_fields(batch, keys, values), forces=True)
            return out["energy"], out["forces"]

        return compile_traced(energy_forces, *tensors, fused_sums=fused_sums)


class _LossOf(torch.nn.Module):
    """``loss_fn(module, batch)`` as a module, so that ``torch.func.functional_call`` can swap its parameters."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, batch) -> torch.Tensor:
        return self.loss_fn(self.module, batch)


class _PrecomputedGradients(torch.autograd.Function):
    """Identity on the loss whose backward hands the parameters gradients computed beforehand (times d(out)/d(loss))."""

    @staticmethod
    def forward(ctx, loss, grads, *params):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return (None, None, *[None if g is None else g * grad_loss for g in ctx.grads])


class CompiledLoss:
    """Drop-in for ``loss_fn(module, batch)`` in a training step, with the forward and backward pass compiled.

    Each call runs one compiled graph that returns the loss and its gradients w.r.t. the module's trainable
    parameters (current values: parameters and buffers are inputs of the graph, so optimizer updates are seen;
    in-place buffer updates such as BatchNorm running statistics are applied). The returned loss behaves as
    eager's under ``backward()``: it deposits (accumulates) those gradients into ``p.grad``, scaled by the
    incoming gradient, so gradient accumulation, loss scaling and clipping work as usual. Parameters the loss
    does not use keep ``grad = None``, as in eager.

    One graph per set of batch fields (name, dtype, rank) and training mode; sizes (atoms, edges, structures)
    are symbolic. A batch without edges or with a single structure runs eagerly. Compiling takes one to two
    minutes of CPU for an lmax 2 model (under half that with Inductor's disk cache).

    Args:
        module: the trainable module; not modified.
        loss_fn: ``(module, batch) -> 0-dim loss``, traceable: no data-dependent shapes or Python branches on
            tensor values.
    """

    def __init__(self, module: torch.nn.Module, loss_fn: Callable):
        self.module, self.loss_fn = module, loss_fn
        self._wrapped = _LossOf(module, loss_fn)
        self.graphs: Dict[tuple, Tuple[Callable, List[int]]] = {}  # key -> (graph, indices of used parameters)

    def reset(self) -> None:
        """Forget the compiled graphs (e.g. after adding parameters); the next call compiles again."""
        self.graphs = {}

    def _parameters(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self._wrapped.named_parameters() if p.requires_grad]

    def __call__(self, batch) -> torch.Tensor:
        named = self._parameters()
        params = [p for _, p in named]
        if batch.edge_index.shape[1] == 0 or batch.num_graphs < 2:  # eager: the graph assumes edges, B >= 2
            loss = self.loss_fn(self.module, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            return _PrecomputedGradients.apply(loss.detach(), list(grads), *params)
        keys, tensors = batch_tensors(batch)
        key = graph_key(keys, tensors) + (self.module.training, tuple(n for n, _ in named))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._compile(batch, keys, tensors, named)
        fn, used = entry
        buffers = [b for _, b in self._wrapped.named_buffers()]
        with torch.no_grad():
            loss, *used_grads = fn([p.detach() for p in params], buffers, *tensors)
        grads: List[Optional[torch.Tensor]] = [None] * len(params)
        for i, g in zip(used, used_grads):
            grads[i] = g
        return _PrecomputedGradients.apply(loss, grads, *params)

    def _compile(self, batch, keys, tensors, named) -> Tuple[Callable, List[int]]:
        names = [n for n, _ in named]
        buffer_names = [n for n, _ in self._wrapped.named_buffers()]
        buffers = [b for _, b in self._wrapped.named_buffers()]
        saved = [b.clone() for b in buffers]
        with torch.enable_grad():  # eager once: fills the modules' lazy caches, finds the parameters in use
            grads = torch.autograd.grad(self.loss_fn(self.module, batch), [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for b, value in zip(buffers, saved):  # undo that call's buffer updates (BatchNorm statistics)
                b.copy_(value)
        used = [i for i, g in enumerate(grads) if g is not None]

        def loss_and_grads(param_values, buffer_values, *values):
            state = {**dict(zip(names, param_values)), **dict(zip(buffer_names, buffer_values))}
            with torch.enable_grad():
                for p in param_values:
                    p.requires_grad_(True)
                loss = torch.func.functional_call(self._wrapped, state, (with_fields(batch, keys, values),))
                grads = torch.autograd.grad(loss, [param_values[i] for i in used])
            return (loss.detach(), *grads)

        params = [p.detach() for _, p in named]
        return compile_traced(loss_and_grads, params, buffers, *tensors), used
