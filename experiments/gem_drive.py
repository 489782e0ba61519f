"""Drives a finished GEM with another sequence (cross-reenactment), through its regressor.

    python -m experiments.gem_drive --workdir=runs/gem --source=<dataset folder> --out=runs/gem_drive
    python -m experiments.gem_drive --workdir=runs/gem --landmarks=<video landmarks .npy> --out=runs/gem_drive

--source drives with a dataset's tracked parameters (e.g. experiments.track's dataset/ folder),
--landmarks with a video's 2D face landmarks (`dhjax.capture.landmarks.load` formats; mediapipe's
refined 478-point mesh for a run trained with regressor.landmark_iris, the default).
Writes <out>/drive.mp4 and <out>/coefficients.npz, and with --ply_frames=0,10 a 3DGS PLY of
each listed frame (<out>/frame_0000.ply, ...; `dhjax.synthesis.gem_run.drive`).
"""

from absl import app, flags

from dhjax.synthesis import gem_run
from dhjax.train import app as run_app

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiments.gem run", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_SOURCE = flags.DEFINE_string("source", "", "dataset folder whose tracked parameters drive the GEM")
_SPLIT = flags.DEFINE_string("split", "train", "split of --source")
_ITEM = flags.DEFINE_integer("item", -1, "item (sequence) of --source (-1: the first)")
_LANDMARKS = flags.DEFINE_string("landmarks", "", "2D landmark file(s) of a video that drive the GEM")
_NEUTRAL = flags.DEFINE_integer("neutral", -1, "the source's neutral frame (-1: automatic)")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "use the first frames only (0: all)")
_FPS = flags.DEFINE_float("fps", 12.0, "video frame rate")
_REGRESSOR = flags.DEFINE_enum("regressor", "mlp", list(gem_run.REGRESSOR_KINDS),
                               "which regressor drives: the thesis's MLP, or the linear one (both are trained "
                               "unless the run's regressor.kinds left one out)")
_PLY_FRAMES = flags.DEFINE_list("ply_frames", [], "source frame numbers to write as 3DGS PLY files (e.g. 0,10)")


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: gem_run.drive(
        _WORKDIR.value, _OUT.value, source=_SOURCE.value, split=_SPLIT.value, item=_ITEM.value,
        landmarks_path=_LANDMARKS.value, neutral=_NEUTRAL.value, max_frames=_MAX_FRAMES.value, fps=_FPS.value,
        kind=_REGRESSOR.value, ply_frames=_ply_frames()))


def _ply_frames() -> list[int]:
    try:
        return [int(v) for v in _PLY_FRAMES.value]
    except ValueError as err:
        raise ValueError(f"--ply_frames takes frame numbers, e.g. 0,10: {err}") from err


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
