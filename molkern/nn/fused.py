"""The depthwise convolution's gather, kernel product and scatter-sum as one C++ pass (built on first use).

Unfused, a convolution writes and reads several (E, H, d, U / H) per-edge tensors (gathered features, features
times channel weights, messages) and their gradients; on a CPU that memory traffic, not arithmetic, is most of its
cost. `depthwise_aggregate` reads per edge only the kernel matrices and channel weights, and the source node's
features, which stay in cache. The extension is compiled with torch.utils.cpp_extension the first time it is
needed (about 30 s; cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, one build per kind of
CPU). Where it cannot be built (no C++ compiler), or with MOLKERN_FUSED=0 in the environment, molkern uses the
plain torch operations, which compute the same sums (tests compare the two: values, first and second
derivatives).

With the default kernel head (molkern.nn.depthwise_head), the kernel matrices are not even stored:
`depthwise_terms_aggregate` builds them inside the pass from the head's terms, for tiles of 16 consecutive edges at
once (edges in the vector lanes), and takes their gradients straight back to the terms (~10% less time per
energy+forces call than storing them, at every system size).

The passes and their backwards are torch operators (`torch.ops.molkern.depthwise_aggregate`,
`..._terms_aggregate` and their `_backward`s, with shape-only "fake" implementations), so graphs traced for
torch.compile (molkern.train.compiled) call them as they are; eager calls go through equivalent autograd
functions, which cost less per call (the terms pass's in C++: ~50 us less per layer for a small molecule than a
Python autograd.Function; under create_graph its backward calls back into Python for the differentiable form).
Second derivatives (training on forces) use differentiable
operations: the sum back along the edges with the transposed matrices (the same operator) for the features,
per-edge products for the kernel matrices, matmuls with a one-hot selection matrix for the terms (an index_add
along dim 1 there was compiled by Inductor with a wrong row stride: out-of-bounds writes, a crash).
"""

import hashlib
import os
import platform
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

from .scatter import scatter_sum
from .tracing import fused_sums_in_trace, is_tracing_for_compile

_SOURCES = [Path(__file__).resolve().parents[1] / "csrc" / name
            for name in ("depthwise_aggregate.cpp", "constant_functions.cpp")]
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
            name=f"molkern_depthwise_aggregate_{_cpu_tag()}", sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
        _extension.set_terms_differentiable_backward(_eager_differentiable_terms_gradients)
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
    xs = x.reshape(x.shape[0], -1).index_select(0, src).view(num_edges * heads, d_in, per_head)
    if channel_weights is not None:
        xs = xs * channel_weights.reshape(num_edges * heads, 1, per_head)
    messages = torch.bmm(kernels.reshape(num_edges * heads, d_out, d_in), xs)  # (E * H, DO, P)
    sums = scatter_sum(messages.view(num_edges, heads * d_out * per_head), dst, num_nodes)
    return sums.view(num_nodes, heads, d_out, per_head)


@torch.library.custom_op("molkern::depthwise_aggregate", mutates_args=())
def _aggregate(x: torch.Tensor, kernels: torch.Tensor, channel_weights: torch.Tensor, src: torch.Tensor,
               dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """The C++ forward pass; channel_weights: (E, H, P) or empty (none). A torch operator, so that graphs traced
    for torch.compile (molkern.train.compiled) keep it as one opaque call."""
    return extension().forward(x, kernels, channel_weights, src, dst, num_nodes)


@_aggregate.register_fake
def _(x, kernels, channel_weights, src, dst, num_nodes):
    return x.new_empty(num_nodes, kernels.shape[1], kernels.shape[2], x.shape[3])


@torch.library.custom_op("molkern::depthwise_aggregate_backward", mutates_args=())
def _aggregate_backward(grad_out: torch.Tensor, x: torch.Tensor, kernels: torch.Tensor, channel_weights: torch.Tensor,
                        src: torch.Tensor, dst: torch.Tensor, need_x: bool, need_kernels: bool,
                        need_channel_weights: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ backward pass: gradients for x, kernels and channel_weights (empty where not needed)."""
    grads = extension().backward(grad_out, x, kernels, channel_weights, src, dst, need_x, need_kernels,
                                 need_channel_weights)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_aggregate_backward.register_fake
def _(grad_out, x, kernels, channel_weights, src, dst, need_x, need_kernels, need_channel_weights):
    need_channel_weights = need_channel_weights and channel_weights.numel() > 0
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0)
                 for t, need in ((x, need_x), (kernels, need_kernels), (channel_weights, need_channel_weights)))


def _setup_context(ctx, inputs, output):
    x, kernels, channel_weights, src, dst, _ = inputs
    ctx.save_for_backward(x, kernels, channel_weights, src, dst)


def _backward(ctx, grad_out, eager: bool = False):
    """Gradients for the operator (eager=False: the torch operators throughout) or for `_Aggregate` (eager=True:
    direct calls of the extension)."""
    x, kernels, channel_weights, src, dst = ctx.saved_tensors
    need_x, need_kernels, need_weights = ctx.needs_input_grad[:3]
    need_weights = need_weights and channel_weights.numel() > 0
    grad_out = grad_out.contiguous()
    if not torch.is_grad_enabled():  # a first derivative only: the fused C++ pass
        args = (grad_out, x, kernels, channel_weights, src, dst, need_x, need_kernels, need_weights)
        gx, gk, gc = extension().backward(*args) if eager else _aggregate_backward(*args)
        return (gx if need_x else None, gk if need_kernels else None, gc if need_weights else None,
                None, None, None)
    return (*_differentiable_gradients(grad_out, x, kernels, channel_weights, src, dst, need_x, need_kernels,
                                       need_weights, eager), None, None, None)


def _differentiable_gradients(grad_out, x, kernels, channel_weights, src, dst, need_x, need_kernels, need_weights,
                              eager):
    """The gradients for x, kernels and channel_weights (None where not needed) in differentiable operations (for
    create_graph, e.g. training on forces). For x, the sum runs backwards along the edges with the transposed
    matrices (channel weights commute with them)."""
    gx = gk = gc = None
    if need_x:
        forward = _Aggregate.apply if eager else _aggregate
        gx = forward(grad_out, kernels.transpose(2, 3).contiguous(), channel_weights, dst, src, x.shape[0])
    if need_kernels or need_weights:
        g_edges = grad_out.index_select(0, dst)  # (E, H, DO, P)
        x_edges = x.index_select(0, src)  # (E, H, DI, P)
        if need_kernels:
            scaled = x_edges * channel_weights.unsqueeze(2) if channel_weights.numel() else x_edges
            gk = g_edges @ scaled.transpose(2, 3)  # (E, H, DO, DI)
        if need_weights:
            gc = ((kernels @ x_edges) * g_edges).sum(2)  # (E, H, P)
    return gx, gk, gc


_aggregate.register_autograd(_backward, setup_context=_setup_context)


class _Aggregate(torch.autograd.Function):
    """The same pass and derivatives as the `_aggregate` operator, for eager calls: an autograd.Function calls the
    extension directly, without the operator's Python dispatch (~15 us forward and again backward per call)."""

    @staticmethod
    def forward(ctx, x, kernels, channel_weights, src, dst, num_nodes):
        ctx.save_for_backward(x, kernels, channel_weights, src, dst)
        return extension().forward(x, kernels, channel_weights, src, dst, num_nodes)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, eager=True)


def _apply(x, kernels, channel_weights, src, dst, num_nodes: int):
    """The fused pass: the torch operator in graphs traced for torch.compile, the autograd.Function otherwise."""
    if is_tracing_for_compile():
        return _aggregate(x, kernels, channel_weights, src, dst, num_nodes)
    return _Aggregate.apply(x, kernels, channel_weights, src, dst, num_nodes)


def depthwise_aggregate(x, kernels, channel_weights: Optional[torch.Tensor], src, dst, num_nodes: int):
    """`depthwise_aggregate_reference`, by the C++ extension where it is available (same shapes)."""
    if extension() is None:
        return depthwise_aggregate_reference(x, kernels, channel_weights, src, dst, num_nodes)
    weights = x.new_zeros(0) if channel_weights is None else channel_weights.contiguous()
    return _apply(x.contiguous(), kernels.contiguous(), weights, src.long().contiguous(), dst.long().contiguous(),
                  num_nodes)


class TermPlan(NamedTuple):
    """How a kernel head's terms build the kernel matrices K[e, h] = sum_t w[h, t, e] a[e, t] u[e] CG_t, with
    a[e, t] = v[e, rows[t]] (1 where rows[t] = -1); all in the dtype of the features.

    Attributes:
        rows: (T,) int64 column of v each term reads, -1: none.
        cg_term, cg_pos: (NZ,) int64 term and position in the flattened (d_out x d_in) matrix of each nonzero
            Clebsch-Gordan entry; cg_value: (NZ,) its value.
        cg: (T, d_out * d_in) the same entries, dense (for the differentiable form).
        d_out: rows of the kernel matrices.
        selection, constant: (V, T) and (T,): a = v @ selection + constant (one-hot columns from rows; the
            differentiable form gathers and sums along the term axis by matmuls).
    """

    rows: torch.Tensor
    cg_term: torch.Tensor
    cg_pos: torch.Tensor
    cg_value: torch.Tensor
    cg: torch.Tensor
    d_out: int
    selection: torch.Tensor
    constant: torch.Tensor


def term_plan(rows: torch.Tensor, cg: torch.Tensor, d_out: int, num_vectors: int) -> TermPlan:
    """The TermPlan of terms reading columns `rows` (T,) (-1: none) of (E, num_vectors) vectors, with dense
    Clebsch-Gordan rows cg (T, d_out * d_in) (dtype: the plan's)."""
    cg_term, cg_pos = torch.nonzero(cg, as_tuple=True)
    columns = torch.nn.functional.one_hot(rows % (num_vectors + 1), num_vectors + 1).t().to(cg.dtype)  # (V + 1, T)
    return TermPlan(rows, cg_term, cg_pos, cg[cg_term, cg_pos], cg, d_out, columns[:-1], columns[-1])


def term_kernels(term_weights, vectors, envelope, plan: TermPlan):
    """The kernel matrices in torch operations: term_weights (H, T, E), vectors (E, V), envelope (E, 1) ->
    (E, H, d_out, d_in)."""
    factors = torch.addmm(plan.constant, vectors, plan.selection) * envelope  # (E, T): a[e, t] u[e]
    return _kernels_from_factors(term_weights, factors, plan)


def _kernels_from_factors(term_weights, factors, plan: TermPlan):
    """`term_kernels` from the factors a[e, t] u[e] (E, T)."""
    heads, num_terms, num_edges = term_weights.shape
    terms = term_weights.permute(2, 0, 1) * factors.unsqueeze(1)  # (E, H, T)
    return (terms.reshape(-1, num_terms) @ plan.cg).view(num_edges, heads, plan.d_out, plan.cg.shape[1] // plan.d_out)


@torch.library.custom_op("molkern::depthwise_terms_aggregate", mutates_args=())
def _terms_aggregate(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor, u: torch.Tensor, c: torch.Tensor,
                     src: torch.Tensor, dst: torch.Tensor, num_nodes: int, rows: torch.Tensor, cg_term: torch.Tensor,
                     cg_pos: torch.Tensor, cg_value: torch.Tensor, cg: torch.Tensor, d_out: int, selection: torch.Tensor,
                     constant: torch.Tensor) -> torch.Tensor:
    """The C++ pass with the matrices built inside (the extension's `terms_forward`) as a torch operator, for graphs
    traced for torch.compile; cg, selection and constant (for second derivatives) are not read here."""
    return extension().terms_forward(x, w, v, u, c, src, dst, num_nodes, rows, cg_term, cg_pos, cg_value, d_out)


@_terms_aggregate.register_fake
def _(x, w, v, u, c, src, dst, num_nodes, rows, cg_term, cg_pos, cg_value, cg, d_out, selection, constant):
    return x.new_empty(num_nodes, x.shape[1], d_out, x.shape[3])


@torch.library.custom_op("molkern::depthwise_terms_aggregate_backward", mutates_args=())
def _terms_aggregate_backward(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, v: torch.Tensor,
                              u: torch.Tensor, c: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                              rows: torch.Tensor, cg_term: torch.Tensor, cg_pos: torch.Tensor, cg_value: torch.Tensor,
                              d_out: int, need_x: bool, need_w: bool, need_v: bool, need_u: bool, need_c: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Its C++ backward: gradients for x, w, v, u and c (empty where not needed)."""
    grads = extension().terms_backward(grad_out, x, w, v, u, c, src, dst, rows, cg_term, cg_pos, cg_value, d_out,
                                       need_x, need_w, need_v, need_u, need_c)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_terms_aggregate_backward.register_fake
def _(grad_out, x, w, v, u, c, src, dst, rows, cg_term, cg_pos, cg_value, d_out, need_x, need_w, need_v, need_u,
      need_c):
    need_c = need_c and c.numel() > 0
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0)
                 for t, need in ((x, need_x), (w, need_w), (v, need_v), (u, need_u), (c, need_c)))


def _terms_backward(ctx, grad_out):
    """Gradients for x, w, v, u, c of the operator (graphs traced for torch.compile)."""
    x, w, v, u, c, src, dst = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    need[4] = need[4] and c.numel() > 0
    grad_out = grad_out.contiguous()
    if not torch.is_grad_enabled():  # a first derivative only: the fused C++ pass
        grads = _terms_aggregate_backward(grad_out, x, w, v, u, c, src, dst, *ctx.plan[:4], ctx.plan.d_out, *need)
        return [g if n else None for g, n in zip(grads, need)]
    return _differentiable_terms_gradients(grad_out, x, w, v, u, c, src, dst, ctx.plan, need, eager=False)


def _eager_differentiable_terms_gradients(grad_out, x, w, v, u, c, src, dst, plan, d_out: int, need):
    """The extension's `terms_aggregate` backward under create_graph calls this (plan: its 7 tensors)."""
    rows, cg_term, cg_pos, cg_value, cg, selection, constant = plan
    plan = TermPlan(rows, cg_term, cg_pos, cg_value, cg, d_out, selection, constant)
    return _differentiable_terms_gradients(grad_out, x, w, v, u, c, src, dst, plan, need, eager=True)


def _differentiable_terms_gradients(grad_out, x, w, v, u, c, src, dst, plan: TermPlan, need, eager: bool):
    """Gradients for x, w, v, u, c (None where not needed) with the matrices and every gradient in differentiable
    operations (create_graph)."""
    need_x, need_w, need_v, need_u, need_c = need
    columns = torch.addmm(plan.constant, v, plan.selection)  # (E, T): a[e, t]
    factors = columns * u
    kernels = _kernels_from_factors(w, factors, plan)
    gx, gk, gc = _differentiable_gradients(grad_out, x, kernels, c, src, dst, need_x, need_w or need_v or need_u,
                                           need_c, eager)
    gw = gv = gu = None
    if gk is not None:
        heads, num_terms, num_edges = w.shape
        g_terms = (gk.reshape(-1, gk.shape[2] * gk.shape[3]) @ plan.cg.T).view(num_edges, heads, num_terms)
        gw = (g_terms * factors.unsqueeze(1)).permute(1, 2, 0) if need_w else None
        per_factor = (g_terms * w.permute(2, 0, 1)).sum(1)  # (E, T): the gradient for a[e, t] u[e]
        if need_v:  # (a matmul, not an index_add along dim 1: Inductor compiled that one with a wrong row stride)
            gv = (per_factor * u) @ plan.selection.t()
        if need_u:
            gu = (per_factor * columns).sum(1, keepdim=True)
    return [gx, gw, gv, gu, gc]


def _terms_setup_context(ctx, inputs, output):
    x, w, v, u, c, src, dst, _, *plan = inputs
    ctx.save_for_backward(x, w, v, u, c, src, dst)
    ctx.plan = TermPlan(*plan)


_terms_aggregate.register_autograd(lambda ctx, grad_out: (*_terms_backward(ctx, grad_out),) + (None,) * 11,
                                   setup_context=_terms_setup_context)


def depthwise_terms_aggregate(x, term_weights, vectors, envelope, channel_weights: Optional[torch.Tensor], src, dst,
                              num_nodes: int, plan: TermPlan):
    """`depthwise_aggregate(x, term_kernels(term_weights, vectors, envelope, plan), channel_weights, ...)` without
    per-edge kernel matrices where the C++ extension is available: eager calls through an autograd.Function, graphs
    traced for torch.compile through the operator `torch.ops.molkern.depthwise_terms_aggregate` (with the fused
    sums off for the trace, `molkern.nn.tracing`, the torch form).

    Shapes:
        x: (N, H, d_in, P), term_weights: (H, T, E) (edges last), vectors: (E, V), envelope: (E, 1),
        channel_weights: (E, H, P) or None, src, dst: (E,) -> (num_nodes, H, d_out, P)
    """
    if extension() is None or (is_tracing_for_compile() and not fused_sums_in_trace()):
        return depthwise_aggregate(x, term_kernels(term_weights, vectors, envelope, plan), channel_weights, src, dst,
                                   num_nodes)
    if vectors.stride(1) != 1 or is_tracing_for_compile():
        vectors = vectors.contiguous()
    weights = x.new_zeros(0) if channel_weights is None else channel_weights.contiguous()
    args = (x.contiguous(), term_weights.contiguous(), vectors, envelope.contiguous(), weights, src.long().contiguous(),
            dst.long().contiguous(), num_nodes)
    if is_tracing_for_compile():
        return _terms_aggregate(*args, *plan)
    return extension().terms_aggregate(*args, [plan.rows, plan.cg_term, plan.cg_pos, plan.cg_value, plan.cg,
                                               plan.selection, plan.constant], plan.d_out)
