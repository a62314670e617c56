"""The `nequip` package's NequIP GNN (nequip.model.NequIPGNNModel) behind the benchmarks' energy interface.

Built with ``do_derivatives=False``: the model returns total energies and the benchmark takes forces by
autograd, as for every other model. nequip's edge convention is the reverse of PyG's (its edge vector is
pos[edge_index[1]] - pos[edge_index[0]] + shift @ cell), so edges are flipped; periodic shifts are passed in
lattice units. Building the model calls ``nequip.utils.global_state.set_global_state()``, which sets torch's
default dtype to float64: run it in its own process (the suite does).
"""

from typing import Optional

import torch

TYPE_NAMES = ["H", "C", "N", "O", "F"]
Z_TO_TYPE = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}


def unavailable_reason() -> Optional[str]:
    """None if nequip can be imported, else why not."""
    try:
        import nequip  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"nequip not importable ({type(exc).__name__}: {exc}); install with: pip install -e '.[bench]'"
    return None


class NequIPEnergy(torch.nn.Module):
    """NequIP energies for batches with z, pos, batch, edge_index (PyG), optional edge_shift (A) and cell.

    Shapes:
        batch.z (N,), batch.pos (N, 3) A, edge_index (2, E) -> energy (G,)
    """

    def __init__(self, cutoff: float, lmax: int, num_features: int, num_layers: int, avg_num_neighbors: float,
                 parity: bool = False):
        super().__init__()
        from nequip.model import NequIPGNNModel
        from nequip.utils.global_state import set_global_state

        default = torch.get_default_dtype()
        set_global_state()
        torch.set_default_dtype(default)  # our batches keep their own dtype
        self.model = NequIPGNNModel(
            seed=0, model_dtype="float32", type_names=TYPE_NAMES, r_max=cutoff, num_layers=num_layers,
            l_max=lmax, parity=parity, num_features=num_features, avg_num_neighbors=avg_num_neighbors,
            per_type_energy_scales=1.0, per_type_energy_shifts={t: 0.0 for t in TYPE_NAMES}, do_derivatives=False)
        self.register_buffer("type_of_z", torch.full((100,), -1, dtype=torch.long))
        for z, t in Z_TO_TYPE.items():
            self.type_of_z[z] = t

    def forward(self, batch) -> torch.Tensor:
        atom_types = self.type_of_z[batch.z]  # (N,)
        if (atom_types < 0).any():
            raise ValueError(f"nequip model built for {TYPE_NAMES}, got atomic numbers {batch.z.unique().tolist()}")
        num_graphs = int(batch.num_graphs)
        data = {
            "pos": batch.pos, "atom_types": atom_types, "edge_index": batch.edge_index.flip(0), "batch": batch.batch,
            "num_atoms": torch.bincount(batch.batch, minlength=num_graphs),
        }
        shift = getattr(batch, "edge_shift", None)
        if shift is not None and shift.numel() > 0 and bool((shift != 0).any()):
            cell = batch.cell.to(batch.pos.dtype)  # (G, 3, 3) lattice vectors as rows
            graph = batch.batch[batch.edge_index[1]]  # (E,)
            lattice = torch.linalg.solve(cell[graph].transpose(1, 2), shift.to(cell.dtype)[..., None])[..., 0]
            data.update(cell=cell, edge_cell_shift=torch.round(lattice))  # (E, 3) integer shifts
        return self.model(data)["total_energy"][:, 0]  # (G,)
