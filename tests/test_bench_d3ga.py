"""The D3GA bench suite (`dhjax.bench.d3ga`, configs/bench.py:d3ga) at the tiny setting: it runs
end to end through `dhjax.bench.suite` and returns the keys it documents with finite positive
numbers. Not a timing check (no timed assertions)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dhjax.bench import suite
from dhjax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_d3ga_bench_smoke(tmp_path):
    cfg = config_lib.load_config(f"{ROOT / 'configs' / 'bench.py'}:d3ga")
    assert tuple(cfg.d3ga.settings) == ("tiny", "paper")
    cfg.d3ga.update(settings=("tiny",), repeats=1, warmup=1)
    lines = []
    res = suite.run(cfg, tmp_path, log=lines.append)
    assert res["suite"] == "d3ga" and res["d3ga_tiny_gaussians"] == 7200 and res["d3ga_tiny_tets"] > 10_000
    assert res["d3ga_tiny_parameters"] > 300_000
    for k in ("render_s", "render_fps", "pose_s", "splat_s", "megabytes"):
        assert math.isfinite(res[f"d3ga_tiny_{k}"]) and res[f"d3ga_tiny_{k}"] > 0
    assert any("d3ga tiny" in line for line in lines)
    cfg.d3ga.settings = ("huge",)
    with pytest.raises(ValueError, match="unknown setting"):
        suite.run(cfg, tmp_path / "x", log=lines.append)
