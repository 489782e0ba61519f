"""dhjax.geometry.deformation: INSTA canonicalisation (deformed -> canonical through the nearest
triangle's smoothed deformation gradient) and Sumner triangle deformation gradients.

`canonicalize` takes the nearest faces as an input (geometry sits below ops); `canon` below finds
them with `dhjax.ops.closest_point`, as a method built on it does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import deformation as dfm
from dhjax.geometry import mesh as mesh_lib
from dhjax.geometry import rotations
from dhjax.ops import closest_point


def canon(points, def_verts, canon_verts, faces, backend="auto", **kw):
    """`canonicalize` with the nearest faces from `closest_point` (the INSTA call sequence)."""
    face = closest_point(def_verts, faces, points, backend=backend).face
    return dfm.canonicalize(points, def_verts, canon_verts, faces, face=face, **kw)


def grid_sphere(n_lat=8, n_lon=12, radius=0.1):
    """Closed UV sphere (poles as single vertices), metres."""
    verts = [[0.0, radius, 0.0]]
    for i in range(1, n_lat):
        th = np.pi * i / n_lat
        for j in range(n_lon):
            ph = 2 * np.pi * j / n_lon
            verts.append([radius * np.sin(th) * np.cos(ph), radius * np.cos(th), radius * np.sin(th) * np.sin(ph)])
    verts.append([0.0, -radius, 0.0])
    faces = []
    ring = lambda i, j: 1 + (i - 1) * n_lon + (j % n_lon)
    for j in range(n_lon):
        faces.append([0, ring(1, j + 1), ring(1, j)])
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
            faces += [[a, b, d], [a, d, c]]
    last = len(verts) - 1
    for j in range(n_lon):
        faces.append([last, ring(n_lat - 1, j), ring(n_lat - 1, j + 1)])
    return np.asarray(verts, np.float32), np.asarray(faces, np.int32)


def surface_points(key, v, f, n):
    pts, face, bary = mesh_lib.sample_surface(key, jnp.asarray(v), f, n)
    return np.asarray(pts), np.asarray(face), np.asarray(bary)


def random_rotation(seed):
    rng = np.random.default_rng(seed)
    return np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(rng.normal(size=3) * 0.8)), np.float32)


def test_identity_when_meshes_are_equal():
    v, f = grid_sphere()
    rng = np.random.default_rng(0)
    p = rng.uniform(-0.15, 0.15, (200, 3)).astype(np.float32)
    for scale in ("area_ratio", "length_ratio"):
        out = canon(p, v, v, f, scale=scale)
        np.testing.assert_allclose(np.asarray(out.points), p, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out.gradient), np.broadcast_to(np.eye(4), (200, 4, 4)), atol=1e-5)


def test_rigid_motion_maps_surface_onto_canonical_surface():
    v, f = grid_sphere()
    R, t = random_rotation(1), np.array([0.02, -0.01, 0.03], np.float32)
    vd = (v @ R.T + t).astype(np.float32)
    p_def, face, bary = surface_points(jax.random.PRNGKey(1), vd, f, 300)
    out = canon(p_def, vd, v, f)  # default: the thesis's area ratio (1 for rigid motion)
    # Every point lands on the canonical surface, at the same barycentric location.
    want = np.einsum("nk,nkc->nc", bary, v[f[face]])
    np.testing.assert_allclose(np.asarray(out.points), want, atol=2e-6)
    # Points off the surface follow the rigid motion too (all gradients equal).
    rng = np.random.default_rng(1)
    q = rng.uniform(-0.15, 0.15, (100, 3)).astype(np.float32)
    back = canon(q @ R.T + t, vd, v, f)
    np.testing.assert_allclose(np.asarray(back.points), q, atol=2e-6)


def test_similarity_with_length_ratio_scale():
    v, f = grid_sphere()
    R, t, s = random_rotation(2), np.array([0.01, 0.02, -0.02], np.float32), 1.3
    vd = (s * v @ R.T + t).astype(np.float32)
    p_def, face, bary = surface_points(jax.random.PRNGKey(2), vd, f, 200)
    out = canon(p_def, vd, v, f, scale="length_ratio")
    np.testing.assert_allclose(np.asarray(out.points), np.einsum("nk,nkc->nc", bary, v[f[face]]), atol=2e-6)
    # The thesis's lambda = a_def / a_canon = s^2 scales local coordinates by s^2 instead.
    F = dfm.insta_face_gradients(v, vd, f)
    np.testing.assert_allclose(np.asarray(jnp.linalg.det(F[:, :3, :3])), (s**2) ** 3, rtol=1e-4)
    F_len = dfm.insta_face_gradients(v, vd, f, scale="length_ratio")
    np.testing.assert_allclose(np.asarray(F_len[:, :3, :3]), np.broadcast_to(R.T / s, (len(f), 3, 3)), atol=1e-5)


def test_matches_a_direct_implementation_of_the_formula():
    """Non-rigid deformation: compare with a per-point numpy evaluation of eqs. 2-4."""
    v, f = grid_sphere()
    rng = np.random.default_rng(3)
    vd = (v + rng.normal(scale=0.004, size=v.shape)).astype(np.float32)
    p = (vd[rng.integers(len(v), size=40)] + rng.uniform(-0.01, 0.01, (40, 3))).astype(np.float32)
    out = canon(p, vd, v, f, backend="reference")
    nbr = dfm.face_neighbours(f)
    tbn_c = np.asarray(mesh_lib.face_tbn(v, f), np.float64)
    tbn_d = np.asarray(mesh_lib.face_tbn(vd, f), np.float64)
    area = lambda x: 0.5 * np.linalg.norm(np.cross(x[f[:, 1]] - x[f[:, 0]], x[f[:, 2]] - x[f[:, 0]]), axis=1)
    lam = area(vd.astype(np.float64)) / area(v.astype(np.float64))

    def frame(R, t):
        L = np.eye(4)
        L[:3, :3], L[:3, 3] = R, t
        return L

    for i in range(len(p)):
        T = int(out.face[i])
        acc, wsum = np.zeros((4, 4)), 0.0
        for k, g in enumerate([T] + [int(x) for x in nbr[T] if x >= 0]):
            Fg = frame(tbn_c[g], v[f[g, 0]]) @ np.diag([lam[g]] * 3 + [1.0]) @ np.linalg.inv(frame(tbn_d[g], vd[f[g, 0]]))
            c = vd[f[g]].astype(np.float64).mean(0)
            w = 1.0 if k == 0 else np.exp(-4.0 * np.linalg.norm(c - p[i]))
            acc += w * Fg
            wsum += w
        want = (acc / wsum) @ np.append(p[i], 1.0)
        np.testing.assert_allclose(np.asarray(out.points[i]), want[:3], atol=2e-6)
        np.testing.assert_allclose(np.asarray(out.gradient[i]), acc / wsum, atol=2e-5)


def test_zero_area_triangles_finite_values_and_gradients():
    v, f = grid_sphere()
    vd = v.copy()
    # Collapse one triangle in each mesh (two different ones), and one in both.
    vd[f[5, 1]] = vd[f[5, 0]]
    vd[f[5, 2]] = vd[f[5, 0]]
    vc = v.copy()
    vc[f[30, 2]] = vc[f[30, 0]]
    p = (vd[f[5, 0]] + np.array([[0.001, 0.002, 0.0005], [0.0, 0.0, 0.0], [0.01, -0.003, 0.002]])).astype(np.float32)
    p = np.concatenate([p, vc[f[30, :1]] + 0.001]).astype(np.float32)

    def loss(pp, vdd, vcc):
        out = canon(pp, vdd, vcc, f)
        return jnp.sum(out.points**2) + jnp.sum(dfm.triangle_deformation_gradients(vcc, vdd, f) ** 2)

    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(p, vd, vc)
    assert np.isfinite(float(val))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    J = np.asarray(dfm.triangle_deformation_gradients(vc, vd, f))
    np.testing.assert_allclose(J[30], np.eye(3), atol=0)  # degenerate canonical triangle: identity
    assert np.all(np.isfinite(J))


@pytest.mark.slow
def test_canonicalize_gradients_match_finite_differences():
    with jax.enable_x64(True):
        v, f = grid_sphere()
        v = v.astype(np.float64)
        rng = np.random.default_rng(4)
        vd = v + rng.normal(scale=0.003, size=v.shape)
        # Points whose nearest feature is a face interior: where it is a vertex or edge shared by
        # several faces, the nearest triangle is a tie and the map jumps with the tie-break.
        fi = rng.integers(len(f), size=10)
        bary = rng.dirichlet(np.full(3, 8.0), size=10)
        n = np.asarray(mesh_lib.face_normals(vd, f))[fi]
        p = np.einsum("nk,nkc->nc", bary, vd[f[fi]]) + 0.002 * n
        w = rng.normal(size=p.shape)
        loss = jax.jit(lambda pp, a, b: jnp.sum(w * canon(pp, a, b, f, backend="reference").points))
        assert np.all(np.asarray(canon(p, vd, v, f, backend="reference").face) == fi)
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(p, vd, v)
        eps = 1e-7
        for _ in range(4):
            d = [rng.normal(size=x.shape) for x in (p, vd, v)]
            fd = (loss(p + eps * d[0], vd + eps * d[1], v + eps * d[2])
                  - loss(p - eps * d[0], vd - eps * d[1], v - eps * d[2])) / (2 * eps)
            an = sum(np.sum(np.asarray(gi) * di) for gi, di in zip(g, d))
            np.testing.assert_allclose(an, fd, rtol=1e-5, atol=1e-9)


def test_batched_vmap_and_jit():
    v, f = grid_sphere()
    rng = np.random.default_rng(5)
    vd = (v[None] + rng.normal(scale=0.003, size=(3,) + v.shape)).astype(np.float32)
    p = rng.uniform(-0.12, 0.12, (3, 30, 3)).astype(np.float32)
    nbr = dfm.face_neighbours(f)
    batched = canon(p, vd, v, f, neighbours=nbr)
    assert batched.points.shape == (3, 30, 3) and batched.gradient.shape == (3, 30, 4, 4)
    fn = jax.jit(jax.vmap(lambda pp, vv: canon(pp, vv, v, f, neighbours=nbr).points))
    np.testing.assert_allclose(np.asarray(fn(p, vd)), np.asarray(batched.points), atol=1e-6)
    one = canon(p[1], vd[1], v, f)
    np.testing.assert_allclose(np.asarray(one.points), np.asarray(batched.points[1]), atol=1e-6)
    # Traced faces need the neighbour table.
    with pytest.raises(ValueError, match="neighbours"):
        face = closest_point(vd[0], f, p[0]).face
        jax.jit(lambda ff: dfm.canonicalize(p[0], vd[0], v, ff, face=face).points)(f)


def test_face_argument_is_used_and_checked():
    v, f = grid_sphere()
    rng = np.random.default_rng(7)
    vd = (v + rng.normal(scale=0.004, size=v.shape)).astype(np.float32)
    p = rng.uniform(-0.12, 0.12, (20, 3)).astype(np.float32)
    # The map follows the faces it is given (here one face for every point), not a search of its own.
    T = np.full(20, 17, np.int32)
    out = dfm.canonicalize(p, vd, v, f, face=T)
    np.testing.assert_array_equal(np.asarray(out.face), T)
    near = canon(p, vd, v, f)
    assert np.any(np.asarray(near.face) != T)
    assert not np.allclose(np.asarray(near.points), np.asarray(out.points), atol=1e-5)
    F = np.asarray(dfm.insta_face_gradients(v, vd, f))
    nbr = [17] + [int(g) for g in dfm.face_neighbours(f)[17] if g >= 0]
    cent = vd[f[nbr]].mean(1)
    for i in range(3):
        w = np.exp(-4.0 * np.linalg.norm(cent - p[i], axis=1))
        w[0] = 1.0
        np.testing.assert_allclose(np.asarray(out.gradient[i]), np.einsum("k,kij->ij", w, F[nbr]) / w.sum(),
                                   atol=2e-5)
    with pytest.raises(ValueError, match="face"):
        dfm.canonicalize(p, vd, v, f, face=T[:5])
    with pytest.raises(ValueError, match="face"):
        dfm.canonicalize(p, vd, v, f, face=T.astype(np.float32))


def test_sumner_gradients():
    v, f = grid_sphere()
    R, s = random_rotation(6), 0.8
    J = np.asarray(dfm.triangle_deformation_gradients(v, (s * v @ R.T).astype(np.float32), f))
    np.testing.assert_allclose(J, np.broadcast_to(s * R, J.shape), atol=1e-5)
    # A general deformation: J maps canonical edges onto deformed edges.
    rng = np.random.default_rng(6)
    vd = (v + rng.normal(scale=0.005, size=v.shape)).astype(np.float32)
    J = np.asarray(dfm.triangle_deformation_gradients(v, vd, f))
    for k in (1, 2):
        ec = v[f[:, k]] - v[f[:, 0]]
        ed = vd[f[:, k]] - vd[f[:, 0]]
        np.testing.assert_allclose(np.einsum("fij,fj->fi", J, ec), ed, atol=1e-6)
    # Batched.
    Jb = dfm.triangle_deformation_gradients(v, np.stack([vd, v]), f)
    assert Jb.shape == (2, len(f), 3, 3)
    np.testing.assert_allclose(np.asarray(Jb[1]), np.broadcast_to(np.eye(3), J.shape), atol=1e-5)


def test_triangle_gradients_with_a_precomputed_canonical_inverse():
    rng = np.random.default_rng(4)
    canon = jnp.asarray(rng.normal(size=(30, 3)), jnp.float32)
    faces = jnp.asarray(rng.integers(0, 30, (40, 3)), jnp.int32)
    posed = canon @ jnp.asarray(np.eye(3) + 0.2 * rng.normal(size=(3, 3)), jnp.float32)
    inv = dfm.triangle_canonical_inverse(canon, faces)
    np.testing.assert_allclose(dfm.triangle_deformation_gradients(None, posed, faces, canon_inv=inv),
                               dfm.triangle_deformation_gradients(canon, posed, faces), rtol=1e-5, atol=1e-5)
