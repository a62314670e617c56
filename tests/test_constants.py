"""molkern.nn.constant_parameters: the same energies and forces in fewer operations, caches that follow the weights."""

import copy
import threading

import pytest
import torch
from ase.build import molecule
from e3nn import o3

from molkern.calculator import MolkernCalculator
from molkern.nn.constants import constant_parameters, parameters_constant
from molkern.nn.linear import Linear
from molkern.nn import self_connection
from molkern.nn.self_connection import ScalarAttributeTensorProduct
from molkern.train.energy import EnergyModule, energy_forces_stress

from conftest import count_ops

ELEMENTS = ["H", "C", "N", "O"]
MODELS = {
    "depthwise": dict(cutoff=4.0, num_channels=8, lmax=2, num_layers=2, kernel_mlp_width=4, avg_num_neighbors=8.0),
    "standard": dict(cutoff=4.0, num_channels=8, lmax=2, num_layers=2, kernel="standard", avg_num_neighbors=8.0),
    "factorised": dict(cutoff=4.0, num_channels=8, lmax=1, num_layers=2, kernel="factorised", avg_num_neighbors=8.0),
    "full": dict(cutoff=4.0, num_channels=8, lmax=1, num_layers=2, kernel="full", avg_num_neighbors=8.0),
    "so2": dict(cutoff=4.0, num_channels=8, lmax=2, num_layers=2, group="so2", avg_num_neighbors=8.0),
}


def make_module(name, seed=0):
    torch.manual_seed(seed)
    module = EnergyModule(ELEMENTS, model=MODELS[name], data_init=False).double().eval()
    for p in module.parameters():  # away from the initialisation (e.g. batch-norm weights of 1)
        p.data.add_(0.1 * torch.randn_like(p))
    for name_, b in module.named_buffers():
        if name_.endswith("running_var"):
            b.uniform_(0.5, 2.0)
    return module


def molecule_batch(module, name="CH3CH2OH", seed=0):
    atoms = molecule(name)
    atoms.rattle(0.05, seed=seed)
    return MolkernCalculator(module).batch(atoms)


def energy_forces(module, batch, constant):
    with constant_parameters(constant):
        out = energy_forces_stress(module, batch, forces=True)
    return out["energy"], out["forces"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_energy_and_forces_in_fewer_operations(name):
    module = make_module(name)
    batch = molecule_batch(module)
    energy, forces = energy_forces(module, batch, constant=False)
    energy_c, forces_c = energy_forces(module, batch, constant=True)
    torch.testing.assert_close(energy_c, energy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces_c, forces, rtol=1e-10, atol=1e-12)
    assert forces.abs().max() > 1e-5  # not trivially zero
    ops = count_ops(lambda: energy_forces(module, batch, constant=False))
    ops_c = count_ops(lambda: energy_forces(module, batch, constant=True))
    assert ops_c < ops, (ops_c, ops)


def test_caches_follow_weight_changes():
    module = make_module("depthwise")
    batch = molecule_batch(module)
    before, _ = energy_forces(module, batch, constant=True)
    # an optimizer step (in place) ...
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    optimizer.zero_grad()
    energy_forces_stress(module, batch, forces=False)["energy"].sum().backward()
    optimizer.step()
    module.eval()
    stepped, _ = energy_forces(module, batch, constant=True)
    assert not torch.allclose(stepped, before)
    torch.testing.assert_close(stepped, energy_forces(module, batch, constant=False)[0], rtol=1e-12, atol=1e-12)
    # ... and another model's weights loaded into it
    other = make_module("depthwise", seed=1)
    module.load_state_dict(other.state_dict())
    energy, forces = energy_forces(module, batch, constant=True)
    expected = energy_forces(other, batch, constant=False)
    torch.testing.assert_close(energy, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces, expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("biases", [False, True])
def test_linear(biases):
    torch.manual_seed(0)
    ours = Linear("8x0e+8x1o+8x2e", "16x0e+4x1o+4x2e", biases=biases).double()
    ref = o3.Linear("8x0e+8x1o+8x2e", "16x0e+4x1o+4x2e", biases=biases).double()
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, ours.irreps_in.dim, dtype=torch.float64)
    with constant_parameters():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def _attributes(kind: str) -> torch.Tensor:
    """(11, 5) node attributes: any scalars, or one-hot rows with a scaled row and an all-zero row."""
    if kind == "random":
        return torch.randn(11, 5, dtype=torch.float64)
    z = torch.nn.functional.one_hot(torch.arange(11) % 5, 5).double()
    z[3] *= 2.5
    z[7] = 0.0
    return z


@pytest.mark.parametrize("fused", [True, False], ids=["c++", "torch"])
@pytest.mark.parametrize("irreps, kind", [(("8x0e+8x1o+8x2e", "16x0e+8x1o+4x1e"), "random"),
                                          (("8x0e+8x1o+8x2e", "16x0e+8x1o+4x1e"), "one-hot"),
                                          (("32x0e+32x1o+32x2e", "64x0e+32x1o+32x2e+4x1e"), "one-hot"),
                                          (("32x0e+32x1o+32x2e", "64x0e+32x1o+32x2e+4x1e"), "random")])
def test_self_connection_with_several_attribute_blocks(fused, irreps, kind, monkeypatch):
    if not fused:  # the torch form, used where the C++ extension cannot be built
        monkeypatch.setattr(self_connection, "extension", lambda: None)
    torch.manual_seed(0)
    sc = ScalarAttributeTensorProduct(irreps[0], "3x0e+2x0e", irreps[1]).double()  # 32 channels: C++ fast path
    x = torch.randn(11, sc.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    z = _attributes(kind)
    grad = torch.randn(11, sc.irreps_out.dim, dtype=torch.float64)
    with constant_parameters():
        out = sc(x, z)
        (gx,) = torch.autograd.grad(out, x, grad)
        if sc.irreps_in1.dim < 100:
            assert torch.autograd.gradgradcheck(lambda x: sc(x, z), (x,))  # e.g. a force Hessian
    expected = sc(x, z)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, torch.autograd.grad(expected, x, grad)[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, -12:], torch.zeros(11, 12, dtype=torch.float64))  # 1e: no path


def test_calculator_forces_equal_the_ordinary_forward():
    module = make_module("depthwise")
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    atoms.calc = MolkernCalculator(copy.deepcopy(module))
    expected = energy_forces(module, atoms.calc.batch(atoms), constant=False)
    assert atoms.get_potential_energy() == pytest.approx(float(expected[0][0]), abs=1e-10)
    torch.testing.assert_close(torch.as_tensor(atoms.get_forces()), expected[1], rtol=1e-9, atol=1e-10)


def test_the_setting_is_per_thread():
    seen = []
    with constant_parameters():
        thread = threading.Thread(target=lambda: seen.append(parameters_constant()))
        thread.start()
        thread.join()
        assert parameters_constant()
    assert seen == [False] and not parameters_constant()


def test_self_connection_beyond_the_torch_forms_row_bound():
    """The C++ pass has no row bound: above max_constant_rows the same values and input gradients."""
    torch.manual_seed(0)
    sc = ScalarAttributeTensorProduct("8x0e+8x1o+8x2e", "5x0e", "16x0e+8x1o+4x1e").double()
    rows = sc.max_constant_rows + 5
    x = torch.randn(rows, sc.irreps_in1.dim, dtype=torch.float64, requires_grad=True)
    z = torch.nn.functional.one_hot(torch.arange(rows) % 5, 5).double()
    grad = torch.randn(rows, sc.irreps_out.dim, dtype=torch.float64)
    with constant_parameters():
        out = sc(x, z)
        (gx,) = torch.autograd.grad(out, x, grad)
    expected = sc(x, z)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, torch.autograd.grad(expected, x, grad)[0], rtol=1e-12, atol=1e-12)


def test_self_connection_pass_rejects_a_plan_outside_its_tensors():
    from molkern.nn.fused import extension

    if extension() is None:
        pytest.skip("the C++ extension could not be built")
    sc = ScalarAttributeTensorProduct("8x0e+8x1o", "3x0e", "8x0e+8x1o").double()
    x = torch.randn(4, sc.irreps_in1.dim, dtype=torch.float64)
    z = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    stacked = sc._weights_by_attribute().detach()
    out = extension().attribute_linear(x, z, stacked, sc._plan_tensor, sc.irreps_out.dim, sc.irreps_in1.dim)
    with constant_parameters():
        torch.testing.assert_close(out, sc(x, z), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="plan row"):  # an output narrower than the plan's columns
        extension().attribute_linear(x, z, stacked, sc._plan_tensor, sc.irreps_out.dim - 3, sc.irreps_in1.dim)
