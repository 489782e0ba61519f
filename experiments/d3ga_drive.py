"""Drives a trained D3GA avatar with a new pose sequence of the synthetic generator.

    python -m experiments.d3ga_drive --workdir=runs/d3ga --out=runs/d3ga_drive --motion=arms

Writes <out>/drive.mp4 (render | layers) (`dhjax.synthesis.d3ga_run.drive`).
"""

from absl import app, flags

from dhjax.synthesis import d3ga_run
from dhjax.train import app as run_app

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained D3GA run", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (created)", required=True)
_MOTION = flags.DEFINE_enum("motion", "arms", ["walk", "arms", "turn", "random"], "the driving motion")
_FRAMES = flags.DEFINE_integer("frames", 48, "frames of the motion")
_CAMERA = flags.DEFINE_integer("camera", 0, "capture camera number to render from")
_SEED = flags.DEFINE_integer("seed", 1, "seed of the motion")


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: d3ga_run.drive(_WORKDIR.value, _OUT.value, motion=_MOTION.value,
                                                      n_frames=_FRAMES.value, camera=_CAMERA.value,
                                                      seed=_SEED.value),
                               errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
