import math

import pytest
import torch
from e3nn import o3

import molkern.groups as groups

F64 = torch.float64
TILT = (1.0, -2.0, 0.5)
CASES = (
    [("o3", {}), ("so3", {}), ("so2", {}), ("so2", {"axis": TILT}), ("o2", {}), ("o2", {"axis": TILT}),
     ("cinfh", {}), ("cinfh", {"axis": TILT}), ("dinf", {}), ("dinf", {"axis": TILT})]
    + [("cn", {"n": n}) for n in (2, 3, 4, 6)] + [("cn", {"n": 3, "axis": TILT})]
    + [("dn", {"n": n}) for n in (2, 3, 4, 6)] + [("dn", {"n": 4, "axis": TILT})]
    + [("ci", {}), ("cs", {}), ("cs", {"normal": TILT}), ("c1", {})]
)
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for name, kw in CASES]
EYE = torch.eye(3, dtype=F64)


def rot(axis, angle):
    """Rodrigues rotation (3, 3) in float64."""
    a = torch.as_tensor(axis, dtype=F64)
    a = a / a.norm()
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=F64)
    return EYE + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def mirror(normal):
    n = torch.as_tensor(normal, dtype=F64)
    n = n / n.norm()
    return EYE - 2 * torch.outer(n, n)


def d_e3nn(irreps, R):
    """e3nn's own D_from_matrix, in float64 (its generators follow the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        return o3.Irreps(irreps).D_from_matrix(R.to(F64))
    finally:
        torch.set_default_dtype(old)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_samples_orthogonal_contained_closed(name, kw):
    g = groups.get(name, **kw)
    s = g.sample(64, generator=seeded())
    assert s.shape == (64, 3, 3) and s.dtype == F64
    assert (s.transpose(1, 2) @ s - EYE).abs().max() < 1e-12
    assert (torch.linalg.det(s).abs() - 1).abs().max() < 1e-12
    assert g.contains(s).all()
    assert g.contains(s @ s.roll(1, 0)).all()  # closure
    s32 = g.sample(64, generator=seeded(1), dtype=torch.float32)
    assert s32.dtype == torch.float32 and g.contains(s32, atol=1e-5).all()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_stabiliser_property(name, kw):
    g = groups.get(name, **kw)
    assert g.references.dtype == F64 and g.references.shape == (g.irreps_ref.dim,)
    if g.irreps_ref.dim == 0:
        return
    s = g.sample(32, generator=seeded(2))
    r = g.references
    assert (d_e3nn(g.irreps_ref, s) @ r - r).abs().max() < 1e-10


def z_frame_cases(name, n):
    """(inside, outside) lists of matrices for the z-axis version of a group."""
    rx, rz, flip = lambda t: rot((1, 0, 0), t), lambda t: rot((0, 0, 1), t), rot((1, 0, 0), math.pi)
    mx, my, mz = mirror((1, 0, 0)), mirror((0, 1, 0)), mirror((0, 0, 1))
    return {
        "o3": ([EYE, -EYE, mz, rot((1, 2, 3), 0.4)], [2 * EYE]),
        "so3": ([EYE, rot((1, 2, 3), 0.4)], [-EYE, mz, mx]),
        "so2": ([rz(0.7)], [rx(math.pi / 2), my, mx, -EYE, flip]),
        "o2": ([rz(0.7), my, mx], [-EYE, rx(math.pi / 2), flip, mz]),
        "cinfh": ([-EYE, mz, rz(0.3)], [my, flip, rx(math.pi / 2)]),
        "dinf": ([flip, rot((0, 1, 0), math.pi), rz(0.4)], [rx(math.pi / 2), -EYE, mz]),
        "cn": ([rz(2 * math.pi / (n or 1))], [rz(math.pi / (n or 1)), flip, mz, -EYE]),
        "dn": ([flip, rz(2 * math.pi / (n or 1)), rz(2 * math.pi / (n or 1)) @ flip],
               [rz(math.pi / (n or 1)), rz(math.pi / (n or 1)) @ flip, -EYE, mz]),
        "ci": ([-EYE], [rz(math.pi), rx(0.3), mz]),
        "cs": ([mz], [-EYE, rz(math.pi), flip, mx]),
        "c1": ([EYE], [rz(math.pi), -EYE, my, mx, 1.1 * EYE]),
    }[name]


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_hand_picked_elements(name, kw):
    g = groups.get(name, **kw)
    inside, outside = z_frame_cases(name, kw.get("n"))
    Q = g.frame
    assert (Q.T @ Q - EYE).abs().max() < 1e-12 and torch.linalg.det(Q) > 0
    if "axis" in kw or "normal" in kw:
        a = torch.tensor(kw.get("axis", kw.get("normal")), dtype=F64)
        assert torch.allclose(Q[:, 2], a / a.norm(), atol=1e-12)
    conj = lambda M: torch.stack([Q @ m @ Q.T for m in M])  # noqa: E731
    assert g.contains(conj(inside)).all()
    assert not g.contains(conj(outside)).any()
    if name in ("cn", "dn"):  # frame-independent checks about the axis
        a, n = Q[:, 2], kw["n"]
        assert g.contains(rot(a, 2 * math.pi / n)) and not g.contains(rot(a, math.pi / n))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_order(name, kw):
    g = groups.get(name, **kw)
    n = kw.get("n")
    expected = {"cn": n, "dn": 2 * n if n else None, "ci": 2, "cs": 2, "c1": 1}.get(name, math.inf)
    assert g.order == expected and g.is_finite == (expected != math.inf)
    if g.is_finite:  # all cosets get sampled and are distinct
        s = g.sample(400, generator=seeded(3))
        assert len(torch.unique(s.round(decimals=6).reshape(-1, 9), dim=0)) == expected


def test_contains_shapes_and_repr():
    g = groups.get("so2")
    assert repr(g) == "Group('so2', axis=(0.0, 0.0, 1.0))"
    assert g.name == "so2" and g.params == {"axis": (0.0, 0.0, 1.0)}
    out = g.contains(EYE)
    assert out.dim() == 0 and out.dtype == torch.bool and bool(out)
    assert not g.contains(torch.full((3, 3), float("nan")))
    assert set(groups.available()) == {"o3", "so3", "so2", "o2", "cinfh", "dinf", "cn", "dn", "ci", "cs", "c1"}


@pytest.mark.parametrize("alias,name", [("cone", "o2"), ("cinfv", "o2"), ("trivial", "c1"),
                                        ("inversion", "ci"), ("mirror", "cs")])
def test_aliases(alias, name):
    assert groups.get(alias).name == name


def test_errors():
    with pytest.raises(ValueError, match="valid names.*so2"):
        groups.get("tetrahedral")
    with pytest.raises(ValueError, match="'n'"):
        groups.get("cn", n=1)
    with pytest.raises(ValueError, match="'n'"):
        groups.get("dn")
    with pytest.raises(ValueError, match="'axis'"):
        groups.get("so2", axis=(0, 0, 0))
    with pytest.raises(ValueError, match="'normal'"):
        groups.get("cs", normal=(1, 2))
    with pytest.raises(ValueError, match="unexpected"):
        groups.get("so3", axis=(1, 0, 0))


@pytest.mark.parametrize("name,kw", [("so3", {}), ("so2", {"axis": TILT}), ("dn", {"n": 3}), ("o3", {})])
def test_seeded_sampling_reproducible(name, kw):
    g = groups.get(name, **kw)
    assert torch.equal(g.sample(16, generator=seeded(7)), g.sample(16, generator=seeded(7)))


@pytest.mark.parametrize("axis", [(0, 0, 1), TILT])
def test_from_references_so2(axis):
    ref = groups.get("so2", axis=axis)
    g = groups.Group.from_references(ref.irreps_ref, ref.references)
    assert g.name == "custom" and g.order == math.inf and not g.is_finite
    s = g.sample(32, generator=seeded())
    assert ref.contains(s).all() and g.contains(s).all()
    assert (s - EYE).abs().amax((1, 2)).max() > 0.1


@pytest.mark.parametrize("n", [3, 4])
def test_from_references_dn_with_generators(n):
    ref = groups.get("dn", n=n)
    gens = [rot((0, 0, 1), 2 * math.pi / n), rot((1, 0, 0), math.pi)]
    g = groups.Group.from_references(ref.irreps_ref, ref.references, generators=gens, name="mydn")
    assert g.name == "mydn" and g.order == 2 * n and g.is_finite
    s = g.sample(64, generator=seeded())
    assert ref.contains(s).all()
    with pytest.raises(ValueError, match="generators"):
        groups.Group.from_references(ref.irreps_ref, ref.references, generators=[rot((0, 0, 1), math.pi / n)])
    with pytest.raises(ValueError, match="values"):
        groups.Group.from_references(ref.irreps_ref, ref.references[:-1])


def test_from_references_continuous_with_cosets():
    o2 = groups.get("o2", axis=TILT)
    m = o2.frame @ mirror((0, 1, 0)) @ o2.frame.T
    g = groups.Group.from_references(o2.irreps_ref, o2.references, generators=[m])
    s = g.sample(64, generator=seeded())
    assert o2.contains(s).all() and (torch.linalg.det(s) < 0).any() and (torch.linalg.det(s) > 0).any()
    g = groups.Group.from_references("", [], generators=[-EYE])  # O(3)
    s = g.sample(64, generator=seeded())
    assert (torch.linalg.det(s) < 0).any() and g.contains(s).all() and not g.is_finite
    assert groups.Group.from_references("0o", [1.0]).contains(-EYE).item() is False
    c1 = groups.get("c1")
    assert groups.Group.from_references(c1.irreps_ref, c1.references).order == 1
