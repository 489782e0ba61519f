"""Tests of the metrical face tracker (dhjax.capture.tracker) and its runs (dhjax.capture.track_run:
input handling, the synthetic benchmark)."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.capture import track_run
from dhjax.capture import tracker
from dhjax.geometry import rotations
from dhjax.models import flame
from dhjax.render import camera as camera_lib


@pytest.fixture(scope="module")
def model():
    return flame.load()


def _params(model, cfg, static, lmk_frame, **over):
    p = tracker.initial_params(cfg, static, lmk_frame)
    p = dict(p)
    for k, v in over.items():
        p[k] = jnp.asarray(v, jnp.float32)
    return p


def _true_params(model, cfg, static, seed=0):
    """A plausible tracked state: small expression/jaw/neck, a rotated head 0.6 m away."""
    rng = np.random.default_rng(seed)
    dummy = tracker.frame_data(np.zeros((static.height, static.width, 3)), np.zeros((68, 2)) + 30,
                               np.arange(68))
    dummy = tracker.FrameData(image=dummy.image, landmarks=np.stack(
        [np.linspace(20, 44, 68), np.linspace(20, 44, 68)], -1).astype(np.float32), landmark_ids=np.arange(68),
        mask=dummy.mask)
    p = dict(tracker.initial_params(cfg, static, dummy))
    R = np.asarray(rotations.axis_angle_to_matrix(jnp.array([0.1, 0.3, -0.05]))) @ np.diag([1.0, -1.0, -1.0])
    p.update(
        shape=jnp.asarray(rng.normal(0, 1.0, cfg.n_shape), jnp.float32),
        expression=jnp.asarray(rng.normal(0, 0.5, cfg.n_expression), jnp.float32),
        jaw=jnp.array([0.12, 0.0, 0.0]), neck=jnp.array([0.05, -0.05, 0.0]),
        rot6d=rotations.matrix_to_rotation_6d(jnp.asarray(R, jnp.float32)),
        trans=jnp.array([0.005, 0.01, 0.6]), log_focal=jnp.asarray(np.log(2.2), jnp.float32))
    return p


def test_bilinear_matches_scipy_and_is_differentiable():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    img = rng.random((9, 13, 3)).astype(np.float32)
    uv = np.stack([rng.uniform(0, 12, 50), rng.uniform(0, 8, 50)], -1).astype(np.float32)
    got = np.asarray(tracker._bilinear(jnp.asarray(img), jnp.asarray(uv)))
    want = np.stack([scipy_ndimage.map_coordinates(img[..., c], [uv[:, 1], uv[:, 0]], order=1) for c in range(3)], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Gradient in the coordinates equals the finite difference away from pixel boundaries.
    f = lambda q: jnp.sum(tracker._bilinear(jnp.asarray(img), q))
    q = jnp.asarray([[3.3, 4.6]])
    g = np.asarray(jax.grad(f)(q))
    eps = 1e-3
    fd = [(f(q + eps * jnp.eye(2)[i]) - f(q - eps * jnp.eye(2)[i])) / (2 * eps) for i in range(2)]
    np.testing.assert_allclose(g[0], np.asarray(fd), rtol=1e-2)


def test_pyramid_is_box_filter():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    img = rng.random((16, 12, 3)).astype(np.float32)
    pyr = tracker._pyramid(img, (2, 1, 0))
    np.testing.assert_array_equal(pyr[0], img)
    np.testing.assert_allclose(pyr[1], transform.downscale_local_mean(img, (2, 2, 1)), atol=1e-6)
    np.testing.assert_allclose(pyr[2], transform.downscale_local_mean(img, (4, 4, 1)), atol=1e-6)


def test_exported_cameras_reproduce_the_tracked_projection(model):
    """OpenCV K, R, t and the FLAME parameters written out give the same pixels as the tracker."""
    cfg = tracker.default_config()
    static = tracker.make_static(model, 64, 48)
    p = _true_params(model, cfg, static)
    verts, lmk, R = tracker.camera_space_vertices(p, model)
    K = tracker.intrinsics_matrix(p, 64, 48)
    fp = tracker.flame_parameters(jax.tree.map(np.asarray, p))
    out = flame.forward(model, fp["shape"][None], fp["expression"][None], fp["pose"][None], fp["translation"][None])
    cam = camera_lib.make_camera(K, R, p["trans"], 64, 48)
    uv_world, _ = camera_lib.project(cam, out.vertices[0])
    # The tracker's own pixels, and an explicit pinhole formula on its camera-space vertices.
    v = np.asarray(verts, np.float64)
    Kn = np.asarray(K, np.float64)
    pinhole = np.stack([Kn[0, 0] * v[:, 0] / v[:, 2] + Kn[0, 2], Kn[1, 1] * v[:, 1] / v[:, 2] + Kn[1, 2]], -1)
    np.testing.assert_allclose(np.asarray(uv_world), pinhole, atol=1e-3)
    np.testing.assert_allclose(np.asarray(tracker._project(p, verts, 64, 48)), pinhole, atol=1e-3)
    assert abs(float(K[0, 0]) - 2.2 * 64) < 1e-3


def test_visibility_sees_the_front_not_the_back(model):
    cfg = tracker.default_config()
    static = tracker.make_static(model, 96, 96, samples_per_face=1)
    p = _true_params(model, cfg, static)
    p["rot6d"] = rotations.matrix_to_rotation_6d(
        jnp.asarray(np.diag([1.0, -1.0, -1.0]), jnp.float32))
    p["trans"] = jnp.array([0.0, 0.0, 0.6])
    vis = tracker.visibility(p, static)
    verts, _, _ = tracker.camera_space_vertices(p, model)
    pos, nrm, _ = tracker._samples(p, model, jnp.asarray(static.sample_faces), jnp.asarray(static.sample_bary), verts)
    nrm = np.asarray(nrm)
    # Frontal view: samples facing the camera (normal z < -0.5) are mostly visible, none facing away is.
    assert vis[nrm[:, 2] < -0.5].mean() > 0.8
    assert vis[nrm[:, 2] > 0.0].sum() == 0
    # A mask that excludes the left half of the image removes those samples.
    mask = np.ones((96, 96), np.float32)
    mask[:, :48] = 0
    vis_m = tracker.visibility(p, static, mask)
    px = np.asarray(tracker._project(p, pos, 96, 96))
    assert vis_m[px[:, 0] < 47].sum() == 0 and vis_m.sum() > 0


def _rendered_frames(model, cfg, W, n, seed=3):
    """n frames rendered from known parameters (the head turning a little between frames)."""
    static = tracker.make_static(model, W, W)
    truth = _true_params(model, cfg, static, seed=seed)
    truth["sh"] = jnp.asarray(np.r_[[[2.6] * 3, [0.2] * 3, [-0.5] * 3], np.zeros((6, 3))], jnp.float32)
    truth["albedo"] = jnp.full((cfg.albedo_size, cfg.albedo_size, 3), jnp.array([0.7, 0.5, 0.4]))
    frames = []
    for i in range(n):
        p = dict(truth, jaw=truth["jaw"] + 0.03 * i)
        r = tracker.render_frame(jax.tree.map(np.asarray, p), model, W, W)
        frames.append(tracker.frame_data(np.where(r["mask"][..., None] > 0, r["image"], 0.2), r["landmarks"],
                                         np.arange(68)))
    return frames, truth


def test_tracking_recovers_a_rendered_frame(model):
    """Frames rendered from known parameters, tracked with the true identity shape and focal
    length (what a metric shape estimate and a calibrated camera give): the tracker fits the
    landmarks to sub-pixel accuracy and recovers the camera-space surface to a few millimetres,
    depth included. (From the mean face the depth error is set by the unknown head size, which
    no single view can tell; that is MICA's job, see the synthetic benchmark.)"""
    cfg = tracker.default_config()
    cfg.pyramid = (1, 0)
    cfg.first.update(rigid_steps=100, landmark_steps=150, steps=(40, 40))
    cfg.frame.update(landmark_steps=10, steps=(10, 10))
    W = H = 96
    frames, truth = _rendered_frames(model, cfg, W, 2)
    static = tracker.make_static(model, W, H)
    cfg.focal = float(np.exp(truth["log_focal"]) * W)     # calibrated camera
    result = tracker.track_sequence(cfg, model, frames, shape_init=truth["shape"], log=None)
    assert result.landmark_error_px[0] < 0.5 and result.landmark_error_px[1] < 0.5
    est, _, _ = tracker.camera_space_vertices(jax.tree.map(jnp.asarray, result.params[-1]), model)
    tv, _, _ = tracker.camera_space_vertices(dict(truth, jaw=truth["jaw"] + 0.03), model)
    reg = static.region_vertices
    err = np.median(np.linalg.norm(np.asarray(est)[reg] - np.asarray(tv)[reg], axis=-1))
    init = tracker.initial_params(cfg, static, frames[0], truth["shape"])
    e0, _, _ = tracker.camera_space_vertices(init, model)
    err0 = np.median(np.linalg.norm(np.asarray(e0)[reg] - np.asarray(tv)[reg], axis=-1))
    assert err < 0.25 * err0 and err < 0.003, (err, err0)
    assert result.photometric_error[-1] < 0.05


def test_killed_tracking_resumes_after_the_last_saved_frame(model, tmp_path):
    """Frames are saved as they finish; a second run over the same frames and settings loads
    them and continues, with the same result as one uninterrupted run. Other settings or other
    frames in that folder are refused with a message naming the difference."""
    cfg = tracker.default_config()
    cfg.pyramid = (0,)
    cfg.first.update(rigid_steps=20, landmark_steps=20, steps=(10,))
    cfg.frame.update(landmark_steps=5, steps=(5,))
    frames, _ = _rendered_frames(model, cfg, 48, 3)
    full = tracker.track_sequence(cfg, model, frames, log=None, progress_dir=tmp_path / "full")
    assert sorted(f.name for f in (tmp_path / "full").glob("frame_*.npz")) == [
        "frame_0000.npz", "frame_0001.npz", "frame_0002.npz"]
    # "Killed" after two frames: the same call later sees all three and tracks only the last.
    tracker.track_sequence(cfg, model, frames[:2], log=None, progress_dir=tmp_path / "run")
    logs = []
    resumed = tracker.track_sequence(cfg, model, frames, log=logs.append, progress_dir=tmp_path / "run")
    assert any("resuming: 2 of 3" in m for m in logs), logs
    assert sum(m.startswith("frame ") for m in logs) == 1, logs     # only frame 3 was tracked
    for a, b in zip(full.params, resumed.params):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)
    np.testing.assert_allclose(resumed.K, full.K, atol=1e-4)
    np.testing.assert_allclose(resumed.landmark_error_px, full.landmark_error_px, atol=1e-5)
    other = tracker.default_config()
    other.update(cfg.to_dict())
    other.weights.photometric = 0.1
    with pytest.raises(ValueError, match="another config"):
        tracker.track_sequence(other, model, frames, log=None, progress_dir=tmp_path / "run")
    swapped = [frames[1], frames[0], frames[2]]
    with pytest.raises(ValueError, match="different frame 0"):
        tracker.track_sequence(cfg, model, swapped, log=None, progress_dir=tmp_path / "run")


def test_dataset_round_trip(model, tmp_path):
    from dhjax.data.dataset import FolderDataset
    cfg = tracker.default_config()
    W, H = 64, 64
    static = tracker.make_static(model, W, H)
    p = jax.tree.map(np.asarray, _true_params(model, cfg, static))
    frame = tracker.frame_data(np.full((H, W, 3), 0.3), np.full((68, 2), 30.0) + np.arange(68)[:, None] * 0.1,
                               np.arange(68))
    K = np.asarray(tracker.intrinsics_matrix(p, W, H))
    R = np.asarray(rotations.rotation_6d_to_matrix(jnp.asarray(p["rot6d"])))
    res = tracker.TrackResult(params=[p], K=K[None], R=R[None], t=np.asarray(p["trans"])[None],
                              landmark_error_px=np.zeros(1), photometric_error=np.zeros(1), seconds=0.0)
    meta = tracker.write_dataset(tmp_path / "ds", res, [frame], model)
    assert json.loads(meta.read_text())["kind"] == "video"
    ds = FolderDataset(tmp_path / "ds", "train")
    s = ds[0]
    np.testing.assert_allclose(s["K"], K, atol=1e-4)
    np.testing.assert_allclose(s["R"], R, atol=1e-5)
    np.testing.assert_allclose(s["expression"], p["expression"], atol=1e-6)
    assert s["depth"].max() > 0.5 and s["mask"].sum() > 0
    # SynShot's inversion reads it as the README says (--config.data.split=train
    # --config.data.input_views="(0,)" --config.data.input_frames=...): one subject, camera 0
    from dhjax.synthesis import synshot_invert as inv
    inputs, rest = inv.split_inputs(inv.subject_samples(ds, 0), (0,), (0,))
    inv.check_subject(inputs)
    assert len(inputs) == 1 and not rest
    maps = inv.subject_maps(inputs, model, 16)
    assert maps["uv_expression_offset"].shape == (1, 16, 16, 3) and np.isfinite(maps["uv_position"]).all()


def test_bad_inputs(model):
    img = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ValueError, match=r"landmarks must be \[K, 2\]"):
        tracker.frame_data(img, np.zeros((68, 3)), np.arange(68))
    with pytest.raises(ValueError, match="non-finite"):
        tracker.frame_data(img, np.full((68, 2), np.nan), np.arange(68))
    with pytest.raises(ValueError, match="too few"):
        tracker.frame_data(img, np.zeros((3, 2)), np.arange(3))
    with pytest.raises(ValueError, match="iBUG-68"):
        tracker.frame_data(img, np.zeros((5, 2)), np.arange(70, 75))
    with pytest.raises(ValueError, match="image must be"):
        tracker.frame_data(np.zeros((32, 32)), np.zeros((68, 2)), np.arange(68))
    with pytest.raises(ValueError, match="mask must be"):
        tracker.frame_data(img, np.zeros((68, 2)), np.arange(68), mask=np.ones((10, 10)))
    a = tracker.frame_data(img, np.random.default_rng(0).uniform(5, 25, (68, 2)), np.arange(68))
    b = tracker.frame_data(np.zeros((16, 32, 3)), a.landmarks, np.arange(68))
    with pytest.raises(ValueError, match="one size"):
        tracker.track_sequence(tracker.default_config(), model, [a, b], log=None)
    with pytest.raises(ValueError, match="no frames"):
        tracker.track_sequence(tracker.default_config(), model, [], log=None)


def test_run_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        track_run.read_frames(str(tmp_path / "missing.mp4"))
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="cannot decode video"):
        track_run.read_frames(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        track_run.read_frames(str(tmp_path / "empty"))
    from dhjax import io as dio
    d = tmp_path / "frames"
    d.mkdir()
    dio.save_image(d / "a.png", np.zeros((16, 16, 3)))
    dio.save_image(d / "b.png", np.zeros((16, 16, 3)))
    frames, names = track_run.read_frames(str(d))
    assert names == ["a", "b"] and frames[0].shape == (16, 16, 3)
    lm = tmp_path / "lmk.npy"
    np.save(lm, np.zeros((67, 2)) + 5)
    with pytest.raises(ValueError, match="67"):
        track_run.frame_landmarks(frames[:1], names[:1], str(lm))
    np.save(lm, np.zeros((3, 68, 2)) + 5 + np.arange(68)[None, :, None] * 0.1)
    with pytest.raises(ValueError, match="3 landmark sets for 2 frames"):
        track_run.frame_landmarks(frames, names, str(lm))
    lmd = tmp_path / "lmkdir"
    lmd.mkdir()
    np.save(lmd / "a.npy", np.zeros((68, 2)) + 5 + np.arange(68)[:, None] * 0.1)
    with pytest.raises(FileNotFoundError, match="frame b"):
        track_run.frame_landmarks(frames, names, str(lmd))


@pytest.mark.peers
def test_real_photo_detect_and_fit(model, tmp_path):
    """skimage's astronaut photo (a real face shipped by a package): mediapipe detection, then a
    single-frame fit whose landmarks reproject within a few pixels of the detected ones."""
    pytest.importorskip("mediapipe")
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    from dhjax.capture import landmarks as lmk_lib
    from dhjax import io as dio
    image = transform.downscale_local_mean(data.astronaut().astype(np.float32) / 255.0, (2, 2, 1))  # 256 x 256
    lm = lmk_lib.detect(image, name="astronaut")
    frame = tracker.frame_data(image, lm.points, lm.ibug_ids, name="astronaut")
    cfg = tracker.default_config()
    cfg.pyramid = (1, 0)
    cfg.first.update(landmark_steps=200, steps=(30, 30))
    result = tracker.track_sequence(cfg, model, [frame], log=None)
    assert result.landmark_error_px[0] < 3.0          # 256-pixel image; the face is ~60 px wide
    rendered = tracker.render_frame(result.params[0], model, 256, 256)
    over = tracker.overlay(frame, rendered)
    assert over.shape == (256, 512, 3) and np.isfinite(over).all()
    # The fitted face covers the detected landmarks' region.
    x0, y0 = lm.points.min(0).astype(int)
    x1, y1 = lm.points.max(0).astype(int)
    assert rendered["mask"][y0:y1, x0:x1].mean() > 0.95
    dio.save_image(tmp_path / "overlay.png", over)


def test_synthetic_benchmark_smoke(tmp_path):
    """track_run.run on synthetic input: every (sequence, initialisation) is tracked and
    scored against the ground truth, and the report averages over the sequences."""
    from configs import track as track_cfg
    cfg = track_cfg.get_config("tiny")
    cfg.synthetic.update(sequences=(0, 1), n_frames=2, width=64, height=64, uv_size=32, compare=("mean", "true"))
    cfg.tracker.pyramid = (0,)
    cfg.tracker.first.update(rigid_steps=20, landmark_steps=20, steps=(10,))
    cfg.tracker.frame.update(landmark_steps=5, steps=(5,))
    bad = track_cfg.get_config("tiny")
    bad.max_frames = 4
    with pytest.raises(ValueError, match="synthetic.n_frames"):
        track_run.run(bad, tmp_path / "bad", input="synthetic")
    assert not (tmp_path / "bad").exists()
    report = track_run.run(cfg, tmp_path, input="synthetic")
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep == json.loads(json.dumps(report))
    assert [(r["sequence"], r["init"]) for r in rep["rows"]] == [(0, "mean"), (0, "true"), (1, "mean"), (1, "true")]
    for r in rep["rows"]:
        assert np.isfinite(r["vertex_median_mm"]) and np.isfinite(r["depth_rmse_mm"])
        assert abs(r["focal_px"] - r["true_focal_px"]) < 1e-3          # given focal length stays fixed
        assert (r["init_shape_error_mm"] == 0.0) == (r["init"] == "true")
    mean_true = [s for s in rep["summary"] if s["init"] == "true"][0]
    want = np.mean([r["vertex_median_mm"] for r in rep["rows"] if r["init"] == "true"])
    assert mean_true["sequences"] == 2 and abs(mean_true["vertex_median_mm"] - want) < 1e-9
    assert "Mean over the 2 sequence(s)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "overlay.mp4").exists() and (tmp_path / "dataset" / "meta.json").exists()


def test_run_on_one_image_with_a_landmark_file(tmp_path):
    """track_run.run on one photo with given landmarks: parameters, cameras, overlay and the
    per-frame report table."""
    from configs import track as track_cfg
    from dhjax import io as dio
    cfg = track_cfg.get_config()
    cfg.synthetic.update(n_frames=1, width=64, height=64, uv_size=32)
    frames, _, _ = track_run.synthetic_sequence(cfg, 0)
    dio.save_image(tmp_path / "face.png", frames[0].image)
    np.save(tmp_path / "face.npy", frames[0].landmarks)
    cfg.tracker.pyramid = (0,)
    cfg.tracker.first.update(rigid_steps=10, landmark_steps=10, steps=(5,))
    work = tmp_path / "out"
    report = track_run.run(cfg, work, input=str(tmp_path / "face.png"), landmarks=str(tmp_path / "face.npy"))
    assert report["frames"] == 1 and report["shape_init"] == "mean face"
    assert json.loads((work / "report.json").read_text())["mean_landmark_error_px"] == report["mean_landmark_error_px"]
    md = (work / "report.md").read_text()
    assert "| frame | landmark error (px) | photometric L1 |\n|---|---|---|\n| face | " in md
    assert (work / "overlay.png").exists() and "face" in json.loads((work / "cameras.json").read_text())
    assert (work / "params" / "frame_0000.npz").exists()


def _true_params_np(model, tracker_cfg, W, H) -> dict:
    return jax.tree.map(np.asarray, _true_params(model, tracker_cfg, tracker.make_static(model, W, H)))


def _stand_in_tracker(p, W, H, calls):
    """A stand-in for tracker.track_sequence that 'tracks' every frame at parameters p (reporting
    each frame to on_frame as the real one does) and records {n, shape_init} per call in `calls`."""
    K = np.asarray(tracker.intrinsics_matrix(p, W, H))
    R = np.asarray(rotations.rotation_6d_to_matrix(jnp.asarray(p["rot6d"])))

    def track_sequence(cfg, model_, frames, *, shape_init=None, on_frame=None, **kw):
        n = len(frames)
        calls.append(dict(n=n, shape_init=None if shape_init is None else np.asarray(shape_init)))
        for i in range(n):
            if on_frame is not None:
                on_frame(i, dict(params=p, K=K, R=R, t=np.asarray(p["trans"])))
        return tracker.TrackResult(params=[p] * n, K=np.stack([K] * n), R=np.stack([R] * n),
                                   t=np.stack([np.asarray(p["trans"])] * n), landmark_error_px=np.zeros(n),
                                   photometric_error=np.zeros(n), seconds=0.0)

    return track_sequence


def test_given_masks_replace_the_mesh_silhouette_in_the_dataset(model, tmp_path, monkeypatch):
    """--masks (track_run.frame_mattes): a folder of per-frame mask images (grey, RGBA alpha, RGB)
    becomes dataset/'s masks instead of the tracked mesh's silhouette, as streamed while tracking;
    bad masks fail before any tracking, naming the frame, the size or the count."""
    from configs import track as track_cfg
    from dhjax import io as dio
    from dhjax.data import dataset as ds
    cfg = track_cfg.get_config()
    W, H = 48, 40
    p = _true_params_np(model, cfg.tracker, W, H)
    calls = []
    monkeypatch.setattr(tracker, "track_sequence", _stand_in_tracker(p, W, H, calls))
    rng = np.random.default_rng(0)
    for d in ("video", "lmk", "masks"):
        (tmp_path / d).mkdir()
    given = []
    for i in range(3):
        dio.save_image(tmp_path / "video" / f"f{i}.png", rng.uniform(size=(H, W, 3)))
        np.save(tmp_path / "lmk" / f"f{i}.npy", np.full((68, 2), 20.0) + rng.uniform(-5, 5, (68, 2)))
        m = (rng.uniform(size=(H, W)) > 0.5).astype(np.float32)
        given.append(m)
    dio.save_image(tmp_path / "masks" / "f0.png", given[0][..., None])                       # grey
    dio.save_image(tmp_path / "masks" / "f1.png", np.concatenate([np.zeros((H, W, 3)), given[1][..., None]], -1))
    dio.save_image(tmp_path / "masks" / "f2.jpg", np.repeat(given[2][..., None], 3, -1))     # RGB (lossy)
    work = tmp_path / "out"
    report = track_run.run(cfg, work, input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"),
                           masks=str(tmp_path / "masks"))
    out = ds.FolderDataset(work / "dataset")
    silhouette = tracker.render_frame(p, model, W, H)["mask"]
    for i in range(3):
        tol = 0.2 if i == 2 else 1e-6
        np.testing.assert_allclose(out[i]["mask"], given[i], atol=tol, err_msg=f"frame {i}")
        assert np.abs(out[i]["mask"] - silhouette).mean() > 0.2
    meta = json.loads((work / "dataset" / "meta.json").read_text())
    assert meta["masks"] == report["masks"] == f"foreground masks from {tmp_path / 'masks'}"
    assert "dataset masks: foreground masks from" in (work / "report.md").read_text()

    def fails(match, masks, input_="video"):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            track_run.run(cfg, tmp_path / "bad", input=str(tmp_path / input_), landmarks=str(tmp_path / "lmk"),
                          masks=str(masks))

    n_calls = len(calls)
    (tmp_path / "masks" / "f2.jpg").unlink()
    fails("no mask image for frame f2", tmp_path / "masks")
    dio.save_image(tmp_path / "masks" / "f2.png", np.zeros((H + 1, W, 1)))
    fails(f"the mask of frame f2 is {W}x{H + 1}, the frame {W}x{H}", tmp_path / "masks")
    fails("no such file or folder", tmp_path / "nowhere")
    fails("1 masks for 3 frames", tmp_path / "masks" / "f0.png")
    assert len(calls) == n_calls            # every bad mask failed before any tracking
    with pytest.raises(ValueError, match="--masks is for real input"):
        track_run.run(cfg, tmp_path / "bad", input="synthetic", masks=str(tmp_path / "masks"))

    # The workdir records the run (config.json: experiment "track", the inputs): another input,
    # another experiment's folder, or another experiment in this one is refused before any work.
    from dhjax.train import app
    saved = json.loads((work / "config.json").read_text())
    assert saved["experiment"] == "track" and saved["input"] == str((tmp_path / "video").resolve())
    (tmp_path / "video2").mkdir()
    for f in (tmp_path / "video").iterdir():
        (tmp_path / "video2" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(app.RunError, match=r"another config .*\n  input: "):
        track_run.run(cfg, work, input=str(tmp_path / "video2"), landmarks=str(tmp_path / "lmk"),
                      masks=str(tmp_path / "masks"))
    other = tmp_path / "mica_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"experiment": "mica", "seed": 0}))
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(app.RunError, match="holds a run of experiment 'mica', not 'track'"):
        track_run.run(cfg, other, input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"))
    from configs import mica as mica_cfg
    with pytest.raises(app.RunError, match="holds a run of experiment 'track', not 'mica'"):
        app.check_resume_config(work, mica_cfg.get_config("tiny"), log=lambda *a: None)
    assert len(calls) == n_calls
    with pytest.raises(ValueError, match="tracker.focal must be 0 .* got nan"):
        bad = copy.deepcopy(cfg)
        bad.tracker.focal = float("nan")
        track_run.run(bad, tmp_path / "nan", input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"))
    with pytest.raises(FileNotFoundError, match="--input .*nowhere.mp4' does not exist"):
        track_run.run(cfg, tmp_path / "none", input=str(tmp_path / "nowhere.mp4"))
    # a shape or MICA run that is not there fails before the frames are read or the workdir made
    for field, value, match in [("shape_init", str(tmp_path / "z.npz"), "config field shape_init: no file .*z.npz"),
                                ("mica_workdir", str(tmp_path / "nomica"), "nomica' is not a MICA training run"),
                                ("mica_workdir", str(tmp_path / "video"), "is not a MICA training run")]:
        bad = copy.deepcopy(cfg)
        bad[field] = value
        for input_ in ("video", "synthetic"):
            with pytest.raises(FileNotFoundError, match=match):
                track_run.run(bad, tmp_path / "none", input=str(tmp_path / input_) if input_ == "video" else input_,
                              landmarks=str(tmp_path / "lmk") if input_ == "video" else None)
    assert len(calls) == n_calls
    assert not (tmp_path / "nan").exists() and not (tmp_path / "none").exists()


def test_run_on_a_frame_folder_streams_its_dataset_while_tracking(tmp_path, monkeypatch):
    """track_run.run on a video (an image folder with landmark files) writes dataset/ frame by
    frame: after each tracked frame the folder reads back (partially) with that many frames and
    meta.json's "live" entry counts them; at the end it equals tracker.write_dataset's dataset
    of the result, marked done. A tracker failure is recorded in meta.json for a waiting reader."""
    from configs import track as track_cfg
    from dhjax import io as dio
    from dhjax.data import dataset as ds
    cfg = track_cfg.get_config()
    cfg.synthetic.update(n_frames=3, width=64, height=64, uv_size=32)
    frames, _, model = track_run.synthetic_sequence(cfg, 0)
    (tmp_path / "video").mkdir()
    (tmp_path / "lmk").mkdir()
    for i, fr in enumerate(frames):
        dio.save_image(tmp_path / "video" / f"f{i}.png", fr.image)
        np.save(tmp_path / "lmk" / f"f{i}.npy", fr.landmarks)
    cfg.tracker.pyramid = (0,)
    cfg.tracker.first.update(rigid_steps=10, landmark_steps=10, steps=(5,))
    cfg.tracker.frame.update(landmark_steps=3, steps=(3,))
    work = tmp_path / "out"
    seen = []
    add = tracker.DatasetStream.add

    def spy(stream, i, rec):
        add(stream, i, rec)
        live = json.loads((work / "dataset" / "meta.json").read_text())["live"]
        seen.append((len(ds.FolderDataset(work / "dataset", partial=True)), live["tracked"], live["done"]))

    monkeypatch.setattr(tracker.DatasetStream, "add", spy)
    track_run.run(cfg, work, input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"))
    assert seen == [(1, 1, False), (2, 2, False), (3, 3, False)]
    meta = json.loads((work / "dataset" / "meta.json").read_text())
    assert {k: v for k, v in meta["live"].items() if k != "run"} == {"frames": 3, "tracked": 3, "done": True,
                                                                    "error": None} and meta["kind"] == "video"
    streamed = ds.FolderDataset(work / "dataset")
    params = [dio.load_params(work / "params" / f"frame_{i:04d}") for i in range(3)]
    cams = json.loads((work / "cameras.json").read_text())
    result = tracker.TrackResult(params=[{k[4:]: v for k, v in p.items() if k.startswith("raw_")} for p in params],
                                 K=np.stack([np.asarray(cams[f"f{i}"]["K"]) for i in range(3)]),
                                 R=np.stack([np.asarray(cams[f"f{i}"]["R"]) for i in range(3)]),
                                 t=np.stack([np.asarray(cams[f"f{i}"]["t"]) for i in range(3)]),
                                 landmark_error_px=np.zeros(3), photometric_error=np.zeros(3), seconds=0.0)
    tracker.write_dataset(tmp_path / "offline", result, [dataclasses.replace(f, image=dio.load_image(
        tmp_path / "video" / f"f{i}.png")) for i, f in enumerate(frames)], model)
    offline = ds.FolderDataset(tmp_path / "offline")
    assert len(streamed) == len(offline) == 3
    for i in range(3):
        a, b = streamed[i], offline[i]
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)

    assert len(meta["live"]["run"]) == 12

    # A tracker failure after frame 0 is recorded in meta.json for a waiting reader; one before
    # any frame (e.g. progress of other settings) leaves the earlier dataset alone.
    def fails_after(n):
        def fake(cfg, model, frames, *, on_frame=None, **kw):
            for i in range(n):
                on_frame(i, dict(params=params[i]["raw"], K=result.K[i], R=result.R[i], t=result.t[i]))
            raise ValueError("no face in frame 1")
        return fake

    params = [{"raw": p} for p in result.params]
    before = (work / "dataset" / "meta.json").read_text()
    monkeypatch.setattr(tracker, "track_sequence", fails_after(0))
    with pytest.raises(ValueError, match="no face in frame 1"):
        track_run.run(cfg, work, input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"))
    assert (work / "dataset" / "meta.json").read_text() == before and len(ds.FolderDataset(work / "dataset")) == 3
    monkeypatch.setattr(tracker, "track_sequence", fails_after(1))
    with pytest.raises(ValueError, match="no face in frame 1"):
        track_run.run(cfg, work, input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"))
    live = json.loads((work / "dataset" / "meta.json").read_text())["live"]
    assert (live["frames"], live["tracked"], live["done"], live["error"]) == (3, 1, False, "no face in frame 1")
    assert live["run"] != meta["live"]["run"] and len(ds.FolderDataset(work / "dataset", partial=True)) == 1


def test_adam_update_equals_optax_per_group():
    """The tracker's own Adam (every hyper-parameter an array, so one compiled step serves every
    stage) equals optax.adam with a cosine decay per free group and set_to_zero for frozen ones,
    past the end of the schedule too."""
    optax = pytest.importorskip("optax")
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=5), jnp.float32),
              "c": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
    lrs, free, steps, final = {"a": 0.05, "b": 0.01, "c": 0.2}, ("a", "c"), 7, 0.05
    ref = optax.multi_transform(
        {k: (optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=final)) if k in free else optax.set_to_zero())
         for k, lr in lrs.items()}, {k: k for k in lrs})
    hyper = dict(lr={k: jnp.float32(v) for k, v in lrs.items()}, free={k: jnp.float32(k in free) for k in lrs},
                 total=jnp.float32(steps), final=jnp.float32(final))
    loss = lambda p: jnp.sum(jnp.sin(p["a"]) ** 2) + jnp.sum(p["b"] ** 4) + jnp.sum(jnp.cos(3 * p["c"]))
    p_ref, s_ref = params, ref.init(params)
    p_own, s_own = params, tracker.adam_init(params)
    upd = jax.jit(tracker.adam_update)
    for _ in range(steps + 3):
        g = jax.grad(loss)(p_ref)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        p_own, s_own = upd(jax.grad(loss)(p_own), s_own, p_own, hyper)
    for k in params:
        np.testing.assert_allclose(np.asarray(p_own[k]), np.asarray(p_ref[k]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p_own["b"]), np.asarray(params["b"]))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_device_visibility_equals_the_host_reference(model, level):
    """`visibility_traced` (jitted, the z-buffer at pyramid level `level`) marks the same samples
    as the host reference `visibility`, for a turned head with a mask, and flags an overflowing
    z-buffer instead of returning it silently."""
    cfg = tracker.default_config()
    static = tracker.make_static(model, 128, 96)
    p = _true_params(model, cfg, static, seed=5)
    mask = np.ones((96, 128), np.float32)
    mask[:, 80:] = 0
    host = tracker.visibility(p, static, mask, level)
    cap = tracker.zbuffer_capacity(p, static, level)
    fn = jax.jit(lambda q, m: tracker.visibility_traced(q, static, m, cap, level))
    dev, overflow = fn(p, jnp.asarray(mask))
    assert not bool(overflow)
    dev = np.asarray(dev)
    assert host.sum() > 0.2 * len(host)
    # Identical up to samples whose depth sits at the tolerance within float rounding.
    verts, _, _ = tracker.camera_space_vertices(p, model)
    pos, _, _ = tracker._samples(p, model, jnp.asarray(static.sample_faces), jnp.asarray(static.sample_bary), verts)
    diff = np.flatnonzero(dev != host)
    assert len(diff) <= 2, (len(diff), diff)
    small = jax.jit(lambda q, m: tracker.visibility_traced(q, static, m, 64, level))
    assert bool(small(p, jnp.asarray(mask))[1])


def test_device_and_host_visibility_track_alike(model, monkeypatch):
    """Visibility on the device with every stage's steps in few jitted calls (the default) tracks
    two rendered frames as the reference path does (host visibility, every step its own call),
    both with the full-resolution z-buffer: the surfaces agree to float rounding. A z-buffer
    capacity that is too small is detected and the stage redone with a larger one: the result
    is unchanged. (The default z-buffer at each pyramid level's resolution is a modelling
    choice, measured by the synthetic benchmark; see the README.)"""
    cfg = tracker.default_config()
    cfg.pyramid = (1, 0)
    cfg.zbuffer = "full"
    cfg.first.update(rigid_steps=20, landmark_steps=30, steps=(10, 10))
    cfg.frame.update(landmark_steps=5, steps=(5, 5))
    W = 64
    frames, truth = _rendered_frames(model, cfg, W, 2)
    cfg.focal = float(np.exp(truth["log_focal"]) * W)
    ref_cfg = cfg.copy_and_resolve_references()
    ref_cfg.visibility = "host"
    timings, cache = {}, {}
    fast = tracker.track_sequence(cfg, model, frames, shape_init=truth["shape"], log=None, timings=timings,
                                  step_cache=cache)
    ref = tracker.track_sequence(ref_cfg, model, frames, shape_init=truth["shape"], log=None, step_cache=cache)
    assert set(timings) == {"first/rigid", "first/landmarks", "first/level 1", "first/level 0", "first/errors",
                            "frame/landmarks", "frame/level 1", "frame/level 0", "frame/errors"}
    assert all(v > 0 for v in timings.values())
    reg = tracker.make_static(model, W, W).region_vertices
    for a, b in zip(fast.params, ref.params):
        va, _, _ = tracker.camera_space_vertices(jax.tree.map(jnp.asarray, a), model)
        vb, _, _ = tracker.camera_space_vertices(jax.tree.map(jnp.asarray, b), model)
        assert np.median(np.linalg.norm(np.asarray(va)[reg] - np.asarray(vb)[reg], axis=-1)) < 5e-5
    np.testing.assert_allclose(fast.landmark_error_px, ref.landmark_error_px, atol=0.01)
    np.testing.assert_allclose(fast.photometric_error, ref.photometric_error, rtol=0.01)
    # Force an overflowing first z-buffer: the stage is redone, and the result is the same.
    calls = []
    real = tracker.zbuffer_capacity

    def too_small(params, static, level=0, tile=4):
        calls.append(level)
        return 1024 if len(calls) == 1 else real(params, static, level, tile)

    monkeypatch.setattr(tracker, "zbuffer_capacity", too_small)
    redo = tracker.track_sequence(cfg, model, frames[:1], shape_init=truth["shape"], log=None, step_cache=cache)
    assert calls
    for k in ("rot6d", "trans", "expression"):
        np.testing.assert_allclose(redo.params[0][k], fast.params[0][k], rtol=1e-5, atol=1e-6)


def test_bad_visibility_settings_are_refused(model):
    frames, truth = _rendered_frames(model, tracker.default_config(), 48, 1)
    for key, value, word in (("visibility", "gpu", "visibility"), ("zbuffer", "half", "zbuffer"),
                             ("zbuffer_tile", 0, "zbuffer_tile"), ("visibility_every", 0, "visibility_every")):
        cfg = tracker.default_config()
        cfg.first.update(rigid_steps=1, landmark_steps=1, steps=(1, 1, 1))
        setattr(cfg, key, value)
        with pytest.raises(ValueError, match=word):
            tracker.track_sequence(cfg, model, frames, log=None)


def _few_steps(cfg):
    cfg.pyramid = (1, 0)
    cfg.first.update(rigid_steps=10, landmark_steps=10, steps=(5, 5))
    cfg.frame.update(landmark_steps=3, steps=(3, 3))
    return cfg


def test_albedo_model_is_solved_on_the_first_frame_then_fixed(model, tmp_path):
    """With an albedo model (a small one saved to a file, loaded through the importer) the
    texture is mean + basis x coefficients: the coefficients move on frame 0 only, the exported
    texture is the model's texture of them; 'free' keeps the old free texture (no coefficients)."""
    from dhjax.models import albedo as albedo_lib
    frames, truth = _rendered_frames(model, tracker.default_config(), 48, 2)
    rng = np.random.default_rng(0)
    A = 8
    basis = np.linalg.qr(rng.normal(size=(A * A * 3, 4)))[0].T.reshape(4, A, A, 3)
    am = albedo_lib.AlbedoModel(mean=jnp.full((A, A, 3), 0.5, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
                                sigma=jnp.asarray([2.0, 1.0, 0.5, 0.2], jnp.float32), name="test")
    albedo_lib.save(tmp_path / "alb.npz", am)
    cfg = _few_steps(tracker.default_config())
    cfg.update(albedo_model=str(tmp_path / "alb.npz"), albedo_size=A, albedo_components=3)
    cfg.focal = float(np.exp(truth["log_focal"]) * 48)
    res = tracker.track_sequence(cfg, model, frames, shape_init=truth["shape"], log=None)
    c0, c1 = res.params[0]["albedo_coeffs"], res.params[1]["albedo_coeffs"]
    assert c0.shape == (3,) and np.abs(c0).max() > 1e-3
    np.testing.assert_array_equal(c0, c1)
    want = albedo_lib.texture(am, jnp.asarray(c0))
    np.testing.assert_allclose(res.params[1]["albedo"], want, atol=1e-6)
    free = cfg.copy_and_resolve_references()
    free.albedo_model = "free"
    res = tracker.track_sequence(free, model, frames[:1], shape_init=truth["shape"], log=None)
    assert res.params[0]["albedo_coeffs"].shape == (0,) and res.params[0]["albedo"].shape == (A, A, 3)
    assert np.ptp(res.params[0]["albedo"]) > 1e-3           # the free texture moved texel by texel
    # Bad settings: more components than the file has, a model of another size.
    for key, value, word in (("albedo_components", 5, "only 4 components"), ("albedo_components", 0, ">= 1")):
        bad = cfg.copy_and_resolve_references()
        setattr(bad, key, value)
        with pytest.raises(ValueError, match=word):
            tracker.track_sequence(bad, model, frames[:1], log=None)


def test_synthetic_albedo_model_needs_the_default_head(model, monkeypatch):
    """The synthetic PCA lives in the default head's UV layout: another layout is refused with a
    message that names the way out; the default head gets the cached model, truncated."""
    cfg = tracker.default_config()
    cfg.albedo_components = 5
    other = model.replace(uv_coords=model.uv_coords * 0.5)
    with pytest.raises(ValueError, match="FLAME albedo file"):
        tracker.albedo_model(cfg, other, log=None)
    cache = {}
    am = tracker.albedo_model(cfg, model, cache, log=None)
    assert am.basis.shape == (5, cfg.albedo_size, cfg.albedo_size, 3) and am.sigma.shape == (5,)
    assert tracker.albedo_model(cfg, model, cache, log=None) is am
    assert np.all(np.diff(np.asarray(am.sigma)) <= 0)
    # Loaded again from the cache folder, its file is marked used (python -m dhjax.data.cache).
    import os
    import time

    from dhjax.data import synthetic
    path = tracker.synthetic_albedo_path(cfg.albedo_identities, 5, cfg.albedo_size)
    was = path.stat().st_mtime
    past = time.time() - 30 * 86400
    try:
        os.utime(path, (past, past))
        tracker.albedo_model(cfg, model, None, log=None)
        assert time.time() - path.stat().st_mtime < 60
    finally:       # this is the user's cache folder
        if path.stat().st_mtime < past + 1:
            os.utime(path, (was, was))
    # Its name changes with the head generator's version: an older generator's PCA is not reused.
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert tracker.synthetic_albedo_path(cfg.albedo_identities, 5, cfg.albedo_size) != path


def test_insta_variant_tracks_eyelids_and_gaze(model):
    """The INSTA tracker's extras: frames rendered with half-shut eyelids and eyes turned
    sideways, tracked with the true shape and focal length. With cfg.eyelids and cfg.iris the
    eyelids come out near their true closing and the gaze error drops well below the tracker's
    without them (which sees the eyes only through the photometric term)."""
    W = 96
    base = tracker.default_config()
    base.pyramid = (1, 0)
    base.first.update(rigid_steps=100, landmark_steps=150, steps=(30, 30))
    base.frame.update(landmark_steps=10, steps=(5, 5))
    static = tracker.make_static(model, W, W)
    truth = _true_params(model, base, static, seed=5)
    truth.update(eyelids=jnp.array([0.6, 0.6]), eyes=jnp.array([[0.0, 0.25, 0.0], [0.0, 0.25, 0.0]]),
                 sh=jnp.asarray(np.r_[[[2.6] * 3, [0.2] * 3, [-0.5] * 3], np.zeros((6, 3))], jnp.float32),
                 albedo=jnp.full((base.albedo_size, base.albedo_size, 3), jnp.array([0.7, 0.5, 0.4])))
    r = tracker.render_frame(jax.tree.map(np.asarray, truth), model, W, W)
    assert r["iris"].shape == (10, 2)
    frame = tracker.frame_data(np.where(r["mask"][..., None] > 0, r["image"], 0.2), r["landmarks"],
                               np.arange(68), iris=r["iris"])
    base.focal = float(np.exp(truth["log_focal"]) * W)

    def gaze_error(p):
        out_e = flame.forward(model, p["shape"][None], p["expression"][None], tracker._flame_pose(p),
                              eyelids=p["eyelids"][None])
        out_t = flame.forward(model, truth["shape"][None], truth["expression"][None], tracker._flame_pose(truth),
                              eyelids=truth["eyelids"][None])
        R = lambda q: np.asarray(rotations.rotation_6d_to_matrix(jnp.asarray(q["rot6d"])))
        a, b = tracker._gaze_directions(out_e, R(p)), tracker._gaze_directions(out_t, R(truth))
        return float(np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1, 1))).mean())

    results = {}
    for name, on in (("plain", False), ("insta", True)):
        cfg = tracker.default_config()
        cfg.update(dict(base))
        cfg.eyelids = cfg.iris = on
        cfg.weights.eye_symmetry = 0.1 if on else 0.0
        res = tracker.track_sequence(cfg, model, [frame], shape_init=truth["shape"], log=None)
        results[name] = jax.tree.map(jnp.asarray, res.params[0])
    plain, insta = results["plain"], results["insta"]
    np.testing.assert_array_equal(np.asarray(plain["eyelids"]), 0.0)      # off: never moved
    np.testing.assert_allclose(np.asarray(insta["eyelids"]), 0.6, atol=0.2)
    gp, gi = gaze_error(plain), gaze_error(insta)
    assert gi < 0.5 * gp and gi < 5.0, (gi, gp)
    # The tracked eyelids travel with the tracked frame into the dataset layout.
    ins, pl = jax.tree.map(np.asarray, insta), jax.tree.map(np.asarray, plain)
    assert tracker.flame_parameters(ins)["eyelids"].shape == (2,)
    assert "eyelids" not in tracker.flame_parameters(pl)
    # A sequence where any frame has eyelids gives every frame the key (zeros where untracked).
    assert tracker.tracked_eyelids([pl, ins]) and not tracker.tracked_eyelids([pl])
    np.testing.assert_array_equal(tracker.flame_parameters(pl, eyelids=True)["eyelids"], 0.0)


def test_iris_inputs_are_checked_and_read_from_478_point_meshes(model, tmp_path):
    from dhjax.capture import landmarks as lmk_lib
    img = np.zeros((32, 32, 3), np.float32)
    lm = np.random.default_rng(0).uniform(5, 25, (68, 2))
    with pytest.raises(ValueError, match=r"iris must be \[10, 2\]"):
        tracker.frame_data(img, lm, np.arange(68), iris=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="iris points have non-finite"):
        tracker.frame_data(img, lm, np.arange(68), iris=np.full((10, 2), np.nan))
    mesh = np.random.default_rng(1).uniform(10, 200, (478, 2))
    L = lmk_lib.from_mediapipe(mesh)
    np.testing.assert_allclose(L.iris, mesh[468:], rtol=1e-6)
    assert lmk_lib.from_mediapipe(mesh[:468]).iris is None
    np.save(tmp_path / "m.npy", mesh)
    np.testing.assert_allclose(lmk_lib.load(tmp_path / "m.npy").iris, mesh[468:], rtol=1e-6)
    with pytest.raises(ValueError, match="Landmarks.iris"):
        lmk_lib.Landmarks(L.points, L.ibug_ids, "file", iris=np.zeros((4, 2)))
    # A tracked frame's eyelids go through the dataset layout and back.
    from dhjax.data.dataset import FolderDataset
    W = 48
    static = tracker.make_static(model, W, W)
    p = jax.tree.map(np.asarray, _true_params(model, tracker.default_config(), static))
    p["eyelids"] = np.array([0.3, 0.4], np.float32)
    frame = tracker.frame_data(np.full((W, W, 3), 0.3), lm, np.arange(68))
    K = np.asarray(tracker.intrinsics_matrix(p, W, W))
    R = np.asarray(rotations.rotation_6d_to_matrix(jnp.asarray(p["rot6d"])))
    res = tracker.TrackResult(params=[p], K=K[None], R=R[None], t=np.asarray(p["trans"])[None],
                              landmark_error_px=np.zeros(1), photometric_error=np.zeros(1), seconds=0.0)
    tracker.write_dataset(tmp_path / "ds", res, [frame], model)
    np.testing.assert_allclose(FolderDataset(tmp_path / "ds", "train")[0]["eyelids"], [0.3, 0.4])


def test_dataset_stream_records_a_stop_as_a_stop_not_as_a_failure():
    """A SIGTERM (SystemExit 143 from app.exit_on_user_error) or Ctrl-C while tracking is written to
    meta.json as a stop that a rerun resumes, not as the error '143'; real errors keep their text."""
    class Writer:
        meta: dict = {}

        def close(self):
            pass

    stream = tracker.DatasetStream.__new__(tracker.DatasetStream)
    stream.writer, stream.run, stream.frames, stream.renders = Writer(), "r", [None] * 3, [None]
    stream.fail(SystemExit(143))
    assert stream.writer.meta["live"]["error"] == "the tracker was stopped (SystemExit); rerunning it resumes"
    stream.fail(KeyboardInterrupt())
    assert stream.writer.meta["live"]["error"].startswith("the tracker was stopped (KeyboardInterrupt)")
    stream.fail(ValueError("frame 2: no face"))
    assert stream.writer.meta["live"] == {"run": "r", "frames": 3, "tracked": 1, "done": False,
                                          "error": "frame 2: no face"}


def test_a_mica_run_is_read_once_and_initialises_every_sequence(model, tmp_path, monkeypatch):
    """--config.mica_workdir: the run is read once, before any work (not again per sequence), and
    MICA's prediction for the first frame is the shape the tracker starts from, for real input and
    for every synthetic sequence. The tracker and MICA's network are stand-ins here (both are
    tested on their own); this is about the plumbing between them."""
    from configs import track as track_cfg
    from dhjax import io as dio
    from dhjax.capture import mica

    loads, predicted = [], []
    sentinel = {"mica": "variables"}

    def fake_load_run(workdir):
        loads.append(str(workdir))
        return None, sentinel, {"n_vertices": model.num_vertices, "head_model": model.name}, 7

    def fake_predict(variables, image, lm):
        assert variables is sentinel
        z = np.full(300, 0.01 * (len(predicted) + 1), np.float32)
        predicted.append(z)
        return z, None

    W, H = 48, 40
    p = _true_params_np(model, track_cfg.get_config().tracker, W, H)
    started = []
    monkeypatch.setattr(tracker, "track_sequence", _stand_in_tracker(p, W, H, started))
    monkeypatch.setattr(mica.run, "load_run", fake_load_run)
    monkeypatch.setattr(mica, "predict_image", fake_predict)

    # real input: three frames with landmark files
    cfg = track_cfg.get_config()
    cfg.mica_workdir = str(tmp_path / "mica")
    rng = np.random.default_rng(0)
    for d in ("video", "lmk"):
        (tmp_path / d).mkdir()
    for i in range(3):
        dio.save_image(tmp_path / "video" / f"f{i}.png", rng.uniform(size=(H, W, 3)))
        np.save(tmp_path / "lmk" / f"f{i}.npy", np.full((68, 2), 20.0) + rng.uniform(-5, 5, (68, 2)))
    report = track_run.run(cfg, tmp_path / "out", input=str(tmp_path / "video"), landmarks=str(tmp_path / "lmk"))
    assert loads == [cfg.mica_workdir] and len(predicted) == 1
    np.testing.assert_array_equal(started[-1]["shape_init"], predicted[0])
    assert report["shape_init"] == f"MICA ({cfg.mica_workdir})"

    # synthetic input: two sequences, each starting from MICA's shape for its first frame, and
    # the run read once
    loads.clear(), predicted.clear(), started.clear()
    cfg = track_cfg.get_config("tiny")
    cfg.mica_workdir = str(tmp_path / "mica")
    cfg.synthetic.update(sequences=(0, 1), n_frames=2, width=W, height=H, uv_size=32, compare=("mean", "mica"))
    track_run.run(cfg, tmp_path / "syn", input="synthetic")
    assert loads == [cfg.mica_workdir] and len(predicted) == 2
    mica_starts = [c["shape_init"] for c in started if c["shape_init"] is not None]
    assert len(mica_starts) == 2 and sum(c["shape_init"] is None for c in started) == 2      # mica, mean
    for z, s in zip(predicted, mica_starts):
        np.testing.assert_array_equal(s, z)
