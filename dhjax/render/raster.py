"""Pure-JAX triangle rasterizer (tile binning + z-buffer) with differentiable barycentrics.

Conventions: cameras and pixel centres as in `dhjax.render.camera` (OpenCV; the centre of the
pixel in column j, row i is at image coordinates (u, v) = (j, i)).

Coverage rule: a pixel is covered by a triangle when its centre lies strictly inside the
projected triangle, or exactly on one of its top or left edges (the top-left fill rule of
Direct3D/OpenGL: with image v pointing down, a top edge is horizontal with the interior below
it, a left edge has the interior to its right), and inside the triangle's screen bounding box.
Edge functions are evaluated so that the two triangles sharing an edge get exactly opposite
values (`_edge_function`), so a pixel centre on a shared edge is covered by exactly one of them:
no cracks, no double coverage, in floating point. One helper, `_eval_pixels`, decides coverage
and depth for both the tiled rasterizer and the brute-force oracle, so the two agree bit for
bit.

Visibility: the smallest camera-space depth z wins; among candidates with exactly that depth
the largest face index wins (deterministic tie rule).

Faces are dropped (never drawn) when any vertex has z <= `near` (there is NO near-plane
clipping: a triangle crossing the near plane vanishes entirely), when their projected area is
exactly zero, or, with `cull_backfaces=True`, when they face away from the camera. A face is
front-facing when its normal (p1 - p0) x (p2 - p0) points towards the camera (counter-clockwise
winding as seen by the camera, as in FLAME/OBJ meshes with outward normals).

Algorithm of `rasterize` (jittable with a static `capacity`):
  1. project vertices, per-face pixel bounding boxes clipped to the image;
  2. each face's bbox overlaps a number of `tile_size` x `tile_size` tiles; a flat list of
     (face, tile) intersections of static length `capacity` is built by cumsum + searchsorted;
  3. every intersection evaluates the tile_size^2 pixel centres of its tile (coverage + perspective
     -correct depth), the depths are scatter-min'ed into a z-buffer, and a second scatter-max
     picks the face id (tie rule above);
  4. barycentrics and depth of the winning face are recomputed differentiably from the vertex
     positions (face ids fixed), so gradients reach vertex positions and attributes through
     interpolation (visibility itself is not differentiated).

Capacity: eagerly (concrete inputs, including under `jax.grad` of an un-jitted function) the
exact number of intersections is computed on the host when `capacity` is None, and a given
capacity that is too small is enlarged and the work redone, so the eager entry point never
returns a truncated image. Under jit/vmap the caller must pass a static `capacity`;
`Fragments.overflow` is then True for images whose intersections did not fit (those images
miss triangles). `count_intersections` gives the number needed.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dhjax.render.camera import Camera, _camera_to_pixels, check_camera

# Full float32 matrix products (no TF32 on GPUs): projections must stay sub-pixel accurate.
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    "Fragments",
    "rasterize",
    "rasterize_reference",
    "count_intersections",
    "interpolate",
    "rasterize_uv",
    "uv_map",
    "bake_uv",
]


@flax.struct.dataclass
class Fragments:
    """Per-pixel rasterisation result.

    Attributes:
      face_id: [B, H, W] int32 index of the visible face, -1 where empty.
      bary: [B, H, W, 3] float32 perspective-correct barycentrics of the visible face
        (weights of its vertices faces[face_id, 0..2]); 0 where empty.
      depth: [B, H, W] float32 camera-space z of the visible surface, metres; 0 where empty.
      mask: [B, H, W] bool, face_id >= 0.
      overflow: [B] bool, True where the static intersection capacity was too small (only
        possible under jit; such an image misses triangles).
    """

    face_id: jax.Array
    bary: jax.Array
    depth: jax.Array
    mask: jax.Array
    overflow: jax.Array


# ----------------------------------------------------------------------------------------------
# Shared per-pixel helper (coverage, barycentrics, depth).


def _edge_function(ua, va, ub, vb, px, py):
    """cross(a - p, b - p) = (ua - px)(vb - py) - (va - py)(ub - px), exactly antisymmetric in
    (a, b): the endpoints are put in a canonical (lexicographic) order before the products, so
    the two triangles sharing an edge evaluate it with the same floating-point operations (XLA
    may contract a*b - c*d into an FMA, which is not antisymmetric) and get exactly opposite
    values. Broadcasting; the canonical order is decided on the vertex arrays only."""
    swap = (ua > ub) | ((ua == ub) & (va > vb))
    u0, v0 = jnp.where(swap, ub, ua), jnp.where(swap, vb, va)
    u1, v1 = jnp.where(swap, ua, ub), jnp.where(swap, va, vb)
    raw = (u0 - px) * (v1 - py) - (v0 - py) * (u1 - px)
    return jnp.where(swap, -raw, raw)


def _top_left(eu, ev):
    """Top-left rule for an edge vector (eu, ev) oriented with the triangle's interior on the
    positive side of its edge function (image v points down): a left edge points up (ev < 0), a
    top edge is horizontal and points right."""
    return (ev < 0) | ((ev == 0) & (eu > 0))


def _eval_pixels(px, py, tu, tv, tz):
    """Coverage, perspective-correct barycentrics and depth of pixel centres w.r.t. triangles.

    Args (all broadcastable):
      px, py: [...] float32 pixel-centre image coordinates.
      tu, tv, tz: tuples of three [...] arrays: screen u, v and camera z of the vertices.
    Returns:
      inside: [...] bool (top-left fill rule, bounding-box test, needs positive depth),
      bary: [..., 3] float32 perspective-correct barycentrics,
      depth: [...] float32 camera-space z.
    Finite values and gradients for any finite input (safe divisions).
    """
    u0, u1, u2 = tu
    v0, v1, v2 = tv
    z0, z1, z2 = tz
    w0 = _edge_function(u1, v1, u2, v2, px, py)  # edge 1 -> 2
    w1 = _edge_function(u2, v2, u0, v0, px, py)  # edge 2 -> 0
    w2 = _edge_function(u0, v0, u1, v1, px, py)  # edge 0 -> 1
    wsum = w0 + w1 + w2
    area2 = (u1 - u0) * (v2 - v0) - (v1 - v0) * (u2 - u0)
    s = jnp.where(area2 < 0, -1.0, 1.0).astype(w0.dtype)
    # An edge k from vertex i to j has w_k(p) = cross(e, p - p_i) with e = p_j - p_i; inside means
    # s w_k > 0, or w_k == 0 on a top-left edge of the oriented (s e) triangle.
    cover = []
    for w, (ua, va, ub, vb) in ((w0, (u1, v1, u2, v2)), (w1, (u2, v2, u0, v0)), (w2, (u0, v0, u1, v1))):
        cover.append((s * w > 0) | ((w == 0) & _top_left(s * (ub - ua), s * (vb - va))))
    in_box = (
        (px >= jnp.minimum(jnp.minimum(u0, u1), u2))
        & (px <= jnp.maximum(jnp.maximum(u0, u1), u2))
        & (py >= jnp.minimum(jnp.minimum(v0, v1), v2))
        & (py <= jnp.maximum(jnp.maximum(v0, v1), v2))
    )
    ok_w = (wsum != 0) & (area2 != 0)
    ws = jnp.where(wsum != 0, wsum, 1.0)
    b0, b1, b2 = w0 / ws, w1 / ws, w2 / ws
    ok_z = (z0 != 0) & (z1 != 0) & (z2 != 0)
    q0 = b0 / jnp.where(ok_z, z0, 1.0)
    q1 = b1 / jnp.where(ok_z, z1, 1.0)
    q2 = b2 / jnp.where(ok_z, z2, 1.0)
    qsum = q0 + q1 + q2
    ok_q = qsum > 0
    qs = jnp.where(ok_q, qsum, 1.0)
    inside = cover[0] & cover[1] & cover[2] & in_box & ok_w & ok_z & ok_q
    bary = jnp.stack([q0 / qs, q1 / qs, q2 / qs], -1)
    depth = 1.0 / qs
    return inside, bary, depth


# ----------------------------------------------------------------------------------------------
# Per-face set-up shared by the tiled rasterizer and the oracle.


def _face_setup(verts, faces, K, R, t, near, cull):
    """Screen-space triangles of one camera.

    verts: [V, 3] world; faces: [F, 3]; K, R: [3, 3]; t: [3].
    Returns tu, tv, tz: [F, 3] screen u, v and camera z per face vertex; valid: [F] bool.
    """
    xc = jnp.einsum("ij,vj->vi", R, verts, precision=_HI) + t
    uv, z = _camera_to_pixels(K, xc)
    tu = uv[faces, 0]
    tv = uv[faces, 1]
    tz = z[faces]
    area2 = (tu[:, 1] - tu[:, 0]) * (tv[:, 2] - tv[:, 0]) - (tv[:, 1] - tv[:, 0]) * (tu[:, 2] - tu[:, 0])
    finite = jnp.all(jnp.isfinite(tu) & jnp.isfinite(tv) & jnp.isfinite(tz), axis=1)
    valid = jnp.all(tz > near, axis=1) & (area2 != 0) & finite
    # With v pointing down, front-facing (counter-clockwise seen by the camera) faces have
    # negative signed area in (u, v). `cull` may be a traced bool.
    valid = valid & ((area2 < 0) | jnp.logical_not(cull))
    return tu, tv, tz, valid


def _uv_face_setup(uv_coords, uv_faces, height, width):
    """Texture-space triangles: texel (row i, col j) centre at (u, v) = ((j+.5)/W, 1-(i+.5)/H)."""
    px = uv_coords[:, 0] * width - 0.5
    py = (1.0 - uv_coords[:, 1]) * height - 0.5
    tu = px[uv_faces]
    tv = py[uv_faces]
    tz = jnp.ones_like(tu)
    area2 = (tu[:, 1] - tu[:, 0]) * (tv[:, 2] - tv[:, 0]) - (tv[:, 1] - tv[:, 0]) * (tu[:, 2] - tu[:, 0])
    valid = (area2 != 0) & jnp.all(jnp.isfinite(tu) & jnp.isfinite(tv), axis=1)
    return tu, tv, tz, valid


def _split3(a):
    return a[..., 0], a[..., 1], a[..., 2]


# ----------------------------------------------------------------------------------------------
# Tiled visibility.


def _tile_ranges(tu, tv, valid, width, height, tile):
    """Per-face pixel bbox in tiles; returns tx0, ty0, ntx, count ([F] int32 each)."""
    umin, umax = jnp.min(tu, 1), jnp.max(tu, 1)
    vmin, vmax = jnp.min(tv, 1), jnp.max(tv, 1)
    # Integer pixel j is in [umin, umax] iff ceil(umin) <= j <= floor(umax); clip first so that
    # huge coordinates do not overflow int32.
    j0 = jnp.maximum(jnp.ceil(jnp.clip(umin, -1.0, width)).astype(jnp.int32), 0)
    j1 = jnp.minimum(jnp.floor(jnp.clip(umax, -1.0, width)).astype(jnp.int32), width - 1)
    i0 = jnp.maximum(jnp.ceil(jnp.clip(vmin, -1.0, height)).astype(jnp.int32), 0)
    i1 = jnp.minimum(jnp.floor(jnp.clip(vmax, -1.0, height)).astype(jnp.int32), height - 1)
    has = valid & (j0 <= j1) & (i0 <= i1)
    tx0, ty0 = j0 // tile, i0 // tile
    ntx = jnp.where(has, j1 // tile - tx0 + 1, 0)
    nty = jnp.where(has, i1 // tile - ty0 + 1, 0)
    return tx0, ty0, ntx, ntx * nty


def _visible_faces_tiled(tu, tv, tz, valid, width, height, tile, capacity):
    """Face id image [H, W] (int32, -1 empty) and total number of (face, tile) intersections."""
    F = tu.shape[0]
    tx0, ty0, ntx, count = _tile_ranges(tu, tv, valid, width, height, tile)
    ends = jnp.cumsum(count)
    total = ends[-1]
    k = jnp.arange(capacity, dtype=jnp.int32)
    f = jnp.minimum(jnp.searchsorted(ends, k, side="right").astype(jnp.int32), F - 1)
    live = k < total
    local = k - (ends[f] - count[f])
    nt = jnp.maximum(ntx[f], 1)
    tx = tx0[f] + local % nt
    ty = ty0[f] + local // nt
    a = jnp.arange(tile, dtype=jnp.int32)
    pxi = tx[:, None, None] * tile + a[None, None, :]  # [N, 1, T]
    pyi = ty[:, None, None] * tile + a[None, :, None]  # [N, T, 1]
    table = jnp.concatenate([tu, tv, tz], axis=1)[f][:, None, None, :]  # one gather, [N, 1, 1, 9]
    fu, fv, fz = table[..., 0:3], table[..., 3:6], table[..., 6:9]
    inside, _, depth = _eval_pixels(
        pxi.astype(jnp.float32), pyi.astype(jnp.float32), _split3(fu), _split3(fv), _split3(fz)
    )
    inside = inside & live[:, None, None] & (pxi < width) & (pyi < height)
    npix = width * height
    pix = jnp.where(inside, pyi * width + pxi, npix).reshape(-1)
    depth = depth.reshape(-1)
    zbuf = jnp.full((npix,), jnp.inf, jnp.float32).at[pix].min(depth, mode="drop")
    hit = inside.reshape(-1) & (depth == zbuf[jnp.minimum(pix, npix - 1)])
    fid = jnp.broadcast_to(f[:, None, None], inside.shape).reshape(-1)
    ids = jnp.full((npix,), -1, jnp.int32).at[jnp.where(hit, pix, npix)].max(fid, mode="drop")
    return ids.reshape(height, width), total


def _pixel_grid(width, height):
    jj, ii = jnp.meshgrid(jnp.arange(width, dtype=jnp.float32), jnp.arange(height, dtype=jnp.float32))
    return jj, ii  # [H, W] each


def _assemble_one(tu, tv, tz, face_id, width, height):
    """Differentiable barycentrics/depth of the given visible faces of one image."""
    mask = face_id >= 0
    fid = jnp.maximum(face_id, 0)
    m = mask[..., None]
    # Harmless stand-in triangle at empty pixels (keeps values and gradients finite there).
    fu = jnp.where(m, tu[fid], jnp.array([0.0, 1.0, 0.0], jnp.float32))
    fv = jnp.where(m, tv[fid], jnp.array([0.0, 0.0, 1.0], jnp.float32))
    fz = jnp.where(m, tz[fid], 1.0)
    jj, ii = _pixel_grid(width, height)
    _, bary, depth = _eval_pixels(jj, ii, _split3(fu), _split3(fv), _split3(fz))
    bary = jnp.where(m, bary, 0.0)
    depth = jnp.where(mask, depth, 0.0)
    return bary, depth, mask


# ----------------------------------------------------------------------------------------------
# Input handling.


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _is_concrete(*trees) -> bool:
    leaves = jax.tree.leaves(trees)
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


def _check_faces(faces, num_verts=None, name="faces"):
    faces = jnp.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] < 1:
        raise ValueError(f"{name} must have shape [F, 3] with F >= 1, got {faces.shape}")
    if not jnp.issubdtype(faces.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {faces.dtype}")
    faces = faces.astype(jnp.int32)
    if num_verts is not None and _is_concrete(faces):
        host = np.asarray(faces)  # concrete: check on the host (jnp ops would be staged under jit)
        fmin, fmax = int(host.min()), int(host.max())
        if fmin < 0 or fmax >= num_verts:
            raise ValueError(f"{name} indices must lie in [0, {num_verts}), got range [{fmin}, {fmax}]")
    return faces


def _prepare(vertices, faces, camera):
    """Validate and broadcast vertices [B, V, 3] against a camera of batch shape () or [B]."""
    check_camera(camera)
    vertices = jnp.asarray(vertices, jnp.float32)
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must have shape [B, V, 3], got {vertices.shape}")
    faces = _check_faces(faces, vertices.shape[1])
    cb = camera.batch_shape
    if len(cb) > 1:
        raise ValueError(f"camera must have batch shape () or [B], got {cb}")
    bv = vertices.shape[0]
    bc = cb[0] if cb else 1
    if cb and bv != bc and bv != 1 and bc != 1:
        raise ValueError(
            f"camera batch {cb} does not match vertices batch {bv} (expected [B], [1] or ())"
        )
    B = max(bv, bc)
    vertices = jnp.broadcast_to(vertices, (B,) + vertices.shape[1:])
    K = jnp.broadcast_to(camera.K, (B, 3, 3))
    R = jnp.broadcast_to(camera.R, (B, 3, 3))
    t = jnp.broadcast_to(camera.t, (B, 3))
    return vertices, faces, K, R, t


def _round_capacity(n: int) -> int:
    """Round up to at most ~25% above n, with few distinct values (limits recompilation)."""
    m = max(int(n), 1024)
    step = 2 ** max(int(math.floor(math.log2(m))) - 2, 0)
    return int(-(-m // step) * step)


# ----------------------------------------------------------------------------------------------
# Jitted kernels.


@functools.partial(jax.jit, static_argnames=("width", "height", "tile"))
def _count_jit(verts, faces, K, R, t, near, cull, *, width, height, tile):
    def one(v, k, r, tt):
        tu, tv, _, valid = _face_setup(v, faces, k, r, tt, near, cull)
        return jnp.sum(_tile_ranges(tu, tv, valid, width, height, tile)[3])

    return jax.vmap(one)(verts, K, R, t)


@functools.partial(jax.jit, static_argnames=("width", "height", "tile", "capacity"))
def _visibility_jit(verts, faces, K, R, t, near, cull, *, width, height, tile, capacity):
    def one(v, k, r, tt):
        tu, tv, tz, valid = _face_setup(v, faces, k, r, tt, near, cull)
        return _visible_faces_tiled(tu, tv, tz, valid, width, height, tile, capacity)

    return jax.vmap(one)(verts, K, R, t)


@functools.partial(jax.jit, static_argnames=("width", "height"))
def _assemble_jit(verts, faces, K, R, t, face_id, near, *, width, height):
    def one(v, k, r, tt, fid):
        tu, tv, tz, _ = _face_setup(v, faces, k, r, tt, near, False)
        return _assemble_one(tu, tv, tz, fid, width, height)

    return jax.vmap(one)(verts, K, R, t, face_id)


def count_intersections(
    vertices, faces, camera: Camera, *, tile_size: int = 8, near: float = 1e-3, cull_backfaces: bool = False
) -> jax.Array:
    """Number of (face, tile) intersections `rasterize` needs per image.

    Args:
      vertices: [B, V, 3] world positions, metres; faces: [F, 3] int; camera: batch () or [B].
    Returns:
      [B] int32; pass `capacity >= max(...)` to `rasterize` under jit.
    """
    vertices, faces, K, R, t = _prepare(vertices, faces, camera)
    return _count_jit(
        lax.stop_gradient(vertices), faces, K, R, t, _f32(near), jnp.asarray(cull_backfaces, bool),
        width=int(camera.width), height=int(camera.height), tile=int(tile_size),
    )


def rasterize(
    vertices,
    faces,
    camera: Camera,
    *,
    tile_size: int = 8,
    capacity: int | None = None,
    near: float = 1e-3,
    cull_backfaces: bool = False,
) -> Fragments:
    """Rasterise triangle meshes seen by pinhole cameras (tiled z-buffer, see module docstring).

    Args:
      vertices: [B, V, 3] float32 world positions, metres (B = 1 broadcasts over a camera batch).
      faces: [F, 3] int32 vertex indices, shared by the batch.
      camera: Camera with batch shape [B] (one per mesh) or () (shared); image H x W.
      tile_size: static tile edge in pixels for binning (8 measured fastest on CPU for
        10k-face meshes at 512 x 512; 16 wastes more pixel tests on small triangles).
      capacity: static number of (face, tile) intersections per image. None: computed exactly
        on the host (needs concrete inputs; under jit pass it explicitly). Eagerly a too small
        capacity is enlarged automatically; under jit see `Fragments.overflow`.
      near: faces with a vertex at camera z <= near are dropped (no clipping), metres.
      cull_backfaces: drop faces whose normal points away from the camera.
    Returns:
      Fragments with [B, H, W] maps. `bary` and `depth` are differentiable w.r.t. `vertices`
      (and the camera) with visibility held fixed.
    """
    vertices, faces, K, R, t = _prepare(vertices, faces, camera)
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    W, H = int(camera.width), int(camera.height)
    # Visibility never needs gradients; stop_gradient also exposes concrete values under grad.
    vs, Ks, Rs, ts = (lax.stop_gradient(a) for a in (vertices, K, R, t))
    near = _f32(lax.stop_gradient(near))
    cull = jnp.asarray(cull_backfaces, bool)
    concrete = _is_concrete(vs, Ks, Rs, ts, faces, near, cull)
    kw = dict(width=W, height=H, tile=int(tile_size))
    if capacity is None:
        if not concrete:
            raise ValueError(
                "rasterize under jit/vmap needs a static capacity=...; "
                "get it eagerly with count_intersections(...)"
            )
        capacity = _round_capacity(int(jnp.max(_count_jit(vs, faces, Ks, Rs, ts, near, cull, **kw))))
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    face_id, total = _visibility_jit(vs, faces, Ks, Rs, ts, near, cull, capacity=capacity, **kw)
    if concrete:
        needed = int(jnp.max(total))
        if needed > capacity:  # never return a truncated image eagerly
            face_id, total = _visibility_jit(
                vs, faces, Ks, Rs, ts, near, cull, capacity=_round_capacity(needed), **kw
            )
    overflow = total > capacity if not concrete else jnp.zeros(total.shape, bool)
    bary, depth, mask = _assemble_jit(vertices, faces, K, R, t, face_id, near, width=W, height=H)
    return Fragments(face_id=face_id, bary=bary, depth=depth, mask=mask, overflow=overflow)


# ----------------------------------------------------------------------------------------------
# Brute-force oracle.


def _reference_one(tu, tv, tz, valid, width, height, chunk):
    F = tu.shape[0]
    nchunks = -(-F // chunk)
    pad = nchunks * chunk - F

    def padf(a, value):
        return jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], value, a.dtype)], 0)

    tu, tv, tz = padf(tu, 0.0), padf(tv, 0.0), padf(tz, 1.0)
    valid = padf(valid, False)
    jj, ii = _pixel_grid(width, height)
    px, py = jj.reshape(-1, 1), ii.reshape(-1, 1)
    P = px.shape[0]

    def body(carry, c):
        best_d, best_id, best_b = carry
        sl = lambda a: lax.dynamic_slice_in_dim(a, c * chunk, chunk, 0)
        cu, cv, cz, cval = sl(tu), sl(tv), sl(tz), sl(valid)
        inside, bary, depth = _eval_pixels(px, py, _split3(cu[None]), _split3(cv[None]), _split3(cz[None]))
        inside = inside & cval[None, :]
        d = jnp.where(inside, depth, jnp.inf)  # [P, chunk]
        dmin = jnp.min(d, axis=1)
        ids = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        cand = inside & (d == dmin[:, None])
        cid = jnp.max(jnp.where(cand, ids[None, :], -1), axis=1)
        local = jnp.maximum(cid - c * chunk, 0)
        cb = jnp.take_along_axis(bary, local[:, None, None], axis=1)[:, 0]
        # Later chunks hold larger ids, so on equal depth the new candidate wins.
        take = (cid >= 0) & (dmin <= best_d)
        return (
            jnp.where(take, dmin, best_d),
            jnp.where(take, cid, best_id),
            jnp.where(take[:, None], cb, best_b),
        ), None

    init = (
        jnp.full((P,), jnp.inf, jnp.float32),
        jnp.full((P,), -1, jnp.int32),
        jnp.zeros((P, 3), jnp.float32),
    )
    (best_d, best_id, best_b), _ = lax.scan(body, init, jnp.arange(nchunks))
    mask = best_id >= 0
    depth = jnp.where(mask, best_d, 0.0)
    return (
        best_id.reshape(height, width),
        best_b.reshape(height, width, 3),
        depth.reshape(height, width),
        mask.reshape(height, width),
    )


@functools.partial(jax.jit, static_argnames=("width", "height", "chunk"))
def _reference_jit(verts, faces, K, R, t, near, cull, *, width, height, chunk):
    def one(v, k, r, tt):
        tu, tv, tz, valid = _face_setup(v, faces, k, r, tt, near, cull)
        return _reference_one(tu, tv, tz, valid, width, height, chunk)

    return jax.vmap(one)(verts, K, R, t)


def rasterize_reference(
    vertices, faces, camera: Camera, *, near: float = 1e-3, cull_backfaces: bool = False, face_chunk: int | None = None
) -> Fragments:
    """Brute-force rasterizer over all (pixel, face) pairs: the test oracle for `rasterize`.

    Same inputs, conventions, coverage helper and tie rule as `rasterize`, without tiles or
    capacities. Faces are processed in chunks of `face_chunk` (default: about 2^20 / (H W)
    faces) so memory stays bounded; time is O(H W F). Use it for small images only.

    Args:
      vertices: [B, V, 3] float32 world positions; faces: [F, 3] int; camera: batch () or [B].
    Returns:
      Fragments ([B, H, W] maps; overflow all False).
    """
    vertices, faces, K, R, t = _prepare(vertices, faces, camera)
    W, H = int(camera.width), int(camera.height)
    F = faces.shape[0]
    chunk = int(face_chunk) if face_chunk else max(1, min(F, (1 << 20) // (W * H)))
    fid, bary, depth, mask = _reference_jit(
        vertices, faces, K, R, t, _f32(near), jnp.asarray(cull_backfaces, bool), width=W, height=H, chunk=chunk
    )
    return Fragments(face_id=fid, bary=bary, depth=depth, mask=mask, overflow=jnp.zeros(fid.shape[:1], bool))


# ----------------------------------------------------------------------------------------------
# Attribute interpolation and texture space.


def interpolate(attrs, faces, frags: Fragments) -> jax.Array:
    """Interpolate per-vertex attributes with the fragments' barycentrics.

    Args:
      attrs: [B, V, C] or [V, C] float per-vertex attributes (B broadcasts with frags' batch).
      faces: [F, 3] int, the faces `frags.face_id` refers to.
      frags: Fragments with [Bf, H, W] maps.
    Returns:
      [max(B, Bf), H, W, C] float32, 0 at empty pixels. Differentiable w.r.t. attrs and, through
      frags.bary, the vertex positions that produced the fragments.
    """
    attrs = jnp.asarray(attrs)
    if attrs.ndim not in (2, 3):
        raise ValueError(f"attrs must have shape [B, V, C] or [V, C], got {attrs.shape}")
    faces = _check_faces(faces, attrs.shape[-2])
    Bf = frags.face_id.shape[0]
    if attrs.ndim == 3 and attrs.shape[0] not in (1, Bf) and Bf != 1:
        raise ValueError(f"attrs batch {attrs.shape[0]} does not match fragments batch {Bf}")
    return _interpolate_jit(attrs.astype(jnp.float32), faces, frags.face_id, frags.bary, frags.mask)


@jax.jit
def _interpolate_jit(attrs, faces, face_id, bary, mask):
    vids = faces[jnp.maximum(face_id, 0)]  # [Bf, H, W, 3]
    if attrs.ndim == 2:
        vals = attrs[vids]  # [Bf, H, W, 3, C]
    else:
        B = max(attrs.shape[0], vids.shape[0])
        a = jnp.broadcast_to(attrs, (B,) + attrs.shape[1:])
        v = jnp.broadcast_to(vids, (B,) + vids.shape[1:])
        vals = jax.vmap(lambda x, i: x[i])(a, v)
    out = jnp.sum(bary[..., None] * vals, axis=-2)
    return jnp.where(mask[..., None], out, 0.0)


@functools.partial(jax.jit, static_argnames=("width", "height", "tile", "capacity"))
def _uv_visibility_jit(uv_coords, uv_faces, *, width, height, tile, capacity):
    tu, tv, tz, valid = _uv_face_setup(uv_coords, uv_faces, height, width)
    fid, total = _visible_faces_tiled(tu, tv, tz, valid, width, height, tile, capacity)
    bary, depth, mask = _assemble_one(tu, tv, tz, fid, width, height)
    return fid, bary, depth, mask, total


def rasterize_uv(
    uv_coords, uv_faces, height: int, width: int, *, tile_size: int = 8, capacity: int | None = None
) -> Fragments:
    """Rasterise a mesh in texture space (for position/normal maps and texture baking).

    UV convention (OpenGL/OBJ): u to the right, v up; texel (row i, column j) of an H x W map
    has its centre at (u, v) = ((j + 0.5) / W, 1 - (i + 0.5) / H). Barycentrics are linear in UV
    (no perspective); `depth` is 1 on covered texels. Overlapping UV triangles resolve to the
    largest face index. Capacity handling as in `rasterize`.

    Args:
      uv_coords: [T, 2] float texture coordinates in [0, 1].
      uv_faces: [F, 3] int indices into uv_coords (same face order as the mesh faces).
      height, width: static map size in texels.
    Returns:
      Fragments with [1, H, W] maps (batch of one).
    """
    uv_coords = jnp.asarray(uv_coords, jnp.float32)
    if uv_coords.ndim != 2 or uv_coords.shape[1] != 2:
        raise ValueError(f"uv_coords must have shape [T, 2], got {uv_coords.shape}")
    uv_faces = _check_faces(uv_faces, uv_coords.shape[0], name="uv_faces")
    H, W = int(height), int(width)
    if H < 1 or W < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    concrete = _is_concrete(uv_coords, uv_faces)
    kw = dict(width=W, height=H, tile=int(tile_size))
    if capacity is None:
        if not concrete:
            raise ValueError("rasterize_uv under jit/vmap needs a static capacity=...")
        tu, tv, _, valid = _uv_face_setup(uv_coords, uv_faces, H, W)
        capacity = _round_capacity(int(jnp.sum(_tile_ranges(tu, tv, valid, W, H, int(tile_size))[3])))
    capacity = int(capacity)
    out = _uv_visibility_jit(uv_coords, uv_faces, capacity=capacity, **kw)
    if concrete and int(out[4]) > capacity:
        capacity = _round_capacity(int(out[4]))
        out = _uv_visibility_jit(uv_coords, uv_faces, capacity=capacity, **kw)
    fid, bary, depth, mask, total = out
    overflow = (total > capacity) if not concrete else jnp.asarray(False)
    return Fragments(
        face_id=fid[None], bary=bary[None], depth=depth[None], mask=mask[None], overflow=overflow[None]
    )


def uv_map(attrs, faces, uv_frags: Fragments) -> jax.Array:
    """Bake per-vertex attributes into texture space (e.g. a position map), with `bake_uv`.

    Args:
      attrs: [B, V, C] or [V, C] per-vertex attributes (e.g. vertex positions).
      faces: [F, 3] mesh faces indexing attrs, in the same face order as the uv_faces that
        produced `uv_frags`.
      uv_frags: Fragments from `rasterize_uv` ([1, H, W]).
    Returns:
      [B, H, W, C] float32 (B = 1 for [V, C] attrs), 0 on texels outside the UV layout.
    """
    attrs = jnp.asarray(attrs)
    if attrs.ndim not in (2, 3):
        raise ValueError(f"attrs must have shape [B, V, C] or [V, C], got {attrs.shape}")
    faces = _check_faces(faces, attrs.shape[-2])
    if uv_frags.face_id.ndim != 3 or uv_frags.face_id.shape[0] != 1:
        raise ValueError(f"uv_frags: expected the [1, H, W] fragments of rasterize_uv, got face_id "
                         f"of shape {uv_frags.face_id.shape}")
    out = bake_uv(attrs, faces, uv_frags.face_id[0], uv_frags.bary[0], uv_frags.mask[0])
    return out[None] if attrs.ndim == 2 else out


def bake_uv(attrs, faces, face_id, bary, mask) -> jax.Array:
    """Per-vertex attributes -> texels of a rasterised UV layout (barycentric interpolation).

    dhjax's one texture-space baking: `uv_map` applies it to `rasterize_uv` fragments and
    `dhjax.data.textures.bake` to a model's precomputed UV fields. Pure jittable JAX without
    checks (callers validate); the per-texel sum is a float32 contraction at HIGHEST precision.

    Args:
      attrs: [..., V, C] float per-vertex attributes (cast to float32).
      faces: [F, 3] int mesh faces indexing attrs, in the face order of the UV layout.
      face_id: [H, W] int face of every texel (-1 outside the layout).
      bary: [H, W, 3] float barycentrics of the texel centre in that face.
      mask: [H, W] bool, True on texels inside the layout.
    Returns:
      [..., H, W, C] float32, 0 outside the layout; differentiable w.r.t. attrs.
    """
    attrs = jnp.asarray(attrs, jnp.float32)
    vids = jnp.asarray(faces)[jnp.maximum(face_id, 0)]  # [H, W, 3]
    vals = attrs[..., vids, :]  # [..., H, W, 3, C]
    out = jnp.einsum("...hwkc,hwk->...hwc", vals, bary, precision=_HI)
    return jnp.where(mask[..., None], out, 0.0)
