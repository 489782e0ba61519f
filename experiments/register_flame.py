"""Registers the head model to 3D scans through the shared harness.

    python -m experiments.register_flame --config=configs/register_flame.py:tiny --workdir=/tmp/reg

Writes params/, meshes/, report.json, report.md, final_metrics.json and the harness's files
into the workdir (`dhjax.capture.registration_run.run`).
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.capture import registration_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/register_flame.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (resumes if it holds a run)", required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: registration_run.run(_CONFIG.value, _WORKDIR.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
