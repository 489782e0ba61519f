"""Metrical face tracking of a monocular video (or one photo) by analysis by synthesis.

    python -m experiments.track --input=video.mp4 --workdir=runs/track            # real video
    python -m experiments.track --input=photo.png --workdir=runs/photo            # one photo
    python -m experiments.track --input=synthetic --config=configs/track.py:tiny --workdir=runs/track_syn

Variants:
  ''      settings for real videos (512-ish pixels): 300 landmark + 3 x 150 photometric steps on
          the first frame, 30 + 30/30/40 on every later frame.
  'tiny'  three synthetic 192 x 192 sequences of 8 frames with ground truth (CPU); compares the
          mean-shape initialisation with MICA's (mica_workdir) and with the true shape, with the
          true focal length given (a calibrated camera). Add
          --config.synthetic.known_focal="(False, True)" to also estimate the focal length.
  'insta' the tracker as INSTA uses it (thesis A.2, dataset tracking): '' plus per-frame eyelid
          closing (the model's eyelid blendshapes), mediapipe's iris points (refined mesh;
          468-477) fitted to the model's, the two eyes' rotations kept alike (eye_symmetry)
          and, as always, the shape regularised towards MICA's prediction when one is given.
  'tiny_insta'  'tiny' with the same additions.

Landmarks come from mediapipe (pip install 'dhjax[landmarks]') or --landmarks (a file or a
folder of per-frame files, `dhjax.capture.landmarks.load`); synthetic input uses the projected
true landmarks plus Gaussian noise (synthetic.landmark_noise_px), a perfect detector with noise.
The identity shape starts from shape_init (an npz with 'shape', e.g. written by
experiments.mica_predict), else from MICA run on the first frame when mica_workdir is set, else
from the mean face (`dhjax.capture.track_run`). The appearance is a linear albedo model
(tracker.albedo_model: 'synthetic', a FLAME albedo file, or 'free' for a free texture), solved on
the first frame and then fixed. `python -m experiments.bench --config=configs/bench.py:track`
times the tracker.
"""

import ml_collections

from dhjax.capture import tracker


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "track"
    c.tracker = tracker.default_config()
    c.fps = 25.0                    # overlay video frame rate
    c.max_frames = 0                # 0: every frame of the input (real input; synthetic: synthetic.n_frames)
    c.stride = 1                    # track every stride-th frame (real input)
    c.shape_init = ""               # npz with 'shape' [S] (MICA output) for the initialisation
    c.mica_workdir = ""             # a MICA run (experiments.mica_train): predict the shape from frame 0
    c.synthetic = ml_collections.ConfigDict(dict(
        seed=0, sequences=(0,), n_frames=30, width=256, height=256, uv_size=128, landmark_noise_px=0.5,
        # initialisations compared on synthetic input: 'mean', 'mica' (needs mica_workdir), 'true'
        compare=("mean", "mica", "true"), known_focal=(False, True)))
    if arg not in (None, "", "tiny", "insta", "tiny_insta"):
        raise ValueError(f"unknown variant {arg!r}; use '', 'tiny', 'insta' or 'tiny_insta'")
    if arg in ("tiny", "tiny_insta"):
        c.tracker.first.update(landmark_steps=200, steps=(100, 100, 100))
        c.tracker.frame.update(landmark_steps=20, steps=(20, 20, 30))
        c.synthetic.update(sequences=(0, 1, 2), n_frames=8, width=192, height=192, known_focal=(True,))
    if arg in ("insta", "tiny_insta"):
        tracker.insta_variant(c.tracker)
    return c
