"""The tracker bench (configs/bench.py:track): a smoke run on a tiny synthetic video with few
steps, its keys and their consistency (no timings are asserted), and bad settings."""

import math

import numpy as np
import pytest
from bench_common import bench_config, run_suite

from dhjax.bench import suite


@pytest.mark.slow
@pytest.mark.parametrize("reference", [True, False])
def test_track_bench_smoke(tmp_path, reference):
    """Slow (about a minute each on 2 cores: the synthetic video and the tracker's compilations);
    both paths are tested in the default suite by test_capture_tracker."""
    cfg = bench_config("track")
    cfg.track.update(size=48, n_frames=2, uv_size=32, reference=reference, overrides=(
        ("pyramid", (1, 0)), ("first.rigid_steps", 5), ("first.landmark_steps", 5), ("first.steps", (3, 3)),
        ("frame.landmark_steps", 2), ("frame.steps", (2, 3))))
    res, lines = run_suite(cfg, tmp_path)
    assert res["suite"] == "track" and res["track_image"] == "48x48" and res["track_frames"] == 2
    assert res["track_first_steps"] == 16 and res["track_frame_steps"] == 7
    labels = ("track", "track_reference") if reference else ("track",)
    assert reference == ("track_reference_frame_s" in res) == ("track_speedup_vs_reference" in res)
    for label in labels:
        for k in ("cold_s", "warm_s", "first_frame_s", "frame_s", "frames_per_s", "first_rigid_s",
                  "first_landmarks_s", "first_level1_s", "first_level0_s", "first_errors_s", "frame_landmarks_s",
                  "frame_level1_s", "frame_level0_s", "frame_errors_s", "vertex_median_mm",
                  "vertex_aligned_median_mm", "landmark_error_px"):
            v = res[f"{label}_{k}"]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (label, k, v)
        np.testing.assert_allclose(res[f"{label}_frames_per_s"], 1 / res[f"{label}_frame_s"])
        parts = sum(res[f"{label}_frame_{s}_s"] for s in ("landmarks", "level1", "level0", "errors"))
        np.testing.assert_allclose(res[f"{label}_frame_s"], parts, rtol=1e-6)
    if reference:
        np.testing.assert_allclose(res["track_speedup_vs_reference"],
                                   res["track_reference_frame_s"] / res["track_frame_s"])
    assert any("later frames" in line and "frames/s" in line for line in lines)
    assert any("anchor" in line for line in lines)


def test_track_bench_bad_settings(tmp_path):
    cfg = bench_config("track")
    cfg.track.n_frames = 1
    with pytest.raises(ValueError, match="n_frames >= 2"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
    cfg.track.n_frames = 2
    cfg.track.overrides = (("no_such_field", 1),)
    with pytest.raises(KeyError, match="no_such_field"):
        suite.run(cfg, tmp_path, log=lambda *a: None)
