"""Predict molecular properties of new molecules with a trained module (``molkern predict``).

``predict(module, inputs, kind=...)`` featurizes SMILES strings, sdf / mol / xyz files, RDKit Mols or
ase.Atoms with :mod:`molkern.data.featurize` (the QM9 loader's graph construction), in the graph the module
was trained on (``module.graph_spec``), batches them and calls ``module.predict_properties``. A molecule
that cannot be featurized (or predicted) is reported with the reason; the others are still predicted.

The module follows :class:`molkern.train.checkpoint.TaskModule`: ``graph_spec`` (dict: ``graph`` "bonds" |
"radius", ``cutoff`` Angstrom, ``elements`` atomic numbers in node_attr column order, optional
``edge_attr`` "bonds" | "none"), ``property_names``, ``property_units`` and ``predict_properties(batch)``
-> (num_graphs, num_properties) in those units. Without ``graph_spec["edge_attr"]`` a radius graph carries
the bond one-hot as in QM9's radius graph, unless ``module.model.irreps_edge_attr`` has dimension 0.

Outputs: :func:`format_table` (a text table, property name and unit in each header, failures listed with
their reason), :func:`write_csv`, :func:`write_json` (atomic: a temporary file, then ``os.replace``).
CLI: :func:`add_predict_arguments` / :func:`run_predict` (``molkern predict --ckpt M --smiles CCO``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch_geometric.data import Batch

from .data.bonds import ATOMIC_NUMBERS
from .data.featurize import FeaturizationError, iter_featurize
from .io import atomic_write
from .nn.constants import constant_parameters

__all__ = [
    "add_predict_arguments",
    "format_table",
    "graph_options",
    "predict",
    "run_predict",
    "write_csv",
    "write_json",
    "write_predictions",
]

_META = ("index", "input", "name", "smiles", "num_atoms")


def graph_options(module) -> Dict[str, Any]:
    """Featurization options (elements, graph, cutoff, edge_attr) that give the graphs ``module`` expects."""
    spec = dict(getattr(module, "graph_spec", None) or {})
    graph = spec.get("graph", "bonds")
    edge_attr = spec.get("edge_attr")
    if edge_attr is None:
        edge_attr = "bonds"
        irreps = getattr(getattr(module, "model", None), "irreps_edge_attr", None)
        if graph == "radius" and irreps is not None and getattr(irreps, "dim", 1) == 0:
            edge_attr = "none"
    return {
        "elements": tuple(int(e) for e in spec.get("elements", ATOMIC_NUMBERS)),
        "graph": graph,
        "cutoff": spec.get("cutoff"),
        "edge_attr": edge_attr,
    }


def _module_device(module) -> torch.device:
    dev = getattr(module, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in module.parameters() if hasattr(module, "parameters") else ():
        return p.device
    return torch.device("cpu")


def predict(
    module,
    inputs,
    kind: str = "smiles",
    batch_size: int = 32,
    **options,
) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    """Predict the module's properties for many molecules.

    Args:
        module: a trained module with ``graph_spec``, ``property_names``, ``property_units`` and
            ``predict_properties`` (e.g. ``molkern.train.checkpoint.load_module(ckpt)``).
        inputs: SMILES strings (kind "smiles"), file paths (kind "sdf", "mol", "xyz" or "file"; every molecule
            of each file), RDKit Mols ("rdkit"), ase.Atoms ("atoms"), or a mix ("auto"); one input or a list.
        kind: see :func:`molkern.data.featurize.featurize_many`.
        batch_size: molecules per forward pass.
        **options: featurization options except the graph ones (which come from ``module.graph_spec``):
            seed, num_conformers, force_field, max_attempts, max_iters (SMILES), smiles (bond-order
            template(s) for xyz / Atoms), charge, add_hs, format.

    Returns:
        (rows, failures): one dict per predicted molecule, in input order, with ``index`` (position among
        all molecules read), ``input`` (label), ``name``, ``smiles``, ``num_atoms`` and one float per
        property name (in ``module.property_units``); ``(label, reason)`` per molecule that failed.

    Example:
        >>> rows, failures = predict(module, ["CCO", "c1ccccc1O"])        # doctest: +SKIP
    """
    clash = sorted(set(options) & {"elements", "graph", "cutoff", "edge_attr"})
    if clash:
        raise TypeError(f"{clash} are set by the model's graph_spec, not by predict()")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = tuple(module.property_names)
    opts = dict(graph_options(module), **options)
    rows: List[Dict[str, Any]] = []
    failures: List[Tuple[str, str]] = []
    pending: List[Tuple[int, str, Any]] = []
    device = _module_device(module)
    was_training = bool(getattr(module, "training", False))
    if hasattr(module, "eval"):
        module.eval()

    def run(chunk):
        batch = Batch.from_data_list([d for _, _, d in chunk]).to(device)
        with torch.no_grad(), constant_parameters():  # weights folded into cached matrices (molkern.nn)
            out = module.predict_properties(batch)  # (B, P)
        out = torch.as_tensor(out).detach().to("cpu", torch.float64).reshape(len(chunk), -1)
        if out.shape[1] != len(names):
            raise ValueError(f"predict_properties gave {out.shape[1]} columns for {len(names)} property names")
        return out

    def flush():
        if not pending:
            return
        try:
            results = [(item, values) for item, values in zip(pending, run(pending))]
        except Exception:  # find the molecule(s) that break the batch, keep the others
            results = []
            for item in pending:
                try:
                    results.append((item, run([item])[0]))
                except Exception as err:
                    failures.append((item[1], f"prediction failed: {type(err).__name__}: {err}"))
        for (index, label, data), values in results:
            row = {"index": index, "input": label, "name": data.name, "smiles": data.smiles,
                   "num_atoms": int(data.num_nodes)}
            row.update({n: float(v) for n, v in zip(names, values.tolist())})
            rows.append(row)
        pending.clear()

    try:
        for index, (label, out) in enumerate(iter_featurize(inputs, kind=kind, **opts)):
            if isinstance(out, FeaturizationError):
                failures.append((label, out.reason))
                continue
            pending.append((index, label, out))
            if len(pending) >= int(batch_size):
                flush()
        flush()
    finally:
        if was_training and hasattr(module, "train"):
            module.train()
    rows.sort(key=lambda r: r["index"])
    return rows, failures


# ================================================================================================ output


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if isinstance(value, float):
        return f"{value:.6g}" if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)


def _header(name: str, unit: str) -> str:
    return f"{name} [{unit}]" if unit else name


def format_table(
    rows: Sequence[Dict[str, Any]],
    names: Sequence[str],
    units: Sequence[str],
    failures: Sequence[Tuple[str, str]] = (),
) -> str:
    """A plain-text table: one line per molecule, a column per property with its unit in the header,
    then the molecules that failed with their reason.

    Args:
        rows: as returned by :func:`predict`. names, units: ``module.property_names`` / ``property_units``.
        failures: ``(input, reason)`` pairs as returned by :func:`predict`.
    """
    if len(names) != len(units):
        raise ValueError(f"{len(names)} property names but {len(units)} units")
    show_name = any(r.get("name") != r.get("smiles") for r in rows)
    cols = (["name"] if show_name else []) + ["smiles"]
    headers = cols + [_header(n, u) for n, u in zip(names, units)]
    body = [[str(r.get(c, "")) for c in cols] + [_fmt(r.get(n)) for n in names] for r in rows]
    widths = [max([len(h)] + [len(line[k]) for line in body]) for k, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if k < len(cols) else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    if not rows:
        out.append("(no molecule predicted)")
    if failures:
        out.append("")
        out.append(f"failed ({len(failures)}):")
        out += [f"  {label}: {reason}" for label, reason in failures]
    return "\n".join(out)


def write_csv(path, rows, names, units, failures=()) -> Path:
    """CSV: columns index, input, name, smiles, num_atoms, ``<property> [<unit>]``..., error; one line per
    predicted molecule (input order), then one per failure (properties empty, ``error`` = the reason)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(_META) + [_header(n, u) for n, u in zip(names, units)] + ["error"])
    for r in rows:
        w.writerow([r.get(k, "") for k in _META] + [repr(float(r[n])) for n in names] + [""])
    for label, reason in failures:
        w.writerow(["", label, "", "", ""] + [""] * len(names) + [reason])
    return atomic_write(path, buf.getvalue())


def write_json(path, rows, names, units, failures=()) -> Path:
    """JSON: ``{"properties": [{"name", "unit"}], "molecules": rows, "failures": [{"input", "reason"}]}``."""
    doc = {
        "properties": [{"name": n, "unit": u} for n, u in zip(names, units)],
        "molecules": list(rows),
        "failures": [{"input": label, "reason": reason} for label, reason in failures],
    }
    return atomic_write(path, json.dumps(doc, indent=2) + "\n")


def write_predictions(path, rows, names, units, failures=()) -> Path:
    """Write ``.csv`` or ``.json`` by the file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return write_csv(path, rows, names, units, failures)
    if suffix == ".json":
        return write_json(path, rows, names, units, failures)
    raise ValueError(f"output {path}: unknown format {suffix!r}; use .csv or .json")


# =================================================================================================== CLI


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``molkern predict``: --ckpt, --smiles / --sdf / --mol / --xyz, --output, options."""
    parser.add_argument("--ckpt", required=True, help="trained molkern checkpoint (.ckpt)")
    src = parser.add_argument_group("molecules (any combination)")
    src.add_argument("--smiles", nargs="+", default=[], metavar="SMILES", help="SMILES strings (3D generated)")
    src.add_argument("--sdf", nargs="+", default=[], metavar="FILE", help="sdf files (every molecule)")
    src.add_argument("--mol", nargs="+", default=[], metavar="FILE", help="mol files")
    src.add_argument("--xyz", nargs="+", default=[], metavar="FILE", help="xyz files (every frame; bonds perceived)")
    parser.add_argument("--template", default=None, metavar="SMILES",
                        help="SMILES used as the bond-order template for the xyz molecules")
    parser.add_argument("--output", "-o", default=None, metavar="FILE", help="write the predictions to .csv or .json")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="ETKDG seed for SMILES (default 0)")
    parser.add_argument("--num-conformers", type=int, default=1,
                        help="conformers per SMILES; the lowest force-field energy is kept (default 1)")
    parser.add_argument("--force-field", default="auto", choices=("auto", "mmff", "uff", "none"),
                        help="relaxation of SMILES conformers (auto: MMFF94, UFF when MMFF cannot type)")
    return parser


def run_predict(args: argparse.Namespace, module=None, stream=None) -> int:
    """Run ``molkern predict``: load the checkpoint, predict, print the table, write ``--output``.

    Returns:
        0 when at least one molecule was predicted, 1 otherwise (exit code).
    """
    stream = stream or sys.stdout
    if not (args.smiles or args.sdf or args.mol or args.xyz):
        raise SystemExit("molkern predict: give molecules with --smiles, --sdf, --mol and/or --xyz")
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        raise SystemExit(f"molkern predict: --output {args.output} must end in .csv or .json")
    if module is None:
        from .train.checkpoint import load_module

        module = load_module(args.ckpt)
    names, units = tuple(module.property_names), tuple(module.property_units)
    rows: List[Dict[str, Any]] = []
    failures: List[Tuple[str, str]] = []
    smiles_opts = dict(seed=args.seed, num_conformers=args.num_conformers, force_field=args.force_field)
    jobs = [("smiles", args.smiles, smiles_opts), ("sdf", args.sdf, {}), ("mol", args.mol, {}),
            ("xyz", args.xyz, {"smiles": args.template} if args.template else {})]
    for kind, inputs, opts in jobs:
        if not inputs:
            continue
        r, f = predict(module, list(inputs), kind=kind, batch_size=args.batch_size, **opts)
        offset = len(rows) + len(failures)
        for row in r:
            row["index"] += offset
        rows += r
        failures += f
    print(format_table(rows, names, units, failures), file=stream)
    if args.output:
        path = write_predictions(args.output, rows, names, units, failures)
        print(f"wrote {len(rows)} predictions ({len(failures)} failed) to {path}", file=stream)
    return 0 if rows else 1
