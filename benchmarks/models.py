"""The benchmarked models behind one interface: ``Model.energy(batch) -> (G,)``, differentiable w.r.t. batch.pos.

Every model reads the same PyG batch (``z``, ``pos`` A, ``node_attr`` one-hot over H, C, N, O, F, ``batch``,
``edge_index`` of the 5 A radius graph with PyG's convention, optional ``edge_shift`` (E, 3) A and ``cell``
(G, 3, 3) for periodic boxes). Neighbour lists are built outside the models (vesin), for every model alike.

Rows: molkern's MolkernNet (factorised / full implicit kernel and the standard radial x SH kernel, lmax 1
and 2; 32 channels, 3 blocks) through EnergyModule; PyG 2.8.1 SchNet and DimeNet++ (qm9_throughput's
adapters); PaiNN from the ``schnetpack`` package and our compact re-implementation (benchmarks.peers.painn,
checked against schnetpack's in the tests); NequIP from the ``nequip`` package.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import qm9_throughput as qt

CUTOFF = qt.CUTOFF  # Angstrom, every model
ELEMENTS = (1, 6, 7, 8, 9)  # node_attr one-hot columns
MOLKERN = qt.MOLKERN  # num_channels 32, num_layers 3, kernel_mlp_width 8
PAINN = {"num_features": 128, "num_interactions": 3, "num_rbf": 20, "cutoff": CUTOFF}
NEQUIP = {"num_features": 32, "num_layers": 4, "parity": False}  # nequip's defaults but parity off (= molkern's)


def model_specs() -> dict:
    """name -> spec; the order is the table order."""
    specs = {}
    for kernel in ("depthwise", "factorised", "full", "standard"):
        for lmax in (1, 2):
            specs[f"molkern-{kernel}-l{lmax}"] = {"family": "molkern", "kernel": kernel, "lmax": lmax}
    specs["schnet"] = {"family": "schnet"}
    specs["dimenet++"] = {"family": "dimenet++"}
    specs["painn"] = {"family": "painn"}  # schnetpack's
    specs["painn-reimpl"] = {"family": "painn-reimpl", "reimplementation": True}
    for lmax in (1, 2):
        specs[f"nequip-l{lmax}"] = {"family": "nequip", "lmax": lmax}
    return specs


def unavailable_reason(name: str) -> Optional[str]:
    """None if the model can be built here, else why not (the suite records it and skips the model)."""
    family = model_specs()[name]["family"]
    if family == "nequip":
        from .peers.nequip_adapter import unavailable_reason as nequip_reason

        return nequip_reason()
    if family == "painn":
        from .peers.schnetpack_adapter import unavailable_reason as schnetpack_reason

        return schnetpack_reason()
    return None


@dataclass
class Model:
    name: str
    module: torch.nn.Module
    energy: Callable  # batch -> (G,) energies (arbitrary units; random weights)
    description: str

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build(name: str, avg_num_neighbors: float) -> Model:
    """Model ``name`` with seed-0 weights; ``avg_num_neighbors``: mean in-degree used by the normalising models."""
    spec = model_specs()[name]
    torch.manual_seed(0)
    family = spec["family"]
    if family == "molkern":
        from molkern.train import EnergyModule

        config = {**MOLKERN, "kernel": spec["kernel"], "lmax": spec["lmax"], "cutoff": CUTOFF,
                  "avg_num_neighbors": avg_num_neighbors}
        module = EnergyModule(elements=ELEMENTS, model=config, data_init=False)
        desc = f"MolkernNet {spec['kernel']} kernel, lmax {spec['lmax']}, " + ", ".join(
            f"{k}={v}" for k, v in MOLKERN.items())
        return Model(name, module, module.energy, desc)
    if family in ("schnet", "dimenet++"):
        SchNetGivenEdges, DimeNetPlusPlusGivenEdges = qt.make_pyg_models()
        cls, kw = (SchNetGivenEdges, qt.SCHNET) if family == "schnet" else (DimeNetPlusPlusGivenEdges, qt.DIMENET)
        module = cls(**kw)
        desc = f"PyG {cls.__mro__[1].__name__}, " + ", ".join(f"{k}={v}" for k, v in kw.items())

        def energy(batch):
            return module(batch.z, batch.pos, batch.batch, batch.edge_index, getattr(batch, "edge_shift", None))[:, 0]

        return Model(name, module, energy, desc)
    if family == "painn":
        import schnetpack

        from .peers.schnetpack_adapter import SchNetPackPaiNN

        module = SchNetPackPaiNN(**PAINN)
        desc = f"schnetpack {schnetpack.__version__} PaiNN + Atomwise readout, " + ", ".join(
            f"{k}={v}" for k, v in PAINN.items())
        return Model(name, module, module, desc)
    if family == "painn-reimpl":
        from .peers.painn import PaiNN

        module = PaiNN(**PAINN)
        desc = "PaiNN re-implementation (benchmarks/peers/painn.py, not schnetpack), " + ", ".join(
            f"{k}={v}" for k, v in PAINN.items())

        def energy(batch):
            return module(batch.z, batch.pos, batch.batch, batch.edge_index, getattr(batch, "edge_shift", None),
                          batch.num_graphs)

        return Model(name, module, energy, desc)
    if family == "nequip":
        import nequip

        from .peers.nequip_adapter import NequIPEnergy

        module = NequIPEnergy(CUTOFF, spec["lmax"], avg_num_neighbors=avg_num_neighbors, **NEQUIP)
        desc = f"nequip {nequip.__version__} NequIPGNNModel, l_max {spec['lmax']}, " + ", ".join(
            f"{k}={v}" for k, v in NEQUIP.items())
        return Model(name, module, module, desc)
    raise ValueError(f"unknown model family {family!r}")
