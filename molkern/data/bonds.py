"""Bond perception from 3D structures and the atom / bond encodings shared by every molecular data path.

One convention, written once here and used by the QM9 loader and by the featurizer of new molecules
(SMILES, sdf, xyz, ase.Atoms), so that a model trained on QM9 sees the same encoding at prediction time.

Atoms:
    `ATOM_TYPES = ("H", "C", "N", "O", "F")`; `encode_atoms` gives the one-hot node attributes (N, 5)
    float32 (the `node_attr` field of an item, the model's `node_attrs` input).
    Any other element is an error (QM9 holds only these five).

Bonds:
    `BOND_TYPES = ("single", "double", "triple")`; `encode_bonds` gives `edge_index` (2, E) with both
    directions of every bond (PyG convention: row 0 = source j, row 1 = target i, sorted by source then
    target) and `edge_attr` (E, 3) float32, the bond-type one-hot.

    **Aromatic convention:** molecules are kekulized with `Chem.Kekulize(mol, clearAromaticFlags=True)`
    before encoding, so aromatic rings are written as alternating single/double bonds and there is no
    "aromatic" column (PyG's QM9 has a 4th aromatic column that is always zero, because it reads its sdf
    unsanitized). Which of the equivalent Kekule structures is used is RDKit's deterministic choice.

Perception (`perceive_bonds`):
    1. connectivity from the coordinates with RDKit's `rdDetermineBonds.DetermineConnectivity`: the
       extended-Hueckel method (`useHueckel=True, charge=0`; robust on strained polycyclic molecules where
       distance rules fail) and the plain distance rule (`useHueckel=False`, ~100x cheaper);
    2. bond orders and formal charges from a SMILES of the same molecule used as a template: the SMILES
       graph with explicit hydrogens must be *isomorphic* to the perceived connectivity (same atoms, same
       number of bonds, a full match), otherwise the connectivity is rejected with a reason. This is
       stricter than `AllChem.AssignBondOrdersFromTemplate` (which matches heavy atoms only and copies the
       template's implicit-H counts, failing on `[nH]` / `[NH3+]`) and never enumerates symmetric matches.
       Because any accepted connectivity *is* the SMILES graph, the default (`connectivity="auto"`) tries
       the cheap distance rule first and extended Hueckel only when that does not match: on all 130,831
       QM9 molecules this gives bonds identical to Hueckel-first, ~3x faster; Hueckel rescues the strained
       molecules, the distance rule one molecule (gdb_128228) where Hueckel adds a bond;
    3. without a SMILES, bond orders come from `rdDetermineBonds.DetermineBondOrders(mol, charge=0)` on the
       Hueckel connectivity (fails on ~5% of QM9, so the QM9 loader always passes the SMILES).
    RDKit's messages (Python logger and the C++ code that prints to stdout/stderr directly) are silenced
    for the duration of the call.

Failures raise `BondPerceptionError` with a short human-readable reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

ATOM_TYPES: Tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: Tuple[int, ...] = (1, 6, 7, 8, 9)
BOND_TYPES: Tuple[str, ...] = ("single", "double", "triple")
CONNECTIVITY: Tuple[str, ...] = ("auto", "hueckel", "distance")

_Z_TO_TYPE = {z: i for i, z in enumerate(ATOMIC_NUMBERS)}
_SYMBOL_TO_Z = dict(zip(ATOM_TYPES, ATOMIC_NUMBERS))

__all__ = [
    "ATOM_TYPES",
    "ATOMIC_NUMBERS",
    "BOND_TYPES",
    "BondPerceptionError",
    "atom_type_index",
    "bond_arrays",
    "bond_type_index",
    "encode_atoms",
    "encode_bonds",
    "perceive_bonds",
    "quiet_rdkit",
    "symbols_to_z",
]


class BondPerceptionError(ValueError):
    """Bonds of a molecule could not be perceived; `str(err)` is the reason."""


# ----------------------------------------------------------------------------------------------- atoms


def symbols_to_z(symbols: Sequence[str]) -> np.ndarray:
    """Element symbols -> atomic numbers (int64). Only H, C, N, O, F are accepted."""
    try:
        return np.array([_SYMBOL_TO_Z[s] for s in symbols], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"element {err.args[0]!r} is not one of {ATOM_TYPES}") from None


def atom_type_index(z) -> torch.Tensor:
    """Atomic numbers -> index into ATOM_TYPES (long). Raises ValueError for other elements.

    Shapes:
        z: (N,) -> (N,)
    """
    z = torch.as_tensor(z, dtype=torch.long)
    lut = torch.full((max(ATOMIC_NUMBERS) + 1,), -1, dtype=torch.long)
    lut[list(ATOMIC_NUMBERS)] = torch.arange(len(ATOMIC_NUMBERS))
    bad = (z < 0) | (z >= lut.numel())
    idx = torch.where(bad, torch.full_like(z, -1), lut[z.clamp(0, lut.numel() - 1)])
    if (idx < 0).any():
        wrong = sorted(set(z[idx < 0].tolist()))
        raise ValueError(f"atomic numbers {wrong} are not among {ATOM_TYPES} (Z = {ATOMIC_NUMBERS})")
    return idx


def encode_atoms(z) -> torch.Tensor:
    """One-hot atom types in the order ATOM_TYPES = (H, C, N, O, F).

    Args:
        z: atomic numbers (sequence, numpy array or tensor), or an RDKit Mol.

    Shapes:
        z: (N,) -> node_attrs (N, 5) float32
    """
    if hasattr(z, "GetAtoms"):
        z = [a.GetAtomicNum() for a in z.GetAtoms()]
    idx = atom_type_index(z)
    return torch.nn.functional.one_hot(idx, len(ATOM_TYPES)).to(torch.float32)


# ----------------------------------------------------------------------------------------------- bonds


def bond_type_index(bond) -> int:
    """RDKit bond -> index into BOND_TYPES. Aromatic bonds are an error: kekulize first."""
    from rdkit import Chem

    bt = bond.GetBondType()
    if bt == Chem.BondType.SINGLE:
        return 0
    if bt == Chem.BondType.DOUBLE:
        return 1
    if bt == Chem.BondType.TRIPLE:
        return 2
    raise ValueError(
        f"bond {bond.GetBeginAtomIdx()}-{bond.GetEndAtomIdx()} has type {bt}; only single/double/triple are "
        "encoded (aromatic rings: Chem.Kekulize(mol, clearAromaticFlags=True) first)"
    )


def bond_arrays(mol, kekulize: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """numpy version of :func:`encode_bonds`: edge_index (2, E) int64 and the bond-type index (E,) int64
    into BOND_TYPES (no torch, so it is safe in forked worker processes)."""
    from rdkit import Chem

    if kekulize and any(b.GetIsAromatic() for b in mol.GetBonds()):
        mol = Chem.Mol(mol)
        Chem.Kekulize(mol, clearAromaticFlags=True)
    src, dst, types = [], [], []
    for b in mol.GetBonds():
        i, j, t = b.GetBeginAtomIdx(), b.GetEndAtomIdx(), bond_type_index(b)
        src += [i, j]
        dst += [j, i]
        types += [t, t]
    edge_index = np.array([src, dst], dtype=np.int64).reshape(2, -1)  # (2, E)
    bond_type = np.array(types, dtype=np.int64)  # (E,)
    order = np.argsort(edge_index[0] * mol.GetNumAtoms() + edge_index[1], kind="stable")
    return edge_index[:, order], bond_type[order]


def encode_bonds(mol, kekulize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bonds of an RDKit molecule as a directed PyG edge list with a bond-type one-hot.

    Each bond gives two edges (j -> i and i -> j). Edges are sorted by source, then target
    (`edge_index[0] * N + edge_index[1]`), as PyG's QM9 does.

    Args:
        mol: RDKit Mol with explicit hydrogens as atoms.
        kekulize: kekulize a copy with clearAromaticFlags=True first (the aromatic convention above).

    Shapes:
        -> edge_index (2, E) long, edge_attr (E, 3) float32, with E = 2 * mol.GetNumBonds()
    """
    edge_index, bond_type = bond_arrays(mol, kekulize=kekulize)
    edge_attr = torch.nn.functional.one_hot(torch.from_numpy(bond_type), len(BOND_TYPES)).to(torch.float32)
    return torch.from_numpy(edge_index), edge_attr  # (2, E), (E, 3)


# ------------------------------------------------------------------------------------------ silencing

_QUIET_LOCK = threading.RLock()
_LIBC = None


def _fflush_c() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None)
        _LIBC.fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        pass


@contextlib.contextmanager
def quiet_rdkit(redirect_fds: bool = True):
    """Silence RDKit: its Python-side logs, and (redirect_fds) whatever C/C++ code writes to fd 1 and 2.

    The file-descriptor redirection is process-wide while the block runs (other threads' output to
    stdout/stderr is lost meanwhile); it is skipped when the fds cannot be duplicated.
    """
    from rdkit import RDLogger, rdBase

    block = rdBase.BlockLogs() if hasattr(rdBase, "BlockLogs") else None  # restores the previous state
    if block is None:  # pragma: no cover - old RDKit
        RDLogger.DisableLog("rdApp.*")
    saved = []
    with _QUIET_LOCK:
        try:
            if redirect_fds:
                try:
                    for stream in (sys.stdout, sys.stderr):
                        with contextlib.suppress(Exception):
                            stream.flush()
                    _fflush_c()
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    try:
                        for fd in (1, 2):
                            saved.append((fd, os.dup(fd)))
                            os.dup2(devnull, fd)
                    finally:
                        os.close(devnull)
                except OSError:
                    pass
            yield
        finally:
            if saved:
                _fflush_c()
                for fd, copy in saved:
                    os.dup2(copy, fd)
                    os.close(copy)
            if block is None:  # pragma: no cover - old RDKit
                RDLogger.EnableLog("rdApp.*")
            del block


# ------------------------------------------------------------------------------------------ perception


def _mol_from_coordinates(z: Sequence[int], positions: np.ndarray):
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    rw = Chem.RWMol()
    for zi in z:
        rw.AddAtom(Chem.Atom(int(zi)))
    conf = Chem.Conformer(len(z))
    for i, (x, y, w) in enumerate(positions):
        conf.SetAtomPosition(i, Point3D(float(x), float(y), float(w)))
    mol = rw.GetMol()
    mol.AddConformer(conf, assignId=True)
    return mol


def _connectivity(z, pos, charge: int, use_hueckel: bool):
    from rdkit.Chem import rdDetermineBonds

    mol = _mol_from_coordinates(z, pos)
    try:
        rdDetermineBonds.DetermineConnectivity(mol, useHueckel=use_hueckel, charge=int(charge))
    except Exception as err:
        raise BondPerceptionError(f"connectivity failed: {err}") from None
    return mol


def _template_with_hs(smiles: str):
    from rdkit import Chem

    tpl = Chem.MolFromSmiles(smiles)
    if tpl is None:
        raise BondPerceptionError(f"SMILES {smiles!r} cannot be parsed")
    tpl = Chem.AddHs(tpl)
    Chem.Kekulize(tpl, clearAromaticFlags=True)
    return tpl


def _assign_from_template(mol, smiles: str):
    """Bond orders and formal charges of `smiles` on the connectivity of `mol` (an isomorphism is required)."""
    from rdkit import Chem

    tpl = _template_with_hs(smiles)
    if tpl.GetNumAtoms() != mol.GetNumAtoms():
        raise BondPerceptionError(
            f"SMILES has {tpl.GetNumAtoms()} atoms with hydrogens, the structure {mol.GetNumAtoms()}"
        )
    if tpl.GetNumBonds() != mol.GetNumBonds():
        raise BondPerceptionError(
            f"geometry gives {mol.GetNumBonds()} bonds, the SMILES {tpl.GetNumBonds()}"
        )
    # match on the bare graph: every bond single, no charges, no stereo
    query = Chem.RWMol(tpl)
    for b in query.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    for a in query.GetAtoms():
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
        a.SetChiralTag(Chem.ChiralType.CHI_UNSPECIFIED)
    match = mol.GetSubstructMatch(query.GetMol(), useChirality=False)
    if len(match) != mol.GetNumAtoms():
        raise BondPerceptionError("connectivity from the geometry does not match the SMILES graph")
    out = Chem.RWMol(mol)
    for b in tpl.GetBonds():
        ob = out.GetBondBetweenAtoms(match[b.GetBeginAtomIdx()], match[b.GetEndAtomIdx()])
        ob.SetBondType(b.GetBondType())
        ob.SetIsAromatic(False)
    for a in tpl.GetAtoms():
        oa = out.GetAtomWithIdx(match[a.GetIdx()])
        oa.SetFormalCharge(a.GetFormalCharge())
        oa.SetNoImplicit(True)
        oa.SetNumExplicitHs(0)
    out = out.GetMol()
    try:
        Chem.SanitizeMol(out)
    except Exception as err:  # RDKit raises several exception types here
        raise BondPerceptionError(f"sanitization failed: {err}") from None
    return out


def perceive_bonds(
    symbols_or_z: Sequence,
    positions,
    smiles: Optional[str] = None,
    charge: int = 0,
    quiet: bool = True,
    connectivity: str = "auto",
):
    """Perceive the bonds of a neutral molecule from its 3D structure (see the module docstring).

    Args:
        symbols_or_z: element symbols ("C", "H", ...) or atomic numbers, all hydrogens included.
        positions: coordinates in Angstrom.
        smiles: a SMILES of the same molecule, used as the bond-order / formal-charge template (hydrogens
            may be implicit in it). None: bond orders from DetermineBondOrders.
        charge: total charge of the molecule (QM9: 0).
        quiet: silence RDKit's messages, including the C++ ones written straight to stdout/stderr.
        connectivity: "auto" (with a SMILES: the distance rule first, then extended Hueckel; without: Hueckel),
            "hueckel" (Hueckel first, the distance rule as fallback with a SMILES) or "distance" only.
            With a SMILES every accepted connectivity equals the SMILES graph, so the order only changes
            the speed (on all of QM9 "auto" and "hueckel" give identical bonds; "auto" is ~3x faster).

    Returns:
        An RDKit Mol with explicit hydrogens, one conformer (the given positions), sanitized, kekulized
        (clearAromaticFlags=True), with formal charges from the template.

    Raises:
        BondPerceptionError: with the reason, when the connectivity or bond orders cannot be determined.

    Shapes:
        symbols_or_z: (N,), positions: (N, 3)
    """
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    if len(symbols_or_z) and isinstance(symbols_or_z[0], str):
        z = symbols_to_z(symbols_or_z)
    else:
        z = np.asarray(symbols_or_z, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if pos.shape[0] != len(z):
        raise ValueError(f"{len(z)} atoms but {pos.shape[0]} positions")
    if not np.isfinite(pos).all():
        raise BondPerceptionError("non-finite coordinates")
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be one of {CONNECTIVITY}, got {connectivity!r}")
    ctx = quiet_rdkit() if quiet else contextlib.nullcontext()
    with ctx:
        if smiles is not None:
            # (use_hueckel, ...) in the order tried; a result is accepted only if it matches the SMILES exactly
            attempts = {"auto": (False, True), "hueckel": (True, False), "distance": (False,)}[connectivity]
            errors = {}
            for use_hueckel in attempts:
                try:
                    out = _assign_from_template(_connectivity(z, pos, charge, use_hueckel), smiles)
                    break
                except BondPerceptionError as err:
                    errors[use_hueckel] = err
            else:
                raise errors.get(True, errors[False])  # the Hueckel reason when Hueckel was tried
        else:
            out = _connectivity(z, pos, charge, use_hueckel=connectivity != "distance")
            try:
                rdDetermineBonds.DetermineBondOrders(out, charge=int(charge))
            except Exception as err:
                raise BondPerceptionError(f"bond orders failed: {err}") from None
    if any(a.GetNumRadicalElectrons() for a in out.GetAtoms()):
        raise BondPerceptionError("radical centres after bond-order assignment")
    Chem.Kekulize(out, clearAromaticFlags=True)
    return out
