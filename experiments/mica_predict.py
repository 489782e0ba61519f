"""Metric neutral head shapes of face images with a trained MICA.

    python -m experiments.mica_predict --images=DIR --workdir=runs/mica [--landmarks=DIR] [--out=DIR]

For every .png / .jpg / .jpeg in --images: 2D landmarks from `<stem>.npy|.txt|.pts|.json` in
--landmarks when that file exists (68 iBUG, 51 inner or 468 mediapipe points, pixels; see
`dhjax.capture.landmarks.load`), otherwise detected with mediapipe; the five-point aligned crop
of the run's encoder (ArcFace's 112 x 112 crop for iresnet, the 96 x 96 landmark crop for the
landmark encoder); the selected network of the run predicts the shape. Writes into --out
(default <workdir>/predictions):
  <stem>.obj       the neutral mesh in metres (the head model's topology)
  <stem>.npz       shape [300], vertices [V, 3] (metres), landmarks3d [68, 3] (metres)
  <stem>_crop.png  the crop the network saw
An image that fails (no face found, unreadable file, bad landmark file) is reported with the
reason and skipped; the exit status is nonzero when any image failed.
"""

import os
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from dhjax import io as dio
from dhjax.capture import landmarks as lmk_lib
from dhjax.capture import mica
from dhjax.models import flame
from dhjax.train import loop

FLAGS = flags.FLAGS


def define_flags():
    """The command-line flags (defined only when run as a program, so that experiments.mica_eval
    can import `load_run` from here without them)."""
    flags.DEFINE_string("images", None, "folder of face images (.png, .jpg, .jpeg)", required=True)
    flags.DEFINE_string("workdir", None, "a MICA training run (experiments.mica_train)", required=True)
    flags.DEFINE_string("landmarks", None, "folder of landmark files named <image stem>.npy/.txt/.pts/.json")
    flags.DEFINE_string("out", None, "output folder (default <workdir>/predictions)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LANDMARK_SUFFIXES = (".npy", ".txt", ".pts", ".json")


def load_run(workdir):
    """(cfg, variables of the selected network, model record, checkpoint step) of a run. A run
    that calibrates its mapping (config calibration.enabled) predicts with its calibrated
    network (`mica.calibrated_variables`).

    Raises FileNotFoundError when the workdir holds no run or no checkpoint, ValueError when the
    checkpoint does not fit its config."""
    from dhjax.train import checkpoint

    cfg, arch, rec = mica.read_run(workdir)
    template = mica.state_template(cfg, arch)
    try:
        state, _, step = checkpoint.load_latest(workdir, template)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"MICA run '{workdir}' has no checkpoint ({err}); train it first with "
                                f"python -m experiments.mica_train --workdir={workdir}") from err
    if mica.calibration_enabled(cfg):
        return cfg, mica.calibrated_variables(workdir, state, step), rec, step
    return cfg, mica.best_variables(state), rec, step


def check_head_model(model, rec):
    if int(rec["n_vertices"]) != model.num_vertices:
        raise ValueError(f"the run was trained on head model {rec['head_model']!r} with {rec['n_vertices']} "
                         f"vertices; the loaded model {model.name!r} has {model.num_vertices}")


def load_run_or_exit(workdir):
    """`load_run` plus the head model, for the command-line programs (mica_predict, mica_eval):
    (cfg, variables, model record, checkpoint step, head model). A workdir that holds no run or
    no checkpoint, a checkpoint that does not fit its config, or a run trained on another head
    model prints 'error: ...' to stderr and exits with status 2."""
    try:
        cfg, variables, rec, step = load_run(workdir)
        model = flame.load()
        check_head_model(model, rec)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return cfg, variables, rec, step, model


def landmark_file(folder, stem: str):
    """The landmark file of an image stem in `folder`, or None."""
    if not folder:
        return None
    for suffix in LANDMARK_SUFFIXES:
        p = Path(folder) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def predict_image(path: Path, variables, model, out: Path, landmarks_dir=None) -> dict:
    """Predicts one image and writes its files; returns {"shape", "source"}."""
    image = dio.load_image(path)
    lm_path = landmark_file(landmarks_dir, path.stem)
    lm = lmk_lib.landmarks_for_image(image, path=path, landmarks_path=lm_path)
    z, crop = mica.predict_image(variables, image, lm)
    verts = mica.neutral_vertices(model, z[None])
    lmk3d = np.asarray(mica.neutral_landmarks(model, verts)[0], np.float32)
    verts = np.asarray(verts[0], np.float32)
    dio.save_obj(out / f"{path.stem}.obj", verts, np.asarray(model.faces))
    np.savez(out / f"{path.stem}.npz", shape=z.astype(np.float32), vertices=verts, landmarks3d=lmk3d)
    dio.save_image(out / f"{path.stem}_crop.png", crop)
    return {"shape": z, "source": lm.source if lm_path is None else str(lm_path)}


def main(argv):
    del argv
    loop.quiet_library_logs()
    images_dir = Path(FLAGS.images)
    if not images_dir.is_dir():
        raise app.UsageError(f"--images: '{images_dir}' is not a folder")
    if FLAGS.landmarks and not Path(FLAGS.landmarks).is_dir():
        raise app.UsageError(f"--landmarks: '{FLAGS.landmarks}' is not a folder")
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise app.UsageError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in '{images_dir}'")
    _, variables, rec, step, model = load_run_or_exit(FLAGS.workdir)
    out = Path(FLAGS.out or os.path.join(FLAGS.workdir, "predictions"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"MICA run {FLAGS.workdir} (checkpoint {step}, encoder {rec['encoder']['source']}): "
          f"{len(paths)} images -> {out}", flush=True)
    failed = []
    for path in paths:
        try:
            res = predict_image(path, variables, model, out, FLAGS.landmarks)
            z = res["shape"]
            print(f"  {path.name}: landmarks from {res['source']}; |shape| {np.linalg.norm(z):.2f}, "
                  f"first coefficients {np.array2string(z[:3], precision=2)} -> {path.stem}.obj", flush=True)
        except (ValueError, OSError, ImportError) as err:   # NoFaceError is a ValueError
            failed.append((path, err))
            print(f"  {path.name}: FAILED: {type(err).__name__}: {err}", flush=True)
    print(f"{len(paths) - len(failed)} of {len(paths)} images predicted", flush=True)
    if failed:
        print(f"{len(failed)} image(s) failed:", file=sys.stderr)
        for path, err in failed:
            print(f"  {path}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
