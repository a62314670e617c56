"""The suite's outputs: benchmarks.json, benchmarks.md (all tables), README_snippet.md and PNG plots."""

import json
from pathlib import Path

from molkern.io import atomic_write


def _get(result, task, name, key):
    row = result["results"].get(task, {}).get(name, {})
    return row.get(key) if row.get("status") == "ok" else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _scaling_flatness(result, name, key="us_per_atom", min_atoms=100):
    """(max / min ``key`` over the measured boxes of at least ``min_atoms`` atoms (the issue's range starts at
    100), smallest atoms, largest atoms) or None."""
    row = result["results"].get("scaling", {}).get(name, {})
    pts = [p for p in row.get("points", [])
           if p.get("status") == "ok" and p.get(key) is not None and p["atoms"] >= min_atoms]
    if len(pts) < 2:
        return None
    costs = [p[key] for p in pts]
    return max(costs) / min(costs), pts[0]["atoms"], pts[-1]["atoms"]


def targets(result) -> list:
    """Issue 7's targets as (what, value, goal, met) rows, for the molkern models that ran."""
    rows = []
    def add(what, value, goal, met):
        rows.append({"target": what, "value": value, "goal": goal,
                     "met": None if value is None or goal == "report" else bool(met(value))})

    molkern = [n for n, s in result["models"].items() if s["family"] == "molkern" and s["status"] == "run"]
    for name in molkern:
        lmax = result["models"][name]["lmax"]
        nequip = f"nequip-l{lmax}"
        for phase, what in (("train_energy", "training"), ("train_forces", "E+F training")):
            ours, ours_compiled = (_get(result, "qm9", name, f"{phase}{k}") for k in ("_mol_per_s", "_compiled_mol_per_s"))
            for peer, goal in ((nequip, 3), ("dimenet++", 1)):
                if lmax == 2 and peer in result["results"].get("qm9", {}):
                    ref = _get(result, "qm9", peer, f"{phase}_mol_per_s")
                    add(f"{name} {what} mol/s / {peer}", _ratio(ours, ref), f">= {goal}", lambda v, g=goal: v >= g)
                    if ours_compiled is not None:
                        add(f"{name} compiled {what} mol/s / {peer} (eager)", _ratio(ours_compiled, ref),
                            f">= {goal}", lambda v, g=goal: v >= g)
        for peer in ("painn", "painn-reimpl", "schnet"):
            if peer in result["results"].get("latency", {}):
                peer_ms = _get(result, "latency", peer, "latency_ms")
                add(f"{name} 1-molecule E+F latency / {peer}", _ratio(_get(result, "latency", name, "latency_ms"),
                                                                       peer_ms), "<= 1", lambda v: v <= 1)
                compiled = _get(result, "latency", name, "compiled_latency_ms")
                if compiled is not None:
                    add(f"{name} compiled 1-molecule E+F latency / {peer}", _ratio(compiled, peer_ms), "<= 1",
                        lambda v: v <= 1)
        for key, label in (("us_per_atom", ""), ("compiled_us_per_atom", " compiled")):
            flat = _scaling_flatness(result, name, key)
            if flat:
                add(f"{name}{label} E+F us/atom max/min, {flat[1]}-{flat[2]} atoms", flat[0], "<= 1.10",
                    lambda v: v <= 1.10)
        standard = f"molkern-standard-l{lmax}"
        if result["models"][name]["kernel"] != "standard" and standard in result["results"].get("qm9", {}):
            add(f"{name} training step time / {standard}",
                _ratio(_get(result, "qm9", standard, "train_energy_mol_per_s"),
                       _get(result, "qm9", name, "train_energy_mol_per_s")), "<= 1", lambda v: v <= 1)
        if result["models"][name]["kernel"] != "standard" and standard in result["results"].get("conv", {}):
            add(f"{name} conv fwd+bwd time / {standard}",
                _ratio(_get(result, "conv", name, "fwd_bwd_ms"), _get(result, "conv", standard, "fwd_bwd_ms")),
                "<= 1", lambda v: v <= 1)
        peak = _get(result, "machine", "-", "matmul_gflop_per_s")
        add(f"{name} conv fwd GFLOP/s / matmul peak",
            _ratio(_get(result, "conv", name, "fwd_gflop_per_s"), peak), "report", None)
    return rows


def _fmt(value, spec=".0f"):
    return "" if value is None else format(value, spec)


def summary_table(result) -> str:
    lines = ["| model | params | train mol/s (E) | compiled train mol/s (E) | train mol/s (E+F) | compiled train mol/s (E+F) "
             "| inference mol/s | 1-mol E+F ms (1 thread) "
             "| vesin NL ms | ASE step ms | compiled E+F ms / ASE step ms | E+F us/atom, smallest / largest box | train peak MB (E) | ops / train step "
             "| ops / MD step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, spec in result["models"].items():
        label = f"{name} (re-implementation)" if spec.get("reimplementation") else name
        if spec["status"] != "run":
            lines.append(f"| {label} | {spec['status']} | | | | | | | | | | | | | |")
            continue
        q = lambda k: _get(result, "qm9", name, k)  # noqa: E731
        lat = lambda k: _get(result, "latency", name, k)  # noqa: E731
        pts = [p for p in result["results"].get("scaling", {}).get(name, {}).get("points", [])
               if p.get("status") == "ok"]
        scaling = f"{pts[0]['us_per_atom']:.0f} / {pts[-1]['us_per_atom']:.0f}" if pts else ""
        compiled = (f"{lat('compiled_latency_ms'):.1f} / {lat('compiled_ase_step_ms'):.1f}"
                    if lat("compiled_latency_ms") is not None else "")
        failed = [f"{t}: {r['status'][:60]}" for t, by in result["results"].items()
                  for n, r in by.items() if n == name and r.get("status") != "ok"]
        params = next((r["params"] for by in result["results"].values() for n, r in by.items()
                       if n == name and r.get("params")), None)
        lines.append(f"| {label}{' (' + '; '.join(failed) + ')' if failed else ''} | {_fmt(params, ',')} "
                     f"| {_fmt(q('train_energy_mol_per_s'))} | {_fmt(q('train_energy_compiled_mol_per_s'))} "
                     f"| {_fmt(q('train_forces_mol_per_s'))} | {_fmt(q('train_forces_compiled_mol_per_s'))} "
                     f"| {_fmt(q('inference_mol_per_s'))} | {_fmt(lat('latency_ms'), '.1f')} "
                     f"| {_fmt(lat('neighbor_list_ms'), '.2f')} | {_fmt(lat('ase_step_ms'), '.1f')} | {compiled} | {scaling} "
                     f"| {_fmt(q('train_energy_peak_mb'))} | {_fmt(q('train_energy_ops'), ',')} "
                     f"| {_fmt(lat('md_step_ops'), ',')} |")
    return "\n".join(lines)


def scaling_table(result) -> str:
    rows = result["results"].get("scaling", {})
    sizes = sorted({(p["k"], p["atoms"]) for r in rows.values() for p in r.get("points", [])})
    if not sizes:
        return "(not run)"
    lines = ["| model | " + " | ".join(f"{a} atoms" for _, a in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for name, r in rows.items():
        by_k = {p["k"]: p for p in r.get("points", [])}
        cells = []
        for k, _ in sizes:
            p = by_k.get(k)
            cells.append("" if p is None else f"{p['us_per_atom']:.0f}" if p.get("status") == "ok"
                         else p.get("status", "")[:20])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if any("compiled_us_per_atom" in p for p in r.get("points", [])):
            cells = [f"{by_k[k]['compiled_us_per_atom']:.0f}" if "compiled_us_per_atom" in by_k.get(k, {}) else ""
                     for k, _ in sizes]
            lines.append(f"| {name} compiled | " + " | ".join(cells) + " |")
    nl = {}
    for r in rows.values():
        for p in r.get("points", []):
            nl.setdefault(p["k"], []).append(1e3 * p["neighbor_list_ms"] / p["atoms"])
    lines.append("| vesin neighbour list | " + " | ".join(f"{min(nl[k]):.1f}" if k in nl else "" for k, _ in sizes)
                 + " |")
    return "\n".join(lines)


def conv_table(result) -> str:
    rows = result["results"].get("conv", {})
    if not rows:
        return "(not run)"
    peak = _get(result, "machine", "-", "matmul_gflop_per_s")
    lines = [f"| model | useful MFLOP (all blocks) | fwd ms | fwd GFLOP/s | % of matmul peak ({_fmt(peak)} GFLOP/s) "
             "| fwd+bwd ms | fwd+bwd GFLOP/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status', '')[:80]} | | | | | |")
            continue
        frac = _ratio(r["fwd_gflop_per_s"], peak)
        lines.append(f"| {name} | {r['useful_mflop']:.1f} | {r['fwd_ms']:.2f} | {r['fwd_gflop_per_s']:.2f} "
                     f"| {_fmt(None if frac is None else 100 * frac, '.1f')} | {r['fwd_bwd_ms']:.2f} "
                     f"| {r['fwd_bwd_gflop_per_s']:.2f} |")
    return "\n".join(lines)


def targets_table(result) -> str:
    if not result.get("targets"):
        return ""
    lines = ["| target | value | goal | met |", "|---|---:|---|---|"]
    for t in result["targets"]:
        met = "" if t["met"] is None else ("yes" if t["met"] else "no")
        met = "" if t["goal"] == "report" else met
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.2f')} | {t['goal']} | {met} |")
    return "\n".join(lines)


def header(result) -> str:
    m, s = result["machine"], result["settings"]
    peak = _get(result, "machine", "-", "matmul_gflop_per_s")
    return (f"`{result['command']}` on {m.get('cpu_model', m['processor'])} ({m['cpu_count']} cores), "
            f"torch {m['torch']}, e3nn {m['e3nn']}, PyG {m['torch_geometric']}"
            + (f", nequip {m['nequip']}" if "nequip" in m else "")
            + f"; {s['threads']} threads, float32, {'QUICK (smoke test, not for quoting)' if s['quick'] else 'full'}"
            + f" mode, {s['date']}; fp32 matmul peak {_fmt(peak)} GFLOP/s; "
            + (f"load average at end {', '.join(f'{x:.1f}' for x in s['loadavg_1_5_15_at_end'])}."
               if "loadavg_1_5_15_at_end" in s else "run cut short (the measurements it finished)."))


def markdown(result) -> str:
    s = result["settings"]
    parts = ["# molkern benchmark suite", "", header(result), "",
             f"QM9 batches of {s['batch_size']} molecules ({s['num_batches']} batches), 5 A radius graph; "
             f"boxes: periodic water, k^3 molecules for k in {s['box_sizes']}.", "",
             "## Summary", "", summary_table(result), "",
             "## Energy+forces cost per atom, periodic water boxes (us/atom)", "", scaling_table(result), "",
             "## Convolution: useful tensor-product FLOPs / time", "", conv_table(result), "",
             "## Issue 7 targets", "", targets_table(result), "", "## Models", ""]
    for name, spec in result["models"].items():
        desc = next((r.get("description") for by in result["results"].values() for n, r in by.items()
                     if n == name and r.get("description")), None)
        parts.append(f"- **{name}**: {desc or spec['status']}")
    parts += ["", "## Method", ""] + [f"- **{k}**: {v}" for k, v in result["method"].items()]
    return "\n".join(parts) + "\n"


def readme_snippet(result) -> str:
    return "\n".join(["### Performance (CPU)", "", header(result), "", summary_table(result), "",
                      "Energy+forces cost per atom in periodic water boxes (us/atom):", "", scaling_table(result), "",
                      "Full tables, method and the issue's targets: `benchmarks/results/benchmarks.md`."]) + "\n"


def plots(result, out: Path) -> list:
    """scaling.png (us/atom vs atoms) and throughput.png (training / inference mol/s); returns the files."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    files = []
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for name, r in result["results"].get("scaling", {}).items():
        pts = [p for p in r.get("points", []) if p.get("status") == "ok"]
        if pts:
            ax.plot([p["atoms"] for p in pts], [p["us_per_atom"] for p in pts], "o-", label=name)
        pts = [p for p in pts if "compiled_us_per_atom" in p]
        if pts:
            ax.plot([p["atoms"] for p in pts], [p["compiled_us_per_atom"] for p in pts], "s--",
                    label=f"{name} compiled")
    ax.set(xscale="log", xlabel="atoms (periodic water box)", ylabel="energy+forces, us per atom",
           title="Cost per atom vs system size (flat = linear scaling)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    files.append(out / "scaling.png")

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    rows = {n: r for n, r in result["results"].get("qm9", {}).items() if r.get("status") == "ok"}
    keys = [("train_energy_mol_per_s", "train E"), ("train_forces_mol_per_s", "train E+F"),
            ("inference_mol_per_s", "inference")]
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        ax.bar([j + i * width for j in range(len(rows))], [r[key] for r in rows.values()], width, label=label)
    ax.set_xticks([j + width for j in range(len(rows))], list(rows), rotation=45, ha="right", fontsize=7)
    ax.set(yscale="log", ylabel="molecules / s", title="QM9 throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    files.append(out / "throughput.png")
    return files


def write_all(result, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["files"] = [str(p.name) for p in plots(result, out)] + ["benchmarks.md", "README_snippet.md"]
    atomic_write(out / "benchmarks.json", json.dumps(result, indent=2))
    atomic_write(out / "benchmarks.md", markdown(result))
    atomic_write(out / "README_snippet.md", readme_snippet(result))
