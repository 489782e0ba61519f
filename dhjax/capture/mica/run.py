"""MICA runs: training (`train`), prediction for image files (`predict`), the metric evaluation
of a finished run (`evaluate`), and the files of a run folder.

A run folder (`train`) holds checkpoints/ (resumable; the state holds the selected network),
TensorBoard events and metrics.jsonl, config.json, mica_model.json (`RUN_MODEL_FILE`: encoder
architecture and head model, `write_run_model` / `read_run`), final_metrics.json (training
metrics, then val/... and test/... median/mean/std in mm of MICA and the mean face, and the
per-identity comparison) and, with calibration.enabled, mapping_calibration.npz
(`calibration.CALIBRATION_FILE`). `load_run` gives the network a run predicts with: the
calibrated one when the run calibrates, else the selected one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from dhjax import io as dio
from dhjax.capture import landmarks as lmk_lib
from dhjax.capture import metric
from dhjax.capture.mica import evaluation as bench_lib
from dhjax.capture.mica import calibration as cal_lib
from dhjax.capture.mica import crops as crops_lib
from dhjax.capture.mica import data as data_lib
from dhjax.capture.mica import landmark_net as mlm
from dhjax.capture.mica import loss as loss_lib
from dhjax.capture.mica import model as model_lib
from dhjax.capture.mica import train as train_lib
from dhjax.data import grain_pipeline
from dhjax.models import flame
from dhjax.train import app
from dhjax.train import loop

RUN_MODEL_FILE = "mica_model.json"
"""Written into a training run's workdir: the encoder architecture and the head model, so that
a run can be loaded without the encoder's weight file (`read_run`)."""
LANDMARK_SUFFIXES = (".npy", ".txt", ".pts", ".json")
"""Landmark files `predict` looks for next to an image's stem (`dhjax.capture.landmarks.load`)."""
EVAL_ROWS = ("MICA metric", "MICA scaled", "mean face metric", "mean face scaled")
"""The rows of `evaluate`'s table, in order."""
ALPHA = 0.05
"""Significance level of `evaluate`'s per-identity check."""


# ----------------------------------------------------------------------------------------------
# Run files.


def write_run_model(workdir, cfg, arch: Mapping[str, Any], model: flame.FlameModel) -> Path:
    """Writes <workdir>/mica_model.json: encoder kind, architecture and source, mapping sizes,
    head model."""
    if model_lib.arch_kind(arch) == "landmarks":
        enc = {"kind": "landmarks", "width": int(arch["width"]), "crop_size": mlm.CROP_SIZE,
               "source": "landmark heatmap network, from scratch"}
    else:
        enc = {"kind": "iresnet", "layers": [int(n) for n in arch["layers"]], "width": int(arch["width"]),
               "embedding": int(arch["embedding"]), "bn_eps": float(arch.get("bn_eps", 1e-5)),
               "crop_size": model_lib.CROP_SIZE, "source": cfg.encoder.onnx_path or "from scratch"}
    rec = {"encoder": enc,
           "mapping": {"hidden_dim": int(cfg.mapping.hidden_dim), "n_hidden": int(cfg.mapping.n_hidden)},
           "n_shape": int(cfg.n_shape), "head_model": model.name, "n_vertices": int(model.num_vertices)}
    path = Path(workdir) / RUN_MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2))
    return path


def read_run(workdir) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(config, encoder arch, model record) of a training run's workdir (config.json and
    mica_model.json). Raises FileNotFoundError naming what is missing."""
    work = Path(workdir)
    missing = [n for n in (app.CONFIG_FILE, RUN_MODEL_FILE) if not (work / n).is_file()]
    if missing:
        raise FileNotFoundError(f"'{work}' is not a MICA training run (no {', '.join(missing)}); "
                                f"train one with: python -m experiments.mica_train "
                                f"--config=configs/mica.py:tiny --workdir={work}")
    cfg = app.read_config(work)
    rec = json.loads((work / RUN_MODEL_FILE).read_text())
    e = rec["encoder"]
    if e.get("kind", "iresnet") == "landmarks":
        arch = {"kind": "landmarks", "width": int(e["width"])}
    else:
        arch = {"kind": "iresnet", "layers": tuple(int(n) for n in e["layers"]), "width": int(e["width"]),
                "embedding": int(e["embedding"]), "bn_eps": float(e["bn_eps"])}
    return cfg, arch, rec


def load_run(workdir) -> tuple[ml_collections.ConfigDict, dict, dict, int]:
    """(cfg, variables of the network the run predicts with, model record, checkpoint step) of
    a run: its calibrated network when the run calibrates its mapping (config
    calibration.enabled, `calibration.calibrated_variables`), else the selected one.

    Raises FileNotFoundError when the workdir holds no run or no checkpoint, ValueError when the
    checkpoint does not fit its config."""
    cfg, arch, rec = read_run(workdir)
    try:
        _, state, step = app.load_run(workdir, lambda c: train_lib.state_template(c, arch))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"MICA {err}; train it first with python -m experiments.mica_train "
                                f"--workdir={workdir}") from err
    if cal_lib.calibration_enabled(cfg):
        return cfg, cal_lib.calibrated_variables(workdir, state, step), rec, step
    return cfg, train_lib.best_variables(state), rec, step


def check_head_model(model: flame.FlameModel, rec: Mapping[str, Any]) -> None:
    """Raises ValueError when a run's model record (`read_run`) names a head model with another
    vertex count than `model`."""
    if int(rec["n_vertices"]) != model.num_vertices:
        raise ValueError(f"the run was trained on head model {rec['head_model']!r} with {rec['n_vertices']} "
                         f"vertices; the loaded model {model.name!r} has {model.num_vertices}")


def _load_with_model(workdir):
    cfg, variables, rec, step = load_run(workdir)
    model = flame.load()
    check_head_model(model, rec)
    return cfg, variables, rec, step, model


def load_run_or_exit(workdir):
    """`load_run` plus the head model, for the command-line programs: (cfg, variables, model
    record, checkpoint step, head model). A workdir that holds no run or no checkpoint, a
    checkpoint that does not fit its config, or a run trained on another head model prints
    'error: ...' to stderr and exits with status 2 (`dhjax.train.app.exit_on_user_error`)."""
    return app.exit_on_user_error(lambda: _load_with_model(workdir))


# ----------------------------------------------------------------------------------------------
# Training.


def encoder_setup(cfg, log: Callable[..., None] = print) -> tuple[dict, dict | None]:
    """(arch, pretrained encoder variables or None) of a config, logging what is used."""
    if cfg.encoder.get("kind", "iresnet") == "landmarks":
        arch = model_lib.encoder_arch(cfg)
        log(f"encoder: landmark heatmap network (width {arch['width']}, 68 iBUG landmarks on the "
            f"{model_lib.crop_size('landmarks')} px landmark crop) -> similarity-normalised landmark "
            f"descriptor -> mapping network; trained from scratch, the landmark loss (weight "
            f"{cfg.loss.landmark_weight}) trains the landmark network, the shape loss the mapping network")
        return arch, None
    if cfg.encoder.onnx_path:
        conf, variables = model_lib.load_encoder_weights(cfg.encoder.onnx_path)
        arch = {"kind": "iresnet", **{k: conf[k] for k in ("layers", "width", "embedding", "bn_eps")}}
        log(f"encoder: insightface ArcFace weights {cfg.encoder.onnx_path} (iresnet layers {arch['layers']}, "
            f"width {arch['width']}); fine-tuning the last {cfg.encoder.last_blocks} blocks and the head, "
            f"BatchNorm {train_lib.bn_mode(cfg)}")
        return arch, variables
    arch = model_lib.encoder_arch(cfg)
    log(f"encoder: IResNet layers {arch['layers']}, width {arch['width']}, embedding {arch['embedding']} "
        f"trained from scratch, every layer trainable, BatchNorm on batch statistics "
        f"(mode {train_lib.bn_mode(cfg)}); no ArcFace weights given (--config.encoder.onnx_path), "
        f"and none can be downloaded")
    return arch, None


def split_benchmark(model: flame.FlameModel, variables, data: Mapping[str, np.ndarray], cfg, split: str, *,
                    kind: str, log: Callable[..., None] = print) -> dict:
    """The metric benchmark of a network on one split: {"<split>/<row>/median_mm|mean_mm|std_mm",
    "<split>/per_identity_metric/wins|n|mean_diff_mm|p_mica_better"} for MICA and the mean face
    (rigid alignment, `evaluation.benchmark`, `evaluation.compare_per_identity`)."""
    log(f"metric benchmark on the {split} split ({len(data['image'])} images):")
    pred = crops_lib.predict(variables, crops_lib.crop_batch(data["image"], data["five"], kind))
    rows = bench_lib.benchmark(model, pred, data["shape"], data["identity"], seed=int(cfg.eval.seed),
                               noise_mm=float(cfg.eval.scan_noise_mm), n_points=int(cfg.eval.scan_points),
                               protocols=("metric",), log=log)
    out = {}
    for name, res in rows.items():
        for k in ("median_mm", "mean_mm", "std_mm"):
            out[f"{split}/{name.replace(' ', '_')}/{k}"] = float(res["summary"][k])
    c = bench_lib.compare_per_identity(rows, data["identity"], "metric")
    out.update({f"{split}/per_identity_metric/wins": c["wins"], f"{split}/per_identity_metric/n": c["n"],
                f"{split}/per_identity_metric/mean_diff_mm": c["mean_diff"],
                f"{split}/per_identity_metric/p_mica_better": c["p_a_better"]})
    log(f"  per identity (metric): MICA better on {c['wins']} of {c['n']}, mean difference "
        f"{c['mean_diff']:+.3f} mm, one-sided Wilcoxon p = {c['p_a_better']:.3g}")
    return out


def train(cfg, workdir) -> dict:
    """Trains MICA on synthetic image / shape pairs and benchmarks it.

    Generates (once, cached) the train / validation / test splits (and the calibration split
    with calibration.enabled), trains with model selection on the validation split
    (`dhjax.train.loop`; resumes from the workdir's checkpoints), calibrates the mapping on the
    calibration split when the config says so (`calibration.calibrate_mapping`, written to the
    workdir; rerunning on a finished run recalibrates), then measures the network the run
    predicts with and the mean face on the validation and test identities with the metric
    protocol (`split_benchmark`). Returns the merged final_metrics.json. Raises app.Interrupted
    when training was interrupted (SIGTERM; a checkpoint was written, nothing else).
    """
    app.check_experiment(cfg, "mica")
    grain_pipeline.check_loader_config(cfg.get("loader"))   # before the run starts (and data loads)
    run = app.start(workdir, cfg)
    log = run.log
    model = flame.load()
    arch, enc_vars = encoder_setup(cfg, log)
    log(app.parameter_overview(train_lib.state_template(cfg, arch)["params"]))
    calibrate = cal_lib.calibration_enabled(cfg)
    splits = data_lib.cached_splits(cfg.data, ("train", "val", "test") + (("calib",) if calibrate else ()),
                                    verbose=run.lead)
    log(f"data ready in {run.elapsed():.0f}s: " + ", ".join(
        f"{s} {len(d['image'])} images of {len(np.unique(d['identity']))} identities" for s, d in splits.items()))
    if run.lead:
        write_run_model(workdir, cfg, arch, model)
    kind = model_lib.arch_kind(arch)
    val = data_lib.eval_batch(splits["val"], jax.device_count(), kind=kind)
    method = loop.Method(*train_lib.method_functions(cfg, arch, model, encoder_variables=enc_vars, val=val),
                         render=train_lib.render_function(cfg, arch, model))
    pipeline = grain_pipeline.make_pipeline(data_lib.split_dataset(splits["train"], landmarks=kind == "landmarks"),
                                            int(cfg.batch_size), seed=int(cfg.seed), loader=cfg.get("loader"))
    t1 = time.time()
    result = loop.train(cfg, str(workdir), method, pipeline, eval_batch=val)
    best = result.state["best"]
    log(f"training: {result.steps_run} steps in {time.time() - t1:.0f}s; selected step "
        f"{int(best['step'])} (validation face error {float(best['val_mm']):.3f} mm)"
        + ("; the calibration below uses the last step's landmark network instead" if calibrate else ""))
    final = {}
    if not calibrate:
        variables = jax.device_get(train_lib.best_variables(result.state))
    else:
        state = jax.device_get(result.state)
        step = int(state["step"])
        calib = splits["calib"]
        log(f"calibrating the mapping on the landmarks of {len(calib['image'])} images of "
            f"{len(np.unique(calib['identity']))} held-out identities (heatmap network of step {step}):")
        variables, fit = cal_lib.calibrate_mapping({"params": state["params"]}, calib, model, cfg.calibration,
                                                   log=log)
        log(f"  chose ridge strength {fit['lam']:g}: cross-validated face error {fit['cv_mm'].min():.3f} mm "
            f"(mean face {fit['mean_face_mm']:.3f} mm, rigidly aligned face region)")
        if run.lead:
            cal_lib.save_calibration(workdir, fit, step)
        final.update({"calibration/lam": float(fit["lam"]), "calibration/cv_face_mm": float(fit["cv_mm"].min()),
                      "calibration/mean_face_mm": float(fit["mean_face_mm"])})
    for split in ("val", "test"):
        final.update(split_benchmark(model, variables, splits[split], cfg, split, kind=kind, log=log))
    final["selected_step"] = int(best["step"])
    final["selected_val_face_mm"] = float(best["val_mm"])
    if not run.lead:
        return final
    merged = app.merge_final_metrics(workdir, final)
    run.done(str(Path(workdir) / app.FINAL_METRICS))
    return merged


# ----------------------------------------------------------------------------------------------
# Prediction for image files.


def landmark_file(folder, stem: str) -> Path | None:
    """The landmark file <folder>/<stem>.npy|.txt|.pts|.json of an image stem, or None."""
    if not folder:
        return None
    for suffix in LANDMARK_SUFFIXES:
        p = Path(folder) / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def predict_file(path: Path, variables, model: flame.FlameModel, out: Path, landmarks_dir=None) -> dict:
    """Predicts the shape of one image file and writes <out>/<stem>.obj (neutral mesh, metres),
    <stem>.npz (shape [300], vertices [V, 3], landmarks3d [68, 3], metres) and <stem>_crop.png
    (the crop the network saw). Landmarks come from `landmark_file(landmarks_dir, stem)` when
    there is one, else from mediapipe (`dhjax.capture.landmarks.landmarks_for_image`). Returns
    {"shape" [300], "source" (where the landmarks came from)}; raises ValueError (NoFaceError
    included), OSError or ImportError before writing anything."""
    path = Path(path)
    image = dio.load_image(path)
    lm_path = landmark_file(landmarks_dir, path.stem)
    lm = lmk_lib.landmarks_for_image(image, path=path, landmarks_path=lm_path)
    z, crop = crops_lib.predict_image(variables, image, lm)
    verts = loss_lib.neutral_vertices(model, z[None])
    lmk3d = np.asarray(loss_lib.neutral_landmarks(model, verts)[0], np.float32)
    verts = np.asarray(verts[0], np.float32)
    dio.save_obj(out / f"{path.stem}.obj", verts, np.asarray(model.faces))
    np.savez(out / f"{path.stem}.npz", shape=z.astype(np.float32), vertices=verts, landmarks3d=lmk3d)
    dio.save_image(out / f"{path.stem}_crop.png", crop)
    return {"shape": z, "source": lm.source if lm_path is None else str(lm_path)}


def image_files(folder) -> list[Path]:
    """The images (`dhjax.io.IMAGE_SUFFIXES`) of a folder, sorted by name. Raises ValueError when
    the folder does not exist or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in dio.IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no {'/'.join(dio.IMAGE_SUFFIXES)} files in '{folder}'")
    return paths


def predict(paths, workdir, *, landmarks_dir=None, out=None) -> list[tuple[Path, Exception]]:
    """Predicts every image of `paths` with the run in `workdir` (`load_run_or_exit`: a bad run
    exits with status 2) into `out` (default <workdir>/predictions), printing a line per image.
    An image that fails (no face found, unreadable file, bad landmark file) is reported and
    skipped; returns the failures [(path, error)]."""
    app.quiet_library_logs()
    _, variables, rec, step, model = load_run_or_exit(workdir)
    out = Path(out or Path(workdir) / "predictions")
    out.mkdir(parents=True, exist_ok=True)
    print(f"MICA run {workdir} (checkpoint {step}, encoder {rec['encoder']['source']}): "
          f"{len(paths)} images -> {out}", flush=True)
    failed = []
    for path in paths:
        try:
            res = predict_file(path, variables, model, out, landmarks_dir)
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
    return failed


# ----------------------------------------------------------------------------------------------
# Evaluation of a finished run.


def paired_line(protocol: str, c: Mapping[str, Any]) -> str:
    """One line summarising `evaluation.compare_per_identity`'s result."""
    lo, hi = c["ci95_mean_diff"]
    return (f"{protocol}: MICA better on {c['wins']} of {c['n']} identities, mean difference "
            f"{c['mean_diff']:+.3f} mm (95% CI {lo:+.3f} .. {hi:+.3f}), one-sided Wilcoxon p = "
            f"{c['p_a_better']:.3g}")


def evaluate(workdir, out=None) -> dict:
    """The metric benchmark of a run (`load_run_or_exit`) on its test split: MICA's meshes (one
    per test image) and the mean face, aligned rigidly ("metric") and with a scale ("scaled")
    to synthetic scans (`evaluation.benchmark`), compared per identity (one-sided Wilcoxon test
    at `ALPHA`). Writes into `out` (default <workdir>/eval) results.md (table, per-identity
    comparison, checks), results.json (the same plus per-scan numbers) and
    cumulative_errors.png; returns results.json's content."""
    t0 = time.time()
    app.quiet_library_logs()
    cfg, variables, rec, step, model = load_run_or_exit(workdir)
    out = Path(out or Path(workdir) / "eval")
    test = data_lib.cached_split(cfg.data, "test")
    ids = np.unique(test["identity"])
    print(f"MICA run {workdir} (checkpoint {step}): test split of {len(test['image'])} images of "
          f"{len(ids)} identities (numbers {ids.min()}..{ids.max()})", flush=True)
    crops = crops_lib.crop_batch(test["image"], test["five"], model_lib.variables_kind(variables))
    pred = crops_lib.predict(variables, crops)
    rows = bench_lib.benchmark(model, pred, test["shape"], test["identity"], seed=int(cfg.eval.seed),
                               noise_mm=float(cfg.eval.scan_noise_mm), n_points=int(cfg.eval.scan_points),
                               log=print)
    rows = {k: rows[k] for k in EVAL_ROWS}
    summaries = {k: v["summary"] for k, v in rows.items()}
    table = metric.results_table({f"{k.rsplit(' ', 1)[0]} ({k.rsplit(' ', 1)[1]})": s for k, s in summaries.items()})
    paired = {proto: bench_lib.compare_per_identity(rows, test["identity"], proto) for proto in ("metric", "scaled")}
    checks = {
        "MICA metric median < mean face metric median":
            summaries["MICA metric"]["median_mm"] < summaries["mean face metric"]["median_mm"],
        f"MICA better than the mean face per identity (metric; one-sided Wilcoxon p < {ALPHA})":
            paired["metric"]["p_a_better"] < ALPHA,
        "mean face metric median > mean face scaled median":
            summaries["mean face metric"]["median_mm"] > summaries["mean face scaled"]["median_mm"],
    }
    out.mkdir(parents=True, exist_ok=True)
    notes = (f"Held-out synthetic identities: {len(ids)} ({len(test['image'])} images, one MICA prediction per "
             f"image; the mean face once per identity). Scans: face region of the true neutral mesh, "
             f"{cfg.eval.scan_points} points, {cfg.eval.scan_noise_mm} mm noise, random rigid motion; "
             f"errors are scan-to-mesh distances after rigid (metric) or similarity (scaled) alignment.\n")
    paired_md = "".join(f"- {paired_line(proto, c)}\n" for proto, c in paired.items())
    (out / "results.md").write_text(
        f"# MICA metric benchmark ({workdir}, checkpoint {step})\n\n{table}\n{notes}\n"
        f"Per identity (MICA's mean error over the identity's images against the mean face's; "
        f"negative = MICA better):\n\n{paired_md}\n"
        + "".join(f"- {k}: {'yes' if v else 'NO'}\n" for k, v in checks.items()))
    results = {
        "workdir": str(workdir), "checkpoint_step": int(step), "encoder": rec["encoder"]["source"],
        "n_images": int(len(test["image"])), "n_identities": int(len(ids)),
        "summary": summaries, "per_scan": {k: v["per_scan"] for k, v in rows.items()}, "per_identity": paired,
        "checks": checks}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    metric.plot_cumulative_errors(out / "cumulative_errors.png",
                                  {k: v["errors"] for k, v in rows.items()}, max_mm=6.0,
                                  title="MICA vs mean face, held-out synthetic identities")
    print(table, flush=True)
    for proto, c in paired.items():
        print(paired_line(proto, c), flush=True)
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'}", flush=True)
    print(f"done in {time.time() - t0:.0f}s: {out}/results.md, results.json, cumulative_errors.png", flush=True)
    return results
