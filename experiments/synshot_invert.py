"""Few-shot SynShot inversion: a personal Gaussian avatar from N images (see configs/synshot_invert.py).

    python -m experiments.synshot_invert --config=configs/synshot_invert.py:tiny \
        --config.prior_workdir=runs/synshot --workdir=runs/synshot_invert

Writes metrics.json, final_metrics.json, renders.png, inputs.png, avatar.ply, checkpoints/ and
config.json (`dhjax.synthesis.synshot_run.run_invert`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.synthesis import synshot_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/synshot_invert.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: synshot_run.run_invert(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
