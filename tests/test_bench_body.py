"""The body bench suite (`dhjax.bench.body`, configs/bench.py:body) at tiny sizes: it runs end to
end through `dhjax.bench.suite` on a small random official-layout model and returns the keys it
documents with finite positive numbers; dhjax and smplx agree on the vertices. Not a timing check
(no timed assertions)."""

from __future__ import annotations

import math

from bench_common import bench_config, run_suite


def test_body_bench_smoke(tmp_path):
    cfg = bench_config("body")
    assert cfg.batch_sizes == (1, 16, 64) and cfg.body.model == "default"
    cfg.update(batch_sizes=(1, 4), repeats=1, warmup=1)
    cfg.body.update(model="random", vertices=300, n_expression=None)
    res, lines = run_suite(cfg, tmp_path)
    assert res["suite"] == "body" and res["body_model"] == "random" and res["body_V"] == 300
    assert (res["body_n_shape"], res["body_n_expression"]) == (10, 100)
    assert any("body forward B=  4" in line for line in lines)
    for B in (1, 4):
        assert math.isfinite(res[f"body_b{B}_dhjax_s"]) and res[f"body_b{B}_dhjax_s"] > 0
    try:
        import smplx  # noqa: F401
    except ImportError:
        return
    for B in (1, 4):
        assert res[f"body_b{B}_speedup_vs_smplx"] > 0
        assert res[f"body_b{B}_max_abs_diff_m"] < 2e-6
