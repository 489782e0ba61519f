"""Scans for `dhjax.capture.registration`: reading scan meshes and landmark files, synthetic
scans with known ground truth, and padding scans of different sizes into one fixed-shape batch.

    scans = [registration_scans.load_scan("a.ply", unit_scale=1e-3, landmarks_path="a.txt"), ...]
    scans, gt = registration_scans.synthesize_scans(key, model, n=4)
    batch = registration_scans.pad_scans(scans, n_points=4000)
    names, scans, gt = registration_scans.load_scans(cfg.data, model, seed=cfg.seed)

A scan is a dict: points [N, 3] float32 metres, normals [N, 3] float32 unit, faces [F, 3] int32
or None, landmarks [L, 3] float32 metres or None, path (str). The batch is a dict of stacked
arrays, leading axis S (scans): points [S, N, 3] float32 metres, normals [S, N, 3] unit,
valid [S, N] bool, landmarks [S, L, 3] metres (zeros where absent), landmarks_valid [S, L]
bool, and optionally gt_vertices [S, V, 3] metres.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.capture.registration_surface import MM
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import rotations
from dhjax.io import existing_file, load_mesh
from dhjax.models import flame
from dhjax.train import config as config_lib

__all__ = ["MESH_SUFFIXES", "load_landmarks", "load_scan", "load_scans", "random_rotations",
           "synthesize_scans", "pad_scans", "check_synthetic"]

MESH_SUFFIXES = (".obj", ".ply")   # scan files `load_scans` picks up from a folder

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
    if not (np.isfinite(unit_scale) and unit_scale > 0):
        raise ValueError(f"unit_scale must be a positive finite number, got {unit_scale!r}")
    path = existing_file(path)
    try:
        verts, faces = load_mesh(path)
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


def random_rotations(key, n: int, max_angle_deg: float):
    """[n, 3, 3] rotations about uniformly random axes by angles uniform in [0, max_angle_deg]
    (uniform on SO(3) for max_angle_deg >= 180)."""
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
    R = random_rotations(keys[1], n, rotation_max_deg)
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
        return pts + (noise_mm / MM) * jax.random.normal(k2, pts.shape), nrm

    pts, nrm = jax.vmap(one)(jax.random.split(keys[3], n), verts)
    lmk_noisy = lmk + (landmark_noise_mm / MM) * jax.random.normal(keys[4], lmk.shape)
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


def check_synthetic(data_cfg) -> None:
    """Raises ValueError naming the field when `data_cfg.synthetic` (the synthetic scans of
    `load_scans`) cannot work: n_scans or points_per_scan not an integer >= 1, noise_mm not a
    number >= 0 (a standard deviation, mm)."""
    for field in ("n_scans", "points_per_scan"):      # named from the config's root, as run sees it
        config_lib.check_integer({"data": data_cfg}, f"data.synthetic.{field}", 1)
    v = data_cfg.synthetic.get("noise_mm")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"config field data.synthetic.noise_mm must be a standard deviation >= 0 (mm), got {v!r}")


def load_scans(data_cfg, model: flame.FlameModel, *, seed: int = 0):
    """The scans a registration run fits, from `cfg.data` (see `configs/register_flame.py`).

    With `data_cfg.scans_dir` empty: `data_cfg.synthetic.n_scans` synthetic scans of `model`
    (`synthesize_scans` with key PRNGKey(seed + 1), noise_mm and points_per_scan from
    `data_cfg.synthetic`) and their ground truth. Otherwise every .obj/.ply file in scans_dir
    (sorted by name; `load_scan` with `data_cfg.unit_scale`), each with its landmarks
    <landmarks_dir>/<stem>.txt or .npz when `data_cfg.landmarks_dir` is set and such a file
    exists. A scan that cannot be read (ValueError or OSError of `load_scan`: unreadable, empty,
    no faces, NaN vertices, bad landmark file) is skipped with a printed message naming it.

    Returns:
      (names [S] str (file stems, or synthetic_000 ...), scans [S] dicts (`load_scan`),
      ground truth dict of `synthesize_scans` or None for scans from disk).
    Raises:
      FileNotFoundError: scans_dir holds no .obj/.ply file. ValueError: none could be read, or a
      synthetic setting is out of range (n_scans or points_per_scan < 1, noise_mm < 0).
    """
    d = data_cfg
    if not d.scans_dir:
        check_synthetic(d)
        scans, gt = synthesize_scans(
            jax.random.PRNGKey(seed + 1), model, d.synthetic.n_scans,
            noise_mm=d.synthetic.noise_mm, points_per_scan=d.synthetic.points_per_scan)
        return [f"synthetic_{i:03d}" for i in range(len(scans))], scans, gt
    paths = sorted(p for p in glob.glob(os.path.join(d.scans_dir, "*"))
                   if p.lower().endswith(MESH_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"no .obj/.ply scans in '{d.scans_dir}'")
    names, scans = [], []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        lmk = None
        if d.landmarks_dir:
            found = [p for p in (os.path.join(d.landmarks_dir, stem + s) for s in (".txt", ".npz"))
                     if os.path.exists(p)]
            lmk = found[0] if found else None
        try:
            scans.append(load_scan(path, unit_scale=d.unit_scale, landmarks_path=lmk))
            names.append(stem)
        except (ValueError, OSError) as err:
            print(f"skipping scan {path}: {err}", flush=True)
    if not scans:
        raise ValueError(f"none of the {len(paths)} scans in '{d.scans_dir}' could be read")
    return names, scans, None
