"""The literature's QM9 splits ("cormorant", "dimenet") over the 130,831 characterised molecules."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .constants import NUM_MOLECULES


def split_indices(
    name: str, num_molecules: int = NUM_MOLECULES, train_subset: Optional[int] = None
) -> Dict[str, np.ndarray]:
    """See :meth:`QM9.split_indices`."""
    name = name.lower()
    if name == "cormorant":
        # = np.random.seed(0); np.random.permutation(n), without touching numpy's global generator
        perm = np.random.RandomState(0).permutation(num_molecules)
        n_train = 100_000 if num_molecules == NUM_MOLECULES else int(round(num_molecules * 100_000 / NUM_MOLECULES))
        n_test = int(0.1 * num_molecules)
        n_val = num_molecules - n_train - n_test
        train, val, test = np.split(perm, [n_train, n_train + n_val])
    elif name == "dimenet":
        perm = np.random.RandomState(42).permutation(num_molecules)
        if num_molecules == NUM_MOLECULES:
            n_train, n_val = 110_000, 10_000
        else:
            n_train = int(round(num_molecules * 110_000 / NUM_MOLECULES))
            n_val = int(round(num_molecules * 10_000 / NUM_MOLECULES))
        train, val, test = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    else:
        raise ValueError(f"unknown QM9 split {name!r}; choose 'cormorant' or 'dimenet'")
    if train_subset is not None:
        if not 0 < int(train_subset) <= len(train):
            raise ValueError(f"train_subset must be in 1..{len(train)}, got {train_subset}")
        train = train[: int(train_subset)]
    return {"train": train.astype(np.int64), "val": val.astype(np.int64), "test": test.astype(np.int64)}
