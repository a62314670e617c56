"""QM9 (130,831 molecules) as PyTorch Geometric graphs, processed once and cached, with no download.

Sources (`source=`):
    * ``"qm9pack"`` (default): the CSV files shipped by the PyPI package ``qm9pack`` (coordinates in Angstrom,
      the B3LYP-relaxed SMILES, properties in Hartree / Debye / bohr units). The package is located with
      ``importlib.metadata`` and never imported (its ``__init__`` needs setuptools' ``pkg_resources``).
    * ``"xyz"``: the original ``dsgdb9nsd_*.xyz`` files, as a folder or as the ``dsgdb9nsd.xyz.tar.bz2``
      archive (``raw_path=``). Numbers written like ``1.2*^-6`` are read. The B3LYP-relaxed SMILES (second
      SMILES of the file) is the bond-order template. The 3,054 "uncharacterized" molecules are skipped, using
      ``uncharacterized=`` or an ``uncharacterized.txt`` next to the files, else the list implied by qm9pack.
    * ``"pyg"``: PyTorch Geometric's raw files ``gdb9.sdf``, ``gdb9.sdf.csv`` and ``uncharacterized.txt`` in
      ``raw_path`` (default ``root/raw``). Coordinates come from the sdf; the bond-order template is the
      SMILES of the sdf record (when it sanitizes; otherwise bond orders come from RDKit alone).

Molecule ordering: ``idx`` is the position of a molecule among the 130,831 characterised GDB-9 molecules
sorted by their GDB number (the ordering of PyG, qm9pack and every published split). Each item keeps it
in ``data.idx`` (and ``data.name = "gdb_<GDB number>"``).

Bonds (see :mod:`molkern.data.bonds`): connectivity from the 3D structure with RDKit's
``DetermineConnectivity`` (the distance rule, then extended Hueckel when that does not give the SMILES graph),
bond orders and formal charges from the molecule's SMILES used as a template; the SMILES graph must match the
perceived connectivity exactly.
On the bundled data 4 of 130,831 molecules fail this way (strained polycyclic cages whose relaxed geometry
does not give the SMILES graph). **Aromatic convention:** molecules are
kekulized (``clearAromaticFlags=True``) before encoding, so ``edge_attr`` is a 3-column one-hot (single,
double, triple) and aromatic rings appear as alternating single/double bonds.

Molecules whose bonds cannot be perceived are *not* items of the dataset, but they are never dropped in
silence: ``dataset.report["failed"]`` (also written as JSON next to the cache) lists each one with its
``idx``, GDB name and reason, and ``dataset.report["failed_per_split"]`` says how many fall in each part of
the named splits. Splits are defined over the full 130,831 ordering (so they equal the literature's);
:meth:`QM9.subset` and :meth:`QM9.splits` skip the molecules that have no item.

Targets (``data.y``, shape (1, 12), float32), the 12 standard ones, in the units results are reported in:
    mu (D), alpha (bohr^3), homo, lumo, gap (meV), r2 (bohr^2), zpve (meV), U0, U, H, G (meV, *atomization*
    energies: the molecule's energy minus the free-atom reference energies of its atoms), Cv (cal/(mol K)).
    Hartree -> meV uses 27.211386246 eV/Ha (CODATA 2018, as PyG). The atom references are the GDB-9
    B3LYP/6-31G(2df,p) free-atom energies in Hartree (:data:`ATOM_REF_HARTREE`, the values behind PyG's
    ``QM9.atomref``).

Graphs (``graph=``):
    * ``"bonds"`` (default, the paper's): ``edge_index`` holds the covalent bonds in both directions.
    * ``"radius"``: every ordered pair of distinct atoms closer than ``cutoff`` Angstrom (vesin neighbour
      list); ``edge_attr`` is the bond one-hot when the pair is bonded and all zeros otherwise, so models
      see the same 3 columns with either graph. Bonded pairs farther apart than the cutoff are not added.

Cache: ``root/processed/qm9_<source>[_first<N>].pt`` holds a header (format version, source kind, a hash of
the raw source, ``max_molecules``, a sha256 of the payload) and the tensors; it is written atomically (a
temporary file in the same directory, then ``os.replace``). A cache whose header or checksum does not match
is reported with a :class:`QM9CacheWarning` and rebuilt; it is never used silently. Source hashes: sha256 of
the bytes of each raw file; for a folder of xyz files, of the names, sizes and modification times.
"""

from .constants import (
    ATOM_REF_HARTREE, FORMAT_VERSION, HARTREE_TO_EV, HARTREE_TO_MEV, NUM_GDB9, NUM_MOLECULES, TARGET_NAMES,
    TARGET_UNITS, QM9CacheWarning,
)
from .dataset import QM9
from .sources import qm9pack_files, read_uncharacterized
from .splits import split_indices

__all__ = [
    "ATOM_REF_HARTREE",
    "FORMAT_VERSION",
    "HARTREE_TO_EV",
    "NUM_MOLECULES",
    "QM9",
    "QM9CacheWarning",
    "TARGET_NAMES",
    "TARGET_UNITS",
    "qm9pack_files",
]
