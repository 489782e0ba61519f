"""Registration of the head model (FLAME layout) to 3D scans, as a method for the shared harness.

    scans = [registration.load_scan("a.ply", unit_scale=1e-3, landmarks_path="a_lmk.txt"), ...]
    batch = registration.pad_scans(scans, n_points=4000)
    method = registration.make_method(model, cfg)          # a dhjax.train.loop.Method
    state = method.init(rng, batch)
    state, metrics = jax.jit(method.train_step)(state, batch, rng)      # repeated
    report = registration.residual_report(state, batch, model)         # per-scan mm numbers
    verts = registration.registered_vertices(state, model)             # [S, V, 3] metres

The method's functions are top-level and pure over a frozen `Static` context (`make_static`):
`init(static, rng, batch)`, `train_step(static, state, batch, rng)`, `evaluate(static, state,
batch)`, `render(static, state, batch)`; `make_method` binds the context. Scans (reading,
synthetic scans, batching) are in `registration_scans`, the registered surface and the report in
`registration_surface`, the optimiser in `registration_optim`, a whole run in `registration_run`;
this module re-exports their public functions.

What is fitted, per scan s (all in `state["params"]`, leading axis S = scans):
  shape [S, n_shape] and expression [S, n_expression] coefficients, pose [S, 5, 3] axis-angle
  (global, neck, jaw, left eye, right eye; the global joint is held at zero because the rigid
  transform carries the head's global motion), rotation [S, 6] (6D, the first two columns of R,
  see `dhjax.geometry.rotations`), translation [S, 3] metres and, with `use_offsets`, offsets
  [S, V, 3] metres added to the posed model in the head's own frame. The registered surface is
      X_s = R_s (flame.forward(shape_s, expression_s, pose_s).vertices + offsets_s) + t_s.
  There is no scale: the head model is metric, so a scan in metres is fitted in metres.

How (`train_step`, one optimiser step on all scans at once):
  * correspondences are recomputed every step by chunked brute-force nearest neighbours
    (`dhjax.geometry.vectors.knn_indices`: fixed shapes, jit-able) and held constant within the
    step (no gradient through indices or barycentrics);
  * scan -> model: each valid scan point finds its nearest model vertex, then the exact closest
    point on the faces around that vertex; residual = point-to-plane along that face's normal
    plus `weights.point_to_point` times the squared point-to-point distance;
  * model -> scan: each vertex of the face region (`model.regions[face_region]`, all vertices
    when the model has no regions) finds its nearest valid scan point; residual = point-to-plane
    along the scan normal (only: nearest samples of a sparse scan are mm away tangentially);
  * correspondences farther than `max_corr_dist_mm` or with normals more than
    acos(`min_normal_dot`) apart are dropped;
  * landmarks: squared distance of the model's landmark embedding to the scan landmarks;
  * priors: squared norms of shape, expression and (non-global) pose; for offsets a uniform
    Laplacian (smoothness) term and a small squared norm;
  * distances enter the loss in millimetres (mean of squared residuals per scan, mean over
    scans), so the weights are unit-free numbers;
  * coarse to fine: for the first `rigid_steps` steps only rotation and translation move;
    landmarks are weighted by `weights.landmarks` for the first max(`landmark_steps`,
    `rigid_steps`) steps and by `weights.landmarks_fine` after; shape, expression and pose move
    from `rigid_steps` on, offsets from max(`offsets_start`, `rigid_steps`) on;
  * the optimiser (`registration_optim.whitened_adam`): Adam on rotation, translation, pose,
    shape and expression in coordinates whitened by the Gauss-Newton Hessian of the loss at the
    neutral head (rigid-only Hessian during the rigid stage), step `lr`, constant `eps`; offsets
    by plain Adam at `lr_offsets`. Each learning rate warms up linearly over `warmup_steps` from
    its group's start and all follow one cosine decay to `lr_final_fraction` at `steps`;
  * `init` is the landmark-based rigid initialisation: Umeyama (Kabsch, scale fixed to 1)
    from the neutral model's landmarks to the scan's; scans without landmarks get the identity
    rotation and the translation that aligns the area-weighted centroid of the neutral model
    surface with the centroid of the scan points (only good for scans roughly in the model's
    orientation: +y up, face towards +z).

Config: `make_static(model, cfg)` reads the subtree `cfg.registration` (an ml_collections
ConfigDict or any mapping); missing fields take the defaults of `default_config()` (which lists
them), unknown fields are an error.

The batch (`pad_scans`) is a dict of stacked arrays, leading axis S (scans):
  points [S, N, 3] float32 metres, normals [S, N, 3] unit, valid [S, N] bool,
  landmarks [S, L, 3] metres (zeros where absent), landmarks_valid [S, L] bool,
  and optionally gt_vertices [S, V, 3] (synthetic data: `evaluate` then reports the vertex
  error against the ground truth).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dhjax.capture.registration_optim import body_hessians, cosine, inverse_sqrt, whitened_adam
from dhjax.capture.registration_scans import (
    load_landmarks,
    load_scan,
    pad_scans,
    synthesize_scans,
)
from dhjax.capture.registration_surface import (
    MM,
    closest_on_candidates,
    export_parameters,
    model_space,
    params_of,
    point_to_surface_distances,
    registered_vertices,
    residual_report,
    rigid_transform,
    to_scan_frame,
    uniform_laplacian,
    vertex_face_table,
)
from dhjax.geometry import alignment, rotations
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry.vectors import knn_indices
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import shading
from dhjax.render import splat
from dhjax.train import logs, loop

__all__ = [
    "Static",
    "default_config",
    "resolve_config",
    "make_static",
    "make_method",
    "optimizer",
    "init",
    "loss",
    "train_step",
    "evaluate",
    "render",
    # re-exported from registration_scans and registration_surface
    "load_scan",
    "load_landmarks",
    "synthesize_scans",
    "pad_scans",
    "registered_vertices",
    "residual_report",
    "export_parameters",
    "point_to_surface_distances",
]


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


def default_config() -> ml_collections.ConfigDict:
    """The `cfg.registration` subtree with its defaults, as an ml_collections ConfigDict.

    steps (300): train steps the learning-rate schedule is laid out for.
    rigid_steps (30): first steps in which only rotation and translation move.
    landmark_steps (30): steps (at least rigid_steps) with landmarks at weights.landmarks.
    offsets_start (150): first step at which offsets move (with use_offsets; at least rigid_steps).
    warmup_steps (20): linear learning-rate warm-up of each group from its start.
    lr (0.5): step of the whitened Adam of rotation, translation, pose, shape and expression.
    eps (2.0): that Adam's epsilon (in whitened units; large: small steps are momentum descent).
    lr_offsets (5e-5): Adam step of the offsets, metres.
    lr_final_fraction (0.02): the cosine decay ends at this fraction of each learning rate.
    n_shape (-1), n_expression (-1): coefficients fitted (-1 = all of the model's).
    use_offsets (False): fit regularised per-vertex offsets too.
    n_points (4000): scan points per scan in the batch (`pad_scans` in `registration_run`).
    face_region ('face'): model region whose vertices get the model -> scan term.
    max_corr_dist_mm (20.0), min_normal_dot (0.3): correspondence rejection.
    chunk (512): queries per block of the brute-force nearest-neighbour search.
    weights.scan_to_model (1.0), weights.model_to_scan (0.1), weights.point_to_point (0.1).
    weights.landmarks (1.0), weights.landmarks_fine (0.01).
    weights.shape (0.0001), weights.expression (0.0001), weights.pose (0.001).
    weights.offsets_laplacian (10.0), weights.offsets_l2 (0.01).
    render_count (4), render_size (128): how many scans `render` shows, at what size in pixels.
    """
    c = ml_collections.ConfigDict(dict(_DEFAULTS))
    c.weights = ml_collections.ConfigDict(dict(_WEIGHT_DEFAULTS))
    return c


def _as_dict(x) -> dict:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return dict(x)


def resolve_config(cfg) -> dict:
    """cfg (a whole config with a `registration` subtree, the subtree itself, or None) -> plain
    dict of every field with its defaults filled in; ValueError for unknown fields, negative
    step counts and weights that are negative or not finite."""
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
# The static context.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Static:
    """Everything the method's functions need besides state and batch (built once by
    `make_static`; host-side numpy and Python numbers; a static pytree, hashed by identity).

    model: FlameModel. cfg: `resolve_config` output (plain dict, weights included).
    n_shape, n_expression: fitted coefficients. face_idx [Vf] int32: vertices of the model ->
    scan term. vf_table, vf_mask [V, K]: faces around each vertex (`vertex_face_table`).
    lap_table [V, K'] int32, lap_inv_deg [V] float32: uniform Laplacian (None without offsets).
    neutral_landmarks [1, L, 3] metres (None without an embedding), neutral_centroid [3] metres:
    of the neutral head, for `init`. P_rigid, P_all [D, D] float32: the optimiser's whitening
    (`registration_optim`). rigid_steps, landmark_steps, offsets_start: stage boundaries (steps).
    """

    model: Any
    cfg: Mapping[str, Any]
    n_shape: int
    n_expression: int
    face_idx: np.ndarray
    vf_table: np.ndarray
    vf_mask: np.ndarray
    lap_table: np.ndarray | None
    lap_inv_deg: np.ndarray | None
    neutral_landmarks: np.ndarray | None
    neutral_centroid: np.ndarray
    P_rigid: np.ndarray
    P_all: np.ndarray
    rigid_steps: int
    landmark_steps: int
    offsets_start: int

    @property
    def use_offsets(self) -> bool:
        """Whether per-vertex offsets are optimised (config `use_offsets`)."""
        return bool(self.cfg["use_offsets"])

    @property
    def group_start(self) -> dict:
        """{parameter group: first step at which it moves}."""
        r = self.rigid_steps
        return dict(rotation=0, translation=0, shape=r, expression=r, pose=r, offsets=self.offsets_start)


def make_static(model: flame.FlameModel, cfg) -> Static:
    """The method's context for `model` and `cfg` (see `default_config`).

    Args:
      model: FlameModel (with a landmark embedding for landmark terms and landmark init; with
        `regions` for the face-region model -> scan term, else all vertices are used).
      cfg: the whole experiment config with a `registration` subtree (or the subtree itself, or
        None for all defaults).
    Raises:
      ValueError: unknown or invalid config fields, more coefficients than the model has, a
      face_region the model lacks.
    """
    c = resolve_config(cfg)
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
    vf_table, vf_mask = vertex_face_table(faces_np, V)
    lap_table = lap_inv_deg = None
    if bool(c["use_offsets"]):
        lap_table, lap_inv_deg = uniform_laplacian(faces_np, V)
    rigid_steps = int(c["rigid_steps"])
    neutral = flame.forward(model, jnp.zeros((1, 1)))
    neutral_verts = neutral.vertices[0]
    faces = jnp.asarray(faces_np)
    areas = mesh_lib.face_areas(neutral_verts, faces)
    neutral_centroid = jnp.sum(areas[:, None] * jnp.mean(neutral_verts[faces], 1), 0) / jnp.sum(areas)
    H_rigid, H_all = body_hessians(model, n_shape, n_expr, jnp.asarray(face_idx), c["weights"])
    return Static(
        model=model, cfg=c, n_shape=n_shape, n_expression=n_expr, face_idx=face_idx,
        vf_table=vf_table, vf_mask=vf_mask, lap_table=lap_table, lap_inv_deg=lap_inv_deg,
        neutral_landmarks=None if neutral.landmarks is None else np.asarray(neutral.landmarks),
        neutral_centroid=np.asarray(neutral_centroid), P_rigid=inverse_sqrt(H_rigid),
        P_all=inverse_sqrt(H_all), rigid_steps=rigid_steps,
        landmark_steps=max(int(c["landmark_steps"]), rigid_steps),
        offsets_start=max(int(c["offsets_start"]), rigid_steps))


def make_method(model: flame.FlameModel, cfg) -> loop.Method:
    """The registration method for the training harness: `init`, `train_step`, `evaluate` and
    `render` bound to `make_static(model, cfg)`; every function is pure and (except `render`)
    jit-able with fixed shapes. state = {'params': {...}, 'opt_state': optax state,
    'step': int32 []}."""
    static = make_static(model, cfg)
    bind = lambda fn: functools.partial(fn, static)
    return loop.Method(init=bind(init), train_step=bind(train_step), evaluate=bind(evaluate),
                       render=bind(render))


# ----------------------------------------------------------------------------------------------
# Optimiser.


def optimizer(static: Static) -> optax.GradientTransformation:
    """The body (rigid, pose, shape, expression) by Adam in whitened coordinates; with offsets,
    the offsets by plain Adam. Each group warms up from its start; all follow one cosine decay."""
    c = static.cfg
    warm = max(int(c["warmup_steps"]), 1)
    steps, rigid_steps, offsets_start = int(c["steps"]), static.rigid_steps, static.offsets_start

    def warmup(count, start):
        k = count - start
        return jnp.where(k >= 0, jnp.minimum((k + 1.0) / warm, 1.0), 0.0)

    decay = lambda count: cosine(count, steps, float(c["lr_final_fraction"]))
    body_lr = lambda count: float(c["lr"]) * jnp.where(
        count < rigid_steps, warmup(count, 0), warmup(count, rigid_steps)) * decay(count)
    offsets_lr = lambda count: float(c["lr_offsets"]) * warmup(count, offsets_start) * decay(count)
    body = whitened_adam(static.P_rigid, static.P_all, rigid_steps, body_lr, static.n_shape,
                         static.n_expression, float(c["eps"]))
    if not static.use_offsets:
        return body
    # `body` passes the offsets' gradient through unchanged; the masked Adam then handles it.
    return optax.chain(body, optax.masked(optax.adam(offsets_lr), lambda p: {k: k == "offsets" for k in p}))


# ----------------------------------------------------------------------------------------------
# init.


def _check_batch(static: Static, batch) -> None:
    model = static.model
    n_lmk_model = 0 if model.lmk_faces is None else int(model.lmk_faces.shape[0])
    L = batch["landmarks"].shape[1]
    if L and L != n_lmk_model:
        raise ValueError(f"the scans have {L} landmarks but the model {model.name!r} has "
                         f"{n_lmk_model}; landmark files must follow the model's embedding")
    if "gt_vertices" in batch and batch["gt_vertices"].shape[1] != model.num_vertices:
        raise ValueError(f"batch gt_vertices has {batch['gt_vertices'].shape[1]} vertices, "
                         f"the model {model.num_vertices}")


def init(static: Static, rng, batch) -> dict:
    """Rigid initialisation (landmark Kabsch, else centroids; see the module docstring).

    Args: rng: unused (deterministic). batch: `pad_scans` output with S scans.
    Returns: state {'params': zero shape/expression/pose (and offsets), rotation [S, 6] and
    translation [S, 3] of the initial alignment; 'opt_state'; 'step': 0}.
    """
    del rng  # deterministic
    _check_batch(static, batch)
    S = batch["points"].shape[0]
    valid = batch["valid"].astype(jnp.float32)
    centroid = jnp.sum(batch["points"] * valid[..., None], 1) / jnp.maximum(valid.sum(1), 1.0)[:, None]
    R = jnp.broadcast_to(jnp.eye(3), (S, 3, 3))
    t = centroid - static.neutral_centroid
    L = batch["landmarks"].shape[1]
    if L:
        lw = batch["landmarks_valid"].astype(jnp.float32)
        _, R_l, t_l = alignment.umeyama(jnp.asarray(static.neutral_landmarks), batch["landmarks"], lw,
                                        with_scale=False)
        has = (jnp.sum(lw, 1) >= 3)
        R = jnp.where(has[:, None, None], R_l, R)
        t = jnp.where(has[:, None], t_l, t)
    params = dict(shape=jnp.zeros((S, static.n_shape)), expression=jnp.zeros((S, static.n_expression)),
                  pose=jnp.zeros((S, 5, 3)), rotation=rotations.matrix_to_rotation_6d(R),
                  translation=t.astype(jnp.float32))
    if static.use_offsets:
        params["offsets"] = jnp.zeros((S, static.model.num_vertices, 3))
    return dict(params=params, opt_state=optimizer(static).init(params), step=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Loss.


def _gated(static: Static, params, step):
    """Params with no gradient for groups that have not started at `step`, and never for the
    global joint of the pose (the rigid transform carries it)."""
    starts = static.group_start
    out = {}
    for name, value in params.items():
        on = step >= starts[name]
        value = jnp.where(on, value, jax.lax.stop_gradient(value))
        if name == "pose":
            value = jnp.concatenate([jax.lax.stop_gradient(value[:, :1]), value[:, 1:]], 1)
        out[name] = value
    return out


def _scan_terms(static: Static, X, lmk_x, pts, nrm, valid, lmk, lmk_valid):
    """Data terms of one scan: X [V, 3] registered vertices (scan frame), lmk_x [L, 3] or None,
    pts/nrm [N, 3], valid [N], lmk [L, 3], lmk_valid [L] -> (terms {s2m, m2s, lmk, s2m_frac,
    m2s_frac}, distance of every scan point to its closest point [N] mm)."""
    c, w = static.cfg, static.cfg["weights"]
    faces = jnp.asarray(static.model.faces)
    face_idx = jnp.asarray(static.face_idx)
    chunk = int(c["chunk"])
    max_d2 = (float(c["max_corr_dist_mm"]) / MM) ** 2
    min_dot = float(c["min_normal_dot"])
    vn = jax.lax.stop_gradient(mesh_lib.vertex_normals(X, faces))
    Xs = jax.lax.stop_gradient(X)
    # scan -> model: nearest vertex, closest point on its faces.
    vidx = knn_indices(pts, Xs, 1, chunk=chunk)[:, 0]
    face, bary, d2 = closest_on_candidates(pts, Xs, faces, jnp.asarray(static.vf_table)[vidx],
                                           jnp.asarray(static.vf_mask)[vidx])
    tri = X[faces[face]]                                            # [N, 3, 3]
    closest = jnp.einsum("nk,nkc->nc", bary, tri)
    fn = jax.lax.stop_gradient(mesh_lib.face_normals(Xs, faces)[face])
    ok = valid & (d2 < max_d2) & (jnp.sum(fn * nrm, -1) > min_dot)
    d = (pts - closest) * MM
    r_s2m = jnp.sum(d * fn, -1) ** 2 + w["point_to_point"] * jnp.sum(d * d, -1)
    n_s2m = jnp.maximum(jnp.sum(ok), 1)
    s2m = jnp.sum(jnp.where(ok, r_s2m, 0.0)) / n_s2m
    # model -> scan: face-region vertices to the nearest valid scan point, along its normal.
    q = X[face_idx]
    qs = jax.lax.stop_gradient(q)
    sidx = knn_indices(qs, pts, 1, ref_valid=valid, chunk=chunk)[:, 0]
    diff = qs - pts[sidx]
    sd2 = jnp.sum(diff * diff, -1)
    sn = nrm[sidx]
    ok2 = (sd2 < max_d2) & (jnp.sum(vn[face_idx] * sn, -1) > min_dot)
    r_m2s = jnp.sum((q - pts[sidx]) * MM * sn, -1) ** 2
    m2s = jnp.sum(jnp.where(ok2, r_m2s, 0.0)) / jnp.maximum(jnp.sum(ok2), 1)
    # landmarks
    if lmk.shape[0] and lmk_x is not None:
        e = jnp.sum(((lmk_x - lmk) * MM) ** 2, -1)
        lv = lmk_valid.astype(jnp.float32)
        lm = jnp.sum(e * lv) / jnp.maximum(jnp.sum(lv), 1.0)
    else:
        lm = jnp.zeros(())
    dist_mm = jnp.sqrt(d2) * MM
    return dict(s2m=s2m, m2s=m2s, lmk=lm, s2m_frac=jnp.sum(ok) / jnp.maximum(jnp.sum(valid), 1),
                m2s_frac=jnp.mean(ok2)), dist_mm


def loss(static: Static, params, batch, step):
    """The registration loss of all scans at `step` (stages as in the module docstring).

    Returns: (total [], (metrics {loss, loss_scan_to_model, loss_model_to_scan, loss_landmarks,
    used_scan_fraction, used_model_fraction, reg_*}: scalars, distance of every scan point to
    the registered surface [S, N] mm)).
    """
    w = static.cfg["weights"]
    p = _gated(static, params, step)
    R, t = rigid_transform(p)
    verts, lmk = model_space(static.model, p)
    X = to_scan_frame(R, t, verts)
    lmk_x = None if lmk is None else to_scan_frame(R, t, lmk)
    L = batch["landmarks"].shape[1]
    terms, dist_mm = jax.vmap(functools.partial(_scan_terms, static),
                              in_axes=(0, 0 if lmk_x is not None else None, 0, 0, 0, 0, 0))(
        X, lmk_x, batch["points"], batch["normals"], batch["valid"], batch["landmarks"],
        batch["landmarks_valid"])
    terms = {k: jnp.mean(v) for k, v in terms.items()}
    w_lmk = jnp.where(step < static.landmark_steps, w["landmarks"], w["landmarks_fine"]) if L else 0.0
    reg = dict(shape=jnp.mean(jnp.sum(p["shape"] ** 2, -1)),
               expression=jnp.mean(jnp.sum(p["expression"] ** 2, -1)),
               pose=jnp.mean(jnp.sum(p["pose"][:, 1:] ** 2, (-1, -2))))
    total = (w["scan_to_model"] * terms["s2m"] + w["model_to_scan"] * terms["m2s"]
             + w_lmk * terms["lmk"] + w["shape"] * reg["shape"]
             + w["expression"] * reg["expression"] + w["pose"] * reg["pose"])
    if static.use_offsets:
        D = p["offsets"] * MM
        lap = D - jnp.sum(D[:, jnp.asarray(static.lap_table)], 2) * jnp.asarray(static.lap_inv_deg)[None, :, None]
        reg["offsets_laplacian"] = jnp.mean(jnp.sum(lap ** 2, -1))
        reg["offsets_l2"] = jnp.mean(jnp.sum(D ** 2, -1))
        total = (total + w["offsets_laplacian"] * reg["offsets_laplacian"]
                 + w["offsets_l2"] * reg["offsets_l2"])
    metrics = dict(loss=total, loss_scan_to_model=terms["s2m"], loss_model_to_scan=terms["m2s"],
                   loss_landmarks=terms["lmk"], used_scan_fraction=terms["s2m_frac"],
                   used_model_fraction=terms["m2s_frac"],
                   **{f"reg_{k}": v for k, v in reg.items()})
    return total, (metrics, dist_mm)


# ----------------------------------------------------------------------------------------------
# Train step, evaluation, rendering.


def train_step(static: Static, state, batch, rng):
    """One optimiser step on all scans -> (state, metrics: scalars incl. 'loss', 'grad_norm',
    'residual_mean_mm'). rng is unused (deterministic)."""
    del rng
    step = state["step"]
    (_, (metrics, dist_mm)), grads = jax.value_and_grad(functools.partial(loss, static), has_aux=True)(
        state["params"], batch, step)
    updates, opt_state = optimizer(static).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    valid = batch["valid"]
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   residual_mean_mm=jnp.sum(jnp.where(valid, dist_mm, 0.0)) / jnp.maximum(jnp.sum(valid), 1))
    return dict(params=params, opt_state=opt_state, step=step + 1), metrics


def evaluate(static: Static, state, batch) -> dict:
    """Scalar metrics over all scans: the loss terms with every group on, scan -> registered
    surface distances (residual_median_mm / residual_mean_mm / residual_p90_mm over all valid
    points, nearest-vertex faces), landmark_rms_mm, and with batch['gt_vertices'] the vertex
    error to the ground truth (gt_vertex_median_mm, gt_vertex_mean_mm, gt_face_median_mm)."""
    step = jnp.maximum(state["step"], max(static.group_start.values()))   # all terms on
    _, (metrics, dist_mm) = loss(static, state["params"], batch, step)
    d = jnp.where(batch["valid"], dist_mm, jnp.nan)
    out = dict(metrics)
    out.update(residual_median_mm=jnp.nanmedian(d), residual_mean_mm=jnp.nanmean(d),
               residual_p90_mm=jnp.nanpercentile(d, 90.0),
               landmark_rms_mm=jnp.sqrt(metrics["loss_landmarks"]))
    if "gt_vertices" in batch:
        X = registered_vertices(state, static.model)
        e = jnp.linalg.norm(X - batch["gt_vertices"], axis=-1) * MM
        out.update(gt_vertex_median_mm=jnp.median(e), gt_vertex_mean_mm=jnp.mean(e),
                   gt_face_median_mm=jnp.median(e[:, jnp.asarray(static.face_idx)]))
    return out


@functools.partial(jax.jit, static_argnames=("chunk",))
def _nearest_sq(X, points, valid, *, chunk: int) -> jax.Array:
    """Squared distance [S, V] from each vertex X [S, V, 3] to its nearest valid scan point."""

    def one(x, p, m):
        idx = knn_indices(x, p, 1, ref_valid=m, chunk=chunk)[:, 0]
        diff = x - p[idx]
        return jnp.sum(diff * diff, -1)

    return jax.vmap(one)(X, points, valid)


@functools.partial(jax.jit, static_argnames=("pixel_m", "chunk"))
def _scan_view(points, normals, valid, cam, light, pixel_m: float, chunk: int) -> jax.Array:
    """One scan's points (head frame) splatted as small grey Lambert-shaded discs into `cam`
    (`dhjax.render.splat`; padding points and points whose normal faces away from the camera
    are transparent): [H, W, 3] on white. The disc size follows the scan's median
    nearest-neighbour spacing (at least half a pixel). Jitted."""
    valid = valid & (jnp.sum(normals * (camera_lib.camera_centre(cam)[0] - points), -1) > 0)
    idx = knn_indices(points, points, 2, ref_valid=valid, chunk=chunk)[:, 1]
    gap = jnp.linalg.norm(points - points[idx], axis=-1)
    spacing = jnp.nanmedian(jnp.where(valid & (gap > 0), gap, jnp.nan))
    sigma = jnp.maximum(jnp.nan_to_num(spacing, nan=pixel_m), 0.5 * pixel_m)
    shade = 0.25 + 0.75 * jnp.clip(normals @ light, 0.0, 1.0)
    n = points.shape[0]
    out = splat.rasterize(points, jnp.tile(jnp.array([1.0, 0.0, 0.0, 0.0]), (n, 1)),
                          jnp.full((n, 3), 1.0) * sigma, jnp.where(valid, 0.95, 0.0),
                          (0.85 * shade)[:, None] * jnp.ones(3), cam, background=jnp.ones(3))
    return out.image[0]


def render(static: Static, state, batch) -> dict:
    """The harness's images (ground truth next to the render): {"eval/registration": grid} with,
    for each of the first `render_count` scans (rows), the scan | the registered head | the
    registered head coloured by the distance to the nearest scan point (white 0 mm -> red >= 2 mm),
    frontal in the head's own frame (the scan moved there by the inverse of the fitted rigid
    transform); the scan's points are splatted as shaded discs, the head is rasterised, each
    render_size x render_size pixels (`dhjax.train.logs.comparison_grid`: [1, H', W', 3]).
    Eager (not jit-able: the rasterizer sizes its buffers on the host)."""
    c = static.cfg
    n = min(int(c["render_count"]), batch["points"].shape[0])
    if n == 0:
        return {}
    faces = jnp.asarray(static.model.faces)
    chunk = int(c["chunk"])
    params = jax.tree_util.tree_map(lambda a: a[:n], params_of(state))
    R, t = rigid_transform(params)
    verts, _ = model_space(static.model, params)
    X = to_scan_frame(R, t, verts)
    pts, valid = batch["points"][:n], batch["valid"][:n]
    d2 = _nearest_sq(X, pts, valid, chunk=chunk)
    frac = jnp.clip(jnp.sqrt(d2) * MM / 2.0, 0.0, 1.0)[..., None]
    colors = (1.0 - frac) * jnp.ones(3) + frac * jnp.array([0.85, 0.1, 0.1])
    size = int(c["render_size"])
    fov = 20.0
    cam1 = camera_lib.rig_from_angles([0.0], 0.0, 0.95, target=(0.0, -0.02, 0.0),
                                      fov_y_deg=fov, width=size, height=size)
    cam = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[0], (n,) + a.shape[1:]), cam1)
    out = shading.render_mesh(verts, faces, cam, vertex_colors=colors)
    light = jnp.array([0.2, 0.3, 1.0]) / jnp.linalg.norm(jnp.array([0.2, 0.3, 1.0]))
    shade = 0.25 + 0.75 * jnp.clip(jnp.sum(out["normals"] * light, -1, keepdims=True), 0.0, 1.0)
    mask = out["mask"]
    grey = jnp.broadcast_to(shade * 0.85 * mask + (1.0 - mask), out["image"].shape)
    dist_img = out["image"] * shade * mask + (1.0 - mask)
    # The scan in the head frame: x_head = R^T (x_scan - t).
    pts_head = jnp.einsum("sji,snj->sni", R, pts - t[:, None], precision="highest")
    nrm_head = jnp.einsum("sji,snj->sni", R, batch["normals"][:n], precision="highest")
    pixel_m = 2.0 * 0.95 * float(np.tan(np.radians(fov / 2.0))) / size
    scans = jnp.stack([_scan_view(pts_head[i], nrm_head[i], valid[i], cam1, light, pixel_m, chunk) for i in range(n)])
    return {"eval/registration": logs.comparison_grid(scans, grey, dist_img)}
