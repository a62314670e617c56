"""Label structures with ASE's EMT potential (offline): MD snapshots of a periodic fcc cell and of a small cluster.

    python data_scripts/make_emt_dataset.py [--out data/emt] [--element Cu] [--quick]

Writes (atomically) ``<out>/<el>_bulk.extxyz`` (periodic 2x2x2 cubic fcc cell, 32 atoms, Langevin MD at
each temperature and each isotropic lattice scale; energy eV, forces eV/A, stress eV/A^3 in ASE's Voigt
order), ``<out>/<el>_cluster.extxyz`` (38-atom truncated octahedron in vacuum, no cell, Langevin MD; energy,
forces) and ``<out>/manifest.json`` (settings, counts, seconds). Deterministic for a given ``--seed``.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from molkern.io import atomic_path, atomic_write

LATTICE = {"Cu": 3.61, "Pt": 3.92, "Ni": 3.52, "Pd": 3.89, "Ag": 4.09, "Au": 4.08, "Al": 4.05}


def snapshots(atoms, temperature, num_frames, interval, dt_fs, seed, equilibrate=200, stress=False):
    """Langevin MD with EMT (friction 0.01/fs); every ``interval`` steps a labelled copy of the atoms.

    Returns a list of ase.Atoms with a SinglePointCalculator (energy, free_energy, forces[, stress])."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = atoms.copy()
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, dt_fs * units.fs, temperature_K=temperature, friction=0.01 / units.fs, fixcm=False, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in range(num_frames):
        dyn.run(interval)
        frame = atoms.copy()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        results["free_energy"] = results["energy"]
        if stress:
            results["stress"] = atoms.get_stress()
        frame.calc = SinglePointCalculator(frame, **results)
        frames.append(frame)
    return frames


def bulk_cell(element, scale=1.0, repeat=2):
    from ase.build import bulk

    atoms = bulk(element, "fcc", a=LATTICE[element] * scale, cubic=True) * (repeat, repeat, repeat)
    return atoms


def cluster(element):
    from ase.cluster import Octahedron

    atoms = Octahedron(element, 4, cutoff=1)  # 38-atom truncated octahedron
    atoms.set_cell(np.zeros((3, 3)))
    atoms.pbc = False
    atoms.center()
    return atoms


def write_extxyz(path: Path, frames) -> None:
    import ase.io

    with atomic_path(path) as tmp:
        ase.io.write(str(tmp), frames, format="extxyz")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/emt", help="output folder (default data/emt)")
    p.add_argument("--element", default="Cu", choices=sorted(LATTICE))
    p.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 900.0], help="bulk MD, K")
    p.add_argument("--scales", type=float, nargs="+", default=[0.98, 1.0, 1.02], help="bulk lattice scales")
    p.add_argument("--cluster-temperatures", type=float, nargs="+", default=[300.0, 600.0], help="cluster MD, K")
    p.add_argument("--frames", type=int, default=60, help="snapshots per bulk (T, scale) run")
    p.add_argument("--cluster-frames", type=int, default=100, help="snapshots per cluster temperature")
    p.add_argument("--interval", type=int, default=10, help="MD steps between snapshots (5 fs steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="10 bulk / 10 cluster frames per run (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.cluster_frames = 10, 10
    start = time.perf_counter()
    out = Path(args.out)
    el = args.element
    bulk_frames, seed = [], args.seed
    for T in args.temperatures:
        for s in args.scales:
            seed += 1
            bulk_frames += snapshots(bulk_cell(el, s), T, args.frames, args.interval, 5.0, seed, stress=True)
    cluster_frames = []
    for T in args.cluster_temperatures:
        seed += 1
        cluster_frames += snapshots(cluster(el), T, args.cluster_frames, args.interval, 5.0, seed)
    files = {"bulk": out / f"{el.lower()}_bulk.extxyz", "cluster": out / f"{el.lower()}_cluster.extxyz"}
    write_extxyz(files["bulk"], bulk_frames)
    write_extxyz(files["cluster"], cluster_frames)
    manifest = {
        "element": el, "seed": args.seed, "temperatures_K": args.temperatures, "lattice_scales": args.scales,
        "cluster_temperatures_K": args.cluster_temperatures, "interval_steps": args.interval, "dt_fs": 5.0,
        "files": {k: str(v) for k, v in files.items()},
        "num_frames": {"bulk": len(bulk_frames), "cluster": len(cluster_frames)},
        "atoms_per_frame": {"bulk": len(bulk_frames[0]), "cluster": len(cluster_frames[0])},
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))
    return manifest


if __name__ == "__main__":
    main()
