"""Drives a trained INSTA avatar with another tracked sequence (reenactment).

    python -m experiments.insta_reenact --workdir=runs/insta --source=<tracked video> --out=runs/reenact

--source is a 'video' dataset folder (what experiments.track writes into <workdir>/dataset, or a
synthetic video); its expressions, poses and cameras drive the avatar of --workdir, which keeps
its own identity. Writes <out>/reenact.mp4 (source | avatar) (`dhjax.synthesis.insta_run.reenact`).
"""

from absl import app, flags

from dhjax.synthesis import insta_run
from dhjax.train import app as run_app

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiments.insta run", required=True)
_SOURCE = flags.DEFINE_string("source", None, "the driving sequence: a 'video' dataset folder", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (created)", required=True)
_ITEM = flags.DEFINE_integer("item", -1, "sequence number in --source (-1: the first)")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "render the first frames only (0: all)")
_FPS = flags.DEFINE_float("fps", 25.0, "frame rate of reenact.mp4")


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: insta_run.reenact(_WORKDIR.value, _SOURCE.value, _OUT.value, item=_ITEM.value,
                                                         max_frames=_MAX_FRAMES.value, fps=_FPS.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
