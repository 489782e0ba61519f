"""FLAME registration to scans: accuracy on synthetic scans with known ground truth, metric
rigid initialisation, clear errors for bad scans."""

import jax
import numpy as np
import pytest

from dhjax import io as dio
from dhjax.capture import registration
from dhjax.models import flame


@pytest.fixture(scope="module")
def fitted():
    model = flame.load()
    scans, gt = registration.synthesize_scans(jax.random.PRNGKey(7), model, 2, noise_mm=0.3,
                                              points_per_scan=3000)
    batch = registration.pad_scans(scans, 3000)
    cfg = registration.default_config()
    method = registration.make_method(model, cfg)
    state0 = method.init(jax.random.PRNGKey(0), batch)
    step = jax.jit(method.train_step)
    state = state0
    for i in range(cfg.steps):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
    return model, scans, gt, batch, state0, state, metrics


def test_recovers_ground_truth_surface_below_1mm(fitted):
    model, scans, gt, batch, _, state, metrics = fitted
    assert np.isfinite(float(metrics["loss"]))
    report = registration.residual_report(state, batch, model)
    assert np.all(report["median_mm"] < 1.0), report["median_mm"]
    # Ground-truth surface (face region) to the registered surface: the acceptance number.
    verts = np.asarray(registration.registered_vertices(state, model))
    face = np.asarray(model.regions["face"])
    for s in range(len(scans)):
        d, _, _ = registration.point_to_surface_distances(
            np.asarray(gt["vertices"][s])[face], verts[s], np.asarray(model.faces))
        assert np.median(np.asarray(d)) * 1000.0 < 1.0


def test_rigid_init_is_metric(fitted):
    """The initial transform is a rotation + translation: lengths on the model are unchanged."""
    model, _, _, _, state0, _, _ = fitted
    v0 = np.asarray(registration.registered_vertices(state0, model))
    neutral = np.asarray(flame.forward(model).vertices[0])
    e = np.asarray(model.faces)[:, :2]
    for s in range(v0.shape[0]):
        np.testing.assert_allclose(np.linalg.norm(v0[s, e[:, 0]] - v0[s, e[:, 1]], axis=1),
                                   np.linalg.norm(neutral[e[:, 0]] - neutral[e[:, 1]], axis=1),
                                   atol=2e-6)


def test_bad_scans_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.obj"):
        registration.load_scan(tmp_path / "missing.obj")
    m = flame.load()
    v = np.asarray(m.v_template).copy()
    v[3] = np.nan
    dio.save_obj(tmp_path / "nan.obj", v, np.asarray(m.faces))
    with pytest.raises(ValueError, match="nan.obj"):
        registration.load_scan(tmp_path / "nan.obj")
    (tmp_path / "cloud.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
        "property float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n")
    with pytest.raises(ValueError, match="cloud.ply"):
        registration.load_scan(tmp_path / "cloud.ply")
    dio.save_obj(tmp_path / "ok.obj", np.asarray(m.v_template), np.asarray(m.faces))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        registration.load_scan(tmp_path / "ok.obj", landmarks_path=tmp_path / "empty.txt")
