"""The GEM bench suite (`dhjax.bench.gem`, configs/bench.py:gem) at tiny sizes: it runs end to end
through `dhjax.bench.suite` and returns the keys it documents with finite positive numbers. Not a
timing check (no timed assertions)."""

from __future__ import annotations

import math

from bench_common import bench_config, run_suite


def test_gem_bench_smoke(tmp_path):
    cfg = bench_config("gem")
    cfg.gem.update(map_sizes=(16,), components=(2, 3), widths=(8, 8), style_dim=4, sh_degree=1, width=24,
                   height=32, repeats=1, warmup=1)
    res, _ = run_suite(cfg, tmp_path)
    assert res["suite"] == "gem" and res["gem_image"] == "24x32"
    keys = ["gem_s16_net_s_per_frame", "gem_s16_net_fps", "gem_s16_net_mb", "gem_s16_splat_s",
            "gem_s16_splat_grad_s"] + [
        f"gem_s16_m{m}_{k}" for m in (2, 3) for k in ("s_per_frame", "fps", "linear_s", "mb", "speedup_vs_net")]
    for k in keys:
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert res["gem_s16_gaussians"] > 0
    assert res["gem_s16_m3_mb"] > res["gem_s16_m2_mb"]
