"""Distils a SynShot avatar (a finished `experiments.synshot_invert` run) into a GEM.

    python -m experiments.gem_synshot --workdir=runs/synshot_invert --out=runs/gem_synshot

Writes <out>/gem.npz, metrics.json (held-out PSNR of the GEM against SynShot's own renders and
against the ground truth, sizes) and renders.png (`dhjax.synthesis.gem_synshot.run_distillation`).
"""

from absl import app, flags

from dhjax.synthesis import gem_synshot
from dhjax.train import app as run_app

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiments.synshot_invert run", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_FRAMES = flags.DEFINE_integer("n_frames", 64, "expressions the avatar is posed in for the PCA")
_COMPONENTS = flags.DEFINE_integer("n_components", 16, "components M per attribute (< n_frames)")
_FIT_STEPS = flags.DEFINE_integer("fit_steps", 100, "analysis-by-synthesis steps per held-out frame")


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: gem_synshot.run_distillation(
        _WORKDIR.value, _OUT.value, n_frames=_FRAMES.value, n_components=_COMPONENTS.value,
        fit_steps=_FIT_STEPS.value))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
