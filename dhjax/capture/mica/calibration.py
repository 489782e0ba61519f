"""Calibration of the landmark encoder's mapping (config `calibration.enabled`).

After training, `calibrate_mapping` refits the mapping as one linear layer, z = d W + b (ridge
regression from the landmark descriptor d to the shape, its strength chosen by cross-validating
`aligned_face_errors_mm` over identities), on the landmarks the trained heatmap network finds
in the calibration split (`data.calib_identities`, identities used for nothing else). The fit is
stored in the run's workdir (`CALIBRATION_FILE`, `save_calibration`); `calibrated_variables`
combines it with the heatmap network of the last training step.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.capture.mica import landmark_net as mlm
from dhjax.capture.mica.crops import check_crops, crop_batch
from dhjax.capture.mica.data import split_spec
from dhjax.capture.mica.loss import neutral_vertices
from dhjax.capture.mica.model import OUTPUT_SCALE, check_kind, variables_kind
from dhjax.geometry import alignment
from dhjax.models import flame

_MM = 1000.0

CALIBRATION_FILE = "mapping_calibration.npz"
"""The calibrated linear mapping of a landmark-encoder run (`save_calibration`), in its workdir."""


@functools.partial(jax.jit, static_argnames=("width",))
def _descriptors(heatmap_params, crops, *, width: int):
    pts = mlm.HeatmapNet(width=width).apply({"params": heatmap_params}, crops)
    return mlm.descriptor(pts)


def landmark_descriptors(variables, crops, batch_size: int = 64) -> np.ndarray:
    """Descriptors [N, 136] (`landmark_net.descriptor`) of the 68 landmarks the landmark
    network of `variables` finds in landmark crops [N, 96, 96, 3] (uint8 or floats in [0, 1]).
    The descriptor is similarity invariant, so crop and image pixels give the same one."""
    if variables_kind(variables) != "landmarks":
        raise ValueError("landmark_descriptors needs the variables of a landmark-encoder network "
                         "(encoder.kind 'landmarks')")
    hp = variables["params"]["heatmap"]
    width = int(hp["stem"]["kernel"].shape[-1])
    crops = np.asarray(check_crops(crops, "landmarks"))
    out = [np.asarray(_descriptors(hp, jnp.asarray(crops[i:i + batch_size]), width=width))
           for i in range(0, len(crops), batch_size)]
    return np.concatenate(out).astype(np.float64)


@jax.jit
def _aligned_errors(model, face, pred_shape, gt_shape):
    a = neutral_vertices(model, pred_shape)[:, face]
    b = neutral_vertices(model, gt_shape)[:, face]
    scale, R, t = alignment.umeyama(a, b, with_scale=False)
    return _MM * jnp.mean(jnp.linalg.norm(alignment.apply_similarity(scale, R, t, a) - b, axis=-1), axis=-1)


def aligned_face_errors_mm(model: flame.FlameModel, pred_shape, gt_shape, region: str = "face") -> np.ndarray:
    """Per item [N]: mean distance (mm) between the `region` vertices of the predicted and the
    true neutral mesh after the best rigid motion (Kabsch, no scale) of the prediction onto the
    truth. A fast, scan-free stand-in for the metric (rigid) benchmark; shapes [N, S]."""
    if region not in (model.regions or {}):
        raise ValueError(f"region {region!r} is not a region of model {model.name!r}")
    face = jnp.asarray(np.flatnonzero(np.asarray(model.regions[region])))
    pred = np.asarray(pred_shape, np.float32)
    gt = np.asarray(gt_shape, np.float32)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred_shape and gt_shape: expected two [N, S] arrays, got {pred.shape} and {gt.shape}")
    chunk = 128
    out = [np.asarray(_aligned_errors(model, face, jnp.asarray(pred[i:i + chunk]), jnp.asarray(gt[i:i + chunk])))
           for i in range(0, len(pred), chunk)]
    return np.concatenate(out).astype(np.float64)


def _ridge(X, Y, lam: float):
    mu, ym = X.mean(0), Y.mean(0)
    Xc = X - mu
    W = np.linalg.solve(Xc.T @ Xc + float(lam) * np.eye(X.shape[1]), Xc.T @ (Y - ym))
    return W, ym - mu @ W


def fit_linear_mapping(X, shapes, model: flame.FlameModel, *, lambdas, folds: int = 5, groups=None,
                       log=None) -> dict:
    """Ridge regression from descriptors to shape coefficients, its strength chosen by
    cross-validation on the metric error.

    For every ridge strength in `lambdas`, `folds`-fold cross-validation over identities
    (`groups`: all images of an identity in the same fold) scores the held-out predictions by
    `aligned_face_errors_mm`; the best strength is refitted on all items.

    Args:
      X: [N, D] descriptors; shapes: [N, S] true shape coefficients; groups: [N] identity
        numbers (default: every item its own identity).
    Returns:
      {"W" [D, S], "b" [S] (z = X W + b), "lam", "lambdas" [L], "cv_mm" [L] (mean held-out
       error per strength), "mean_face_mm" (the mean face's error on the same items)}.
    """
    X = np.asarray(X, np.float64)
    Y = np.asarray(shapes, np.float64)
    lambdas = [float(v) for v in lambdas]
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X and shapes: expected [N, D] and [N, S] with the same N, got {X.shape} and {Y.shape}")
    if not lambdas or min(lambdas) <= 0:
        raise ValueError(f"lambdas: expected positive ridge strengths, got {lambdas}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("X and shapes must be finite")
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    ids = np.unique(groups)
    folds = int(folds)
    if folds < 2 or len(ids) < folds:
        raise ValueError(f"cross-validation needs at least 2 folds and one identity per fold; got {folds} "
                         f"folds for {len(ids)} identities")
    fold_of = {int(n): i % folds for i, n in enumerate(np.random.default_rng(0).permutation(ids))}
    fold = np.asarray([fold_of[int(n)] for n in groups])
    cv = []
    for lam in lambdas:
        pred = np.zeros_like(Y)
        for f in range(folds):
            W, b = _ridge(X[fold != f], Y[fold != f], lam)
            pred[fold == f] = X[fold == f] @ W + b
        cv.append(float(aligned_face_errors_mm(model, pred, Y).mean()))
        if log:
            log(f"  ridge strength {lam:g}: cross-validated face error {cv[-1]:.3f} mm")
    lam = lambdas[int(np.argmin(cv))]
    W, b = _ridge(X, Y, lam)
    mean_face = float(aligned_face_errors_mm(model, np.zeros_like(Y), Y).mean())
    return {"W": W, "b": b, "lam": lam, "lambdas": np.asarray(lambdas), "cv_mm": np.asarray(cv),
            "mean_face_mm": mean_face}


def calibration_enabled(cfg) -> bool:
    """Whether a config calibrates the landmark encoder's mapping (`calibrate_mapping`); raises
    ValueError for settings that cannot work (another encoder kind, no calibration split)."""
    cal = cfg.get("calibration", None)
    if cal is None or not bool(cal.get("enabled", False)):
        return False
    if check_kind(cfg.encoder.get("kind", "iresnet")) != "landmarks":
        raise ValueError("calibration.enabled needs the landmark encoder (encoder.kind='landmarks'); the "
                         "iresnet's mapping reads an identity embedding, which is what it memorises")
    _, count, _, _ = split_spec(cfg.data, "calib")
    if count < 2 * int(cal.folds):
        raise ValueError(f"calibration.enabled needs a calibration split (data.calib_identities) of at least "
                         f"2 x calibration.folds = {2 * int(cal.folds)} identities, got {count}")
    return True


def calibrate_mapping(variables, data: Mapping[str, np.ndarray], model: flame.FlameModel, cal_cfg,
                      log=None) -> tuple[dict, dict]:
    """Refits the landmark encoder's mapping on landmarks it finds in images of identities it
    was not trained on.

    The calibration split's identities are disjoint from train, validation and test, so the
    mapping is fitted on landmarks as the network finds them in new faces (cross-fitting). The
    mapping becomes one linear layer, z = descriptor W + b (`fit_linear_mapping`, ridge
    strength by cross-validated metric error); the heatmap network is kept as given.

    Args:
      variables: a landmark-encoder network's variables; data: the calibration split
        (`cached_split(cfg.data, "calib")`: image, five, shape, identity); cal_cfg: the config's
        `calibration` block (lambdas, folds).
    Returns:
      (variables with the linear mapping, the fit of `fit_linear_mapping` plus "n_images" and
      "n_identities").
    """
    crops = crop_batch(data["image"], data["five"], "landmarks")
    X = landmark_descriptors(variables, crops)
    fit = fit_linear_mapping(X, data["shape"], model, lambdas=tuple(cal_cfg.lambdas), folds=int(cal_cfg.folds),
                             groups=data["identity"], log=log)
    fit.update(n_images=int(len(X)), n_identities=int(len(np.unique(data["identity"]))))
    return with_linear_mapping(variables, fit["W"], fit["b"]), fit


def with_linear_mapping(variables, W, b) -> dict:
    """Landmark-encoder variables whose mapping is the single linear layer z = d W + b (d the
    [136] descriptor; W [136, S], b [S]), in `MappingNetwork`'s parameters (n_hidden = 0)."""
    W, b = np.asarray(W, np.float32), np.asarray(b, np.float32)
    mapping = {"output": {"kernel": jnp.asarray(W / OUTPUT_SCALE), "bias": jnp.asarray(b / OUTPUT_SCALE)}}
    return {"params": {"heatmap": variables["params"]["heatmap"], "mapping": mapping}, "batch_stats": {}}


def save_calibration(workdir, fit: Mapping[str, Any], step: int) -> Path:
    """Writes a calibration fit for checkpoint `step` to <workdir>/CALIBRATION_FILE (atomic)."""
    path = Path(workdir) / CALIBRATION_FILE
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, W=np.asarray(fit["W"], np.float32), b=np.asarray(fit["b"], np.float32),
                 lam=float(fit["lam"]), lambdas=np.asarray(fit["lambdas"]), cv_mm=np.asarray(fit["cv_mm"]),
                 mean_face_mm=float(fit["mean_face_mm"]), step=int(step),
                 n_images=int(fit.get("n_images", -1)), n_identities=int(fit.get("n_identities", -1)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def calibrated_variables(workdir, state, step: int) -> dict:
    """The network a calibrated run predicts with: the heatmap network of the training state's
    last step (its landmarks keep improving while the uncalibrated shape error used for model
    selection does not tell) and the calibrated linear mapping of <workdir>/CALIBRATION_FILE.
    Raises FileNotFoundError when the run has not been calibrated, ValueError when the
    calibration belongs to another checkpoint."""
    path = Path(workdir) / CALIBRATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"MICA run '{workdir}' calibrates its mapping (calibration.enabled) but has no "
                                f"{CALIBRATION_FILE}; finish it with python -m experiments.mica_train "
                                f"--workdir={workdir} (same config), which calibrates after training")
    with np.load(path) as f:
        cal = {k: f[k] for k in f.files}
    if int(cal["step"]) != int(step):
        raise ValueError(f"{path} was fitted for checkpoint {int(cal['step'])}, the latest checkpoint is {step}; "
                         f"rerun python -m experiments.mica_train --workdir={workdir} to recalibrate")
    return with_linear_mapping({"params": state["params"]}, cal["W"], cal["b"])
