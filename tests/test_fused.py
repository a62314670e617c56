"""The fused depthwise convolution (C++ extension) against the plain torch operations it replaces."""

import pytest
import torch

from molkern.nn import fused
from molkern.nn.edges import EdgeEmbedding
from molkern.nn.kernels import ImplicitKernel
from molkern.nn.scatter import scatter_sum


def test_extension_builds():
    assert fused.extension() is not None, "the C++ extension did not build (see the warning)"


def random_inputs(num_nodes, num_edges, heads, d_in, d_out, per_head, channel_weights, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, heads, d_in, per_head, generator=g, dtype=torch.float64).to(dtype)
    kernels = torch.randn(num_edges, heads, d_out, d_in, generator=g, dtype=torch.float64).to(dtype)
    weights = torch.randn(num_edges, heads, per_head, generator=g, dtype=torch.float64).to(dtype) \
        if channel_weights else None
    src = torch.randint(0, num_nodes, (num_edges,), generator=g)
    dst = torch.randint(0, num_nodes - 1, (num_edges,), generator=g)  # the last node receives nothing
    return x, kernels, weights, src, dst


SHAPES = [(1, 4, 4, 8, True), (2, 9, 9, 3, True), (1, 9, 9, 32, False), (1, 4, 1, 5, False), (3, 1, 4, 2, True), (2, 1, 1, 17, False)]


@pytest.mark.parametrize("heads, d_in, d_out, per_head, channel_weights", SHAPES)
def test_fused_equals_torch_operations_with_first_and_second_derivatives(heads, d_in, d_out, per_head, channel_weights):
    x, kernels, weights, src, dst = random_inputs(6, 25, heads, d_in, d_out, per_head, channel_weights, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, kernels, weights) if t is not None)

    def run(function):
        return lambda *t: function(t[0], t[1], t[2] if channel_weights else None, src, dst, 6)

    out = run(fused.depthwise_aggregate)(*inputs)
    torch.testing.assert_close(out, run(fused.depthwise_aggregate_reference)(*inputs), rtol=1e-12, atol=1e-12)
    assert out[-1].abs().max() == 0 and out.abs().max() > 0.1
    assert torch.autograd.gradcheck(run(fused.depthwise_aggregate), inputs)
    assert torch.autograd.gradgradcheck(run(fused.depthwise_aggregate), inputs)  # e.g. training on forces


def test_fused_float32_and_two_threads_match_the_reference():
    """Edge ranges split over threads, each summing into its own buffer: the same sums (to rounding) and grads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, kernels, weights, src, dst = random_inputs(300, 5000, 2, 4, 4, 16, True, torch.float32)
        inputs = [t.requires_grad_() for t in (x, kernels, weights)]
        grad = torch.randn(300, 2, 4, 16)
        results = []
        for function in (fused.depthwise_aggregate, fused.depthwise_aggregate_reference):
            out = function(*inputs, src, dst, 300)
            results.append([out, *torch.autograd.grad(out, inputs, grad)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_no_edges_gives_zeros():
    x, kernels, weights, src, dst = random_inputs(4, 0, 1, 4, 4, 3, True, torch.float32)
    assert torch.equal(fused.depthwise_aggregate(x, kernels, weights, src, dst, 4), torch.zeros(4, 1, 4, 3))


def test_extension_rejects_bad_shapes():
    x, kernels, weights, src, dst = random_inputs(4, 10, 1, 4, 4, 3, True, torch.float32)
    with pytest.raises(RuntimeError, match="one entry per edge"):
        fused.extension().forward(x, kernels, weights, src[:5], dst, 4)
    with pytest.raises(RuntimeError, match="c must be"):
        fused.extension().forward(x, kernels, weights[:, :, :2].contiguous(), src, dst, 4)
    with pytest.raises(RuntimeError, match="contiguous int64"):
        fused.extension().forward(x, kernels, weights, src.int(), dst, 4)


def test_kernel_aggregate_equals_gather_messages_scatter():
    """ImplicitKernel.aggregate (fused) == gathering, the messages of `messages` and a scatter-sum."""
    torch.manual_seed(0)
    emb = EdgeEmbedding(5.0, lmax=2, num_radial=8, irreps_node_attr="3x0e", trunk_layers=2, trunk_width=16,
                        trunk_type="invariant")
    kernel = ImplicitKernel("8x0e+8x1o", "8x0e+8x1o", emb.irreps_kernel_in, "depthwise", mlp_layers=0, heads=2,
                            channel_weights=True, invariant_head=True)
    pos, attrs = torch.randn(9, 3) * 2, torch.randn(9, 3)
    src, dst = torch.nonzero(~torch.eye(9, dtype=torch.bool), as_tuple=True)
    edge_index = torch.stack([src, dst])
    edges = emb(pos[src] - pos[dst], node_attrs=attrs, edge_index=edge_index)
    feats = kernel.prepare(torch.randn(9, 32))
    expected = scatter_sum(kernel.messages(feats[src], edges), dst, 9)
    torch.testing.assert_close(kernel.aggregate(feats, edges, edge_index, 9), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channel_weights", [True, False])
def test_fused_operators_pass_torch_opcheck(channel_weights):
    """The torch operators (what graphs traced for torch.compile call): schema, fake (shape-only) implementations
    and the autograd registration agree with the real ones, with symbolic sizes too."""
    x, kernels, weights, src, dst = random_inputs(6, 25, 2, 4, 4, 3, channel_weights, torch.float64)
    weights = x.new_zeros(0) if weights is None else weights
    x.requires_grad_(), kernels.requires_grad_(), weights.requires_grad_(channel_weights)
    torch.library.opcheck(torch.ops.molkern.depthwise_aggregate, (x, kernels, weights, src, dst, 6))
    grad = torch.randn(6, 2, 4, 3, dtype=torch.float64)
    args = (grad, x.detach(), kernels.detach(), weights.detach(), src, dst, True, True, channel_weights)
    torch.library.opcheck(torch.ops.molkern.depthwise_aggregate_backward, args)


def random_term_inputs(num_edges, heads, d_in, d_out, channel_weights, seed=0):
    """Term weights, a column slice of a wider kernel input as vectors, an envelope with a zero (an edge at the
    cutoff) and a plan of random sparse Clebsch-Gordan rows (some terms read no vector: rows = -1)."""
    g = torch.Generator().manual_seed(seed)
    num_terms, num_vectors = 7, 5
    x, _, weights, src, dst = random_inputs(6, num_edges, heads, d_in, d_out, 3, channel_weights, torch.float64, seed)
    term_weights = torch.randn(heads, num_terms, num_edges, generator=g, dtype=torch.float64)
    vectors = torch.randn(num_edges, 2 + num_vectors, generator=g, dtype=torch.float64)[:, 2:]
    envelope = torch.rand(num_edges, 1, generator=g, dtype=torch.float64)
    envelope[:1] = 0.0
    cg = torch.randn(num_terms, d_out * d_in, generator=g, dtype=torch.float64)
    cg = cg * (torch.rand(cg.shape, generator=g) < 0.5)
    rows = torch.randint(-1, num_vectors, (num_terms,), generator=g)
    plan = fused.term_plan(rows, cg, d_out, num_vectors)
    return x, term_weights, vectors, envelope, weights, src, dst, plan


@pytest.mark.parametrize("heads, d_in, d_out, per_head, channel_weights", SHAPES)
def test_kernels_built_in_the_fused_pass_equal_materialised_kernels(heads, d_in, d_out, per_head, channel_weights):
    """depthwise_terms_aggregate (matrices built per edge inside the C++ pass) == depthwise_aggregate of the
    matrices built by torch operations: values, first derivatives (C++) and second (differentiable form)."""
    x, w, v, u, weights, src, dst, plan = random_term_inputs(25, heads, d_in, d_out, channel_weights)
    inputs = tuple(t.requires_grad_() for t in (x, w, v, u, weights) if t is not None)

    def fused_form(x, w, v, u, c=None):
        return fused.depthwise_terms_aggregate(x, w, v, u, c, src, dst, 6, plan)

    def torch_form(x, w, v, u, c=None):
        return fused.depthwise_aggregate_reference(x, fused.term_kernels(w, v, u, plan), c, src, dst, 6)

    out = fused_form(*inputs)
    torch.testing.assert_close(out, torch_form(*inputs), rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, inputs, grad),
                               torch.autograd.grad(torch_form(*inputs), inputs, grad), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused_form, inputs)
    assert torch.autograd.gradgradcheck(fused_form, inputs)


def test_fused_terms_reject_a_bad_plan():
    x, w, v, u, weights, src, dst, plan = random_term_inputs(10, 1, 4, 4, True)
    args = (x, w, v, u, weights, src, dst, 6)
    with pytest.raises(RuntimeError, match="rows out of range"):
        fused.extension().terms_forward(*args, plan.rows + 5, plan.cg_term, plan.cg_pos, plan.cg_value, 4)
    with pytest.raises(RuntimeError, match="cg entries out of range"):
        fused.extension().terms_forward(*args, plan.rows, plan.cg_term, plan.cg_pos + 16, plan.cg_value, 4)
    with pytest.raises(RuntimeError, match="w must be"):
        fused.extension().terms_forward(x, w[..., :5].contiguous(), v, u, weights, src, dst, 6, *plan[:4], 4)


def test_fused_terms_float32_two_threads_and_no_edges():
    """Edge tiles split over two threads' ranges (partial tiles at each end): the torch form's sums and gradients;
    no edges: zeros."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w, v, u, weights, src, dst, plan = random_term_inputs(5003, 2, 9, 9, True)
        plan = fused.term_plan(plan.rows, plan.cg.float(), plan.d_out, v.shape[1])
        inputs = [t.float().requires_grad_() for t in (x, w, v, u, weights)]
        results = []
        for form in ("fused", "torch"):
            if form == "fused":
                out = fused.depthwise_terms_aggregate(*inputs[:4], inputs[4], src, dst, 6, plan)
            else:
                out = fused.depthwise_aggregate_reference(inputs[0], fused.term_kernels(*inputs[1:4], plan), inputs[4],
                                                          src, dst, 6)
            results.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    x, w, v, u, weights, src, dst, plan = random_term_inputs(0, 1, 4, 4, True)
    assert torch.equal(fused.depthwise_terms_aggregate(x, w, v, u, weights, src, dst, 6, plan), torch.zeros(6, 1, 4, 3))


@pytest.mark.parametrize("channel_weights", [True, False])
def test_fused_terms_operators_pass_torch_opcheck(channel_weights):
    """The operators that graphs traced for torch.compile call for the matrices built inside the pass."""
    x, w, v, u, weights, src, dst, plan = random_term_inputs(25, 2, 4, 4, channel_weights)
    weights = x.new_zeros(0) if weights is None else weights
    v = v.contiguous()
    for t in (x, w, v, u):
        t.requires_grad_()
    weights.requires_grad_(channel_weights)
    args = (x, w, v, u, weights, src, dst, 6, *plan)
    torch.library.opcheck(torch.ops.molkern.depthwise_terms_aggregate, args)
    grad = torch.randn(6, 2, 4, 3, dtype=torch.float64)
    detached = [t.detach() for t in (x, w, v, u, weights)]
    torch.library.opcheck(torch.ops.molkern.depthwise_terms_aggregate_backward,
                          (grad, *detached, src, dst, *plan[:4], plan.d_out, True, True, True, True, channel_weights))
