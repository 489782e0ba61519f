"""The registered surface of `dhjax.capture.registration`: the head model posed by the fitted
parameters and moved into each scan's frame, point-to-surface distances, and the per-scan report.

    verts = registration_surface.registered_vertices(state, model)       # [S, V, 3] metres
    report = registration_surface.residual_report(state, batch, model)   # per-scan mm numbers
    params = registration_surface.export_parameters(state)               # numpy, for writing

Parameters (`state["params"]`, leading axis S = scans): shape [S, n_shape], expression
[S, n_expression], pose [S, 5, 3] axis-angle (global, neck, jaw, left eye, right eye; the global
joint is ignored), rotation [S, 6] (6D, `dhjax.geometry.rotations`), translation [S, 3] metres,
optional offsets [S, V, 3] metres. The registered surface of scan s is
    X_s = R_s (flame.forward(shape_s, expression_s, pose_s).vertices + offsets_s) + t_s.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import rotations
from dhjax.geometry.vectors import knn_indices
from dhjax.models import flame
from dhjax.ops.bvh import closest_point

__all__ = [
    "MM",
    "vertex_face_table",
    "closest_on_candidates",
    "point_to_surface_distances",
    "uniform_laplacian",
    "params_of",
    "rigid_transform",
    "model_space",
    "to_scan_frame",
    "registered_vertices",
    "export_parameters",
    "residual_report",
]

MM = 1000.0  # metres -> millimetres


# ----------------------------------------------------------------------------------------------
# Mesh tables and closest points.


def vertex_face_table(faces: np.ndarray, n_vertices: int, max_faces: int = 8):
    """Faces around each vertex.

    Args:
      faces: [F, 3] int (numpy). n_vertices: V. max_faces: most faces kept per vertex.
    Returns:
      (table [V, K] int32, mask [V, K] bool), K = min(max valence, max_faces); rows are padded by
      repeating the first face and the mask marks real entries (a vertex in no face has an
      all-False row). High-valence vertices (poles of fans) keep only `max_faces` of their faces;
      their other faces are reached through the neighbouring vertices when several nearest
      vertices are searched.
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


def closest_on_candidates(points, verts, faces, cand, cand_mask):
    """Closest point among candidate faces.

    Args:
      points: [N, 3]. verts: [V, 3]. faces: [F, 3] int. cand, cand_mask: [N, K] face indices and
        which of them are real.
    Returns:
      (face [N] int32, bary [N, 3], squared distance [N]); all stop-gradient.
    """
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
    the BVH closest-point op (`dhjax.ops.bvh.closest_point`; its pure-JAX brute force when the
    kernel library is not built); `k`, `chunk` and `vertex_faces` are then unused. With a vertex
    mask it is the exact point-to-triangle distance over the faces around the k nearest valid
    vertices of each point (`dhjax.geometry.vectors.knn_indices`), which equals the distance to
    the surface of the valid vertices' faces whenever the closest face has a vertex among those k.

    Args:
      points: [N, 3] metres. verts: [V, 3] metres. faces: [F, 3] int (numpy, static).
      k: nearest vertices whose faces are candidates. chunk: queries per block of the search.
      valid: optional [V] bool vertex mask.
      vertex_faces: optional precomputed `vertex_face_table(faces, V)`.
    Returns:
      (distance [N] metres, face [N] int32, bary [N, 3]); no gradients (stop-gradient).
    """
    faces_np = np.asarray(faces)
    if valid is None:
        out = jax.lax.stop_gradient(closest_point(verts, faces_np, points))
        return jnp.sqrt(out.sq_dist), out.face, out.bary
    V = verts.shape[0]
    table, tmask = vertex_faces if vertex_faces is not None else vertex_face_table(faces_np, V)
    table, tmask = jnp.asarray(table), jnp.asarray(tmask)
    idx = knn_indices(points, verts, k, ref_valid=valid, chunk=chunk)      # [N, k]
    cand = table[idx].reshape(points.shape[0], -1)
    cmask = tmask[idx].reshape(points.shape[0], -1)
    face, bary, d2 = closest_on_candidates(points, verts, jnp.asarray(faces_np), cand, cmask)
    return jnp.sqrt(d2), face, bary


def uniform_laplacian(faces: np.ndarray, n_vertices: int):
    """The mesh graph's neighbours for a uniform Laplacian.

    Args: faces [F, 3] int (numpy). n_vertices: V.
    Returns: (table [V, K] int32 neighbours, padded with the vertex itself; 1/degree [V] float32).
    """
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


# ----------------------------------------------------------------------------------------------
# The registered surface.


def params_of(params_or_state) -> Mapping[str, Any]:
    """The params dict of a method state (a dict with 'params'), or the argument itself."""
    if isinstance(params_or_state, Mapping) and "params" in params_or_state:
        return params_or_state["params"]
    return params_or_state


def rigid_transform(params):
    """(R [S, 3, 3], t [S, 3] metres) of the params' 6D rotation and translation."""
    return rotations.rotation_6d_to_matrix(params["rotation"]), params["translation"]


def _pad(x, n):
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))


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


def model_space(model: flame.FlameModel, params):
    """The posed head in its own frame.

    Args:
      model: FlameModel. params: dict with shape [S, n_shape], expression [S, n_expression],
        pose [S, 5, 3] (the global joint ignored), optional offsets [S, V, 3] metres.
    Returns:
      (vertices [S, V, 3] metres, landmarks [S, L, 3] metres or None without an embedding).
    """
    flame_pose, shift = _flame_pose(model, params)
    out = flame.forward(model, params["shape"], params["expression"], flame_pose, shift)
    verts = out.vertices
    if "offsets" in params:
        verts = verts + params["offsets"]
    lmk = None
    if model.lmk_faces is not None:
        lmk = flame.embed_landmarks(verts, model.faces, model.lmk_faces, model.lmk_bary)
    return verts, lmk


def to_scan_frame(R, t, x):
    """R [S, 3, 3], t [S, 3], x [S, N, 3] -> R x + t [S, N, 3]."""
    return jnp.einsum("sij,snj->sni", R, x, precision="highest") + t[:, None]


def registered_vertices(params_or_state, model: flame.FlameModel):
    """The registered surface in each scan's frame.

    Args:
      params_or_state: the method's state (a dict with 'params') or its params dict.
      model: the FlameModel the method was made with.
    Returns:
      [S, V, 3] float32 metres.
    """
    params = params_of(params_or_state)
    R, t = rigid_transform(params)
    verts, _ = model_space(model, params)
    return to_scan_frame(R, t, verts)


def export_parameters(params_or_state) -> dict:
    """Per-scan parameters as numpy arrays for writing (e.g. `dhjax.io.save_params`):
    shape [S, n_shape], expression [S, n_expr], pose [S, 5, 3] axis-angle, rotation [S, 3, 3]
    (matrix), rotation_6d [S, 6], translation [S, 3] metres, offsets [S, V, 3] when fitted."""
    params = params_of(params_or_state)
    out = {k: np.asarray(v) for k, v in params.items() if k != "rotation"}
    out["rotation_6d"] = np.asarray(params["rotation"])
    out["rotation"] = np.asarray(rotations.rotation_6d_to_matrix(params["rotation"]))
    return out


def residual_report(params_or_state, batch: Mapping[str, Any], model: flame.FlameModel) -> dict:
    """Per-scan distance of every valid scan point to the registered surface (exact, BVH
    closest points; `point_to_surface_distances` without a vertex mask).

    Args:
      params_or_state: state or params (as `registered_vertices`). batch: `pad_scans` output
        (points [S, N, 3] metres, valid [S, N] bool).
      model: the FlameModel the method was made with.
    Returns:
      dict of numpy arrays [S]: median_mm, mean_mm, p90_mm, max_mm, n_points (int).
    """
    verts = registered_vertices(params_or_state, model)
    faces = np.asarray(model.faces)
    dist = jax.vmap(lambda p, v: point_to_surface_distances(p, v, faces)[0])(
        jnp.asarray(batch["points"]), verts)
    dist = np.asarray(dist) * MM
    valid = np.asarray(batch["valid"])
    rows = []
    for d, m in zip(dist, valid):
        d = d[m]
        rows.append((np.median(d), np.mean(d), np.percentile(d, 90), np.max(d), d.size))
    cols = list(zip(*rows))
    return dict(median_mm=np.asarray(cols[0]), mean_mm=np.asarray(cols[1]),
                p90_mm=np.asarray(cols[2]), max_mm=np.asarray(cols[3]),
                n_points=np.asarray(cols[4], np.int64))
