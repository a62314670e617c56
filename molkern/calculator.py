"""ASE calculator for any trained molkern module with an energy (the TaskModule protocol of molkern.train.checkpoint).

    calc = MolkernCalculator.from_checkpoint("runs/emt_cu/version_0/checkpoints/best.ckpt")
    atoms.calc = calc
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Properties and units (ASE conventions): ``energy`` and ``free_energy`` (the same number) in eV, ``forces``
= -dE/dpos by autograd in eV/A, ``stress`` for cells periodic in all three directions = (1/V) dE/d(strain)
in eV/A^3, Voigt order (xx, yy, zz, yz, xz, xy), positive = tensile (``atoms.get_stress()`` of ASE's EMT has
the same sign).

Graphs (``module.graph_spec["graph"]``):
    * ``"radius"``: all pairs within ``graph_spec["cutoff"]`` (periodic images included) from
      :func:`molkern.data.neighbors.radius_edges`, rebuilt at every call.
    * ``"bonds"`` (e.g. a QM9 U0 model): the covalent bonds are perceived once, from the first structure the
      calculator sees (:func:`molkern.data.featurize.from_atoms`, i.e. :func:`molkern.data.bonds.perceive_bonds`,
      optionally with a SMILES template), and kept fixed while the atoms move (bond breaking and forming are
      not modelled). Periodic structures and a changed atom count, species or order are errors; call
      :meth:`MolkernCalculator.reset_bonds` to perceive them again. A radius graph with
      ``graph_spec["edge_attr"] == "bonds"`` gets the radius edges at every call and the bond one-hot of the
      fixed bonds on them (zeros for non-bonded pairs).

The calculator runs the module in eval mode in its own dtype (``dtype=`` casts it once) and never changes
torch's global state (default dtype, number of threads, grad mode). Eager calls run within
:func:`molkern.nn.constant_parameters` (weights folded into cached dense matrices, so a small molecule's call
issues far fewer PyTorch operations; the caches follow any change of the weights).

``compile=True`` (opt-in; eager is the default) evaluates energy and forces with
:class:`molkern.train.compiled.CompiledEnergyForces`: one compiled graph of the whole energy+forces call, for
any atom and edge count. The first call pays the tracing and compilation (about a minute of CPU for an lmax 2
model); later calls of an 18-atom QM9 molecule take about a third of eager's time. Equal to eager to float32
rounding (tested over MD-like steps with changing edge counts and over molecules of other sizes). The
module's weights are frozen into the graph at that first call: after changing them, call
:meth:`reset_compiled`. Stress requests use the eager path.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Batch

from .data.atoms import one_hot_elements
from .data.neighbors import radius_edges
from .nn.constants import constant_parameters

__all__ = ["MolkernCalculator"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MolkernCalculator(Calculator):
    """ASE calculator: energy, free_energy, forces and (periodic cells) stress of a molkern energy module.

    Args:
        module: an object with ``graph_spec``, ``energy(batch)`` (TaskModule protocol), a torch Module.
            It is moved to ``device`` (and cast to ``dtype``) in place and put in eval mode.
        device: torch device. dtype: "float32" / "float64" / torch dtype, or None to keep the module's.
        smiles: bond-order template for ``"bonds"`` models (None: bond orders from the geometry).
        charge: total charge for bond perception (default: ``atoms.info.get("charge", 0)``).
        compile: energy and forces from a compiled graph (see the module docstring); eager if False (default).
        **kwargs: passed to ase's Calculator (e.g. ``label``).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, module, device: Union[str, torch.device] = "cpu", dtype=None, smiles: Optional[str] = None,
                 charge: Optional[int] = None, compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        for attr in ("graph_spec", "energy"):
            if not hasattr(module, attr):
                raise TypeError(f"{type(module).__name__} does not implement the molkern TaskModule protocol "
                                f"(no {attr!r}); see molkern.train.checkpoint.TaskModule")
        spec = dict(module.graph_spec)
        if spec.get("graph") not in ("radius", "bonds"):
            raise ValueError(f"graph_spec['graph'] must be 'radius' or 'bonds', got {spec.get('graph')!r}")
        if spec["graph"] == "radius" and not (spec.get("cutoff") or 0) > 0:
            raise ValueError(f"a radius-graph module needs a positive graph_spec['cutoff'], got {spec.get('cutoff')!r}")
        if spec.get("edge_attr", "none") not in ("none", "bonds"):
            raise ValueError(f"graph_spec['edge_attr'] must be 'none' or 'bonds', got {spec['edge_attr']!r}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        module.to(self.device)
        params = list(module.parameters())
        if dtype is not None and params and params[0].dtype != dtype:
            module.to(dtype)  # casts float buffers too (float64 energy shifts become float32 with dtype=float32)
        self.module = module.eval()
        params = list(module.parameters())
        self.dtype = params[0].dtype if params else torch.float64
        self.graph_spec = spec
        self.elements = tuple(int(e) for e in spec["elements"])
        self.smiles, self.charge = smiles, charge
        self._bonds = None  # (numbers, bond_index, bond_type) of a bond-conditioned module
        self.compile = bool(compile)
        self._compiled = None  # CompiledEnergyForces of the module, built on the first compiled call
        self._species_cache = None  # (numbers, z, node_attr) of the last structure

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", dtype=None,
                        **kwargs) -> "MolkernCalculator":
        """Calculator of a molkern checkpoint (read with ``torch.load(weights_only=True)``)."""
        from .train.checkpoint import load_module

        return cls(load_module(path, map_location=device), device=device, dtype=dtype, **kwargs)

    def reset_compiled(self) -> None:
        """Forget the compiled graphs (``compile=True``); the next calculation traces and compiles again."""
        if self._compiled is not None:
            self._compiled.reset()

    def reset_bonds(self) -> None:
        """Forget the perceived bond graph; the next calculation perceives it from the current structure."""
        self._bonds = None

    def _bonds_of(self, atoms):
        """(bond_index (2, B), bond_type (B,)) perceived from the first structure, then checked and reused."""
        numbers = np.asarray(atoms.numbers)
        if np.asarray(atoms.pbc).any():
            raise ValueError("a bond-conditioned model cannot evaluate periodic structures "
                             f"(pbc={np.asarray(atoms.pbc).tolist()}); its bonds are perceived for molecules")
        if self._bonds is None:
            from .data.featurize import from_atoms

            charge = self.charge if self.charge is not None else int(atoms.info.get("charge", 0))
            data = from_atoms(atoms, smiles=self.smiles, charge=charge, elements=self.elements, graph="bonds")
            self._bonds = (numbers.copy(), data.edge_index, data.edge_attr.argmax(1))
        elif len(numbers) != len(self._bonds[0]) or (numbers != self._bonds[0]).any():
            before = atoms.__class__(numbers=self._bonds[0]).get_chemical_formula()
            raise ValueError(
                f"the bond graph was perceived for {len(self._bonds[0])} atoms ({before}), now got {len(numbers)} "
                f"atoms ({atoms.get_chemical_formula()}) or another order; call calc.reset_bonds() or use a new "
                "calculator")
        return self._bonds[1], self._bonds[2]

    def _species(self, numbers: np.ndarray):
        """(z (N,) int64, node_attr (N, K) in self.dtype), kept while the atomic numbers do not change."""
        if self._species_cache is None or not np.array_equal(self._species_cache[0], numbers):
            z = torch.as_tensor(numbers, dtype=torch.long)
            self._species_cache = (numbers.copy(), z, one_hot_elements(numbers, self.elements, "atoms").to(self.dtype))
        return self._species_cache[1:]

    def batch(self, atoms) -> Batch:
        """The one-structure PyG Batch the module reads (fields of the TaskModule protocol, in self.dtype)."""
        from .data.graph import molecule_edges

        dtype, device = self.dtype, self.device
        numbers = np.asarray(atoms.numbers)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell[:], dtype=np.float64)
        z, node_attr = self._species(numbers)
        fields = dict(z=z, pos=torch.as_tensor(atoms.positions, dtype=dtype), node_attr=node_attr,
                      cell=torch.as_tensor(cell, dtype=dtype)[None])
        graph, cutoff = self.graph_spec["graph"], self.graph_spec.get("cutoff")
        if graph == "bonds" or self.graph_spec.get("edge_attr", "none") == "bonds":
            bond_index, bond_type = self._bonds_of(atoms)
            edge_index, edge_attr = molecule_edges(fields["pos"].detach(), bond_index, bond_type, graph=graph,
                                                   cutoff=cutoff, edge_attr="bonds")
            fields.update(edge_index=edge_index, edge_attr=edge_attr.to(dtype))
        else:
            edge_index, shifts = radius_edges(atoms.positions, float(cutoff), cell if pbc.any() else None, pbc)
            fields.update(edge_index=edge_index, edge_attr=torch.zeros(edge_index.shape[1], 0, dtype=dtype),
                          edge_shift=shifts.to(dtype))
        n = len(numbers)  # one graph: what Batch.from_data_list([Data(**fields)]) gives, without its collation
        batch = Batch(**fields, batch=torch.zeros(n, dtype=torch.long), ptr=torch.tensor([0, n]))
        batch._num_graphs = 1
        return batch if device.type == "cpu" else batch.to(device)

    def calculate(self, atoms=None, properties: Sequence[str] = ("energy",), system_changes=all_changes):
        from .train.energy import energy_forces_stress

        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        want_stress = "stress" in properties
        if want_stress and not np.asarray(atoms.pbc).all():
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        batch = self.batch(atoms)
        if self.compile and not want_stress:
            if self._compiled is None:
                from .train.compiled import CompiledEnergyForces

                self._compiled = CompiledEnergyForces(self.module)
            energy, forces = self._compiled(batch)
            out = {"energy": energy, "forces": forces}
        else:
            with torch.inference_mode(False), torch.enable_grad(), constant_parameters():
                out = energy_forces_stress(self.module, batch, forces=True, stress=want_stress)
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().to(torch.float64).numpy(),
        }
        if want_stress:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"][0].detach().cpu().double().numpy())
