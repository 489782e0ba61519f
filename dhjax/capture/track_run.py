"""Running the metrical face tracker (`dhjax.capture.tracker`) on a video, an image folder, one
photo, or synthetic sequences with ground truth: `run(cfg, workdir, input=...)`.

Real input (`track`): frames from `read_frames`, landmarks from files or mediapipe
(`frame_landmarks`), optional foreground masks from files (`frame_mattes`: what dataset/
stores as masks, e.g. a video matting method's alpha with the hair; without them the tracked
mesh's silhouette, which has no hair), the identity shape initialised from cfg.shape_init (an npz with 'shape'),
else MICA on the first frame (cfg.mica_workdir, `mica_shape`), else the mean face. Synthetic
input (`track_synthetic`): `dhjax.data.synthetic.VideoGenerator` sequences with noisy projected
landmarks, each tracked from every compared initialisation (cfg.synthetic.compare: mean face,
MICA, true shape; focal length estimated or given) and scored against the ground truth.

Writes into the workdir: params/frame_XXXX.npz (FLAME parameters in `flame.forward`'s layout,
SH light, and the tracker's raw parameters), cameras.json (per frame OpenCV K, R, t with
x_cam = R x_flame + t, focal length and principal point), overlay.mp4 and overlay_first.png (or
overlay.png for one image), report.json and report.md, config.json (`run_config`: the config and
the inputs; a rerun with others, or another experiment in the folder, is refused), dataset/
(`tracker.write_dataset`; real input streams it frame by frame while tracking,
`tracker.DatasetStream`), progress/ (every frame
as soon as it is tracked; a run started again continues after the last finished frame), and
TensorBoard events + metrics.jsonl (`log_tensorboard`, step = frame index): per frame
track/landmark_error_px and track/photometric_error, and for up to TB_FRAMES frames spread over
the sequence the image eval/tracked_frame, the frame | the tracked model's colours pasted over
it | the tracked mesh's shading with the given (green) and fitted (red) landmarks (the images
convention of `dhjax.train.loop.Method`); the config as HParams. A rerun replaces them.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dhjax import io as dio
from dhjax.capture import landmarks as lmk_lib
from dhjax.capture import mica
from dhjax.capture import tracker
from dhjax.data import synthetic
from dhjax.models import flame
from dhjax.train import app, logs

TB_FRAMES = 16
"""Frames of a tracked sequence whose images go to TensorBoard (spread evenly; all when fewer)."""

SUMMARY_KEYS = ("init_shape_error_mm", "shape_error_mm", "vertex_median_mm", "vertex_aligned_median_mm",
                "depth_rmse_mm", "focal_px", "landmark_error_px", "photometric_error", "gaze_error_deg")
"""Per-row numbers of the synthetic benchmark that its summary averages over sequences."""


def read_frames(path: str, max_frames: int = 0, stride: int = 1) -> tuple[list, list]:
    """(frames [H, W, 3] float, names) of a video file, an image folder (`dhjax.io.IMAGE_SUFFIXES`,
    sorted by name) or one image; every `stride`-th frame, at most `max_frames` (0: all).
    Raises FileNotFoundError / ValueError naming the input when it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in dio.IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--input {path}: the folder holds no images ({', '.join(dio.IMAGE_SUFFIXES)})")
        files = [files[i] for i in _sampled(len(files), stride, max_frames)]
        frames = [dio.load_image(f) for f in files]
        names = [f.stem for f in files]
    elif p.suffix.lower() in dio.IMAGE_SUFFIXES:
        frames, names = [dio.load_image(p)], [p.stem]
    else:
        video = dio.load_video(p)       # ValueError naming the file when ffmpeg cannot decode it
        idx = _sampled(len(video), stride, max_frames)
        frames, names = [video[i] for i in idx], [f"frame_{i:04d}" for i in idx]
    out = []
    for f, n in zip(frames, names):
        if f.shape[-1] == 1:
            f = np.repeat(f, 3, -1)
        out.append(f[..., :3])
        if out[-1].shape != out[0].shape:
            raise ValueError(f"--input {path}: {n} is {out[-1].shape[:2]}, the first frame {out[0].shape[:2]}")
    return out, names


def _sampled(n: int, stride: int, max_frames: int) -> list[int]:
    """The indices of a video's n frames that `read_frames` keeps (every stride-th, at most
    max_frames; 0 = all); `frame_mattes` samples a mask video the same way."""
    return list(range(0, n, stride))[:max_frames or None]


def frame_landmarks(frames, names, landmarks_arg, iris: bool = False) -> list:
    """Landmarks per frame: from `landmarks_arg` (one file, [T, N, 2] for a video, or a folder
    of per-frame files named like the frames; `dhjax.capture.landmarks.load`; 478-point files
    carry the iris) or, when it is empty, mediapipe detection (iris: its refined mesh with the
    iris points)."""
    if landmarks_arg:
        p = Path(landmarks_arg)
        if p.is_dir():
            out = []
            for n, f in zip(names, frames):
                cands = [c for c in sorted(p.glob(n + ".*"))]
                if not cands:
                    raise FileNotFoundError(f"--landmarks {p}: no landmark file for frame {n} ({n}.npy/.txt/.pts/.json)")
                out.append(lmk_lib.load(cands[0], image_size=(f.shape[1], f.shape[0])))
            return out
        loaded = lmk_lib.load(p, image_size=(frames[0].shape[1], frames[0].shape[0]))
        loaded = loaded if isinstance(loaded, list) else [loaded]
        if len(loaded) != len(frames):
            raise ValueError(f"--landmarks {p}: {len(loaded)} landmark sets for {len(frames)} frames")
        return loaded
    out = []
    for i, (n, f) in enumerate(zip(names, frames)):
        out.append(lmk_lib.detect(f, name=f"frame {i} ({n})", file_hint=LANDMARKS_HINT, iris=iris))
    return out


def _matte(img: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] of a mask image [H, W, C]: grey as it is, RGBA its alpha, RGB its mean."""
    if img.shape[-1] == 4:
        return img[..., 3]
    return img[..., 0] if img.shape[-1] == 1 else img[..., :3].mean(-1)


def frame_mattes(masks_arg, frames, names, max_frames: int = 0, stride: int = 1) -> list | None:
    """Foreground masks [H, W] float in [0, 1] of the frames (1 = the subject), or None without
    `masks_arg`: a folder of images named like the frames (<frame>.png etc.; a video's frames
    are frame_0000, frame_0001, ...), or a video file of the input's length (read with the same
    `stride` and `max_frames`), or one image for a photo. Grey images as they are, RGBA their
    alpha, RGB the mean of the channels. Raises FileNotFoundError / ValueError naming the file,
    the frame or the mismatch (count, size)."""
    if not masks_arg:
        return None
    p = Path(masks_arg)
    if not p.exists():
        raise FileNotFoundError(f"--masks {masks_arg}: no such file or folder")
    if p.is_dir():
        out = []
        for n in names:
            f = next((p / f"{n}{x}" for x in dio.IMAGE_SUFFIXES + tuple(x.upper() for x in dio.IMAGE_SUFFIXES)
                      if (p / f"{n}{x}").is_file()), None)
            if f is None:
                raise FileNotFoundError(f"--masks {p}: no mask image for frame {n} ({n}.png, .jpg, ...)")
            out.append(_matte(dio.load_image(f)))
    elif p.suffix.lower() in dio.IMAGE_SUFFIXES:
        out = [_matte(dio.load_image(p))]
    else:
        video = dio.load_video(p)       # ValueError naming the file when ffmpeg cannot decode it
        out = [_matte(video[i]) for i in _sampled(len(video), stride, max_frames)]
    if len(out) != len(frames):
        raise ValueError(f"--masks {p}: {len(out)} masks for {len(frames)} frames")
    for n, m, f in zip(names, out, frames):
        if m.shape != f.shape[:2]:
            raise ValueError(f"--masks {p}: the mask of frame {n} is {m.shape[1]}x{m.shape[0]}, the frame "
                             f"{f.shape[1]}x{f.shape[0]}")
    return out


# The way around detection in this entry point's own terms (detect's default names other callers).
LANDMARKS_HINT = ("give the landmarks as files instead: --landmarks=FILE_OR_FOLDER of "
                  "python -m experiments.track (one file, [T, N, 2] for a video, or a folder of "
                  "per-frame files named like the frames, <frame>.npy/.txt/.pts/.json), in Python "
                  "track_run.run(..., landmarks=...)")


def synthetic_sequence(cfg, sequence: int | None = None, assets=None):
    """(frames, ground-truth samples, head model) of one synthetic video (default: the first of
    cfg.synthetic.sequences) with noisy projected landmarks and skin masks (face + eyes labels,
    what a face parser would give). assets: `synthetic.build_assets` output to reuse."""
    sc = cfg.synthetic
    seq = int(tuple(sc.sequences)[0] if sequence is None else sequence)
    gcfg = synthetic.default_config()
    gcfg.seed = int(sc.seed)
    gcfg.uv_size = int(sc.uv_size)
    gcfg.video.update(n_sequences=seq + 1, n_frames=int(sc.n_frames), width=int(sc.width),
                      height=int(sc.height))
    gen = synthetic.VideoGenerator(gcfg, assets)
    model = synthetic.base_model(gen.assets)
    rng = np.random.default_rng(int(sc.seed) + 7919 * seq)
    iris_rng = np.random.default_rng([int(sc.seed), seq, 468])
    samples, frames = [], []
    for t in range(int(sc.n_frames)):
        s = gen[seq * int(sc.n_frames) + t]
        frames.append(synthetic_frame(model, s, rng, float(sc.landmark_noise_px), iris_rng,
                                      name=f"synthetic frame {t}"))
        samples.append(s)
    return frames, samples, model


def synthetic_frame(model, s, rng, noise_px: float, iris_rng=None, *, name: str = "frame"):
    """The tracker's observations of one synthetic sample s (`synthetic.VideoGenerator`): the
    true 68 landmarks projected with Gaussian noise (noise_px, drawn from rng), a perfect
    detector with noise; mediapipe's ten iris points likewise (noise from iris_rng, a separate
    stream so that the landmark noise does not depend on it; None: no iris points); the mask
    of the face and eye labels, what a face parser gives."""
    out = flame.forward(model, s["shape"][None], s["expression"][None], s["pose"][None], s["translation"][None])
    R, t, K = np.asarray(s["R"]), np.asarray(s["t"]), np.asarray(s["K"])

    def project(x):
        c = np.asarray(x) @ R.T + t
        return c[:, :2] / c[:, 2:] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]

    uv = project(out.landmarks[0])
    uv = uv + rng.normal(0.0, noise_px, uv.shape)
    iris = None
    if iris_rng is not None and out.iris is not None:
        iris = project(out.iris[0]) + iris_rng.normal(0.0, noise_px, (10, 2))
    mask = np.isin(s["seg"], (synthetic.LABEL["face"], synthetic.LABEL["eyes"]))
    return tracker.frame_data(s["image"], uv, np.arange(68), mask, name=name, iris=iris)


def mica_shape(workdir: str, image, lm, model, loaded=None) -> np.ndarray:
    """MICA's shape coefficients [300] for one image (the first frame) from a trained MICA run
    (`mica.run.load_run`): the crop its encoder reads, placed by the landmarks' five points,
    then the run's network. `loaded`: what `mica.run.load_run(workdir)` returned, so that a
    caller predicting for several sequences reads the checkpoint once."""
    _, variables, rec, step = loaded if loaded is not None else mica.run.load_run(workdir)
    mica.run.check_head_model(model, rec)
    z = np.asarray(mica.predict_image(variables, image, lm)[0], np.float32)
    print(f"MICA ({workdir}, checkpoint {step}) predicted the shape from the first frame", flush=True)
    return z


def log_tensorboard(work: Path, frames, overlays, result, hparams=None) -> None:
    """TensorBoard (<work>/tb) and metrics.jsonl of a tracked sequence (module docstring), step =
    frame index; written anew (a rerun replaces what an earlier run logged).

    frames: [T] `tracker.FrameData`; overlays: [T] `tracker.overlay` images [H, 2W, 3] (shading
    with landmarks | model colours); result: the `tracker.TrackResult`; hparams: {name: value}
    for the HParams dashboard (None: none)."""
    writer = logs.MetricWriter(str(work), resume_step=-1, hparams=hparams)
    try:
        for i in range(len(frames)):
            writer.write_scalars(i, {"track/landmark_error_px": float(result.landmark_error_px[i]),
                                     "track/photometric_error": float(result.photometric_error[i])})
        W = frames[0].image.shape[1]
        for i in np.unique(np.linspace(0, len(frames) - 1, min(len(frames), TB_FRAMES)).round().astype(int)):
            ov = np.asarray(overlays[i])
            writer.write_images(int(i), {"eval/tracked_frame": logs.comparison_grid(
                frames[i].image[None], ov[None, :, W:], ov[None, :, :W])})
    finally:
        writer.close()


def write_outputs(work: Path, result, frames, names, model, fps: float, meta: dict, renders=None,
                  hparams=None, stream: tracker.DatasetStream | None = None) -> dict:
    """Writes params/, cameras.json, the overlay, dataset/ and the TensorBoard log
    (`log_tensorboard`, with `hparams`) of a tracked sequence; returns the report's numbers
    (per-frame and mean landmark / photometric errors, focal length). stream: the
    `tracker.DatasetStream` that already wrote dataset/ during tracking (it is marked done, and
    its renders are used)."""
    (work / "params").mkdir(parents=True, exist_ok=True)
    H, W = frames[0].image.shape[:2]
    if stream is not None:
        renders = stream.renders
    renders = tracker.render_result(result, model, W, H) if renders is None else renders
    cams, overlays = {}, []
    lids = tracker.tracked_eyelids(result.params)
    for i, (p, n) in enumerate(zip(result.params, names)):
        fp = tracker.flame_parameters(p, eyelids=lids)
        dio.save_params(work / "params" / f"frame_{i:04d}", dict(fp, **{f"raw_{k}": v for k, v in p.items()}),
                        meta={"frame": n, "pose": "axis-angle [5, 3]: global (zero), neck, jaw, left eye, "
                              "right eye; the rigid pose is the camera's R, t", "units": "metres"})
        K = result.K[i]
        cams[n] = {"K": K.tolist(), "R": result.R[i].tolist(), "t": result.t[i].tolist(), "width": W,
                   "height": H, "focal": float(K[0, 0]), "principal_point": [float(K[0, 2]), float(K[1, 2])]}
        overlays.append(tracker.overlay(frames[i], renders[i]))
    (work / "cameras.json").write_text(json.dumps(cams, indent=1))
    if len(overlays) == 1:
        dio.save_image(work / "overlay.png", overlays[0])
    else:
        dio.save_video(work / "overlay.mp4", np.stack(overlays), fps=fps)
        dio.save_image(work / "overlay_first.png", overlays[0])
    if stream is None:
        tracker.write_dataset(work / "dataset", result, frames, model, meta=meta, renders=renders)
    else:
        stream.finish()
    log_tensorboard(work, frames, overlays, result, hparams)
    return dict(frames=len(frames), seconds=result.seconds,
                landmark_error_px=[float(x) for x in result.landmark_error_px],
                photometric_error=[float(x) for x in result.photometric_error],
                mean_landmark_error_px=float(np.mean(result.landmark_error_px)),
                mean_photometric_error=float(np.mean(result.photometric_error)),
                focal_px=float(result.K[0, 0, 0]))


def run(cfg, workdir, *, input: str, landmarks: str | None = None,  # noqa: A002 - the flag's name
        masks: str | None = None) -> dict:
    """Tracks `input` (a video file, an image folder, one image, or "synthetic") into `workdir`
    (`track` or `track_synthetic`; `masks`: `frame_mattes`, real input only) and returns the
    report written to report.json."""
    app.check_experiment(cfg, "track")
    if input == "synthetic":
        if masks:
            raise ValueError("--masks is for real input; synthetic sequences bring their own masks")
        if int(cfg.max_frames) or int(cfg.stride) != 1:
            raise ValueError("max_frames and stride sample the frames of real input; the synthetic sequences' "
                             "length is synthetic.n_frames (e.g. --config.synthetic.n_frames=4)")
    focal = float(cfg.tracker.focal)
    if not np.isfinite(focal) or focal < 0:
        raise ValueError(f"config field tracker.focal must be 0 (estimate the focal length) or a known focal "
                         f"length in pixels > 0, got {cfg.tracker.focal!r}")
    if input != "synthetic" and not Path(input).exists():
        raise FileNotFoundError(f"--input {input!r} does not exist (a video file, an image folder or one image)")
    if cfg.shape_init and not Path(cfg.shape_init).is_file():
        raise FileNotFoundError(f"config field shape_init: no file {cfg.shape_init!r} (an npz with 'shape')")
    # A MICA run with a checkpoint (the error names what is missing), read once, before any work.
    mica_run = mica.run.load_run(cfg.mica_workdir) if cfg.mica_workdir else None
    run_ = app.start(workdir, run_config(cfg, input, landmarks, masks))
    work = Path(workdir)
    if input == "synthetic":
        report = track_synthetic(cfg, work, mica_run=mica_run)
    else:
        report = track(cfg, work, input, landmarks, masks, mica_run=mica_run)
    run_.done(str(work))
    return report


def run_config(cfg, input: str, landmarks: str | None = None, masks: str | None = None):  # noqa: A002
    """The config a tracking workdir's config.json records: `cfg` (experiment "track") with the
    inputs (absolute paths) added as input, landmarks and masks, so that `app.start` refuses
    another experiment's folder, and refuses a rerun with other inputs or settings before any
    work (a killed run resumes with the same command)."""
    def where(path):
        return str(Path(path).resolve()) if path and path != "synthetic" else (path or "")

    c = copy.deepcopy(cfg)
    with c.unlocked():
        c.input, c.landmarks, c.masks = where(input), where(landmarks), where(masks)
    return c


def track(cfg, work: Path, input_path: str, landmarks: str | None = None, masks: str | None = None,
          mica_run=None) -> dict:
    """Tracks a video, an image folder or one image (see the module docstring); writes the
    outputs and report.json / report.md (per-frame landmark and photometric error). `mica_run`:
    `mica.run.load_run(cfg.mica_workdir)` when the caller has read it already."""
    raw, names = read_frames(input_path, int(cfg.max_frames), int(cfg.stride))
    print(f"{len(raw)} frame(s) of {raw[0].shape[1]}x{raw[0].shape[0]} from {input_path}", flush=True)
    mattes = frame_mattes(masks, raw, names, int(cfg.max_frames), int(cfg.stride))
    lms = frame_landmarks(raw, names, landmarks, iris=bool(cfg.tracker.get("iris", False)))
    frames = [tracker.frame_data(f, lm.points, lm.ibug_ids, name=n, iris=lm.iris) for f, lm, n in zip(raw, lms, names)]
    model = flame.load()
    shape_init, init = None, "mean face"
    if cfg.shape_init:
        shape_init, init = np.load(cfg.shape_init)["shape"], f"shape from {cfg.shape_init}"
    elif cfg.mica_workdir:
        shape_init, init = mica_shape(cfg.mica_workdir, raw[0], lms[0], model, mica_run), f"MICA ({cfg.mica_workdir})"
    print(f"shape initialisation: {init}; landmarks: {lms[0].source} ({len(lms[0])} points)", flush=True)
    meta = {"input": input_path, "shape_init": init,
            "masks": f"foreground masks from {masks}" if masks else "the tracked mesh's silhouette"}
    # dataset/ fills frame by frame while tracking (a live INSTA run can read it as it grows).
    stream = tracker.DatasetStream(work / "dataset", frames, model, meta=meta, mattes=mattes,
                                   eyelids=tracker.tracks_eyelids(cfg.tracker, model))
    try:
        result = tracker.track_sequence(cfg.tracker, model, frames, shape_init=shape_init,
                                        progress_dir=work / "progress", on_frame=stream.add)
    except BaseException as err:
        try:
            stream.fail(err)
        except Exception as meta_err:       # the tracker's error stays the one raised
            print(f"could not record the error in {work / 'dataset' / 'meta.json'}: {meta_err}", flush=True)
        raise
    report = write_outputs(work, result, frames, names, model, float(cfg.fps), meta=meta,
                           hparams=logs.flatten_hparams(cfg), stream=stream)
    report.update(input=input_path, shape_init=init, landmarks=lms[0].source, masks=meta["masks"])
    (work / "report.json").write_text(json.dumps(report, indent=1))
    rows = [{"frame": n, "lmk": f"{a:.2f}", "photo": f"{b:.4f}"}
            for n, a, b in zip(names, report["landmark_error_px"], report["photometric_error"])]
    table = app.markdown_table(rows, ("frame", "lmk", "photo"),
                               headers=("frame", "landmark error (px)", "photometric L1"))
    (work / "report.md").write_text(
        f"# Tracking report\n\ninput `{input_path}`, {len(frames)} frame(s), shape init: {init}, "
        f"landmarks: {lms[0].source}, dataset masks: {meta['masks']}\n\n" + table
        + f"\nfocal length {report['focal_px']:.1f} px; {result.seconds:.0f} s\n")
    print(f"landmark error {report['mean_landmark_error_px']:.2f} px, photometric "
          f"{report['mean_photometric_error']:.4f}", flush=True)
    return report


def initialisations(cfg, frames, samples, model, mica_run=None) -> dict:
    """{name: shape coefficients or None (mean face)} for the initialisations of
    cfg.synthetic.compare ("mean", "mica" (skipped without cfg.mica_workdir), "true");
    `mica_run` as in `mica_shape`."""
    inits = {}
    for name in cfg.synthetic.compare:
        if name == "mean":
            inits[name] = None
        elif name == "true":
            inits[name] = samples[0]["shape"]
        elif name == "mica":
            if not cfg.mica_workdir:
                print("  skipping the MICA initialisation: set --config.mica_workdir=<a MICA run>")
                continue
            lm = lmk_lib.from_ibug68(frames[0].landmarks)
            inits[name] = mica_shape(cfg.mica_workdir, frames[0].image, lm, model, mica_run)
        else:
            raise ValueError(f"synthetic.compare: unknown initialisation {name!r} (mean, mica, true)")
    return inits


def summarise(rows: Sequence[Mapping], known_focal: Sequence[bool]) -> list[dict]:
    """Per (focal mode, initialisation): the number of sequences and the mean of `SUMMARY_KEYS`
    over them."""
    summary = []
    for known in known_focal:
        for name in dict.fromkeys(r["init"] for r in rows):
            sel = [r for r in rows if r["init"] == name and r["known_focal"] == bool(known)]
            if sel:
                summary.append(dict(init=name, known_focal=bool(known), sequences=len(sel),
                                    **{k: float(np.mean([r[k] for r in sel])) for k in SUMMARY_KEYS}))
    return summary


_TABLE_COLUMNS = (("init", "shape init", ""), ("focal", "focal", ""),
                  ("init_shape_error_mm", "initial shape error (mm)", ".2f"),
                  ("shape_error_mm", "tracked shape error (mm)", ".2f"),
                  ("vertex_median_mm", "vertex median (mm)", ".2f"),
                  ("vertex_aligned_median_mm", "vertex median, rigidly aligned (mm)", ".2f"),
                  ("depth_rmse_mm", "depth RMSE (mm)", ".2f"), ("focal_px", "focal (px)", ".1f"),
                  ("landmark_error_px", "landmark error (px)", ".2f"), ("photometric_error", "photometric L1", ".4f"),
                  ("gaze_error_deg", "gaze error (deg)", ".1f"))


def results_table(items: Sequence[Mapping], with_sequence: bool) -> str:
    """The synthetic benchmark's Markdown table of rows or summaries (`dhjax.train.app.markdown_table`)."""
    cols = ((("sequence", "sequence", ""),) if with_sequence else ()) + _TABLE_COLUMNS
    rows = []
    for r in items:
        r = dict(r, focal="given" if r["known_focal"] else "estimated")
        rows.append({k: format(r[k], fmt) for k, _, fmt in cols})
    return app.markdown_table(rows, [k for k, _, _ in cols], headers=[h for _, h, _ in cols])


def track_synthetic(cfg, work: Path, mica_run=None) -> dict:
    """Tracks synthetic sequences with each compared initialisation (mean face, MICA, true shape;
    focal length estimated or given) and reports errors against the ground truth, per sequence
    and averaged over the sequences (report.json, report.md). The outputs (params, overlay,
    dataset) are those of the first sequence's MICA (else mean-face) track. `mica_run` as in
    `mica_shape` (read here when None and needed)."""
    if mica_run is None and cfg.mica_workdir and "mica" in tuple(cfg.synthetic.compare):
        mica_run = mica.run.load_run(cfg.mica_workdir)
    sc = cfg.synthetic
    seqs = tuple(int(q) for q in sc.sequences)
    rows, best, step_cache = [], None, {}
    # One head model for all sequences, so that compiled optimisation steps are shared.
    assets = synthetic.build_assets(None, int(sc.uv_size))
    model = synthetic.base_model(assets)
    for seq in seqs:
        t0 = time.time()
        frames, samples, _ = synthetic_sequence(cfg, seq, assets)
        true_f = float(samples[0]["K"][0, 0])
        print(f"synthetic sequence {seq}: {len(frames)} frames of {sc.width}x{sc.height}, true focal "
              f"{true_f:.1f} px ({time.time() - t0:.0f} s)", flush=True)
        inits = initialisations(cfg, frames, samples, model, mica_run)
        for known in sc.known_focal:
            for name, z in inits.items():
                tc = copy.deepcopy(cfg.tracker)
                if known:
                    tc.focal = true_f
                focal = "given" if known else "estimated"
                print(f"== sequence {seq}: {name} shape, {focal} focal", flush=True)
                result = tracker.track_sequence(tc, model, frames, shape_init=z,
                                                progress_dir=work / "progress" / f"seq{seq}_{name}_{focal}_focal",
                                                step_cache=step_cache)
                renders = tracker.render_result(result, model, int(sc.width), int(sc.height))
                ev = tracker.evaluate_synthetic(result, samples, model, renders=renders)
                ev["init_shape_error_mm"] = tracker.shape_error_mm(model, np.zeros(1) if z is None else z,
                                                                    samples[0]["shape"])
                ev.update(sequence=seq, init=name, known_focal=bool(known), seconds=result.seconds,
                          focal_px=float(result.K[0, 0, 0]), true_focal_px=true_f)
                rows.append(ev)
                print(f"   shape error {ev['init_shape_error_mm']:.2f} -> {ev['shape_error_mm']:.2f} mm, "
                      f"vertices median {ev['vertex_median_mm']:.2f} mm (rigidly aligned "
                      f"{ev['vertex_aligned_median_mm']:.2f}), depth RMSE {ev['depth_rmse_mm']:.2f} mm, "
                      f"gaze {ev['gaze_error_deg']:.1f} deg, focal {ev['focal_px']:.1f} px (true {true_f:.1f})",
                      flush=True)
                if best is None and name == ("mica" if "mica" in inits else "mean"):
                    best = result, renders, frames
    if best is None:
        raise ValueError("synthetic.sequences, compare and known_focal must each name at least one entry")
    result, renders, frames = best
    names = [f"frame_{i:04d}" for i in range(len(frames))]
    write_outputs(work, result, frames, names, model, float(cfg.fps), meta={"input": "synthetic"}, renders=renders,
                  hparams=logs.flatten_hparams(cfg))
    summary = summarise(rows, sc.known_focal)
    report = dict(sequences=seqs, rows=rows, summary=summary)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    text = (f"# Synthetic tracking benchmark\n\nsequences {list(seqs)} (seed {sc.seed}), {sc.n_frames} frames of "
            f"{sc.width}x{sc.height} each, landmark noise {sc.landmark_noise_px} px\n\n"
            f"## Mean over the {len(seqs)} sequence(s)\n\n" + results_table(summary, False)
            + "\n## Per sequence\n\n" + results_table(rows, True))
    (work / "report.md").write_text(text)
    print(text)
    return report
