"""The NoW-style metric benchmark of MICA on synthetic scans (`dhjax.capture.metric`).

Scans (`synthetic_scans`) are ground-truth neutral meshes cropped to the face region, sampled
with noise and moved by a random rigid transform, with the 7 NoW landmarks. `benchmark`
aligns MICA's meshes and the mean face (zero shape) to them rigidly ("metric") or with a scale
("scaled", NoW's protocol); `compare_per_identity` compares MICA with the mean face identity by
identity (paired Wilcoxon test).
"""

from __future__ import annotations

import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.capture import metric
from dhjax.capture.mica.loss import neutral_landmarks, neutral_vertices
from dhjax.data import synthetic
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import rotations
from dhjax.models import flame

NOW_LANDMARKS = (36, 39, 42, 45, 30, 48, 54)
"""iBUG-68 indices of the 7 landmarks the NoW benchmark aligns with: eye corners (outer and
inner of both eyes), nose tip, mouth corners."""
STREAM_SCAN = 22
"""Random stream of the synthetic benchmark scans (`dhjax.data.synthetic.key`)."""
_MM = 1000.0


def synthetic_scans(model: flame.FlameModel, shapes, *, ids=None, seed: int = 0, noise_mm: float = 0.2,
                    n_points: int = 8000, region: str = "face", rotation_max_deg: float = 20.0,
                    translation_m: float = 0.05) -> list[dict]:
    """NoW-style scans of ground-truth neutral heads.

    Each scan: `n_points` points sampled uniformly on the faces of `region` (all three vertices
    inside; NoW crops its scans to the face) of the neutral mesh of `shapes[i]`, plus isotropic
    Gaussian noise of `noise_mm`, moved by a random rotation (up to `rotation_max_deg` about a
    random axis) and translation (U(-translation_m, translation_m) per axis); landmarks: the 7
    NoW landmarks of the noise-free mesh, moved likewise.

    Args:
      model: FlameModel with regions and a landmark embedding; shapes: [N, S] coefficients;
      ids: [N] identity numbers (default 0..N-1): scan i's randomness is a pure function of
        (seed, ids[i]), so an identity gets the same scan in any subset.
    Returns:
      list of N dicts {"points" [n_points, 3], "landmarks" [7, 3]} float32 metres, plus
      "R" [3, 3], "t" [3] (the applied transform, model -> scan).
    """
    shapes = np.asarray(shapes, np.float32)
    ids = np.arange(len(shapes)) if ids is None else np.asarray(ids)
    if ids.shape != (len(shapes),):
        raise ValueError(f"ids: expected [{len(shapes)}] identity numbers, got shape {ids.shape}")
    if region not in (model.regions or {}):
        raise ValueError(f"scan region {region!r} is not a region of model {model.name!r}")
    keep = np.asarray(model.regions[region])
    faces_all = np.asarray(model.faces)
    faces = jnp.asarray(faces_all[np.all(keep[faces_all], axis=1)])
    verts = neutral_vertices(model, shapes)
    lmk = neutral_landmarks(model, verts, NOW_LANDMARKS)
    scans = []
    for i in range(len(shapes)):
        k = jax.random.split(synthetic.key(seed, STREAM_SCAN, int(ids[i])), 4)
        pts, _, _ = mesh_lib.sample_surface(k[0], verts[i], faces, int(n_points))
        pts = pts + (float(noise_mm) / _MM) * jax.random.normal(k[1], pts.shape)
        axis = jax.random.normal(k[2], (3,))
        axis = axis / jnp.linalg.norm(axis)
        u = jax.random.uniform(k[3], (4,))
        angle = np.deg2rad(float(rotation_max_deg)) * u[0]
        R = rotations.axis_angle_to_matrix(axis * angle)
        t = float(translation_m) * (2 * u[1:] - 1)
        move = lambda x: x @ R.T + t  # noqa: E731
        scans.append(dict(points=np.asarray(move(pts), np.float32), landmarks=np.asarray(move(lmk[i]), np.float32),
                          R=np.asarray(R, np.float32), t=np.asarray(t, np.float32)))
    return scans


def mesh_prediction(model: flame.FlameModel, shape) -> dict:
    """{"vertices" [V, 3], "faces" [F, 3], "landmarks" [7, 3]} (NoW landmarks) of one neutral
    prediction, shape [S] -> the pred dict `dhjax.capture.metric.evaluate` takes."""
    v = neutral_vertices(model, np.asarray(shape, np.float32)[None])
    return dict(vertices=np.asarray(v[0], np.float32), faces=np.asarray(model.faces, np.int32),
                landmarks=np.asarray(neutral_landmarks(model, v, NOW_LANDMARKS)[0], np.float32))


def benchmark(model: flame.FlameModel, pred_shapes, gt_shapes, identities, *, seed: int = 0,
              noise_mm: float = 0.2, n_points: int = 8000, protocols=("metric", "scaled"),
              log=None) -> dict:
    """MICA vs the mean face on synthetic scans (`synthetic_scans`) through
    `dhjax.capture.metric.evaluate`.

    Args:
      pred_shapes: [N, S] MICA predictions of N images; gt_shapes: [N, S] their true shapes;
      identities: [N] identity numbers (one scan per identity; every image of an identity is
        evaluated against it; the mean face once per identity).
      protocols: "metric" (rigid alignment) and/or "scaled" (with scale, NoW's protocol).
    Returns:
      {row name ("MICA metric", "MICA scaled", "mean face metric", "mean face scaled"):
       metric.evaluate's result}.
    """
    pred_shapes = np.asarray(pred_shapes, np.float32)
    gt_shapes = np.asarray(gt_shapes, np.float32)
    identities = np.asarray(identities)
    if not (len(pred_shapes) == len(gt_shapes) == len(identities)):
        raise ValueError(f"pred_shapes ({len(pred_shapes)}), gt_shapes ({len(gt_shapes)}) and identities "
                         f"({len(identities)}) must have the same length")
    ids, first = np.unique(identities, return_index=True)
    scans = synthetic_scans(model, gt_shapes[first], ids=ids, seed=seed, noise_mm=noise_mm, n_points=n_points)
    scan_of = {int(n): scans[j] for j, n in enumerate(ids)}
    mica_preds = [mesh_prediction(model, z) for z in pred_shapes]
    mica_scans = [scan_of[int(n)] for n in identities]
    mean = mesh_prediction(model, np.zeros(pred_shapes.shape[1], np.float32))
    rows = {}
    for proto in protocols:
        if proto not in ("metric", "scaled"):
            raise ValueError(f"protocol must be 'metric' or 'scaled', got {proto!r}")
        scale = proto == "scaled"
        for name, preds, sc in (("MICA", mica_preds, mica_scans), ("mean face", [mean] * len(scans), scans)):
            t0 = time.time()
            rows[f"{name} {proto}"] = metric.evaluate(preds, [dict(points=s["points"], landmarks=s["landmarks"])
                                                             for s in sc], with_scale=scale)
            if log:
                s = rows[f"{name} {proto}"]["summary"]
                log(f"  {name} {proto}: median {s['median_mm']:.3f} / mean {s['mean_mm']:.3f} / std "
                    f"{s['std_mm']:.3f} mm over {len(preds)} scans ({time.time() - t0:.0f}s)")
    return rows


def compare_per_identity(rows: Mapping[str, Mapping], identities, protocol: str = "metric", **kwargs) -> dict:
    """MICA against the mean face identity by identity (`dhjax.capture.metric.paired_comparison`).

    MICA's error of an identity is the mean over its images of their scans' mean scan-to-mesh
    error (mm); the mean face's is its one scan's. Negative differences mean MICA is better;
    'p_a_better' is the one-sided Wilcoxon p-value of "MICA's error is lower".

    Args:
      rows: `benchmark`'s result (with the "MICA <protocol>" and "mean face <protocol>" rows);
      identities: [N] the identity numbers of its N MICA predictions, as given to `benchmark`;
      protocol: "metric" or "scaled"; kwargs: passed to `paired_comparison`.
    Returns:
      `paired_comparison`'s dict plus "identities" (the identity numbers, ascending) and
      "mica_mm" / "mean_face_mm" (the per-identity errors compared).
    """
    names = (f"MICA {protocol}", f"mean face {protocol}")
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"rows: missing {missing} (has {sorted(rows)}); run benchmark with protocol {protocol!r}")
    identities = np.asarray(identities)
    mica_scans, mean_scans = rows[names[0]]["per_scan"], rows[names[1]]["per_scan"]
    ids = np.unique(identities)
    if len(mica_scans) != len(identities) or len(mean_scans) != len(ids):
        raise ValueError(f"rows hold {len(mica_scans)} MICA and {len(mean_scans)} mean-face scans; "
                         f"expected {len(identities)} and {len(ids)} for these identities")
    per_scan = np.asarray([s["mean_mm"] for s in mica_scans])
    mica_mm = np.asarray([per_scan[identities == n].mean() for n in ids])
    mean_mm = np.asarray([s["mean_mm"] for s in mean_scans])
    out = metric.paired_comparison(mica_mm, mean_mm, **kwargs)
    out.update(identities=[int(n) for n in ids], mica_mm=mica_mm.tolist(), mean_face_mm=mean_mm.tolist())
    return out
