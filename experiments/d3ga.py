"""Trains a D3GA avatar (Gaussians in tetrahedral cages of the body and garment layers) on one
subject's multi-view video and evaluates it on held-out frames and cameras.

    python -m experiments.d3ga --config=configs/d3ga.py:tiny --workdir=runs/d3ga

Writes checkpoints/, parts.json, metrics.json, final_metrics.json, tables.md, heldout.png,
novel_pose.mp4, ply/ and config.json (`dhjax.synthesis.d3ga_run.run`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.synthesis import d3ga_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/d3ga.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: d3ga_run.run(_CONFIG.value, _WORKDIR.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
