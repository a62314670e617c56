#!/usr/bin/env python
"""Write the offline procedural point-cloud dataset (parametric solids and composites) in a ModelNet-40 layout.

Example::

    python data_scripts/make_shapes_dataset.py --root data/shapes --train 40 --test 10 --points 1024

"txt" (default) writes the resampled ModelNet-40 text layout (``shapes_shape_names.txt``, ``shapes_train.txt``,
``shapes_test.txt``, ``<class>/<class>_0001.txt`` with ``x,y,z,nx,ny,nz`` lines); "off" writes the meshes as
the original ModelNet-40 (``<class>/train|test/<class>_0001.off``). Both load with
``molkern.data.ModelNet(root, split)``. Deterministic in ``--seed``; rerunning with the same arguments
does nothing. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

from molkern.data.modelnet import ModelNet, write_procedural_dataset
from molkern.data.shapes import SHAPE_CLASSES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="directory to write the dataset into")
    parser.add_argument("--train", type=int, default=40, help="training shapes per class (default 40)")
    parser.add_argument("--test", type=int, default=10, help="test shapes per class (default 10)")
    parser.add_argument("--points", type=int, default=1024, help="points per shape in the text layout (default 1024)")
    parser.add_argument("--classes", nargs="+", default=list(SHAPE_CLASSES), choices=SHAPE_CLASSES, metavar="CLASS",
                        help=f"shape classes (default all {len(SHAPE_CLASSES)}: {', '.join(SHAPE_CLASSES)})")
    parser.add_argument("--format", choices=("txt", "off"), default="txt", help="on-disk layout (default txt)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    root = write_procedural_dataset(args.root, args.train, args.test, num_points=args.points, classes=args.classes,
                                    seed=args.seed, format=args.format)  # fmt: skip
    test = ModelNet(root, "test", num_points=min(args.points, 1024), cache_dir=None)
    print(f"{root}: {len(args.classes)} classes, {args.train} train + {args.test} test shapes per class "
          f"({args.format}); {test!r}; {time.perf_counter() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
