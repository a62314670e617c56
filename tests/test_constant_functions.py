"""The edge basis and the gate as single C++ autograd nodes (constant parameters): the same values, first and
second derivatives as the modules (plain loops forward and for first derivatives, ATen operations under
create_graph), few edges and many (threads)."""

import pytest
import torch

from molkern.nn.constants import constant_parameters
from molkern.nn.edges import EdgeEmbedding
from molkern.nn.fused import extension
from molkern.nn.mlp import GATE_LOOP_ENTRIES, make_gate

pytestmark = pytest.mark.skipif(extension() is None, reason="the C++ extension could not be built")

SIZES = {"few": 40, "many": 3000}  # edges (gate rows: a tenth, then beyond its loops' bound: the module's form)


def embedding(dtype):
    torch.manual_seed(0)
    emb = EdgeEmbedding(lmax=2, num_radial=8, cutoff=4.0, kernel_input=True, irreps_node_attr="4x0e",
                        trunk_type="invariant", trunk_layers=2, trunk_width=16).to(dtype).eval()
    with torch.no_grad():
        emb.radial.freqs.add_(0.1 * torch.randn_like(emb.radial.freqs))  # trained frequencies: not n pi
        for name, buffer in emb.named_buffers():  # the harmonics' batch norm, folded into their scale
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return emb


def edge_vectors(num, dtype):
    vec = torch.randn(num, 3, dtype=dtype) * 2.0
    vec[0] = 0.0  # a zero vector (the length's gradient 0 there, as torch's norm)
    vec[1] = torch.tensor([5.0, 0.0, 0.0])  # beyond the cutoff: envelope 0
    return vec.requires_grad_(True)


def module_basis(emb, vec):
    """The modules' (length, envelope, radial, harmonics), as the ordinary forward computes them."""
    length = torch.linalg.norm(vec, dim=-1)
    return length, emb.envelope(length).unsqueeze(-1), emb.radial(length), emb._harmonics_module()(vec) * \
        emb._harmonics_scale()


def first_and_second(outputs, vec, weights, probe):
    """Gradient of sum_k <weights_k, outputs_k> and the derivative of <gradient, probe> (a Hessian-vector product)."""
    (grad,) = torch.autograd.grad(outputs, vec, weights, create_graph=True)
    (second,) = torch.autograd.grad(grad, vec, probe)
    return grad, second


@pytest.mark.parametrize("form", sorted(SIZES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_basis_equals_the_modules(form, dtype):
    emb = embedding(dtype)
    vec = edge_vectors(SIZES[form], dtype)
    with constant_parameters():
        fused = emb._constant_basis(vec)
        expected = module_basis(emb, vec)
    assert fused is not None
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    for a, b in zip(fused, expected):
        torch.testing.assert_close(a, b, **tol)
    weights = [torch.randn_like(t) for t in expected]
    (grad,) = torch.autograd.grad(fused, vec, weights, retain_graph=True)  # no create_graph: the loops
    (grad_expected,) = torch.autograd.grad(expected, vec, weights, retain_graph=True)
    torch.testing.assert_close(grad, grad_expected, **tol)
    if dtype == torch.float64:  # second derivatives (create_graph: ATen operations, recorded)
        probe = torch.randn_like(vec)
        for a, b in zip(first_and_second(fused, vec, weights, probe), first_and_second(expected, vec, weights, probe)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)  # NaN at 0 in both


def test_edge_basis_partial_outputs_and_gradcheck():
    emb = embedding(torch.float64)
    vec = edge_vectors(6, torch.float64)[2:].detach().requires_grad_(True)
    with constant_parameters():
        for k in range(4):  # a gradient for one output only (the others' undefined)
            (grad,) = torch.autograd.grad(emb._constant_basis(vec)[k].sum(), vec)
            (expected,) = torch.autograd.grad(module_basis(emb, vec)[k].sum(), vec)
            torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(emb._constant_basis, (vec,))
        assert torch.autograd.gradgradcheck(emb._constant_basis, (vec,))


def test_embedding_uses_the_fused_basis_with_constant_parameters():
    emb = embedding(torch.float64)
    vec = edge_vectors(30, torch.float64)
    node_attrs = torch.eye(4, dtype=torch.float64)[torch.randint(0, 4, (10,))]
    edge_index = torch.randint(0, 10, (2, 30))
    out = emb(vec, None, node_attrs, edge_index)
    with constant_parameters():
        fused = emb(vec, None, node_attrs, edge_index)
    for a, b in zip(fused, out):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert "EdgeBasis" in fused.envelope.grad_fn.name(), fused.envelope.grad_fn.name()


@pytest.mark.parametrize("form", sorted(SIZES))
@pytest.mark.parametrize("irreps", ["8x0e+4x1o+4x2e", "8x0e+4x0o+4x1o", "16x0e"])
def test_gate_equals_the_module(form, irreps):
    gate = make_gate(irreps).double()
    rows = SIZES[form] // 10 if form == "few" else SIZES[form]
    torch.manual_seed(1)
    x = torch.randn(rows, gate.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    expected = gate(x)
    with constant_parameters():
        out = gate(x)
    fused = None not in gate._named and x.numel() <= GATE_LOOP_ENTRIES
    assert (None not in gate._named) == (irreps != "8x0e+4x0o+4x1o")  # odd scalars: two activations
    assert ("GateFunction" in out.grad_fn.name()) == fused
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights, probe = torch.randn_like(expected), torch.randn_like(x)
    (grad,) = torch.autograd.grad(out, x, weights, retain_graph=True)
    expected_grad = torch.autograd.grad(expected, x, weights, retain_graph=True)[0]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(first_and_second(out, x, weights, probe), first_and_second(expected, x, weights, probe)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gate_rejects_bad_gate_indices():
    gate = make_gate("4x0e+2x1o").double()
    x = torch.randn(3, gate.irreps_in.dim, dtype=torch.float64)
    bad = gate._gate_of_column.clone()
    bad[0] = 5
    with pytest.raises(RuntimeError, match="gate_of_column must index"):
        extension().gate(x, bad, *gate._sizes[:2], *gate._named[0], *gate._named[1])
