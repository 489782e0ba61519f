"""Samples random heads of the default model and renders them (the foundation's demo).

    python -m experiments.sample_heads --config=configs/sample_heads.py --workdir=/tmp/heads

Writes grid.png, meshes/, params/, summary.json (`dhjax.data.head_samples.write`) and config.json.
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.data import head_samples
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sample_heads.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def main(argv):
    del argv
    run = run_app.exit_on_user_error(lambda: run_app.start(_WORKDIR.value, _CONFIG.value),
                                     errors=(run_app.RunError,))
    head_samples.write(_CONFIG.value, str(run.workdir), log=run.log)


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
