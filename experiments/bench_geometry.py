"""Geometry kernel benchmarks on their own (`dhjax.bench.geometry`; no timed assertions anywhere).

    python -m experiments.bench_geometry --workdir=/tmp/bg [--only=closest_point,hashgrid] [--n_points=N]

Runs every benchmark (or those named by --only) at the full-size defaults of
`dhjax.bench.geometry.default_config()` and writes <workdir>/bench_geometry.json as
{"<name>": {...}, "meta": {...}} and the settings to <workdir>/config.json. The same benchmarks
run inside `python -m experiments.bench --config=configs/bench.py:geometry`. In a folder that
holds an earlier benchmark (this one's with other settings, or `experiments.bench`'s) the new
one replaces it; a folder that holds another experiment's run is refused.
"""

from absl import app, flags

from dhjax.bench import geometry, suite
from dhjax.train import app as run_app

_WORKDIR = flags.DEFINE_string("workdir", None, "where bench_geometry.json goes", required=True)
_ONLY = flags.DEFINE_list("only", [], "comma-separated benchmark names (default: all)")
_N_POINTS = flags.DEFINE_integer("n_points", None,
                                 "override n_points of every benchmark (closest_point, hashgrid)")
flags.register_validator("only", lambda names: set(names) <= set(geometry.benchmarks()),
                         f"--only takes names from {sorted(geometry.benchmarks())}")


def main(argv):
    del argv
    cfg = geometry.default_config()
    if _N_POINTS.value:
        geometry.set_n_points(cfg, _N_POINTS.value)
    suite.replace_earlier_benchmark(_WORKDIR.value, log=lambda m: print(m, flush=True))
    run = run_app.exit_on_user_error(lambda: run_app.start(_WORKDIR.value, cfg), errors=(run_app.RunError,))
    geometry.run(cfg, run.workdir, only=_ONLY.value, log=run.log)


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
