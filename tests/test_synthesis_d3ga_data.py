"""D3GA's data: capture loading, splits, batches, per-part cages and Gaussians, face keypoints.

One tiny clothed-body dataset (1 subject, 4 frames, 3 cameras at 48 x 64) is generated into a
temporary cache by `cache.cached_bodies`; the parts are built once per layer mode with a few
thousand Gaussians.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.data import body_synthetic, cache
from dhjax.data import dataset as ds
from dhjax.geometry import tetra
from dhjax.models import body as body_lib
from dhjax.synthesis import d3ga_data as dd

N_GAUSS = dict(body=1200, face=300, upper=800, lower=800)


def _config():
    c = body_synthetic.tiny_config()
    c.n_subjects, c.n_frames = 1, 4
    c.dome.update(n_cameras=3, width=48, height=64)
    return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    r = cache.cached_bodies(_config(), cache_dir=tmp, verbose=False)
    assert cache.cached_bodies(_config(), cache_dir=tmp, verbose=False) == r      # reused, not rebuilt
    return r


@pytest.fixture(scope="module")
def capture(root):
    return dd.load_capture(root, log=lambda *a: None)


@pytest.fixture(scope="module")
def model():
    return body_lib.load()


@pytest.fixture(scope="module")
def parts(model, capture):
    return dd.build_parts(model, capture.shape, capture.upper_kind, capture.lower_kind,
                          dict(n_gaussians=N_GAUSS, seed=3))


def test_capture_shapes_and_values(root, capture):
    F, C, H, W = 4, 3, 64, 48
    assert capture.images.shape == (F, C, H, W, 3) and capture.images.dtype == np.uint8
    assert capture.masks.shape == (F, C, H, W) and capture.masks.dtype == bool
    assert capture.layers.shape == (F, C, H, W) and capture.layers.dtype == np.uint8
    assert capture.K.shape == (F, C, 3, 3) and capture.R.shape == (F, C, 3, 3) and capture.t.shape == (F, C, 3)
    assert capture.pose.shape == (F, 55, 3) and capture.translation.shape == (F, 3)
    assert capture.keypoints.shape == (F, 106, 3) and capture.shape.shape == (10,)
    assert capture.expression.shape == (F, 10)
    np.testing.assert_array_equal(capture.frame, np.arange(F))
    np.testing.assert_array_equal(capture.view, np.arange(C))
    # Layers: 0 exactly off the mask, and all three foreground layers present (shirt + trousers).
    assert not capture.layers[~capture.masks].any() and (capture.layers[capture.masks] > 0).all()
    assert set(np.unique(capture.layers)) == {0, 1, 2, 3}
    # Round trip against the reader and the generator.
    reader = ds.FolderDataset(root, "train")
    s = reader[2 * C + 1]                                   # frame 2, camera 1
    np.testing.assert_array_equal(capture.images[2, 1], np.round(s["image"] * 255).astype(np.uint8))
    np.testing.assert_array_equal(capture.layers[2, 1], s["seg"])
    np.testing.assert_array_equal(capture.pose[2], s["pose"])
    np.testing.assert_array_equal(capture.keypoints[2], s["keypoints"])
    np.testing.assert_array_equal(capture.K[2, 1], s["K"])
    subj = body_synthetic.sample_subject(0, 0, 10)
    assert (capture.upper_kind, capture.lower_kind) == (subj["upper"], subj["lower"])
    np.testing.assert_allclose(capture.shape, subj["betas"], atol=1e-6)
    sub = capture.take([1, 3], [2])
    assert sub.images.shape == (2, 1, H, W, 3) and sub.keypoints.shape == (2, 106, 3)
    assert sub.upper_kind == capture.upper_kind and list(sub.frame) == [1, 3] and list(sub.view) == [2]
    assert dd.load_capture(root, max_frames=2, log=lambda *a: None).images.shape[0] == 2
    assert dd.load_capture(root, item=0, max_frames=1, log=lambda *a: None).images.shape[0] == 1
    with pytest.raises(ValueError, match="no item 7"):
        dd.load_capture(root, item=7, log=lambda *a: None)


def test_split_and_batches(capture):
    sp = dd.split(capture, test_views=[2], n_test_frames=1)
    assert set(sp.train_frames) | set(sp.test_frames) == {0, 1, 2, 3}
    assert not set(sp.train_frames) & set(sp.test_frames) and list(sp.test_frames) == [3]
    assert list(sp.train_views) == [0, 1] and list(sp.test_views) == [2]
    assert len(dd.split(capture, [], 0.5).test_frames) == 2
    for bad in (dict(test_views=[9], n_test_frames=1), dict(test_views=[0, 1, 2], n_test_frames=1),
                dict(test_views=[0], n_test_frames=4)):
        with pytest.raises(ValueError):
            dd.split(capture, **bad)

    bg = np.array([[0.1, 0.7, 0.3], [0.9, 0.2, 0.5]], np.float32)
    b = dd.frame_batch(capture, 1, [0, 2], bg)
    assert b["image"].shape == (2, 64, 48, 3) and b["image"].dtype == np.float32
    assert b["layers"].dtype == np.int32 and b["pose"].shape == (55, 3) and b["keypoints"].shape == (106, 3)
    assert b["index"] == 1 and b["K"].shape == (2, 3, 3)
    for k in range(2):
        m = b["mask"][k] > 0.5
        np.testing.assert_allclose(b["image"][k][~m], np.broadcast_to(bg[k], ((~m).sum(), 3)))
        np.testing.assert_allclose(b["image"][k][m], capture.images[1, [0, 2][k]][m] / 255.0, atol=1e-6)

    fb = dd.FrameBatches(capture, sp, seed=5)
    x, y = fb.get_batch(7), fb.get_batch(7)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert x["image"].shape == (1, 64, 48, 3) and x["pose"].shape == (1, 55, 3) and x["K"].shape == (1, 3, 3)
    batches = [dd.FrameBatches(capture, sp, batch_size=4, seed=1).get_batch(s) for s in range(5)]
    assert all(set(b["index"]) <= set(sp.train_frames) and set(b["view"]) <= set(sp.train_views) for b in batches)
    assert len({tuple(b["background"][0]) for b in batches}) == 5          # random backgrounds


def _check_part(p):
    G = p["gauss_tet"].shape[0]
    assert p["tets"].shape[1] == 4 and len(p["tets"]) == p["stats"]["tets"] > 0
    assert p["rest_nodes"].dtype == np.float32 and p["tets"].max() < len(p["rest_nodes"])
    assert len(np.unique(p["tets"])) == len(p["rest_nodes"])              # no unused nodes
    assert p["rest_inv"].shape == (len(p["tets"]), 3, 3)
    np.testing.assert_allclose(p["node_weights"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p["surf_weights"].sum(1), 1.0, atol=1e-5)
    assert (tetra.tet_volumes(p["rest_nodes"].astype(np.float64), p["tets"]) > 0).all()
    assert p["gauss_bary"].shape == (G, 4) and (p["gauss_bary"] >= 0).all()
    np.testing.assert_allclose(p["gauss_bary"].sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p["gauss_face_bary"].sum(1), 1.0, atol=1e-6)
    assert p["stats"]["outside"] <= max(2, G // 200)
    assert np.isfinite(p["gauss_log_scale"]).all() and p["gauss_log_scale"].shape == (G, 3)
    s = np.exp(p["gauss_log_scale"][:, 0])
    assert 1e-4 < np.median(s) < 0.05
    np.testing.assert_array_equal(p["gauss_quat"], np.tile([1.0, 0, 0, 0], (G, 1)))
    # Rest positions from (tet, bary) and from (triangle, bary) are the sampled surface points.
    x = np.asarray(tetra.interpolate(p["rest_nodes"], p["tets"], p["gauss_tet"], p["gauss_bary"]))
    err = np.linalg.norm(x - p["gauss_rest"], axis=1)
    assert np.sort(err)[G - p["stats"]["outside"] - 1] < 1e-5
    tri = p["surf_vertices"][p["surf_faces"][p["gauss_face"]]]
    np.testing.assert_allclose(np.einsum("gk,gkc->gc", p["gauss_face_bary"], tri), p["gauss_rest"], atol=1e-5)


def test_build_parts_full(model, capture, parts):
    assert [p["name"] for p in parts] == ["body", "face", "upper", "lower"]
    assert [p["layer"] for p in parts] == [1, 1, 2, 3]
    assert [p["driver"] for p in parts] == ["pose", "face", "pose", "pose"]
    for p in parts:
        _check_part(p)
        assert p["gauss_tet"].shape[0] == N_GAUSS[p["name"]]
    body, face = parts[0], parts[1]
    # The face part: tetrahedra in front of the head, Gaussians on the face.
    j = dd.rest_joints(model, capture.shape)
    assert j.shape == (55, 3)
    head = j[dd.HEAD_JOINT]
    cent = face["rest_nodes"][face["tets"]].mean(1)
    assert (cent[:, 2] > head[2]).all() and (cent[:, 1] > j[12, 1]).all()     # in front, above the neck
    assert (face["gauss_rest"][:, 2] > head[2] - 0.02).all() and face["gauss_rest"][:, 2].mean() > head[2] + 0.05
    assert (face["gauss_rest"][:, 1] > j[12, 1] - 0.03).all()
    assert (body["gauss_rest"][:, 1] < head[1] - 0.05).mean() > 0.8                # most of the body is below
    # Body and face split the body cage: no face tetrahedron's centroid lies in a body one.
    body_mesh = tetra.TetMesh(body["rest_nodes"].astype(np.float64), body["tets"])
    assert not tetra.locate_points(body_mesh, cent.astype(np.float64))[2].any()
    # Surface vertices are the rest body's.
    from scipy.spatial import cKDTree

    v_rest = dd.rest_vertices(model, capture.shape)
    assert cKDTree(v_rest).query(body["surf_vertices"])[0].max() < 1e-6
    # Garment Gaussians lie on the garments (their layer labels).
    assert (parts[2]["gauss_layer"] == 2).all() and (parts[3]["gauss_layer"] == 3).all()


def test_build_parts_single(model, capture):
    (p,) = dd.build_parts(model, capture.shape, capture.upper_kind, capture.lower_kind,
                          dict(n_gaussians=(600, 100, 400, 400), layers="single"))
    assert (p["name"], p["layer"], p["driver"]) == ("body", 1, "pose")
    _check_part(p)
    assert p["gauss_tet"].shape[0] == 1500
    assert set(np.unique(p["gauss_layer"])) == {1, 2, 3}                       # body and both garments


def test_face_code_input(model, capture):
    B = capture.pose.shape[0]
    f = jax.jit(dd.face_code_input)
    x = np.asarray(f(model, capture.shape, capture.pose, capture.translation, capture.keypoints))
    assert x.shape == (B, 51, 3)
    # Rest pose: the rest face points.
    out = body_lib.forward(model, capture.shape[None], None, jnp.zeros((1, 55, 3)), jnp.zeros((1, 3)))
    x0 = dd.face_code_input(model, capture.shape, np.zeros((1, 55, 3)), np.zeros((1, 3)), out.keypoints)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(out.keypoints)[:, 55:], atol=1e-6)
    # A global rotation + translation of the whole body leaves the head-frame keypoints unchanged.
    from dhjax.geometry import rotations

    g = np.array([0.3, -1.1, 0.4], np.float32)
    pose = capture.pose.copy()
    pose[:, 0] = np.asarray(rotations.matrix_to_axis_angle(
        rotations.axis_angle_to_matrix(jnp.asarray(g))[None] @ rotations.axis_angle_to_matrix(jnp.asarray(pose[:, 0]))))
    trans = capture.translation + np.array([0.5, -0.2, 1.3], np.float32)
    kp = body_lib.forward(model, np.repeat(capture.shape[None], B, 0), capture.expression, pose, trans).keypoints
    y = np.asarray(f(model, capture.shape, pose, trans, kp))
    np.testing.assert_allclose(y, x, atol=2e-5)
    # ... while the keypoints themselves moved.
    assert np.abs(np.asarray(kp) - capture.keypoints).max() > 0.3
    mean, std = dd.face_keypoint_stats(capture, model)
    assert mean.shape == std.shape == (51, 3) and (std >= 1e-4).all()
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-6)


def test_bad_inputs(root, model, capture, tmp_path):
    with pytest.raises(ValueError, match="upper garment kind 'cape'"):
        dd.build_parts(model, capture.shape, "cape", "trousers")
    with pytest.raises(ValueError, match="lower garment kind 'shirt'"):
        dd.build_parts(model, capture.shape, "shirt", "shirt")
    with pytest.raises(ValueError, match="layers"):
        dd.build_parts(model, capture.shape, "shirt", "trousers", dict(layers="double"))
    with pytest.raises(ValueError, match="n_gaussians"):
        dd.build_parts(model, capture.shape, "shirt", "trousers", dict(n_gaussians=(1, 2)))

    bad = tmp_path / "noseg"
    shutil.copytree(root, bad)
    seg = bad / "train" / "item_0000000" / "frame_0002" / "cam_01_seg.png"
    seg.unlink()
    with pytest.raises(ValueError, match=r"frame_0002/cam_01_seg.png.*garment loss"):
        dd.load_capture(bad, log=lambda *a: None)

    bad = tmp_path / "pose"
    shutil.copytree(root, bad)
    ppath = bad / "train" / "item_0000000" / "frame_0001" / "params.npz"
    params = dict(np.load(ppath))
    params["pose"] = params["pose"][:5]
    np.savez(ppath, **params)
    with pytest.raises(ValueError, match=r"frame_0001/params.npz.*pose"):
        dd.load_capture(bad, log=lambda *a: None)

    params = dict(np.load(ppath))
    params["pose"] = np.zeros((55, 3), np.float32)
    del params["keypoints"]
    np.savez(ppath, **params)
    with pytest.raises(ValueError, match=r"frame_0001/params.npz.*keypoints"):
        dd.load_capture(bad, log=lambda *a: None)
