"""Shared fixtures: small random graphs and the elements outside each group used to show broken symmetry."""

import math

import pytest
import torch
from e3nn import o3

import molkern.groups as groups

ALL_PARITIES = "0e+0o+1o+1e+2e+2o"

# name -> (params, an element outside the group)
GROUP_CASES = {
    "o3": ({}, None),
    "so3": ({}, lambda: -torch.eye(3, dtype=torch.float64)),
    "so2": ({}, lambda: o3.matrix_x(torch.tensor(math.pi / 2, dtype=torch.float64))),
    "o2": ({}, lambda: -torch.eye(3, dtype=torch.float64)),
    "cinfh": ({}, lambda: torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))),
    "dinf": ({}, lambda: -torch.eye(3, dtype=torch.float64)),
    "cn": ({"n": 3}, lambda: o3.matrix_z(torch.tensor(math.pi / 3, dtype=torch.float64))),
    "dn": ({"n": 2}, lambda: o3.matrix_z(torch.tensor(math.pi / 2, dtype=torch.float64))),
    "ci": ({}, lambda: o3.matrix_z(torch.tensor(math.pi / 2, dtype=torch.float64))),
    "cs": ({}, lambda: -torch.eye(3, dtype=torch.float64)),
    "c1": ({}, lambda: o3.matrix_y(torch.tensor(0.7, dtype=torch.float64))),
}


def count_ops(fn) -> int:
    """ATen ops one fn() call dispatches (benchmarks.opcount's counter, which the suite's op counts use)."""
    from benchmarks.opcount import count_ops as count

    return count(fn)["ops"]


def make_group(name):
    params, outside = GROUP_CASES[name]
    group = groups.get(name, **params)
    R_out = outside() if outside else None
    if R_out is not None:
        assert not bool(group.contains(R_out)), f"test set-up: {R_out} should lie outside {group!r}"
    return group, R_out


def random_graph(num_nodes=6, dtype=torch.float64, seed=0, cutoff=5.0):
    """(pos (N,3), edge_index (2,E)) with all pairs closer than cutoff, no self-loops."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(num_nodes, 3, generator=g, dtype=dtype) * 1.2
    d = torch.cdist(pos, pos)
    src, dst = torch.nonzero((d < cutoff) & (d > 0), as_tuple=True)
    return pos, torch.stack([src, dst])


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


def pytest_configure(config):
    # tiny tensors: one thread avoids contention on 2-core machines (tests only; molkern itself sets no threads)
    torch.set_num_threads(1)
