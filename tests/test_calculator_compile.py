"""MolkernCalculator(compile=True) gives eager's energies and forces over an MD-like sequence of structures."""

import copy

import numpy as np
import pytest
import torch
from ase.build import molecule

from molkern.calculator import MolkernCalculator
from molkern.train.energy import EnergyModule

ELEMENTS = ["H", "C", "O"]
MODEL = dict(cutoff=4.0, num_channels=8, lmax=1, num_layers=1, num_radial=6, kernel_mlp_width=4,
             avg_num_neighbors=10.0)


@pytest.mark.slow  # one Inductor compilation (~20 s of CPU for this one-block model), then 305 calls
def test_compiled_equals_eager_over_md_like_steps():
    torch.manual_seed(0)
    module = EnergyModule(ELEMENTS, model=MODEL)
    module.species_energy.copy_(torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64))
    eager = MolkernCalculator(copy.deepcopy(module), dtype="float32")
    compiled = MolkernCalculator(copy.deepcopy(module), dtype="float32", compile=True)
    atoms = molecule("CH3CH2OH")
    rng = np.random.default_rng(0)
    edges, d_energy, d_forces, force_scale = set(), 0.0, 0.0, 0.0
    for _ in range(300):  # a random walk of the positions: the edge count changes as in MD
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = eager, compiled
        f_eager, f_compiled = a.get_forces(), b.get_forces()
        d_energy = max(d_energy, abs(a.get_potential_energy() - b.get_potential_energy()))
        d_forces = max(d_forces, float(np.abs(f_eager - f_compiled).max()))
        force_scale = max(force_scale, float(np.abs(f_eager).max()))
        edges.add(int(eager.batch(atoms).edge_index.shape[1]))
    assert len(edges) > 3, edges  # the compiled graph ran on several edge counts without recompiling per count
    assert len(compiled._compiled.graphs) == 1
    assert d_energy < 1e-4, d_energy
    assert d_forces < 1e-5 + 1e-4 * force_scale, (d_forces, force_scale)
    assert "stress" not in compiled.results
    for name in ("CH4", "C6H6", "CH3COOH", "H2O", "H"):  # other atom counts (a lone atom: no edges), same graph
        a, b = molecule(name), molecule(name)
        a.calc, b.calc = eager, compiled
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-4, name
        assert np.abs(a.get_forces() - b.get_forces()).max() < 1e-5 + 1e-4 * np.abs(a.get_forces()).max(), name
    assert len(compiled._compiled.graphs) == 1


def test_compile_is_opt_in():
    torch.manual_seed(0)
    calc = MolkernCalculator(EnergyModule(ELEMENTS, model=MODEL))
    assert calc.compile is False


@pytest.mark.slow  # three Inductor compilations of the one-block model
def test_compiled_energy_forces_graph_per_batch_kind_and_size():
    """CompiledEnergyForces keeps separate graphs for one structure and for batches (a graph traced on one
    structure has that size fixed at 1), and for small batches (torch form of the convolution sums) and large
    ones (the fused C++ sums in the graph): each equals eager."""
    from torch_geometric.data import Batch, Data

    from molkern.train.compiled import CompiledEnergyForces
    from molkern.train.energy import energy_forces_stress

    torch.manual_seed(0)
    module = EnergyModule(ELEMENTS, model=MODEL).eval()
    calc = MolkernCalculator(module, dtype="float32")
    one = calc.batch(molecule("CH3CH2OH"))  # 72 edges: small
    big_one = calc.batch(molecule("C6H6"))  # 132 edges: large
    fields = lambda b: {k: b[k] for k in b.keys() if k not in ("batch", "ptr")}  # noqa: E731
    several = Batch.from_data_list([Data(**fields(calc.batch(molecule(n)))) for n in ("CH3CH2OH", "CH4", "CH3OH")])
    fast = CompiledEnergyForces(module, small_edges=100)
    for batch in (one, several, big_one, one):
        energy, forces = fast(batch)
        with torch.enable_grad():
            ref = energy_forces_stress(module, batch, forces=True)
        torch.testing.assert_close(energy, ref["energy"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forces, ref["forces"], rtol=1e-4, atol=1e-6)
    assert sorted(key[-2:] for key in fast.graphs) == [(False, False), (False, True), (True, True)]
