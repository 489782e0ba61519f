"""Smoke tests of the experiment entry points (thin: they call the library)."""

import json
import os
import subprocess
import sys

import numpy as np

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
