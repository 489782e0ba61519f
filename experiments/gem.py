"""Builds a GEM (Gaussian eigen model) of one head: Net -> PCA -> refinement -> drivers.

    python -m experiments.gem --config=configs/gem.py:tiny --workdir=runs/gem

Writes checkpoints/, refine/, distilled.npz, gem.npz (the eigenmodel), gem_<M>.npz, metrics.json,
tables.md, comparison.png, novel_view.mp4, novel_expression.mp4, cross_reenactment.mp4, a PLY
and config.json (`dhjax.synthesis.gem_run.run`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.synthesis import gem_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/gem.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: gem_run.run(_CONFIG.value, _WORKDIR.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
