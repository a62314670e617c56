#!/usr/bin/env python
"""Generate the N-body datasets (train / val / test for each plane-spring stiffness k) into a cache.

Example::

    python data_scripts/generate_nbody.py --root data/nbody --stiffness 0 1 2 5 --seed 42

Each split is written as one file under ``--root`` (see ``molkern.data.nbody.NBody``); an existing
valid file is reused, so running the script twice costs nothing. ``NBody(root, split, stiffness=k,
num_samples=n, seed=s)`` with the same arguments then loads the file. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tqdm.auto import tqdm

from molkern.data.nbody import DEFAULT_SIZES, NBody

QUICK_SIZES = {"train": 16, "val": 8, "test": 8}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="cache directory to write the datasets into")
    parser.add_argument(
        "--stiffness", type=float, nargs="+", required=True, metavar="K", help="plane-spring stiffness values k >= 0"
    )
    parser.add_argument("--seed", type=int, default=42, help="base seed; each split derives its own (default 42)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--num-val", type=int, default=DEFAULT_SIZES["val"])
    parser.add_argument("--num-test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument(
        "--quick", action="store_true", help=f"tiny sizes for a smoke test ({QUICK_SIZES}); overrides --num-*"
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if a valid cache file exists")
    args = parser.parse_args(argv)
    for k in args.stiffness:
        if not k >= 0:
            parser.error(f"--stiffness values must be >= 0, got {k}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    for name in ("num_train", "num_val", "num_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sizes = dict(QUICK_SIZES) if args.quick else {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    jobs = [(k, split) for k in args.stiffness for split in ("train", "val", "test")]
    written = []
    for k, split in tqdm(jobs, desc="N-body datasets", unit="split"):
        start = time.perf_counter()
        ds = NBody(args.root, split, stiffness=k, num_samples=sizes[split], seed=args.seed, force_reload=args.force)
        how = "reused" if ds.loaded_from_cache else f"generated in {time.perf_counter() - start:.1f} s"
        written.append((k, split, len(ds), ds.path, how))
    for k, split, n, path, how in written:
        print(f"k={k:g} {split:5s} n={n:5d} -> {path} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
