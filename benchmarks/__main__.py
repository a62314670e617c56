"""``python -m benchmarks run [--quick] [--out DIR] ...`` (the suite), ``... report DIR`` (its tables and plots
again from DIR/benchmarks.json) and ``... worker`` (one measurement)."""

import argparse
import json
import sys
import traceback
from pathlib import Path


def worker(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks worker")
    parser.add_argument("tasks", help="comma-separated tasks, run in this order in this process")
    parser.add_argument("model")
    parser.add_argument("--settings", required=True, help="JSON file of the suite's settings")
    parser.add_argument("--out", required=True, help="JSON file for the row")
    args = parser.parse_args(argv)
    from molkern.io import atomic_write

    from .worker import run

    settings = json.loads(Path(args.settings).read_text())
    rows = []

    def save(partial=None):  # after every task and every scaling box: a killed worker keeps what it measured
        atomic_write(args.out, json.dumps(rows + ([partial] if partial else [])))

    for task in args.tasks.split(","):
        try:
            rows.append(run(task, args.model, settings, progress=save))
        except Exception:  # one task's failure is recorded; the process goes on with the next task
            rows.append({"model": args.model, "task": task, "status": f"failed: {traceback.format_exc()[-2000:]}"})
        save()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "report", "worker"):
        raise SystemExit("usage: python -m benchmarks run [--quick] [--out DIR] [--models ...]   "
                         "(python -m benchmarks run --help for all options)\n"
                         "       python -m benchmarks report DIR   (tables and plots again from DIR/benchmarks.json)")
    if argv[0] == "worker":
        worker(argv[1:])
    elif argv[0] == "report":
        from .suite import report

        report(argv[1:])
    else:
        from .suite import run

        run(argv[1:])


if __name__ == "__main__":
    main()
