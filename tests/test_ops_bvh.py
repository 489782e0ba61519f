"""dhjax.ops.closest_point: the BVH kernels against the brute-force reference and libigl, on random
meshes with degenerate triangles and points far away, on edges, on vertices and inside faces;
gradients against finite differences; batching, vmap and jit."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import mesh as mesh_lib
from kernel_common import need_kernel

cp = importlib.import_module("dhjax.ops.bvh")

TOL = 1e-6  # metres


@pytest.fixture(scope="module")
def cpu_kernel():
    need_kernel(cp.kernel_available("cpu"), "the BVH CPU kernel")
    return "cpu"


@pytest.fixture(scope="module")
def cuda_kernel():
    need_kernel(cp.kernel_available("cuda"), "the BVH CUDA kernel", "bash kernels/build_inplace.sh -DDHJAX_CUDA=ON")
    return "cuda"


def random_mesh(seed, n_verts=80, n_faces=150, n_degenerate=20):
    """Random triangle soup in a 10 cm box, with zero-area faces (repeated vertex, collinear
    corners, a single point) mixed in."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(-0.05, 0.05, (n_verts, 3))
    f = np.stack([rng.choice(n_verts, 3, replace=False) for _ in range(n_faces)])
    extra_v, extra_f = [], []
    for k in range(n_degenerate):
        kind = k % 3
        if kind == 0:  # two equal indices: a segment
            i, j = rng.choice(n_verts, 2, replace=False)
            extra_f.append([i, j, i])
        elif kind == 1:  # three distinct but collinear vertices
            a, b = rng.uniform(-0.05, 0.05, (2, 3))
            base = n_verts + len(extra_v)
            extra_v += [a, b, 0.3 * a + 0.7 * b]
            extra_f.append([base, base + 2, base + 1])
        else:  # all three the same vertex: a point
            i = rng.integers(n_verts)
            extra_f.append([i, i, i])
    v = np.concatenate([v] + ([np.array(extra_v)] if extra_v else []), 0).astype(np.float32)
    f = np.concatenate([f, np.array(extra_f, np.int64).reshape(-1, 3)], 0).astype(np.int32)
    return v, f[rng.permutation(len(f))]


def query_points(seed, v, f, n_each=60):
    """Points near (+-2 cm), far (up to 1.5 m), exactly on vertices, on edges and inside faces."""
    rng = np.random.default_rng(seed + 1000)
    tri = v[f]
    near = v[rng.integers(len(v), size=n_each)] + rng.uniform(-0.02, 0.02, (n_each, 3))
    far = rng.normal(size=(n_each, 3))
    far = far / np.linalg.norm(far, axis=1, keepdims=True) * rng.uniform(0.3, 1.5, (n_each, 1))
    on_vertex = v[rng.integers(len(v), size=n_each)]
    fi = rng.integers(len(f), size=n_each)
    t = rng.uniform(size=(n_each, 1))
    on_edge = (1 - t) * tri[fi, 0] + t * tri[fi, 1]
    w = rng.dirichlet(np.ones(3), size=n_each)
    inside = np.einsum("nk,nkc->nc", w, tri[rng.integers(len(f), size=n_each)])
    return np.concatenate([near, far, on_vertex, on_edge, inside]).astype(np.float32)


def all_face_sq_dist(v, f, p):
    """[N, F] squared distances of every point to every face (float64 numpy, via the JAX
    per-triangle test in float32; used to decide which answers are unambiguous)."""
    _, _, d2 = mesh_lib.closest_point_on_triangle(jnp.asarray(p)[:, None], jnp.asarray(v)[jnp.asarray(f)][None])
    return np.asarray(d2, np.float64)


def check_against_reference(out, ref, v, f, p):
    face, point, bary, d2 = (np.asarray(a) for a in out)
    r_face, r_point, r_bary, r_d2 = (np.asarray(a) for a in ref)
    # Distances always agree.
    np.testing.assert_allclose(np.sqrt(d2), np.sqrt(r_d2), atol=TOL, rtol=0)
    # The returned point lies on the returned face at the returned barycentrics, and its
    # distance is the returned distance.
    on_face = np.einsum("nk,nkc->nc", bary, v[f[face]])
    np.testing.assert_allclose(on_face, point, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.sum((p - point) ** 2, -1), d2, atol=1e-9, rtol=1e-5)
    assert np.all(bary >= -1e-6) and np.allclose(bary.sum(-1), 1.0, atol=1e-5)
    # Where the nearest face is unique (runner-up clearly farther), faces and points agree.
    all_d2 = all_face_sq_dist(v, f, p)
    srt = np.sort(all_d2, axis=1)
    closest_pts = point
    unique = (np.sqrt(srt[:, 1]) - np.sqrt(srt[:, 0])) > 1e-5
    # Faces sharing the closest point (an edge or vertex) tie legitimately: compare points there.
    np.testing.assert_array_equal(face[unique], r_face[unique])
    np.testing.assert_allclose(closest_pts[unique], r_point[unique], atol=TOL, rtol=0)
    # Barycentrics are unique only on non-degenerate faces (a segment face [i, j, i] has two).
    area = np.asarray(mesh_lib.face_areas(v, f))[face]
    solid = unique & (area > 1e-8)
    np.testing.assert_allclose(bary[solid], r_bary[solid], atol=1e-4, rtol=0)
    return unique


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_kernel_matches_reference(cpu_kernel, seed):
    v, f = random_mesh(seed)
    p = query_points(seed, v, f)
    out = cp.closest_point(v, f, p, backend=cpu_kernel)
    ref = cp.closest_point(v, f, p, backend="reference")
    unique = check_against_reference(out, ref, v, f, p)
    assert unique.mean() > 0.5  # the comparison of faces is not vacuous


def test_reference_is_exact_minimum_over_faces():
    v, f = random_mesh(3)
    p = query_points(3, v, f)
    ref = cp.closest_point_reference(v, f, p)
    all_d2 = all_face_sq_dist(v, f, p)
    np.testing.assert_allclose(np.sqrt(np.asarray(ref.sq_dist)), np.sqrt(all_d2.min(1)), rtol=0, atol=1e-7)
    srt = np.sort(all_d2, axis=1)
    unique = (np.sqrt(srt[:, 1]) - np.sqrt(srt[:, 0])) > 1e-5
    np.testing.assert_array_equal(np.asarray(ref.face)[unique], all_d2.argmin(1)[unique])


def test_points_on_surface_have_zero_distance(cpu_kernel):
    v, f = random_mesh(4, n_degenerate=0)
    rng = np.random.default_rng(4)
    fi = rng.integers(len(f), size=300)
    w = rng.dirichlet(np.ones(3), size=300)
    p = np.einsum("nk,nkc->nc", w, v[f[fi]]).astype(np.float32)
    for backend in ("reference", cpu_kernel):
        out = cp.closest_point(v, f, p, backend=backend)
        assert np.sqrt(np.asarray(out.sq_dist)).max() < TOL
        np.testing.assert_allclose(np.asarray(out.point), p, atol=TOL)


def test_all_degenerate_and_single_face_meshes(cpu_kernel):
    rng = np.random.default_rng(5)
    v = rng.uniform(-0.05, 0.05, (6, 3)).astype(np.float32)
    v[5] = 0.4 * v[3] + 0.6 * v[4]
    f = np.array([[0, 0, 0], [1, 2, 1], [3, 5, 4]], np.int32)  # point, segment, collinear
    p = rng.uniform(-0.1, 0.1, (200, 3)).astype(np.float32)
    for faces in (f, f[:1], f[1:2], np.array([[0, 1, 2]], np.int32)):
        out = cp.closest_point(v, faces, p, backend=cpu_kernel)
        ref = cp.closest_point(v, faces, p, backend="reference")
        np.testing.assert_allclose(np.sqrt(np.asarray(out.sq_dist)), np.sqrt(np.asarray(ref.sq_dist)), atol=TOL)
        np.testing.assert_allclose(np.asarray(out.point), np.asarray(ref.point), atol=TOL)
        assert np.all(np.isfinite(np.asarray(out.bary)))


@pytest.mark.slow
def test_head_mesh_matches_reference(cpu_kernel):
    from dhjax.models import flame

    m = flame.load()
    v = np.asarray(m.v_template, np.float32)
    f = np.asarray(m.faces, np.int32)
    rng = np.random.default_rng(6)
    p = (v[rng.integers(len(v), size=120)] + rng.uniform(-0.05, 0.05, (120, 3))).astype(np.float32)
    out = cp.closest_point(v, f, p, backend=cpu_kernel)
    ref = cp.closest_point(v, f, p, backend="reference")
    np.testing.assert_allclose(np.sqrt(np.asarray(out.sq_dist)), np.sqrt(np.asarray(ref.sq_dist)), atol=TOL)
    # Many points are closest to a vertex or an edge shared by several faces (exact ties).
    same = np.asarray(out.face) == np.asarray(ref.face)
    assert same.mean() > 0.5
    np.testing.assert_allclose(np.asarray(out.point)[same], np.asarray(ref.point)[same], atol=TOL)


@pytest.mark.peers
@pytest.mark.parametrize("seed", [0, 7])
def test_matches_libigl(cpu_kernel, seed):
    igl = pytest.importorskip("igl")
    # Non-degenerate faces only: on needle/sliver triangles (the near-collinear ones of
    # random_mesh) libigl's projection loses accuracy (seen: 7e-6 m for a point inside the
    # sliver, whose exact distance in float64 is 3e-10 m); the degenerate cases are checked
    # against the reference and the exact minimum over faces instead.
    v, f = random_mesh(seed, n_degenerate=0)
    p = query_points(seed, v, f)
    sq, _, c = igl.point_mesh_squared_distance(p.astype(np.float64), v.astype(np.float64), f.astype(np.int64))
    for backend in ("reference", cpu_kernel):
        out = cp.closest_point(v, f, p, backend=backend)
        np.testing.assert_allclose(np.sqrt(np.asarray(out.sq_dist)), np.sqrt(sq), atol=TOL, rtol=0)
        all_d2 = np.sort(all_face_sq_dist(v, f, p), axis=1)
        unique = (np.sqrt(all_d2[:, 1]) - np.sqrt(all_d2[:, 0])) > 1e-5
        np.testing.assert_allclose(np.asarray(out.point)[unique], c[unique], atol=TOL, rtol=0)


def test_batched_shapes_and_vmap_jit(cpu_kernel):
    rng = np.random.default_rng(8)
    v0, f = random_mesh(8, n_degenerate=3)
    B = 3
    verts = (v0[None] + rng.normal(scale=0.005, size=(B,) + v0.shape)).astype(np.float32)
    pts = rng.uniform(-0.07, 0.07, (B, 50, 3)).astype(np.float32)
    per = [cp.closest_point(verts[b], f, pts[b], backend="reference") for b in range(B)]
    want_d2 = np.stack([np.asarray(o.sq_dist) for o in per])
    for backend in (cpu_kernel, "reference"):
        # Batched meshes and points.
        out = cp.closest_point(verts, f, pts, backend=backend)
        assert out.face.shape == (B, 50) and out.point.shape == (B, 50, 3) and out.face.dtype == jnp.int32
        np.testing.assert_allclose(np.asarray(out.sq_dist), want_d2, atol=1e-9, rtol=1e-5)
        # One mesh, batched points; batched meshes, one point set.
        one = cp.closest_point(verts[0], f, pts, backend=backend)
        np.testing.assert_allclose(np.asarray(one.sq_dist[0]), want_d2[0], atol=1e-9, rtol=1e-5)
        assert one.sq_dist.shape == (B, 50)
        shared = cp.closest_point(verts, f, pts[0], backend=backend)
        assert shared.sq_dist.shape == (B, 50)
        np.testing.assert_allclose(np.asarray(shared.sq_dist[1]),
                                   np.asarray(cp.closest_point(verts[1], f, pts[0], backend="reference").sq_dist),
                                   atol=1e-9, rtol=1e-5)
        # vmap (over meshes and points, and over points only) and jit.
        fn = jax.jit(jax.vmap(lambda vv, pp: cp.closest_point(vv, f, pp, backend=backend).sq_dist))
        np.testing.assert_allclose(np.asarray(fn(verts, pts)), want_d2, atol=1e-9, rtol=1e-5)
        fn2 = jax.vmap(lambda pp: cp.closest_point(verts[0], f, pp, backend=backend).sq_dist)
        np.testing.assert_allclose(np.asarray(fn2(pts))[0], want_d2[0], atol=1e-9, rtol=1e-5)
        if backend == "reference":
            continue  # the reference is plain JAX; nested vmap is the kernel's batching rule
        # Nested vmap over a [2, B] batch.
        nested = jax.vmap(jax.vmap(lambda vv, pp: cp.closest_point(vv, f, pp, backend=backend).sq_dist))
        got = nested(np.stack([verts, verts]), np.stack([pts, pts]))
        np.testing.assert_allclose(np.asarray(got), np.stack([want_d2, want_d2]), atol=1e-9, rtol=1e-5)


def _grad_fns(f, backend):
    def loss(v, p, wp, wb):
        out = cp.closest_point(v, f, p, backend=backend)
        return jnp.sum(out.sq_dist) + jnp.sum(wp * out.point) + jnp.sum(wb * out.bary)

    return jax.grad(loss, argnums=(0, 1))


def test_gradients_match_finite_differences():
    """Reference backend in float64 (the custom_vjp is shared by all backends)."""
    with jax.enable_x64(True):
        # Exactly degenerate faces (a segment [i, j, i], a point [i, i, i]) but no near-collinear
        # slivers: a perturbation can flip a sliver between "degenerate" and "solid", which moves
        # its barycentrics discontinuously.
        v, f = random_mesh(9, n_verts=30, n_faces=40, n_degenerate=0)
        f = np.concatenate([f, [[3, 7, 3], [11, 11, 11]]]).astype(np.int32)
        v = v.astype(np.float64)
        rng = np.random.default_rng(9)
        p = rng.uniform(-0.06, 0.06, (40, 3))
        wp = rng.normal(size=p.shape)
        wb = rng.normal(size=p.shape)
        loss = lambda vv, pp: (lambda o: jnp.sum(o.sq_dist) + jnp.sum(wp[: len(pp)] * o.point)
                               + jnp.sum(wb[: len(pp)] * o.bary))(cp.closest_point(vv, f, pp, backend="reference"))
        loss = jax.jit(loss)
        # Keep points whose nearest face is unique: at exact ties (points closest to a vertex or
        # edge shared by several faces) the barycentrics jump between faces under perturbation.
        srt = np.sort(all_face_sq_dist(v, f, p), axis=1)
        p = p[(np.sqrt(srt[:, 1]) - np.sqrt(srt[:, 0])) > 1e-4]
        wp, wb = wp[: len(p)], wb[: len(p)]
        assert len(p) >= 10
        gv, gp = jax.grad(loss, argnums=(0, 1))(v, p)
        assert np.all(np.isfinite(np.asarray(gv))) and np.all(np.isfinite(np.asarray(gp)))
        eps = 1e-7
        for _ in range(6):
            dv = rng.normal(size=v.shape)
            dp = rng.normal(size=p.shape)
            fd = (loss(v + eps * dv, p + eps * dp) - loss(v - eps * dv, p - eps * dp)) / (2 * eps)
            an = np.sum(np.asarray(gv) * dv) + np.sum(np.asarray(gp) * dp)
            np.testing.assert_allclose(an, fd, rtol=1e-5, atol=1e-8)
        # d(sq_dist)/dp = 2 (p - closest).
        g = jax.grad(lambda pp: jnp.sum(cp.closest_point(v, f, pp, backend="reference").sq_dist))(p)
        q = np.asarray(cp.closest_point(v, f, p, backend="reference").point)
        np.testing.assert_allclose(np.asarray(g), 2 * (p - q), atol=1e-12)


def test_kernel_gradients_match_reference(cpu_kernel):
    v, f = random_mesh(10, n_degenerate=5)
    rng = np.random.default_rng(10)
    p = rng.uniform(-0.06, 0.06, (2, 40, 3)).astype(np.float32)
    verts = np.stack([v, v + 0.001]).astype(np.float32)
    wp = rng.normal(size=p.shape).astype(np.float32)
    wb = rng.normal(size=p.shape).astype(np.float32)
    g_ref = _grad_fns(f, "reference")(verts, p, wp, wb)
    g_ker = jax.jit(_grad_fns(f, cpu_kernel))(verts, p, wp, wb)
    for a, b in zip(g_ker, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    # Gradient w.r.t. points broadcast against a batch of meshes sums over the batch.
    gp = jax.grad(lambda pp: jnp.sum(cp.closest_point(verts, f, pp, backend=cpu_kernel).sq_dist))(p[0])
    gp_ref = sum(jax.grad(lambda pp: jnp.sum(cp.closest_point(verts[b], f, pp, backend="reference").sq_dist))(p[0])
                 for b in range(2))
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gp_ref), atol=1e-6)


def test_zero_area_faces_have_finite_gradients(cpu_kernel):
    v = np.array([[0, 0, 0], [0.01, 0, 0], [0.02, 0, 0], [0, 0.01, 0]], np.float32)
    f = np.array([[0, 1, 2], [0, 0, 0], [1, 1, 3]], np.int32)
    p = np.array([[0.005, 0.003, 0.002], [0.0, 0.0, 0.0], [0.03, 0.02, -0.01]], np.float32)
    for backend in ("reference", cpu_kernel):
        gv, gp = jax.grad(lambda vv, pp: jnp.sum(cp.closest_point(vv, f, pp, backend=backend).sq_dist),
                          argnums=(0, 1))(v, p)
        assert np.all(np.isfinite(np.asarray(gv))) and np.all(np.isfinite(np.asarray(gp)))


def test_input_errors():
    v, f = random_mesh(11, n_degenerate=0)
    p = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="faces"):
        cp.closest_point(v, f[:, :2], p)
    with pytest.raises(ValueError, match="faces"):
        cp.closest_point(v, np.array([[0, 1, len(v)]]), p)
    with pytest.raises(ValueError, match="no faces"):
        cp.closest_point(v, np.zeros((0, 3), np.int32), p)
    with pytest.raises(ValueError, match="points"):
        cp.closest_point(v, f, p[:, :2])
    with pytest.raises(ValueError, match="broadcast"):
        cp.closest_point(np.stack([v, v]), f, np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="backend"):
        cp.closest_point(v, f, p, backend="gpu")


def _backends():
    """Every backend of the op that can run here: the reference always, the kernels when built."""
    out = ["reference", "auto"]
    if cp.kernel_available("cpu"):
        out.append("cpu")
    if cp.kernel_available("cuda") and any(d.platform == "gpu" for d in jax.devices()):
        out.append("cuda")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_empty_query_gives_empty_outputs(backend):
    """0 query points (or an empty batch) give empty outputs of the right shapes and dtypes,
    eagerly, under jit and through grad, on every backend."""
    v, f = random_mesh(12, n_degenerate=0)
    for pts_shape, verts in (((0, 3), v), ((2, 0, 3), v), ((0, 5, 3), v), ((2, 0, 3), np.stack([v, v]))):
        pts = np.zeros(pts_shape, np.float32)
        batch = jnp.broadcast_shapes(verts.shape[:-2], pts_shape[:-2])
        n = pts_shape[-2]
        for out in (cp.closest_point(verts, f, pts, backend=backend),
                    jax.jit(lambda vv, pp: cp.closest_point(vv, f, pp, backend=backend))(verts, pts)):
            assert out.face.shape == batch + (n,) and out.face.dtype == jnp.int32
            assert out.point.shape == batch + (n, 3) and out.point.dtype == jnp.float32
            assert out.bary.shape == batch + (n, 3) and out.bary.dtype == jnp.float32
            assert out.sq_dist.shape == batch + (n,) and out.sq_dist.dtype == jnp.float32
    empty = np.zeros((0, 3), np.float32)
    ref = cp.closest_point_reference(v, f, empty)
    assert ref.face.shape == (0,) and ref.point.shape == (0, 3)
    gv, gp = _grad_fns(f, backend)(v, empty, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert gv.shape == v.shape and np.all(np.asarray(gv) == 0) and gp.shape == (0, 3)
    gv, gp = jax.jit(_grad_fns(f, backend))(v, empty, np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert gv.shape == v.shape and np.all(np.asarray(gv) == 0) and gp.shape == (0, 3)


@pytest.mark.parametrize("backend", _backends())
def test_empty_mesh_is_a_clear_error(backend):
    """A mesh with no faces or no vertices is a ValueError naming the problem (not a crash),
    whether there are query points or not, eagerly and under jit."""
    v, f = random_mesh(13, n_degenerate=0)
    jitted = jax.jit(lambda vv, ff, pp: cp.closest_point(vv, ff, pp, backend=backend))
    for pts in (np.zeros((4, 3), np.float32), np.zeros((0, 3), np.float32)):
        for call in (lambda vv, ff, pp: cp.closest_point(vv, ff, pp, backend=backend), jitted,
                     cp.closest_point_reference):
            with pytest.raises(ValueError, match="no faces"):
                call(v, np.zeros((0, 3), np.int32), pts)
            with pytest.raises(ValueError, match="no vertices"):
                call(np.zeros((0, 3), np.float32), f, pts)
            with pytest.raises(ValueError, match="no vertices"):
                call(np.zeros((2, 0, 3), np.float32), f, pts)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference(cuda_kernel):
    for seed in (0, 1):
        v, f = random_mesh(seed)
        p = query_points(seed, v, f)
        out = cp.closest_point(v, f, p, backend=cuda_kernel)
        ref = cp.closest_point(v, f, p, backend="reference")
        check_against_reference(out, ref, v, f, p)
    # Single face (the root is a leaf), batched meshes, vmap and gradients.
    v, f = random_mesh(2, n_degenerate=0)
    p = query_points(2, v, f)
    for faces in (f[:1], f[:2]):
        out = cp.closest_point(v, faces, p, backend=cuda_kernel)
        ref = cp.closest_point(v, faces, p, backend="reference")
        np.testing.assert_allclose(np.asarray(out.point), np.asarray(ref.point), atol=TOL)
    verts = np.stack([v, v * 1.1]).astype(np.float32)
    pts = np.stack([p, p])
    fn = jax.jit(jax.vmap(lambda vv, pp: cp.closest_point(vv, f, pp, backend=cuda_kernel).sq_dist))
    ref = cp.closest_point(verts, f, pts, backend="reference").sq_dist
    np.testing.assert_allclose(np.asarray(fn(verts, pts)), np.asarray(ref), atol=1e-9, rtol=1e-5)
    g = jax.grad(lambda vv: jnp.sum(cp.closest_point(vv, f, pts, backend=cuda_kernel).sq_dist))(verts)
    g_ref = jax.grad(lambda vv: jnp.sum(cp.closest_point(vv, f, pts, backend="reference").sq_dist))(verts)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_head_mesh(cuda_kernel):
    from dhjax.models import flame

    m = flame.load()
    v = np.asarray(m.v_template, np.float32)
    f = np.asarray(m.faces, np.int32)
    rng = np.random.default_rng(12)
    p = (v[rng.integers(len(v), size=20000)] + rng.uniform(-0.05, 0.05, (20000, 3))).astype(np.float32)
    out = cp.closest_point(v, f, p, backend=cuda_kernel)
    ref = cp.closest_point(v, f, p[:2000], backend="reference")
    np.testing.assert_allclose(np.sqrt(np.asarray(out.sq_dist[:2000])), np.sqrt(np.asarray(ref.sq_dist)), atol=TOL)


def test_nan_points_and_faces_do_not_poison_gradients(cpu_kernel):
    """A non-finite query point (e.g. padding the caller masks afterwards) gives no vertex gradient,
    and a face with a NaN corner never wins, in every backend."""
    verts = jnp.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], jnp.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    pts = jnp.array([[0.2, 0.2, 0.5], [np.nan, 0.0, 0.0]], jnp.float32)
    for backend in ("reference", "cpu"):
        def loss(v):
            d2 = cp.closest_point(v, faces, pts, backend=backend).sq_dist
            return jnp.sum(jnp.where(jnp.isfinite(d2), d2, 0.0))
        g = jax.grad(loss)(verts)
        assert np.all(np.isfinite(np.asarray(g))), backend
        assert float(jnp.abs(g).sum()) > 0
    bad = verts.at[3].set(jnp.nan)  # faces 1, 2 and 3 touch vertex 3
    q = jnp.array([[0.2, 0.2, -0.3], [0.3, 0.3, -0.1]], jnp.float32)
    for backend in ("reference", "cpu"):
        out = cp.closest_point(bad, faces, q, backend=backend)
        np.testing.assert_array_equal(np.asarray(out.face), [0, 0], err_msg=backend)
        np.testing.assert_allclose(np.asarray(out.sq_dist), [0.09, 0.01], rtol=1e-5, err_msg=backend)
