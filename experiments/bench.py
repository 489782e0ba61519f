"""Benchmarks dhjax against references and peers, one suite per run (no timed assertions anywhere).

    python -m experiments.bench --config=configs/bench.py:flame --workdir=/tmp/bench

Suites (configs/bench.py): flame, synthetic, splat, geometry, insta, gem, body, d3ga, data, synshot,
track (`dhjax.bench`). Results are printed
and written to <workdir>/bench.json, the config to <workdir>/config.json. A benchmark has nothing
to resume: in a folder that holds an earlier benchmark (of any suite or settings, or an
`experiments.bench_geometry` run) the new one replaces it; a folder that holds another
experiment's run is refused.
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.bench import suite
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/bench.py:<suite>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where bench.json goes", required=True)


def main(argv):
    del argv
    suite.replace_earlier_benchmark(_WORKDIR.value, log=lambda m: print(m, flush=True))
    run = run_app.exit_on_user_error(lambda: run_app.start(_WORKDIR.value, _CONFIG.value),
                                     errors=(run_app.RunError,))
    suite.run(_CONFIG.value, run.workdir, log=run.log)


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
