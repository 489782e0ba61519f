"""Trains the SynShot prior (VQ-VAE Gaussian head avatars) on synthetic multi-view heads.

    python -m experiments.synshot_prior --config=configs/synshot_prior.py:tiny --workdir=runs/synshot

Writes checkpoints/, metrics.jsonl, final_metrics.json, heldout_metrics.json, heldout_grid.png,
avatar_heldout0.ply and config.json (`dhjax.synthesis.synshot_run.run_prior`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.synthesis import synshot_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/synshot_prior.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: synshot_run.run_prior(_CONFIG.value, _WORKDIR.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
