"""New molecules -> PyG ``Data`` graphs, exactly as the QM9 loader builds them (issue 5).

Inputs: a SMILES string (:func:`from_smiles`, 3D structure generated here), an RDKit ``Mol`` with a
conformer (:func:`from_rdkit`), an ``ase.Atoms`` (:func:`from_atoms`), an sdf / mol / xyz file
(:func:`from_file`); many at once with :func:`featurize_many` and every molecule of a file with
:func:`featurize_file` (both report a failure per input and go on with the others).

One path shared with :class:`molkern.data.QM9`: atom types, bond perception and the bond-type encoding come
from :mod:`molkern.data.bonds` and the graph from :func:`molkern.data.graph.molecule_graph`, so an item has
the fields of a QM9 item minus ``y`` / ``idx``: ``z`` (N,) long, ``pos`` (N, 3) float32 Angstrom,
``node_attr`` (N, len(elements)) float32 one-hot, ``edge_index`` (2, E) long [source j, target i],
``edge_attr`` (E, 3) float32 bond one-hot (single, double, triple; zeros for non-bonded radius pairs),
``name`` (str), ``smiles`` (str).

Where the bonds come from, per input:
    * SMILES: the bonds and bond orders of the SMILES itself (hydrogens added with ``Chem.AddHs``).
    * RDKit Mol / sdf / mol file: the bonds and bond orders stored in the molecule (the file's bond block),
      after sanitization. A molecule without any bond (e.g. read from xyz by RDKit) is perceived as below.
    * xyz file / ase.Atoms (no bond orders): :func:`molkern.data.bonds.perceive_bonds`, the QM9 loader's
      procedure: connectivity from the coordinates (distance rule, then extended Hueckel), bond orders and
      formal charges from a SMILES template when one is given (``smiles=``; the SMILES graph with hydrogens
      must match the connectivity exactly), otherwise from RDKit's ``DetermineBondOrders`` (less robust:
      fails on ~5% of QM9; give a template when you have one).
    **Aromatic convention** (bonds.py): every molecule is kekulized (``clearAromaticFlags=True``) before
    encoding, so aromatic rings are alternating single/double bonds and there is no aromatic column.

3D structures from SMILES (:func:`embed_smiles`): ``Chem.AddHs``, ETKDGv3 embedding seeded with ``seed``
(attempt k uses ``seed + k``, conformer c of an attempt ``seed + k + c``; random starting coordinates after the
first failure, ``max_attempts`` in all), then force-field relaxation: MMFF94 when MMFF can type every atom, else UFF, else the ETKDG geometry
(``force_field="auto"``; or force "mmff", "uff", "none"). With ``num_conformers > 1`` every conformer is
relaxed and the lowest-energy one is kept. Same seed, same structure (single-threaded embedding).

Errors: :class:`FeaturizationError` (a ``ValueError``) whose message starts with the input, e.g.
``SMILES 'C1CC': cannot be parsed by RDKit``, for unparsable SMILES, elements outside ``elements``, embedding
failure, missing 3D coordinates, an empty molecule, failed bond perception, unreadable files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import Data

from .bonds import ATOMIC_NUMBERS, BondPerceptionError, bond_arrays, perceive_bonds, quiet_rdkit
from .graph import check_graph_options, molecule_graph

__all__ = [
    "FORCE_FIELDS",
    "FeaturizationError",
    "embed_smiles",
    "featurize_file",
    "featurize_many",
    "from_atoms",
    "from_file",
    "from_rdkit",
    "from_smiles",
    "iter_featurize",
]

FORCE_FIELDS: Tuple[str, ...] = ("auto", "mmff", "uff", "none")
FILE_FORMATS: Dict[str, str] = {".sdf": "sdf", ".sd": "sdf", ".mol": "mol", ".mdl": "mol", ".xyz": "xyz"}
_GRAPH_OPTIONS = ("elements", "graph", "cutoff", "edge_attr")
_SMILES_OPTIONS = ("seed", "num_conformers", "force_field", "max_attempts", "max_iters")
_STRUCTURE_OPTIONS = ("smiles", "charge", "add_hs")
KINDS: Tuple[str, ...] = ("auto", "smiles", "rdkit", "atoms", "file", "sdf", "mol", "xyz")


class FeaturizationError(ValueError):
    """An input could not be turned into a graph. ``input``: the input's label, ``reason``: why."""

    def __init__(self, input: str, reason: str):
        self.input = input
        self.reason = reason
        super().__init__(f"{input}: {reason}")


# =============================================================================================== helpers


def _symbol(z: int) -> str:
    from rdkit import Chem

    try:
        return Chem.GetPeriodicTable().GetElementSymbol(int(z))
    except Exception:
        return f"Z={int(z)}"


def _check_atoms(label: str, z: Sequence[int], elements: Sequence[int]) -> None:
    if len(z) == 0:
        raise FeaturizationError(label, "empty molecule (no atoms)")
    bad = sorted({int(x) for x in z} - {int(e) for e in elements})
    if bad:
        names = ", ".join(_symbol(b) for b in bad)
        vocab = ", ".join(_symbol(e) for e in elements)
        raise FeaturizationError(
            label, f"element(s) {names} outside the model's element vocabulary ({vocab})"
        )


def _check_positions(label: str, pos: np.ndarray) -> None:
    if not np.isfinite(pos).all():
        raise FeaturizationError(label, "non-finite coordinates")


def _graph_options(elements, graph, cutoff, edge_attr) -> dict:
    try:
        check_graph_options(graph, cutoff, edge_attr)
    except ValueError as err:
        raise ValueError(f"bad graph options: {err}") from None
    return dict(elements=tuple(int(e) for e in elements), graph=graph, cutoff=cutoff, edge_attr=edge_attr)


def _canonical_smiles(mol) -> str:
    from rdkit import Chem

    try:
        return Chem.MolToSmiles(Chem.RemoveHs(mol))
    except Exception:
        return Chem.MolToSmiles(mol)


def _graph_from_mol(label: str, mol, name: str, smiles: str, opts: dict) -> Data:
    """A sanitized RDKit Mol with explicit H and one 3D conformer -> Data (bonds from the Mol)."""
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
    _check_positions(label, pos)
    try:
        bond_index, bond_type = bond_arrays(mol)  # kekulized: the bonds.py convention
    except Exception as err:
        raise FeaturizationError(label, f"bonds cannot be encoded: {err}") from None
    return molecule_graph(z, pos.astype(np.float32), torch.from_numpy(bond_index), torch.from_numpy(bond_type),
                          name=name, smiles=smiles, **opts)


def _graph_from_structure(label: str, z, pos, name: Optional[str], smiles: Optional[str], charge: int,
                          opts: dict) -> Data:
    """Atomic numbers + coordinates (no bonds) -> Data, with bonds from perceive_bonds (QM9's procedure)."""
    z = np.asarray(z, dtype=np.int64).reshape(-1)
    _check_atoms(label, z, opts["elements"])
    pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
    if pos.shape[0] != z.size:
        raise FeaturizationError(label, f"{z.size} atoms but {pos.shape[0]} positions")
    _check_positions(label, pos)
    if opts["graph"] == "radius" and opts["edge_attr"] == "none":  # the graph needs no bonds at all
        empty = torch.zeros(2, 0, dtype=torch.long)
        return molecule_graph(z, pos.astype(np.float32), empty, torch.zeros(0, dtype=torch.long),
                              name=name or _formula(z), smiles=smiles or "", **opts)
    try:
        mol = perceive_bonds(z.tolist(), pos, smiles=smiles, charge=charge)
    except BondPerceptionError as err:
        hint = "" if smiles else " (pass smiles= of the molecule as a bond-order template)"
        raise FeaturizationError(label, f"bond perception failed: {err}{hint}") from None
    except Exception as err:  # RDKit raises several exception types
        raise FeaturizationError(label, f"bond perception failed: {type(err).__name__}: {err}") from None
    return _graph_from_mol(label, mol, name or _formula(z), smiles or _canonical_smiles(mol), opts)


def _formula(z) -> str:
    from collections import Counter

    counts = Counter(_symbol(x) for x in z)
    order = (["C", "H"] if "C" in counts else []) + sorted(s for s in counts if s not in ("C", "H") or "C" not in counts)
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order)


# ================================================================================================ SMILES


def embed_smiles(
    smiles: str,
    seed: int = 0,
    num_conformers: int = 1,
    force_field: str = "auto",
    max_attempts: int = 5,
    max_iters: int = 2000,
):
    """SMILES -> RDKit Mol with explicit hydrogens and one relaxed 3D conformer (see the module docstring).

    Args:
        smiles: the molecule.
        seed: ETKDG random seed (>= 0); attempt k uses seed + k.
        num_conformers: conformers embedded and relaxed; the lowest-energy one is kept.
        force_field: "auto" (MMFF94, else UFF when MMFF cannot type an atom, else none), "mmff", "uff", "none".
        max_attempts: embedding attempts before giving up (random starting coordinates after the first).
        max_iters: force-field minimisation steps per conformer.

    Returns:
        (mol, info): mol has one conformer (id 0), coordinates in Angstrom; info = dict(force_field
        ("MMFF94", "UFF" or "none"), energy (kcal/mol of the kept conformer, None without force field),
        energies (all conformers, kcal/mol), converged (bool), conformer (index kept), attempts).

    Raises:
        FeaturizationError: unparsable SMILES, empty molecule, embedding failure, a force field that cannot
            type the molecule when forced.
    """
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom
    from rdkit.Chem import rdForceFieldHelpers as FF

    label = f"SMILES {smiles!r}"
    if force_field not in FORCE_FIELDS:
        raise ValueError(f"force_field must be one of {FORCE_FIELDS}, got {force_field!r}")
    if int(num_conformers) < 1 or int(max_attempts) < 1 or int(seed) < 0:
        raise ValueError(f"need num_conformers >= 1, max_attempts >= 1, seed >= 0; got "
                         f"{num_conformers}, {max_attempts}, {seed}")
    if not isinstance(smiles, str):
        raise FeaturizationError(repr(smiles), f"a SMILES must be a string, got {type(smiles).__name__}")
    with quiet_rdkit():
        mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        raise FeaturizationError(label, "cannot be parsed by RDKit (invalid SMILES syntax or valence)")
    if mol.GetNumAtoms() == 0:
        raise FeaturizationError(label, "empty molecule (no atoms)")
    mol = Chem.AddHs(mol)

    ids: List[int] = []
    attempt = 0
    with quiet_rdkit():
        for attempt in range(1, int(max_attempts) + 1):
            params = rdDistGeom.ETKDGv3()
            params.randomSeed = int(seed) + attempt - 1
            params.useRandomCoords = attempt > 1
            params.numThreads = 1
            params.enableSequentialRandomSeeds = True  # conformer c: seed + c (else seed 0 repeats one conformer)
            ids = list(rdDistGeom.EmbedMultipleConfs(mol, int(num_conformers), params))
            if ids:
                break
    if not ids:
        raise FeaturizationError(label, f"3D embedding (ETKDG) failed in {max_attempts} attempts "
                                        f"(seeds {seed}..{int(seed) + int(max_attempts) - 1})")

    used = "none"
    results = None
    with quiet_rdkit():
        mmff_ok = FF.MMFFHasAllMoleculeParams(mol)
        uff_ok = FF.UFFHasAllMoleculeParams(mol)
        if force_field == "mmff" and not mmff_ok:
            raise FeaturizationError(label, "MMFF94 cannot type every atom (try force_field='uff' or 'auto')")
        if force_field == "uff" and not uff_ok:
            raise FeaturizationError(label, "UFF cannot type every atom (try force_field='none')")
        if force_field in ("auto", "mmff") and mmff_ok:
            results = FF.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=int(max_iters))
            used = "MMFF94"
        elif force_field in ("auto", "uff") and uff_ok:
            results = FF.UFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=int(max_iters))
            used = "UFF"
    energies = [float(e) for _, e in results] if results else []
    finite = [k for k, e in enumerate(energies) if math.isfinite(e)]
    best = min(finite, key=lambda k: energies[k]) if finite else 0
    conf_id = ids[best]
    out = Chem.Mol(mol, False, conf_id)
    out.GetConformer().SetId(0)
    info = {
        "force_field": used,
        "energy": energies[best] if finite else None,
        "energies": energies,
        "converged": bool(results[best][0] == 0) if results else False,
        "conformer": best,
        "attempts": attempt,
    }
    return out, info


def from_smiles(
    smiles: str,
    seed: int = 0,
    num_conformers: int = 1,
    force_field: str = "auto",
    max_attempts: int = 5,
    max_iters: int = 2000,
    elements: Sequence[int] = ATOMIC_NUMBERS,
    graph: str = "bonds",
    cutoff: Optional[float] = None,
    edge_attr: str = "bonds",
    name: Optional[str] = None,
) -> Data:
    """A SMILES string -> graph of a generated, relaxed 3D structure (:func:`embed_smiles`).

    Args:
        smiles: the molecule (hydrogens are added). seed, num_conformers, force_field, max_attempts,
            max_iters: see :func:`embed_smiles`.
        elements: atom vocabulary (atomic numbers in node_attr column order; default QM9's H, C, N, O, F).
        graph: "bonds" or "radius"; cutoff: Angstrom, for "radius"; edge_attr: "bonds" or "none" (radius).
        name: ``data.name`` (default: the SMILES).

    Returns:
        Data(z, pos, node_attr, edge_index, edge_attr, name, smiles=the given SMILES).

    Raises:
        FeaturizationError (ValueError) naming the SMILES.

    Example:
        >>> data = from_smiles("CCO")   # doctest: +SKIP
    """
    opts = _graph_options(elements, graph, cutoff, edge_attr)
    label = f"SMILES {smiles!r}"
    if isinstance(smiles, str):  # vocabulary check before the (slower) embedding
        from rdkit import Chem

        with quiet_rdkit():
            parsed = Chem.MolFromSmiles(smiles.strip())
        if parsed is not None:
            _check_atoms(label, [a.GetAtomicNum() for a in Chem.AddHs(parsed).GetAtoms()], opts["elements"])
    mol, _ = embed_smiles(smiles, seed=seed, num_conformers=num_conformers, force_field=force_field,
                          max_attempts=max_attempts, max_iters=max_iters)
    return _graph_from_mol(label, mol, name if name is not None else smiles, smiles, opts)


# ========================================================================================= RDKit, ASE


def _mol_label(mol, name: Optional[str]) -> str:
    if name is None and mol.HasProp("_Name") and mol.GetProp("_Name").strip():
        name = mol.GetProp("_Name").strip()
    return f"RDKit Mol {name!r}" if name else "RDKit Mol"


def from_rdkit(
    mol,
    conf_id: int = -1,
    add_hs: bool = False,
    smiles: Optional[str] = None,
    charge: int = 0,
    elements: Sequence[int] = ATOMIC_NUMBERS,
    graph: str = "bonds",
    cutoff: Optional[float] = None,
    edge_attr: str = "bonds",
    name: Optional[str] = None,
    _label: Optional[str] = None,
) -> Data:
    """An RDKit Mol with a 3D conformer -> graph, bonds and bond orders taken from the Mol.

    Args:
        mol: RDKit Mol with explicit hydrogen atoms and a 3D conformer (Angstrom).
        conf_id: conformer to use (-1: the default one).
        add_hs: add missing hydrogens with ``Chem.AddHs(addCoords=True)`` (idealised positions, not
            relaxed); False: implicit hydrogens are an error.
        smiles, charge: bond-order template and total charge, used only when the Mol has no bonds at all
            (e.g. read from xyz): its bonds are then perceived as for :func:`from_atoms`.
        elements, graph, cutoff, edge_attr: see :func:`from_smiles`.
        name: ``data.name`` (default: the Mol's ``_Name``, else its formula).

    Returns:
        Data(z, pos, node_attr, edge_index, edge_attr, name, smiles=canonical SMILES without hydrogens).

    Raises:
        FeaturizationError (ValueError) naming the Mol: no atoms, no or only 2D coordinates, implicit
        hydrogens, elements outside ``elements``, sanitization or bond-perception failure.
    """
    from rdkit import Chem

    opts = _graph_options(elements, graph, cutoff, edge_attr)
    if not isinstance(mol, Chem.Mol):
        raise FeaturizationError(repr(mol)[:60], f"not an RDKit Mol ({type(mol).__name__})")
    label = _label or _mol_label(mol, name)
    if name is None and mol.HasProp("_Name") and mol.GetProp("_Name").strip():
        name = mol.GetProp("_Name").strip()
    z = [a.GetAtomicNum() for a in mol.GetAtoms()]
    _check_atoms(label, z, opts["elements"])
    if mol.GetNumConformers() == 0:
        raise FeaturizationError(label, "missing 3D coordinates (the Mol has no conformer; embed it first "
                                        "or use from_smiles)")
    try:
        conf = mol.GetConformer(int(conf_id))
    except ValueError:
        raise FeaturizationError(label, f"has no conformer with id {conf_id}") from None
    if not conf.Is3D():
        raise FeaturizationError(label, "missing 3D coordinates (the conformer is 2D)")
    mol = Chem.Mol(mol, False, conf.GetId())
    mol.GetConformer().SetId(0)
    if mol.GetNumBonds() == 0 and mol.GetNumAtoms() > 1:  # e.g. from an xyz block: perceive like from_atoms
        return _graph_from_structure(label, z, mol.GetConformer().GetPositions(), name, smiles, charge, opts)
    try:
        with quiet_rdkit():
            Chem.SanitizeMol(mol)
    except Exception as err:
        raise FeaturizationError(label, f"RDKit sanitization failed: {err}") from None
    implicit = sum(a.GetTotalNumHs(includeNeighbors=False) for a in mol.GetAtoms())
    if implicit:
        if not add_hs:
            raise FeaturizationError(label, f"{implicit} hydrogen(s) are implicit (no coordinates); "
                                            "pass add_hs=True to place them (idealised, not relaxed)")
        mol = Chem.AddHs(mol, addCoords=True)
        _check_atoms(label, [a.GetAtomicNum() for a in mol.GetAtoms()], opts["elements"])
    name = name or _formula([a.GetAtomicNum() for a in mol.GetAtoms()])
    return _graph_from_mol(label, mol, name, _canonical_smiles(mol), opts)


def from_atoms(
    atoms,
    smiles: Optional[str] = None,
    charge: int = 0,
    elements: Sequence[int] = ATOMIC_NUMBERS,
    graph: str = "bonds",
    cutoff: Optional[float] = None,
    edge_attr: str = "bonds",
    name: Optional[str] = None,
) -> Data:
    """An ``ase.Atoms`` (a non-periodic molecule, all hydrogens present) -> graph.

    Bonds: :func:`molkern.data.bonds.perceive_bonds` (connectivity from the coordinates; bond orders from
    the SMILES template ``smiles`` if given, else RDKit's DetermineBondOrders with total ``charge``). With
    ``graph="radius", edge_attr="none"`` no bonds are needed and none are perceived.

    Args:
        atoms: ase.Atoms, positions in Angstrom.
        smiles: SMILES of the same molecule (bond-order template; stored as ``data.smiles``).
        charge: total charge (used without a template).
        elements, graph, cutoff, edge_attr: see :func:`from_smiles`.
        name: ``data.name`` (default ``atoms.info["name"]``, else the formula).

    Raises:
        FeaturizationError (ValueError) naming the Atoms: no atoms, periodic cell, elements outside
        ``elements``, failed bond perception.
    """
    opts = _graph_options(elements, graph, cutoff, edge_attr)
    if not hasattr(atoms, "get_atomic_numbers"):
        raise FeaturizationError(repr(atoms)[:60], f"not an ase.Atoms ({type(atoms).__name__})")
    z = atoms.get_atomic_numbers()
    if name is None:
        name = atoms.info.get("name") or (atoms.get_chemical_formula() if len(atoms) else "empty")
    label = f"ase.Atoms {name!r}"
    if np.any(atoms.pbc):
        raise FeaturizationError(label, f"periodic boundaries {atoms.pbc.tolist()}: the featurizer handles "
                                        "isolated molecules (set atoms.pbc = False)")
    return _graph_from_structure(label, z, atoms.get_positions(), name, smiles, charge, opts)


# ================================================================================================= files


def _file_format(path: Path, format: Optional[str]) -> str:
    fmt = format or FILE_FORMATS.get(path.suffix.lower())
    if fmt not in ("sdf", "mol", "xyz"):
        raise FeaturizationError(f"file '{path}'", f"unsupported file type {path.suffix or format!r}; "
                                                   "use .sdf, .mol or .xyz (or format='sdf'|'mol'|'xyz')")
    return fmt


def _xyz_frames(path: Path) -> List[Tuple[List[str], np.ndarray, str]]:
    """Frames of a (multi-)xyz file: (symbols, positions (N, 3) Angstrom, comment line)."""
    lines = path.read_text().splitlines()
    frames, k = [], 0
    while k < len(lines):
        if not lines[k].strip():
            k += 1
            continue
        try:
            n = int(lines[k].split()[0])
        except ValueError:
            raise ValueError(f"line {k + 1}: expected an atom count, got {lines[k].strip()[:40]!r}") from None
        if k + 2 + n > len(lines):
            raise ValueError(f"line {k + 1}: frame of {n} atoms is truncated")
        comment = lines[k + 1].strip()
        symbols, pos = [], []
        for j, line in enumerate(lines[k + 2 : k + 2 + n], start=k + 3):
            t = line.split()
            try:
                symbols.append(t[0])
                pos.append([float(v.replace("*^", "e")) for v in t[1:4]])
                if len(pos[-1]) != 3:
                    raise IndexError
            except (ValueError, IndexError):
                raise ValueError(f"line {j}: expected 'symbol x y z', got {line.strip()[:60]!r}") from None
        frames.append((symbols, np.array(pos, dtype=np.float64).reshape(-1, 3), comment))
        k += 2 + n
    return frames


def _symbols_to_z(label: str, symbols: Sequence[str]) -> np.ndarray:
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    out = []
    for s in symbols:
        if s.isdigit():
            out.append(int(s))
            continue
        try:
            out.append(table.GetAtomicNumber(s.capitalize()))
        except Exception:
            raise FeaturizationError(label, f"unknown element symbol {s!r}") from None
    return np.array(out, dtype=np.int64)


def _file_records(path, format: Optional[str] = None) -> Tuple[str, List[Tuple[str, Any]]]:
    """(format, [(record label, record)]) where a record is an RDKit Mol, an (z, pos, comment) tuple for
    xyz, or a FeaturizationError for a record that cannot be read."""
    from rdkit import Chem

    path = Path(path)
    flabel = f"file '{path}'"
    fmt = _file_format(path, format)
    if not path.is_file():
        raise FeaturizationError(flabel, "no such file")
    records: List[Tuple[str, Any]] = []
    if fmt == "xyz":
        try:
            frames = _xyz_frames(path)
        except (ValueError, UnicodeDecodeError) as err:
            raise FeaturizationError(flabel, f"unreadable xyz: {err}") from None
        for i, (symbols, pos, comment) in enumerate(frames):
            rlabel = flabel if len(frames) == 1 else f"file '{path}' molecule {i}"
            try:
                records.append((rlabel, (_symbols_to_z(rlabel, symbols), pos, comment)))
            except FeaturizationError as err:
                records.append((rlabel, err))
        return fmt, records
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise FeaturizationError(flabel, f"unreadable: {err}") from None
    if not text.strip():
        return fmt, []
    try:
        with quiet_rdkit():
            if fmt == "mol":
                mols = [Chem.MolFromMolBlock(text, sanitize=False, removeHs=False)]
            else:
                supplier = Chem.SDMolSupplier()
                supplier.SetData(text, sanitize=False, removeHs=False)
                mols = list(supplier)
    except Exception as err:  # RDKit raises OSError / RuntimeError on malformed files
        raise FeaturizationError(flabel, f"unreadable {fmt} file: {err}") from None
    for i, mol in enumerate(mols):
        rlabel = flabel if len(mols) == 1 else f"file '{path}' molecule {i}"
        if mol is not None and mol.HasProp("_Name") and mol.GetProp("_Name").strip():
            rlabel += f" ({mol.GetProp('_Name').strip()})"
        records.append((rlabel, mol if mol is not None else FeaturizationError(rlabel, "RDKit cannot parse the record")))
    return fmt, records


def _featurize_record(label: str, record, path: Path, index: int, many: bool, smiles, charge, add_hs, opts):
    if isinstance(record, FeaturizationError):
        raise record
    default_name = f"{path.stem}_{index}" if many else path.stem
    if isinstance(record, tuple):  # xyz frame
        z, pos, comment = record
        return _graph_from_structure(label, z, pos, comment or default_name, smiles, charge, opts)
    name = record.GetProp("_Name").strip() if record.HasProp("_Name") else ""
    return from_rdkit(record, add_hs=add_hs, smiles=smiles, charge=charge, name=name or default_name,
                      _label=label, **opts)


def from_file(
    path: Union[str, os.PathLike],
    index: Optional[int] = None,
    format: Optional[str] = None,
    smiles: Optional[str] = None,
    charge: int = 0,
    add_hs: bool = False,
    elements: Sequence[int] = ATOMIC_NUMBERS,
    graph: str = "bonds",
    cutoff: Optional[float] = None,
    edge_attr: str = "bonds",
) -> Data:
    """One molecule of an sdf / mol / xyz file -> graph.

    A file holding several molecules (multi-record sdf, multi-frame xyz) is an error unless ``index``
    picks one: use :func:`featurize_file` for all of them.

    Args:
        path: .sdf / .sd, .mol / .mdl (bonds from the file) or .xyz (bonds perceived; coordinates in Angstrom).
        index: which molecule of a multi-molecule file (0-based).
        format: "sdf", "mol" or "xyz" to override the suffix.
        smiles, charge: bond-order template and total charge for xyz (see :func:`from_atoms`).
        add_hs: see :func:`from_rdkit`. elements, graph, cutoff, edge_attr: see :func:`from_smiles`.

    Returns:
        Data with ``name`` = the record's title (sdf / mol) or comment line (xyz), else the file stem.

    Raises:
        FeaturizationError (ValueError) naming the file (and molecule).
    """
    opts = _graph_options(elements, graph, cutoff, edge_attr)
    path = Path(path)
    _, records = _file_records(path, format)
    if not records:
        raise FeaturizationError(f"file '{path}'", "empty molecule (the file holds no molecule)")
    if index is None:
        if len(records) > 1:
            raise FeaturizationError(f"file '{path}'", f"holds {len(records)} molecules; from_file reads one: "
                                                       "pass index=i, or use featurize_file(path) for all")
        index = 0
    if not -len(records) <= int(index) < len(records):
        raise FeaturizationError(f"file '{path}'", f"index {index} out of range ({len(records)} molecules)")
    index = int(index) % len(records)
    label, record = records[index]
    return _featurize_record(label, record, path, index, len(records) > 1, smiles, charge, add_hs, opts)


# ================================================================================================= batch


def _iter_file(path, opts, smiles=None, charge=0, add_hs=False, format=None) -> Iterator[Tuple[str, Any]]:
    path = Path(path)
    try:
        _, records = _file_records(path, format)
    except FeaturizationError as err:
        yield err.input, err
        return
    if not records:
        yield f"file '{path}'", FeaturizationError(f"file '{path}'", "empty molecule (the file holds no molecule)")
    templates = smiles if isinstance(smiles, (list, tuple)) else [smiles] * len(records)
    if len(templates) != len(records):
        flabel = f"file '{path}'"
        yield flabel, FeaturizationError(flabel, f"{len(templates)} SMILES templates for {len(records)} molecules")
        return
    for i, (label, record) in enumerate(records):
        try:
            yield label, _featurize_record(label, record, path, i, len(records) > 1, templates[i], charge,
                                           add_hs, opts)
        except FeaturizationError as err:
            yield label, err
        except Exception as err:  # one bad record must not stop the others
            yield label, FeaturizationError(label, f"{type(err).__name__}: {err}")


def _split_options(options: dict) -> Tuple[dict, dict, dict]:
    known = set(_GRAPH_OPTIONS) | set(_SMILES_OPTIONS) | set(_STRUCTURE_OPTIONS) | {"format"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown featurization option(s) {unknown}; known: {sorted(known)}")
    graph_opts = dict(elements=ATOMIC_NUMBERS, graph="bonds", cutoff=None, edge_attr="bonds")
    graph_opts.update({k: options[k] for k in _GRAPH_OPTIONS if k in options})
    smiles_opts = {k: options[k] for k in _SMILES_OPTIONS if k in options}
    struct_opts = {k: options[k] for k in (*_STRUCTURE_OPTIONS, "format") if k in options}
    return _graph_options(**graph_opts), smiles_opts, struct_opts


def _kind_of(item, kind: str) -> str:
    if kind != "auto":
        return kind
    if isinstance(item, (str, bytes)) and not isinstance(item, os.PathLike):
        return "smiles"
    if isinstance(item, os.PathLike):
        return "file"
    if hasattr(item, "get_atomic_numbers"):
        return "atoms"
    if hasattr(item, "GetAtoms"):
        return "rdkit"
    raise FeaturizationError(repr(item)[:60], f"cannot tell what kind of input a {type(item).__name__} is")


def iter_featurize(inputs, kind: str = "auto", **options) -> Iterator[Tuple[str, Union[Data, FeaturizationError]]]:
    """Featurize inputs one by one, in order: yields (label, Data) or (label, FeaturizationError).

    A file yields one entry per molecule. ``label`` is the SMILES itself, ``"file 'x.sdf' molecule 3 (name)"``
    for records of multi-molecule files, ``"file 'x.xyz'"`` for single-molecule files, the name of an Atoms
    or Mol. Options: as :func:`featurize_many`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "GetAtoms") or hasattr(inputs, "get_atomic_numbers"):
        inputs = [inputs]
    opts, smiles_opts, struct_opts = _split_options(options)
    inputs = list(inputs)
    template = struct_opts.get("smiles")
    per_input = isinstance(template, (list, tuple))
    if per_input and len(template) != len(inputs):
        raise ValueError(f"{len(template)} SMILES templates for {len(inputs)} inputs")
    for k, item in enumerate(inputs):
        sopts = dict(struct_opts, smiles=template[k] if per_input else template)
        try:
            item_kind = _kind_of(item, kind)
        except FeaturizationError as err:
            yield err.input, err
            continue
        if item_kind in ("file", "sdf", "mol", "xyz"):
            fmt = sopts.pop("format", None) or (None if item_kind == "file" else item_kind)
            yield from _iter_file(item, opts, format=fmt, **sopts)
            continue
        if item_kind == "smiles":
            label = item if isinstance(item, str) else repr(item)
            call = lambda: from_smiles(item, **smiles_opts, **opts)  # noqa: E731
        elif item_kind == "atoms":
            label = item.info.get("name") or item.get_chemical_formula() or f"ase.Atoms #{k}"
            call = lambda: from_atoms(item, smiles=sopts.get("smiles"), charge=sopts.get("charge", 0), **opts)  # noqa: E731
        else:  # rdkit
            name = item.GetProp("_Name").strip() if hasattr(item, "HasProp") and item.HasProp("_Name") else ""
            label = name or f"RDKit Mol #{k}"
            call = lambda: from_rdkit(item, add_hs=sopts.get("add_hs", False), smiles=sopts.get("smiles"),  # noqa: E731
                                      charge=sopts.get("charge", 0), **opts)
        try:
            yield label, call()
        except FeaturizationError as err:
            yield label, err
        except Exception as err:  # one bad input must not stop the others
            yield label, FeaturizationError(label, f"{type(err).__name__}: {err}")


def featurize_many(inputs, kind: str = "auto", **options) -> Tuple[List[Data], List[Tuple[str, str]]]:
    """Featurize many inputs; a failure is reported for that input and the others are still processed.

    Args:
        inputs: SMILES strings, RDKit Mols, ase.Atoms, file paths (``pathlib.Path``; or ``str`` with
            ``kind="file"``), or a mix (``kind="auto"``: ``str`` = SMILES, ``Path`` = file).
        kind: "auto", "smiles", "rdkit", "atoms", "file", "sdf", "mol", "xyz".
        **options: graph options (elements, graph, cutoff, edge_attr) for all; seed, num_conformers,
            force_field, max_attempts, max_iters for SMILES; smiles (a template, or one per input),
            charge, add_hs, format for structures and files. An unknown option is a TypeError.

    Returns:
        (graphs, failures): the Data of every molecule that worked, in input order (a file contributes one
        per molecule), and ``(label, reason)`` for every one that did not (label: see :func:`iter_featurize`).

    Example:
        >>> graphs, failures = featurize_many(["CCO", "C1CC", "C[Si](C)(C)C"])     # doctest: +SKIP
        >>> failures   # [("C1CC", "cannot be parsed ..."), ("C[Si](C)(C)C", "element(s) Si outside ...")]
    """
    graphs, failures = [], []
    for label, out in iter_featurize(inputs, kind=kind, **options):
        if isinstance(out, FeaturizationError):
            failures.append((label, out.reason))
        else:
            graphs.append(out)
    return graphs, failures


def featurize_file(path: Union[str, os.PathLike], **options) -> Tuple[List[Data], List[Tuple[str, str]]]:
    """Every molecule of an sdf / mol / xyz file -> (graphs, failures), as :func:`featurize_many`.

    ``smiles=`` may be one template per molecule (a list) for multi-frame xyz files.
    """
    graphs, failures = [], []
    opts, _, struct_opts = _split_options(options)
    for label, out in _iter_file(path, opts, **struct_opts):
        if isinstance(out, FeaturizationError):
            failures.append((label, out.reason))
        else:
            graphs.append(out)
    return graphs, failures
