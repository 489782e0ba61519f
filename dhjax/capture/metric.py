"""Metric face reconstruction benchmark: scan-to-mesh error after aligning a prediction to a scan.

This is the evaluation protocol MICA is measured with (the NoW challenge protocol and its metric
variant, thesis "Towards Metrical Reconstruction of Human Faces"). A method predicts a neutral
face mesh; the benchmark aligns that mesh to a ground-truth scan and reports the distance from
every scan point to the aligned predicted surface.

    res = align_to_scan(verts, faces, lmk, scan_pts, scan_lmk, with_scale=False)   # one scan
    out = evaluate(preds, scans, with_scale=False)      # many scans -> {'summary', 'per_scan', ...}
    print(results_table({"MICA (metric)": out["summary"]}))
    plot_cumulative_errors("cumulative.png", {"MICA (metric)": np.concatenate(out["errors"])})

Alignment (prediction -> scan, ``x_scan = scale * R @ x_pred + t``):
  1. Landmark initialisation: Umeyama (`dhjax.geometry.alignment.umeyama`) from the predicted
     3D landmarks to the scan's landmarks (same count and order, e.g. the 7 NoW points or the 68
     iBUG points).
  2. ICP. Every iteration takes, for every scan point, the closest point on the *currently
     transformed* predicted surface (`dhjax.ops.closest_point`, the BVH kernel where it is
     built), re-expresses that surface point in the prediction's own frame through its face and
     barycentric coordinates on the untransformed mesh, and re-solves the transform from those
     surface points to the scan points with Umeyama. This is the scan -> mesh direction only,
     as in NoW: predicted surface beyond the scan costs nothing, while scan regions the
     prediction lacks count as error.
  3. Iteration stops when the mean scan-to-mesh error changes by less than `tol` (metres)
     between two consecutive transforms, or after `iterations` transform updates. The test is
     on the error, not the transform: point-to-point ICP keeps sliding slowly along the surface
     after the error has settled (on the embedded head with 0.1 mm scan noise the default
     1e-7 m stops within ~0.02 degrees of where it would end up, changing the mean error by
     under a micrometre); pass a smaller `tol` when the transform itself matters.

Two protocols:
  * ``with_scale=False`` (rigid; the metric protocol of MICA): the prediction keeps its own
    size, so a wrongly scaled face is penalised by the error it leaves.
  * ``with_scale=True`` (similarity; the original, non-metric NoW protocol): a global scale is
    estimated in both the landmark and the ICP step, which removes any scale error.

Trimming (`trim_m`, off by default): pairs whose current distance exceeds `trim_m` metres get
zero weight in the transform solve of that iteration (scan clutter such as hair, shoulders or
holes in the prediction then cannot pull the face away). When fewer than three pairs survive, the
transform is left unchanged for that iteration. Trimming only affects the solve: the reported
errors always cover every scan point, trimmed or not.

Errors are the unsigned distances from every scan point to the closest point of the aligned
predicted surface, in metres (the returned arrays); `summarise`, `results_table` and the plot
report millimetres. Computation is float32 (the kernel's precision), sub-micrometre at head scale.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import alignment
from dhjax.ops.bvh import closest_point
from dhjax.train import app

__all__ = [
    "Alignment",
    "align_to_scan",
    "scan_to_mesh_errors",
    "summarise",
    "paired_comparison",
    "evaluate",
    "results_table",
    "plot_cumulative_errors",
]

_MM = 1000.0


class Alignment(NamedTuple):
    """Result of `align_to_scan`; the transform maps the prediction onto the scan.

    Attributes:
      scale: float, 1.0 for the rigid protocol.
      R: [3, 3] float64 rotation (det +1).
      t: [3] float64 translation, metres.
      errors: [N] float64 distance of every scan point to the aligned predicted surface, metres.
      iterations: ICP transform updates applied after the landmark initialisation.
    """

    scale: float
    R: np.ndarray
    t: np.ndarray
    errors: np.ndarray
    iterations: int


# ----------------------------------------------------------------------------------------------
# Input checks (numpy or jax arrays in, float64 / int64 numpy out).


def _float_array(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name}: cannot be read as an array ({exc})") from exc
    real = np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    if a.dtype == bool or not real:
        raise ValueError(f"{name}: expected a real-valued array, got dtype {a.dtype}")
    return a.astype(np.float64)


def _check_finite(a: np.ndarray, name: str):
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} non-finite value(s) (NaN or inf)")


def _points(x, name: str, *, min_rows: int = 1) -> np.ndarray:
    """[N, 3] finite float64, N >= min_rows."""
    a = _float_array(x, name)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [N, 3], got {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} row(s), got shape {a.shape}")
    _check_finite(a, name)
    return a


def _faces(x, name: str, n_vertices: int) -> np.ndarray:
    """[F, 3] integer indices in [0, n_vertices), F >= 1."""
    try:
        f = np.asarray(x)
    except Exception as exc:
        raise ValueError(f"{name}: cannot be read as an array ({exc})") from exc
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [F, 3], got {f.shape}")
    if f.shape[0] == 0:
        raise ValueError(f"{name}: the mesh has no faces")
    if f.dtype == bool or not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"{name}: expected integer vertex indices, got dtype {f.dtype}")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= n_vertices:
        raise ValueError(f"{name}: vertex indices must lie in [0, {n_vertices}), got [{lo}, {hi}]")
    return f.astype(np.int64)


def _landmarks(x, name: str) -> np.ndarray:
    """[L, 3], L >= 3, not all on one line (else the rotation is not determined)."""
    a = _points(x, name, min_rows=3)
    sv = np.linalg.svd(a - a.mean(axis=0), compute_uv=False)
    if not sv[1] > 1e-6 * max(sv[0], 1e-12):
        raise ValueError(f"{name}: the {a.shape[0]} landmarks are collinear or coincide; the "
                         "landmark alignment needs at least 3 points not on one line")
    return a


def _float_dtype():
    return jax.dtypes.canonicalize_dtype(np.float64)  # float32 unless jax_enable_x64


# ----------------------------------------------------------------------------------------------
# ICP.


def _padded_size(n: int) -> int:
    """Scan sizes are padded up to a few buckets per octave (<= 12.5 % extra), so a benchmark of
    many scans of different sizes compiles the ICP step a handful of times, not once per scan."""
    bucket = max(256, 2 ** (max(n - 1, 1).bit_length() - 3))
    return -(-n // bucket) * bucket


@functools.partial(jax.jit, static_argnames=("with_scale",))
def _icp_step(vertices, faces, scan, valid, scale, R, t, trim, *, with_scale: bool):
    """Errors at the current transform, and the transform re-solved from its correspondences.

    Args:
      vertices: [V, 3] prediction, own frame. faces: [F, 3] int32.
      scan: [N, 3] scan points.
      valid: [N] bool, False for padding rows (no weight in the solve, not in the mean).
      scale: [] , R: [3, 3], t: [3]: current prediction -> scan transform.
      trim: [] distance above which a pair gets zero weight in the solve (inf = no trimming).
    Returns:
      (errors [N] at the current transform, their mean over valid rows [], scale', R', t',
       n_used [] pairs that entered the solve).
    """
    hi = jax.lax.Precision.HIGHEST
    moved = scale * jnp.matmul(vertices, R.T, precision=hi) + t
    cp = closest_point(moved, faces, scan)
    err = jnp.sqrt(jnp.maximum(cp.sq_dist, 0.0))
    mean_err = jnp.sum(jnp.where(valid, err, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    tri = vertices[faces[cp.face]]  # [N, 3, 3], untransformed
    src = jnp.einsum("nk,nkc->nc", cp.bary, tri, precision=hi)
    w = (valid & (err <= trim)).astype(vertices.dtype)
    n_used = jnp.sum(w)
    s_new, R_new, t_new = alignment.umeyama(src, scan, w, with_scale=with_scale)
    keep = n_used >= 3  # too few pairs survive the trimming: keep the current transform
    s_new = jnp.where(keep, s_new, scale)
    R_new = jnp.where(keep, R_new, R)
    t_new = jnp.where(keep, t_new, t)
    return err, mean_err, s_new, R_new, t_new, n_used


def align_to_scan(pred_vertices, pred_faces, pred_landmarks, scan_points, scan_landmarks, *,
                  with_scale: bool, iterations: int = 50, tol: float = 1e-7,
                  trim_m: float | None = None) -> Alignment:
    """Aligns a predicted mesh to a scan (landmarks, then ICP) and measures scan-to-mesh errors.

    See the module docstring for the protocol.

    Args:
      pred_vertices: [V, 3] float predicted (neutral) mesh, metres.
      pred_faces: [F, 3] int vertex indices into pred_vertices.
      pred_landmarks: [L, 3] float 3D landmarks of the prediction, metres (L >= 3).
      scan_points: [N, 3] float scan points, metres.
      scan_landmarks: [L, 3] float scan landmarks in the same order as pred_landmarks, metres.
      with_scale: False = rigid (metric protocol), True = similarity (NoW protocol).
      iterations: maximum number of ICP transform updates (0 = landmark alignment only).
      tol: stop when the mean error changes by less than this between two transforms, metres.
      trim_m: optional distance (metres); farther pairs are left out of the transform solve.

    Returns:
      Alignment(scale, R [3, 3], t [3], errors [N] metres, iterations) with
      ``x_scan = scale * R @ x_pred + t``.

    Raises:
      ValueError naming the argument: wrong shapes, non-finite values, non-integer or
      out-of-range faces, landmark counts that differ, collinear landmarks, bad options.
    """
    verts = _points(pred_vertices, "pred_vertices", min_rows=3)
    faces = _faces(pred_faces, "pred_faces", verts.shape[0])
    lmk_p = _landmarks(pred_landmarks, "pred_landmarks")
    scan = _points(scan_points, "scan_points")
    lmk_s = _landmarks(scan_landmarks, "scan_landmarks")
    if lmk_p.shape[0] != lmk_s.shape[0]:
        raise ValueError(f"pred_landmarks and scan_landmarks: landmark counts differ "
                         f"({lmk_p.shape[0]} vs {lmk_s.shape[0]}); they must correspond one to one")
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations: expected an integer >= 0, got {iterations!r}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite number >= 0, got {tol!r}")
    if trim_m is not None and not (np.isfinite(trim_m) and trim_m > 0):
        raise ValueError(f"trim_m: expected None or a finite distance > 0 (metres), got {trim_m!r}")
    with_scale = bool(with_scale)

    dt = _float_dtype()
    n = scan.shape[0]
    n_pad = _padded_size(n)
    v = jnp.asarray(verts, dt)
    f = jnp.asarray(faces, jnp.int32)
    x = jnp.asarray(np.concatenate([scan, np.broadcast_to(scan[:1], (n_pad - n, 3))]), dt)
    valid = jnp.asarray(np.arange(n_pad) < n)
    trim = jnp.asarray(np.inf if trim_m is None else trim_m, dt)
    step = functools.partial(_icp_step, v, f, x, valid, with_scale=with_scale)
    s, R, t = alignment.umeyama(jnp.asarray(lmk_p, dt), jnp.asarray(lmk_s, dt),
                                with_scale=with_scale)
    cur = (s, R, t)
    err, mean, *nxt, _ = step(*cur, trim)
    mean = float(mean)
    done = 0
    while done < int(iterations):
        cur = tuple(nxt)
        done += 1
        err, new_mean, *nxt, _ = step(*cur, trim)
        new_mean = float(new_mean)
        converged = abs(new_mean - mean) < tol
        mean = new_mean
        if converged:
            break
    s, R, t = (np.asarray(a, np.float64) for a in cur)
    errors = np.asarray(err, np.float64)[:n]
    if not np.all(np.isfinite(errors)) or not np.isfinite(s):
        raise ValueError("align_to_scan: the alignment produced non-finite values (degenerate "
                         "mesh or scan?)")
    return Alignment(scale=float(s), R=R, t=t, errors=errors, iterations=done)


def scan_to_mesh_errors(scan_points, vertices, faces) -> np.ndarray:
    """Distance from every scan point to the closest point of a triangle mesh (no alignment).

    Args:
      scan_points: [N, 3] float, metres. vertices: [V, 3] float, metres. faces: [F, 3] int.
    Returns:
      [N] float64 distances, metres.
    """
    scan = _points(scan_points, "scan_points")
    verts = _points(vertices, "vertices", min_rows=3)
    f = _faces(faces, "faces", verts.shape[0])
    dt = _float_dtype()
    cp = closest_point(jnp.asarray(verts, dt), jnp.asarray(f, jnp.int32), jnp.asarray(scan, dt))
    return np.sqrt(np.maximum(np.asarray(cp.sq_dist, np.float64), 0.0))


# ----------------------------------------------------------------------------------------------
# Reporting.


def _error_list(errors, name: str = "errors") -> list[np.ndarray]:
    """One 1-D array (one scan) or a sequence of 1-D arrays (one per scan) -> list of arrays."""
    if isinstance(errors, (list, tuple)):
        items = list(errors)
        if not items:
            raise ValueError(f"{name}: empty list (no scans)")
    else:
        items = [errors]
    out = []
    single = not isinstance(errors, (list, tuple))
    for i, e in enumerate(items):
        label = name if single else f"{name}[{i}]"
        a = _float_array(e, label)
        if a.ndim != 1:
            raise ValueError(f"{label}: expected a 1-D array of per-point errors [N], got shape "
                             f"{a.shape} (pass several scans as a list of arrays)")
        if a.size == 0:
            raise ValueError(f"{label}: no errors (empty array)")
        _check_finite(a, label)
        if (a < 0).any():
            raise ValueError(f"{label}: errors are distances and must be >= 0, got min {a.min()}")
        out.append(a)
    return out


def _stats_mm(e: np.ndarray) -> dict:
    mm = e * _MM
    return {"median_mm": float(np.median(mm)), "mean_mm": float(np.mean(mm)),
            "std_mm": float(np.std(mm))}


def summarise(errors) -> dict:
    """Median, mean and standard deviation (population, ddof=0) of scan-to-mesh errors in mm.

    Args:
      errors: [N] float metres (one scan), or a list of such arrays (scans, concatenated: every
        scan point counts once, as in NoW).
    Returns:
      {'median_mm', 'mean_mm', 'std_mm', 'n_points', 'n_scans'}.
    """
    items = _error_list(errors)
    out = _stats_mm(np.concatenate(items))
    out["n_points"] = int(sum(a.size for a in items))
    out["n_scans"] = len(items)
    return out


def paired_comparison(a, b, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Is method A's error lower than method B's on the same items? A paired test.

    A difference of summary medians over a few dozen scans says little: most of the spread is
    between identities, which both methods share. This compares them item by item (e.g. per
    identity) on d = a - b.

    Args:
      a, b: [N] per-item errors of the two methods (any unit, e.g. each identity's mean
        scan-to-mesh error in mm), the same items in the same order, N >= 2, finite.
      n_boot: bootstrap resamples for the confidence interval; seed: their random seed.
    Returns:
      {'n'; 'wins' (items where a < b), 'ties'; 'mean_diff', 'median_diff' (of d, so negative
       means A is better); 'ci95_mean_diff' [2] (percentile bootstrap over items); 'p_a_better'
       (one-sided Wilcoxon signed-rank test of "d tends to be negative", exact for N <= 50
       without ties, scipy's normal approximation otherwise); 'p_two_sided'}.
    """
    from scipy import stats   # core dependency; imported here to keep the module import light

    a, b = _float_array(a, "a"), _float_array(b, "b")
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b: expected two [N] arrays of the same items, got shapes {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"a and b: need at least 2 paired items, got {a.size}")
    _check_finite(a, "a")
    _check_finite(b, "b")
    d = a - b
    rng = np.random.default_rng(int(seed))
    boot = d[rng.integers(0, d.size, (int(n_boot), d.size))].mean(1)
    if np.all(d == 0):
        p_less = p_two = 1.0
    else:
        p_less = float(stats.wilcoxon(d, alternative="less").pvalue)
        p_two = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
    return {"n": int(d.size), "wins": int(np.sum(d < 0)), "ties": int(np.sum(d == 0)),
            "mean_diff": float(d.mean()), "median_diff": float(np.median(d)),
            "ci95_mean_diff": [float(x) for x in np.percentile(boot, [2.5, 97.5])],
            "p_a_better": p_less, "p_two_sided": p_two}


def _get(d, key: str, name: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{name}: expected a dict, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{name}: missing key {key!r} (has {sorted(d)})")
    return d[key]


def evaluate(pred_list, scan_list, *, with_scale: bool, iterations: int = 50, tol: float = 1e-7,
             trim_m: float | None = None) -> dict:
    """Aligns every prediction to its scan and summarises the errors.

    Args:
      pred_list: list of dicts {'vertices' [V, 3], 'faces' [F, 3], 'landmarks' [L, 3]}, metres.
      scan_list: list of dicts {'points' [N, 3], 'landmarks' [L, 3]}, metres, same length/order.
      with_scale, iterations, tol, trim_m: as `align_to_scan`.
    Returns:
      {'summary': summarise(all errors), 'per_scan': [{'median_mm', 'mean_mm', 'std_mm'}, ...],
       'errors': [[N_i] metres, ...], 'alignments': [Alignment, ...]}.
    """
    preds, scans = list(pred_list), list(scan_list)
    if not preds:
        raise ValueError("pred_list: empty (no predictions)")
    if len(preds) != len(scans):
        raise ValueError(f"pred_list and scan_list: lengths differ ({len(preds)} vs {len(scans)})")
    alignments = []
    for i, (p, s) in enumerate(zip(preds, scans)):
        pv = _get(p, "vertices", f"pred_list[{i}]")
        pf = _get(p, "faces", f"pred_list[{i}]")
        pl = _get(p, "landmarks", f"pred_list[{i}]")
        sp = _get(s, "points", f"scan_list[{i}]")
        sl = _get(s, "landmarks", f"scan_list[{i}]")
        try:
            alignments.append(align_to_scan(pv, pf, pl, sp, sl, with_scale=with_scale,
                                            iterations=iterations, tol=tol, trim_m=trim_m))
        except ValueError as exc:
            raise ValueError(f"scan {i}: {exc}") from exc
    errors = [a.errors for a in alignments]
    return {"summary": summarise(errors), "per_scan": [_stats_mm(e) for e in errors],
            "errors": errors, "alignments": alignments}


_PROTOCOL_SUFFIX = re.compile(r"^(.*?)\s*\(([^()]*)\)\s*$")


def results_table(rows: Mapping[str, Mapping]) -> str:
    """Markdown table of benchmark results, one row per entry, numbers in mm (3 decimals).

    A name of the form 'METHOD (PROTOCOL)', e.g. 'MICA (metric)', is split into the method and
    protocol columns; otherwise the protocol comes from the dict's 'protocol' key, or is '-'.

    Args:
      rows: {name: summarise() dict (needs 'median_mm', 'mean_mm', 'std_mm')}, in display order.
    Returns:
      The table as a string (header, separator, one line per row; ends with a newline).
    """
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("rows: expected a non-empty dict {name: summarise() dict}")
    esc = lambda s: str(s).replace("|", "\\|")
    table = []
    for name, stats in rows.items():
        vals = []
        for key in ("median_mm", "mean_mm", "std_mm"):
            v = _get(stats, key, f"rows[{name!r}]")
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"rows[{name!r}]: {key} is not a number ({v!r})") from None
            vals.append(v)
        m = _PROTOCOL_SUFFIX.match(str(name))
        if m and m.group(1):
            method, protocol = m.group(1), m.group(2)
        else:
            method, protocol = str(name), stats.get("protocol", "-")
        table.append({"method": esc(method), "protocol": esc(protocol),
                      **dict(zip(("median", "mean", "std"), vals))})
    return app.markdown_table(table, ["method", "protocol", "median", "mean", "std"],
                              headers=["method", "protocol", "median (mm)", "mean (mm)", "std (mm)"],
                              floatfmt=".3f", align="llrrr")


def plot_cumulative_errors(path, curves: Mapping[str, object], *, max_mm: float = 10.0,
                           title: str = "") -> Path:
    """Writes a PNG of cumulative error curves: fraction of scan points with error <= x mm.

    Args:
      path: output .png path (parent folders are created).
      curves: {name: errors} with errors in metres, as `align_to_scan` / `evaluate` return them:
        one [N] array or a list of arrays (concatenated). One line per name, median in the legend.
      max_mm: right end of the x axis, millimetres (> 0).
      title: figure title.
    Returns:
      The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves: expected a non-empty dict {name: errors in metres}")
    if not (np.isfinite(max_mm) and max_mm > 0):
        raise ValueError(f"max_mm: expected a finite number > 0, got {max_mm!r}")
    path = Path(os.fspath(path))
    xs = np.linspace(0.0, float(max_mm), 1001)
    fig = Figure(figsize=(6.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, errs in curves.items():
        mm = np.sort(np.concatenate(_error_list(errs, f"curves[{name!r}]"))) * _MM
        frac = np.searchsorted(mm, xs, side="right") / mm.size
        ax.plot(xs, frac, label=f"{name} (median {np.median(mm):.2f} mm)")
    ax.set_xlim(0.0, float(max_mm))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("error (mm)")
    ax.set_ylabel("fraction of scan points")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
