"""Smoke tests of the experiment entry points (thin: they call the library)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dhjax import io as dio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sample_heads_writes_grid_meshes_and_params(tmp_path):
    out = run("experiments.sample_heads", "--config=configs/sample_heads.py:tiny",
              "--config.num_heads=2", "--config.image_size=48", f"--workdir={tmp_path}")
    assert "rendered 2 heads x 3 views" in out
    grid = dio.load_image(tmp_path / "grid.png")
    assert grid.shape[0] > 2 * 48 and grid.shape[1] > 3 * 48
    assert grid.std() > 0.05  # not a blank image
    verts, faces = dio.load_mesh(tmp_path / "meshes" / "head_001.obj")
    assert verts.shape == (5270, 3) and faces.shape == (10416, 3)
    params = dio.load_params(tmp_path / "params" / "head_001", required=("shape", "expression", "pose"))
    assert params["pose"].shape == (5, 3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_heads"] == 2
    # The saved mesh is the forward pass of the saved parameters.
    from dhjax.models import flame
    m = flame.load()
    v = flame.forward(m, params["shape"][None], params["expression"][None], params["pose"][None]).vertices
    np.testing.assert_allclose(verts, np.asarray(v[0]), atol=1e-5)


def test_unknown_variant_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "experiments.sample_heads",
                           "--config=configs/sample_heads.py:huge", f"--workdir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown variant 'huge'" in proc.stderr


def test_bench_flame_writes_json(tmp_path):
    """A tiny bench run (not a timing check): the keys the issue asks for are there."""
    out = run("experiments.bench", "--config=configs/bench.py:flame", "--config.repeats=1",
              "--config.warmup=1", "--config.raster_size=64", f"--workdir={tmp_path}")
    assert "FLAME forward B= 64" in out
    res = json.loads((tmp_path / "bench.json").read_text())
    for key in ("flame_b1_dhjax_s", "flame_b64_dhjax_s", "raster_64_s", "raster_64_faces"):
        assert res[key] > 0, key
    try:
        import smplx  # noqa: F401
    except ImportError:
        return
    assert res["flame_b64_speedup_vs_smplx"] > 0


def _write_bad_and_good_scans(folder):
    """One good scan (a registered-able head mesh), one with NaNs, one without faces."""
    import jax

    from dhjax.capture import registration
    from dhjax.models import flame

    m = flame.load()
    _, gt = registration.synthesize_scans(jax.random.PRNGKey(3), m, 1, noise_mm=0.2,
                                          points_per_scan=500)
    os.makedirs(folder, exist_ok=True)
    good = np.asarray(gt["vertices"][0])
    dio.save_obj(os.path.join(folder, "good.obj"), good, np.asarray(m.faces))
    os.makedirs(os.path.join(folder, "lmk"), exist_ok=True)
    np.savetxt(os.path.join(folder, "lmk", "good.txt"), np.asarray(gt["landmarks"][0]))
    bad = good.copy()
    bad[10] = np.nan
    dio.save_obj(os.path.join(folder, "nan.obj"), bad, np.asarray(m.faces))
    with open(os.path.join(folder, "nofaces.ply"), "w") as f:
        f.write("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                "property float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n")
    return gt


def test_register_flame_skips_bad_scans_and_writes_outputs(tmp_path):
    scans = tmp_path / "scans"
    _write_bad_and_good_scans(scans)
    out = run("experiments.register_flame", "--config=configs/register_flame.py:tiny",
              f"--config.data.scans_dir={scans}", f"--config.data.landmarks_dir={scans / 'lmk'}",
              "--config.registration.steps=80",
              "--config.registration.n_points=1000", f"--workdir={tmp_path / 'run'}")
    assert "skipping scan" in out and "nan.obj" in out and "nofaces.ply" in out
    assert "1 scans" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["scan"] for r in report] == ["good"]
    assert report[0]["median_mm"] < 2.0  # a short run (80 steps), but a real fit
    verts, faces = dio.load_mesh(tmp_path / "run" / "meshes" / "good.obj")
    assert verts.shape == (5270, 3)
    assert dio.load_params(tmp_path / "run" / "params" / "good", required=("shape", "translation"))


def test_sweep_dry_run_prints_every_variant(tmp_path):
    dry = run("experiments.sweep", "--config=configs/register_flame.py:tiny", f"--workdir={tmp_path}",
              "--dry_run", "--set=registration.steps=20")
    cmds = [line for line in dry.splitlines() if "experiments.register_flame" in line]
    assert len(cmds) == 4 and all("--config.registration.steps=20" in c for c in cmds)
    assert any("use_offsets=True" in c for c in cmds)


@pytest.mark.slow
def test_sweep_runs_every_variant_and_tabulates(tmp_path):
    """Four short registration runs (minutes on 2 cores: each variant compiles its own step)."""
    out = run("experiments.sweep", "--config=configs/register_flame.py:tiny", f"--workdir={tmp_path}",
              "--set=registration.steps=20", "--set=data.synthetic.n_scans=2",
              "--set=registration.n_points=800")
    table = (tmp_path / "results.md").read_text()
    assert table.count("| ok |") == 4, out[-3000:]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 4 and all(float(r["scan_median_mm"]) > 0 for r in rows)
