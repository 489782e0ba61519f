"""Metric neutral head shapes of face images with a trained MICA.

    python -m experiments.mica_predict --images=DIR --workdir=runs/mica [--landmarks=DIR] [--out=DIR]

For every image in --images (`dhjax.io.IMAGE_SUFFIXES`): 2D landmarks from
`<stem>.npy|.txt|.pts|.json` in --landmarks when that file exists (68 iBUG, 51 inner or 468
mediapipe points, pixels; see `dhjax.capture.landmarks.load`), otherwise detected with
mediapipe; the five-point aligned crop of the run's encoder; the run's network predicts the
shape. Writes into --out (default <workdir>/predictions):
  <stem>.obj       the neutral mesh in metres (the head model's topology)
  <stem>.npz       shape [300], vertices [V, 3] (metres), landmarks3d [68, 3] (metres)
  <stem>_crop.png  the crop the network saw
An image that fails (no face found, unreadable file, bad landmark file) is reported with the
reason and skipped; the exit status is 1 when any image failed, 2 when the workdir holds no
usable run.
"""

import sys
from pathlib import Path

from absl import app, flags

from dhjax.capture import mica

_IMAGES = flags.DEFINE_string("images", None, "folder of face images (.png, .jpg, ...)", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "a MICA training run (experiments.mica_train)", required=True)
_LANDMARKS = flags.DEFINE_string("landmarks", None, "folder of landmark files named <image stem>.npy/.txt/.pts/.json")
_OUT = flags.DEFINE_string("out", None, "output folder (default <workdir>/predictions)")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    del argv
    try:             # a wrong folder is one 'error:' line and exit 2 (not absl's flag help)
        paths = mica.run.image_files(_IMAGES.value)
    except ValueError as err:
        _fail(f"--images: {err}")
    if _LANDMARKS.value and not Path(_LANDMARKS.value).is_dir():
        _fail(f"--landmarks: '{_LANDMARKS.value}' is not a folder")
    failed = mica.run.predict(paths, _WORKDIR.value, landmarks_dir=_LANDMARKS.value, out=_OUT.value)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
