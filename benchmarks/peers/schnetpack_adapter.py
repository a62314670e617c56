"""The `schnetpack` package's PaiNN (schnetpack.representation.PaiNN + an Atomwise energy readout) behind the
benchmarks' energy interface.

Settings of the PaiNN paper (Schuett et al. 2021) for QM9: 128 features, 3 interactions, 20 sine radial
functions (BesselRBF) with a cosine cutoff at 5 A, a 2-layer atom-wise readout summed per structure.
schnetpack's pair vectors are R[idx_j] - R[idx_i] + offset: idx_j = PyG's edge_index[0], idx_i = edge_index[1].

Not installable beside this stack (checked with pip, torch 2.13.0, sympy 1.14.0): schnetpack 2.1.1 requires
sympy <= 1.12, and 2.0.3 installs but fails to import (it imports the private name
``torch.utils.data.dataloader.T_co``, removed in torch 2.13). The suite then skips the "painn" row with that
error and runs "painn-reimpl" (benchmarks.peers.painn), which tests/test_benchmarks.py checks against this
module's model, weight for weight, wherever schnetpack is importable.
"""

from typing import Optional

import torch


def unavailable_reason() -> Optional[str]:
    """None if schnetpack can be imported, else why not."""
    try:
        import schnetpack  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return (f"schnetpack not importable ({type(exc).__name__}: {exc}); not in the bench group: 2.1.1 needs "
                "sympy<=1.12, 2.0.3 fails to import on torch 2.13; painn-reimpl is the checked re-implementation")
    return None


class SchNetPackPaiNN(torch.nn.Module):
    """schnetpack PaiNN energies for batches with z, pos, batch, edge_index (PyG), optional edge_shift (A).

    Shapes:
        batch.z (N,), batch.pos (N, 3) A, edge_index (2, E) -> energy (G,)
    """

    def __init__(self, num_features: int = 128, num_interactions: int = 3, num_rbf: int = 20, cutoff: float = 5.0):
        super().__init__()
        import schnetpack as spk

        self.representation = spk.representation.PaiNN(
            n_atom_basis=num_features, n_interactions=num_interactions,
            radial_basis=spk.nn.BesselRBF(n_rbf=num_rbf, cutoff=cutoff), cutoff_fn=spk.nn.CosineCutoff(cutoff))
        self.readout = spk.atomistic.Atomwise(n_in=num_features, n_layers=2, aggregation_mode="sum",
                                              output_key="energy")

    def forward(self, batch) -> torch.Tensor:
        from schnetpack import properties

        src, dst = batch.edge_index  # j, i
        r_ij = torch.index_select(batch.pos, 0, src) - torch.index_select(batch.pos, 0, dst)  # (E, 3)
        shift = getattr(batch, "edge_shift", None)
        if shift is not None:
            r_ij = r_ij + shift.to(r_ij.dtype)
        inputs = {properties.Z: batch.z, properties.Rij: r_ij, properties.idx_i: dst, properties.idx_j: src,
                  properties.idx_m: batch.batch, properties.n_atoms: torch.bincount(batch.batch)}
        return self.readout(self.representation(inputs))["energy"]  # (G,)
