"""Demo (`make demo`): train a QM9 property predictor on a CPU budget, test it, print the MAE table.

Runs `molkern fit --config configs/qm9_cpu_quick.yaml`, then `molkern test` on the best checkpoint of that
run; the test prints the MAE per target in the literature's units and writes test_mae.json and parity.png
into the run's log directory. Extra arguments are passed to both commands as overrides, e.g.

    python -m molkern.demo --trainer.max_epochs 1 --data.init_args.train_subset 2000
"""

import sys
from pathlib import Path
from typing import List, Optional

from .cli import lightning_main

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "qm9_cpu_quick.yaml"


def main(args: Optional[List[str]] = None, config: Optional[str] = None) -> dict:
    """Fit, then test the best checkpoint; returns {"best_ckpt", "log_dir", "test"} (the test metrics)."""
    overrides = list(sys.argv[1:] if args is None else args)
    config = str(config or CONFIG)
    if not Path(config).is_file():
        raise FileNotFoundError(f"demo config {config} not found (run from a clone of the molkern repository)")
    fit = lightning_main(["fit", "--config", config, *overrides])
    best = fit.trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError("the demo's fit produced no checkpoint")
    print(f"\nbest checkpoint: {best}\n")
    test = lightning_main(["test", "--config", config, "--ckpt_path", best, *overrides])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    return {"best_ckpt": best, "log_dir": test.trainer.log_dir, "test": metrics}


if __name__ == "__main__":
    main()
