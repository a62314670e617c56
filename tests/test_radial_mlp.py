import pytest
import torch

import molkern.groups as groups
from molkern.nn import BesselBasis, EquivariantMLP, PolynomialCutoff, irreps_up_to, make_gate
from molkern.testing import assert_equivariant

from conftest import ALL_PARITIES


def test_cutoff_is_smooth_and_vanishes():
    u = PolynomialCutoff(cutoff=4.0, p=6)
    r = torch.linspace(0, 5, 501, dtype=torch.float64, requires_grad=True)
    y = u(r)
    assert y[0] == 1.0 and torch.all(y[r >= 4.0] == 0)
    (grad,) = torch.autograd.grad(y.sum(), r)
    assert grad[r >= 4.0].abs().max() == 0
    r_c = torch.tensor([4.0 - 1e-3], dtype=torch.float64, requires_grad=True)
    (g_c,) = torch.autograd.grad(u(r_c).sum(), r_c)
    assert g_c.abs() < 1e-4  # the slope goes to zero at the cutoff (forces stay continuous)


def test_bessel_basis_is_bounded_and_smooth():
    b = BesselBasis(cutoff=5.0, num_basis=8)
    r = torch.linspace(0.0, 5.0, 1001, dtype=torch.float64, requires_grad=True)
    y = b(r)
    assert y.shape == (1001, 8) and torch.isfinite(y).all()
    assert y.abs().max() <= 1.0 + 1e-6 and torch.allclose(y[0], torch.ones(8, dtype=torch.float64))
    (grad,) = torch.autograd.grad(y.sum(), r)
    assert torch.isfinite(grad).all()  # smooth at r = 0 (coincident points)
    # n = 1 has its first zero at the cutoff
    assert abs(float(y[-1, 0])) < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="cutoff"):
        PolynomialCutoff(0.0)
    with pytest.raises(ValueError, match="parity"):
        irreps_up_to(2, 1, "odd")


def test_gate_layout_with_every_parity(dtype):
    """e3nn's Gate sorts its input irreps: the MLP must feed it gate.irreps_in (every parity catches this)."""
    gate = make_gate(ALL_PARITIES)
    x = torch.randn(5, gate.irreps_in.dim)
    assert_equivariant(gate, groups.get("o3"), [x], [gate.irreps_in], gate.irreps_out)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_equivariant_mlp(dtype, batch_norm):
    mlp = EquivariantMLP("2x0e+" + ALL_PARITIES, irreps_up_to(4, 2), ALL_PARITIES, num_layers=2, batch_norm=batch_norm)
    mlp.eval()
    x = torch.randn(7, mlp.irreps_in.dim)
    assert_equivariant(mlp, groups.get("o3"), [x], [mlp.irreps_in], mlp.irreps_out)


@pytest.mark.parametrize("irreps", [ALL_PARITIES, "8x0e+8x1o+8x2e+8x3o+8x4e", "4x0e+2x0o", "3x1o+2x2e"])
def test_gate_equals_e3nn_gate(irreps):
    """molkern's lean Gate computes exactly e3nn's Gate (layout, normalised activations, gating)."""
    from e3nn import nn as enn
    from e3nn import o3

    gate = make_gate(irreps)
    out = o3.Irreps(irreps).simplify()
    scalars = o3.Irreps([(m, ir) for m, ir in out if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in out if ir.l > 0])
    acts = [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    reference = enn.Gate(scalars, acts, gates, [torch.sigmoid] if gated.num_irreps else [], gated)
    assert gate.irreps_in == reference.irreps_in and gate.irreps_out == reference.irreps_out
    x = torch.randn(2, 5, gate.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    out, out_ref = gate(x), reference(x)
    assert torch.allclose(out, out_ref, rtol=0, atol=1e-12)
    probe = torch.randn_like(out)
    (g,), (g_ref,) = torch.autograd.grad((out * probe).sum(), x), torch.autograd.grad((out_ref * probe).sum(), x)
    assert torch.allclose(g, g_ref, rtol=0, atol=1e-12)
