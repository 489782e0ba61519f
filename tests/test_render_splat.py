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
    """The same cameras in gsplat's pixel convention (centres at +0.5, so cx_gsplat = cx + 0.5):
    2D means differ by exactly 0.5 px, everything else (window clamp, conics, radii, culling at
    the image's true edges) is equal, also for Gaussians far outside the frustum."""
    torch = pytest.importorskip("torch")
    ti = pytest.importorskip("gsplat.cuda._torch_impl")
    means, quats, scales = gaussians(1)
    means[:20, 2] += 3.0  # some behind the cameras / beyond
    means[20:60, 0] *= 6.0  # some far to the sides: their x/z is clamped to the window
    cams = camera.orbit_rig(3, 1.0, width=120, height=90, fov_y_deg=50)
    covs = np.asarray(splat.covariance(quats, scales))
    ours = splat.project(means, covs, cams, 120, 90, radius_sigma=3.33)
    viewmats = np.zeros((3, 4, 4), np.float32)
    viewmats[:, :3, :3] = np.asarray(cams.R)
    viewmats[:, :3, 3] = np.asarray(cams.t)
    viewmats[:, 3, 3] = 1
    K_gs = np.array(cams.K)
    K_gs[:, :2, 2] += 0.5
    radii, m2d, depths, conics, comp = ti._fully_fused_projection(
        torch.tensor(means), torch.tensor(covs), torch.tensor(viewmats), torch.tensor(K_gs),
        120, 90, eps2d=0.3, near_plane=0.01, far_plane=1e10, calc_compensations=True)
    valid = (depths.numpy() > 0.01)
    assert valid.sum() > 500 and (~valid).sum() > 10
    pc = np.einsum("cij,nj->cni", np.asarray(cams.R), means) + np.asarray(cams.t)[:, None]
    clamped = valid & (np.abs(pc[..., 0] / pc[..., 2]) > 1.3 * 60 / np.asarray(cams.K)[:, None, 0, 0])
    assert clamped.sum() > 20
    np.testing.assert_allclose(np.asarray(ours.depths), depths.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.means2d)[valid] + 0.5, m2d.numpy()[valid], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ours.conics)[valid], conics.numpy()[valid], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.compensations)[valid], comp.numpy()[valid], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.radii)[valid], radii.numpy()[valid])
    np.testing.assert_array_equal(np.asarray(ours.radii)[~valid], 0)


def test_a_mirrored_scene_renders_mirrored():
    """A centred camera (c = (W - 1) / 2) and the scene mirrored in its y-z plane: the image is
    the mirror image, also for large Gaussians beyond the image edge, whose covariance depends on
    the clamp window (it is symmetric about the image's true edges). W is a multiple of the tile
    size, so tiles mirror onto tiles; boxes of 5 sigma make the tile binning irrelevant (3DGS's
    tile rectangles, which dhjax keeps, may take one extra tile on the low side of a 3-sigma box,
    and alpha at 3 sigma is above the 1/255 cut)."""
    W, H = 64, 48
    cam = camera.camera_from_fov(60.0, W, H, np.eye(3), np.zeros(3))
    rng = np.random.default_rng(3)
    n = 60
    z = rng.uniform(1.0, 2.0, n)
    x = rng.uniform(-1.6, 1.6, n) * z            # tan(fov_x / 2) = 0.77: many are clamped
    y = rng.uniform(-0.4, 0.4, n) * z
    means = np.stack([x, y, z], 1).astype(np.float32)
    A = rng.normal(size=(n, 3, 3)) * rng.uniform(0.05, 0.3, (n, 1, 1))
    covs = (A @ np.swapaxes(A, 1, 2) + 1e-4 * np.eye(3)).astype(np.float32)
    colors = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    opac = rng.uniform(0.3, 0.9, n).astype(np.float32)
    M = np.diag([-1.0, 1.0, 1.0]).astype(np.float32)
    kw = dict(backend="reference", radius_sigma=5.0)
    img = splat.rasterize(means, None, None, opac, colors, cam, covariances=covs, **kw).image
    img_m = splat.rasterize(means @ M, None, None, opac, colors, cam, covariances=M @ covs @ M, **kw).image
    assert float(jnp.std(img)) > 0.05
    pc = means / means[:, 2:]
    assert np.sum(np.abs(pc[:, 0]) > 1.3 * 0.5 * W / float(cam.K[0, 0])) > 10   # the clamp matters
    np.testing.assert_allclose(np.asarray(img_m)[:, :, ::-1], np.asarray(img), atol=2e-5)


def test_projection_jacobian_includes_skew():
    """With a skewed camera (K[0, 1] != 0) the 2D covariance is J Sigma J^T with J the Jacobian of
    the pinhole projection itself, here by central differences in float64."""
    K = np.array([[300.0, 40.0, 61.0], [0.0, 280.0, 47.0], [0.0, 0.0, 1.0]], np.float32)
    cam = camera.make_camera(K[None], np.eye(3)[None], np.zeros((1, 3)), 120, 90)
    rng = np.random.default_rng(5)
    means = np.stack([rng.uniform(-0.15, 0.15, 30), rng.uniform(-0.1, 0.1, 30), rng.uniform(0.8, 1.5, 30)], 1)
    A = rng.normal(size=(30, 3, 3)) * 0.02
    covs = A @ np.swapaxes(A, 1, 2)
    proj = splat.project(means.astype(np.float32), covs.astype(np.float32), cam, 120, 90, eps2d=0.0)

    def uv(p):
        q = K.astype(np.float64) @ p
        return q[:2] / q[2]

    h = 1e-6
    for i in range(30):
        J = np.stack([(uv(means[i] + h * e) - uv(means[i] - h * e)) / (2 * h) for e in np.eye(3)], 1)
        want = J @ covs[i] @ J.T
        np.testing.assert_allclose(np.asarray(proj.cov2d)[0, i], want, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(proj.means2d)[0, i], uv(means[i]), rtol=1e-5, atol=1e-3)


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
    # opacities outside [0, 1] (logits passed by mistake) are named outside jit; a non-finite one
    # is dropped as the docstring says, not an error; inside jit values cannot be checked
    logits = jnp.asarray(s["opacities"]).at[0].set(-2.0)
    with pytest.raises(ValueError, match=r"opacities must be activated values in \[0, 1\] .*got values in \[-2, "):
        splat.rasterize(s["means"], s["quats"], s["scales"], logits, *args[4:])
    with pytest.raises(ValueError, match=r"got values in \[.*, 1\.5\]"):
        splat.rasterize(s["means"], s["quats"], s["scales"], logits.at[0].set(1.5), *args[4:])
    splat.rasterize(s["means"], s["quats"], s["scales"], logits.at[0].set(jnp.nan), *args[4:])
    jax.jit(lambda o: splat.rasterize(s["means"], s["quats"], s["scales"], o, *args[4:]).image)(logits)
