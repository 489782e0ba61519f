"""Tests of dhjax.render.camera."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.render import camera as C


def _cam(width=64, height=48, eye=(0.3, 0.2, 1.5), target=(0.0, 0.05, 0.0), fov=40.0):
    R, t = C.look_at(jnp.asarray(eye), jnp.asarray(target))
    return C.camera_from_fov(fov, width, height, R, t)


def test_intrinsics_and_fov():
    K = C.intrinsics(100.0, 120.0, 31.5, 23.5)
    np.testing.assert_allclose(K, [[100, 0, 31.5], [0, 120, 23.5], [0, 0, 1]])
    cam = _cam(fov=90.0)
    # fov 90 degrees over H = 48 pixels edge to edge: f = 24.
    np.testing.assert_allclose(cam.K[1, 1], 24.0, rtol=1e-6)
    np.testing.assert_allclose(cam.K[:2, 2], [31.5, 23.5])
    assert C.intrinsics(jnp.ones(4), 1.0, 0.0, 0.0).shape == (4, 3, 3)


def test_look_at_rotation_and_axis():
    eye = jnp.array([0.3, 0.2, 1.5])
    target = jnp.array([0.0, 0.05, 0.0])
    cam = _cam()
    R = np.asarray(cam.R)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)
    np.testing.assert_allclose(C.camera_centre(cam), eye, atol=1e-6)
    uv, z = C.project(cam, target[None])
    np.testing.assert_allclose(uv[0], [31.5, 23.5], atol=1e-4)
    np.testing.assert_allclose(z[0], np.linalg.norm(eye - target), rtol=1e-6)


def test_look_at_upright():
    cam = _cam()
    pts = jnp.array([[0.0, 0.05, 0.0], [0.0, 0.15, 0.0], [0.1, 0.05, 0.0]])
    uv, _ = C.project(cam, pts)
    assert uv[1, 1] < uv[0, 1] - 1.0  # world up -> smaller v (up in the image)
    # Seen from the front (+z side), world +x is on the viewer's right: larger u.
    assert uv[2, 0] > uv[0, 0] + 1.0


def test_look_at_degenerate_up_is_finite():
    R, t = C.look_at(jnp.array([0.0, 2.0, 0.0]), jnp.zeros(3))
    assert np.all(np.isfinite(R)) and np.all(np.isfinite(t))
    np.testing.assert_allclose(np.asarray(R) @ np.asarray(R).T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(R[2], [0, -1, 0], atol=1e-6)


def test_project_unproject_round_trip():
    cam = _cam()
    pts = jax.random.uniform(jax.random.PRNGKey(0), (2, 50, 3), minval=-0.3, maxval=0.3)
    uv, z = C.project(cam, pts)
    assert uv.shape == (2, 50, 2) and z.shape == (2, 50)
    back = C.unproject(cam, uv, z)
    np.testing.assert_allclose(back, pts, atol=2e-5)
    # Batched cameras against batched points.
    rig = C.orbit_rig(3, 1.2, width=32, height=24)
    pts3 = jnp.broadcast_to(pts[0], (3, 50, 3))
    uv3, z3 = C.project(rig, pts3)
    np.testing.assert_allclose(C.unproject(rig, uv3, z3), pts3, atol=2e-5)
    np.testing.assert_allclose(uv3[1], C.project(rig[1], pts[0])[0], atol=1e-4)


def test_world_to_camera_matches_matrix():
    cam = _cam()
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    xc = C.world_to_camera(cam, x)
    np.testing.assert_allclose(xc, x @ np.asarray(cam.R).T + np.asarray(cam.t), atol=1e-6)


def test_pixel_rays_hit_their_pixels():
    cam = _cam(width=20, height=12)
    o, d = C.pixel_rays(cam)
    assert o.shape == (12, 20, 3) and d.shape == (12, 20, 3)
    np.testing.assert_allclose(jnp.linalg.norm(d, axis=-1), 1.0, atol=1e-6)
    pts = (o + 0.7 * d).reshape(-1, 3)
    uv, z = C.project(cam, pts)
    jj, ii = np.meshgrid(np.arange(20), np.arange(12))
    np.testing.assert_allclose(uv[:, 0], jj.reshape(-1), atol=1e-3)
    np.testing.assert_allclose(uv[:, 1], ii.reshape(-1), atol=1e-3)
    assert np.all(z > 0)


@pytest.mark.parametrize("rig_fn,n", [(lambda: C.orbit_rig(6, 1.5, target=(0.0, 0.1, 0.0), elevation_deg=10.0, width=32, height=32), 6),
                                       (lambda: C.synshot_rig(radius=1.0, target=(0.0, 0.1, 0.0)), 28)])
def test_rigs_look_at_target(rig_fn, n):
    rig = rig_fn()
    assert rig.batch_shape == (n,)
    target = jnp.array([0.0, 0.1, 0.0])
    uv, z = C.project(rig, jnp.broadcast_to(target, (n, 1, 3)))
    pp = jnp.stack([(rig.width - 1) / 2.0, (rig.height - 1) / 2.0])
    np.testing.assert_allclose(uv[:, 0], jnp.broadcast_to(pp, (n, 2)), atol=1e-3)
    centres = C.camera_centre(rig)
    radius = np.linalg.norm(np.asarray(centres - target), axis=-1)
    np.testing.assert_allclose(radius, radius[0], rtol=1e-5)
    np.testing.assert_allclose(z[:, 0], radius, rtol=1e-5)
    # Upright: a point above the target projects above the principal point.
    up_uv, _ = C.project(rig, jnp.broadcast_to(target + jnp.array([0, 0.05, 0]), (n, 1, 3)))
    assert np.all(up_uv[:, 0, 1] < pp[1])
    assert len(np.unique(np.round(np.asarray(centres), 4), axis=0)) == n


def test_orbit_starts_in_front():
    rig = C.orbit_rig(4, 2.0, width=16, height=16)
    np.testing.assert_allclose(C.camera_centre(rig[0]), [0, 0, 2], atol=1e-6)
    np.testing.assert_allclose(C.camera_centre(rig[1]), [2, 0, 0], atol=1e-6)


def test_synshot_layout():
    rig = C.synshot_rig(radius=1.0)
    assert (rig.height, rig.width) == (768, 512)
    c = np.asarray(C.camera_centre(rig))
    el = np.degrees(np.arcsin(c[:, 1]))
    az = np.degrees(np.arctan2(c[:, 0], c[:, 2]))
    assert np.all(np.abs(el[:14]) <= 5.0 + 1e-3) and np.all(np.abs(az[:14]) <= 80.0 + 1e-3)
    np.testing.assert_allclose([az[:14].min(), az[:14].max()], [-80, 80], atol=1e-3)
    assert np.all(el[14:] >= 20.0 - 1e-3) and np.all(el[14:] <= 70.0 + 1e-3)
    assert np.ptp(az[14:]) > 270.0  # spread all around


def test_camera_indexing_and_pytree():
    rig = C.orbit_rig(5, 1.0, width=8, height=6)
    sub = rig[1:3]
    assert sub.batch_shape == (2,) and sub.width == 8 and sub.height == 6
    assert rig.take(0).batch_shape == ()
    np.testing.assert_allclose(rig[jnp.array([4, 0])].t, rig.t[jnp.array([4, 0])])
    leaves = jax.tree.leaves(rig)
    assert len(leaves) == 3
    K, R, t = C.to_opencv(rig)
    assert K.shape == (5, 3, 3) and R.shape == (5, 3, 3) and t.shape == (5, 3)
    # Cameras go through jit and vmap.
    centres = jax.jit(jax.vmap(C.camera_centre))(rig)
    np.testing.assert_allclose(centres, C.camera_centre(rig), atol=1e-6)


def test_project_at_camera_centre_has_finite_values_and_gradients():
    cam = _cam()
    centre = C.camera_centre(cam)

    def f(p):
        uv, z = C.project(cam, p[None])
        return jnp.sum(uv) + jnp.sum(z)

    for p in (centre, centre + jnp.array([1e-8, 0.0, 0.0])):
        val, g = jax.value_and_grad(f)(p)
        assert np.isfinite(val) and np.all(np.isfinite(g))


def test_bad_shapes_raise():
    cam = _cam()
    with pytest.raises(ValueError, match="points|x must"):
        C.project(cam, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="K must"):
        C.make_camera(jnp.eye(2), jnp.eye(3), jnp.zeros(3), 4, 4)
    with pytest.raises(ValueError, match="depth"):
        C.unproject(cam, jnp.zeros((5, 2)), jnp.zeros(4))
    with pytest.raises(ValueError, match="eye"):
        C.look_at(jnp.zeros(2), jnp.zeros(3))
