"""molkern.nn.harmonics: e3nn's spherical harmonics (values, columns, signs, derivatives) in fewer ops."""

import pytest
import torch
from e3nn import o3

from molkern.nn.harmonics import SphericalHarmonics, spherical_harmonics

from conftest import count_ops


def _vectors(dtype, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    vec = 2.0 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    vec[0] = 0.0  # zero vector
    vec[1] = torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64)  # on an axis
    vec[2] = torch.tensor([-1e-3, 2e-3, 0.0], dtype=torch.float64)  # short
    return vec.to(dtype)


def _cases(lmaxs=(0, 1, 2, 3, 4, 6)):
    out = []
    for lmax in lmaxs:
        out.append(o3.Irreps.spherical_harmonics(lmax))
        if lmax > 0:
            out.append(o3.Irreps.spherical_harmonics(lmax)[1:])  # l >= 1, as EdgeEmbedding uses
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("irreps", _cases(), ids=str)
def test_matches_e3nn_float64(irreps, normalize):
    vec = _vectors(torch.float64)
    ours = SphericalHarmonics(irreps, normalize)(vec)
    ref = o3.spherical_harmonics(irreps, vec, normalize=normalize, normalization="component")
    assert ours.shape == ref.shape == (vec.shape[0], irreps.dim)
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(ours / scale, ref / scale, rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("irreps", _cases(), ids=str)
def test_float32_as_accurate_as_e3nn(irreps, normalize):
    vec = _vectors(torch.float32)
    ref = o3.spherical_harmonics(irreps, vec.double(), normalize=normalize, normalization="component")
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1.0)
    ours = SphericalHarmonics(irreps, normalize)(vec)
    assert ours.dtype == torch.float32
    err = ((ours.double() - ref) / scale).abs().max().item()
    err_e3nn = ((o3.spherical_harmonics(irreps, vec, normalize, "component").double() - ref) / scale).abs().max().item()
    assert err < 2e-6 and err <= 2 * err_e3nn + 1e-7, (err, err_e3nn)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("irreps", _cases((1, 2, 4, 6)), ids=str)
def test_gradients_match_e3nn(irreps, normalize):
    vec = _vectors(torch.float64)[1:].requires_grad_()  # e3nn's gradient at 0 is 1/eps-sized (checked below)
    weights = torch.randn(irreps.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad((SphericalHarmonics(irreps, normalize)(vec) * weights).sum(), vec)[0]
    ref = torch.autograd.grad(
        (o3.spherical_harmonics(irreps, vec, normalize, "component") * weights).sum(), vec
    )[0]
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1.0)
    torch.testing.assert_close(ours / scale, ref / scale, rtol=0, atol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_zero_vector_like_e3nn(normalize):
    irreps = o3.Irreps.spherical_harmonics(3)
    vec = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    ours = SphericalHarmonics(irreps, normalize)(vec)
    ref = o3.spherical_harmonics(irreps, vec, normalize, "component")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    g_ours = torch.autograd.grad(ours.sum(), vec)[0]
    g_ref = torch.autograd.grad(ref.sum(), vec)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_second_derivatives(normalize):
    """Training on forces differentiates the backward: gradgradcheck, and the same numbers as e3nn."""
    irreps = o3.Irreps.spherical_harmonics(3)
    module = SphericalHarmonics(irreps, normalize)
    vec = _vectors(torch.float64, n=6, seed=2)[3:].requires_grad_()
    assert torch.autograd.gradcheck(module, (vec,))
    assert torch.autograd.gradgradcheck(module, (vec,))
    weights = torch.randn(irreps.dim, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (module, lambda v: o3.spherical_harmonics(irreps, v, normalize, "component")):
        forces = torch.autograd.grad((fn(vec) * weights).sum(), vec, create_graph=True)[0]
        results.append(torch.autograd.grad(forces.pow(2).sum(), [vec, weights]))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_functional_forms_and_shapes():
    vec = torch.randn(4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(spherical_harmonics(3, vec, True), o3.spherical_harmonics(3, vec, True, "component"))
    torch.testing.assert_close(
        spherical_harmonics([2, 1, 3], vec, False, "integral"), o3.spherical_harmonics([2, 1, 3], vec, False)
    )
    torch.testing.assert_close(
        spherical_harmonics("1x1o+1x2e", vec, False, input_scale=0.2),
        o3.spherical_harmonics("1x1o+1x2e", 0.2 * vec, False, "component"),
    )
    assert spherical_harmonics(2, torch.zeros(0, 3), True).shape == (0, 5)


def test_no_state_and_dtype_round_trip():
    module = SphericalHarmonics(o3.Irreps.spherical_harmonics(4), True)
    assert module.state_dict() == {} and list(module.parameters()) == []
    vec = torch.randn(10, 3, dtype=torch.float64)
    module.float()
    module(vec.float())
    module.double()  # the float64 coefficients are kept, not rounded through float32
    ref = o3.spherical_harmonics(o3.Irreps.spherical_harmonics(4), vec, True, "component")
    torch.testing.assert_close(module(vec), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lmax", [2, 3, 4])
def test_fewer_ops_than_e3nn(lmax):
    irreps = o3.Irreps.spherical_harmonics(lmax)
    module = SphericalHarmonics(irreps, True)
    vec = torch.randn(30, 3, requires_grad=True)
    weights = torch.randn(irreps.dim)

    def run(fn):
        return lambda: torch.autograd.grad((fn(vec) * weights).sum(), vec)

    ours = count_ops(run(module))
    ref = count_ops(run(lambda v: o3.spherical_harmonics(irreps, v, True, "component")))
    assert ours < ref / 2, (ours, ref)
