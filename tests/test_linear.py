"""molkern.nn.linear.Linear: e3nn's o3.Linear (parameters, state_dict, values, gradients) in fewer ops."""

import pytest
import torch
from e3nn import o3

from molkern.nn.linear import Linear, dense_rows_limit

from conftest import count_ops


CASES = [
    ("32x0e+32x1o+32x2e", "96x0e+32x1o+32x2e", False),
    ("16x0e+16x1o", "32x0e+16x1o", False),
    ("5x0e", "16x0e+16x1o", False),  # output irreps without an input path stay zero
    ("18x0e+1x1o+1x2e", "24x0e+8x1o+8x2e", True),
    ("8x0e+8x1o+8x2e", "4x0e+4x1o+2x2e+16x0e", True),  # repeated output irrep, two biased blocks
    ("8x0e+8x0o+8x1o+8x1e+8x2e+8x2o", "16x0e+4x0o+4x1e+4x1o+4x2e+4x2o", True),
    ("16x0e+16x1o+16x2e", "1x0e", True),
]


def _pair(irreps_in, irreps_out, biases, **kwargs):
    torch.manual_seed(0)
    ref = o3.Linear(irreps_in, irreps_out, biases=biases)
    torch.manual_seed(0)
    ours = Linear(irreps_in, irreps_out, biases=biases, **kwargs)
    return ref.double(), ours.double()


@pytest.mark.parametrize("irreps_in,irreps_out,biases", CASES)
@pytest.mark.parametrize("rows", [1, 20, 300])
def test_matches_o3_linear(irreps_in, irreps_out, biases, rows):
    ref, ours = _pair(irreps_in, irreps_out, biases, max_dense_rows=10**9)  # dense path at every size
    assert isinstance(ours, o3.Linear)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name  # same initialisation from the same seed
    if biases:
        with torch.no_grad():
            for m in (ref, ours):
                m.bias.copy_(torch.randn(m.bias.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x = torch.randn(rows, ref.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(rows, ref.irreps_out.dim, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        y = m(x)
        results.append([y] + list(torch.autograd.grad(y, [x] + list(m.parameters()), grad_out)))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_batch_shapes_and_fallbacks():
    ref, ours = _pair("8x0e+8x1o", "8x0e+4x1o", True)
    x = torch.randn(3, 4, ref.irreps_in.dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours(x[:0]), ref(x[:0]))
    # above the row limit: e3nn's own forward, same numbers
    _, never = _pair("8x0e+8x1o", "8x0e+4x1o", True, max_dense_rows=0)
    torch.testing.assert_close(never(x), ref(x), rtol=0, atol=1e-12)
    # external weights: e3nn's path
    ext_ref = o3.Linear("4x0e+2x1o", "3x0e+2x1o", internal_weights=False, shared_weights=False).double()
    ext = Linear("4x0e+2x1o", "3x0e+2x1o", internal_weights=False, shared_weights=False).double()
    w = torch.randn(5, ext_ref.weight_numel, dtype=torch.float64)
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(ext(x, w), ext_ref(x, w))


def test_float32_and_load_state_dict_from_e3nn():
    ref = o3.Linear("16x0e+16x1o", "32x0e+16x1o", biases=True)
    ours = Linear("16x0e+16x1o", "32x0e+16x1o", biases=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dense_rows_limit():
    assert dense_rows_limit(64, 80) > 10**6 and dense_rows_limit(144, 176) == 128 and dense_rows_limit(288, 352) == 0


@pytest.mark.parametrize("irreps_in,irreps_out,biases", CASES[1:5])
def test_fewer_ops_than_e3nn(irreps_in, irreps_out, biases):
    ref, ours = _pair(irreps_in, irreps_out, biases, max_dense_rows=10**9)
    x = torch.randn(20, ref.irreps_in.dim, dtype=torch.float64, requires_grad=True)

    def run(m):
        return lambda: torch.autograd.grad(m(x).sum(), [x] + list(m.parameters()))

    assert 2 * count_ops(run(ours)) <= count_ops(run(ref))
