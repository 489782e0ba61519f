"""Deformation gradients between a canonical and a deformed triangle mesh (same topology).

Two constructions used by the avatar methods of the thesis:

* INSTA canonicalisation (`canonicalize`, thesis section A.2 "Canonicalization", eqs. 2-4). A
  point ``p`` in deformed space is mapped to canonical space through its nearest triangle T of
  the deformed mesh (the caller finds T, e.g. with `dhjax.ops.closest_point`, and passes it in:
  geometry sits below ops). Each triangle f has a frame
  ``L_f = [[R_f, t_f], [0, 1]]`` (4x4), with ``R_f`` the TBN rotation (columns tangent,
  bitangent, normal; `dhjax.geometry.mesh.face_tbn`) and ``t_f`` its first vertex, in both meshes.
  The per-triangle deformation gradient is

      F_f = L_canon,f . Lambda_f . L_def,f^-1,   Lambda_f = [[lambda_f I, 0], [0, 1]],

  and the point's gradient is the weighted average over T and its (up to 3) neighbours across
  its edges, A = {T} + N(T):

      F_hat = sum_{f in A} w_f F_f / sum_{f in A} w_f,   w_f = exp(-beta |c_f - p|)  (f != T),

  with ``c_f`` the centroid of the deformed triangle f and beta = 4 (positions in metres). The
  thesis gives the nearest triangle itself "beta = 1", which reads two ways: its weight is 1
  (``nearest_beta=None``, the default), or it decays with beta = 1, ``w_T = exp(-|c_T - p|)``
  (``nearest_beta=1.0``). INSTA (`dhjax.synthesis.insta`) chose between them, and between the
  two scales below, by an ablation: weight 1 (no measurable difference) and the length ratio. The
  canonical point is ``p' = F_hat p`` (homogeneous). The averaging softens, but does not remove,
  the jumps of the map where the nearest triangle changes. Where the nearest surface point is a
  vertex or an edge (a region of positive volume off the surface), several triangles are equally
  near and the map depends on which one the closest-point search returns (its backends may differ
  there); inside a face's region the map is smooth and its gradients are exact.

  The scale lambda: the thesis writes ``lambda = a_def / a_canon`` (the ratio of the triangle's
  deformed and canonical areas); that is ``scale="area_ratio"``, the default. Read literally it
  enlarges when the deformed triangle is bigger; the map that sends a uniformly scaled mesh back
  exactly onto the canonical one uses the inverse length ratio ``sqrt(a_canon / a_def)``, offered
  as ``scale="length_ratio"``. Both are 1 for rigid motions, where ``p'`` of a point on the
  deformed surface lies exactly on the canonical surface (the tests check it).

* Triangle-to-triangle deformation gradients (`triangle_deformation_gradients`, Sumner and
  Popovic 2004, used by GEM and Gaussian-on-mesh avatars to carry the rotation and stretch of a
  face onto primitives attached to it): each triangle gets a fourth vertex
  ``v4 = v1 + n / sqrt(|n|)`` (``n = (v2 - v1) x (v3 - v1)``), ``E = [v2 - v1, v3 - v1, v4 - v1]``
  and the 3x3 gradient from canonical to deformed is ``J = E_def E_canon^-1``. It maps canonical
  edge vectors to deformed ones exactly and scales the normal direction by the square root of
  the area change.

Degenerate (zero-area) triangles: frames fall back to the identity (as `face_tbn`), lambda to 1,
and a degenerate canonical triangle gets J = I; values and gradients stay finite (no NaN).
All functions are pure and jit/vmap/grad compatible; the face neighbour table is computed on the
host from concrete `faces` (pass `neighbours=` when `faces` is traced). Units are metres.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry.vectors import safe_norm

__all__ = [
    "triangle_frames",
    "insta_face_gradients",
    "face_neighbours",
    "Canonicalized",
    "canonicalize",
    "triangle_deformation_gradients",
]

# Areas below this (square metres; ~1.4 nm sides) are treated as zero when forming area ratios.
_TINY_AREA = 1e-18
_SCALES = ("area_ratio", "length_ratio")


def triangle_frames(verts, faces, uv_coords=None, uv_faces=None):
    """Homogeneous triangle frames ``L = [[R, t], [0, 1]]`` (R: TBN columns, t: first vertex).

    Args:
      verts: [..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices.
      uv_coords, uv_faces: optional UV layout for the tangent direction (see `face_tbn`).

    Returns:
      [..., F, 4, 4] float rigid transforms from triangle-local to world coordinates.
    """
    R = mesh_lib.face_tbn(verts, faces, uv_coords, uv_faces)  # [..., F, 3, 3]
    t = mesh_lib.face_vertices(verts, faces)[..., 0, :]  # [..., F, 3]
    top = jnp.concatenate([R, t[..., None]], axis=-1)  # [..., F, 3, 4]
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0], top.dtype), top.shape[:-2] + (1, 4))
    return jnp.concatenate([top, bottom], axis=-2)


def _scale(canon_verts, def_verts, faces, scale: str):
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    a_c = mesh_lib.face_areas(canon_verts, faces)
    a_d = mesh_lib.face_areas(def_verts, faces)
    a_c, a_d = jnp.broadcast_arrays(a_c, a_d)
    ok = (a_c > _TINY_AREA) & (a_d > _TINY_AREA)
    num, den = (a_d, a_c) if scale == "area_ratio" else (a_c, a_d)
    ratio = jnp.where(ok, num, 1.0) / jnp.where(ok, den, 1.0)
    if scale == "length_ratio":
        ratio = jnp.sqrt(ratio)
    return jnp.where(ok, ratio, 1.0)


def insta_face_gradients(canon_verts, def_verts, faces, *, scale: str = "area_ratio",
                         uv_coords=None, uv_faces=None):
    """INSTA per-triangle deformation gradients ``F_f = L_canon Lambda L_def^-1`` (eq. 3).

    Maps deformed-space points to canonical space with triangle f's transform.

    Args:
      canon_verts: [..., V, 3] float canonical vertex positions, metres.
      def_verts: [..., V, 3] float deformed vertex positions (batch dims broadcast with canon).
      faces: [F, 3] int vertex indices.
      scale: "area_ratio" (lambda = a_def / a_canon, as written in the thesis) or
        "length_ratio" (lambda = sqrt(a_canon / a_def)); see the module docstring.
      uv_coords, uv_faces: optional UV layout for the tangent direction (see `face_tbn`).

    Returns:
      [..., F, 4, 4] float homogeneous transforms (last row 0, 0, 0, 1).
    """
    Lc = triangle_frames(canon_verts, faces, uv_coords, uv_faces)
    Ld = triangle_frames(def_verts, faces, uv_coords, uv_faces)
    lam = _scale(canon_verts, def_verts, faces, scale)  # [..., F]
    Rc, tc = Lc[..., :3, :3], Lc[..., :3, 3]
    Rd, td = Ld[..., :3, :3], Ld[..., :3, 3]
    A = lam[..., None, None] * jnp.matmul(Rc, jnp.swapaxes(Rd, -1, -2))  # lambda Rc Rd^T
    b = tc - jnp.einsum("...ij,...j->...i", A, td)
    top = jnp.concatenate([A, b[..., None]], axis=-1)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0], top.dtype), top.shape[:-2] + (1, 4))
    return jnp.concatenate([top, bottom], axis=-2)


def face_neighbours(faces) -> np.ndarray:
    """Faces across the three edges of every face (host-side numpy; -1 on boundary edges).

    Args:
      faces: [F, 3] int array (concrete).

    Returns:
      [F, 3] int32 numpy array (see `dhjax.geometry.mesh.edge_adjacency`).
    """
    return mesh_lib.edge_adjacency(np.asarray(faces))[1]


class Canonicalized(NamedTuple):
    """Result of `canonicalize`; ``B...`` is the broadcast batch shape.

    Attributes:
      points: [B..., N, 3] canonical positions ``F_hat p``.
      face: [B..., N] int32 nearest face of the deformed mesh (the `face` argument).
      gradient: [B..., N, 4, 4] the smoothed deformation gradient F_hat applied to each point.
    """

    points: jax.Array
    face: jax.Array
    gradient: jax.Array


def _gather_faces(x, idx):
    """x [Bx..., F, C], idx [B..., K] -> [B..., K, C] (batch dims broadcast)."""
    if x.ndim == 2:
        return x[idx]
    batch = jnp.broadcast_shapes(x.shape[:-2], idx.shape[:-1])
    xb = jnp.broadcast_to(x, batch + x.shape[-2:])
    ib = jnp.broadcast_to(idx, batch + idx.shape[-1:])
    return jnp.take_along_axis(xb, ib[..., None], axis=-2)


def canonicalize(points, def_verts, canon_verts, faces, *, face, beta: float = 4.0,
                 nearest_beta: float | None = None, scale: str = "area_ratio", neighbours=None,
                 uv_coords=None, uv_faces=None) -> Canonicalized:
    """INSTA's map from deformed to canonical space (thesis eqs. 2-4, see the module docstring).

    The nearest triangle of every point is an input (an integer, so constant under
    differentiation); the result is differentiable w.r.t. points and both vertex sets. With
    `dhjax.ops.closest_point`:

        face = ops.closest_point(def_verts, faces, points).face
        out = deformation.canonicalize(points, def_verts, canon_verts, faces, face=face)

    Args:
      points: [..., N, 3] float points in deformed space, metres.
      def_verts: [..., V, 3] float deformed mesh vertices (e.g. the tracked FLAME mesh M_i).
      canon_verts: [..., V, 3] float canonical mesh vertices (M_canon), same topology.
      faces: [F, 3] int vertex indices shared by both meshes.
      face: [..., N] int index of the face of the deformed mesh nearest to each point (T in the
        module docstring), batch dims broadcasting with those of points and def_verts.
      beta: decay of the neighbour weights exp(-beta |c_f - p|), per metre (thesis: 4).
      nearest_beta: None: the nearest triangle has weight 1; a number b: its weight is
        exp(-b |c_T - p|) (the other reading of the thesis's "beta = 1" for T).
      scale: "area_ratio" (thesis) or "length_ratio"; see `insta_face_gradients`.
      neighbours: optional [F, 3] int face neighbour table (`face_neighbours(faces)`), needed
        when `faces` is traced.
      uv_coords, uv_faces: optional UV layout for the tangent direction (see `face_tbn`).

    Returns:
      Canonicalized(points [B..., N, 3], face [B..., N] int32, gradient [B..., N, 4, 4]), with
      B... the broadcast of the batch dims of points, def_verts and canon_verts.
    """
    points = jnp.asarray(points)
    if points.ndim < 2 or points.shape[-1] != 3:
        raise ValueError(f"points: expected shape [..., N, 3], got {tuple(points.shape)}")
    def_verts = jnp.asarray(def_verts)
    canon_verts = jnp.asarray(canon_verts)
    if def_verts.shape[-2:] != canon_verts.shape[-2:]:
        raise ValueError(
            f"def_verts {tuple(def_verts.shape)} and canon_verts {tuple(canon_verts.shape)}: "
            "expected [..., V, 3] with the same V"
        )
    if neighbours is None:
        if isinstance(faces, jax.core.Tracer):
            raise ValueError("canonicalize: faces is traced; pass neighbours=face_neighbours(faces)")
        neighbours = face_neighbours(faces)
    neighbours = jnp.asarray(neighbours, jnp.int32)
    n_faces = np.shape(faces)[0]
    if neighbours.shape != (n_faces, 3):
        raise ValueError(f"neighbours: expected shape [{n_faces}, 3], got {tuple(neighbours.shape)}")

    face = jnp.asarray(face)
    if not jnp.issubdtype(face.dtype, jnp.integer) or face.shape[-1:] != points.shape[-2:-1]:
        raise ValueError(f"face: expected integer indices of shape [..., {points.shape[-2]}], got "
                         f"{face.dtype} {tuple(face.shape)}")
    face = face.astype(jnp.int32)  # [Bp..., N]
    Ff = insta_face_gradients(canon_verts, def_verts, faces, scale=scale, uv_coords=uv_coords,
                              uv_faces=uv_faces)  # [Bv..., F, 4, 4]
    cent = jnp.mean(mesh_lib.face_vertices(def_verts, faces), axis=-2)  # [Bd..., F, 3]

    nb = neighbours[face]  # [B..., N, 3]
    valid = jnp.concatenate([jnp.ones(face.shape + (1,), bool), nb >= 0], axis=-1)  # [B..., N, 4]
    ids = jnp.concatenate([face[..., None], jnp.maximum(nb, 0)], axis=-1)  # [B..., N, 4]
    n = face.shape[-1]
    flat = ids.reshape(ids.shape[:-2] + (n * 4,))
    Fs = _gather_faces(Ff.reshape(Ff.shape[:-2] + (16,)), flat)
    Fs = Fs.reshape(Fs.shape[:-2] + (n, 4, 4, 4))  # [B..., N, 4 faces, 4, 4]
    cs = _gather_faces(cent, flat).reshape(Fs.shape[:-2] + (3,))  # [B..., N, 4, 3]
    dist = safe_norm(cs - points[..., None, :])  # [B..., N, 4]
    w = jnp.exp(-beta * dist)
    if nearest_beta is None:
        w = w.at[..., 0].set(1.0)  # the nearest triangle itself has weight 1
    else:
        w = w.at[..., 0].set(jnp.exp(-float(nearest_beta) * dist[..., 0]))
    w = jnp.where(valid, w, 0.0)
    F_hat = jnp.sum(w[..., None, None] * Fs, axis=-3) / jnp.sum(w, axis=-1)[..., None, None]
    out = jnp.einsum("...ij,...j->...i", F_hat[..., :3, :3], points) + F_hat[..., :3, 3]
    return Canonicalized(out, face, F_hat)


def _triangle_frames(verts, faces):
    tri = mesh_lib.face_vertices(verts, faces)
    e1 = tri[..., 1, :] - tri[..., 0, :]
    e2 = tri[..., 2, :] - tri[..., 0, :]
    n = jnp.cross(e1, e2)
    n2 = jnp.sum(n * n, axis=-1, keepdims=True)
    scale2 = jnp.maximum(jnp.sum(e1 * e1, -1), jnp.sum(e2 * e2, -1))[..., None]
    ok = (n2 > mesh_lib._TINY_SQ) & (n2 > 1e-12 * scale2 * scale2)
    e3 = jnp.where(ok, n * jnp.where(ok, n2, 1.0) ** -0.25, 0.0)  # n / sqrt(|n|)
    return jnp.stack([e1, e2, e3], axis=-1), ok[..., 0]


def triangle_canonical_inverse(canon_verts, faces):
    """[..., F, 3, 3] the inverse canonical frames E_canon^-1 of `triangle_deformation_gradients`
    (zero for degenerate triangles, whose J is then the identity), to precompute once for a fixed
    canonical mesh."""
    Ec, ok = _triangle_frames(jnp.asarray(canon_verts), faces)
    eye = jnp.eye(3, dtype=Ec.dtype)
    return jnp.where(ok[..., None, None], jnp.linalg.inv(jnp.where(ok[..., None, None], Ec, eye)), 0.0)


def triangle_deformation_gradients(canon_verts, def_verts, faces, canon_inv=None):
    """Per-triangle 3x3 deformation gradients from canonical to deformed (Sumner & Popovic 2004).

    ``J = E_def E_canon^-1`` with ``E = [v2 - v1, v3 - v1, n / sqrt(|n|)]`` and
    ``n = (v2 - v1) x (v3 - v1)``. J maps the canonical edge vectors onto the deformed ones; a
    rotation R with uniform scale s gives J = s R. A degenerate canonical triangle (zero area or
    needle-like, as in `closest_point_on_triangle`) gets J = I; a degenerate deformed triangle
    gives a singular but finite J.

    Args:
      canon_verts: [..., V, 3] float canonical vertex positions, metres.
      def_verts: [..., V, 3] float deformed vertex positions (batch dims broadcast).
      faces: [F, 3] int vertex indices.
      canon_inv: optional [..., F, 3, 3] `triangle_canonical_inverse(canon_verts, faces)`: with
        it no matrix is inverted here (and canon_verts is not read). Precomputing it also keeps
        LAPACK calls out of a jitted step (several batched inverses in one XLA:CPU program
        were seen to deadlock with jax 0.10).

    Returns:
      [..., F, 3, 3] float matrices J (deformed = J canonical, for vectors in the triangle's
      local frame).
    """
    Ed, _ = _triangle_frames(jnp.asarray(def_verts), faces)
    if canon_inv is not None:
        inv = jnp.asarray(canon_inv, Ed.dtype)
        degenerate = jnp.all(inv == 0, axis=(-2, -1), keepdims=True)
        return jnp.where(degenerate, jnp.eye(3, dtype=Ed.dtype), jnp.matmul(Ed, inv))
    Ec, ok_c = _triangle_frames(jnp.asarray(canon_verts), faces)
    eye = jnp.eye(3, dtype=Ec.dtype)
    Ec_safe = jnp.where(ok_c[..., None, None], Ec, eye)
    J = jnp.matmul(Ed, jnp.linalg.inv(Ec_safe))
    J, ok_b = jnp.broadcast_arrays(J, ok_c[..., None, None])
    return jnp.where(ok_b, J, eye)
