"""FLAME registration to scans: accuracy on synthetic scans with known ground truth, metric
rigid initialisation, the offsets path, scans in millimetres, clear errors for bad scans, and a
whole run in-process."""

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from dhjax import io as dio
from dhjax.capture import registration, registration_run, registration_scans
from dhjax.models import flame
from dhjax.train import config as config_lib
from dhjax.train import loop

ROOT = Path(__file__).resolve().parents[1]


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


def test_bad_scan_files_give_clear_errors(tmp_path):
    """Empty and wrong-format files fail with a ValueError naming the file."""
    (tmp_path / "empty.obj").write_text("")
    with pytest.raises(ValueError, match="empty.obj"):
        registration.load_scan(tmp_path / "empty.obj")
    (tmp_path / "garbage.ply").write_bytes(b"not a ply file at all\n\x00\x01\x02")
    with pytest.raises(ValueError, match="garbage.ply"):
        registration.load_scan(tmp_path / "garbage.ply")
    with pytest.raises(ValueError, match="unit_scale"):
        registration.load_scan(tmp_path / "garbage.ply", unit_scale=0.0)


def _data_cfg(scans_dir, landmarks_dir="", unit_scale=1.0):
    return ml_collections.ConfigDict(dict(scans_dir=str(scans_dir), landmarks_dir=str(landmarks_dir),
                                          unit_scale=unit_scale, synthetic=dict(n_scans=1, noise_mm=0.3,
                                                                                points_per_scan=100)))


def test_load_scans_skips_unreadable_scans_with_a_message(tmp_path, capsys):
    m = flame.load()
    folder = tmp_path / "scans"
    folder.mkdir()
    dio.save_obj(folder / "b_good.obj", np.asarray(m.v_template), np.asarray(m.faces))
    (folder / "a_empty.obj").write_text("")
    (folder / "c_garbage.ply").write_text("ply\nformat ascii 1.0\nelement vertex banana\n")
    (folder / "notes.txt").write_text("not a scan")            # not a mesh suffix: ignored
    names, scans, gt = registration_scans.load_scans(_data_cfg(folder), m)
    out = capsys.readouterr().out
    assert names == ["b_good"] and len(scans) == 1 and gt is None
    assert "skipping scan" in out and "a_empty.obj" in out and "c_garbage.ply" in out
    assert "notes.txt" not in out
    (folder / "b_good.obj").unlink()
    with pytest.raises(ValueError, match="none of the 2 scans"):
        registration_scans.load_scans(_data_cfg(folder), m)
    with pytest.raises(FileNotFoundError, match="no .obj/.ply scans"):
        registration_scans.load_scans(_data_cfg(tmp_path / "nothing"), m)


@pytest.mark.parametrize("field, value, match", [
    ("noise_mm", -1.0, "data.synthetic.noise_mm must be a standard deviation >= 0 \\(mm\\), got -1.0"),
    ("noise_mm", "0.3", "data.synthetic.noise_mm must be a standard deviation"),
    ("n_scans", 0, "data.synthetic.n_scans must be an integer >= 1, got 0"),
    ("points_per_scan", 2.5, "data.synthetic.points_per_scan must be an integer >= 1, got 2.5")])
def test_load_scans_refuses_synthetic_settings_out_of_range(field, value, match):
    cfg = _data_cfg("")
    cfg.synthetic = ml_collections.ConfigDict({**cfg.synthetic.to_dict(), field: value})
    with pytest.raises(ValueError, match=match):
        registration_scans.load_scans(cfg, flame.load())


def test_register_flame_refuses_bad_synthetic_settings_before_writing_anything(tmp_path):
    import importlib

    from dhjax.capture import registration_run

    cfg = importlib.import_module("configs.register_flame").get_config("tiny")
    cfg.data.synthetic.noise_mm = -1.0
    with pytest.raises(ValueError, match="data.synthetic.noise_mm must be a standard deviation >= 0"):
        registration_run.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def metric_and_mm(tmp_path_factory):
    """One synthetic head written twice: in metres and in millimetres (mesh and landmarks), each
    read back with its unit_scale, and a short registration of both with offsets (one batch)."""
    folder = tmp_path_factory.mktemp("units")
    model = flame.load()
    _, gt = registration.synthesize_scans(jax.random.PRNGKey(5), model, 1, noise_mm=0.0,
                                          points_per_scan=10)
    verts, lmk = np.asarray(gt["vertices"][0], np.float64), np.asarray(gt["landmarks"][0], np.float64)
    dio.save_obj(folder / "metres.obj", verts, np.asarray(model.faces))
    np.savetxt(folder / "metres.txt", lmk)
    dio.save_obj(folder / "mm.obj", verts * 1000.0, np.asarray(model.faces))
    np.savetxt(folder / "mm.txt", lmk * 1000.0)
    metric = registration.load_scan(folder / "metres.obj", landmarks_path=folder / "metres.txt")
    mm = registration.load_scan(folder / "mm.obj", unit_scale=0.001, landmarks_path=folder / "mm.txt")
    raw = registration.load_scan(folder / "mm.obj", landmarks_path=folder / "mm.txt")
    cfg = registration.default_config()
    cfg.update(dict(steps=12, rigid_steps=3, landmark_steps=3, offsets_start=6, warmup_steps=2,
                    use_offsets=True, n_points=800))
    # Padded one by one: pad_scans draws each scan's subset by its index in the list, and both
    # scans must keep the same points.
    one, two = (registration.pad_scans([scan], cfg.n_points) for scan in (metric, mm))
    batch = {k: np.concatenate([one[k], two[k]]) for k in one}
    method = registration.make_method(model, cfg)
    step = jax.jit(method.train_step)
    state = method.init(jax.random.PRNGKey(0), batch)
    history = []
    for i in range(cfg.steps):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        history.append((jax.device_get(state["params"]["offsets"]), jax.device_get(metrics)))
    return model, metric, mm, raw, batch, state, history, cfg


def test_unit_scale_reads_millimetres_as_metres(metric_and_mm):
    _, metric, mm, raw, _, _, _, _ = metric_and_mm
    np.testing.assert_allclose(mm["points"], metric["points"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(mm["normals"], metric["normals"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mm["landmarks"], metric["landmarks"], rtol=0, atol=1e-7)
    # Without the scale the same file is 1000 times larger (so the scale is what did it).
    np.testing.assert_allclose(raw["points"], metric["points"] * 1000.0, rtol=1e-5)


def test_millimetre_scan_registers_like_the_metric_one(metric_and_mm):
    model, _, _, _, batch, state, _, _ = metric_and_mm
    report = registration.residual_report(state, batch, model)
    assert np.all(report["median_mm"] < 2.0), report["median_mm"]     # 12 steps: a real fit
    np.testing.assert_allclose(report["median_mm"][1], report["median_mm"][0], atol=0.01)
    p = registration.export_parameters(state)
    np.testing.assert_allclose(p["translation"][1], p["translation"][0], atol=1e-5)
    np.testing.assert_allclose(p["rotation"][1], p["rotation"][0], atol=1e-4)
    # The surfaces agree far below the residual (single coefficients may not: the float32
    # rounding of the unit change moves weakly determined shape directions by ~0.02 within 12
    # steps; measured: median 0.005 mm, largest 0.21 mm at vertices the scan barely constrains).
    verts = np.asarray(registration.registered_vertices(state, model))
    d_mm = np.linalg.norm(verts[1] - verts[0], axis=-1) * 1000.0
    assert np.median(d_mm) < 0.01 and d_mm.max() < 0.5, (np.median(d_mm), d_mm.max())


def test_offsets_path(metric_and_mm):
    """Offsets stay zero until offsets_start, then move, are regularised, and are part of the
    registered surface and the exported parameters."""
    model, _, _, _, batch, state, history, cfg = metric_and_mm
    for i, (offsets, metrics) in enumerate(history):
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
        assert {"reg_offsets_laplacian", "reg_offsets_l2"} <= set(metrics)
        if i < cfg.offsets_start:                    # step i updates at count i
            assert not np.any(offsets), i
    offsets = np.asarray(state["params"]["offsets"])
    assert 0 < np.abs(offsets).max() < 1e-3           # moved, by less than a millimetre
    assert history[-1][1]["reg_offsets_l2"] > 0
    params = registration.export_parameters(state)
    assert params["offsets"].shape == (2, model.num_vertices, 3)
    without = dict(state["params"], offsets=np.zeros_like(offsets))
    R = params["rotation"]
    moved = (np.asarray(registration.registered_vertices(state, model))
             - np.asarray(registration.registered_vertices(without, model)))
    np.testing.assert_allclose(moved, np.einsum("sij,svj->svi", R, offsets), atol=5e-7)


def test_make_method_returns_a_harness_method_and_rejects_unknown_fields():
    model = flame.load()
    method = registration.make_method(model, registration.default_config())
    assert isinstance(method, loop.Method)
    with pytest.raises(ValueError, match="lr_pose"):
        registration.make_static(model, {"lr_pose": 0.005})
    with pytest.raises(ValueError, match="weights.*bogus"):
        registration.make_static(model, {"weights": {"bogus": 1.0}})


def test_run_in_process_writes_outputs(tmp_path, capsys):
    """The whole run on two tiny synthetic scans (ground truth known), in this process."""
    cfg = config_lib.load_config(str(ROOT / "configs" / "register_flame.py") + ":tiny")
    cfg.registration.steps = 6
    cfg.registration.rigid_steps = 2
    cfg.registration.n_points = 400
    cfg.data.synthetic.n_scans = 2
    cfg.data.synthetic.points_per_scan = 400
    cfg.registration.render_size = 32
    work = tmp_path / "run"
    result = registration_run.run(cfg, str(work))
    out = capsys.readouterr().out
    assert "2 scans" in out and "parameters:" in out and "translation" in out
    assert result.train.steps_run == 6
    rows = json.loads((work / "report.json").read_text())
    assert [r["scan"] for r in rows] == ["synthetic_000", "synthetic_001"] == [r["scan"] for r in result.rows]
    assert all(np.isfinite(r[k]) for r in rows for k in ("median_mm", "gt_surface_median_mm", "gt_vertex_median_mm"))
    final = json.loads((work / "final_metrics.json").read_text())
    assert final["scan_median_mm"] == result.summary["scan_median_mm"] == float(np.median([r["median_mm"] for r in rows]))
    assert "gt_vertex_median_mm" in final and "eval/residual_median_mm" in final and "loss" in final
    md = (work / "report.md").read_text().splitlines()
    assert md[0].startswith("| scan | median_mm") and len(md) == 4
    verts, _ = dio.load_mesh(work / "meshes" / "synthetic_001.obj")
    assert verts.shape == (flame.load().num_vertices, 3)
    assert dio.load_params(work / "params" / "synthetic_000", required=("shape", "rotation", "translation"))
