"""molkern.allocator.keep_freed_memory: a training step's freed activations are reused, not page-faulted in again."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, torch
    from molkern.allocator import keep_freed_memory
    from molkern.models import MolkernNet
    applied = keep_freed_memory()
    torch.manual_seed(0)
    pos = torch.rand(400, 3) * 20.0  # 400 atoms in a 20 A box, 5 A cutoff: ~10,000 edges
    edge_index = ((torch.cdist(pos, pos) < 5.0) & ~torch.eye(400, dtype=torch.bool)).nonzero().t()
    attrs = torch.nn.functional.one_hot(torch.randint(0, 5, (400,)), 5).float()
    net = MolkernNet(num_channels=32, lmax=2, num_layers=2)
    faults = []
    for _ in range(6):  # training-like steps: forward, backward, activations freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(pos, attrs, edge_index).sum().backward()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, ",".join(map(str, faults)))
""")


def last_step_faults(opt_in: str):
    # the unfused convolution: its large per-edge tensors are what glibc's defaults return to the OS each step
    env = {**os.environ, "MOLKERN_KEEP_FREED_MEMORY": opt_in, "OMP_NUM_THREADS": "1", "MOLKERN_FUSED": "0"}
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", [int(f) for f in faults.split(",")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_repeated_steps():
    applied, kept = last_step_faults("1")
    default_applied, default = last_step_faults("0")  # opt-out: glibc's defaults
    assert applied and not default_applied
    if sum(default[-3:]) < 100:  # seen once at the start of a full run: glibc's own thresholds already held it all
        pytest.skip(f"glibc's defaults did not fault either this time: {default}")
    # steady state: the last three steps together (one step may still touch lazily loaded pages)
    assert sum(kept[-3:]) < 0.2 * sum(default[-3:]), (kept, default)
