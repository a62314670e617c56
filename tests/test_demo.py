"""The demo trains end to end in its --quick setting (about 10 s)."""

import math

import torch

from molkern.demo import main


def test_demo_quick_trains():
    threads = torch.get_num_threads()
    result = main(["--quick", "--no-progress"])
    assert torch.get_num_threads() == threads  # the demo restores the thread count it changes
    assert result["num_train"] > 0 and result["num_val"] > 0
    assert math.isfinite(result["baseline_mae_ev"]) and math.isfinite(result["model_mae_ev"])
    # beating the baseline is not reliable in the quick setting (checked over seeds); the loss must fall
    losses = result["losses"]
    assert len(losses) == result["epochs"] and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
