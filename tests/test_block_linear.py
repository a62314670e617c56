"""molkern.nn.block_linear: products with a constant block-sparse matrix equal the dense matmul, derivatives too."""

import pytest
import torch

from molkern.nn import block_linear
from molkern.nn.block_linear import block_matmul, block_matrix, block_plan
from molkern.nn.constants import constant_parameters
from molkern.nn.fused import extension
from molkern.nn.linear import Linear

needs_extension = pytest.mark.skipif(extension() is None, reason="the C++ extension could not be built")


def permuted_blocks(sizes, dtype=torch.float64, seed=0) -> torch.Tensor:
    """A block-diagonal matrix of (R, C) blocks of the given sizes with its rows and columns shuffled."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.block_diag(*[torch.randn(r, c, generator=gen, dtype=dtype) for r, c in sizes])
    rows = torch.randperm(matrix.shape[0], generator=gen)
    cols = torch.randperm(matrix.shape[1], generator=gen)
    return matrix[rows][:, cols]


# block widths below, at and above the 16 / 32 columns of two 64-byte vectors, and a zero column
SIZES = [(32, 32), (32, 96), (7, 5), (3, 33), (1, 17), (0, 1)]


def test_plan_holds_every_nonzero_entry_once():
    matrix = permuted_blocks(SIZES)
    plan = block_plan(matrix)
    rebuilt = torch.zeros_like(matrix)
    for r0, r, c0, c, w0 in plan.groups.tolist():
        rows, cols = plan.rows[r0 : r0 + r], plan.cols[c0 : c0 + c]
        assert (rebuilt[rows][:, cols] == 0).all()
        rebuilt[rows.unsqueeze(1), cols] = plan.weights[w0 : w0 + r * c].view(r, c)
    assert torch.equal(rebuilt, matrix)
    assert plan.groups.shape[0] == len(SIZES) - 1  # the all-zero column is in no block


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 4, 13, 200])
@pytest.mark.parametrize("biased", [False, True])
def test_values_and_gradients_equal_the_dense_matmul(dtype, rows, biased):
    matrix = permuted_blocks(SIZES, dtype)
    bias = torch.randn(matrix.shape[1], dtype=dtype) if biased else None
    m = block_matrix(matrix, bias)
    assert m.plan is not None
    x = torch.randn(rows, matrix.shape[0], dtype=dtype, requires_grad=True)
    out = block_matmul(x, m)
    expected = x @ matrix + (bias if biased else 0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0], **tol)


@needs_extension
def test_derivatives_of_any_order():
    m = block_matrix(permuted_blocks([(4, 3), (2, 5)]), torch.randn(8, dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: block_matmul(x, m), (x,))
    assert torch.autograd.gradgradcheck(lambda x: block_matmul(x, m) ** 2, (x,))


def test_dense_matrix_or_no_extension_use_the_matmul(monkeypatch):
    dense = torch.randn(6, 4, dtype=torch.float64)
    assert block_matrix(dense).plan is None
    monkeypatch.setattr(block_linear, "extension", lambda: None)
    sparse = permuted_blocks(SIZES)
    m = block_matrix(sparse)
    assert m.plan is None
    x = torch.randn(3, sparse.shape[0], dtype=torch.float64)
    torch.testing.assert_close(block_matmul(x, m), x @ sparse, rtol=1e-12, atol=1e-12)


@needs_extension
def test_wrong_width_or_plan_is_an_error():
    m = block_matrix(permuted_blocks(SIZES))
    with pytest.raises(ValueError, match="columns"):
        block_matmul(torch.randn(2, 5, dtype=torch.float64), m)
    x = torch.randn(2, m.plan.in_dim, dtype=torch.float64)
    bad_rows = m._replace(plan=m.plan._replace(rows=m.plan.rows + m.plan.in_dim))
    with pytest.raises(RuntimeError, match="block rows"):
        block_matmul(x, bad_rows)
    bad_groups = m._replace(plan=m.plan._replace(groups=m.plan.groups + 1000))
    with pytest.raises(RuntimeError, match="outside"):
        block_matmul(x, bad_groups)


@needs_extension
def test_linear_with_constant_parameters_at_any_row_count():
    """Above the dense matrix's row limit the blocks are used: the same values as e3nn's forward."""
    torch.manual_seed(0)
    lin = Linear("8x0e+8x1o+8x2e", "16x0e+4x1o+4x2e", biases=True).double()
    x = torch.randn(lin.max_constant_rows + 7, lin.irreps_in.dim, dtype=torch.float64)
    expected = lin(x)
    with constant_parameters():
        torch.testing.assert_close(lin(x), expected, rtol=1e-12, atol=1e-12)
        assert lin.constant_rows_ok(10**6)
