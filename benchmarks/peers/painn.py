"""PaiNN (Schuett, Unke, Gastegger, ICML 2021), a compact pure-torch RE-IMPLEMENTATION for benchmarks only.

Not the authors' code (schnetpack) and not a drop-in for it: written here from the paper (sections 3-4, Fig. 2)
because schnetpack is not a dependency of this project. It follows the paper's architecture and QM9 settings:
F = 128 features, 3 interaction blocks (message + update, each with its own filter), 20 radial basis functions
sin(n pi r / r_c) / r with a cosine cutoff at r_c = 5 A, vector features initialised to zero, and a 2-layer
atom-wise readout summed over atoms. Edges follow PyG (edge_index[0] = source j, edge_index[1] = target i,
r_ij = pos[j] - pos[i] + shift). With schnetpack 2.0.3's weights copied in (blocks reordered), it gives the same
energies and forces as schnetpack's PaiNN + Atomwise (tests/test_benchmarks.py); it uses index_select / index_add
where schnetpack uses fancy indexing, so it is, if anything, a faster peer than the original.
"""

import math
from typing import Optional

import torch
from torch import nn


class PaiNN(nn.Module):
    """Energy model E = sum_i MLP(s_i) of equivariant scalar (s) and vector (v) atom features.

    Args:
        num_features: F. num_interactions: message + update blocks. num_rbf: radial basis size.
        cutoff: Angstrom. max_z: largest atomic number embedded.

    Shapes:
        z (N,), pos (N, 3) A, batch (N,), edge_index (2, E), edge_shift (E, 3) A -> energy (G,)
    """

    def __init__(self, num_features: int = 128, num_interactions: int = 3, num_rbf: int = 20,
                 cutoff: float = 5.0, max_z: int = 100):
        super().__init__()
        self.num_features, self.num_rbf, self.cutoff = num_features, num_rbf, float(cutoff)
        F = num_features
        self.embedding = nn.Embedding(max_z + 1, F)
        self.filters = nn.ModuleList(nn.Linear(num_rbf, 3 * F) for _ in range(num_interactions))
        self.phi = nn.ModuleList(
            nn.Sequential(nn.Linear(F, F), nn.SiLU(), nn.Linear(F, 3 * F)) for _ in range(num_interactions))
        self.mix_uv = nn.ModuleList(nn.Linear(F, 2 * F, bias=False) for _ in range(num_interactions))  # U and V
        self.update = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * F, F), nn.SiLU(), nn.Linear(F, 3 * F)) for _ in range(num_interactions))
        self.readout = nn.Sequential(nn.Linear(F, F // 2), nn.SiLU(), nn.Linear(F // 2, 1))
        self.register_buffer("freqs", torch.arange(1, num_rbf + 1) * math.pi / self.cutoff)

    def forward(self, z: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, edge_index: torch.Tensor,
                edge_shift: Optional[torch.Tensor] = None, num_graphs: Optional[int] = None) -> torch.Tensor:
        src, dst = edge_index  # j, i
        vec = torch.index_select(pos, 0, src) - torch.index_select(pos, 0, dst)  # (E, 3) r_ij
        if edge_shift is not None:
            vec = vec + edge_shift.to(vec.dtype)
        dist = vec.norm(dim=-1, keepdim=True)  # (E, 1)
        unit = vec / dist  # (E, 3)
        fcut = 0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1.0) * (dist < self.cutoff)  # (E, 1)
        rbf = torch.sin(dist * self.freqs) / dist  # (E, num_rbf)
        F, N = self.num_features, pos.shape[0]
        s = self.embedding(z)  # (N, F)
        v = s.new_zeros(N, 3, F)  # (N, 3, F)
        for filt, phi, mix_uv, update in zip(self.filters, self.phi, self.mix_uv, self.update):
            # message (paper eq. 7-8): ds_i = sum_j phi_s(s_j) W_s(r_ij)
            #                          dv_i = sum_j v_j phi_vv(s_j) W_vv(r_ij) + phi_vs(s_j) W_vs(r_ij) r_ij / |r_ij|
            x = torch.index_select(phi(s), 0, src) * (filt(rbf) * fcut)  # (E, 3F)
            x_vv, x_s, x_vs = torch.split(x, F, dim=-1)  # (E, F) each
            dv = torch.index_select(v, 0, src) * x_vv[:, None, :] + x_vs[:, None, :] * unit[:, :, None]  # (E, 3, F)
            s = s.index_add(0, dst, x_s)
            v = v.index_add(0, dst, dv)
            # update (paper eq. 9-11)
            uv, vv = torch.split(mix_uv(v), F, dim=-1)  # (N, 3, F) each
            a = update(torch.cat([s, torch.sqrt(vv.pow(2).sum(1) + 1e-8)], dim=-1))  # (N, 3F)
            a_vv, a_sv, a_ss = torch.split(a, F, dim=-1)
            v = v + a_vv[:, None, :] * uv
            s = s + a_sv * (uv * vv).sum(1) + a_ss
        atom_energy = self.readout(s)[:, 0]  # (N,)
        G = int(batch.max()) + 1 if num_graphs is None else num_graphs
        return atom_energy.new_zeros(G).index_add(0, batch, atom_energy)  # (G,)
