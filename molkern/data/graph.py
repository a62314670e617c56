"""Molecular graphs: atoms + perceived bonds -> the PyG ``Data`` every molecular model sees.

The one place where a molecule's bonds become edges; used by the QM9 loader (:meth:`molkern.data.QM9.get`)
and by the featurizer of new molecules (:mod:`molkern.data.featurize`), so a model trained on QM9 gets the
same kind of graph from a SMILES string, an sdf/xyz file or an ``ase.Atoms``.

Inputs are the encodings of :mod:`molkern.data.bonds`: ``bond_index`` (2, B) with both directions of every
bond and ``bond_type`` (B,) indices into ``BOND_TYPES = (single, double, triple)`` (kekulized).

Graphs (``graph=``):
    * ``"bonds"``: the covalent bonds in both directions; ``edge_attr`` = bond-type one-hot (E, 3).
    * ``"radius"``: every ordered pair of distinct atoms closer than ``cutoff`` Angstrom
      (:func:`molkern.data.neighbors.radius_edges`); with ``edge_attr="bonds"`` the bond one-hot for bonded
      pairs and all zeros for the others (E, 3), with ``edge_attr="none"`` no columns (E, 0). Bonded pairs
      farther apart than the cutoff are not added.

Edge order (both graphs): PyG convention ``edge_index[0]`` = source j, ``edge_index[1]`` = target i, sorted
by source, then target (``src * N + dst``), as PyG's QM9 does; for the same molecule a radius graph whose
cutoff keeps exactly the bonds equals the bond graph.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch_geometric.data import Data

from .bonds import ATOMIC_NUMBERS, BOND_TYPES

__all__ = ["EDGE_ATTRS", "GRAPHS", "atom_one_hot", "check_graph_options", "molecule_edges", "molecule_graph"]

GRAPHS: Tuple[str, ...] = ("bonds", "radius")
EDGE_ATTRS: Tuple[str, ...] = ("bonds", "none")


def check_graph_options(graph: str, cutoff: Optional[float], edge_attr: str = "bonds") -> None:
    """Raise ValueError for an unknown graph kind / edge attribute mode or a missing / bad cutoff."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if edge_attr not in EDGE_ATTRS:
        raise ValueError(f"edge_attr must be one of {EDGE_ATTRS}, got {edge_attr!r}")
    if graph == "radius" and (cutoff is None or not float(cutoff) > 0):
        raise ValueError(f"graph='radius' needs a positive cutoff in Angstrom, got {cutoff!r}")
    if graph == "bonds" and edge_attr != "bonds":
        raise ValueError("graph='bonds' always carries the bond one-hot: use edge_attr='bonds'")


def atom_one_hot(z, elements: Sequence[int] = ATOMIC_NUMBERS) -> torch.Tensor:
    """One-hot atom types over ``elements`` (atomic numbers, in column order).

    With the default QM9 vocabulary this equals :func:`molkern.data.bonds.encode_atoms`.

    Raises:
        ValueError: an atomic number not in ``elements`` (the message lists them).

    Shapes:
        z: (N,) -> node_attr (N, len(elements)) float32
    """
    z = torch.as_tensor(z, dtype=torch.long).reshape(-1)
    elements = [int(e) for e in elements]
    lut = torch.full((max(elements + [int(z.max()) if z.numel() else 0]) + 1,), -1, dtype=torch.long)
    lut[elements] = torch.arange(len(elements))
    idx = lut[z.clamp(min=0)] if z.numel() else z
    if z.numel() and ((idx < 0) | (z < 0)).any():
        wrong = sorted(set(z[(idx < 0) | (z < 0)].tolist()))
        raise ValueError(f"atomic numbers {wrong} are not in the element vocabulary {tuple(elements)}")
    return torch.nn.functional.one_hot(idx, len(elements)).to(torch.float32)


def molecule_edges(
    pos: torch.Tensor,
    bond_index: torch.Tensor,
    bond_type: torch.Tensor,
    graph: str = "bonds",
    cutoff: Optional[float] = None,
    edge_attr: str = "bonds",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Edges and edge attributes of one molecule (see the module docstring).

    Args:
        pos: positions in Angstrom (used by the radius graph only).
        bond_index: both directions of every bond, long, sorted by source then target (as
            :func:`molkern.data.bonds.bond_arrays` returns them).
        bond_type: index into BOND_TYPES of each directed bond, long.
        graph: "bonds" or "radius"; cutoff: Angstrom, for "radius".
        edge_attr: "bonds" (bond one-hot, zeros for non-bonded radius pairs) or "none" (radius only).

    Shapes:
        pos (N, 3), bond_index (2, B), bond_type (B,) -> edge_index (2, E) long, edge_attr (E, 3) or (E, 0) float32
    """
    check_graph_options(graph, cutoff, edge_attr)
    bond_index = torch.as_tensor(bond_index, dtype=torch.long).reshape(2, -1)
    bond_type = torch.as_tensor(bond_type, dtype=torch.long).reshape(-1)
    n = int(pos.shape[0])
    num_types = len(BOND_TYPES)
    if graph == "bonds":  # already sorted by source, then target (bond_arrays)
        return bond_index, torch.nn.functional.one_hot(bond_type, num_types).to(torch.float32)  # (2, E), (E, 3)

    from .neighbors import radius_edges

    edge_index, _ = radius_edges(pos, float(cutoff))  # (2, E), sorted by target, then source
    order = torch.argsort(edge_index[0], stable=True)  # -> by source, then target
    src, dst = edge_index[0, order], edge_index[1, order]
    if edge_attr == "none":
        return torch.stack([src, dst]), torch.zeros(src.numel(), 0, dtype=torch.float32)  # (2, E), (E, 0)
    table = torch.full((n, n), -1, dtype=torch.long)
    table[bond_index[0], bond_index[1]] = bond_type
    t = table[src, dst]  # (E,), -1 for non-bonded pairs
    attr = torch.nn.functional.one_hot(t.clamp(min=0), num_types).to(torch.float32)  # (E, 3)
    attr[t < 0] = 0.0
    return torch.stack([src, dst]), attr


def molecule_graph(
    z,
    pos,
    bond_index,
    bond_type,
    graph: str = "bonds",
    cutoff: Optional[float] = None,
    elements: Sequence[int] = ATOMIC_NUMBERS,
    edge_attr: str = "bonds",
    node_attr: Optional[torch.Tensor] = None,
    **fields,
) -> Data:
    """One molecule as a PyG ``Data`` with the fields of a QM9 item (plus whatever ``fields`` add).

    Args:
        z: atomic numbers. pos: Angstrom (stored as float32).
        bond_index, bond_type: the bonds (:func:`molkern.data.bonds.bond_arrays` / ``encode_bonds``).
        graph, cutoff, edge_attr: see :func:`molecule_edges`.
        elements: atom-type vocabulary (atomic numbers in node_attr column order).
        node_attr: precomputed one-hot (skips :func:`atom_one_hot`; the QM9 loader passes its cached types).
        **fields: further fields in order (QM9: y, idx, name, smiles; featurizer: name, smiles).

    Shapes:
        -> z (N,) long, pos (N, 3) float32, node_attr (N, len(elements)) float32, edge_index (2, E) long,
        edge_attr (E, 3) float32 (or (E, 0) with edge_attr="none")
    """
    z = torch.as_tensor(z, dtype=torch.long).reshape(-1)
    pos = torch.as_tensor(pos).to(torch.float32).reshape(-1, 3)
    if node_attr is None:
        node_attr = atom_one_hot(z, elements)
    edge_index, attr = molecule_edges(pos, bond_index, bond_type, graph=graph, cutoff=cutoff, edge_attr=edge_attr)
    return Data(z=z, pos=pos, node_attr=node_attr, edge_index=edge_index, edge_attr=attr, **fields)
