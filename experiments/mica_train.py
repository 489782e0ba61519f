"""Trains MICA (one image -> metric neutral head shape) on synthetic image / shape pairs.

    python -m experiments.mica_train --config=configs/mica.py:tiny --workdir=runs/mica

Generates (once, cached) the train / validation / test splits, trains with model selection on
the validation split, then measures the network and the mean face on validation and test
identities with the metric (rigid) protocol of `dhjax.capture.metric`. With
calibration.enabled (the landmark encoder of configs/mica.py:tiny) it also generates the
calibration split and, after training, refits the mapping on the landmarks the trained network
finds in those held-out identities, written to mapping_calibration.npz; the final benchmark,
mica_predict, mica_eval and the tracker then use the calibrated network. Rerunning the same
command on a finished run recalibrates. `dhjax.capture.mica.run.train` describes the files it
writes into the workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.capture import mica
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/mica.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: mica.run.train(_CONFIG.value, _WORKDIR.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
