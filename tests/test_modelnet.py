"""Procedural shapes, surface sampling, the ModelNet readers (text and OFF layouts), splits and augmentation."""

import numpy as np
import pytest
import torch

import molkern.groups as groups
from molkern.data.modelnet import (
    ModelNet,
    detect_format,
    list_shapes,
    read_off,
    read_points_txt,
    write_points_txt,
    write_procedural_dataset,
)
from molkern.data.shapes import SHAPE_CLASSES, _box, generate_mesh, sample_surface


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_generated_meshes_are_valid_outward_and_unit_sized(name):
    rng = np.random.default_rng(0)
    vertices, faces = generate_mesh(name, rng)
    assert vertices.dtype == np.float64 and faces.dtype == np.int64 and faces.shape[1] == 3
    assert faces.min() >= 0 and faces.max() < len(vertices)
    radius = np.linalg.norm(vertices, axis=1).max()
    assert 0.7 < radius <= 1.0 + 1e-12
    assert np.abs((vertices.min(0) + vertices.max(0)) / 2).max() < 1e-9  # bounding-box centre at the origin
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    signed_volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6
    assert signed_volume > 0, "faces must be oriented outwards"
    again = generate_mesh(name, np.random.default_rng(0))[0]
    np.testing.assert_array_equal(vertices, again)
    other = generate_mesh(name, np.random.default_rng(1))[0]
    assert vertices.shape != other.shape or not np.allclose(vertices, other), "sizes and noise must be random"


def test_unknown_shape_class():
    with pytest.raises(ValueError, match="unknown shape class 'teapot'"):
        generate_mesh("teapot", np.random.default_rng(0))


def test_sampling_gives_unit_outward_normals_on_the_surface_area_weighted():
    size = np.array([1.0, 2.0, 4.0])
    vertices, faces = _box(size)
    points, normals = sample_surface(vertices, faces, 20000, np.random.default_rng(0))
    assert points.shape == normals.shape == (20000, 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-12)
    axis = np.abs(normals).argmax(1)  # each normal is +-e_axis ...
    np.testing.assert_allclose(np.abs(normals).max(1), 1.0, atol=1e-12)
    # ... the point lies on that face's plane (outward side) and inside the box
    on_plane = points[np.arange(len(points)), axis] * normals[np.arange(len(points)), axis]
    np.testing.assert_allclose(on_plane, size[axis] / 2, atol=1e-12)
    assert (np.abs(points) <= size / 2 + 1e-12).all()
    # area weighting: the fraction of points on the faces normal to each axis follows their area
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]])
    np.testing.assert_allclose(np.bincount(axis, minlength=3) / len(axis), areas / areas.sum(), atol=0.015)


def test_sampling_points_lie_on_generated_mesh_surfaces():
    rng = np.random.default_rng(3)
    vertices, faces = generate_mesh("cone", rng)
    points, normals = sample_surface(vertices, faces, 500, rng)
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    n = np.cross(b - a, c - a)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    # every sample lies in the plane of some face with exactly its normal
    dist = np.abs(np.einsum("pfj,fj->pf", points[:, None, :] - a[None], n))  # (P, F)
    same = np.abs(normals @ n.T - 1) < 1e-9  # (P, F)
    assert (np.where(same, dist, np.inf).min(1) < 1e-9).all()


def test_sampling_rejects_bad_meshes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no faces"):
        sample_surface(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64), 10, rng)
    with pytest.raises(ValueError, match="zero surface area"):
        sample_surface(np.zeros((3, 3)), np.array([[0, 1, 2]]), 10, rng)
    with pytest.raises(ValueError, match="face indices"):
        sample_surface(np.eye(3), np.array([[0, 1, 5]]), 10, rng)


# ------------------------------------------------------------------------------------------------ readers
def test_read_off_triangulates_polygons_and_accepts_modelnet_header(tmp_path):
    square = "0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n"
    (tmp_path / "a.off").write_text("OFF\n# comment\n4 1 0\n" + square)
    (tmp_path / "b.off").write_text("OFF4 1 0\n" + square)  # the ModelNet-40 quirk: counts on the OFF line
    for name in ("a.off", "b.off"):
        vertices, faces = read_off(tmp_path / name)
        assert vertices.shape == (4, 3)
        np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3]])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "broken OFF header"),
        ("PLY\n3 1 0\n", "broken OFF header"),
        ("OFF\nthree one zero\n", "broken OFF header"),
        ("OFF\n0 0 0\n", "empty mesh"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n", "truncated"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "face indices"),
        ("OFF\n3 1 0\n0 0 0\n1 0 x\n0 1 0\n3 0 1 2\n", "bad vertex line"),
        ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1\n", "face line 1"),
    ],
)
def test_read_off_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "broken_0001.off"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_off(path)
    assert str(path) in str(err.value)


def test_read_points_txt(tmp_path):
    path = tmp_path / "chair_0001.txt"
    points, normals = np.random.default_rng(0).normal(size=(2, 5, 3))
    write_points_txt(path, points, normals)
    p, n = read_points_txt(path)
    np.testing.assert_allclose(p, points, atol=1e-6)
    np.testing.assert_allclose(n, normals, atol=1e-6)
    assert read_points_txt(path, max_points=2)[0].shape == (2, 3)


@pytest.mark.parametrize("text, message", [("1,2,3,4,5\n", "6 columns|6 comma-separated"), ("", "no points"),
                                           ("1,2,3,0,0,1\n1,2,3,0,0\n", "6 comma-separated")])
def test_read_points_txt_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "chair_0002.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_points_txt(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------------ datasets
def _modelnet_text_fixture(root, num_points=12):
    """A tiny hand-written resampled-ModelNet root with a class name containing '_' and a second list prefix."""
    rng = np.random.default_rng(0)
    classes = ["airplane", "night_stand"]
    (root / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    (root / "modelnet10_shape_names.txt").write_text("night_stand\n")
    train = [f"{c}_{i:04d}" for c in classes for i in (1, 2, 3, 4, 5)]
    test = [f"{c}_{i:04d}" for c in classes for i in (6, 7)]
    (root / "modelnet40_train.txt").write_text("\n".join(train) + "\n")
    (root / "modelnet40_test.txt").write_text("\n".join(test) + "\n")
    (root / "modelnet10_train.txt").write_text("night_stand_0001\n")
    for shape_id in train + test:
        cls = shape_id.rsplit("_", 1)[0]
        pts = rng.normal(size=(num_points, 3)) * 3 + 5
        nrm = rng.normal(size=(num_points, 3))
        write_points_txt(root / cls / f"{shape_id}.txt", pts, nrm / np.linalg.norm(nrm, axis=1, keepdims=True))
    return classes


def test_modelnet_text_layout(tmp_path):
    classes = _modelnet_text_fixture(tmp_path)
    assert detect_format(tmp_path) == "txt"
    names, items = list_shapes(tmp_path, "train")
    assert names == classes and len(items) == 10 and items[-1][0] == tmp_path / "night_stand" / "night_stand_0005.txt"
    assert list_shapes(tmp_path, "train", prefix="modelnet10")[0] == ["night_stand"]
    train, val, test = (ModelNet(tmp_path, s, num_points=8) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (8, 2, 4)
    assert train.num_classes == 2 and sorted(val.labels.tolist()) == [0, 1]  # stratified 80/20 per class
    assert set(train.clouds[:, 0, 0].tolist()).isdisjoint(val.clouds[:, 0, 0].tolist())
    item = test[0]
    assert item.pos.shape == item.normal.shape == (8, 3) and item.y.item() == 0 and item.pos.dtype == torch.float32
    assert torch.allclose(item.pos.mean(0), torch.zeros(3), atol=0.1)  # centred on the 12-point centroid
    assert torch.allclose(item.pos.norm(dim=1).max(), torch.tensor(1.0), atol=0.5)
    assert torch.allclose(item.normal.norm(dim=1), torch.ones(8), atol=1e-5)
    assert (tmp_path / "processed").is_dir()
    again = ModelNet(tmp_path, "test", num_points=8)
    assert torch.equal(again.clouds, test.clouds)


def test_modelnet_errors_name_the_file(tmp_path):
    _modelnet_text_fixture(tmp_path)
    bad = tmp_path / "airplane" / "airplane_0003.txt"
    bad.write_text("1,2,3\n" * 20)
    with pytest.raises(ValueError, match="airplane_0003.txt"):
        ModelNet(tmp_path, "train", num_points=8, cache_dir=None)
    with pytest.raises(ValueError, match="fewer than the 50 requested"):
        ModelNet(tmp_path, "test", num_points=50, cache_dir=None)
    with pytest.raises(ValueError, match="no such directory"):
        ModelNet(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        ModelNet(tmp_path, "validation")


def test_off_layout_through_the_same_loader(tmp_path):
    root = write_procedural_dataset(tmp_path / "off", 3, 1, classes=("box", "torus"), format="off")
    assert detect_format(root) == "off"
    assert (root / "torus" / "train" / "torus_0002.off").is_file()
    assert (root / "box" / "test" / "box_0004.off").is_file()
    train, test = ModelNet(root, "train", num_points=64, val_fraction=0.0), ModelNet(root, "test", num_points=64)
    assert (len(train), len(test), train.classes) == (6, 2, ["box", "torus"])
    np.testing.assert_allclose(train.clouds[..., :3].norm(dim=-1).amax(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(train.clouds[..., 3:].norm(dim=-1), 1.0, atol=1e-5)
    # a broken mesh in the tree is reported by name
    bad = root / "box" / "train" / "box_0001.off"
    bad.write_text("OFF\n3 1 0\n0 0 0\n0 0 0\n0 0 0\n3 0 1 2\n")
    with pytest.raises(ValueError, match=r"box_0001\.off: mesh has zero surface area"):
        ModelNet(root, "train", num_points=64, cache_dir=None)


def test_procedural_text_dataset_is_deterministic_and_idempotent(tmp_path):
    a = write_procedural_dataset(tmp_path / "a", 2, 1, num_points=32, classes=("sphere", "table", "lamp"))
    b = write_procedural_dataset(tmp_path / "b", 2, 1, num_points=32, classes=("sphere", "table", "lamp"))
    assert (a / "shapes_train.txt").read_text().split() == ["sphere_0001", "sphere_0002", "table_0001", "table_0002",
                                                            "lamp_0001", "lamp_0002"]  # fmt: skip
    assert (a / "lamp" / "lamp_0003.txt").read_text() == (b / "lamp" / "lamp_0003.txt").read_text()
    stamp = (a / "lamp" / "lamp_0003.txt").stat().st_mtime_ns
    write_procedural_dataset(tmp_path / "a", 2, 1, num_points=32, classes=("sphere", "table", "lamp"))
    assert (a / "lamp" / "lamp_0003.txt").stat().st_mtime_ns == stamp  # same parameters: nothing rewritten
    ds = ModelNet(a, "test", num_points=32)
    assert ds.classes == ["sphere", "table", "lamp"] and ds.labels.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("group_name", ["so2", "o2", "cinfh", "so3"])
def test_augmentation_samples_lie_in_the_group_and_rotate_points_and_normals(tmp_path, group_name):
    root = write_procedural_dataset(tmp_path, 3, 1, num_points=16, classes=("cone", "box"))
    group = groups.get(group_name)
    plain = ModelNet(root, "train", num_points=16, cache_dir=None)
    aug = ModelNet(root, "train", num_points=16, augment=group_name, cache_dir=None)
    rots = []
    for i in range(len(aug)):
        item = aug[i]
        R = item.rot[0].double()
        rots.append(R)
        torch.testing.assert_close(item.pos.double(), plain[i].pos.double() @ R.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(item.normal.double(), plain[i].normal.double() @ R.T, atol=1e-5, rtol=0)
    rots = torch.stack(rots)
    assert bool(group.contains(rots, atol=1e-5).all())
    assert not torch.allclose(rots[0], rots[1])
    assert not torch.equal(aug[0].rot, aug[0].rot), "training augmentation draws a new element at each access"
    test = ModelNet(root, "test", num_points=16, augment=group_name, cache_dir=None)
    assert torch.equal(test[1].rot, test[1].rot), "evaluation rotations are fixed per item"
    assert bool(group.contains(test[1].rot[0].double(), atol=1e-5))


def test_augmentation_inside_dataloader_workers_differs_between_workers_and_epochs(tmp_path):
    root = write_procedural_dataset(tmp_path, 2, 1, num_points=8, classes=("cone", "box"))
    ds = ModelNet(root, "train", num_points=8, augment="so2", cache_dir=None)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda items: items[0].rot)
    torch.manual_seed(0)
    epochs = [torch.cat(list(loader)) for _ in range(2)]
    assert not torch.allclose(epochs[0], epochs[1]), "a new rotation per epoch"
    assert not torch.allclose(epochs[0][0], epochs[0][1]), "workers do not repeat each other's rotations"
    assert bool(groups.get("so2").contains(epochs[0].double(), atol=1e-5).all())
