"""Radius neighbour lists (vesin), periodic or not: the one place edges of a radius graph are built.

Convention (PyG, see design.md): ``edge_index[0]`` = source j, ``edge_index[1]`` = target i and the edge
vector is ``pos[j] - pos[i] + shift``, where ``shift = S @ cell`` (Angstrom) is the lattice translation
of the periodic image of j. Edges come sorted by target, then source (receiver-sorted scatters are faster).
"""

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["radius_edges"]


def radius_edges(
    pos,
    cutoff: float,
    cell=None,
    pbc: Union[bool, Sequence[bool]] = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (j, i), j != i or a periodic image of i, with |pos[j] - pos[i] + shift| < cutoff.

    Args:
        pos: positions in Angstrom (array or tensor).
        cutoff: radius in Angstrom (> 0).
        cell: (3, 3) lattice vectors as rows in Angstrom; needed when any direction is periodic.
        pbc: periodicity, one bool or one per lattice vector.

    Returns:
        edge_index (2, E) int64 [source, target] and shifts (E, 3) float64 Angstrom.

    Shapes:
        pos: (N, 3) -> edge_index: (2, E), shifts: (E, 3)
    """
    import vesin

    points = np.ascontiguousarray(torch.as_tensor(pos).detach().cpu().numpy(), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"pos must have shape (N, 3), got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("pos contains non-finite coordinates")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    periodic = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    box = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if periodic.any() and abs(np.linalg.det(box)) < 1e-12:
        raise ValueError(f"periodic boundaries {periodic.tolist()} need a cell with non-zero volume, got {box.tolist()}")
    if len(points) == 0:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64)
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, S = nl.compute(points=points, box=box, periodic=periodic.tolist(), quantities="ijS")
    i, j = i.astype(np.int64), j.astype(np.int64)
    order = np.lexsort((j, i))  # by target i, then source j
    edge_index = torch.from_numpy(np.stack([j[order], i[order]]))
    shifts = torch.from_numpy(S[order].astype(np.float64) @ box)
    return edge_index, shifts
