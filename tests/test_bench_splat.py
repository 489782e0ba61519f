"""The splat bench suite (`dhjax.bench.splat`, configs/bench.py:splat) on a small scene: it runs
end to end through `dhjax.bench.suite`, times each implementation it lists, and where the CPU
kernel runs 8 lanes also its 4-lane loops (DHJAX_SPLAT_LANES restored afterwards). Not a timing
check (no timed assertions)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from dhjax.bench import suite
from dhjax.ops import splat as splat_op
from dhjax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_splat_bench_smoke(tmp_path, monkeypatch):
    if not splat_op.kernel_available("cpu"):
        pytest.skip("the CPU splat kernel is not built")
    monkeypatch.delenv("DHJAX_SPLAT_LANES", raising=False)
    cfg = config_lib.load_config(f"{ROOT / 'configs' / 'bench.py'}:splat")
    cfg.splat.update(cases=((1_000, 32, 32),), repeats=1, reference_repeats=1, reference_max_n=10_000)
    lines = []
    res = suite.run(cfg, tmp_path, log=lines.append)
    key = "splat_1k_32x32"
    impls = ["cpu", "reference"] + (["cpu_lanes4"] if res["cpu_simd_lanes"] == 8 else [])
    for impl in impls:
        for part in ("fwd", "fwd_bwd"):
            assert math.isfinite(res[f"{key}_{impl}_{part}_s"]) and res[f"{key}_{impl}_{part}_s"] > 0, (impl, part)
    assert res[f"{key}_cpu_speedup_vs_reference"] > 0 and res[f"{key}_intersections"] > 0
    if res["cpu_simd_lanes"] == 8:
        assert res[f"{key}_cpu_lanes8_fwd_speedup_vs_lanes4"] > 0
        assert any("cpu 8 lanes vs 4" in line for line in lines)
    assert "DHJAX_SPLAT_LANES" not in os.environ and splat_op.simd_lanes() == res["cpu_simd_lanes"]
