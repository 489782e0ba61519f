"""Closest point on a triangle mesh: nearest face, closest surface point, barycentrics, distance.

`closest_point(vertices, faces, points)` returns, for every query point, the exact closest point
on the (solid) triangles of the mesh. Three implementations of this one op:

* `backend="reference"`: pure JAX brute force (`closest_point_reference`): every point against
  every face with `dhjax.geometry.mesh.closest_point_on_triangle`, chunked over points with
  `lax.map` so memory stays bounded (about 2^20 point-face pairs per chunk). O(N F): the oracle
  of the tests and the fallback when the kernel library is not built.
* `backend="cpu"`: C++ handler (kernels/bvh/bvh_cpu.cc): a bounding volume hierarchy (binned SAH
  over triangle centroids) built inside the handler for each mesh on every call, then a
  depth-first nearest-first traversal per point, threads over points.
* `backend="cuda"`: CUDA handler (kernels/bvh/bvh_cuda.cu): a linear BVH (Karras 2012: Morton
  codes of centroids, radix sort, parallel hierarchy emission, bottom-up boxes) built on the
  device on every call, one thread per query point.
`backend="auto"` picks the kernel of JAX's default backend when its library is built, else the
reference. Rebuilding the BVH per call makes the op a pure function of its inputs (no cached
state), so animated meshes need nothing special; the CPU build of the 10k-face head takes about
2.5 ms on one core (`experiments/bench_geometry.py` measures it).

The point-triangle test is the same construction (and thresholds) in all three, so results agree
to float rounding, degenerate (zero-area) triangles included. When several faces are equally
close (a point closest to a shared edge or vertex, or exactly equidistant faces), implementations
may return different faces; the closest point and the distance agree.

Gradients: `point`, `bary` and `sq_dist` are differentiable w.r.t. `vertices` and `points` with
the chosen face held constant (a `jax.custom_vjp` whose backward recomputes the closest point on
the chosen triangle in JAX with `closest_point_on_triangle`, for every backend). The distance is
a continuous function whose gradient is exact almost everywhere; it jumps where the nearest face
changes (the medial axis) as the true gradient does. `face` is an integer output (no gradient).

The kernels compute in float32: other float inputs are cast to float32 and the outputs cast back
to the inputs' dtype; the reference computes in the inputs' dtype. Units are those of the inputs
(metres throughout dhjax).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.geometry import mesh as mesh_lib
from dhjax.ops import _ffi

__all__ = ["ClosestPoint", "closest_point", "closest_point_reference", "kernel_available", "build_seconds"]

_OP = "bvh"
_TARGET = "dhjax_bvh_closest_point"
_TARGETS = {
    "cpu": ((_TARGET, "DhjaxBvhClosestPoint"),),
    "cuda": ((_TARGET, "DhjaxBvhClosestPointCuda"),),
}
# Point-face pairs per chunk of the brute-force reference (bounds its memory).
_REFERENCE_PAIRS = 1 << 20


class ClosestPoint(NamedTuple):
    """Result of `closest_point`; ``B...`` is the broadcast batch shape of vertices and points.

    Attributes:
      face: [B..., N] int32 index of the closest face.
      point: [B..., N, 3] float closest point on that face.
      bary: [B..., N, 3] float barycentric coordinates of ``point`` w.r.t. the face's corners
        (``faces[face, 0..2]``), non-negative, summing to 1.
      sq_dist: [B..., N] float squared distance ``|points - point|^2``.
    """

    face: jax.Array
    point: jax.Array
    bary: jax.Array
    sq_dist: jax.Array


def kernel_available(platform: str = "cpu") -> bool:
    """True when the BVH library for `platform` ("cpu" | "cuda") is built and registered."""
    return _ffi.register(_OP, platform, _TARGETS[platform])


def _check_inputs(vertices, faces, points):
    vertices = jnp.asarray(vertices)
    points = jnp.asarray(points)
    if not jnp.issubdtype(vertices.dtype, jnp.floating):
        vertices = vertices.astype(jnp.float32)
    if not jnp.issubdtype(points.dtype, jnp.floating):
        points = points.astype(jnp.float32)
    if vertices.ndim < 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices: expected shape [..., V, 3], got {tuple(vertices.shape)}")
    if points.ndim < 2 or points.shape[-1] != 3:
        raise ValueError(f"points: expected shape [..., N, 3], got {tuple(points.shape)}")
    if np.ndim(faces) != 2 or np.shape(faces)[1] != 3:
        raise ValueError(f"faces: expected shape [F, 3], got {tuple(np.shape(faces))}")
    if np.shape(faces)[0] == 0:
        raise ValueError(f"faces: the mesh has no faces (faces has shape {tuple(np.shape(faces))}); "
                         "closest points need at least one triangle")
    if vertices.shape[-2] == 0:
        raise ValueError(f"vertices: the mesh has no vertices (vertices has shape "
                         f"{tuple(vertices.shape)}); closest points need at least one triangle")
    if not isinstance(faces, jax.core.Tracer):  # concrete (numpy, list or jax.Array): check the range
        f = np.asarray(faces)
        if not np.issubdtype(f.dtype, np.integer):
            raise ValueError(f"faces: expected an integer array, got dtype {f.dtype}")
        if f.size and (f.min() < 0 or f.max() >= vertices.shape[-2]):
            raise ValueError(
                f"faces: indices must lie in [0, {vertices.shape[-2]}), got [{f.min()}, {f.max()}]"
            )
    faces = jnp.asarray(faces)
    if not jnp.issubdtype(faces.dtype, jnp.integer):
        raise ValueError(f"faces: expected an integer array, got dtype {faces.dtype}")
    try:
        batch = jnp.broadcast_shapes(vertices.shape[:-2], points.shape[:-2])
    except ValueError:
        raise ValueError(
            f"vertices {tuple(vertices.shape)} and points {tuple(points.shape)}: leading (batch) "
            "dimensions do not broadcast"
        ) from None
    dtype = jnp.promote_types(vertices.dtype, points.dtype)
    return vertices.astype(dtype), faces.astype(jnp.int32), points.astype(dtype), batch


# ----------------------------------------------------------------------------------------------
# Pure-JAX reference.


def _reference_one(vertices, faces, points):
    """Brute force for one mesh: vertices [V, 3], faces [F, 3], points [N, 3]."""
    tris = jnp.take(vertices, faces, axis=0)  # [F, 3, 3]
    tri_ok = jnp.all(jnp.isfinite(tris), axis=(1, 2))
    n, f = points.shape[0], faces.shape[0]
    chunk = max(1, min(n, _REFERENCE_PAIRS // max(f, 1)))
    n_chunks = -(-n // chunk)
    p = jnp.pad(points, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, 3)

    def block(pb):
        q, bary, d2 = mesh_lib.closest_point_on_triangle(pb[:, None, :], tris[None])  # [C, F, ...]
        # Faces with a non-finite corner never win (the kernels' `d2 < best` tests skip their NaN).
        best = jnp.argmin(jnp.where(jnp.isnan(d2) | ~tri_ok[None, :], jnp.inf, d2), axis=1)
        take = lambda a: jnp.take_along_axis(a, best[:, None], axis=1)[:, 0]
        return (best.astype(jnp.int32), jnp.take_along_axis(q, best[:, None, None], axis=1)[:, 0],
                jnp.take_along_axis(bary, best[:, None, None], axis=1)[:, 0], take(d2))

    out = jax.lax.map(block, p)
    return tuple(o.reshape((n_chunks * chunk,) + o.shape[2:])[:n] for o in out)


def _reference_search(vertices, faces, points, batch):
    nv, npt = vertices.shape[-2], points.shape[-2]
    pts = jnp.broadcast_to(points, batch + (npt, 3)).reshape((-1, npt, 3))
    if math.prod(vertices.shape[:-2]) == 1:
        verts = vertices.reshape(nv, 3)
        out = jax.vmap(lambda p: _reference_one(verts, faces, p))(pts)
    else:
        verts = jnp.broadcast_to(vertices, batch + (nv, 3)).reshape((-1, nv, 3))
        out = jax.vmap(lambda v, p: _reference_one(v, faces, p))(verts, pts)
    return ClosestPoint(*(o.reshape(batch + o.shape[1:]) for o in out))


_reference_search_jit = jax.jit(_reference_search, static_argnums=(3,))


def _empty_result(points, batch) -> ClosestPoint | None:
    """The result for zero queries (no points, or an empty batch), else None.

    The shapes are static, so this answers before any search: the chunking of the reference and
    the flattening of the kernel call cannot infer a size from zero elements. The outputs do
    not depend on the inputs, so gradients through them are zero.
    """
    n = points.shape[-2]
    if n and math.prod(batch):
        return None
    dtype = points.dtype
    return ClosestPoint(jnp.zeros(batch + (n,), jnp.int32), jnp.zeros(batch + (n, 3), dtype),
                        jnp.zeros(batch + (n, 3), dtype), jnp.zeros(batch + (n,), dtype))


def closest_point_reference(vertices, faces, points) -> ClosestPoint:
    """Brute-force closest points in pure JAX (no gradients through the search; see module doc).

    Ties between equally close faces go to the lowest face index. Shapes as `closest_point`.
    """
    vertices, faces, points, batch = _check_inputs(vertices, faces, points)
    empty = _empty_result(points, batch)
    if empty is not None:
        return empty
    return jax.lax.stop_gradient(_reference_search_jit(vertices, faces, points, batch))


# ----------------------------------------------------------------------------------------------
# Kernel call.


def _kernel_search(vertices, faces, points, batch):
    dtype = points.dtype
    nv, npt = vertices.shape[-2], points.shape[-2]
    if math.prod(vertices.shape[:-2]) == 1:
        verts = vertices.reshape(1, nv, 3)  # one mesh for all query batches: one BVH
    else:
        verts = jnp.broadcast_to(vertices, batch + (nv, 3)).reshape((-1, nv, 3))
    pts = jnp.broadcast_to(points, batch + (npt, 3)).reshape((-1, npt, 3))
    q = pts.shape[0]
    out_types = (
        jax.ShapeDtypeStruct((q, npt), jnp.int32),
        jax.ShapeDtypeStruct((q, npt, 3), jnp.float32),
        jax.ShapeDtypeStruct((q, npt, 3), jnp.float32),
        jax.ShapeDtypeStruct((q, npt), jnp.float32),
    )
    call = jax.ffi.ffi_call(_TARGET, out_types, vmap_method="broadcast_all")
    face, point, bary, d2 = call(verts.astype(jnp.float32), faces, pts.astype(jnp.float32))
    return ClosestPoint(
        face.reshape(batch + (npt,)),
        point.astype(dtype).reshape(batch + (npt, 3)),
        bary.astype(dtype).reshape(batch + (npt, 3)),
        d2.astype(dtype).reshape(batch + (npt,)),
    )


def _search(vertices, faces, points, batch, impl):
    if impl == "reference":
        return _reference_search(vertices, faces, points, batch)
    return _kernel_search(vertices, faces, points, batch)


# ----------------------------------------------------------------------------------------------
# Differentiable wrapper: the face is constant, the rest is recomputed on it in the backward.


def _on_faces(vertices, faces, points, face):
    """closest_point_on_triangle of points [B..., N, 3] against faces `face` [B..., N]."""
    vid = faces[face]  # [B..., N, 3]
    if math.prod(vertices.shape[:-2]) == 1:
        tris = vertices.reshape(vertices.shape[-2:])[vid]  # [B..., N, 3, 3]
    else:
        batch = face.shape[:-1]
        nv = vertices.shape[-2]
        vb = jnp.broadcast_to(vertices, batch + (nv, 3))
        flat = vid.reshape(batch + (-1,))
        tris = jnp.take_along_axis(vb, flat[..., None], axis=-2).reshape(vid.shape + (3,))
    return mesh_lib.closest_point_on_triangle(points, tris)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _closest_point(vertices, faces, points, batch, impl):
    return _search(vertices, faces, points, batch, impl)


def _closest_point_fwd(vertices, faces, points, batch, impl):
    out = _search(vertices, faces, points, batch, impl)
    return out, (vertices, faces, points, out.face)


def _closest_point_bwd(batch, impl, res, g):
    vertices, faces, points, face = res
    pts = jnp.broadcast_to(points, batch + points.shape[-2:])

    # Non-finite query points (padding, invalid samples) get no gradient: they are replaced by a
    # finite stand-in and their cotangents zeroed, so a caller that masks them after the call
    # does not receive NaN vertex gradients through 0 * NaN.
    ok = jnp.all(jnp.isfinite(pts), axis=-1)
    pts = jnp.where(ok[..., None], pts, 0.0)
    zero = lambda a: jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - ok.ndim)), a, 0.0)

    def f(v, p):
        return _on_faces(v, faces, p, face)

    _, vjp = jax.vjp(f, vertices, pts)
    g_vertices, g_pts = vjp((zero(g.point), zero(g.bary), zero(g.sq_dist)))
    # Sum the cotangent of the broadcast points back to their own shape.
    extra = g_pts.ndim - points.ndim
    g_points = jnp.sum(g_pts, axis=tuple(range(extra))) if extra else g_pts
    axes = tuple(i for i in range(points.ndim - 2) if points.shape[i] == 1 and g_points.shape[i] != 1)
    if axes:
        g_points = jnp.sum(g_points, axis=axes, keepdims=True)
    return g_vertices, np.zeros(faces.shape, jax.dtypes.float0), g_points


_closest_point.defvjp(_closest_point_fwd, _closest_point_bwd)
# Compiled once per shape and backend, so eager calls do not dispatch the search op by op.
_closest_point_jit = jax.jit(_closest_point, static_argnums=(3, 4))


def closest_point(vertices, faces, points, *, backend: str = "auto") -> ClosestPoint:
    """Exact closest point on a triangle mesh for every query point.

    Leading (batch) dimensions of `vertices` and `points` broadcast; a single mesh ([V, 3]) with
    batched points builds one BVH, batched meshes build one each. jit, vmap and grad work with
    every backend (vmap of the kernel call broadcasts all operands, so vmapping over points
    with an unbatched mesh rebuilds the BVH per vmapped element; pass the points batched
    instead to share one).

    Args:
      vertices: [V, 3] or [B..., V, 3] float vertex positions, metres.
      faces: [F, 3] int vertex indices, F >= 1 (concrete indices are range-checked); a mesh
        with no faces or no vertices is a ValueError.
      points: [N, 3] or [B..., N, 3] float query points, metres; N = 0 (or an empty batch)
        gives empty outputs of the shapes below, with zero gradients.
      backend: "auto" | "reference" | "cpu" | "cuda" (see the module docstring).

    Returns:
      ClosestPoint(face [B..., N] int32, point [B..., N, 3], bary [B..., N, 3],
      sq_dist [B..., N]); float outputs in the promoted dtype of vertices and points.
      Gradients flow to vertices and points through point, bary and sq_dist, with the face held
      constant. Non-finite query points give unspecified faces and NaN distances.
    """
    vertices, faces, points, batch = _check_inputs(vertices, faces, points)
    impl = _ffi.resolve_backend(backend, _OP, _TARGETS)
    empty = _empty_result(points, batch)
    if empty is not None:
        return empty
    return _closest_point_jit(vertices, faces, points, batch, impl)


def build_seconds(vertices, faces, repeats: int = 20) -> dict:
    """Wall time of the CPU BVH build of one mesh (single-threaded, through ctypes), for benchmarks.

    Args:
      vertices: [V, 3] float vertex positions (converted to float32 on the host).
      faces: [F, 3] int vertex indices.
      repeats: number of builds timed.

    Returns:
      {"min_s": fastest build, "mean_s": mean build, "nodes": number of BVH nodes}. Raises
      RuntimeError when the CPU library is not built, ValueError for an invalid mesh.
    """
    import ctypes

    lib = _ffi.load_built(_OP, "cpu")
    v = np.ascontiguousarray(np.asarray(vertices, np.float32).reshape(-1, 3))
    f = np.ascontiguousarray(np.asarray(faces, np.int32).reshape(-1, 3))
    fn = lib.dhjax_bvh_build_seconds
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
                   ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)]
    mean = ctypes.c_double(0.0)
    nodes = ctypes.c_int64(0)
    best = fn(v.ctypes.data, v.shape[0], f.ctypes.data, f.shape[0], int(repeats), ctypes.byref(mean),
              ctypes.byref(nodes))
    if best < 0:
        raise ValueError("build_seconds: invalid mesh (empty, or face indices out of range)")
    return {"min_s": float(best), "mean_s": float(mean.value), "nodes": int(nodes.value)}
