"""Samples new SynShot avatars from a trained prior's code grids (see configs/synshot_sample.py).

    python -m experiments.synshot_sample --config=configs/synshot_sample.py:tiny \
        --config.prior_workdir=runs/synshot --workdir=runs/synshot_sample

Writes samples.png, codes.npz, final_metrics.json, metrics.jsonl, checkpoints/ and config.json
(`dhjax.synthesis.synshot_sample.run`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.synthesis import synshot_sample
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/synshot_sample.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: synshot_sample.run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
