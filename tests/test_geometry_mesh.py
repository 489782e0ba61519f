"""Tests for dhjax.geometry.mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import mesh as _mesh


class _Jitted:
    """The module's jittable functions wrapped in jax.jit (fast tests: one compile per shape)."""

    _static = {"face_normals": ("normalize",), "sample_surface": ("n",)}

    def __init__(self, module):
        self._module = module
        self._cache = {}

    def __getattr__(self, name):
        if name not in self._cache:
            fn = getattr(self._module, name)
            self._cache[name] = jax.jit(fn, static_argnames=self._static.get(name, ()))
        return self._cache[name]


mesh = _Jitted(_mesh)


def _icosahedron():
    g = (1.0 + 5.0**0.5) / 2.0
    v = np.array(
        [
            [-1, g, 0], [1, g, 0], [-1, -g, 0], [1, -g, 0],
            [0, -1, g], [0, 1, g], [0, -1, -g], [0, 1, -g],
            [g, 0, -1], [g, 0, 1], [-g, 0, -1], [-g, 0, 1],
        ],
        np.float64,
    )
    f = np.array(
        [
            [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
            [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
            [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
            [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
        ],
        np.int32,
    )
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    # precondition (independent of the code under test): counter-clockwise seen from outside
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    assert np.all(np.sum(n * v[f].mean(1), -1) > 0)
    return v.astype(np.float32), f


# ----------------------------------------------------------------------------- per-face basics


def test_face_vertices_normals_areas_by_hand():
    verts = np.array(
        [[0, 0, 0], [2, 0, 0], [0, 3, 0], [1, 0, 0], [0, 1, 1], [5, 5, 5]], np.float32
    )
    faces = np.array([[0, 1, 2], [0, 3, 4], [5, 5, 5]], np.int32)
    fv = mesh.face_vertices(verts, faces)
    assert fv.shape == (3, 3, 3)
    np.testing.assert_array_equal(fv[1], verts[[0, 3, 4]])
    raw = mesh.face_normals(verts, faces, normalize=False)
    np.testing.assert_allclose(raw[:2], [[0, 0, 6], [0, -1, 1]])
    np.testing.assert_allclose(
        mesh.face_normals(verts, faces),
        [[0, 0, 1], [0, -(0.5**0.5), 0.5**0.5], [0, 0, 0]],
        atol=1e-6,
    )
    np.testing.assert_allclose(mesh.face_areas(verts, faces), [3.0, 0.5 * 2**0.5, 0.0], rtol=1e-6)
    # batch dims
    vb = np.stack([verts, 2 * verts])
    areas = np.asarray(mesh.face_areas(verts, faces))
    np.testing.assert_allclose(mesh.face_areas(vb, faces)[1], 4 * areas, rtol=1e-6)
    assert mesh.face_normals(vb, faces).shape == (2, 3, 3)


def test_area_and_normal_gradients_finite_at_zero_area():
    verts = jnp.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], jnp.float32)  # collinear
    faces = np.array([[0, 1, 2]], np.int32)
    for f in (
        lambda v: jnp.sum(_mesh.face_areas(v, faces)),
        lambda v: jnp.sum(_mesh.face_normals(v, faces)),
        lambda v: jnp.sum(_mesh.vertex_normals(v, faces)),
    ):
        g = jax.jit(jax.grad(f))(verts)
        assert np.all(np.isfinite(np.asarray(g)))


def test_vertex_normals_point_outwards():
    v, f = _icosahedron()
    vn = np.asarray(mesh.vertex_normals(v, f))
    # by symmetry the area-weighted normal of a regular icosahedron is exactly radial
    np.testing.assert_allclose(vn, v, atol=1e-6)
    # bumpy (still star-shaped) version: normals still point outwards and are unit length
    rng = np.random.default_rng(0)
    vb = v * rng.uniform(0.8, 1.2, size=(3, 12, 1)).astype(np.float32)
    vn = np.asarray(mesh.vertex_normals(vb, f))
    np.testing.assert_allclose(np.linalg.norm(vn, axis=-1), 1.0, atol=1e-6)
    assert np.all(np.sum(vn * v, -1) > 0.5)


def test_vertex_normals_area_weighting_and_isolated_vertex():
    # vertex 0 is shared by a big face in the xy plane and a small face in the xz plane
    verts = np.array(
        [[0, 0, 0], [3, 0, 0], [0, 3, 0], [0, 0, -1], [1, 0, 0], [7, 7, 7]], np.float32
    )
    faces = np.array([[0, 1, 2], [0, 3, 4]], np.int32)
    raw = np.cross(verts[1] - verts[0], verts[2] - verts[0]) + np.cross(
        verts[3] - verts[0], verts[4] - verts[0]
    )
    vn = np.asarray(mesh.vertex_normals(verts, faces))
    np.testing.assert_allclose(vn[0], raw / np.linalg.norm(raw), atol=1e-6)
    np.testing.assert_array_equal(vn[5], 0.0)  # unreferenced vertex: zero, not NaN


# ----------------------------------------------------------------------------- tangent frames


def _assert_frames(tbn, atol=2e-6):
    tbn = np.asarray(tbn)
    eye = np.broadcast_to(np.eye(3), tbn.shape)
    np.testing.assert_allclose(np.swapaxes(tbn, -1, -2) @ tbn, eye, atol=atol)
    np.testing.assert_allclose(np.linalg.det(tbn), 1.0, atol=3 * atol)


def test_face_tbn_without_uvs():
    v, f = _icosahedron()
    rng = np.random.default_rng(1)
    vb = v + 0.05 * rng.normal(size=(2, 12, 3)).astype(np.float32)
    tbn = np.asarray(mesh.face_tbn(vb, f))
    assert tbn.shape == (2, 20, 3, 3)
    _assert_frames(tbn)
    np.testing.assert_allclose(tbn[..., 2], mesh.face_normals(vb, f), atol=1e-6)
    e1 = vb[:, f[:, 1]] - vb[:, f[:, 0]]
    e1_hat = e1 / np.linalg.norm(e1, axis=-1, keepdims=True)
    np.testing.assert_allclose(tbn[..., 0], e1_hat, atol=1e-6)


def test_face_tbn_with_uvs_follows_dpdu():
    # linear parametrisation P(u, v) = o + u A + v B with non-orthogonal A, B
    rng = np.random.default_rng(2)
    o, A, B = rng.normal(size=(3, 3))
    uv = rng.uniform(0, 1, size=(6, 2)).astype(np.float32)
    verts = (o + uv[:, :1] * A + uv[:, 1:] * B).astype(np.float32)
    faces = np.array([[0, 1, 2], [3, 4, 5], [0, 2, 1]], np.int32)  # the last one is mirrored
    tbn = np.asarray(mesh.face_tbn(verts, faces, uv))  # per-vertex UVs
    _assert_frames(tbn)
    a_hat = A / np.linalg.norm(A)
    np.testing.assert_allclose(tbn[..., 0], np.broadcast_to(a_hat, (3, 3)), atol=2e-5)
    # separate UV indexing gives the same result
    tbn2 = mesh.face_tbn(verts, faces, uv[::-1].copy(), 5 - faces)
    np.testing.assert_allclose(tbn2, tbn, atol=1e-6)
    # the tangent differs from the edge-based one (so the UV path is really used)
    assert np.abs(np.asarray(mesh.face_tbn(verts, faces))[..., 0] - tbn[..., 0]).max() > 1e-2


def test_face_tbn_degenerate_faces_finite():
    verts = jnp.array(
        [[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [1, 1, 1]], jnp.float32
    )
    faces = np.array([[0, 1, 2], [0, 0, 0], [0, 1, 1], [0, 1, 3]], np.int32)
    uv = jnp.array([[0, 0], [1, 0], [1, 0], [0, 0], [0, 1]], jnp.float32)  # degenerate UVs too
    for args in ((), (uv,)):
        tbn = np.asarray(mesh.face_tbn(verts, faces, *args))
        _assert_frames(tbn)
        np.testing.assert_allclose(tbn[:3], np.broadcast_to(np.eye(3), (3, 3, 3)))
        g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(_mesh.face_tbn(v, faces, *args)))))(verts)
        assert np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------- interpolation


def test_barycentric_interpolate():
    rng = np.random.default_rng(3)
    v, f = _icosahedron()
    attrs = rng.normal(size=(2, 12, 5)).astype(np.float32)
    face_idx = rng.integers(0, 20, size=7).astype(np.int32)
    bary = rng.dirichlet(np.ones(3), size=7).astype(np.float32)
    out = np.asarray(mesh.barycentric_interpolate(attrs, f, face_idx, bary))
    assert out.shape == (2, 7, 5)
    ref = np.einsum("nk,bnkc->bnc", bary, attrs[:, f[face_idx]])
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # corners reproduce the vertex values
    eye = np.eye(3, dtype=np.float32)
    corner = mesh.barycentric_interpolate(attrs[0], f, np.array([4, 4, 4]), eye)
    np.testing.assert_allclose(corner, attrs[0, f[4]], atol=0)
    # per-batch face indices
    fi = rng.integers(0, 20, size=(2, 7)).astype(np.int32)
    out = np.asarray(mesh.barycentric_interpolate(attrs, f, fi, bary))
    ref = np.stack([np.einsum("nk,nkc->nc", bary, attrs[i, f[fi[i]]]) for i in range(2)])
    np.testing.assert_allclose(out, ref, atol=1e-6)


# ----------------------------------------------------------------------------- sampling


def test_sample_surface_is_area_uniform():
    # two disjoint triangles, areas 1 and 3, plus a zero-area triangle
    verts = np.array(
        [[0, 0, 0], [2, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0], [9, 9, 9]], np.float32
    )
    faces = np.array([[0, 1, 2], [3, 4, 5], [6, 6, 6]], np.int32)
    n = 8000
    pts, fi, bary = mesh.sample_surface(jax.random.PRNGKey(0), verts, faces, n)
    pts, fi, bary = np.asarray(pts), np.asarray(fi), np.asarray(bary)
    assert pts.shape == (n, 3) and fi.shape == (n,) and bary.shape == (n, 3)
    assert fi.dtype == np.int32
    assert not np.any(fi == 2)
    counts = np.bincount(fi, minlength=2)[:2]
    expected = n * np.array([0.25, 0.75])
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 15.1  # chi-square, 1 dof: P(chi2 > 15.1) = 1e-4 for a correct sampler
    # points are on their faces
    ref = np.einsum("nk,nkc->nc", bary, verts[faces[fi]])
    np.testing.assert_allclose(pts, ref, atol=1e-5)
    assert np.all(bary >= 0) and np.allclose(bary.sum(-1), 1, atol=1e-6)
    # uniform inside a triangle: the corner sub-triangle {u > 1/2} holds 1/4 of the area;
    # binomial std = sqrt(0.25 * 0.75 / n) ~ 0.0048, allow 4.5 std
    assert abs(np.mean(bary[:, 0] > 0.5) - 0.25) < 0.022
    # mean barycentric is (1/3, 1/3, 1/3); per-coordinate std is sqrt(1/18) / sqrt(n) ~ 0.0026
    np.testing.assert_allclose(bary.mean(0), 1.0 / 3.0, atol=0.012)
    # deterministic for a fixed key
    pts2, _, _ = mesh.sample_surface(jax.random.PRNGKey(0), verts, faces, n)
    np.testing.assert_array_equal(pts, pts2)


# ----------------------------------------------------------------------------- adjacency


def test_edge_adjacency_small_mesh():
    faces = np.array([[0, 1, 2], [2, 1, 3]], np.int32)
    edges, nb = _mesh.edge_adjacency(faces)
    np.testing.assert_array_equal(edges, [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]])
    np.testing.assert_array_equal(nb, [[-1, 1, -1], [0, -1, -1]])
    assert edges.dtype == np.int32 and nb.dtype == np.int32
    # jax input works too
    e2, nb2 = _mesh.edge_adjacency(jnp.asarray(faces))
    np.testing.assert_array_equal(e2, edges)
    np.testing.assert_array_equal(nb2, nb)


def test_edge_adjacency_closed_and_nonmanifold():
    _, f = _icosahedron()
    edges, nb = _mesh.edge_adjacency(f)
    assert len(edges) == 30  # Euler: V - E + F = 2
    assert np.all(nb >= 0)
    for fi in range(20):
        for k in range(3):
            g = nb[fi, k]
            assert g != fi
            e = {f[fi, k], f[fi, (k + 1) % 3]}
            assert e <= set(f[g])
            assert fi in nb[g]  # symmetric
    # three faces on edge (0, 1)
    faces = np.array([[0, 1, 2], [1, 0, 3], [0, 1, 4]], np.int32)
    edges, nb = _mesh.edge_adjacency(faces)
    assert len(edges) == 7
    assert sorted(nb[:, 0]) == [0, 1, 2] and np.all(nb[:, 0] != np.arange(3))
    assert np.all(nb[:, 1:] == -1)


def test_edge_adjacency_shape_error():
    with pytest.raises(ValueError, match="faces"):
        _mesh.edge_adjacency(np.zeros((4, 4), np.int32))


# ----------------------------------------------------------------------------- closest point


def _brute_force_sq_dist(points, tris, res=120):
    i, j = np.meshgrid(np.arange(res + 1), np.arange(res + 1), indexing="ij")
    keep = i + j <= res
    bary = np.stack([res - i[keep] - j[keep], i[keep], j[keep]], -1) / res  # [S, 3]
    samples = np.einsum("sk,nkc->nsc", bary, tris.astype(np.float64))
    d2 = np.sum((samples - points[:, None].astype(np.float64)) ** 2, -1)
    return d2.min(-1)


def _random_triangles_with_degenerates(rng, n):
    tris = rng.normal(size=(n, 3, 3))
    tris[0] = tris[0, 0]  # all three equal
    tris[1, 1] = tris[1, 0]  # collapsed edge 01
    tris[2, 2] = tris[2, 1]  # collapsed edge 12
    tris[3, 2] = tris[3, 0]  # collapsed edge 20
    tris[4, 2] = 0.3 * tris[4, 0] + 0.7 * tris[4, 1]  # collinear, c between a and b
    tris[5, 0] = 0.5 * tris[5, 1] + 0.5 * tris[5, 2]  # collinear, a in the middle
    tris[6, 2] = 2.0 * tris[6, 1] - tris[6, 0]  # collinear, b in the middle
    return tris.astype(np.float32)


def test_closest_point_by_hand():
    tri = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    pts = np.array(
        [[0.2, 0.2, 1.0], [-1, -1, 0.5], [2, -0.5, 0], [0.5, -1, 0], [1, 1, -1], [0.25, 0.25, 0]],
        np.float32,
    )
    c, b, d2 = mesh.closest_point_on_triangle(pts, tri)
    np.testing.assert_allclose(
        c,
        [[0.2, 0.2, 0], [0, 0, 0], [1, 0, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0.25, 0.25, 0]],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        b,
        [[0.6, 0.2, 0.2], [1, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0.25, 0.25]],
        atol=1e-6,
    )
    np.testing.assert_allclose(d2, [1.0, 2.25, 1.25, 1.0, 1.5, 0.0], atol=1e-6)


def test_closest_point_vs_brute_force():
    rng = np.random.default_rng(4)
    n = 48
    tris = _random_triangles_with_degenerates(rng, n)
    pts = (rng.normal(size=(n, 3)) * 1.5).astype(np.float32)
    # some points on or very close to the triangles
    on_tri = np.einsum("nk,nkc->nc", rng.dirichlet(np.ones(3), 8), tris[-8:])
    pts[-8:] = on_tri + 1e-3 * rng.normal(size=(8, 3))
    c, b, d2 = (np.asarray(x, np.float64) for x in mesh.closest_point_on_triangle(pts, tris))
    # the returned point is on the triangle and consistent with bary and sq_dist
    assert np.all(b >= -1e-6) and np.allclose(b.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(c, np.einsum("nk,nkc->nc", b, tris), atol=1e-5)
    np.testing.assert_allclose(d2, np.sum((c - pts) ** 2, -1), atol=1e-5)
    # and it is (within the sampling resolution) the closest one: a dense sample of the
    # triangle contains a point within h = max edge / res of the true closest point, so
    # dist <= brute <= dist + h; the returned point can never be beaten by a sample.
    res = 120
    brute = _brute_force_sq_dist(pts, tris, res)
    edge = np.linalg.norm(tris - np.roll(tris, 1, axis=1), axis=-1).max(-1)
    h = edge / res
    dist, bdist = np.sqrt(d2), np.sqrt(brute)
    assert np.all(dist <= bdist + 1e-5)
    assert np.all(bdist <= dist + h + 1e-5)


def test_closest_point_broadcasting_all_pairs():
    rng = np.random.default_rng(5)
    tris = rng.normal(size=(6, 3, 3)).astype(np.float32)
    pts = rng.normal(size=(4, 3)).astype(np.float32)
    c, b, d2 = mesh.closest_point_on_triangle(pts[:, None], tris[None])
    assert c.shape == (4, 6, 3) and b.shape == (4, 6, 3) and d2.shape == (4, 6)
    c1, _, d21 = mesh.closest_point_on_triangle(pts[2], tris[3])
    np.testing.assert_allclose(c[2, 3], c1, atol=1e-6)
    np.testing.assert_allclose(d2[2, 3], d21, atol=1e-6)


def test_closest_point_gradients():
    rng = np.random.default_rng(6)
    n = 16
    tris = _random_triangles_with_degenerates(rng, n)
    pts = rng.normal(size=(n, 3)).astype(np.float32)
    pts[7] = tris[7, 1]  # exactly at a vertex
    pts[0] = tris[0, 0]  # exactly at the all-equal triangle
    pts[8] = tris[8].mean(0)  # exactly inside

    def f(p, t):
        c, b, d2 = _mesh.closest_point_on_triangle(p, t)
        return jnp.sum(d2) + jnp.sum(jnp.sin(c)) + jnp.sum(b**2)

    gp, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(pts, tris)
    assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(gt)))
    # envelope theorem: d sq_dist / d p = 2 (p - closest)
    c, _, _ = mesh.closest_point_on_triangle(pts, tris)
    gd = jax.jit(jax.grad(lambda p: jnp.sum(_mesh.closest_point_on_triangle(p, tris)[2])))(pts)
    np.testing.assert_allclose(gd, 2 * (pts - np.asarray(c)), atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="faces"):
        _mesh.face_normals(np.zeros((4, 3)), np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="faces"):
        _mesh.face_normals(np.zeros((4, 3)), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="verts"):
        _mesh.vertex_normals(np.zeros((4, 2)), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="bary"):
        _mesh.barycentric_interpolate(
            np.zeros((4, 2)), np.zeros((2, 3), np.int32), np.zeros(5, np.int32), np.zeros((4, 3))
        )
    with pytest.raises(ValueError, match="triangles"):
        _mesh.closest_point_on_triangle(np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="uv_coords"):
        _mesh.face_tbn(np.zeros((4, 3)), np.zeros((2, 3), np.int32), np.zeros((5, 2)))


@pytest.mark.peers
def test_closest_point_vs_igl():
    igl = pytest.importorskip("igl")
    v, f = _icosahedron()
    rng = np.random.default_rng(7)
    v = v * rng.uniform(0.7, 1.3, size=(12, 1)).astype(np.float32)
    pts = (rng.normal(size=(64, 3)) * 1.2).astype(np.float32)
    sq_ref, idx_ref, c_ref = igl.point_mesh_squared_distance(
        pts.astype(np.float64), v.astype(np.float64), f.astype(np.int64)
    )
    tris = np.asarray(mesh.face_vertices(v, f))
    c, _, d2 = mesh.closest_point_on_triangle(pts[:, None], tris[None])  # [P, F]
    d2 = np.asarray(d2)
    best = d2.argmin(-1)
    np.testing.assert_allclose(d2.min(-1), sq_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(c)[np.arange(64), best], c_ref, atol=1e-5)
