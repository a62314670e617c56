"""QM9 processing: parse one molecule, perceive its bonds (in worker processes), and the versioned cache format."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import torch

from ..bonds import BondPerceptionError, bond_arrays, perceive_bonds
from .constants import _StaleCache, _targets
from .sources import _float, _parse_float_list, _parse_symbol_list

_MAGIC = b"MOLKERN-QM9-CACHE\n"
_CHUNKSIZE = 32


def _parse_xyz(text: str):
    lines = text.splitlines()
    n = int(lines[0].split()[0])
    head = lines[1].split()
    if len(head) < 17:
        raise ValueError(f"property line has {len(head)} fields, expected 17")
    props = [_float(t) for t in head[5:17]]
    symbols, pos = [], []
    for line in lines[2 : 2 + n]:
        t = line.split()
        symbols.append(t[0])
        pos.append([_float(t[1]), _float(t[2]), _float(t[3])])
    smiles = lines[3 + n].split()
    return symbols, np.array(pos, dtype=np.float64), smiles[1] if len(smiles) > 1 else smiles[0], props


def _parse_task(task):
    """A work item -> (z, positions (N, 3) in Angstrom, template SMILES or None, 12 raw properties)."""
    from ..bonds import symbols_to_z

    kind = task[0]
    if kind == "qm9pack":
        _, _, _, smiles, elements, xyz, props = task
        symbols = _parse_symbol_list(elements)
        coords = np.array(_parse_float_list(xyz), dtype=np.float64)
        if coords.size != 3 * len(symbols):
            raise ValueError(f"{len(symbols)} elements but {coords.size} coordinates")
        return symbols_to_z(symbols), coords.reshape(-1, 3), smiles, [_float(p) for p in props]
    if kind == "xyz":
        symbols, pos, smiles, props = _parse_xyz(task[3])
        return symbols_to_z(symbols), pos, smiles, props
    if kind == "pyg":
        from rdkit import Chem

        _, _, _, block, props = task
        if props is None:
            raise ValueError("no row in gdb9.sdf.csv")
        mol = Chem.MolFromMolBlock(block, removeHs=False, sanitize=False)
        if mol is None:
            raise ValueError("unreadable sdf record")
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
        pos = mol.GetConformer().GetPositions()
        try:
            Chem.SanitizeMol(mol)
            smiles = Chem.MolToSmiles(Chem.RemoveHs(mol))
        except Exception:  # the sdf's own bond orders do not sanitize: let RDKit assign them
            smiles = None
        return z, pos, smiles, props
    raise ValueError(f"unknown task kind {kind!r}")


def _process_task(task):
    """One molecule -> (idx, gdb, result tuple) or (idx, gdb, reason string). Never raises."""
    idx, gdb = task[1], task[2]
    try:
        z, pos, smiles, props = _parse_task(task)
    except Exception as err:
        return idx, gdb, f"unreadable record: {type(err).__name__}: {err}", None
    try:
        y = _targets(z, props)
    except Exception as err:
        return idx, gdb, f"bad targets: {err}", smiles
    try:
        mol = perceive_bonds(z, pos, smiles=smiles)
    except BondPerceptionError as err:
        return idx, gdb, f"bond perception: {err}", smiles
    except Exception as err:  # RDKit errors of any type
        return idx, gdb, f"bond perception: {type(err).__name__}: {err}", smiles
    edge_index, bond_type = bond_arrays(mol)  # (2, E) sorted, both directions; (E,)
    edge_index, bond_type = edge_index.astype(np.int16), bond_type.astype(np.int8)
    if smiles is None:
        from rdkit import Chem

        smiles = Chem.MolToSmiles(Chem.RemoveHs(mol))
    return idx, gdb, (z.astype(np.uint8), pos.astype(np.float32), edge_index, bond_type, y, smiles), smiles


def _run(tasks: Iterator[tuple], total: int, num_workers: int, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="QM9: perceiving bonds", unit="mol", disable=not progress, mininterval=0.5)
    results = []
    try:
        if num_workers > 1 and total >= 4 * _CHUNKSIZE:
            ctx = multiprocessing.get_context()
            with ctx.Pool(num_workers) as pool:
                for res in pool.imap_unordered(_process_task, tasks, chunksize=_CHUNKSIZE):
                    results.append(res)
                    bar.update()
        else:
            for task in tasks:
                results.append(_process_task(task))
                bar.update()
    finally:
        bar.close()
    results.sort(key=lambda r: r[0])
    return results


def _encode_cache(header: dict, payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = dict(header, payload_sha256=hashlib.sha256(body).hexdigest(), payload_size=len(body))
    return _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


def _decode_cache(path: Path, expected: dict) -> Tuple[dict, dict]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _StaleCache(f"unreadable ({err})") from None
    if not raw.startswith(_MAGIC):
        raise _StaleCache("not a molkern QM9 cache (bad magic)")
    end = raw.find(b"\n", len(_MAGIC))
    try:
        header = json.loads(raw[len(_MAGIC) : end])
    except ValueError:
        raise _StaleCache("corrupt header") from None
    for key, value in expected.items():
        if header.get(key) != value:
            raise _StaleCache(f"{key} is {header.get(key)!r}, expected {value!r}")
    body = raw[end + 1 :]
    if len(body) != header.get("payload_size") or hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        raise _StaleCache("checksum mismatch (corrupt or truncated file)")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as err:
        raise _StaleCache(f"unreadable payload ({err})") from None
    return header, payload
