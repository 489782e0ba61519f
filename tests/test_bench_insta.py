"""The INSTA bench suite (`dhjax.bench.insta`, configs/bench.py:insta) at tiny sizes: it runs end
to end through `dhjax.bench.suite` and returns the keys it documents, with finite positive
numbers. Not a timing check (no timed assertions). The reference's render is skipped here
(render.reference_size = 0: its brute-force closest point on a rounded-up capacity takes ~30 s
even for a few rays); its training step and parts run."""

from __future__ import annotations

import math

import pytest
from bench_common import bench_config, run_suite

from dhjax.bench import insta as insta_bench


def _config(tmp_path):
    cfg = bench_config("insta")
    cfg.insta.update(cache_dir=str(tmp_path / "cache"), n_frames=3, holdout=1, video_size=32, rays_per_frame=32,
                     repeats=1, warmup=1)
    cfg.insta.reference.update(rays_per_frame=8, repeats=1)
    cfg.insta.render.update(size=32, chunk=512, repeats=1, reference_size=0)
    return cfg


def test_insta_bench_smoke(tmp_path):
    cfg = _config(tmp_path)
    res, lines = run_suite(cfg, tmp_path)
    assert res["suite"] == "insta" and res["insta_video"] == "32x32"
    assert res["insta_frames_per_step"] == 2 and res["insta_rays_per_frame"] == 32
    assert res["insta_train_reference_rays_per_frame"] == 8
    assert set(res["insta_kernels"]) == {"raymarch", "bvh", "hashgrid"}
    positive = [
        "insta_train_kernels_step_s", "insta_train_kernels_steps_per_s", "insta_train_kernels_rays_per_s",
        "insta_occupancy_update_s", "insta_train_kernels_step_s_amortised", "insta_train_minutes_estimate",
        "insta_train_reference_step_s", "insta_train_reference_rays_per_s", "insta_train_kernels_small_step_s",
        "insta_train_speedup_vs_reference", "insta_train_rays_per_s_ratio",
        "insta_render_32_kernels_s", "insta_render_32_kernels_fps", "insta_render_32_kernels_rays_per_s",
    ]
    for name in ("grids_march", "closest_point", "canonicalize", "hash_fwd_bwd"):
        positive += [f"insta_part_kernels_{name}_s", f"insta_part_reference_{name}_s"]
    for key in positive:
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    assert 0.0 < res["insta_occupied_fraction"] < 1.0            # the shell, not init's full grid
    assert 0.0 <= res["insta_train_kernels_samples_per_ray"] <= res["insta_samples_per_ray_capacity"]
    assert math.isfinite(res["insta_part_kernels_rest_s"]) and math.isfinite(res["insta_part_reference_rest_s"])
    assert any("insta_train_speedup_vs_reference" in line for line in lines)
    assert any(line.startswith("render 32x32") for line in lines)
    assert "insta_render_speedup_vs_reference" not in res              # skipped: reference_size = 0


def test_insta_bench_rejects_an_unknown_occupancy(tmp_path):
    cfg = _config(tmp_path)
    cfg.insta.occupancy = "half"
    with pytest.raises(ValueError, match="insta.occupancy must be one of"):
        insta_bench.run(cfg, log=lambda *a: None)


def test_insta_bench_applies_its_settings_to_the_insta_config(tmp_path):
    cfg = _config(tmp_path).insta
    icfg = insta_bench.insta_config(cfg)
    assert icfg.data.synthetic.video.n_frames == 3 and icfg.data.holdout == 1
    assert (icfg.data.synthetic.video.width, icfg.data.synthetic.video.height) == (32, 32)
    assert icfg.batch.rays_per_frame == 32 and icfg.batch.frames_per_step == 2     # tiny's frames per step
    assert icfg.data.cache_dir == str(tmp_path / "cache") and icfg.backend == "auto"
