"""The body bench suite (`dhjax.bench.body`, configs/bench.py:body) at tiny sizes: it runs end to
end through `dhjax.bench.suite` on a small random official-layout model and returns the keys it
documents with finite positive numbers; dhjax and smplx agree on the vertices. Not a timing check
(no timed assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dhjax.bench import suite
from dhjax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_body_bench_smoke(tmp_path):
    cfg = config_lib.load_config(f"{ROOT / 'configs' / 'bench.py'}:body")
    assert cfg.batch_sizes == (1, 16, 64) and cfg.body.model == "default"
    cfg.update(batch_sizes=(1, 4), repeats=1, warmup=1)
    cfg.body.update(model="random", vertices=300, n_expression=None)
    lines = []
    res = suite.run(cfg, tmp_path, log=lines.append)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(res))
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
