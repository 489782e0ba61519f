"""The benchmark suites behind `python -m experiments.bench`: one run times one suite and writes
<workdir>/bench.json.

Suites: flame (`dhjax.bench.flame`), synthetic (`dhjax.bench.synthetic`), splat
(`dhjax.bench.splat`), geometry (`dhjax.bench.geometry`, all of its benchmarks), insta
(`dhjax.bench.insta`), gem (`dhjax.bench.gem`), body (`dhjax.bench.body`), d3ga (`dhjax.bench.d3ga`),
data (`dhjax.bench.data`), synshot (`dhjax.bench.synshot`), track (`dhjax.bench.track`).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax

from dhjax.bench import body, d3ga, data, flame, gem, geometry, insta, splat, synshot, synthetic, track

SUITES = {
    "flame": flame.run,
    "synthetic": synthetic.run,
    "splat": splat.run,
    "geometry": lambda cfg, log: geometry.run_all(cfg.geometry, log=log),
    "insta": insta.run,
    "gem": gem.run,
    "body": body.run,
    "d3ga": d3ga.run,
    "data": data.run,
    "synshot": synshot.run,
    "track": track.run,
}


RESULT_FILES = ("bench.json", "bench_geometry.json")
"""What `experiments.bench` and `experiments.bench_geometry` write next to their config.json."""


def replace_earlier_benchmark(workdir, log=print) -> bool:
    """Removes the config.json of an earlier benchmark in workdir (`experiments.bench`'s, with a
    'suite' field, or `experiments.bench_geometry`'s, with its closest_point and hashgrid
    sections; never one with an 'experiment' field) when its results file is there, so that the
    run helper takes the new settings: a benchmark has nothing to resume. Returns whether it did;
    a folder holding any other run is left as it is (and refused by `app.start`)."""
    from dhjax.train import app as run_app

    path = Path(workdir) / run_app.CONFIG_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or "experiment" in old:
        return False
    kind = ("suite " + repr(old["suite"]) if "suite" in old
            else "bench_geometry" if {"closest_point", "hashgrid"} <= set(old) else None)
    if kind is None or not any((Path(workdir) / name).is_file() for name in RESULT_FILES):
        return False
    log(f"{workdir}: replacing the earlier benchmark ({kind}) in this folder")
    path.unlink()
    return True


def run(cfg, workdir, log=print) -> dict:
    """Times suite `cfg.suite` with the settings in cfg (configs/bench.py), writes the results to
    <workdir>/bench.json and returns them: {"suite", "host", "jax", "cpu_count", <suite's keys>}.
    Raises ValueError for an unknown suite."""
    if cfg.suite not in SUITES:
        raise ValueError(f"unknown bench suite {cfg.suite!r}; available: {', '.join(SUITES)}")
    results = {"suite": cfg.suite, "host": platform.node(), "jax": jax.__version__,
               "cpu_count": os.cpu_count()}
    results.update(SUITES[cfg.suite](cfg, log=log))
    path = Path(workdir) / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    log(f"wrote {path}")
    return results
