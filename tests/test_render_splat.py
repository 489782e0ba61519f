"""3DGS front end: projection and SH against gsplat's pure-torch implementation (peers), render
modes, background, antialiasing, covariance override, quaternion/covariance maths, bad input."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dhjax.render import camera
from dhjax.render import splat


def gaussians(seed, n=300):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.2, (n, 3)).astype(np.float32),
            rng.normal(size=(n, 4)).astype(np.float32),
            np.exp(rng.normal(np.log(0.02), 0.8, (n, 3))).astype(np.float32))


def test_quaternion_and_covariance():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(50, 4)).astype(np.float32)
    R = np.asarray(splat.quat_to_rotmat(q))
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(splat.quat_to_rotmat(3.0 * q)), R, atol=1e-6)  # scale-free
    # quaternion (w, x, y, z) of a rotation by theta about z
    th = 0.7
    Rz = np.asarray(splat.quat_to_rotmat(np.array([np.cos(th / 2), 0, 0, np.sin(th / 2)], np.float32)))
    np.testing.assert_allclose(Rz, [[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]], atol=1e-6)
    s = rng.uniform(0.01, 0.1, (50, 3)).astype(np.float32)
    cov = np.asarray(splat.covariance(q, s))
    want = np.einsum("nij,nj,nkj->nik", R, s ** 2, R)
    np.testing.assert_allclose(cov, want, rtol=1e-4, atol=1e-9)
    assert np.all(np.isfinite(np.asarray(splat.quat_to_rotmat(np.zeros((1, 4), np.float32)))))


def test_sh_basis_orthonormal():
    # Monte-Carlo check of orthonormality on the sphere: E[Y_i Y_j] * 4 pi = delta_ij
    rng = np.random.default_rng(0)
    d = rng.normal(size=(400000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    Y = np.asarray(splat.sh_basis(3, d.astype(np.float32)), np.float64)
    gram = 4 * np.pi * (Y.T @ Y) / len(d)
    np.testing.assert_allclose(gram, np.eye(16), atol=0.02)


@pytest.mark.peers
def test_projection_matches_gsplat():
    torch = pytest.importorskip("torch")
    ti = pytest.importorskip("gsplat.cuda._torch_impl")
    means, quats, scales = gaussians(1)
    means[:20, 2] += 3.0  # some behind the cameras / beyond
    cams = camera.orbit_rig(3, 1.0, width=120, height=90, fov_y_deg=50)
    covs = np.asarray(splat.covariance(quats, scales))
    ours = splat.project(means, covs, cams, 120, 90, radius_sigma=3.33)
    viewmats = np.zeros((3, 4, 4), np.float32)
    viewmats[:, :3, :3] = np.asarray(cams.R)
    viewmats[:, :3, 3] = np.asarray(cams.t)
    viewmats[:, 3, 3] = 1
    radii, m2d, depths, conics, comp = ti._fully_fused_projection(
        torch.tensor(means), torch.tensor(covs), torch.tensor(viewmats), torch.tensor(np.asarray(cams.K)),
        120, 90, eps2d=0.3, near_plane=0.01, far_plane=1e10, calc_compensations=True)
    valid = (depths.numpy() > 0.01)
    assert valid.sum() > 500 and (~valid).sum() > 10
    np.testing.assert_allclose(np.asarray(ours.depths), depths.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.means2d)[valid], m2d.numpy()[valid], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ours.conics)[valid], conics.numpy()[valid], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.compensations)[valid], comp.numpy()[valid], rtol=1e-4, atol=1e-6)
    # radii: gsplat keeps a box when it reaches [0, W] x [0, H] (pixel centres at +0.5), dhjax when it
    # reaches [-0.5, W - 0.5] (pixel centres at integers): compare where both are clear of the border
    r_ours, r_gs = np.asarray(ours.radii), radii.numpy()
    m = m2d.numpy()
    clear = valid & (m[..., 0] - r_gs[..., 0] > 1) & (m[..., 0] + r_gs[..., 0] < 119) \
        & (m[..., 1] - r_gs[..., 1] > 1) & (m[..., 1] + r_gs[..., 1] < 89)
    assert clear.sum() > 300
    np.testing.assert_array_equal(r_ours[clear], r_gs[clear])
    np.testing.assert_array_equal(r_ours[~valid], 0)


@pytest.mark.peers
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat(degree):
    torch = pytest.importorskip("torch")
    ti = pytest.importorskip("gsplat.cuda._torch_impl")
    rng = np.random.default_rng(degree)
    dirs = rng.normal(size=(500, 3)).astype(np.float32)
    coeffs = rng.normal(size=(500, 16, 3)).astype(np.float32)
    want = ti._spherical_harmonics(degree, torch.tensor(dirs), torch.tensor(coeffs)).numpy()
    np.testing.assert_allclose(np.asarray(splat.eval_sh(degree, dirs, coeffs)), want, rtol=1e-5, atol=1e-5)


def small_scene(seed=0, n=150):
    means, quats, scales = gaussians(seed, n)
    rng = np.random.default_rng(seed + 100)
    return dict(means=means, quats=quats, scales=scales, opacities=rng.uniform(0.3, 1, n).astype(np.float32),
                colors=rng.uniform(0, 1, (n, 3)).astype(np.float32),
                sh=rng.normal(0, 0.3, (n, 16, 3)).astype(np.float32))


def test_render_modes_and_background():
    s = small_scene()
    cams = camera.orbit_rig(2, 1.2, width=40, height=30, fov_y_deg=45)
    run = jax.jit(lambda mode, bg: splat.rasterize(s["means"], s["quats"], s["scales"], s["opacities"], s["colors"],
                                                   cams, render_mode=mode, background=bg, backend="reference"),
                  static_argnums=0)
    both = run("rgb+depth", jnp.array([1.0, 0.0, 0.5]))
    rgb = run("rgb", jnp.array([1.0, 0.0, 0.5]))
    dep = run("depth", None)
    alpha = run("alpha", None)
    assert rgb.depth is None and dep.image is None and alpha.image is None and alpha.depth is None
    np.testing.assert_allclose(np.asarray(both.image), np.asarray(rgb.image), atol=1e-6)
    np.testing.assert_allclose(np.asarray(both.depth), np.asarray(dep.depth), atol=1e-5)
    np.testing.assert_allclose(np.asarray(alpha.alpha), np.asarray(rgb.alpha), atol=1e-6)
    black = run("rgb", None)
    a = np.asarray(rgb.alpha)
    np.testing.assert_allclose(np.asarray(rgb.image) - np.asarray(black.image), (1 - a) * np.array([1.0, 0.0, 0.5]), atol=1e-5)
    covered = a[..., 0] > 0.5
    d = np.asarray(dep.depth)[..., 0]
    assert covered.sum() > 100
    # expected depth lies within the depth range of the Gaussians seen by each camera
    z = np.asarray(splat.project(s["means"], splat.covariance(s["quats"], s["scales"]), cams, 40, 30).depths)
    for c in range(2):
        assert z[c].min() - 0.05 <= d[c][covered[c]].min() and d[c][covered[c]].max() <= z[c].max() + 0.05
    assert np.all(d[a[..., 0] == 0] == 0)


def test_sh_colours_and_covariance_override():
    s = small_scene(1)
    cams = camera.orbit_rig(2, 1.2, width=32, height=32, fov_y_deg=45)
    f = jax.jit(lambda sh, deg, cov: splat.rasterize(s["means"], s["quats"], s["scales"], s["opacities"], sh, cams,
                                                     sh_degree=deg, covariances=cov, backend="reference").image,
                static_argnums=1)
    # degree 0 SH equals plain colours C0 * f_dc + 0.5
    dc = (s["colors"] - 0.5) / splat.SH_C0
    sh0 = np.zeros_like(s["sh"])
    sh0[:, 0] = dc
    plain = jax.jit(lambda: splat.rasterize(s["means"], s["quats"], s["scales"], s["opacities"], s["colors"], cams,
                                            backend="reference").image)()
    np.testing.assert_allclose(np.asarray(f(sh0, 0, None)), np.asarray(plain), atol=1e-5)
    np.testing.assert_allclose(np.asarray(f(sh0, 3, None)), np.asarray(plain), atol=1e-5)
    # view-dependent SH gives different colours in the two cameras than degree 0 does
    assert float(jnp.abs(f(s["sh"], 3, None) - f(s["sh"], 0, None)).max()) > 0.05
    cov = splat.covariance(s["quats"], s["scales"])
    np.testing.assert_allclose(np.asarray(f(s["sh"], 3, cov)), np.asarray(f(s["sh"], 3, None)), atol=1e-5)


def test_antialiased_compensation():
    s = small_scene(2)
    cams = camera.orbit_rig(1, 3.0, width=32, height=32, fov_y_deg=30)  # far away: small footprints
    out = {aa: jax.jit(lambda: splat.rasterize(s["means"], s["quats"], s["scales"] * 0.2, s["opacities"], s["colors"],
                                               cams, antialiased=aa, backend="reference", return_meta=True))()
           for aa in (False, True)}
    comp = np.asarray(out[True].meta["compensations"])
    assert np.all((comp > 0) & (comp <= 1)) and comp.min() < 0.5
    assert float(out[True].alpha.sum()) < float(out[False].alpha.sum())


def test_bad_input_errors():
    s = small_scene()
    cams = camera.orbit_rig(2, 1.2, width=16, height=16)
    args = (s["means"], s["quats"], s["scales"], s["opacities"], s["colors"], cams)
    with pytest.raises(ValueError, match="render_mode"):
        splat.rasterize(*args, render_mode="normals")
    with pytest.raises(ValueError, match="quats"):
        splat.rasterize(s["means"], s["quats"][:, :3], *args[2:])
    with pytest.raises(ValueError, match="opacities"):
        splat.rasterize(s["means"], s["quats"], s["scales"], s["opacities"][:, None], *args[4:])
    with pytest.raises(ValueError, match="SH coefficients"):
        splat.rasterize(*args[:4], s["colors"], cams, sh_degree=2)
    with pytest.raises(ValueError, match="needs 16 coefficients"):
        splat.rasterize(*args[:4], s["sh"][:, :9], cams, sh_degree=3)
    with pytest.raises(ValueError, match="colors must be"):  # checked in every render mode
        splat.rasterize(*args[:4], s["colors"][:5], cams, render_mode="alpha")
    with pytest.raises(ValueError, match="background"):
        splat.rasterize(*args, background=jnp.zeros(4))
    with pytest.raises(ValueError, match="covariances"):
        splat.rasterize(*args, covariances=jnp.zeros((3, 3, 3)))
