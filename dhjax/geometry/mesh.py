"""Triangle-mesh operations: per-face quantities, normals, tangent frames, interpolation,
surface sampling, adjacency and exact point-triangle distance.

Conventions: ``faces`` are integer arrays ``[F, 3]`` (int32) of vertex indices shared by the
whole batch; vertex arrays ``[..., V, 3]`` may carry leading batch dimensions. Face winding is
counter-clockwise around the outward normal, i.e. ``n = (v1 - v0) x (v2 - v0)``. Units are metres.

All functions except :func:`edge_adjacency` (host-side numpy) are pure and jit/vmap/grad
compatible. Divisions by lengths and areas are guarded ("double where") so that degenerate
(zero-area) triangles give finite values and finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry.vectors import TINY_SQ as _TINY_SQ, safe_norm, safe_normalize  # |x| < 1e-12 m is zero

__all__ = [
    "face_vertices",
    "face_normals",
    "face_areas",
    "vertex_normals",
    "face_tbn",
    "barycentric_interpolate",
    "sample_surface",
    "edge_adjacency",
    "closest_point_on_triangle",
]


def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _check_verts(verts, name: str = "verts"):
    verts = _as_float(verts)
    if verts.ndim < 2 or verts.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [..., V, 3], got {tuple(verts.shape)}")
    return verts


def _check_faces(faces, name: str = "faces"):
    shape = tuple(np.shape(faces))
    if len(shape) != 2 or shape[1] != 3:
        raise ValueError(f"{name}: expected shape [F, 3], got {shape}")
    faces = jnp.asarray(faces)
    if not jnp.issubdtype(faces.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer array, got dtype {faces.dtype}")
    return faces


def face_vertices(verts, faces):
    """Gather the corner positions of every face.

    Args:
      verts: [..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices.

    Returns:
      [..., F, 3, 3] float; ``out[..., f, k]`` is the position of corner ``k`` of face ``f``.
    """
    verts = _check_verts(verts)
    faces = _check_faces(faces)
    return jnp.take(verts, faces, axis=-2)


def _face_cross(verts, faces):
    tri = face_vertices(verts, faces)
    return jnp.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :])


def face_normals(verts, faces, normalize: bool = True):
    """Per-face normals ``(v1 - v0) x (v2 - v0)``.

    Args:
      verts: [..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices (counter-clockwise around the outward normal).
      normalize: if True return unit normals (zero vectors for zero-area faces, with finite
        gradients); if False return the raw cross product, whose length is twice the area.

    Returns:
      [..., F, 3] float normals.
    """
    n = _face_cross(_check_verts(verts), faces)
    if normalize:
        n = safe_normalize(n)
    return n


def face_areas(verts, faces):
    """Per-face areas ``0.5 |(v1 - v0) x (v2 - v0)|`` (gradient 0, not NaN, at zero area).

    Args:
      verts: [..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices.

    Returns:
      [..., F] float areas, square metres.
    """
    return 0.5 * safe_norm(_face_cross(_check_verts(verts), faces))


def vertex_normals(verts, faces):
    """Area-weighted vertex normals: normalised sum of the raw face normals around each vertex.

    The raw face normal ``(v1 - v0) x (v2 - v0)`` has length twice the face area, so summing it
    weights each face by its area. Vertices with no (or only zero-area) incident faces get a zero
    vector; values and gradients are always finite.

    Args:
      verts: [..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices.

    Returns:
      [..., V, 3] float unit normals (or zeros).
    """
    verts = _check_verts(verts)
    faces = _check_faces(faces)
    fn = _face_cross(verts, faces)  # [..., F, 3]
    acc = jnp.zeros_like(verts)
    for k in range(3):
        acc = acc.at[..., faces[:, k], :].add(fn)
    out = safe_normalize(acc)
    return out


def face_tbn(verts, faces, uv_coords=None, uv_faces=None):
    """Orthonormal tangent frames per face, columns (tangent, bitangent, normal).

    The normal is the unit face normal. The tangent is, before Gram-Schmidt against the normal:
      * without UVs, the first edge ``v1 - v0``;
      * with UVs, the surface derivative ``dP/du`` of the face's linear UV parametrisation,
        ``(e1 dv2 - e2 dv1) / (du1 dv2 - du2 dv1)`` with ``e_i = v_i - v0``, ``(du_i, dv_i) =
        uv_i - uv0``; faces whose UV triangle is degenerate fall back to the first edge.
    The bitangent is ``normal x tangent``, so the frame is right-handed (det = +1). It is *not*
    ``dP/dv`` (which need not be orthogonal to ``dP/du``, and has the opposite orientation on
    mirrored UV charts).

    Zero-area faces (and faces whose tangent is degenerate) get the identity frame
    (tangent = x, bitangent = y, normal = z); values and gradients stay finite.

    Args:
      verts: [..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices.
      uv_coords: [T, 2] float texture coordinates, or None.
      uv_faces: [F, 3] int indices into ``uv_coords``, or None. If ``uv_coords`` is given and
        ``uv_faces`` is None, ``faces`` is used (per-vertex UVs, T == V).

    Returns:
      [..., F, 3, 3] float rotation matrices; ``out[..., :, 0]`` tangent, ``[..., :, 1]``
      bitangent, ``[..., :, 2]`` normal.
    """
    verts = _check_verts(verts)
    faces = _check_faces(faces)
    if uv_coords is None and uv_faces is not None:
        raise ValueError("uv_faces: given without uv_coords")
    tri = face_vertices(verts, faces)
    e1 = tri[..., 1, :] - tri[..., 0, :]
    e2 = tri[..., 2, :] - tri[..., 0, :]
    cross = jnp.cross(e1, e2)
    n, n_ok = safe_normalize(cross), jnp.sum(cross * cross, -1, keepdims=True) > _TINY_SQ
    tangent_raw = e1
    if uv_coords is not None:
        uv_coords = _as_float(uv_coords)
        if uv_coords.ndim != 2 or uv_coords.shape[-1] != 2:
            raise ValueError(f"uv_coords: expected shape [T, 2], got {tuple(uv_coords.shape)}")
        if uv_faces is None:
            if uv_coords.shape[0] != verts.shape[-2]:
                raise ValueError(
                    f"uv_coords: without uv_faces expected shape [{verts.shape[-2]}, 2] "
                    f"(one per vertex), got {tuple(uv_coords.shape)}"
                )
            uv_faces = faces
        uv_faces = _check_faces(uv_faces, "uv_faces")
        if uv_faces.shape[0] != faces.shape[0]:
            raise ValueError(
                f"uv_faces: expected shape [{faces.shape[0]}, 3] (same F as faces), "
                f"got {tuple(uv_faces.shape)}"
            )
        uv = uv_coords[uv_faces]  # [F, 3, 2]
        d1 = uv[:, 1] - uv[:, 0]
        d2 = uv[:, 2] - uv[:, 0]
        det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]  # [F]
        # dP/du * |det|; only the direction matters, so multiply by sign(det) instead of dividing.
        dpdu = e1 * d2[:, 1:2] - e2 * d1[:, 1:2]
        uv_scale = jnp.maximum(jnp.sum(d1 * d1, -1), jnp.sum(d2 * d2, -1))
        uv_ok = jnp.abs(det) > 1e-12 * uv_scale + 1e-30
        sign = jnp.where(det < 0, -1.0, 1.0).astype(dpdu.dtype)
        tangent_raw = jnp.where(uv_ok[:, None], sign[:, None] * dpdu, e1)
    t_perp = tangent_raw - jnp.sum(tangent_raw * n, axis=-1, keepdims=True) * n
    t, t_ok = safe_normalize(t_perp), jnp.sum(t_perp * t_perp, -1, keepdims=True) > _TINY_SQ
    ok = n_ok & t_ok
    ex = jnp.asarray([1.0, 0.0, 0.0], n.dtype)
    ey = jnp.asarray([0.0, 1.0, 0.0], n.dtype)
    ez = jnp.asarray([0.0, 0.0, 1.0], n.dtype)
    t = jnp.where(ok, t, ex)
    n = jnp.where(ok, n, ez)
    b = jnp.where(ok, jnp.cross(n, t), ey)
    return jnp.stack([t, b, n], axis=-1)


def barycentric_interpolate(attrs, faces, face_idx, bary):
    """Interpolate per-vertex attributes at barycentric locations on faces.

    Leading batch dimensions of ``attrs``, ``face_idx`` and ``bary`` broadcast.

    Args:
      attrs: [..., V, C] float per-vertex attributes.
      faces: [F, 3] int vertex indices.
      face_idx: [..., N] int face index of each query.
      bary: [..., N, 3] float barycentric weights w.r.t. the face's corners (0, 1, 2).

    Returns:
      [..., N, C] float, ``sum_k bary[..., k] * attrs[faces[face_idx, k]]``.
    """
    attrs = _as_float(attrs)
    faces = _check_faces(faces)
    face_idx = jnp.asarray(face_idx)
    bary = _as_float(bary)
    if attrs.ndim < 2:
        raise ValueError(f"attrs: expected shape [..., V, C], got {tuple(attrs.shape)}")
    if face_idx.ndim < 1 or not jnp.issubdtype(face_idx.dtype, jnp.integer):
        raise ValueError(
            f"face_idx: expected an integer array of shape [..., N], got {tuple(face_idx.shape)} "
            f"{face_idx.dtype}"
        )
    n = face_idx.shape[-1]
    if bary.ndim < 2 or bary.shape[-2:] != (n, 3):
        raise ValueError(
            f"bary: expected shape [..., {n}, 3] (N from face_idx), got {tuple(bary.shape)}"
        )
    batch = jnp.broadcast_shapes(attrs.shape[:-2], face_idx.shape[:-1], bary.shape[:-2])
    v, c = attrs.shape[-2:]
    vid = faces[face_idx]  # [..., N, 3]
    vid = jnp.broadcast_to(vid, batch + (n, 3)).reshape(batch + (n * 3,))
    attrs_b = jnp.broadcast_to(attrs, batch + (v, c))
    corners = jnp.take_along_axis(attrs_b, vid[..., None], axis=-2).reshape(batch + (n, 3, c))
    return jnp.sum(bary[..., None] * corners, axis=-2)


def sample_surface(key, verts, faces, n: int):
    """Uniform random points on the mesh surface (faces chosen proportionally to area).

    Each face is drawn with probability ``area / total area`` (zero-area faces never), then a
    uniform point inside it with ``bary = (1 - sqrt(r1), sqrt(r1) (1 - r2), sqrt(r1) r2)``.
    ``points`` is differentiable w.r.t. ``verts`` (for the fixed sampled faces and weights).
    A mesh with zero total area gives unspecified faces.

    Args:
      key: jax PRNG key.
      verts: [V, 3] float vertex positions, metres (vmap for batches).
      faces: [F, 3] int vertex indices.
      n: number of samples (static).

    Returns:
      points: [n, 3] float, face_idx: [n] int32, bary: [n, 3] float.
    """
    verts = _check_verts(verts)
    if verts.ndim != 2:
        raise ValueError(f"verts: expected shape [V, 3], got {tuple(verts.shape)}")
    faces = _check_faces(faces)
    k_face, k_bary = jax.random.split(key)
    areas = jax.lax.stop_gradient(face_areas(verts, faces))
    # Inverse CDF over the cumulative areas: O(n log F) memory and time (a Gumbel-max draw would
    # materialise n x F). Zero-area faces own an empty CDF interval, so they are never drawn.
    cdf = jnp.cumsum(areas)
    u = jax.random.uniform(k_face, (n,), dtype=cdf.dtype) * cdf[-1]
    face_idx = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, faces.shape[0] - 1).astype(jnp.int32)
    r = jax.random.uniform(k_bary, (n, 2), dtype=verts.dtype)
    s = jnp.sqrt(r[:, 0])
    bary = jnp.stack([1.0 - s, s * (1.0 - r[:, 1]), s * r[:, 1]], axis=-1)
    points = barycentric_interpolate(verts, faces, face_idx, bary)
    return points, face_idx, bary


def edge_adjacency(faces):
    """Unique edges and face-face adjacency across edges (host-side numpy, not jittable).

    Edge ``k`` of face ``f`` is ``(faces[f, k], faces[f, (k + 1) % 3])``.

    Args:
      faces: [F, 3] int array (numpy or jax).

    Returns:
      edges: [E, 2] int32 numpy array of unique undirected edges, each stored as
        ``(min, max)``, rows sorted lexicographically.
      face_neighbours: [F, 3] int32 numpy array; ``face_neighbours[f, k]`` is the face across
        edge ``k`` of face ``f``, or -1 on a boundary edge. For non-manifold edges shared by
        m > 2 face sides, the sides (ordered by ``3 f + k``) form a cycle and each one points
        to the next one's face.
    """
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape [F, 3], got {faces.shape}")
    if faces.size and not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces: expected an integer array, got dtype {faces.dtype}")
    num_faces = faces.shape[0]
    if num_faces == 0:
        return np.zeros((0, 2), np.int32), np.zeros((0, 3), np.int32)
    half = np.stack([faces, np.roll(faces, -1, axis=1)], axis=-1).reshape(-1, 2)  # [3F, 2]
    key = np.sort(half, axis=1)
    edges, edge_id = np.unique(key, axis=0, return_inverse=True)
    edge_id = edge_id.reshape(-1)
    order = np.argsort(edge_id, kind="stable")  # half-edges grouped by edge, by 3f + k inside
    sorted_id = edge_id[order]
    counts = np.bincount(edge_id, minlength=len(edges))
    start = np.searchsorted(sorted_id, sorted_id, side="left")
    pos = np.arange(len(order))
    nxt = np.where(pos + 1 < start + counts[sorted_id], pos + 1, start)
    neighbour_half = np.empty_like(order)
    neighbour_half[order] = order[nxt]
    neighbours = neighbour_half // 3
    neighbours[counts[edge_id] < 2] = -1
    return edges.astype(np.int32), neighbours.reshape(num_faces, 3).astype(np.int32)


def _closest_on_segment(p, a, b):
    """Closest point of segment [a, b] to p: (point [..., 3], t [...]), point = a + t (b - a)."""
    ab = b - a
    l2 = jnp.sum(ab * ab, axis=-1)
    ok = l2 > _TINY_SQ
    t = jnp.sum((p - a) * ab, axis=-1) / jnp.where(ok, l2, 1.0)
    t = jnp.where(ok, jnp.clip(t, 0.0, 1.0), 0.0)
    return a + t[..., None] * ab, t


def closest_point_on_triangle(points, triangles):
    """Exact closest point on a (solid) triangle, with barycentric coordinates and distance.

    The closest point is the best of four candidates, each a point of the triangle: the
    orthogonal projection onto the plane (only when it falls inside a non-degenerate triangle)
    and the clamped projections onto the three edges. If the projection is inside it is the
    answer; otherwise the answer lies on the boundary and is the best edge point, so this is
    exact, like Ericson's Voronoi-region method, and it needs no special cases for degenerate
    triangles (zero area, collapsed edges, three equal vertices), which reduce to segments or a
    point. Values and gradients are finite for all of them. Ties are broken in the order
    interior, edge 01, edge 12, edge 20.

    Leading dimensions of ``points`` and ``triangles`` broadcast against each other, e.g.
    ``points[:, None]`` against ``triangles[None]`` gives all pairs.

    Args:
      points: [..., 3] float query points, metres.
      triangles: [..., 3, 3] float triangle corners (``triangles[..., k, :]`` is corner k).

    Returns:
      closest: [..., 3] float closest points,
      bary: [..., 3] float barycentric coordinates of ``closest`` (non-negative, sum 1),
      sq_dist: [...] float squared distances ``|points - closest|^2``.
    """
    points = _as_float(points)
    triangles = _as_float(triangles)
    if points.ndim < 1 or points.shape[-1] != 3:
        raise ValueError(f"points: expected shape [..., 3], got {tuple(points.shape)}")
    if triangles.ndim < 2 or triangles.shape[-2:] != (3, 3):
        raise ValueError(f"triangles: expected shape [..., 3, 3], got {tuple(triangles.shape)}")
    batch = jnp.broadcast_shapes(points.shape[:-1], triangles.shape[:-2])
    p = jnp.broadcast_to(points, batch + (3,))
    a = jnp.broadcast_to(triangles[..., 0, :], batch + (3,))
    b = jnp.broadcast_to(triangles[..., 1, :], batch + (3,))
    c = jnp.broadcast_to(triangles[..., 2, :], batch + (3,))

    # Interior candidate: barycentrics of the projection of p onto the plane.
    ab, ac, ap = b - a, c - a, p - a
    nrm = jnp.cross(ab, ac)
    n2 = jnp.sum(nrm * nrm, axis=-1)
    scale2 = jnp.maximum(jnp.sum(ab * ab, -1), jnp.sum(ac * ac, -1))
    tri_ok = (n2 > _TINY_SQ) & (n2 > 1e-12 * scale2 * scale2)
    inv_n2 = 1.0 / jnp.where(tri_ok, n2, 1.0)
    v = jnp.sum(jnp.cross(ap, ac) * nrm, axis=-1) * inv_n2
    w = jnp.sum(jnp.cross(ab, ap) * nrm, axis=-1) * inv_n2
    u = 1.0 - v - w
    inside = tri_ok & (u >= 0) & (v >= 0) & (w >= 0)
    q_in = a + v[..., None] * ab + w[..., None] * ac
    bary_in = jnp.stack([u, v, w], axis=-1)

    # Edge candidates.
    q01, t01 = _closest_on_segment(p, a, b)
    q12, t12 = _closest_on_segment(p, b, c)
    q20, t20 = _closest_on_segment(p, c, a)
    zero = jnp.zeros_like(t01)
    bary01 = jnp.stack([1.0 - t01, t01, zero], axis=-1)
    bary12 = jnp.stack([zero, 1.0 - t12, t12], axis=-1)
    bary20 = jnp.stack([t20, zero, 1.0 - t20], axis=-1)

    cands = jnp.stack([q_in, q01, q12, q20], axis=-2)  # [..., 4, 3]
    barys = jnp.stack([bary_in, bary01, bary12, bary20], axis=-2)
    diff = p[..., None, :] - cands
    d2 = jnp.sum(diff * diff, axis=-1)  # [..., 4]
    d2_masked = d2.at[..., 0].set(jnp.where(inside, d2[..., 0], jnp.inf))
    best = jax.lax.stop_gradient(jnp.argmin(d2_masked, axis=-1))
    onehot = jax.nn.one_hot(best, 4, dtype=cands.dtype)  # [..., 4]
    closest = jnp.sum(onehot[..., None] * cands, axis=-2)
    bary = jnp.sum(onehot[..., None] * barys, axis=-2)
    sq_dist = jnp.sum(onehot * d2, axis=-1)
    return closest, bary, sq_dist
