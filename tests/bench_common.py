"""Shared pieces of the bench smoke tests: a variant of configs/bench.py, and one suite run that
checks bench.json holds exactly the returned results."""

import json
from pathlib import Path

from dhjax.bench import suite
from dhjax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def bench_config(variant: str):
    """The ConfigDict of configs/bench.py:<variant>."""
    return config_lib.load_config(f"{ROOT / 'configs' / 'bench.py'}:{variant}")


def run_suite(cfg, workdir: Path):
    """suite.run(cfg, workdir) -> (results, the logged lines); asserts that workdir/bench.json
    holds the results (as JSON)."""
    lines = []
    res = suite.run(cfg, workdir, log=lines.append)
    assert json.loads((Path(workdir) / "bench.json").read_text()) == json.loads(json.dumps(res))
    return res, lines
