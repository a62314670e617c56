"""MolkernCalculator: forces and stress are the derivatives of the energy, symmetry, ASE conventions, MD, state."""

import copy

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import thermalize_momenta
from ase.stress import voigt_6_to_full_3x3_stress
from torch import nn

from molkern.calculator import MolkernCalculator
from molkern.data.atoms import element_numbers
from molkern.nn.scatter import scatter_sum
from molkern.train.energy import EnergyModule

ELEMENTS = ["H", "C", "O", "Cu"]
MODEL = dict(cutoff=4.0, num_channels=8, lmax=1, num_layers=2, num_radial=6, kernel_mlp_width=4,
             avg_num_neighbors=10.0)


def make_module(seed=0):
    torch.manual_seed(seed)
    module = EnergyModule(ELEMENTS, model=MODEL)
    module.species_energy.copy_(torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=torch.float64))
    return module


@pytest.fixture(scope="module")
def module32():
    return make_module()


@pytest.fixture(scope="module")
def calc64(module32):
    return MolkernCalculator(copy.deepcopy(module32), dtype="float64")


def ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def copper(seed=0, repeat=(1, 1, 1)):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * repeat  # 4 atoms per cell, many periodic images at 4 A
    atoms.rattle(0.08, seed=seed)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.02 * np.random.default_rng(seed).standard_normal((3, 3))),
                   scale_atoms=True)
    return atoms


def energy_of(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def forces_of(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_forces()


def numerical_forces(calc, atoms, h=1e-4, atoms_idx=None):
    """Central differences of the energy for the atoms in atoms_idx (all by default); other rows stay 0."""
    out = np.zeros((len(atoms), 3))
    for i in range(len(atoms)) if atoms_idx is None else atoms_idx:
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            out[i, k] = -(energy_of(calc, plus) - energy_of(calc, minus)) / (2 * h)
    return out


def numerical_stress(calc, atoms, h=1e-5):
    """(1/V) dE/d(eps) by central differences of a symmetric strain, as a 3x3 matrix."""
    volume = atoms.get_volume()
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            energies = []
            for sign in (1, -1):
                eps = np.zeros((3, 3))
                eps[i, j] += sign * h / 2
                eps[j, i] += sign * h / 2
                strained = atoms.copy()
                strained.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
                energies.append(energy_of(calc, strained))
            out[i, j] = out[j, i] = (energies[0] - energies[1]) / (2 * h * volume)
    return out


def random_rotation(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ------------------------------------------------------------------------------------------- derivatives


def test_forces_match_finite_differences_molecule(calc64):
    atoms = ethanol()
    f = forces_of(calc64, atoms)
    assert np.abs(f).max() > 1e-5, "test set-up: forces should not vanish (atol below is 1e-6)"
    idx = [2, 5]  # O and H
    np.testing.assert_allclose(f[idx], numerical_forces(calc64, atoms, atoms_idx=idx)[idx], atol=1e-6, rtol=1e-5)


def test_forces_match_finite_differences_periodic(calc64):
    atoms = copper()
    np.testing.assert_allclose(forces_of(calc64, atoms), numerical_forces(calc64, atoms), atol=1e-6, rtol=1e-5)


def test_stress_matches_finite_differences(calc64):
    atoms = copper(seed=1)
    atoms.calc = calc64
    stress = voigt_6_to_full_3x3_stress(atoms.get_stress())
    assert np.abs(stress).max() > 1e-6, "test set-up: stress should not vanish (atol below is 1e-8)"
    np.testing.assert_allclose(stress, numerical_stress(calc64, atoms), atol=1e-8, rtol=1e-5)
    assert atoms.get_stress(voigt=False).shape == (3, 3)


def test_stress_needs_full_periodicity(calc64):
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms = ethanol()
    atoms.calc = calc64
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


# -------------------------------------------------------------------------------- ASE conventions (exact)


class PairLJ(nn.Module):
    """Truncated-and-shifted Lennard-Jones implementing the TaskModule protocol (same as ASE's, smooth=False)."""

    def __init__(self, sigma=1.0, epsilon=1.0, rc=3.0):
        super().__init__()
        self.sigma, self.epsilon, self.rc = sigma, epsilon, rc
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.graph_spec = {"graph": "radius", "cutoff": rc, "elements": (18,)}

    def phi(self, r):
        return 4 * self.epsilon * ((self.sigma / r) ** 12 - (self.sigma / r) ** 6)

    def energy(self, batch):
        vec = batch.pos[batch.edge_index[0]] - batch.pos[batch.edge_index[1]] + batch.edge_shift  # (E, 3)
        e = 0.5 * (self.phi(vec.norm(dim=1)) - self.phi(torch.tensor(self.rc, dtype=vec.dtype)))  # (E,)
        return scatter_sum(e, batch.batch[batch.edge_index[1]], batch.num_graphs) + 0 * self.dummy


def test_any_protocol_module_matches_ase_lennard_jones():
    atoms = bulk("Ar", "fcc", a=1.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=3)
    atoms.set_cell(atoms.cell[:] @ np.diag([1.0, 1.03, 0.98]), scale_atoms=True)
    ref = atoms.copy()
    ref.calc = LennardJones(sigma=1.0, epsilon=1.0, rc=3.0, smooth=False)
    atoms.calc = MolkernCalculator(PairLJ())
    np.testing.assert_allclose(atoms.get_potential_energy(), ref.get_potential_energy(), rtol=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-9)
    np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), atol=1e-9)
    assert atoms.get_potential_energy() == atoms.calc.results["free_energy"]


# ----------------------------------------------------------------------------------------------- symmetry


def test_rotation_rotates_forces(calc64):
    atoms = ethanol(seed=2)
    R = random_rotation(0)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ R.T
    np.testing.assert_allclose(energy_of(calc64, rotated), energy_of(calc64, atoms), atol=1e-10)
    np.testing.assert_allclose(forces_of(calc64, rotated), forces_of(calc64, atoms) @ R.T, atol=1e-9)


def test_rotation_of_a_periodic_cell_rotates_forces_and_stress(calc64):
    atoms = copper(seed=2)
    R = random_rotation(1)
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell[:] @ R.T, scale_atoms=True)
    a, b = atoms.copy(), rotated
    a.calc, b.calc = calc64, calc64
    np.testing.assert_allclose(b.get_potential_energy(), a.get_potential_energy(), atol=1e-10)
    np.testing.assert_allclose(b.get_forces(), a.get_forces() @ R.T, atol=1e-9)
    np.testing.assert_allclose(b.get_stress(voigt=False), R @ a.get_stress(voigt=False) @ R.T, atol=1e-9)


def test_energy_invariant_to_translation_and_permutation(calc64):
    atoms = ethanol(seed=3)
    e, f = energy_of(calc64, atoms), forces_of(calc64, atoms)
    moved = atoms.copy()
    moved.translate([1.3, -2.0, 0.7])
    np.testing.assert_allclose(energy_of(calc64, moved), e, atol=1e-10)
    perm = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[perm]
    np.testing.assert_allclose(energy_of(calc64, permuted), e, atol=1e-10)
    np.testing.assert_allclose(forces_of(calc64, permuted), f[perm], atol=1e-10)
    cell = copper(seed=4)
    shifted = cell.copy()
    shifted.translate([0.9, 0.4, -1.7])  # atoms leave the cell: periodic images take their place
    np.testing.assert_allclose(energy_of(calc64, shifted), energy_of(calc64, cell), atol=1e-10)


def test_periodic_and_free_molecule_agree(calc64):
    atoms = ethanol(seed=4)
    boxed = atoms.copy()
    boxed.set_cell([20.0, 21.0, 22.0])
    boxed.pbc = True
    boxed.center()
    free = boxed.copy()
    free.pbc = False
    np.testing.assert_allclose(energy_of(calc64, boxed), energy_of(calc64, free), atol=1e-10)
    np.testing.assert_allclose(forces_of(calc64, boxed), forces_of(calc64, free), atol=1e-10)
    boxed.calc = calc64
    assert np.abs(boxed.get_stress()).max() < 1e-3  # only the tiny 1/V of an isolated molecule's virial


@pytest.mark.parametrize("kernel,trunk", [("depthwise", "invariant"), ("factorised", "gated"), ("full", "gated"),
                                          ("standard", "invariant")])
def test_atoms_without_neighbours_are_additive(kernel, trunk):
    """No pair within the cutoff (zero edges, every kernel batch-normalised): E = sum of the lone atoms', F = 0."""
    from ase import Atoms

    torch.manual_seed(0)
    module = EnergyModule(ELEMENTS, model={**MODEL, "lmax": 2, "kernel": kernel, "kernel_trunk": trunk})
    calc = MolkernCalculator(module, dtype="float64")
    pair = Atoms("HO", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 9.0]])  # 9 A apart, cutoff 4 A
    lone = [energy_of(calc, Atoms(s, positions=[[0.0, 0.0, 0.0]])) for s in "HO"]
    np.testing.assert_allclose(energy_of(calc, pair), sum(lone), atol=1e-10)
    np.testing.assert_array_equal(forces_of(calc, pair), 0.0)


def test_unknown_element_is_an_error(calc64):
    with pytest.raises(ValueError, match="N"):
        energy_of(calc64, molecule("NH3"))


# ---------------------------------------------------------------------------------------------------- MD


def test_nve_md_conserves_energy():
    torch.manual_seed(1)
    small = EnergyModule(["Cu"], model=dict(cutoff=4.0, num_channels=4, lmax=1, num_layers=1, num_radial=4,
                                            kernel_mlp_width=4, avg_num_neighbors=10.0))
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=5)
    atoms.calc = MolkernCalculator(small, dtype="float64")
    small.energy_scale.mul_(0.5 / np.sqrt((atoms.get_forces() ** 2).mean()))  # forces of 0.5 eV/A rms, as EMT Cu
    atoms.calc.reset()  # drop the results cached before the rescaling
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    totals, kinetic = [], []
    dyn.attach(lambda: (totals.append(atoms.get_total_energy()), kinetic.append(atoms.get_kinetic_energy())))
    dyn.run(200)
    totals, kinetic = np.array(totals), np.array(kinetic)
    assert kinetic.std() > 0.1 * kinetic.mean(), "test set-up: kinetic and potential energy should exchange"
    drift = np.abs(totals - totals[0]).max()
    print(f"NVE: max |E_tot - E_tot(0)| = {drift:.2e} eV, mean kinetic {kinetic.mean():.3f} eV, "
          f"kinetic std {kinetic.std():.3f} eV")
    assert drift < 0.01 * kinetic.mean(), (drift, kinetic.mean())


# -------------------------------------------------------------------------------------- state and graphs


def test_calculator_leaves_torch_global_state_alone(module32):
    dtype, threads, grad = torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()
    try:
        for default, want in ((torch.float32, "float64"), (torch.float64, "float32")):
            torch.set_default_dtype(default)
            calc = MolkernCalculator(copy.deepcopy(module32), dtype=want)
            atoms = copper()
            atoms.calc = calc
            with torch.no_grad():  # the calculator needs autograd but must not change the caller's grad mode
                atoms.get_forces()
                atoms.get_stress()
                assert not torch.is_grad_enabled()
            assert calc.results["forces"].dtype == np.float64
            assert calc.dtype == getattr(torch, want)
            assert torch.get_default_dtype() == default
            assert torch.get_num_threads() == threads
    finally:
        torch.set_default_dtype(dtype)
    assert torch.is_grad_enabled() == grad


def test_float32_and_float64_agree(module32, calc64):
    atoms = ethanol(seed=6)
    e32, e64 = energy_of(MolkernCalculator(copy.deepcopy(module32)), atoms), energy_of(calc64, atoms)
    assert abs(e32 - e64) < 1e-4 * max(1.0, abs(e64))


class BondSprings(nn.Module):
    """Harmonic springs on the bond graph (TaskModule protocol, graph="bonds"), r0 by bond type."""

    def __init__(self, graph="bonds", cutoff=None):
        super().__init__()
        self.r0 = nn.Parameter(torch.tensor([1.2, 1.1, 1.0], dtype=torch.float64))
        self.graph_spec = {"graph": graph, "cutoff": cutoff, "elements": element_numbers(["H", "C", "N", "O", "F"]),
                           "edge_attr": "bonds"}

    def energy(self, batch):
        vec = batch.pos[batch.edge_index[0]] - batch.pos[batch.edge_index[1]]  # (E, 3)
        r0 = batch.edge_attr @ self.r0  # (E,)
        bonded = batch.edge_attr.sum(1)  # (E,) 0 for non-bonded pairs of a radius graph
        e = 0.5 * bonded * (vec.norm(dim=1) - r0) ** 2  # (E,) double-counted bonds -> factor 1/2
        return scatter_sum(e, batch.batch[batch.edge_index[1]], batch.num_graphs)


def test_bond_graph_is_perceived_once_and_kept():
    calc = MolkernCalculator(BondSprings())
    atoms = ethanol(seed=7)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    num_bonds = calc._bonds[1].shape[1] // 2
    assert num_bonds == 8  # C2H5OH: 8 bonds
    idx = [0, 1, 2]
    np.testing.assert_allclose(atoms.get_forces()[idx], numerical_forces(calc, atoms, atoms_idx=idx)[idx], atol=1e-6)
    stretched = atoms.copy()
    stretched.positions[0] += [0.0, 0.0, 1.5]  # far enough that perception would break the bond
    stretched.calc = calc
    assert stretched.get_potential_energy() > e0 + 0.5  # the bond is kept and stretched
    assert calc._bonds[1].shape[1] // 2 == num_bonds
    with pytest.raises(ValueError, match="reset_bonds"):
        energy_of(calc, molecule("CH3OH"))
    periodic = atoms.copy()
    periodic.set_cell([10.0, 10.0, 10.0])
    periodic.pbc = True
    with pytest.raises(ValueError, match="periodic"):
        energy_of(calc, periodic)
    calc.reset_bonds()
    assert np.isfinite(energy_of(calc, molecule("CH3OH")))


def test_radius_graph_with_fixed_bond_attributes():
    atoms = ethanol(seed=8)
    bonds_only = energy_of(MolkernCalculator(BondSprings()), atoms)
    calc = MolkernCalculator(BondSprings(graph="radius", cutoff=3.0))
    assert energy_of(calc, atoms) == pytest.approx(bonds_only, rel=1e-10)  # non-bonded pairs carry zero attributes
    assert calc.batch(atoms).edge_index.shape[1] > 2 * 8


def test_not_a_protocol_module_is_rejected():
    with pytest.raises(TypeError, match="protocol"):
        MolkernCalculator(nn.Linear(2, 2))
