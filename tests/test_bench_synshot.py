"""The SynShot prior bench (configs/bench.py:synshot): a smoke run on a tiny folder dataset with a
tiny network, its keys and their consistency (no timings are asserted), and bad settings."""

import math
from pathlib import Path

import numpy as np
import pytest
from bench_common import bench_config, run_suite

from dhjax.bench import suite
from dhjax.data import dataset as ds

ROOT = Path(__file__).resolve().parents[1]
S = 16          # UV map size of the folder and the network


def _write_folder(root: Path) -> None:
    """1 item x 3 views of 32 x 24 images with SynShot's keys (random maps)."""
    rng = np.random.default_rng(0)
    w = ds.Writer(root, "train", kind="multiview")
    for view in range(3):
        w.add(dict(image=rng.uniform(size=(24, 32, 3)).astype(np.float32),
                   mask=(rng.uniform(size=(24, 32)) > 0.3).astype(np.float32),
                   K=np.array([[60, 0, 16], [0, 60, 12], [0, 0, 1]], np.float32), R=np.eye(3, dtype=np.float32),
                   t=np.array([0, 0, 1], np.float32), shape=(0.5 * rng.normal(size=10)).astype(np.float32),
                   expression=(0.5 * rng.normal(size=10)).astype(np.float32), pose=np.zeros((5, 3), np.float32),
                   translation=np.zeros(3, np.float32), uv_albedo=rng.uniform(size=(S, S, 3)).astype(np.float32),
                   uv_position=(0.05 * rng.normal(size=(S, S, 3))).astype(np.float32),
                   uv_expression_offset=(0.005 * rng.normal(size=(S, S, 3))).astype(np.float32),
                   item=0, frame=0, view=view))
    w.close()


def _config(tmp_path):
    _write_folder(tmp_path / "data")
    cfg = bench_config("synshot")
    cfg.synshot.update(root=str(tmp_path / "data"), repeats=1, warmup=0, overrides=(
        ("batch_size", 2), ("train.steps", 30), ("model.map_size", S), ("model.channels", (8, 16)),
        ("model.latent_dim", 4), ("model.num_codes", 16), ("model.feat_dim", 8), ("model.part_density", (16, 12)),
        ("model.regressor_width", 8)))
    return cfg


def test_synshot_bench_smoke(tmp_path):
    cfg = _config(tmp_path)
    res, lines = run_suite(cfg, tmp_path)
    assert res["suite"] == "synshot" and res["synshot_image"] == "32x24" and res["synshot_batch"] == 2
    assert res["synshot_map_size"] == S and res["synshot_gaussians"] > 0 and res["synshot_train_steps"] == 30
    for k in ("first_step_s", "step_s", "steps_per_s", "train_minutes_estimate", "network_s", "convolutions_s",
              "render_s", "ssim_blur_s", "ssim_blur_depthwise_s", "ssim_blur_speedup"):
        v = res[f"synshot_{k}"]
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (k, v)
    np.testing.assert_allclose(res["synshot_steps_per_s"], 1 / res["synshot_step_s"])
    np.testing.assert_allclose(res["synshot_ssim_blur_speedup"],
                               res["synshot_ssim_blur_depthwise_s"] / res["synshot_ssim_blur_s"])
    np.testing.assert_allclose(res["synshot_train_minutes_estimate"],
                               (res["synshot_first_step_s"] + 30 * res["synshot_step_s"]) / 60)
    assert any("train_step: first call" in line for line in lines)
    assert any("of a step" in line for line in lines)


def test_synshot_bench_bad_settings(tmp_path):
    cfg = bench_config("synshot")
    cfg.synshot.repeats = 0
    with pytest.raises(ValueError, match="synshot.repeats must be >= 1"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
    cfg.synshot.repeats = 1
    cfg.synshot.root = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
