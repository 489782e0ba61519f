"""Trains an INSTA avatar (instant volumetric head avatar) on one tracked monocular video.

    python -m experiments.insta --config=configs/insta.py:tiny --workdir=runs/insta

Writes checkpoints/, metrics.jsonl, TensorBoard events, final_metrics.json, heldout_metrics.json,
heldout.png, heldout.mp4, orbit.mp4, canonical_mesh.obj, avatar.npz, config.json and
training_curve.json / .png (online.json / .png in the online modes; `dhjax.synthesis.insta_run.run`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.synthesis import insta_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/insta.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: insta_run.run(_CONFIG.value, _WORKDIR.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
