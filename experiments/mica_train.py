"""Trains MICA (one image -> metric neutral head shape) on synthetic image / shape pairs.

    python -m experiments.mica_train --config=configs/mica.py:tiny --workdir=runs/mica

Generates (once, cached) the train / validation / test splits, trains with model selection on
the validation split, then measures the selected network and the mean face on validation and
test identities with the metric (rigid) protocol of `dhjax.capture.metric`. With
calibration.enabled (the landmark encoder of configs/mica.py:tiny) it also generates the
calibration split and, after training, refits the mapping on the landmarks the trained network
finds in those held-out identities (`mica.calibrate_mapping`), written to
mapping_calibration.npz; the final benchmark, mica_predict, mica_eval and the tracker then use
the calibrated network. Rerunning the same command on a finished run recalibrates.

Writes into the workdir: checkpoints/ (resumable; the state holds the selected network),
TensorBoard events and metrics.jsonl, config.json, mica_model.json (encoder architecture and
head model, read by experiments.mica_predict / mica_eval) and final_metrics.json (training
metrics, then val/... and test/... median/mean/std in mm of MICA and the mean face).
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax.capture import mica
from dhjax.data import dataset as ds
from dhjax.models import flame
from dhjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/mica.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def encoder_setup(cfg, log=print):
    """(arch, pretrained encoder variables or None) of a config, saying what is used."""
    if cfg.encoder.get("kind", "iresnet") == "landmarks":
        arch = mica.encoder_arch(cfg)
        log(f"encoder: landmark heatmap network (width {arch['width']}, 68 iBUG landmarks on the "
            f"{mica.crop_size('landmarks')} px landmark crop) -> similarity-normalised landmark "
            f"descriptor -> mapping network; trained from scratch, the landmark loss (weight "
            f"{cfg.loss.landmark_weight}) trains the landmark network, the shape loss the mapping network")
        return arch, None
    if cfg.encoder.onnx_path:
        conf, variables = mica.load_encoder_weights(cfg.encoder.onnx_path)
        arch = {"kind": "iresnet", **{k: conf[k] for k in ("layers", "width", "embedding", "bn_eps")}}
        log(f"encoder: insightface ArcFace weights {cfg.encoder.onnx_path} (iresnet layers {arch['layers']}, "
            f"width {arch['width']}); fine-tuning the last {cfg.encoder.last_blocks} blocks and the head, "
            f"BatchNorm {mica._bn_mode(cfg)}")
        return arch, variables
    arch = mica.encoder_arch(cfg)
    log(f"encoder: IResNet layers {arch['layers']}, width {arch['width']}, embedding {arch['embedding']} "
        f"trained from scratch, every layer trainable, BatchNorm on batch statistics "
        f"(mode {mica._bn_mode(cfg)}); no ArcFace weights given (--config.encoder.onnx_path), "
        f"and none can be downloaded")
    return arch, None


def main(argv):
    del argv
    cfg, work = _CONFIG.value, _WORKDIR.value
    loop.init_distributed()
    loop.quiet_library_logs()
    lead = jax.process_index() == 0
    log = print if lead else (lambda *a, **k: None)
    t0 = time.time()
    model = flame.load()
    arch, enc_vars = encoder_setup(cfg, log)
    calibrate = mica.calibration_enabled(cfg)
    splits = mica.cached_splits(cfg.data, ("train", "val", "test") + (("calib",) if calibrate else ()),
                                verbose=lead)
    log(f"data ready in {time.time() - t0:.0f}s: " + ", ".join(
        f"{s} {len(d['image'])} images of {len(np.unique(d['identity']))} identities" for s, d in splits.items()))
    if lead:
        mica.write_run_model(work, cfg, arch, model)
    kind = mica.arch_kind(arch)
    val = mica.eval_batch(splits["val"], jax.device_count(), kind=kind)
    method = loop.Method(*mica.method_functions(cfg, arch, model, encoder_variables=enc_vars, val=val))
    pipeline = ds.Pipeline(mica.split_dataset(splits["train"], landmarks=kind == "landmarks"),
                           int(cfg.batch_size), seed=int(cfg.seed))
    t1 = time.time()
    result = loop.train(cfg, work, method, pipeline, eval_batch=val)
    if result.interrupted:
        return
    log(f"training: {result.steps_run} steps in {time.time() - t1:.0f}s; selected step "
        f"{int(result.state['best']['step'])} (validation face error {float(result.state['best']['val_mm']):.3f} mm)"
        + ("; the calibration below uses the last step's landmark network instead" if calibrate else ""))
    if not calibrate:
        variables = jax.device_get(mica.best_variables(result.state))
    else:
        state = jax.device_get(result.state)
        step = int(state["step"])
        log(f"calibrating the mapping on the landmarks of {len(splits['calib']['image'])} images of "
            f"{len(np.unique(splits['calib']['identity']))} held-out identities (heatmap network of step {step}):")
        variables, fit = mica.calibrate_mapping({"params": state["params"]}, splits["calib"], model,
                                                cfg.calibration, log=log)
        log(f"  chose ridge strength {fit['lam']:g}: cross-validated face error {fit['cv_mm'].min():.3f} mm "
            f"(mean face {fit['mean_face_mm']:.3f} mm, rigidly aligned face region)")
        if lead:
            mica.save_calibration(work, fit, step)
    final = {}
    for split in ("val", "test"):
        d = splits[split]
        log(f"metric benchmark on the {split} split ({len(d['image'])} images):")
        pred = mica.predict(variables, mica.crop_batch(d["image"], d["five"], kind))
        rows = mica.benchmark(model, pred, d["shape"], d["identity"], seed=int(cfg.eval.seed),
                              noise_mm=float(cfg.eval.scan_noise_mm), n_points=int(cfg.eval.scan_points),
                              protocols=("metric",), log=log)
        for name, res in rows.items():
            for k in ("median_mm", "mean_mm", "std_mm"):
                final[f"{split}/{name.replace(' ', '_')}/{k}"] = float(res["summary"][k])
        c = mica.compare_per_identity(rows, d["identity"], "metric")
        final.update({f"{split}/per_identity_metric/wins": c["wins"], f"{split}/per_identity_metric/n": c["n"],
                      f"{split}/per_identity_metric/mean_diff_mm": c["mean_diff"],
                      f"{split}/per_identity_metric/p_mica_better": c["p_a_better"]})
        log(f"  per identity (metric): MICA better on {c['wins']} of {c['n']}, mean difference "
            f"{c['mean_diff']:+.3f} mm, one-sided Wilcoxon p = {c['p_a_better']:.3g}")
    if lead:
        path = os.path.join(work, "final_metrics.json")
        merged = json.load(open(path)) if os.path.exists(path) else {}
        merged.update(final)
        if calibrate:
            merged.update({"calibration/lam": float(fit["lam"]), "calibration/cv_face_mm": float(fit["cv_mm"].min()),
                           "calibration/mean_face_mm": float(fit["mean_face_mm"])})
        merged["selected_step"] = int(result.state["best"]["step"])
        merged["selected_val_face_mm"] = float(result.state["best"]["val_mm"])
        with open(path, "w") as f:
            json.dump(merged, f, indent=2, sort_keys=True)
        print(f"done in {time.time() - t0:.0f}s: {path}", flush=True)


if __name__ == "__main__":
    app.run(main)
