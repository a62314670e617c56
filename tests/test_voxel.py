"""Dense steerable convolutions on voxel grids: exact grid-symmetry equivariance, approximate rotation
equivariance, equality with the point convolution, caching, initialisation, the classifier."""

import math

import pytest
import torch
import torch.nn.functional as F
from e3nn import o3

import molkern.groups as groups
from molkern.groups import representation
from molkern.models.voxel import VoxelClassifier, normalize_voxel_activations
from molkern.nn.voxel import (
    DenseSteerableConv3d,
    VoxelAvgPool,
    VoxelGate,
    VoxelInvariantReadout,
    VoxelNormPool,
    cube_symmetries,
    transform_voxel_field,
    voxel_centres,
    window_offsets,
)

ALL_PARITIES = "0e+0o+1o+1e+2e+2o"
F64 = torch.float64


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def rel_err(a, b):
    return float((a - b).abs().max().detach() / b.abs().max().detach().clamp_min(1e-300))


def cube_errors(func, x, irreps_in, irreps_out, rotations):
    y = func(x)
    errs = []
    for R in rotations:
        y_g = func(transform_voxel_field(x, irreps_in, R))
        expected = y if irreps_out is None else transform_voxel_field(y, irreps_out, R)
        errs.append(rel_err(y_g, expected))
    return torch.tensor(errs)


# ------------------------------------------------------------------------------------------------ grid helpers
def test_cube_symmetries_and_transform_convention(f64):
    R = cube_symmetries()
    assert R.shape == (48, 3, 3)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=F64).expand(48, 3, 3))
    assert len({tuple(r.flatten().tolist()) for r in R}) == 48
    # a scalar bump at the voxel of position p moves to R p; a 1o field equal to its position stays so
    x = torch.zeros(1, 1, 4, 4, 4)
    x[0, 0, 3, 1, 0] = 1.0  # position (1.5, -0.5, -1.5)
    Rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)  # +90 deg about z
    moved = transform_voxel_field(x, "0e", Rz)
    assert abs(moved[0, 0, 2, 3, 0] - 1.0) < 1e-12 and abs(moved.sum() - 1.0) < 1e-12  # R p = (0.5, 1.5, -1.5)
    pos = voxel_centres((4, 4, 4))  # (64, 3)
    vec = o3.spherical_harmonics(1, pos, normalize=False).T.reshape(1, 3, 4, 4, 4)  # the 1o field x -> Y_1(x)
    for R in cube_symmetries()[::5]:
        assert torch.allclose(transform_voxel_field(vec, "1o", R), vec, atol=1e-12)
    with pytest.raises(ValueError, match="onto itself"):
        transform_voxel_field(torch.zeros(1, 1, 4, 4, 5), "0e", cube_symmetries()[8])  # swaps y and z


def test_window_offsets_follow_conv3d_cross_correlation(f64):
    """A one-hot weight at tap q copies the input from offset window_offsets[q] (x_j - x_i)."""
    offsets = window_offsets(3)
    x = torch.randn(1, 1, 5, 5, 5)
    for q in (0, 5, 13, 22):
        w = torch.zeros(27, dtype=F64)
        w[q] = 1.0
        out = F.conv3d(x, w.view(1, 1, 3, 3, 3), padding=1)
        i, j, k = (2 + offsets[q]).long().tolist()
        assert out[0, 0, 2, 2, 2] == x[0, 0, i, j, k]
    with pytest.raises(ValueError, match="odd"):
        window_offsets(4)


# ------------------------------------------------------------------------------------------------ exact equivariance
def test_o3_layers_exactly_equivariant_under_the_48_cube_symmetries(f64):
    torch.manual_seed(0)
    conv = DenseSteerableConv3d(ALL_PARITIES, ALL_PARITIES, kernel_size=3).eval()
    errs = cube_errors(conv, torch.randn(2, conv.irreps_in.dim, 6, 6, 6), conv.irreps_in, conv.irreps_out, cube_symmetries())
    assert errs.max() < 1e-12, errs.max()


def test_o3_network_pieces_exactly_equivariant_and_readout_invariant(f64):
    torch.manual_seed(1)
    gate = VoxelGate("2x0e+0o+1o+1e+2e")
    conv = DenseSteerableConv3d("0e+1o", gate.irreps_in, kernel_size=5, form="factorised").eval()
    pool = VoxelNormPool(gate.irreps_out, 2)
    avg = VoxelAvgPool(gate.irreps_out, 2)
    readout = VoxelInvariantReadout(gate.irreps_out)
    x = torch.randn(2, conv.irreps_in.dim, 8, 8, 8)
    R = cube_symmetries()
    assert cube_errors(lambda t: pool(gate(conv(t))), x, "0e+1o", gate.irreps_out, R).max() < 1e-12
    assert cube_errors(lambda t: avg(gate(conv(t))), x, "0e+1o", gate.irreps_out, R).max() < 1e-12
    assert cube_errors(lambda t: readout(pool(gate(conv(t)))), x, "0e+1o", None, R).max() < 1e-12
    assert readout.irreps_out == o3.Irreps(f"{gate.irreps_out.num_irreps}x0e")


def test_so2_exact_under_z_quarter_turns_and_broken_about_x(f64):
    torch.manual_seed(2)
    conv = DenseSteerableConv3d("0e+1o", "0e+1o+2e", kernel_size=3, group="so2").eval()
    x = torch.randn(1, 4, 6, 6, 6)
    quarter = torch.tensor(math.pi / 2, dtype=F64)
    Rz = [o3.matrix_z(quarter * k) for k in range(4)]
    Rz = torch.stack([torch.where(r.abs() < 1e-12, torch.zeros_like(r), r) for r in Rz])  # exact signed permutations
    assert cube_errors(conv, x, "0e+1o", conv.irreps_out, Rz).max() < 1e-12
    Rx = o3.matrix_x(quarter).round()
    assert not bool(conv.group.contains(Rx))
    assert cube_errors(conv, x, "0e+1o", conv.irreps_out, Rx[None]).item() > 1e-3
    # the same check on an O(3) layer passes: the failure above is the subgroup's, not the test's
    o3_conv = DenseSteerableConv3d("0e+1o", "0e+1o+2e", kernel_size=3).eval()
    assert cube_errors(o3_conv, x, "0e+1o", o3_conv.irreps_out, Rx[None]).item() < 1e-12


def test_layer_attributes_transform_with_the_fields(f64):
    torch.manual_seed(3)
    conv = DenseSteerableConv3d("0e+1o", "0e+1o", kernel_size=3, irreps_attr="1o").eval()
    x, a = torch.randn(1, 4, 5, 5, 5), torch.randn(3)
    y = conv(x, a)
    for R in cube_symmetries()[1::7]:
        y_g = conv(transform_voxel_field(x, "0e+1o", R), representation("1o", R) @ a)
        assert rel_err(y_g, transform_voxel_field(y, "0e+1o", R)) < 1e-12
    R = cube_symmetries()[9]
    assert rel_err(conv(transform_voxel_field(x, "0e+1o", R), a), transform_voxel_field(y, "0e+1o", R)) > 1e-3
    with pytest.raises(ValueError, match="attrs must have shape"):
        conv(x)


# ------------------------------------------------------------------------------------------------ continuous rotations
def _smooth_field(pos, centres, R=None):
    """0e+1o field sum_m g_m(x) [a_m, b_m Y_1(x - c_m)], optionally rotated: D f(R^T x). Shapes: (N, 3) -> (N, 4)."""
    if R is not None:
        return _smooth_field(pos @ R, centres) @ representation("0e+1o", R).T
    out = 0
    for m, c in enumerate(centres):
        d = pos - c
        g = torch.exp(-d.pow(2).sum(-1, keepdim=True) / (2 * 0.25**2))
        out = out + g * torch.cat([torch.ones_like(g) * (1.0 - 0.6 * m), (1 + m) * o3.spherical_harmonics(1, d, False)], -1)
    return out


def _resample(y, pos, n, h):
    """Trilinear interpolation of the grid field y (1, C, n, n, n) at positions pos (N, 3). -> (N, C)"""
    u = pos / ((n - 1) / 2 * h)  # (N, 3) in [-1, 1] along x, y, z
    grid = u.flip(-1).view(1, -1, 1, 1, 3)  # grid_sample wants (W, H, D) = (z, y, x)
    return F.grid_sample(y, grid, mode="bilinear", align_corners=True).view(y.shape[1], -1).T


def rotation_error(group, n, cutoff=0.3, seed=0):
    h = 2.0 / n
    torch.manual_seed(seed)  # same parameters at every resolution (shapes do not depend on n)
    conv = DenseSteerableConv3d("0e+1o", "0e+1o", 2 * int(cutoff / h) + 1, group=group, voxel_size=h, cutoff=cutoff)
    conv.eval()
    pos = voxel_centres((n, n, n), h)
    centres = torch.tensor([[0.2, 0.0, 0.1], [-0.15, 0.2, -0.1], [0.0, -0.2, 0.2]], dtype=F64)
    R = o3.angles_to_matrix(*torch.tensor([0.4, 0.9, 1.3], dtype=F64))
    fields = [_smooth_field(pos, centres, r).T.reshape(1, 4, n, n, n) for r in (None, R)]
    y, y_rot = (conv(f) for f in fields)
    inside = pos.norm(dim=-1) < 0.5
    expected = _resample(y, pos[inside] @ R, n, h) @ representation("0e+1o", R).T  # D y(R^T x)
    got = y_rot.view(4, -1).T[inside]
    return rel_err(got, expected) * float(expected.abs().max().detach() / y.view(4, -1).T[inside].abs().max().detach())


def test_continuous_rotation_error_shrinks_as_the_grid_gets_finer(f64):
    sizes = (10, 16, 20)
    errs = [rotation_error(None, n) for n in sizes]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.5 * errs[0], errs
    # a non-equivariant (trivial group) kernel does not become rotation-equivariant on finer grids
    err_c1 = rotation_error("c1", sizes[-1])
    assert err_c1 > 5 * errs[-1], (err_c1, errs)


# ------------------------------------------------------------------------------------------------ dense == point conv
@pytest.mark.parametrize("form,kernel_size,dilation,voxel_size", [("full", 3, 1, 1.0), ("factorised", 5, 1, 0.5),
                                                                   ("full", 3, 2, 1.0)])
def test_dense_layer_equals_the_point_convolution_on_voxel_centres(f64, form, kernel_size, dilation, voxel_size):
    torch.manual_seed(4)
    conv = DenseSteerableConv3d("2x0e+1o+1e", "0e+0o+2x1o+2e", kernel_size, form=form, dilation=dilation,
                                voxel_size=voxel_size, group=groups.get("cn", n=4) if form == "full" else None)
    with torch.no_grad():
        conv.bias.normal_()
    shape = (5, 4, 6)
    x = torch.randn(2, conv.irreps_in.dim, *shape)
    dense = conv(x)  # training mode: freshly sampled weight
    # point cloud: voxel centres, an edge from every voxel inside the window (incl. the voxel itself)
    pos = voxel_centres(shape, voxel_size)
    diff = (pos[:, None, :] - pos[None, :, :]) / (voxel_size * dilation)  # (N, N, 3) source - target in taps
    inside = (diff.abs() <= kernel_size // 2 + 1e-9).all(-1) & ((diff - diff.round()).abs() < 1e-9).all(-1)
    src, dst = torch.nonzero(inside, as_tuple=True)
    for b in range(2):
        feats = x[b].reshape(conv.irreps_in.dim, -1).T  # (N, d_in)
        points = conv.forward_points(feats, pos, torch.stack([src, dst]))  # (N, d_out)
        assert torch.allclose(points.T.reshape(dense[b].shape), dense[b], atol=1e-12, rtol=1e-9)


def test_stride_and_valid_padding_follow_torch(f64):
    torch.manual_seed(5)
    conv = DenseSteerableConv3d("0e+1o", "0e+1o", 3)
    x = torch.randn(1, 4, 7, 7, 7)
    full = conv(x)
    conv.stride = (2, 2, 2)
    assert torch.allclose(conv(x), full[..., ::2, ::2, ::2])
    conv.stride, conv.padding = (1, 1, 1), "valid"
    assert torch.allclose(conv(x), full[..., 1:-1, 1:-1, 1:-1])


# ------------------------------------------------------------------------------------------------ caching, gradients
def test_weight_cached_in_eval_mode_until_parameters_change():
    torch.manual_seed(6)
    conv = DenseSteerableConv3d("0e+1o", "0e+1o", 3)
    calls = []
    conv.kernel.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 4, 5, 5, 5)
    conv(x), conv(x)
    assert len(calls) == 2  # training mode: sampled at every forward
    conv.eval()
    y1, y2 = conv(x), conv(x)
    assert len(calls) == 3 and torch.equal(y1, y2)
    with torch.no_grad():
        next(conv.kernel.parameters()).add_(0.1)  # in place, like an optimizer step
    y3 = conv(x)
    assert len(calls) == 4 and not torch.allclose(y3, y1)
    conv.load_state_dict(conv.state_dict())  # copies in place: the versions change, the values do not
    assert torch.equal(conv(x), y3) and len(calls) == 5


def test_training_gradients_reach_the_kernel_mlp():
    torch.manual_seed(7)
    conv = DenseSteerableConv3d("0e+1o", "0e+1o", 3, group="so2")
    conv(torch.randn(1, 4, 5, 5, 5)).pow(2).sum().backward()
    grads = {name: p.grad for name, p in conv.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["kernel.mlp.layers.0.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("form", ["full", "factorised"])
def test_white_noise_output_variance_is_near_one(form):
    torch.manual_seed(8)
    conv = DenseSteerableConv3d("4x0e+2x1o+1x2e", "4x0e+2x1o+1x2e", 5, form=form)
    x = torch.randn(2, conv.irreps_in.dim, 14, 14, 14)
    with torch.no_grad():
        y = conv(x)[..., 2:-2, 2:-2, 2:-2]  # away from the zero padding
    ratio = float(y.pow(2).mean() / x.pow(2).mean())
    assert 0.6 < ratio < 1.6, ratio
    field_m2 = y.pow(2).mean(dim=(0, 2, 3, 4))  # (d_out,)
    assert field_m2.min() > 0.3 and field_m2.max() < 3.0, field_m2


def test_classifier_is_invariant_and_normalised_activations_are_order_one(f64):
    torch.manual_seed(9)
    model = VoxelClassifier(5, num_channels=(2, 3), kernel_size=3, pooling="norm").eval()
    x = (torch.rand(2, 1, 8, 8, 8) < 0.2).to(F64)
    assert model(x).shape == (2, 5)
    assert cube_errors(model, x, "0e", None, cube_symmetries()).max() < 1e-12
    before = normalize_voxel_activations(model, x)
    ratios = normalize_voxel_activations(model, x)  # second pass: already normalised
    assert len(before) == 2 and all(abs(r - 1.0) < 1e-6 for r in ratios), ratios
    assert cube_errors(model, x, "0e", None, cube_symmetries()[::6]).max() < 1e-12


def test_so2_classifier_sees_orientation_c1_even_more():
    torch.manual_seed(10)
    x = (torch.rand(1, 1, 8, 8, 8) < 0.3).float()
    Rx = o3.matrix_x(torch.tensor(math.pi / 2, dtype=F64)).round()
    outs = {}
    for g in ("o3", "so2", "c1"):
        torch.manual_seed(10)
        model = VoxelClassifier(3, group=g, num_channels=(1, 2), kernel_size=3, input_pool=1, mlp_width=4).eval()
        with torch.no_grad():
            outs[g] = rel_err(model(transform_voxel_field(x, "0e", Rx)), model(x))
    assert outs["o3"] < 1e-5 and outs["so2"] > 1e-4 and outs["c1"] > 1e-4, outs


# ------------------------------------------------------------------------------------------------ example data
def test_voxelize_commutes_with_grid_symmetries():
    import numpy as np

    from molkern.experiments.voxel_shapes import random_rotation, voxelize

    rng = np.random.default_rng(0)
    points = rng.uniform(-0.9, 0.9, size=(300, 3)) * [1.0, 0.5, 0.3]  # anisotropic cloud
    grid = torch.from_numpy(voxelize(points, 8))[None, None].double()
    assert grid[0, 0, 6:].sum() > 0 and grid[0, 0, :, 6:].sum() == 0  # x spans the grid, y does not: dim 2 is x
    for R in cube_symmetries()[::3]:
        moved = torch.from_numpy(voxelize(points @ R.numpy().T, 8))[None, None].double()
        assert torch.allclose(moved, transform_voxel_field(grid, "0e", R), atol=1e-12)
    for orientation in ("z", "so3"):
        Q = random_rotation(orientation, rng)
        assert np.allclose(Q @ Q.T, np.eye(3)) and np.isclose(np.linalg.det(Q), 1.0)
    assert np.isclose(random_rotation("z", rng)[2, 2], 1.0)


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors():
    with pytest.raises(ValueError, match="odd"):
        DenseSteerableConv3d("0e", "0e", 4)
    with pytest.raises(ValueError, match="cutoff must lie"):
        DenseSteerableConv3d("0e", "0e", 3, cutoff=2.5)
    conv = DenseSteerableConv3d("0e+1o", "0e", 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 4"):
        conv(torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="built without irreps_attr"):
        conv(torch.zeros(1, 4, 4, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="pooling"):
        VoxelClassifier(3, pooling="max")
    assert groups.get("so2").contains(torch.eye(3, dtype=F64))
