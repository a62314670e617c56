"""N-body simulator (physics, symmetry, protocol) and the cached NBody dataset."""

import importlib.util
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.loader import DataLoader

import molkern.data.nbody as nbody
from molkern.data import NBody, Trajectories, simulate

ROOT = Path(__file__).resolve().parents[1]
KAPPA = 0.1
DT = 0.001


# --- independent reference implementations ---------------------------------------------------------
def reference_forces(x, e, L, k, clip):
    """Pair-by-pair forces for one system, written like the authors' code (no matrices)."""
    f = np.zeros_like(x)
    for i in range(5):
        for j in range(5):
            if i != j:
                f[i] -= KAPPA * e[i, j] * (x[i] - x[j])
        f[i, 2] -= k * (x[i, 2] - L[i])
    return np.clip(f, -100, 100) if clip else f


def reference_simulate(x0, v0, e, L, k, num_steps, sample_every, clip=True):
    """background.md 4.3: initial kick, then (drift, record, kick)."""
    x, v = x0.copy(), v0 + DT * reference_forces(x0, e, L, k, clip)
    frames = []
    for i in range(1, num_steps):
        x = x + DT * v
        if i % sample_every == 0:
            frames.append((x.copy(), v.copy()))
        v = v + DT * reference_forces(x, e, L, k, clip)
    return np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames])


def energy(traj, k, half_kick=False):
    """Total energy per (system, frame): kinetic + 0.5 kappa sum_{i<j} e_ij |x_i-x_j|^2 + 0.5 k sum (z_i-L_i)^2.

    The recorded velocity is the backward difference (x_n - x_{n-1}) / dt of symplectic Euler, half a
    step behind the position, so H(x_n, v_n) oscillates at O(dt). With ``half_kick`` the velocity is
    moved to the position's time (v + dt/2 F(x)), which removes the O(dt) term.
    """
    x, v, e, L = traj.positions, traj.velocities, traj.springs, traj.rest_lengths
    if half_kick:
        f = np.stack([nbody.forces(x[:, m], e, L, k, clip=False) for m in range(x.shape[1])], axis=1)
        v = v + 0.5 * DT * f
    kinetic = 0.5 * (v**2).sum(axis=(-1, -2))
    pot = np.zeros_like(kinetic)
    for i in range(5):
        for j in range(i + 1, 5):
            pot += 0.5 * KAPPA * e[:, None, i, j] * ((x[:, :, i] - x[:, :, j]) ** 2).sum(-1)
    pot += 0.5 * k * ((x[..., 2] - L[:, None]) ** 2).sum(-1)
    return kinetic + pot


def rotate(initial, R):
    pos0, vel0, springs, rest = initial
    return pos0 @ R.T, vel0 @ R.T, springs, rest


def rot_z(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


ROT_X_90 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


# --- simulator --------------------------------------------------------------------------------------
def test_shapes_and_initial_distribution():
    traj = simulate(6, 1.0, 0)
    assert isinstance(traj, Trajectories)
    pos, vel, springs, rest = traj  # tuple-unpackable
    assert pos.shape == vel.shape == (6, 49, 5, 3) and pos.dtype == np.float64
    assert springs.shape == (6, 5, 5) and rest.shape == (6, 5)
    assert np.array_equal(springs, springs.transpose(0, 2, 1))
    assert np.all(np.diagonal(springs, axis1=1, axis2=2) == 0) and set(np.unique(springs)) <= {0.0, 1.0}
    assert np.all((rest >= 0) & (rest < 1))

    pos0, vel0, springs, rest = nbody.sample_initial_conditions(4000, seed=1)
    np.testing.assert_allclose(np.linalg.norm(vel0, axis=-1), 0.5, rtol=1e-12)
    assert abs(pos0.std() - 0.5) < 0.01 and abs(pos0.mean()) < 0.01
    off_diag = springs[:, ~np.eye(5, dtype=bool)]
    assert abs(off_diag.mean() - 0.5) < 0.01
    assert abs(rest.mean() - 0.5) < 0.01


def test_matches_reference_integrator_and_frame_indexing():
    initial = nbody.sample_initial_conditions(2, seed=3)
    k = 3.0
    traj = simulate(None, k, initial=initial, num_steps=301, sample_every=100, clip=True)
    assert traj.positions.shape == (2, 3, 5, 3)  # steps 100, 200, 300
    for s in range(2):
        ref_x, ref_v = reference_simulate(*(a[s] for a in initial), k, num_steps=301, sample_every=100)
        np.testing.assert_allclose(traj.positions[s], ref_x, rtol=0, atol=1e-13)
        np.testing.assert_allclose(traj.velocities[s], ref_v, rtol=0, atol=1e-13)
    # frame m is the state at step sample_every * (m + 1): the same run recorded every step agrees
    every = simulate(None, k, initial=initial, num_steps=301, sample_every=1)
    assert every.positions.shape[1] == 300
    np.testing.assert_array_equal(every.positions[:, [99, 199, 299]], traj.positions)


def test_stopping_early_gives_the_same_frames():
    full = simulate(3, 2.0, 7)
    short = simulate(3, 2.0, 7, num_steps=100 * 41 + 1)  # what NBody runs for frames 30 -> 40
    assert short.positions.shape[1] == 41
    np.testing.assert_array_equal(short.positions, full.positions[:, :41])
    np.testing.assert_array_equal(short.velocities, full.velocities[:, :41])


def test_energy_and_momentum_conserved_without_plane_spring():
    traj = simulate(16, 0.0, 11, clip=False)
    E = energy(traj, 0.0)
    assert np.abs(E / E[:, :1] - 1).max() < 1e-3
    E_mid = energy(traj, 0.0, half_kick=True)
    assert np.abs(E_mid / E_mid[:, :1] - 1).max() < 1e-6
    momentum = traj.velocities.sum(axis=2)  # (S, F, 3), unit masses
    np.testing.assert_allclose(momentum, momentum[:, :1].repeat(momentum.shape[1], axis=1), rtol=0, atol=1e-10)


def test_energy_conserved_with_plane_spring_but_not_z_momentum():
    k = 2.0
    traj = simulate(16, k, 12, clip=False)
    E = energy(traj, k)
    # O(dt) oscillation of symplectic Euler grows with the frequency sqrt(k): about 1e-3 at k = 2
    assert np.abs(E / E[:, :1] - 1).max() < 3e-3
    E_mid = energy(traj, k, half_kick=True)
    assert np.abs(E_mid / E_mid[:, :1] - 1).max() < 1e-5
    momentum = traj.velocities.sum(axis=2)
    drift = np.abs(momentum - momentum[:, :1])
    assert drift[..., :2].max() < 1e-10  # the anchors slide freely in XY
    assert drift[..., 2].max() > 0.1


def test_rotation_about_z_rotates_the_trajectory():
    initial = nbody.sample_initial_conditions(8, seed=5)
    base = simulate(None, 2.0, initial=initial, clip=False)
    for theta in (0.3, math.pi / 2, 2.5, -1.0):
        R = rot_z(theta)
        rotated = simulate(None, 2.0, initial=rotate(initial, R), clip=False)
        np.testing.assert_allclose(rotated.positions, base.positions @ R.T, rtol=0, atol=1e-9)
        np.testing.assert_allclose(rotated.velocities, base.velocities @ R.T, rtol=0, atol=1e-9)
    # reflection in a vertical plane and XY translations too
    mirror = np.diag([-1.0, 1.0, 1.0])
    mirrored = simulate(None, 2.0, initial=rotate(initial, mirror), clip=False)
    np.testing.assert_allclose(mirrored.positions, base.positions @ mirror, rtol=0, atol=1e-9)
    shift = np.array([0.7, -1.3, 0.0])
    shifted = simulate(None, 2.0, initial=(initial[0] + shift, *initial[1:]), clip=False)
    np.testing.assert_allclose(shifted.positions, base.positions + shift, rtol=0, atol=1e-9)


def test_general_rotation_only_commutes_without_plane_spring():
    initial = nbody.sample_initial_conditions(8, seed=6)
    R = ROT_X_90
    for k, equivariant in ((0.0, True), (2.0, False)):
        base = simulate(None, k, initial=initial, clip=False)
        rotated = simulate(None, k, initial=rotate(initial, R), clip=False)
        diff = np.abs(rotated.positions - base.positions @ R.T).max()
        if equivariant:
            assert diff < 1e-9  # the rest lengths play no role at k = 0
        else:
            assert diff > 0.1


def test_force_clipping_is_switchable():
    initial = nbody.sample_initial_conditions(4, seed=8)
    pos0 = initial[0].copy()
    pos0[..., 2] += 5.0  # far from the rest lengths: |F_z| = 1e3 * 5 >> 100
    f = nbody.forces(pos0, initial[2], initial[3], 1e3, clip=True)
    assert np.abs(f).max() == 100.0
    assert np.abs(nbody.forces(pos0, initial[2], initial[3], 1e3, clip=False)).max() > 1e3
    kwargs = dict(initial=(pos0, *initial[1:]), num_steps=201)
    clipped = simulate(None, 1e3, **kwargs)
    unclipped = simulate(None, 1e3, clip=False, **kwargs)
    assert np.abs(clipped.positions - unclipped.positions).max() > 1e-3


def test_simulation_is_deterministic_in_the_seed():
    a, b, c = (simulate(3, 1.0, seed, num_steps=501) for seed in (0, 0, 1))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.positions, c.positions)
    # the first systems do not depend on how many are drawn
    small, large = nbody.sample_initial_conditions(5, 9), nbody.sample_initial_conditions(50, 9)
    for x, y in zip(small, large):
        np.testing.assert_array_equal(x, y[:5])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: simulate(2, -1.0, 0), "stiffness"),
        (lambda: simulate(2, float("nan"), 0), "stiffness"),
        (lambda: simulate(0, 1.0, 0), "num_sims"),
        (lambda: simulate(2.5, 1.0, 0), "num_sims"),
        (lambda: simulate(2, 1.0, 0, num_steps=50), "num_steps"),
        (lambda: simulate(2, 1.0, 0, dt=0.0), "dt"),
        (lambda: simulate(3, 1.0, initial=nbody.sample_initial_conditions(2, 0)), "num_sims"),
        (lambda: simulate(None, 1.0, initial=(np.zeros((2, 4, 3)),) * 4), "pos0"),
        (lambda: NBody("/nonexistent", "training", stiffness=1.0), "split"),
        (lambda: NBody("/nonexistent", "train", stiffness=-2.0), "stiffness"),
        (lambda: NBody("/nonexistent", "train", stiffness=1.0, num_samples=0), "num_samples"),
        (lambda: NBody("/nonexistent", "train", stiffness=1.0, frame_in=40, frame_out=30), "frame_in"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_asymmetric_springs_rejected():
    pos0, vel0, springs, rest = nbody.sample_initial_conditions(1, 0)
    springs = springs.copy()
    springs[0, 0, 1], springs[0, 1, 0] = 1.0, 0.0
    with pytest.raises(ValueError, match="symmetric"):
        simulate(None, 1.0, initial=(pos0, vel0, springs, rest))


# --- dataset ----------------------------------------------------------------------------------------
def test_items_fields_and_graph(tmp_path):
    ds = NBody(tmp_path, "train", stiffness=2.0, num_samples=6, seed=0)
    assert len(ds) == 6 and ds.path.parent == tmp_path and ds.path.exists()
    data = ds[2]
    assert data.pos.shape == data.vel.shape == data.y.shape == data.target_displacement.shape == (5, 3)
    assert data.node_attr.shape == (5, 4) and data.edge_attr.shape == (20, 1)
    assert data.pos.dtype == torch.float32 and data.num_nodes == 5

    src, dst = data.edge_index
    assert data.edge_index.shape == (2, 20) and data.edge_index.dtype == torch.long
    assert bool((src != dst).all())
    pairs = set(zip(src.tolist(), dst.tolist()))
    assert pairs == {(j, i) for i in range(5) for j in range(5) if i != j}  # every ordered pair, both directions

    springs = ds.springs[2]
    assert torch.equal(data.edge_attr[:, 0], springs[src, dst])
    attr = {(j, i): float(a) for j, i, a in zip(src.tolist(), dst.tolist(), data.edge_attr[:, 0])}
    assert all(attr[j, i] == attr[i, j] for j, i in pairs)

    # node_attr = [L_i, vx, vy, vz] ("1x0e+1x1o")
    assert nbody.IRREPS_NODE_ATTRS == "1x0e+1x1o"
    assert torch.equal(data.node_attr[:, 0], ds.rest_lengths[2])
    assert torch.equal(data.node_attr[:, 1:], data.vel)
    torch.testing.assert_close(data.target_displacement, data.y - data.pos)


def test_attr_fields_do_not_clash_with_pyg_data_methods(tmp_path):
    data = NBody(tmp_path, "train", stiffness=0.0, num_samples=2, seed=0)[0]
    assert isinstance(data.node_attr, torch.Tensor) and isinstance(data.edge_attr, torch.Tensor)
    assert data.is_node_attr("node_attr") and data.is_edge_attr("edge_attr")


def test_items_match_the_simulation_at_frames_30_and_40(tmp_path):
    ds = NBody(tmp_path, "val", stiffness=1.5, num_samples=4, seed=3, dtype=torch.float64)
    traj = simulate(4, 1.5, nbody.split_seed(3, "val"))
    for s in range(4):
        d = ds[s]
        assert d.pos.dtype == torch.float64
        np.testing.assert_array_equal(d.pos.numpy(), traj.positions[s, 30])
        np.testing.assert_array_equal(d.vel.numpy(), traj.velocities[s, 30])
        np.testing.assert_array_equal(d.y.numpy(), traj.positions[s, 40])
        np.testing.assert_array_equal(d.node_attr[:, 0].numpy(), traj.rest_lengths[s])


def test_batching_with_pyg_loader(tmp_path):
    ds = NBody(tmp_path, "test", stiffness=0.0, num_samples=5, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch.num_graphs == 3 and batch.pos.shape == (15, 3) and batch.edge_attr.shape == (60, 1)
    assert batch.edge_index.max() == 14 and bool((batch.batch[batch.edge_index[0]] == batch.batch[batch.edge_index[1]]).all())


def test_dataset_determinism_and_splits(tmp_path):
    a = NBody(tmp_path / "a", "train", stiffness=1.0, num_samples=5, seed=4)
    b = NBody(tmp_path / "b", "train", stiffness=1.0, num_samples=5, seed=4)
    c = NBody(tmp_path / "c", "train", stiffness=1.0, num_samples=5, seed=5)
    v = NBody(tmp_path / "a", "val", stiffness=1.0, num_samples=5, seed=4)
    assert torch.equal(a._pos, b._pos) and torch.equal(a._y, b._y)
    assert not torch.allclose(a._pos, c._pos)
    assert not torch.allclose(a._pos, v._pos)  # each split has its own stream
    # a smaller set is a prefix of a larger one; every k shares the initial conditions
    big = NBody(tmp_path / "a", "train", stiffness=1.0, num_samples=8, seed=4)
    assert torch.equal(big._pos[:5], a._pos)
    k0 = NBody(tmp_path / "a", "train", stiffness=0.0, num_samples=5, seed=4)
    assert torch.equal(k0.springs, a.springs) and torch.equal(k0.rest_lengths, a.rest_lengths)
    assert not torch.allclose(k0._pos, a._pos)
    assert len({p.name for p in (tmp_path / "a").iterdir()}) == 4  # one file per (split, k, size, seed)


def test_cache_is_reused(tmp_path, monkeypatch):
    first = NBody(tmp_path, "train", stiffness=2.0, num_samples=4, seed=0)
    assert not first.loaded_from_cache
    mtime = first.path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(nbody, "simulate", lambda *a, **kw: calls.append(1))
    second = NBody(tmp_path, "train", stiffness=2.0, num_samples=4, seed=0)
    assert second.loaded_from_cache and not calls
    assert second.path.stat().st_mtime_ns == mtime
    assert torch.equal(first._pos, second._pos)
    cache = torch.load(first.path, weights_only=True)
    assert cache["version"] == nbody.FORMAT_VERSION and cache["params"]["stiffness"] == 2.0
    assert cache["params"]["num_samples"] == 4 and cache["params"]["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temp files left behind


def _regenerated(tmp_path, caplog, reference, **kwargs):
    with caplog.at_level(logging.WARNING, logger="molkern.data.nbody"):
        ds = NBody(tmp_path, "train", stiffness=2.0, num_samples=4, seed=0, **kwargs)
    assert not ds.loaded_from_cache
    assert any("regenerating" in r.getMessage() for r in caplog.records)
    assert torch.equal(ds._pos, reference._pos)
    assert NBody(tmp_path, "train", stiffness=2.0, num_samples=4, seed=0, **kwargs).loaded_from_cache
    return ds


def test_corrupt_cache_is_regenerated(tmp_path, caplog):
    ref = NBody(tmp_path, "train", stiffness=2.0, num_samples=4, seed=0)
    size = ref.path.stat().st_size
    with open(ref.path, "r+b") as fh:
        fh.truncate(size // 2)
    _regenerated(tmp_path, caplog, ref)
    ref.path.write_bytes(b"not a torch file")
    caplog.clear()
    _regenerated(tmp_path, caplog, ref)


def test_wrong_version_or_parameters_regenerated(tmp_path, caplog):
    ref = NBody(tmp_path, "train", stiffness=2.0, num_samples=4, seed=0)
    cache = torch.load(ref.path, weights_only=True)
    torch.save({**cache, "version": nbody.FORMAT_VERSION - 1}, ref.path)
    _regenerated(tmp_path, caplog, ref)

    cache = torch.load(ref.path, weights_only=True)
    torch.save({**cache, "params": {**cache["params"], "dt": 0.01}}, ref.path)
    caplog.clear()
    _regenerated(tmp_path, caplog, ref)

    cache = torch.load(ref.path, weights_only=True)
    torch.save({**cache, "pos": cache["pos"][:2]}, ref.path)
    caplog.clear()
    _regenerated(tmp_path, caplog, ref)


def test_force_reload_regenerates(tmp_path):
    NBody(tmp_path, "test", stiffness=1.0, num_samples=3, seed=0)
    assert not NBody(tmp_path, "test", stiffness=1.0, num_samples=3, seed=0, force_reload=True).loaded_from_cache


def test_generate_script_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_nbody", ROOT / "data_scripts" / "generate_nbody.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--root", str(tmp_path), "--stiffness", "0", "2", "--quick", "--seed", "1"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 6 and all(name.endswith(".pt") for name in files)
    out = capsys.readouterr().out
    assert str(tmp_path) in out
    ds = NBody(tmp_path, "val", stiffness=2.0, num_samples=script.QUICK_SIZES["val"], seed=1)
    assert ds.loaded_from_cache
    with pytest.raises(SystemExit):
        script.main(["--root", str(tmp_path), "--stiffness", "-1"])


def test_import_leaves_torch_state_alone():
    code = (
        "import torch; before = (torch.get_default_dtype(), torch.get_num_threads(), torch.initial_seed());"
        "import molkern.data.nbody;"
        "assert (torch.get_default_dtype(), torch.get_num_threads(), torch.initial_seed()) == before"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
