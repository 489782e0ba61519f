"""Metrical face tracking: per-frame FLAME parameters, cameras, albedo and light from a video.

    python -m experiments.track --input=video.mp4 --workdir=runs/track
    python -m experiments.track --input=frames_dir/ --landmarks=lmk_dir/ --workdir=runs/track
    python -m experiments.track --input=photo.png --workdir=runs/photo
    python -m experiments.track --input=synthetic --config=configs/track.py:tiny \
        --config.mica_workdir=runs/mica --workdir=runs/track_syn

--input: a video file (anything ffmpeg decodes), a folder of images (sorted by name), one image,
or `synthetic` (`dhjax.data.synthetic.VideoGenerator` sequences with ground truth).
`dhjax.capture.track_run` describes what it writes into the workdir: per-frame parameters,
cameras, an overlay, a report, a dataset in the `dhjax.data.dataset` layout, and progress/ (a
killed run started again with the same command continues after the last finished frame). For
a video, dataset/ fills frame by frame while tracking runs (meta.json's "live" entry counts the
frames), so an INSTA avatar can train on it at the same time:
`python -m experiments.insta --config=configs/insta.py:tiny --config.online.live=True
--config.data.root=runs/track/dataset --workdir=runs/insta_live`.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from dhjax.capture import track_run
from dhjax.train import app as run_app

_CONFIG = config_flags.DEFINE_config_file("config", "configs/track.py", "configs/track.py[:variant]",
                                          lock_config=True)
_INPUT = flags.DEFINE_string("input", None, "video file, image folder, one image, or 'synthetic'", required=True)
_LANDMARKS = flags.DEFINE_string("landmarks", None, "landmark file (one image, or [T, N, 2] for a video) or a "
                                 "folder of per-frame files named like the frames; default: mediapipe")
_MASKS = flags.DEFINE_string("masks", None, "foreground masks for dataset/ (e.g. a video matting method's "
                             "alpha): a folder of per-frame images named like the frames, a mask video, or "
                             "one image; default: the tracked mesh's silhouette (no hair)")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder", required=True)


def main(argv):
    del argv
    run_app.exit_on_user_error(lambda: track_run.run(_CONFIG.value, _WORKDIR.value, input=_INPUT.value,
                                                     landmarks=_LANDMARKS.value, masks=_MASKS.value),
                               errors=(run_app.RunError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    app.run(main, flags_parser=run_app.parse_flags)
