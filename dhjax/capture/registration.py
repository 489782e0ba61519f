"""Registration of the head model (FLAME layout) to 3D scans, as a method for the shared harness.

    scans = [registration.load_scan("a.ply", unit_scale=1e-3, landmarks_path="a_lmk.txt"), ...]
    batch = registration.pad_scans(scans, n_points=4000)
    method = registration.make_method(model, cfg)          # cfg.registration, see below
    state = method.init(rng, batch)
    state, metrics = jax.jit(method.train_step)(state, batch, rng)      # repeated
    report = registration.residual_report(state, batch, model)         # per-scan mm numbers
    verts = registration.registered_vertices(state, model)             # [S, V, 3] metres

What is fitted, per scan s (all in `state["params"]`, leading axis S = scans):
  shape [S, n_shape] and expression [S, n_expression] coefficients, pose [S, 5, 3] axis-angle
  (global, neck, jaw, left eye, right eye; the global joint is held at zero because the rigid
  transform carries the head's global motion), rotation [S, 6] (6D, the first two columns of R,
  see `dhjax.geometry.rotations`), translation [S, 3] metres and, with `use_offsets`, offsets
  [S, V, 3] metres added to the posed model in the head's own frame. The registered surface is
      X_s = R_s (flame.forward(shape_s, expression_s, pose_s).vertices + offsets_s) + t_s.
  There is no scale: the head model is metric, so a scan in metres is fitted in metres.

How (the method's `train_step`, one Adam step on all scans at once):
  * correspondences are recomputed every step by chunked brute-force nearest neighbours (fixed
    shapes, jit-able) and held constant within the step (stop_gradient on indices/barycentrics);
  * scan -> model: each valid scan point finds its nearest model vertex, then the exact closest
    point on the faces around that vertex; residual = point-to-plane along that face's normal
    plus `weights.point_to_point` times the point-to-point distance;
  * model -> scan: each vertex of the face region (`model.regions[face_region]`, all vertices
    when the model has no regions) finds its nearest valid scan point; residual = point-to-plane
    along the scan normal (only; nearest samples of a sparse scan are mm away tangentially);
  * correspondences farther than `max_corr_dist_mm` or with normals more than
    acos(`min_normal_dot`) apart are dropped;
  * landmarks: squared distance of the model's landmark embedding to the scan landmarks;
  * priors: squared norms of shape, expression and (non-global) pose; for offsets a uniform
    Laplacian (smoothness) term and a small squared norm;
  * distances enter the loss in millimetres (mean of squared residuals per scan, mean over
    scans), so the weights below are unit-free numbers of order one;
  * coarse to fine: for the first `rigid_steps` steps only rotation and translation receive
    gradients (with landmarks at weight `weights.landmarks`); then shape, expression and pose
    (landmarks at `weights.landmarks_fine`); offsets from `offsets_start` on. Each group's
    learning rate warms up over `warmup_steps` from its start and all follow a cosine decay to
    `lr_final_fraction` at `steps`.
  * `init` is the landmark-based rigid initialisation: Umeyama (Kabsch, scale fixed to 1)
    from the neutral model's landmarks to the scan's; scans without landmarks get the identity
    rotation and the translation that aligns the area-weighted centroid of the neutral model
    surface with the centroid of the scan points (only good for scans roughly in the model's
    orientation: +y up, face towards +z).

Config: `make_method(model, cfg)` reads the subtree `cfg.registration` (an ml_collections
ConfigDict or any mapping); missing fields take the defaults of `default_config()`, unknown
fields are an error. Fields:
  steps (300): number of train steps the schedule is laid out for.
  rigid_steps (30): steps with only the rigid transform free.
  offsets_start (150): first step at which offsets are free (with use_offsets).
  warmup_steps (20): linear learning-rate warm-up of each group from its start.
  lr (0.02): Adam step for shape/expression coefficients (unit-free).
  lr_pose (0.005), lr_rotation (0.005): radians / 6D units.
  lr_translation (2e-4): metres.  lr_offsets (5e-5): metres.
  lr_final_fraction (0.02): the cosine decay ends at this fraction of each learning rate.
  n_shape (-1), n_expression (-1): coefficients fitted (-1 = all of the model's).
  use_offsets (False): fit regularised per-vertex offsets too.
  n_points (4000): scan points per scan used by `pad_scans` in the entry point.
  face_region ('face'): region whose vertices get the model -> scan term.
  max_corr_dist_mm (20.0), min_normal_dot (0.3): correspondence rejection.
  chunk (512): rows per block of the brute-force nearest-neighbour search.
  weights.scan_to_model (1.0), weights.model_to_scan (1.0), weights.point_to_point (0.1),
  weights.landmarks (1.0), weights.landmarks_fine (0.01), weights.shape (1e-4),
  weights.expression (1e-4), weights.pose (1e-3), weights.offsets_laplacian (10.0),
  weights.offsets_l2 (0.01).
  render_count (4), render_size (128): how many scans `render` shows, at what size (pixels).

The batch (`pad_scans`) is a dict of stacked arrays, leading axis S (scans):
  points [S, N, 3] float32 metres, normals [S, N, 3] unit, valid [S, N] bool,
  landmarks [S, L, 3] metres (zeros where absent), landmarks_valid [S, L] bool,
  and optionally gt_vertices [S, V, 3] (synthetic data: `evaluate` then reports the vertex
  error against the ground truth).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dhjax.geometry import alignment, rotations
from dhjax.io import existing_file
from dhjax.geometry import mesh as mesh_lib
from dhjax.models import flame

__all__ = [
    "Method",
    "default_config",
    "load_scan",
    "load_landmarks",
    "synthesize_scans",
    "pad_scans",
    "make_method",
    "registered_vertices",
    "residual_report",
    "export_parameters",
    "point_to_surface_distances",
]

_MM = 1000.0  # metres -> millimetres inside the loss


class Method(NamedTuple):
    """The four pure functions the training harness drives (see the module docstring).

    init(rng, batch) -> state; train_step(state, batch, rng) -> (state, metrics);
    evaluate(state, batch) -> metrics; render(state, batch) -> {name: [n, H, W, 3] in [0, 1]}.
    """

    init: Callable
    train_step: Callable
    evaluate: Callable
    render: Callable


# ----------------------------------------------------------------------------------------------
# Configuration.

_WEIGHT_DEFAULTS = dict(
    scan_to_model=1.0, model_to_scan=0.1, point_to_point=0.1, landmarks=1.0,
    landmarks_fine=0.01, shape=1e-4, expression=1e-4, pose=1e-3, offsets_laplacian=10.0,
    offsets_l2=0.01,
)
_DEFAULTS = dict(
    steps=300, rigid_steps=30, landmark_steps=30, offsets_start=150, warmup_steps=20,
    lr=0.5, eps=2.0, lr_offsets=5e-5, lr_final_fraction=0.02, n_shape=-1, n_expression=-1,
    use_offsets=False, n_points=4000, face_region="face", max_corr_dist_mm=20.0,
    min_normal_dot=0.3, chunk=512, render_count=4, render_size=128,
)


def default_config():
    """The `cfg.registration` subtree with its defaults, as an ml_collections ConfigDict."""
    import ml_collections

    c = ml_collections.ConfigDict(dict(_DEFAULTS))
    c.weights = ml_collections.ConfigDict(dict(_WEIGHT_DEFAULTS))
    return c


def _as_dict(x) -> dict:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return dict(x)


def _resolve_config(cfg) -> dict:
    """cfg (whole config with a `registration` subtree, or the subtree itself) -> plain dict."""
    if cfg is None:
        sub = {}
    else:
        root = _as_dict(cfg)
        sub = _as_dict(root["registration"]) if "registration" in root else root
    unknown = sorted(set(sub) - set(_DEFAULTS) - {"weights"})
    if unknown:
        raise ValueError(f"cfg.registration: unknown field(s) {unknown}; known: "
                         f"{sorted(_DEFAULTS) + ['weights']}")
    weights = _as_dict(sub.get("weights", {}))
    unknown = sorted(set(weights) - set(_WEIGHT_DEFAULTS))
    if unknown:
        raise ValueError(f"cfg.registration.weights: unknown field(s) {unknown}; known: "
                         f"{sorted(_WEIGHT_DEFAULTS)}")
    out = {**_DEFAULTS, **{k: v for k, v in sub.items() if k != "weights"}}
    out["weights"] = {**_WEIGHT_DEFAULTS, **weights}
    for key in ("steps", "rigid_steps", "landmark_steps", "offsets_start", "warmup_steps", "chunk", "n_points"):
        if int(out[key]) < (1 if key in ("steps", "chunk", "n_points") else 0):
            raise ValueError(f"cfg.registration.{key} must be a positive integer, got {out[key]!r}")
    for key, value in out["weights"].items():
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"cfg.registration.weights.{key} must be finite and >= 0, got {value!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Scans on disk.


def load_landmarks(path: str | os.PathLike, n_landmarks: int = 68, unit_scale: float = 1.0) -> np.ndarray:
    """Reads 3D landmarks: an `.npz` with key 'landmarks' [L, 3], an `.npy` [L, 3], or a text file
    of L rows "x y z" (whitespace or comma separated, '#' comments).

    Args:
      path: landmark file. n_landmarks: L expected (68 = iBUG order).
      unit_scale: multiplies the coordinates (e.g. 1e-3 for a file in millimetres).
    Returns:
      [L, 3] float32, metres (after unit_scale).
    Raises:
      FileNotFoundError: no such file. ValueError (naming the file): empty, unreadable, no
      'landmarks' key, wrong shape, or NaN/inf values.
    """
    path = existing_file(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: landmark file is empty (expected {n_landmarks} rows of x y z)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "landmarks" not in npz.files:
                    raise ValueError(f"{path}: no key 'landmarks' (keys: {sorted(npz.files)})")
                lmk = np.asarray(npz["landmarks"])
        elif suffix == ".npy":
            lmk = np.load(path, allow_pickle=False)
        else:
            text = path.read_text(encoding="utf-8").replace(",", " ")
            rows = [line.split("#")[0].split() for line in text.splitlines()]
            rows = [r for r in rows if r]
            if not rows:
                raise ValueError(f"{path}: landmark file is empty (expected {n_landmarks} rows of x y z)")
            if any(len(r) != 3 for r in rows):
                bad = next(i for i, r in enumerate(rows) if len(r) != 3)
                raise ValueError(f"{path}: landmark row {bad + 1} has {len(rows[bad])} values, "
                                 f"expected 3 (x y z)")
            lmk = np.asarray([[float(v) for v in r] for r in rows])
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: cannot read landmarks ({exc})") from exc
    except Exception as exc:  # zip/pickle errors of a corrupt npz/npy
        raise ValueError(f"{path}: cannot read landmarks ({type(exc).__name__}: {exc})") from exc
    if lmk.size == 0:
        raise ValueError(f"{path}: landmark array is empty (expected [{n_landmarks}, 3])")
    if lmk.shape != (n_landmarks, 3):
        raise ValueError(f"{path}: landmarks must have shape [{n_landmarks}, 3], got {lmk.shape}")
    if not np.issubdtype(lmk.dtype, np.number) or not np.all(np.isfinite(lmk)):
        raise ValueError(f"{path}: landmarks hold non-finite or non-numeric values")
    return (lmk.astype(np.float64) * unit_scale).astype(np.float32)


def _no_faces_error(path: Path) -> ValueError | None:
    """A clear error when `path` is readable but holds points without triangles."""
    import trimesh

    try:
        geom = trimesh.load(str(path), process=False)
    except Exception:
        return None
    verts = np.asarray(getattr(geom, "vertices", np.zeros((0, 3))))
    faces = getattr(geom, "faces", None)
    if len(verts) and (faces is None or len(faces) == 0):
        return ValueError(
            f"{path}: the scan has {len(verts)} vertices but no faces; registration needs a "
            f"triangle mesh (its normals come from the faces), point clouds are not supported - "
            f"mesh it first (e.g. Poisson reconstruction)")
    return None


def load_scan(path: str | os.PathLike, unit_scale: float = 1.0,
              landmarks_path: str | os.PathLike | None = None, n_landmarks: int = 68) -> dict:
    """Reads a scan (triangle mesh, OBJ/PLY/... via `dhjax.io.load_mesh`) and optional landmarks.

    Args:
      path: mesh file. unit_scale: multiplies positions to get metres (1e-3 for millimetres).
      landmarks_path: optional landmark file (see `load_landmarks`), in the same units as the mesh.
      n_landmarks: rows expected in the landmark file.
    Returns:
      dict with points [N, 3] float32 metres (the mesh vertices used by at least one
      non-degenerate face), normals [N, 3] float32 unit area-weighted vertex normals,
      faces [F, 3] int32 (indices into the original vertex list), landmarks [L, 3] float32
      metres or None, and path (str).
    Raises:
      FileNotFoundError: missing mesh or landmark file. ValueError (naming the file): unreadable
      mesh, no faces (point cloud), NaN/inf vertices, no usable vertex, bad unit_scale, bad
      landmark file.
    """
    from dhjax.io import mesh as io_mesh

    if not (np.isfinite(unit_scale) and unit_scale > 0):
        raise ValueError(f"unit_scale must be a positive finite number, got {unit_scale!r}")
    path = existing_file(path)
    try:
        verts, faces = io_mesh.load_mesh(path)
    except ValueError as exc:
        better = _no_faces_error(path)
        if better is not None:
            raise better from exc
        raise
    bad = ~np.all(np.isfinite(verts), axis=1)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} of {len(verts)} vertices are NaN or inf "
                         f"(first at index {int(np.argmax(bad))})")
    verts = (verts.astype(np.float64) * unit_scale).astype(np.float32)
    normals = np.asarray(mesh_lib.vertex_normals(jnp.asarray(verts), jnp.asarray(faces)))
    used = np.linalg.norm(normals, axis=1) > 0.5       # unreferenced / only degenerate faces: no normal
    if not used.any():
        raise ValueError(f"{path}: no vertex has a normal (all faces are degenerate)")
    landmarks = None
    if landmarks_path is not None:
        landmarks = load_landmarks(landmarks_path, n_landmarks, unit_scale)
    return dict(points=verts[used], normals=normals[used].astype(np.float32), faces=faces,
                landmarks=landmarks, path=str(path))


# ----------------------------------------------------------------------------------------------
# Synthetic scans with known ground truth.


def _random_rotations(key, n, max_angle_deg):
    k1, k2 = jax.random.split(key)
    axis = jax.random.normal(k1, (n, 3))
    axis = axis / jnp.linalg.norm(axis, axis=-1, keepdims=True)
    if max_angle_deg >= 180.0:  # uniform on SO(3): angle density (1 - cos) / pi
        u = jax.random.uniform(k2, (n, 1))
        grid = np.linspace(0.0, np.pi, 2049)
        cdf = (grid - np.sin(grid)) / np.pi
        angle = jnp.interp(u, jnp.asarray(cdf), jnp.asarray(grid))
    else:
        angle = jax.random.uniform(k2, (n, 1), maxval=np.deg2rad(max_angle_deg))
    return rotations.axis_angle_to_matrix(axis * angle)


def synthesize_scans(key, model: flame.FlameModel, n: int, noise_mm: float = 0.3,
                     points_per_scan: int = 4000, *, landmark_noise_mm: float = 1.0,
                     shape_std: float = 1.0, expression_std: float = 0.5, neck_std: float = 0.1,
                     eye_std: float = 0.05, jaw_open_max: float = 0.2,
                     rotation_max_deg: float = 180.0, translation_std: float = 0.1,
                     regions: Sequence[str] | None = None):
    """Scans of random heads of `model` with known ground truth.

    Each head: shape ~ N(0, shape_std), expression ~ N(0, expression_std) (all components),
    pose from `flame.sample_parameters` with the global joint at zero (the rigid transform carries
    the global motion), then x -> R x + t with R a random rotation of angle up to
    `rotation_max_deg` about a random axis (uniform on SO(3) at 180) and t ~ N(0, translation_std)
    metres per axis. Points: uniform on the surface (area-weighted, `mesh.sample_surface`), plus
    isotropic Gaussian noise of `noise_mm` per axis; normals: the noise-free face normals.
    Landmarks: the model's embedding on the posed surface plus N(0, landmark_noise_mm) per axis.

    Args:
      key: PRNG key. model: FlameModel with a landmark embedding. n: number of scans.
      regions: sample only faces whose three vertices lie in these regions of `model.regions`
        (a partial scan, e.g. ("face",)); None = the whole surface.
    Returns:
      (scans, gt): scans is a list of n dicts as `load_scan` gives them (faces None);
      gt holds shape [n, S], expression [n, E], pose [n, 5, 3], rotation [n, 3, 3],
      translation [n, 3], vertices [n, V, 3] (metres, scan frame), landmarks [n, L, 3]
      (noise-free) as numpy arrays.
    """
    if model.lmk_faces is None:
        raise ValueError(f"model {model.name!r} has no landmark embedding; synthetic scans need one")
    keys = jax.random.split(key, 6)
    params = flame.sample_parameters(keys[0], n, n_shape=model.num_shape,
                                     n_expression=model.num_expression, shape_std=shape_std,
                                     expression_std=expression_std, jaw_open_max=jaw_open_max,
                                     neck_std=neck_std, eye_std=eye_std, global_std=0.0)
    pose = params["pose"].at[:, 0].set(0.0)
    out = flame.forward(model, params["shape"], params["expression"], pose)
    R = _random_rotations(keys[1], n, rotation_max_deg)
    t = translation_std * jax.random.normal(keys[2], (n, 3))
    verts = jnp.einsum("nij,nvj->nvi", R, out.vertices, precision="highest") + t[:, None]
    lmk = jnp.einsum("nij,nlj->nli", R, out.landmarks, precision="highest") + t[:, None]
    faces = model.faces
    if regions is not None:
        if model.regions is None:
            raise ValueError(f"model {model.name!r} has no regions; pass regions=None")
        missing = [r for r in regions if r not in model.regions]
        if missing:
            raise ValueError(f"unknown region(s) {missing}; the model has {sorted(model.regions)}")
        keep = np.zeros(model.num_vertices, bool)
        for r in regions:
            keep |= np.asarray(model.regions[r])
        faces = faces[np.all(keep[np.asarray(model.faces)], axis=1)]

    def one(k, v):
        k1, k2 = jax.random.split(k)
        pts, fid, _ = mesh_lib.sample_surface(k1, v, faces, points_per_scan)
        nrm = mesh_lib.face_normals(v, faces)[fid]
        return pts + (noise_mm / _MM) * jax.random.normal(k2, pts.shape), nrm

    pts, nrm = jax.vmap(one)(jax.random.split(keys[3], n), verts)
    lmk_noisy = lmk + (landmark_noise_mm / _MM) * jax.random.normal(keys[4], lmk.shape)
    scans = [dict(points=np.asarray(pts[i], np.float32), normals=np.asarray(nrm[i], np.float32),
                  faces=None, landmarks=np.asarray(lmk_noisy[i], np.float32), path=f"synthetic:{i}")
             for i in range(n)]
    gt = dict(shape=np.asarray(params["shape"]), expression=np.asarray(params["expression"]),
              pose=np.asarray(pose), rotation=np.asarray(R), translation=np.asarray(t),
              vertices=np.asarray(verts), landmarks=np.asarray(lmk))
    return scans, gt


# ----------------------------------------------------------------------------------------------
# Batching.


def pad_scans(scans: Sequence[Mapping[str, Any]], n_points: int, *, seed: int = 0,
              gt_vertices=None) -> dict:
    """Stacks scans of different sizes into fixed-shape arrays.

    Scans with more than `n_points` points are subsampled without replacement by a permutation
    seeded with `seed` and the scan's index (deterministic); smaller ones are zero-padded and the
    padding marked invalid.

    Args:
      scans: dicts with points [N_i, 3], normals [N_i, 3], optional landmarks [L, 3] or None.
      n_points: N, points per scan in the batch.
      gt_vertices: optional [S, V, 3] ground-truth vertices (synthetic data), passed through.
    Returns:
      dict: points [S, N, 3] float32, normals [S, N, 3] float32, valid [S, N] bool,
      landmarks [S, L, 3] float32 (zeros where absent), landmarks_valid [S, L] bool (L = 0 when
      no scan has landmarks), and gt_vertices [S, V, 3] when given.
    """
    if not scans:
        raise ValueError("pad_scans: no scans given")
    n_points = int(n_points)
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    lmk_counts = {np.shape(s["landmarks"])[0] for s in scans if s.get("landmarks") is not None}
    if len(lmk_counts) > 1:
        raise ValueError(f"scans have different landmark counts {sorted(lmk_counts)}")
    L = lmk_counts.pop() if lmk_counts else 0
    S = len(scans)
    points = np.zeros((S, n_points, 3), np.float32)
    normals = np.zeros((S, n_points, 3), np.float32)
    valid = np.zeros((S, n_points), bool)
    lmk = np.zeros((S, L, 3), np.float32)
    lmk_valid = np.zeros((S, L), bool)
    for i, scan in enumerate(scans):
        p = np.asarray(scan["points"], np.float32)
        nrm = np.asarray(scan["normals"], np.float32)
        where = scan.get("path", f"scan {i}")
        if p.ndim != 2 or p.shape[1] != 3 or nrm.shape != p.shape:
            raise ValueError(f"{where}: points and normals must both be [N, 3], got {p.shape}, {nrm.shape}")
        if len(p) == 0:
            raise ValueError(f"{where}: the scan has no points")
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(nrm))):
            raise ValueError(f"{where}: points or normals hold NaN or inf")
        if len(p) > n_points:
            idx = np.sort(np.random.default_rng([seed, i]).permutation(len(p))[:n_points])
            p, nrm = p[idx], nrm[idx]
        points[i, :len(p)] = p
        normals[i, :len(p)] = nrm
        valid[i, :len(p)] = True
        if scan.get("landmarks") is not None:
            lmk[i] = np.asarray(scan["landmarks"], np.float32)
            lmk_valid[i] = True
    batch = dict(points=points, normals=normals, valid=valid, landmarks=lmk, landmarks_valid=lmk_valid)
    if gt_vertices is not None:
        gt_vertices = np.asarray(gt_vertices, np.float32)
        if gt_vertices.ndim != 3 or gt_vertices.shape[0] != S or gt_vertices.shape[2] != 3:
            raise ValueError(f"gt_vertices must be [S={S}, V, 3], got {gt_vertices.shape}")
        batch["gt_vertices"] = gt_vertices
    return batch


# ----------------------------------------------------------------------------------------------
# Geometry helpers: nearest neighbours and closest points on the surface.


def _vertex_face_table(faces: np.ndarray, n_vertices: int, max_faces: int = 8):
    """[V, K] faces around each vertex, K = min(max valence, max_faces), padded by repeating the
    first one; mask [V, K] marks real entries (vertices in no face have an all-False row).

    High-valence vertices (poles of fans) keep only `max_faces` of their faces; their other faces
    are reached through the neighbouring vertices when several nearest vertices are searched.
    """
    flat = faces.reshape(-1)
    valence = np.bincount(flat, minlength=n_vertices)
    K = max(min(int(valence.max()), int(max_faces)), 1)
    order = np.argsort(flat, kind="stable")
    vid = flat[order]
    start = np.cumsum(valence) - valence
    slot = np.arange(len(order)) - start[vid]
    keep = slot < K
    order, vid, slot = order[keep], vid[keep], slot[keep]
    table = np.zeros((n_vertices, K), np.int32)
    mask = np.zeros((n_vertices, K), bool)
    table[vid, slot] = order // 3
    mask[vid, slot] = True
    table = np.where(mask, table, table[:, :1])
    return table, mask


def _nearest(queries, refs, ref_valid, chunk: int):
    """Brute-force nearest neighbour of each query among the valid refs.

    queries [Q, 3], refs [R, 3], ref_valid [R] bool -> (index [Q] int32, squared distance [Q]);
    the distance is recomputed exactly from the chosen ref (see `_knn`)."""
    idx = _knn(queries, refs, ref_valid, 1, chunk)[:, 0]
    diff = queries - refs[idx]
    return idx, jnp.sum(diff * diff, -1)


def _closest_on_candidates(points, verts, faces, cand, cand_mask):
    """Closest point among candidate faces. points [N, 3], verts [V, 3], cand/cand_mask [N, K]
    -> (face [N] int32, bary [N, 3], squared distance [N]); all stop-gradient."""
    tris = verts[faces[cand]]                                          # [N, K, 3, 3]
    _, bary, d2 = mesh_lib.closest_point_on_triangle(points[:, None, :], tris)
    d2 = jnp.where(cand_mask, d2, jnp.inf)
    best = jnp.argmin(d2, axis=1)
    take = lambda a: jnp.take_along_axis(a, best[:, None], axis=1)[:, 0]
    face = take(cand)
    bary = jnp.take_along_axis(bary, best[:, None, None], axis=1)[:, 0]
    return jax.lax.stop_gradient((face, bary, take(d2)))


def point_to_surface_distances(points, verts, faces, *, k: int = 4, chunk: int = 512,
                               valid=None, vertex_faces=None):
    """Distance from points to a triangle surface.

    Without a vertex mask (`valid=None`) this is the exact distance to the whole surface, from
    the BVH closest-point op (`dhjax.ops.closest_point`; its pure-JAX brute force when the kernel
    library is not built); `k`, `chunk` and `vertex_faces` are then unused. With a vertex mask it
    is the exact point-to-triangle distance over the faces around the k nearest valid vertices
    of each point, which equals the brute-force distance whenever the closest face has a vertex
    among those k (always in practice for registration residuals; the tests check it against
    brute force).

    Args:
      points: [N, 3] metres. verts: [V, 3] metres. faces: [F, 3] int (numpy, static).
      k: nearest vertices whose faces are candidates. valid: optional [V] bool vertex mask.
      vertex_faces: optional precomputed `_vertex_face_table(faces, V)`.
    Returns:
      (distance [N] metres, face [N] int32, bary [N, 3]); no gradients (stop-gradient).
    """
    faces_np = np.asarray(faces)
    if valid is None:
        from dhjax.ops.bvh import closest_point

        out = jax.lax.stop_gradient(closest_point(verts, faces_np, points))
        return jnp.sqrt(out.sq_dist), out.face, out.bary
    V = verts.shape[0]
    table, tmask = vertex_faces if vertex_faces is not None else _vertex_face_table(faces_np, V)
    table, tmask = jnp.asarray(table), jnp.asarray(tmask)
    valid = jnp.ones((V,), bool) if valid is None else valid
    if k == 1:
        idx, _ = _nearest(points, verts, valid, chunk)
        idx = idx[:, None]
    else:
        idx = _knn(points, verts, valid, k, chunk)                      # [N, k]
    cand = table[idx].reshape(points.shape[0], -1)
    cmask = tmask[idx].reshape(points.shape[0], -1)
    face, bary, d2 = _closest_on_candidates(points, verts, jnp.asarray(faces_np), cand, cmask)
    return jnp.sqrt(d2), face, bary


def _knn(queries, refs, ref_valid, k: int, chunk: int):
    """Indices [Q, k] of the k nearest valid refs, in blocks of `chunk` queries (memory
    chunk * R); distances by |q|^2 - 2 q.r + |r|^2 after centring on the valid refs' mean."""
    centre = jnp.sum(jnp.where(ref_valid[:, None], refs, 0.0), 0) / jnp.maximum(jnp.sum(ref_valid), 1)
    r = refs - centre
    r2 = jnp.where(ref_valid, jnp.sum(r * r, -1), jnp.inf)
    Q = queries.shape[0]
    n_chunks = -(-Q // chunk)
    q = jnp.pad(queries - centre, ((0, n_chunks * chunk - Q), (0, 0))).reshape(n_chunks, chunk, 3)

    def block(qb):
        d2 = r2[None, :] - 2.0 * jnp.matmul(qb, r.T, precision="highest")
        return jax.lax.top_k(-d2, k)[1].astype(jnp.int32)

    return jax.lax.map(block, q).reshape(-1, k)[:Q]


def _brute_force_distances(points, verts, faces, chunk: int = 64):
    """Exact distance [N] from points [N, 3] to the surface (verts [V, 3], faces [F, 3]) by
    testing every face; slow (N * F triangle tests), the oracle of the tests."""
    tris = verts[jnp.asarray(faces)]                                    # [F, 3, 3]
    N = points.shape[0]
    n_chunks = -(-N // chunk)
    p = jnp.pad(points, ((0, n_chunks * chunk - N), (0, 0))).reshape(n_chunks, chunk, 3)

    def block(pb):
        _, _, d2 = mesh_lib.closest_point_on_triangle(pb[:, None, :], tris[None])
        return jnp.min(d2, axis=1)

    return jnp.sqrt(jax.lax.map(block, p).reshape(-1)[:N])


# ----------------------------------------------------------------------------------------------
# The registered surface.


def _params_of(params_or_state) -> Mapping[str, Any]:
    if isinstance(params_or_state, Mapping) and "params" in params_or_state:
        return params_or_state["params"]
    return params_or_state


def _rigid(params):
    return rotations.rotation_6d_to_matrix(params["rotation"]), params["translation"]


def _flame_pose(model, params):
    """The FLAME pose [S, 5, 3] and a translation [S, 3] that realise the head-centred
    parameterisation: the global joint turns by the inverse of the neck rotation and the
    translation cancels the resulting shift, so the head (everything skinned to the neck and its
    children) keeps the pose given by the rigid transform while the neck pose only turns the neck
    below it. `params["pose"][:, 0]` is ignored (held at zero by the method)."""
    pose = params["pose"]
    neck = pose[:, 1]
    flame_pose = pose.at[:, 0].set(-neck)
    coeffs_shape = jnp.concatenate([jnp.ones((pose.shape[0], 1)), _pad(params["shape"], model.num_shape),
                                    _pad(params["expression"], model.num_expression)], 1)
    v_shaped = jnp.einsum("bk,kvc->bvc", coeffs_shape, model.blend_basis, precision="highest")
    joints = jnp.einsum("jv,bvc->bjc", model.j_regressor, v_shaped, precision="highest")
    arm = joints[:, 1] - joints[:, 0]
    R0 = rotations.axis_angle_to_matrix(-neck)
    shift = arm - jnp.einsum("bij,bj->bi", R0, arm, precision="highest")
    return flame_pose, shift


def _pad(x, n):
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))


def _model_space(model, params):
    """Posed vertices in the head's own frame [S, V, 3] and landmarks [S, L, 3] (or None)."""
    flame_pose, shift = _flame_pose(model, params)
    out = flame.forward(model, params["shape"], params["expression"], flame_pose, shift)
    verts = out.vertices
    if "offsets" in params:
        verts = verts + params["offsets"]
    lmk = None
    if model.lmk_faces is not None:
        lmk = flame.embed_landmarks(verts, model.faces, model.lmk_faces, model.lmk_bary)
    return verts, lmk


def _to_scan(R, t, x):
    return jnp.einsum("sij,snj->sni", R, x, precision="highest") + t[:, None]


def registered_vertices(params_or_state, model: flame.FlameModel):
    """The registered surface in each scan's frame.

    Args:
      params_or_state: the method's state (a dict with 'params') or its params dict.
      model: the FlameModel the method was made with.
    Returns:
      [S, V, 3] float32 metres.
    """
    params = _params_of(params_or_state)
    R, t = _rigid(params)
    verts, _ = _model_space(model, params)
    return _to_scan(R, t, verts)


def export_parameters(params_or_state) -> dict:
    """Per-scan parameters as numpy arrays for writing (e.g. `dhjax.io.save_params`):
    shape [S, n_shape], expression [S, n_expr], pose [S, 5, 3] axis-angle, rotation [S, 3, 3]
    (matrix), rotation_6d [S, 6], translation [S, 3] metres, offsets [S, V, 3] when fitted."""
    params = _params_of(params_or_state)
    out = {k: np.asarray(v) for k, v in params.items() if k != "rotation"}
    out["rotation_6d"] = np.asarray(params["rotation"])
    out["rotation"] = np.asarray(rotations.rotation_6d_to_matrix(params["rotation"]))
    return out


def residual_report(params_or_state, batch: Mapping[str, Any], model: flame.FlameModel, *,
                    k: int = 4, chunk: int = 512) -> dict:
    """Per-scan distance of every valid scan point to the registered surface.

    Exact point-to-surface distances (`point_to_surface_distances`, BVH closest points).

    Args:
      params_or_state: state or params (as `registered_vertices`). batch: `pad_scans` output.
      model: the FlameModel the method was made with.
    Returns:
      dict of numpy arrays [S]: median_mm, mean_mm, p90_mm, max_mm, n_points (int).
    """
    verts = registered_vertices(params_or_state, model)
    faces = np.asarray(model.faces)
    table = _vertex_face_table(faces, model.num_vertices)
    dist = jax.vmap(lambda p, v: point_to_surface_distances(
        p, v, faces, k=k, chunk=chunk, vertex_faces=table)[0])(jnp.asarray(batch["points"]), verts)
    dist = np.asarray(dist) * _MM
    valid = np.asarray(batch["valid"])
    rows = []
    for d, m in zip(dist, valid):
        d = d[m]
        rows.append((np.median(d), np.mean(d), np.percentile(d, 90), np.max(d), d.size))
    cols = list(zip(*rows))
    return dict(median_mm=np.asarray(cols[0]), mean_mm=np.asarray(cols[1]),
                p90_mm=np.asarray(cols[2]), max_mm=np.asarray(cols[3]),
                n_points=np.asarray(cols[4], np.int64))


# ----------------------------------------------------------------------------------------------
# The method.


def _uniform_laplacian(faces: np.ndarray, n_vertices: int):
    """Neighbour table [V, K] (padded with the vertex itself) and 1/degree [V] of the mesh graph."""
    edges, _ = mesh_lib.edge_adjacency(faces)
    both = np.concatenate([edges, edges[:, ::-1]], 0)
    deg = np.bincount(both[:, 0], minlength=n_vertices)
    K = max(int(deg.max()), 1)
    order = np.argsort(both[:, 0], kind="stable")
    src, dst = both[order, 0], both[order, 1]
    start = np.cumsum(deg) - deg
    slot = np.arange(len(src)) - start[src]
    table = np.tile(np.arange(n_vertices, dtype=np.int32)[:, None], (1, K))
    table[src, slot] = dst
    return table, (1.0 / np.maximum(deg, 1)).astype(np.float32)


def _body_layout(n_shape, n_expr):
    """Slices of the per-scan vector u = [omega (3), t (3), pose of joints 1..4 (12), shape,
    expression] the optimiser works on (omega, t: rigid motion in the head's own frame)."""
    sizes = dict(omega=3, t=3, pose=12, shape=n_shape, expression=n_expr)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out, start


def _body_hessians(model, n_shape, n_expr, face_idx, w):
    """Gauss-Newton Hessians of the loss in u (see `_body_layout`) at the neutral head.

    The Jacobian of the vertices (and landmarks) in u is taken at u = 0 in the head's frame, which
    is where every rigid pose looks the same: the loss is invariant to moving head and scan
    together, so a perturbation of the rotation and translation in the head's frame has the same
    Hessian for any scan pose. Terms: scan -> model (area-weighted mean squared normal
    displacement, plus the full displacement at the point-to-point weight), model -> scan (face
    region, normal displacement), landmarks, and the priors; distances in mm, as in the loss.

    Returns (H_rigid [D, D] for the rigid stage: only the 6 rigid rows/columns, landmarks at
    weights.landmarks; H_all [D, D]: everything, landmarks at weights.landmarks_fine).
    """
    layout, D = _body_layout(n_shape, n_expr)

    def geometry(u):
        params = dict(shape=u[None, layout["shape"]], expression=u[None, layout["expression"]],
                      pose=jnp.concatenate([jnp.zeros((1, 1, 3)), u[layout["pose"]].reshape(1, 4, 3)], 1))
        verts, lmk = _model_space(model, params)
        R = rotations.axis_angle_to_matrix(u[layout["omega"]])
        move = lambda x: x @ R.T + u[layout["t"]]
        return move(verts[0]), (None if lmk is None else move(lmk[0]))

    u0 = jnp.zeros((D,))
    jv, jl = jax.jacfwd(geometry)(u0)                     # [V, 3, D], [L, 3, D]
    verts, _ = geometry(u0)
    faces = model.faces
    normals = mesh_lib.vertex_normals(verts, faces)
    face_area = mesh_lib.face_areas(verts, faces)
    vert_area = jnp.zeros(verts.shape[0]).at[faces.reshape(-1)].add(jnp.repeat(face_area, 3) / 3.0)
    wa = vert_area / jnp.sum(vert_area)
    jv = jv * _MM
    jn = jnp.einsum("vcd,vc->vd", jv, normals, precision="highest")
    hi = "highest"
    g_normal = jnp.einsum("vd,ve,v->de", jn, jn, wa, precision=hi)
    g_full = jnp.einsum("vcd,vce,v->de", jv, jv, wa, precision=hi)
    jf = jn[face_idx]
    g_face = jnp.einsum("vd,ve->de", jf, jf, precision=hi) / max(len(face_idx), 1)
    g_data = w["scan_to_model"] * (g_normal + w["point_to_point"] * g_full) + w["model_to_scan"] * g_face
    g_lmk = jnp.zeros((D, D))
    if jl is not None:
        jl = jl * _MM
        g_lmk = jnp.einsum("lcd,lce->de", jl, jl, precision=hi) / jl.shape[0]
    prior = np.zeros(D)
    prior[layout["pose"]] = w["pose"]
    prior[layout["shape"]] = w["shape"]
    prior[layout["expression"]] = w["expression"]
    H_all = 2.0 * np.asarray(g_data + w["landmarks_fine"] * g_lmk, np.float64) + 2.0 * np.diag(prior)
    H_rigid = np.zeros((D, D))
    H_rigid[:6, :6] = 2.0 * np.asarray(g_data + w["landmarks"] * g_lmk, np.float64)[:6, :6]
    return H_rigid, H_all


def _inverse_sqrt(H):
    """Symmetric H^(-1/2) on H's range (eigenvalues below 1e-9 of the largest are left out)."""
    evals, evecs = np.linalg.eigh(H)
    keep = evals > 1e-9 * max(float(evals.max()), 1e-30)
    inv = np.where(keep, 1.0 / np.sqrt(np.where(keep, evals, 1.0)), 0.0)
    return jnp.asarray((evecs * inv) @ evecs.T, jnp.float32)


class WhitenedAdamState(NamedTuple):
    count: jax.Array      # [] int32 steps taken
    mu: jax.Array         # [S, D] first moment in whitened coordinates
    nu: jax.Array         # [S, D] second moment


def _whitened_adam(P_rigid, P_all, rigid_steps, schedule, n_shape, n_expr, eps, b1=0.9, b2=0.999):
    """Adam on the whitened per-scan vector z = P^-1 u of `_body_layout` (optax transformation
    over the params dict; leaves other than the body's are left to another transformation).

    Gradients are mapped to u: rotation (6D) gradients to a rotation vector in the head's frame
    (R -> R exp(omega)), translation gradients to the head's frame; then g_z = P g_u, an Adam step
    in z, and back: du = P dz, the rotation updated as R exp(domega) (written as a 6D difference,
    so the stored 6D stays orthonormal), the translation by R dt. P = H^(-1/2) of the rigid-only
    Hessian for the first `rigid_steps` steps (so nothing else moves), then of the full one; the
    moments restart at the switch. A large `eps` (against gradients in z, which are O(loss / mm))
    makes small steps plain momentum gradient descent with step lr / eps, while Adam's
    normalisation caps the early large ones at about lr.
    """
    layout, D = _body_layout(n_shape, n_expr)
    basis = jnp.asarray(np.stack([np.cross(np.eye(3)[k], -np.eye(3)) for k in range(3)]))  # [3,3,3]: [e_k]x

    def init_fn(params):
        S = params["shape"].shape[0]
        z = jnp.zeros((S, D), jnp.float32)
        return WhitenedAdamState(count=jnp.zeros((), jnp.int32), mu=z, nu=z)

    def update_fn(updates, state, params=None):
        R = rotations.rotation_6d_to_matrix(params["rotation"])            # [S, 3, 3]
        dR = jnp.einsum("sij,kjl->skil", R, basis)                          # d(R exp w)/dw_k
        d6 = jnp.concatenate([dR[..., :, 0], dR[..., :, 1]], -1)           # [S, 3, 6]
        g_omega = jnp.einsum("skd,sd->sk", d6, updates["rotation"])
        g_t = jnp.einsum("sji,sj->si", R, updates["translation"])         # R^T g
        g_u = jnp.concatenate([g_omega, g_t, updates["pose"][:, 1:].reshape(-1, 12),
                               updates["shape"], updates["expression"]], -1)
        count = state.count
        rigid = count < rigid_steps
        P = jnp.where(rigid, P_rigid, P_all)
        restart = count == rigid_steps
        mu = jnp.where(restart, 0.0, state.mu)
        nu = jnp.where(restart, 0.0, state.nu)
        t_stage = (jnp.where(rigid, count, count - rigid_steps) + 1).astype(jnp.float32)
        g_z = g_u @ P
        mu = b1 * mu + (1 - b1) * g_z
        nu = b2 * nu + (1 - b2) * g_z * g_z
        m_hat = mu / (1 - b1 ** t_stage)
        v_hat = nu / (1 - b2 ** t_stage)
        d_z = -schedule(count) * m_hat / (jnp.sqrt(v_hat) + eps)
        d_u = d_z @ P
        R_new = R @ rotations.axis_angle_to_matrix(d_u[:, layout["omega"]])
        out = dict(updates)
        out["rotation"] = rotations.matrix_to_rotation_6d(R_new) - params["rotation"]
        out["translation"] = jnp.einsum("sij,sj->si", R, d_u[:, layout["t"]])
        out["pose"] = jnp.concatenate([jnp.zeros_like(updates["pose"][:, :1]),
                                       d_u[:, layout["pose"]].reshape(-1, 4, 3)], 1)
        out["shape"] = d_u[:, layout["shape"]]
        out["expression"] = d_u[:, layout["expression"]]
        return out, WhitenedAdamState(count=count + 1, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _cosine(step, steps, final):
    x = jnp.clip(step / steps, 0.0, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * x))


def make_method(model: flame.FlameModel, cfg) -> Method:
    """Builds the registration method for the training harness.

    Args:
      model: FlameModel (with a landmark embedding for landmark terms and landmark init; with
        `regions` for the face-region model -> scan term, else all vertices are used).
      cfg: the whole experiment config with a `registration` subtree (or the subtree itself, or
        None for all defaults); see the module docstring for the fields.
    Returns:
      Method(init, train_step, evaluate, render); every function is pure and jit-able with
      fixed shapes. state = {'params': {...}, 'opt_state': optax state, 'step': int32 []}.
    """
    c = _resolve_config(cfg)
    w = c["weights"]
    faces_np = np.asarray(model.faces)
    V = model.num_vertices
    n_shape = model.num_shape if int(c["n_shape"]) < 0 else int(c["n_shape"])
    n_expr = model.num_expression if int(c["n_expression"]) < 0 else int(c["n_expression"])
    if not (0 <= n_shape <= model.num_shape and 0 <= n_expr <= model.num_expression):
        raise ValueError(f"cfg.registration n_shape={n_shape}, n_expression={n_expr} exceed the "
                         f"model's {model.num_shape} / {model.num_expression}")
    if model.regions is not None and c["face_region"] in model.regions:
        face_idx = np.nonzero(np.asarray(model.regions[c["face_region"]]))[0].astype(np.int32)
    elif model.regions is not None and c["face_region"]:
        raise ValueError(f"cfg.registration.face_region={c['face_region']!r} is not a region of "
                         f"the model (regions: {sorted(model.regions)})")
    else:
        face_idx = np.arange(V, dtype=np.int32)
    vf_table, vf_mask = (jnp.asarray(a) for a in _vertex_face_table(faces_np, V))
    faces = jnp.asarray(faces_np)
    face_idx = jnp.asarray(face_idx)
    n_lmk_model = 0 if model.lmk_faces is None else int(model.lmk_faces.shape[0])
    use_offsets = bool(c["use_offsets"])
    if use_offsets:
        lap_table, lap_inv_deg = (jnp.asarray(a) for a in _uniform_laplacian(faces_np, V))
    chunk = int(c["chunk"])
    max_d2 = (float(c["max_corr_dist_mm"]) / _MM) ** 2
    min_dot = float(c["min_normal_dot"])
    steps, rigid_steps = int(c["steps"]), int(c["rigid_steps"])
    landmark_steps = max(int(c["landmark_steps"]), rigid_steps)

    # ---- optimiser --------------------------------------------------------------------------
    # The body (rigid, pose, shape, expression) by Adam in whitened coordinates; offsets by plain
    # Adam. Each warms up from its start; all follow one cosine decay.
    warm = max(int(c["warmup_steps"]), 1)
    offsets_start = max(int(c["offsets_start"]), rigid_steps)

    def warmup(count, start):
        k = count - start
        return jnp.where(k >= 0, jnp.minimum((k + 1.0) / warm, 1.0), 0.0)

    decay = lambda count: _cosine(count, steps, float(c["lr_final_fraction"]))
    body_lr = lambda count: float(c["lr"]) * jnp.where(
        count < rigid_steps, warmup(count, 0), warmup(count, rigid_steps)) * decay(count)
    offsets_lr = lambda count: float(c["lr_offsets"]) * warmup(count, offsets_start) * decay(count)
    H_rigid, H_all = _body_hessians(model, n_shape, n_expr, face_idx, w)
    body = _whitened_adam(_inverse_sqrt(H_rigid), _inverse_sqrt(H_all), rigid_steps, body_lr,
                          n_shape, n_expr, float(c["eps"]))
    # `body` passes the offsets' gradient through unchanged; the masked Adam then handles it.
    tx = optax.chain(body, optax.masked(optax.adam(offsets_lr), lambda p: {k: k == "offsets" for k in p})
                     ) if use_offsets else body
    group_start = dict(rotation=0, translation=0, shape=rigid_steps, expression=rigid_steps,
                       pose=rigid_steps, offsets=offsets_start)

    # ---- init -----------------------------------------------------------------------------
    neutral = flame.forward(model, jnp.zeros((1, 1)))
    neutral_verts = neutral.vertices[0]
    areas = mesh_lib.face_areas(neutral_verts, faces)
    neutral_centroid = jnp.sum(areas[:, None] * jnp.mean(neutral_verts[faces], 1), 0) / jnp.sum(areas)

    def _check_batch(batch):
        L = batch["landmarks"].shape[1]
        if L and L != n_lmk_model:
            raise ValueError(f"the scans have {L} landmarks but the model {model.name!r} has "
                             f"{n_lmk_model}; landmark files must follow the model's embedding")
        if "gt_vertices" in batch and batch["gt_vertices"].shape[1] != V:
            raise ValueError(f"batch gt_vertices has {batch['gt_vertices'].shape[1]} vertices, the model {V}")

    def init(rng, batch):
        """Rigid initialisation (landmark Kabsch, else centroids) -> state."""
        del rng  # deterministic
        _check_batch(batch)
        S = batch["points"].shape[0]
        valid = batch["valid"].astype(jnp.float32)
        centroid = jnp.sum(batch["points"] * valid[..., None], 1) / jnp.maximum(valid.sum(1), 1.0)[:, None]
        R = jnp.broadcast_to(jnp.eye(3), (S, 3, 3))
        t = centroid - neutral_centroid
        L = batch["landmarks"].shape[1]
        if L:
            lw = batch["landmarks_valid"].astype(jnp.float32)
            _, R_l, t_l = alignment.umeyama(neutral.landmarks, batch["landmarks"], lw, with_scale=False)
            has = (jnp.sum(lw, 1) >= 3)
            R = jnp.where(has[:, None, None], R_l, R)
            t = jnp.where(has[:, None], t_l, t)
        params = dict(shape=jnp.zeros((S, n_shape)), expression=jnp.zeros((S, n_expr)),
                      pose=jnp.zeros((S, 5, 3)), rotation=rotations.matrix_to_rotation_6d(R),
                      translation=t.astype(jnp.float32))
        if use_offsets:
            params["offsets"] = jnp.zeros((S, V, 3))
        return dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))

    # ---- loss -----------------------------------------------------------------------------
    def _gated(params, step):
        out = {}
        for name, value in params.items():
            on = step >= group_start[name]
            value = jnp.where(on, value, jax.lax.stop_gradient(value))
            if name == "pose":  # the global joint stays fixed: the rigid transform carries it
                value = jnp.concatenate([jax.lax.stop_gradient(value[:, :1]), value[:, 1:]], 1)
            out[name] = value
        return out

    def _per_scan(X, lmk_x, pts, nrm, valid, lmk, lmk_valid):
        """Data terms of one scan: X [V, 3] registered vertices (scan frame)."""
        vn = jax.lax.stop_gradient(mesh_lib.vertex_normals(X, faces))
        Xs = jax.lax.stop_gradient(X)
        # scan -> model: nearest vertex, closest point on its faces.
        vidx, _ = _nearest(pts, Xs, jnp.ones((V,), bool), chunk)
        face, bary, d2 = _closest_on_candidates(pts, Xs, faces, vf_table[vidx], vf_mask[vidx])
        tri = X[faces[face]]                                            # [N, 3, 3]
        closest = jnp.einsum("nk,nkc->nc", bary, tri)
        fn = jax.lax.stop_gradient(mesh_lib.face_normals(Xs, faces)[face])
        ok = valid & (d2 < max_d2) & (jnp.sum(fn * nrm, -1) > min_dot)
        d = (pts - closest) * _MM
        r_s2m = jnp.sum(d * fn, -1) ** 2 + w["point_to_point"] * jnp.sum(d * d, -1)
        n_s2m = jnp.maximum(jnp.sum(ok), 1)
        s2m = jnp.sum(jnp.where(ok, r_s2m, 0.0)) / n_s2m
        # model -> scan: face-region vertices to the nearest valid scan point, along its normal.
        q = X[face_idx]
        sidx, sd2 = _nearest(jax.lax.stop_gradient(q), pts, valid, chunk)
        sn = nrm[sidx]
        ok2 = (sd2 < max_d2) & (jnp.sum(vn[face_idx] * sn, -1) > min_dot)
        r_m2s = jnp.sum((q - pts[sidx]) * _MM * sn, -1) ** 2
        m2s = jnp.sum(jnp.where(ok2, r_m2s, 0.0)) / jnp.maximum(jnp.sum(ok2), 1)
        # landmarks
        if lmk.shape[0] and lmk_x is not None:
            e = jnp.sum(((lmk_x - lmk) * _MM) ** 2, -1)
            lv = lmk_valid.astype(jnp.float32)
            lm = jnp.sum(e * lv) / jnp.maximum(jnp.sum(lv), 1.0)
        else:
            lm = jnp.zeros(())
        dist_mm = jnp.sqrt(d2) * _MM
        return dict(s2m=s2m, m2s=m2s, lmk=lm, s2m_frac=jnp.sum(ok) / jnp.maximum(jnp.sum(valid), 1),
                    m2s_frac=jnp.mean(ok2)), dist_mm

    def _loss(params, batch, step):
        p = _gated(params, step)
        R, t = _rigid(p)
        verts, lmk = _model_space(model, p)
        X = _to_scan(R, t, verts)
        lmk_x = None if lmk is None else _to_scan(R, t, lmk)
        L = batch["landmarks"].shape[1]
        terms, dist_mm = jax.vmap(_per_scan, in_axes=(0, 0 if lmk_x is not None else None,
                                                        0, 0, 0, 0, 0))(
            X, lmk_x, batch["points"], batch["normals"], batch["valid"], batch["landmarks"],
            batch["landmarks_valid"])
        terms = {k: jnp.mean(v) for k, v in terms.items()}
        w_lmk = jnp.where(step < landmark_steps, w["landmarks"], w["landmarks_fine"]) if L else 0.0
        reg = dict(shape=jnp.mean(jnp.sum(p["shape"] ** 2, -1)),
                   expression=jnp.mean(jnp.sum(p["expression"] ** 2, -1)),
                   pose=jnp.mean(jnp.sum(p["pose"][:, 1:] ** 2, (-1, -2))))
        total = (w["scan_to_model"] * terms["s2m"] + w["model_to_scan"] * terms["m2s"]
                 + w_lmk * terms["lmk"] + w["shape"] * reg["shape"]
                 + w["expression"] * reg["expression"] + w["pose"] * reg["pose"])
        if use_offsets:
            D = p["offsets"] * _MM
            lap = D - jnp.sum(D[:, lap_table], 2) * lap_inv_deg[None, :, None]
            reg["offsets_laplacian"] = jnp.mean(jnp.sum(lap ** 2, -1))
            reg["offsets_l2"] = jnp.mean(jnp.sum(D ** 2, -1))
            total = (total + w["offsets_laplacian"] * reg["offsets_laplacian"]
                     + w["offsets_l2"] * reg["offsets_l2"])
        metrics = dict(loss=total, loss_scan_to_model=terms["s2m"], loss_model_to_scan=terms["m2s"],
                       loss_landmarks=terms["lmk"], used_scan_fraction=terms["s2m_frac"],
                       used_model_fraction=terms["m2s_frac"],
                       **{f"reg_{k}": v for k, v in reg.items()})
        return total, (metrics, dist_mm)

    def train_step(state, batch, rng):
        """One Adam step on all scans -> (state, metrics: scalars incl. 'loss', 'grad_norm')."""
        del rng  # deterministic
        step = state["step"]
        (_, (metrics, dist_mm)), grads = jax.value_and_grad(_loss, has_aux=True)(
            state["params"], batch, step)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        valid = batch["valid"]
        metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                       residual_mean_mm=jnp.sum(jnp.where(valid, dist_mm, 0.0)) / jnp.maximum(jnp.sum(valid), 1))
        return dict(params=params, opt_state=opt_state, step=step + 1), metrics

    def evaluate(state, batch):
        """Scalar metrics over all scans: loss terms, scan -> registered surface distances
        (median/mean/p90 mm over all valid points, nearest-vertex faces), landmark RMS (mm),
        and with batch['gt_vertices'] the vertex error to the ground truth (all / face region)."""
        step = jnp.maximum(state["step"], max(group_start.values()))   # all terms on
        _, (metrics, dist_mm) = _loss(state["params"], batch, step)
        d = jnp.where(batch["valid"], dist_mm, jnp.nan)
        out = dict(metrics)
        out.update(residual_median_mm=jnp.nanmedian(d), residual_mean_mm=jnp.nanmean(d),
                   residual_p90_mm=jnp.nanpercentile(d, 90.0),
                   landmark_rms_mm=jnp.sqrt(metrics["loss_landmarks"]))
        if "gt_vertices" in batch:
            X = registered_vertices(state, model)
            e = jnp.linalg.norm(X - batch["gt_vertices"], axis=-1) * _MM
            out.update(gt_vertex_median_mm=jnp.median(e), gt_vertex_mean_mm=jnp.mean(e),
                       gt_face_median_mm=jnp.median(e[:, face_idx]))
        return out

    def render(state, batch):
        """Up to `render_count` registered heads, frontal, in the head's own frame:
        'registered' (normal-shaded grey) and 'distance' (vertex colour = distance to the nearest
        scan point, white 0 mm -> red >= 2 mm). Eager (not jit-able: the rasterizer sizes its
        buffers on the host)."""
        from dhjax.render import camera as camera_lib
        from dhjax.render import shading

        n = min(int(c["render_count"]), batch["points"].shape[0])
        if n == 0:
            return {}
        params = jax.tree_util.tree_map(lambda a: a[:n], _params_of(state))
        R, t = _rigid(params)
        verts, _ = _model_space(model, params)
        X = _to_scan(R, t, verts)
        pts, valid = batch["points"][:n], batch["valid"][:n]
        d2 = jax.vmap(lambda x, p, m: _nearest(x, p, m, chunk)[1])(X, pts, valid)
        frac = jnp.clip(jnp.sqrt(d2) * _MM / 2.0, 0.0, 1.0)[..., None]
        colors = (1.0 - frac) * jnp.ones(3) + frac * jnp.array([0.85, 0.1, 0.1])
        size = int(c["render_size"])
        cam = camera_lib.rig_from_angles([0.0], 0.0, 0.95, target=(0.0, -0.02, 0.0),
                                         fov_y_deg=20.0, width=size, height=size)
        cam = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[0], (n,) + a.shape[1:]), cam)
        out = shading.render_mesh(verts, faces, cam, vertex_colors=colors)
        light = jnp.array([0.2, 0.3, 1.0]) / jnp.linalg.norm(jnp.array([0.2, 0.3, 1.0]))
        shade = 0.25 + 0.75 * jnp.clip(jnp.sum(out["normals"] * light, -1, keepdims=True), 0.0, 1.0)
        mask = out["mask"]
        grey = shade * 0.85 * mask + (1.0 - mask)
        dist_img = out["image"] * shade * mask + (1.0 - mask)
        return dict(registered=jnp.clip(jnp.broadcast_to(grey, dist_img.shape), 0.0, 1.0),
                    distance=jnp.clip(dist_img, 0.0, 1.0))

    return Method(init=init, train_step=train_step, evaluate=evaluate, render=render)
