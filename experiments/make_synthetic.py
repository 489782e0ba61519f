"""Generates synthetic head datasets and a contact sheet (see configs/make_synthetic.py).

    python -m experiments.make_synthetic --config=configs/make_synthetic.py:tiny --workdir=/tmp/syn

Writes multiview/, video/, the contact sheets and summary.json (`dhjax.data.make_synthetic.write`)
and config.json.
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.data import body_synthetic, make_synthetic, synthetic
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/make_synthetic.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def main(argv):
    del argv
    cfg = _CONFIG.value

    def start():
        # before any work: counts, probabilities, motions, the shard
        (body_synthetic if cfg.get("kind") == "bodies" else synthetic).check_config(cfg)
        n, i = cfg.shard_count, cfg.shard_index
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or isinstance(i, bool) or not isinstance(i, int) \
                or not 0 <= i < n:
            raise ValueError(f"config fields shard_index / shard_count must be integers with 0 <= shard_index < "
                             f"shard_count, got {i!r} / {n!r}")
        return run_app.start(_WORKDIR.value, cfg)

    run = run_app.exit_on_user_error(start, errors=(run_app.RunError, ValueError))
    run_app.exit_on_user_error(lambda: make_synthetic.write(cfg, str(run.workdir), log=run.log),
                               errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
