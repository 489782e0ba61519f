"""The input pipeline bench suite (`dhjax.bench.data`, configs/bench.py:data) on a tiny folder
dataset: it runs end to end through `dhjax.bench.suite`, returns the keys it documents with
finite positive numbers, and every point read the same batches. Not a timing check (no timed
assertions)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from bench_common import bench_config, run_suite

from dhjax.bench import suite
from dhjax.data import dataset as ds


def _write_folder(root: Path) -> None:
    """2 items x 1 frame x 4 views of 12 x 10 images with the maps SynShot reads."""
    rng = np.random.default_rng(0)
    w = ds.Writer(root, "train", kind="multiview")
    for item in range(2):
        for view in range(4):
            w.add(dict(image=rng.uniform(size=(10, 12, 3)).astype(np.float32),
                       mask=(rng.uniform(size=(10, 12)) > 0.5).astype(np.float32),
                       K=np.array([[20, 0, 6], [0, 20, 5], [0, 0, 1]], np.float32), R=np.eye(3, dtype=np.float32),
                       t=np.array([0, 0, 1], np.float32), shape=rng.normal(size=4).astype(np.float32),
                       expression=rng.normal(size=3).astype(np.float32), pose=np.zeros((5, 3), np.float32),
                       translation=np.zeros(3, np.float32), uv_albedo=rng.uniform(size=(4, 4, 3)).astype(np.float32),
                       uv_position=rng.normal(size=(4, 4, 3)).astype(np.float32),
                       uv_expression_offset=rng.normal(size=(4, 4, 3)).astype(np.float32),
                       item=item, frame=0, view=view))
    w.close()


def _config(tmp_path):
    _write_folder(tmp_path / "data")
    cfg = bench_config("data")
    cfg.data.update(root=str(tmp_path / "data"), batch_size=2, steps=3, warmup=1, rounds=1, step_s=(0.0, 0.01))
    return cfg


def test_data_bench_smoke(tmp_path):
    cfg = _config(tmp_path)
    res, lines = run_suite(cfg, tmp_path)
    assert res["suite"] == "data" and res["data_images"] == 8 and res["data_image_size"] == "12x10"
    names = [p[0] for p in cfg.data.points]
    assert names == ["index", "grain_w0", "grain_w0_t2", "grain_w2"]
    for name in names:
        for k in ("images_per_s", "step10ms_images_per_s", "first_batch_s"):
            v = res[f"data_{name}_{k}"]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (name, k, v)
        if name != "index":
            for k in ("speedup_vs_index", "step10ms_speedup_vs_index"):
                assert math.isfinite(res[f"data_{name}_{k}"])
    assert res["data_index_step10ms_images_per_s"] < 2 / 0.01     # the step's 10 ms bound a serial reader
    assert res["data_batches_identical"] is True
    assert sum(line.startswith("  vs index:") for line in lines) == 2


def test_data_bench_rejects_bad_settings(tmp_path):
    cfg = _config(tmp_path)
    cfg.data.points = (("a", "index", 0, 1), ("a", "grain", 0, 1))
    with pytest.raises(ValueError, match="repeated names"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
    cfg.data.points = (("a", "torch", 0, 1),)
    with pytest.raises(ValueError, match="unknown loader 'torch'"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
    cfg.data.step_s = (0.0, -1.0)
    with pytest.raises(ValueError, match="data.step_s must be distinct step times >= 0"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
    cfg.data.rounds = 0
    with pytest.raises(ValueError, match="must be >= 1"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
