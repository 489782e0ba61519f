"""Generates synthetic head datasets and a contact sheet (see configs/make_synthetic.py).

    python -m experiments.make_synthetic --config=configs/make_synthetic.py:tiny --workdir=/tmp/syn

Writes multiview/, video/, the contact sheets and summary.json (`dhjax.data.make_synthetic.write`)
and config.json.
"""

from absl import app, flags
from ml_collections import config_flags

from dhjax.data import make_synthetic
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/make_synthetic.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def main(argv):
    del argv
    run = run_app.exit_on_user_error(lambda: run_app.start(_WORKDIR.value, _CONFIG.value),
                                     errors=(run_app.RunError,))
    make_synthetic.write(_CONFIG.value, str(run.workdir), log=run.log)


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
