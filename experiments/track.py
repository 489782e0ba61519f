"""Metrical face tracking: per-frame FLAME parameters, cameras, albedo and light from a video.

    python -m experiments.track --input=video.mp4 --workdir=runs/track
    python -m experiments.track --input=frames_dir/ --landmarks=lmk_dir/ --workdir=runs/track
    python -m experiments.track --input=photo.png --workdir=runs/photo
    python -m experiments.track --input=synthetic --config=configs/track.py:tiny \
        --config.mica_workdir=runs/mica --workdir=runs/track_syn

--input: a video file (anything ffmpeg decodes), a folder of images (sorted by name), one image,
or `synthetic` (a `dhjax.data.synthetic.VideoGenerator` sequence with ground truth).

Writes into the workdir: params/frame_XXXX.npz (FLAME parameters in `flame.forward`'s layout,
SH light, and the tracker's raw parameters), cameras.json (per frame OpenCV K, R, t with
x_cam = R x_flame + t, focal length and principal point), overlay.mp4 (or overlay.png for one
image: the tracked mesh over the frame, given landmarks green, fitted ones red), report.json and
report.md (landmark error in pixels and photometric error per frame; on synthetic input the
errors against ground truth for every compared initialisation), and dataset/ (frames, model
masks, cameras, parameters and rendered depth in the `dhjax.data.dataset` layout that INSTA,
GEM and SynShot inversion read), and progress/ (every frame as soon as it is tracked: a killed
run started again with the same command continues after the last finished frame).
"""

import json
import os
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax import io as dio
from dhjax.capture import landmarks as lmk_lib
from dhjax.capture import tracker
from dhjax.models import flame
from dhjax.train import loop

FLAGS = flags.FLAGS


def define_flags():
    """The command-line flags, defined only when run as a program (tests import the helpers
    below next to other experiments, whose flags would otherwise clash)."""
    config_flags.DEFINE_config_file("config", "configs/track.py", "configs/track.py[:variant]", lock_config=True)
    flags.DEFINE_string("input", None, "video file, image folder, one image, or 'synthetic'", required=True)
    flags.DEFINE_string("landmarks", None, "landmark file (one image, or [T, N, 2] for a video) or a folder "
                        "of per-frame files named like the frames; default: mediapipe")
    flags.DEFINE_string("workdir", None, "output folder", required=True)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_frames(path: str, max_frames: int = 0, stride: int = 1) -> tuple[list, list]:
    """(frames [H, W, 3] float, names) of a video file, an image folder or one image."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--input {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files = files[::stride][:max_frames or None]
        frames = [dio.load_image(f) for f in files]
        names = [f.stem for f in files]
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        frames, names = [dio.load_image(p)], [p.stem]
    else:
        video = dio.load_video(p)       # ValueError naming the file when ffmpeg cannot decode it
        idx = list(range(0, len(video), stride))[:max_frames or None]
        frames, names = [video[i] for i in idx], [f"frame_{i:04d}" for i in idx]
    out = []
    for f, n in zip(frames, names):
        if f.shape[-1] == 1:
            f = np.repeat(f, 3, -1)
        out.append(f[..., :3])
        if out[-1].shape != out[0].shape:
            raise ValueError(f"--input {path}: {n} is {out[-1].shape[:2]}, the first frame {out[0].shape[:2]}")
    return out, names


def frame_landmarks(frames, names, landmarks_arg) -> list:
    """Landmarks per frame: from --landmarks (file or folder) or mediapipe detection."""
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
        out.append(lmk_lib.detect(f, name=f"frame {i} ({n})"))
    return out


def synthetic_sequence(cfg, sequence: int | None = None, assets=None):
    """(frames, ground-truth samples, head model) of one synthetic video (default: the first of
    cfg.synthetic.sequences) with noisy projected landmarks and skin masks (face + eyes labels,
    what a face parser would give). assets: `synthetic.build_assets` output to reuse."""
    from dhjax.data import synthetic
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
    samples, frames = [], []
    for t in range(int(sc.n_frames)):
        s = gen[seq * int(sc.n_frames) + t]
        out = flame.forward(model, s["shape"][None], s["expression"][None], s["pose"][None], s["translation"][None])
        l3 = np.asarray(out.landmarks[0]) @ s["R"].T + s["t"]
        K = s["K"]
        uv = l3[:, :2] / l3[:, 2:] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
        uv = uv + rng.normal(0.0, float(sc.landmark_noise_px), uv.shape)
        mask = np.isin(s["seg"], (synthetic.LABEL["face"], synthetic.LABEL["eyes"]))
        frames.append(tracker.frame_data(s["image"], uv, np.arange(68), mask, name=f"synthetic frame {t}"))
        samples.append(s)
    return frames, samples, model


def mica_shape(workdir: str, image, lm, model) -> np.ndarray:
    """MICA's shape coefficients [300] for one image (the first frame) from a trained MICA run
    (experiments.mica_train): the crop its encoder reads, placed by the landmarks' five points,
    then the run's selected network."""
    from dhjax.capture import mica
    from experiments.mica_predict import check_head_model, load_run
    _, variables, rec, step = load_run(workdir)
    check_head_model(model, rec)
    z = np.asarray(mica.predict_image(variables, image, lm)[0], np.float32)
    print(f"MICA ({workdir}, checkpoint {step}) predicted the shape from the first frame", flush=True)
    return z


def write_outputs(work: Path, result, frames, names, model, fps: float, meta: dict, renders=None) -> dict:
    (work / "params").mkdir(parents=True, exist_ok=True)
    H, W = frames[0].image.shape[:2]
    renders = tracker.render_result(result, model, W, H) if renders is None else renders
    cams, overlays = {}, []
    for i, (p, n) in enumerate(zip(result.params, names)):
        fp = tracker.flame_parameters(p)
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
    tracker.write_dataset(work / "dataset", result, frames, model, meta=meta, renders=renders)
    return dict(frames=len(frames), seconds=result.seconds,
                landmark_error_px=[float(x) for x in result.landmark_error_px],
                photometric_error=[float(x) for x in result.photometric_error],
                mean_landmark_error_px=float(np.mean(result.landmark_error_px)),
                mean_photometric_error=float(np.mean(result.photometric_error)),
                focal_px=float(result.K[0, 0, 0]))


def main(argv):
    del argv
    cfg, work = FLAGS.config, Path(FLAGS.workdir)
    loop.quiet_library_logs()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if FLAGS.input == "synthetic":
        run_synthetic(cfg, work)
        print(f"done in {time.time() - t0:.0f} s: {work}")
        return
    raw, names = read_frames(FLAGS.input, int(cfg.max_frames), int(cfg.stride))
    print(f"{len(raw)} frame(s) of {raw[0].shape[1]}x{raw[0].shape[0]} from {FLAGS.input}", flush=True)
    lms = frame_landmarks(raw, names, FLAGS.landmarks)
    frames = [tracker.frame_data(f, lm.points, lm.ibug_ids, name=n) for f, lm, n in zip(raw, lms, names)]
    model = flame.load()
    shape_init, init = None, "mean face"
    if cfg.shape_init:
        shape_init, init = np.load(cfg.shape_init)["shape"], f"shape from {cfg.shape_init}"
    elif cfg.mica_workdir:
        shape_init, init = mica_shape(cfg.mica_workdir, raw[0], lms[0], model), f"MICA ({cfg.mica_workdir})"
    print(f"shape initialisation: {init}; landmarks: {lms[0].source} ({len(lms[0])} points)", flush=True)
    result = tracker.track_sequence(cfg.tracker, model, frames, shape_init=shape_init,
                                    progress_dir=work / "progress")
    report = write_outputs(work, result, frames, names, model, float(cfg.fps),
                           meta={"input": FLAGS.input, "shape_init": init})
    report.update(input=FLAGS.input, shape_init=init, landmarks=lms[0].source)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    (work / "report.md").write_text(
        f"# Tracking report\n\ninput `{FLAGS.input}`, {len(frames)} frame(s), shape init: {init}, "
        f"landmarks: {lms[0].source}\n\n| frame | landmark error (px) | photometric L1 |\n|---|---|---|\n"
        + "".join(f"| {n} | {a:.2f} | {b:.4f} |\n" for n, a, b in
                  zip(names, report["landmark_error_px"], report["photometric_error"]))
        + f"\nfocal length {report['focal_px']:.1f} px; {result.seconds:.0f} s\n")
    print(f"landmark error {report['mean_landmark_error_px']:.2f} px, photometric "
          f"{report['mean_photometric_error']:.4f}; done in {time.time() - t0:.0f} s: {work}")


def _initialisations(cfg, frames, samples, model) -> dict:
    """{name: shape coefficients or None (mean face)} for the compared initialisations."""
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
            inits[name] = mica_shape(cfg.mica_workdir, frames[0].image, lm, model)
        else:
            raise ValueError(f"synthetic.compare: unknown initialisation {name!r} (mean, mica, true)")
    return inits


SUMMARY_KEYS = ("init_shape_error_mm", "shape_error_mm", "vertex_median_mm", "vertex_aligned_median_mm",
                "depth_rmse_mm", "focal_px", "landmark_error_px", "photometric_error")


def run_synthetic(cfg, work: Path):
    """Tracks synthetic sequences with each compared initialisation (mean face, MICA, true shape;
    focal length estimated or given) and reports errors against the ground truth, per sequence
    and averaged over the sequences."""
    from dhjax.data import synthetic
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
        inits = _initialisations(cfg, frames, samples, model)
        for known in sc.known_focal:
            for name, z in inits.items():
                tc = ml_copy(cfg.tracker)
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
                      f"focal {ev['focal_px']:.1f} px (true {true_f:.1f})", flush=True)
                if best is None and name == ("mica" if "mica" in inits else "mean"):
                    best = result, renders, frames
    if best is None:
        raise ValueError("synthetic.sequences, compare and known_focal must each name at least one entry")
    result, renders, frames = best
    names = [f"frame_{i:04d}" for i in range(len(frames))]
    write_outputs(work, result, frames, names, model, float(cfg.fps), meta={"input": "synthetic"}, renders=renders)
    summary = []
    for known in sc.known_focal:
        for name in dict.fromkeys(r["init"] for r in rows):
            sel = [r for r in rows if r["init"] == name and r["known_focal"] == bool(known)]
            if sel:
                summary.append(dict(init=name, known_focal=bool(known), sequences=len(sel),
                                    **{k: float(np.mean([r[k] for r in sel])) for k in SUMMARY_KEYS}))

    def table(items, with_seq):
        head = ("| " + ("sequence | " if with_seq else "") + "shape init | focal | initial shape error (mm) | "
                "tracked shape error (mm) | vertex median (mm) | vertex median, rigidly aligned (mm) | "
                "depth RMSE (mm) | focal (px) | landmark error (px) | photometric L1 |\n")
        out = head + "|" + "---|" * (head.count("|") - 1) + "\n"
        for r in items:
            out += ("| " + (f"{r['sequence']} | " if with_seq else "") + f"{r['init']} | "
                    f"{'given' if r['known_focal'] else 'estimated'} | {r['init_shape_error_mm']:.2f} | "
                    f"{r['shape_error_mm']:.2f} | {r['vertex_median_mm']:.2f} | {r['vertex_aligned_median_mm']:.2f} | "
                    f"{r['depth_rmse_mm']:.2f} | {r['focal_px']:.1f} | {r['landmark_error_px']:.2f} | "
                    f"{r['photometric_error']:.4f} |\n")
        return out

    (work / "report.json").write_text(json.dumps(dict(sequences=seqs, rows=rows, summary=summary), indent=1))
    text = (f"# Synthetic tracking benchmark\n\nsequences {list(seqs)} (seed {sc.seed}), {sc.n_frames} frames of "
            f"{sc.width}x{sc.height} each, landmark noise {sc.landmark_noise_px} px\n\n"
            f"## Mean over the {len(seqs)} sequence(s)\n\n" + table(summary, False)
            + "\n## Per sequence\n\n" + table(rows, True))
    (work / "report.md").write_text(text)
    print(text)


def ml_copy(c):
    import copy
    return copy.deepcopy(c)


if __name__ == "__main__":
    os.environ.setdefault("GLOG_minloglevel", "2")
    define_flags()
    app.run(main)
