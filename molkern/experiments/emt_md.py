"""MD and relaxation with a trained MolkernCalculator, compared against ASE's EMT (the potential it learned).

    python -m molkern.experiments.emt_md --ckpt runs/emt_cu/version_0/checkpoints/best.ckpt --out results/emt_md

Runs, for the element of the checkpoint (default Cu; the 32-atom periodic fcc cell and the 38-atom cluster of
data_scripts/make_emt_dataset.py):

1. NVE (velocity Verlet, ``--dt`` fs) from the same start with the model and with EMT: total-energy drift
   (meV/atom) and, on every ``--stride``-th frame of the model trajectory, the model's energy error against
   EMT (meV/atom, after removing the mean offset too) and force MAE (meV/A).
2. Langevin MD at ``--temperature`` K with both: radial distribution functions (periodic images included),
   their integrated absolute difference and first-peak positions; energy / force errors along the model run.
3. Relaxations: the rattled cluster (FIRE on positions) and the periodic cell with its lattice (FIRE on a
   FrechetCellFilter, using the stress), each with the model and with EMT; the EMT energy and max EMT force at
   the model's minimum, the RMSD between the two minima and the relaxed lattice constants.

Writes ``<out>/emt_md.json`` and ``<out>/emt_md.png`` (atomically). Units: eV, Angstrom, fs, K.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, save_figure

LATTICE = {"Cu": 3.61, "Pt": 3.92, "Ni": 3.52, "Pd": 3.89, "Ag": 4.09, "Au": 4.08, "Al": 4.05}


def rdf(frames, r_max=6.0, num_bins=120):
    """Radial distribution function averaged over frames (periodic images included).

    Returns: r (num_bins,) bin centres in Angstrom, g (num_bins,)."""
    from ..data.neighbors import radius_edges

    edges = np.linspace(0.0, r_max, num_bins + 1)
    hist = np.zeros(num_bins)
    density_sum = 0.0
    for atoms in frames:
        edge_index, shifts = radius_edges(atoms.positions, r_max, atoms.cell[:], atoms.pbc)
        vec = atoms.positions[edge_index[0].numpy()] - atoms.positions[edge_index[1].numpy()] + shifts.numpy()
        hist += np.histogram(np.linalg.norm(vec, axis=1), bins=edges)[0] / len(atoms)
        density_sum += len(atoms) / atoms.get_volume()
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = hist / len(frames) / (shell * density_sum / len(frames))
    return 0.5 * (edges[1:] + edges[:-1]), g


def errors_against(ref_calc, frames, model_energies, model_forces):
    """Energy error (meV/atom; raw mean |dE| and after removing the mean offset) and force MAE (meV/A)."""
    e_ref, f_err = [], []
    for atoms, f in zip(frames, model_forces):
        a = atoms.copy()
        a.calc = ref_calc
        e_ref.append(a.get_potential_energy())
        f_err.append(np.abs(a.get_forces() - f).ravel())
    n = len(frames[0])
    de = (np.asarray(model_energies) - np.asarray(e_ref)) / n
    return {
        "energy_mae_mev_atom": 1000 * float(np.abs(de).mean()),
        "energy_mae_offset_removed_mev_atom": 1000 * float(np.abs(de - de.mean()).mean()),
        "energy_offset_mev_atom": 1000 * float(de.mean()),
        "forces_mae_mev_a": 1000 * float(np.concatenate(f_err).mean()),
        "num_frames": len(frames),
    }


def run_md(atoms, calc, dyn_factory, steps, stride):
    """Run ``steps`` MD steps; returns (per-step arrays of potential / kinetic energy, list of sampled frames,
    their model energies and forces)."""
    atoms = atoms.copy()
    atoms.set_momenta(atoms.get_momenta())
    atoms.calc = calc
    dyn = dyn_factory(atoms)
    epot, ekin, frames, energies, forces = [], [], [], [], []

    def record():
        epot.append(atoms.get_potential_energy())
        ekin.append(atoms.get_kinetic_energy())
        if (len(epot) - 1) % stride == 0:
            frames.append(atoms.copy())
            energies.append(epot[-1])
            forces.append(atoms.get_forces().copy())

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - start
    return np.array(epot), np.array(ekin), frames, energies, forces, seconds


def relax(atoms, calc, fmax, steps, cell=False):
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell else atoms
    trace = []
    opt = FIRE(target, logfile=None)
    opt.attach(lambda: trace.append(atoms.get_potential_energy()))
    converged = bool(opt.run(fmax=fmax, steps=steps))
    return atoms, trace, converged


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m molkern.experiments.emt_md", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="EnergyModule checkpoint (molkern fit --config configs/emt_cu.yaml)")
    p.add_argument("--out", default="results/emt_md", help="output folder")
    p.add_argument("--element", default="Cu", choices=sorted(LATTICE))
    p.add_argument("--nve-steps", type=int, default=500)
    p.add_argument("--langevin-steps", type=int, default=1000)
    p.add_argument("--equilibrate", type=int, default=200, help="Langevin steps before RDF sampling")
    p.add_argument("--dt", type=float, default=2.0, help="time step, fs")
    p.add_argument("--temperature", type=float, default=600.0, help="Langevin temperature, K (NVE starts at it)")
    p.add_argument("--stride", type=int, default=10, help="sample every n-th MD frame")
    p.add_argument("--relax-steps", type=int, default=500, help="FIRE steps at most per relaxation")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--compile", action="store_true",
                   help="energy+forces from one compiled graph (MolkernCalculator(compile=True); ~1 min to compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads during the run, restored after (0: unchanged)")
    p.add_argument("--quick", action="store_true", help="short runs (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.nve_steps, args.langevin_steps, args.equilibrate, args.relax_steps = 40, 60, 20, 30
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.cluster import Octahedron
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import thermalize_momenta

    from ..calculator import MolkernCalculator

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = MolkernCalculator.from_checkpoint(args.ckpt, dtype=args.dtype, compile=args.compile)
    emt = EMT()
    el = args.element
    cell = bulk(el, "fcc", a=LATTICE[el], cubic=True) * (2, 2, 2)
    n = len(cell)
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(cell, temperature_K=args.temperature, rng=rng)
    result = {"checkpoint": str(args.ckpt), "element": el, "atoms": n, "dt_fs": args.dt,
              "temperature_K": args.temperature, "dtype": args.dtype, "compiled": args.compile}
    curves = {}

    # 1. NVE
    nve = {}
    for name, calc in (("model", model), ("emt", emt)):
        epot, ekin, frames, energies, forces, secs = run_md(
            cell, calc, lambda a: VelocityVerlet(a, timestep=args.dt * units.fs), args.nve_steps, args.stride)
        etot = epot + ekin
        nve[name] = {
            "drift_mev_atom": 1000 * float(etot[-1] - etot[0]) / n,
            "max_deviation_mev_atom": 1000 * float(np.abs(etot - etot[0]).max()) / n,
            "final_temperature_K": float(ekin[-1] / (1.5 * units.kB * n)),
            "ms_per_step": 1000 * secs / args.nve_steps,
        }
        curves[f"nve_{name}"] = etot
        if name == "model":
            nve["model_vs_emt"] = errors_against(emt, frames, energies, forces)
    result["nve"] = nve
    print(f"NVE ({args.nve_steps} x {args.dt} fs): model drift {nve['model']['drift_mev_atom']:.3f} meV/atom "
          f"(max dev {nve['model']['max_deviation_mev_atom']:.3f}), EMT drift {nve['emt']['drift_mev_atom']:.3f}; "
          f"model vs EMT along the model trajectory: {nve['model_vs_emt']['energy_mae_mev_atom']:.2f} meV/atom "
          f"({nve['model_vs_emt']['energy_mae_offset_removed_mev_atom']:.2f} without the mean offset), "
          f"{nve['model_vs_emt']['forces_mae_mev_a']:.1f} meV/A")

    # 2. Langevin + RDF
    lang = {}
    rdfs = {}
    for name, calc in (("model", model), ("emt", emt)):
        seed = args.seed + 1

        def factory(a, seed=seed):
            return Langevin(a, args.dt * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs,
                            fixcm=False, rng=np.random.default_rng(seed))

        epot, ekin, frames, energies, forces, secs = run_md(
            cell, calc, factory, args.equilibrate + args.langevin_steps, args.stride)
        keep = args.equilibrate // args.stride
        frames, energies, forces = frames[keep:], energies[keep:], forces[keep:]
        r, g = rdf(frames)
        rdfs[name] = g
        lang[name] = {
            "mean_temperature_K": float(ekin[args.equilibrate:].mean() / (1.5 * units.kB * n)),
            "mean_epot_ev_atom": float(epot[args.equilibrate:].mean() / n),
            "rdf_first_peak_A": float(r[np.argmax(g)]),
            "ms_per_step": 1000 * secs / (args.equilibrate + args.langevin_steps),
        }
        curves[f"langevin_{name}"] = epot / n
        if name == "model":
            lang["model_vs_emt"] = errors_against(emt, frames, energies, forces)
    dr = r[1] - r[0]
    lang["rdf_integrated_abs_difference"] = float(np.abs(rdfs["model"] - rdfs["emt"]).sum() * dr)
    lang["rdf_r_A"] = r.tolist()
    lang["rdf_model"] = rdfs["model"].tolist()
    lang["rdf_emt"] = rdfs["emt"].tolist()
    result["langevin"] = lang
    print(f"Langevin {args.temperature:.0f} K: RDF first peak model {lang['model']['rdf_first_peak_A']:.3f} A, "
          f"EMT {lang['emt']['rdf_first_peak_A']:.3f} A, integral |g_model - g_EMT| dr = "
          f"{lang['rdf_integrated_abs_difference']:.3f} A; model vs EMT along the model run: "
          f"{lang['model_vs_emt']['energy_mae_mev_atom']:.2f} meV/atom "
          f"({lang['model_vs_emt']['energy_mae_offset_removed_mev_atom']:.2f} without the mean offset), "
          f"{lang['model_vs_emt']['forces_mae_mev_a']:.1f} meV/A")

    # 3. Relaxations
    cluster = Octahedron(el, 4, cutoff=1)
    cluster.set_cell(np.zeros((3, 3)))
    cluster.pbc = False
    cluster.rattle(0.15, seed=args.seed)
    strained = bulk(el, "fcc", a=LATTICE[el] * 1.03, cubic=True) * (2, 2, 2)
    strained.rattle(0.05, seed=args.seed)
    relaxations = {}
    for label, start_atoms, use_cell in (("cluster", cluster, False), ("cell", strained, True)):
        res = {}
        minima = {}
        for name, calc in (("model", model), ("emt", emt)):
            atoms, trace, converged = relax(start_atoms, calc, fmax=0.01, steps=args.relax_steps, cell=use_cell)
            minima[name] = atoms
            curves[f"relax_{label}_{name}"] = np.array(trace) / len(atoms)
            res[name] = {"converged": converged, "steps": len(trace)}
            if use_cell:
                res[name]["lattice_constant_A"] = float(np.cbrt(atoms.get_volume() / len(atoms) * 4))
        at_model = minima["model"].copy()
        at_model.calc = emt
        e_emt_min = minima["emt"].get_potential_energy()
        excess = at_model.get_potential_energy() - e_emt_min
        res["emt_energy_above_emt_minimum_mev_atom"] = 1000 * float(excess) / len(at_model)
        res["emt_max_force_at_model_minimum_ev_a"] = float(np.linalg.norm(at_model.get_forces(), axis=1).max())
        d = minima["model"].positions - minima["emt"].positions
        d -= d.mean(0)
        res["rmsd_model_vs_emt_minimum_A"] = float(np.sqrt((d ** 2).sum(1).mean()))
        relaxations[label] = res
    result["relaxation"] = relaxations
    rc, rl = relaxations["cluster"], relaxations["cell"]
    print(f"relaxation: cluster RMSD {rc['rmsd_model_vs_emt_minimum_A']:.4f} A, EMT energy at model minimum "
          f"+{rc['emt_energy_above_emt_minimum_mev_atom']:.3f} meV/atom, EMT max force there "
          f"{rc['emt_max_force_at_model_minimum_ev_a']:.3f} eV/A; cell: a = {rl['model']['lattice_constant_A']:.4f} A "
          f"(EMT {rl['emt']['lattice_constant_A']:.4f} A)")
    result["seconds"] = round(time.perf_counter() - start, 1)

    _plot(out / "emt_md.png", curves, lang, args, n)
    atomic_write(out / "emt_md.json", json.dumps(result, indent=2))
    print(f"wrote {out / 'emt_md.json'} and {out / 'emt_md.png'} ({result['seconds']} s)")
    return result


def _plot(path: Path, curves, lang, args, n):
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    fig = Figure(figsize=(11, 8))
    ax = fig.subplots(2, 2)
    for name, style in (("model", "-"), ("emt", "--")):
        e = curves[f"nve_{name}"]
        t = np.arange(len(e)) * args.dt
        ax[0, 0].plot(t, 1000 * (e - e[0]) / n, style, label=name)
        e = curves[f"langevin_{name}"]
        ax[0, 1].plot(np.arange(len(e)) * args.dt, e, style, label=name)
    ax[0, 0].set(xlabel="time (fs)", ylabel="E_tot - E_tot(0) (meV/atom)", title="NVE")
    ax[0, 1].set(xlabel="time (fs)", ylabel="E_pot (eV/atom)", title=f"Langevin {args.temperature:.0f} K")
    ax[1, 0].plot(lang["rdf_r_A"], lang["rdf_model"], "-", label="model")
    ax[1, 0].plot(lang["rdf_r_A"], lang["rdf_emt"], "--", label="EMT")
    ax[1, 0].set(xlabel="r (A)", ylabel="g(r)", title="radial distribution function")
    for label in ("cluster", "cell"):
        for name, style in (("model", "-"), ("emt", "--")):
            e = curves[f"relax_{label}_{name}"]
            ax[1, 1].plot(e - e[-1] + 1e-6, style, label=f"{label} {name}")
    ax[1, 1].set(xlabel="FIRE step", ylabel="E - E_final (eV/atom)", title="relaxation", yscale="log")
    for a in ax.ravel():
        a.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
