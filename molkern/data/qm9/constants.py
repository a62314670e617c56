"""QM9 constants: sizes, units, target names and units, atom reference energies; the targets' conversion."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np


FORMAT_VERSION = 1  # bump whenever processing (parsing, bond perception, units) or the payload layout changes
NUM_MOLECULES = 130_831  # characterised molecules
NUM_GDB9 = 133_885  # all GDB-9 molecules, 3,054 of them uncharacterized
HARTREE_TO_EV = 27.211386246
HARTREE_TO_MEV = HARTREE_TO_EV * 1000.0

TARGET_NAMES: Tuple[str, ...] = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")
TARGET_UNITS: Tuple[str, ...] = (
    "D", "bohr^3", "meV", "meV", "meV", "bohr^2", "meV", "meV", "meV", "meV", "meV", "cal/(mol K)",
)
_MEV_TARGETS = {"homo", "lumo", "gap", "zpve", "U0", "U", "H", "G"}

# free-atom energies (Hartree) of H, C, N, O, F: B3LYP/6-31G(2df,p), as in PyG's QM9.atomref
# (its eV values / 27.211386246, rounded to 1e-6 Ha)
ATOM_REF_HARTREE: Dict[str, Dict[int, float]] = {
    "U0": {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064578, 9: -99.718729},
    "U": {1: -0.498857, 6: -37.845355, 7: -54.582445, 8: -75.063162, 9: -99.717313},
    "H": {1: -0.497912, 6: -37.844411, 7: -54.581501, 8: -75.062218, 9: -99.716369},
    "G": {1: -0.510927, 6: -37.861317, 7: -54.598897, 8: -75.079531, 9: -99.733543},
}

SOURCES = ("qm9pack", "xyz", "pyg")
GRAPHS = ("bonds", "radius")

_QM9PACK_COLUMNS = (  # qm9pack header names of the 12 targets, in TARGET_NAMES order
    "Dipole_debye", "Polarizability_bohr3", "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au", "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)
_PYG_COLUMNS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "u0", "u298", "h298", "g298", "cv")


class QM9CacheWarning(UserWarning):
    """A cached QM9 file was stale or corrupt and is being rebuilt."""


class _StaleCache(Exception):
    pass


def _targets(z: np.ndarray, props: Sequence[float]) -> np.ndarray:
    """Raw properties (D, bohr^3, Ha x5, bohr^2, Ha, Ha x4 totals, cal/(mol K)) -> the 12 targets in their units."""
    y = np.array(props, dtype=np.float64)
    if y.shape != (12,):
        raise ValueError(f"expected 12 properties, got {y.shape}")
    for k, name in enumerate(TARGET_NAMES):
        if name in ATOM_REF_HARTREE:
            ref = ATOM_REF_HARTREE[name]
            y[k] -= sum(ref[int(zi)] for zi in z)
        if name in _MEV_TARGETS:
            y[k] *= HARTREE_TO_MEV
    if not np.isfinite(y).all():
        raise ValueError("non-finite target values")
    return y
