"""Tests for dhjax.geometry.alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import alignment
from dhjax.geometry.rotations import axis_angle_to_matrix

umeyama = jax.jit(alignment.umeyama, static_argnames="with_scale")
apply_similarity = jax.jit(alignment.apply_similarity)


def _random_rotation(rng, batch=()):
    aa = rng.normal(size=batch + (3,))
    return np.asarray(axis_angle_to_matrix(aa.astype(np.float32)), np.float64)


def _problem(rng, batch=(), n=12, noise=0.0):
    src = rng.normal(size=batch + (n, 3))
    R = _random_rotation(rng, batch)
    s = rng.uniform(0.5, 2.0, size=batch)
    t = rng.normal(size=batch + (3,))
    dst = s[..., None, None] * src @ np.swapaxes(R, -1, -2) + t[..., None, :]
    dst = dst + noise * rng.normal(size=dst.shape)
    return src.astype(np.float32), dst.astype(np.float32), s, R, t


def test_recovers_known_similarity():
    rng = np.random.default_rng(0)
    src, dst, s, R, t = _problem(rng, batch=(4,))
    s_hat, R_hat, t_hat = umeyama(src, dst)
    assert s_hat.shape == (4,) and R_hat.shape == (4, 3, 3) and t_hat.shape == (4, 3)
    np.testing.assert_allclose(s_hat, s, rtol=2e-5)
    np.testing.assert_allclose(R_hat, R, atol=2e-5)
    np.testing.assert_allclose(t_hat, t, atol=2e-5)
    np.testing.assert_allclose(apply_similarity(s_hat, R_hat, t_hat, src), dst, atol=5e-5)


def test_rigid_recovers_rotation_and_has_unit_scale():
    rng = np.random.default_rng(1)
    src, dst, _, R, t = _problem(rng, batch=(3,))
    # a rigid problem: undo the scale
    dst_rigid = (src @ np.swapaxes(R, -1, -2) + t[:, None, :]).astype(np.float32)
    s_hat, R_hat, t_hat = umeyama(src, dst_rigid, with_scale=False)
    np.testing.assert_allclose(s_hat, 1.0)
    np.testing.assert_allclose(R_hat, R, atol=2e-5)
    np.testing.assert_allclose(t_hat, t, atol=2e-5)
    # with_scale=False on the scaled problem still gives a proper rotation and unit scale
    s_hat, R_hat, _ = umeyama(src, dst, with_scale=False)
    np.testing.assert_allclose(s_hat, 1.0)
    np.testing.assert_allclose(R_hat, R, atol=2e-5)


def test_zero_weight_outlier_has_no_influence():
    rng = np.random.default_rng(2)
    src, dst, _, _, _ = _problem(rng, n=10, noise=0.05)
    src_o = np.concatenate([src, np.array([[5.0, -3.0, 2.0]], np.float32)])
    dst_o = np.concatenate([dst, np.array([[-40.0, 10.0, 7.0]], np.float32)])
    w = np.concatenate([np.ones(10), [0.0]]).astype(np.float32)
    ref = umeyama(src, dst)
    got = umeyama(src_o, dst_o, w)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=2e-5)
    # and a non-zero weight on it does change the result
    bad = umeyama(src_o, dst_o)
    assert np.abs(np.asarray(bad[1]) - np.asarray(ref[1])).max() > 1e-2
    # scaling all weights changes nothing
    got2 = umeyama(src_o, dst_o, 7.0 * w)
    for a, b in zip(got2, got):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_integer_weights_equal_duplicated_points():
    rng = np.random.default_rng(3)
    src, dst, _, _, _ = _problem(rng, n=8, noise=0.1)
    w = np.array([1, 2, 1, 3, 1, 1, 2, 1], np.float32)
    rep = np.repeat(np.arange(8), w.astype(int))
    got = umeyama(src, dst, w)
    ref = umeyama(src[rep], dst[rep])
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_reflection_gives_proper_rotation():
    rng = np.random.default_rng(4)
    src = rng.normal(size=(3, 20, 3)).astype(np.float32)
    dst = src * np.array([1.0, 1.0, -1.0], np.float32)  # mirror image
    for with_scale in (True, False):
        s, R, _ = umeyama(src, dst, with_scale=with_scale)
        np.testing.assert_allclose(np.linalg.det(np.asarray(R)), 1.0, atol=1e-5)
        assert np.all(np.asarray(s) > 0)


def test_broadcasting_of_batch_dims():
    rng = np.random.default_rng(5)
    src, dst, _, _, _ = _problem(rng, batch=(2,), n=9, noise=0.01)
    w = rng.uniform(0.5, 1.5, size=(3, 1, 9)).astype(np.float32)
    s, R, t = umeyama(src, dst, w)
    assert s.shape == (3, 2) and R.shape == (3, 2, 3, 3) and t.shape == (3, 2, 3)
    s1, R1, t1 = umeyama(src[1], dst[1], w[2, 0])
    np.testing.assert_allclose(R[2, 1], R1, atol=1e-6)
    np.testing.assert_allclose(s[2, 1], s1, rtol=1e-6)


def _rotvec_to_matrix64(v):
    """Rodrigues' formula in float64 numpy (independent of the library), for perturbing R."""
    theta = np.linalg.norm(v)
    if theta == 0.0:
        return np.eye(3)
    k = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]]) / theta
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


def _weighted_sse(s, R, t, src, dst, w):
    """``sum_i w_i |dst_i - (s R src_i + t)|^2``, all in float64."""
    r = dst - (s * src @ R.T + t)
    return float(np.sum(w * np.sum(r * r, axis=-1)))


@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_result_minimises_weighted_residual_on_noisy_data(with_scale, weighted):
    # With noise the generating transform is not the optimum, so this checks the least-squares
    # solution itself (a wrong scale formula such as sqrt(var_dst / var_src) is exact on
    # noise-free data but not optimal here). Perturbing any of s (log scale), R (left-multiplied
    # by a small rotation) or t by a step delta must increase the weighted squared error, and the
    # increase must be symmetric in the sign of the step (no first-order term left).
    rng = np.random.default_rng(12)
    n = 30
    src, dst, s_true, R_true, t_true = _problem(rng, n=n, noise=0.3)
    w = rng.uniform(0.1, 3.0, size=n).astype(np.float32) if weighted else None
    s, R, t = (np.asarray(x, np.float64) for x in umeyama(src, dst, w, with_scale=with_scale))
    if not with_scale:
        assert s == 1.0
    src64, dst64 = src.astype(np.float64), dst.astype(np.float64)
    w64 = np.ones(n) if w is None else w.astype(np.float64)
    sse = lambda s_, R_, t_: _weighted_sse(s_, R_, t_, src64, dst64, w64)  # noqa: E731
    best = sse(s, R, t)
    assert best < sse(s_true if with_scale else 1.0, R_true, t_true)

    # Parameter directions: (d log s, rotation vector, dt); scale stays fixed without scale.
    directions = [np.eye(7)[k] for k in range(int(not with_scale), 7)]
    for _ in range(4):
        d = rng.normal(size=7)
        if not with_scale:
            d[0] = 0.0
        directions.append(d / np.linalg.norm(d))
    delta = 1e-3  # float32 parameter errors (~1e-7) are far below this step

    def perturbed(d, sign):
        step = sign * delta * d
        return sse(s * np.exp(step[0]), _rotvec_to_matrix64(step[1:4]) @ R, t + step[4:])

    for d in directions:
        plus, minus = perturbed(d, 1.0), perturbed(d, -1.0)
        assert plus > best and minus > best, (d, best, plus, minus)
        # f(+h) - f(-h) = 2 h g.d + O(h^3), f(+h) + f(-h) - 2 f(0) = h^2 d.H.d + O(h^4): at the
        # optimum the gradient g vanishes, so the first is tiny compared with the second.
        assert abs(plus - minus) < 0.05 * (plus + minus - 2.0 * best), (d, best, plus, minus)


def _loss(src, dst, w):
    s, R, t = alignment.umeyama(src, dst, w)
    return jnp.sum(jnp.sin(R)) + s + jnp.sum(t**2)


def test_gradients_finite_and_match_finite_differences():
    rng = np.random.default_rng(6)
    src, dst, _, _, _ = _problem(rng, n=7, noise=0.1)
    w = rng.uniform(0.5, 1.5, size=7).astype(np.float32)
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))
    gs = grad(src, dst, w)
    for g in gs:
        assert np.all(np.isfinite(np.asarray(g)))
    # directional derivative vs central differences (float32; h balances truncation/roundoff)
    f = jax.jit(_loss)
    for arg, g in zip(range(3), gs):
        args = [src, dst, w]
        direction = rng.normal(size=args[arg].shape).astype(np.float32)
        h = 1e-2
        plus = list(args)
        minus = list(args)
        plus[arg] = args[arg] + h * direction
        minus[arg] = args[arg] - h * direction
        fd = (float(f(*plus)) - float(f(*minus))) / (2 * h)
        np.testing.assert_allclose(np.sum(np.asarray(g) * direction), fd, rtol=2e-3, atol=2e-3)


def test_gradients_finite_with_repeated_singular_values():
    # cube corners: isotropic covariance, so all singular values of M are equal. The derivative
    # of the SVD factors is undefined here, the derivative of the optimal rotation is not.
    cube = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1], indexing="ij")).reshape(3, -1).T
    src = cube.astype(np.float32)
    R = np.asarray(axis_angle_to_matrix(np.array([0.3, -0.2, 0.5], np.float32)))
    dst = (1.5 * src @ R.T + 0.1).astype(np.float32)
    w = np.ones(8, np.float32)
    gs = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))(src, dst, w)
    for g in gs:
        assert np.all(np.isfinite(np.asarray(g)))
    # the derivative of R w.r.t. dst matches finite differences here too
    rng = np.random.default_rng(7)
    direction = rng.normal(size=dst.shape).astype(np.float32)
    r_of = jax.jit(lambda d: alignment.umeyama(src, d)[1])
    _, dR = jax.jvp(r_of, (jnp.asarray(dst),), (jnp.asarray(direction),))
    h = 1e-2
    fd = (np.asarray(r_of(dst + h * direction)) - np.asarray(r_of(dst - h * direction))) / (2 * h)
    np.testing.assert_allclose(dR, fd, atol=2e-3)
    # dR = R Omega with Omega skew-symmetric (tangent to SO(3))
    omega = np.asarray(R).T @ np.asarray(dR)
    np.testing.assert_allclose(omega, -omega.T, atol=1e-5)


def test_jvp_at_exactly_isotropic_covariance():
    # octahedron mapped onto itself: M = I / 3 exactly, where the SVD-factor derivative is NaN
    octa = np.concatenate([np.eye(3), -np.eye(3)]).astype(np.float32)
    rng = np.random.default_rng(10)
    direction = rng.normal(size=octa.shape).astype(np.float32)
    r_of = jax.jit(lambda d: alignment.umeyama(octa, d)[1])
    _, dR = jax.jvp(r_of, (jnp.asarray(octa),), (jnp.asarray(direction),))
    assert np.all(np.isfinite(np.asarray(dR)))
    h = 1e-2
    fd = (np.asarray(r_of(octa + h * direction)) - np.asarray(r_of(octa - h * direction))) / (2 * h)
    np.testing.assert_allclose(dR, fd, atol=2e-3)
    g = jax.jit(jax.grad(_loss, argnums=1))(octa, octa, np.ones(6, np.float32))
    assert np.all(np.isfinite(np.asarray(g)))


def test_degenerate_inputs_are_finite():
    src = np.zeros((5, 3), np.float32)  # all source points equal
    dst = np.ones((5, 3), np.float32)
    s, R, t = umeyama(src, dst)
    assert np.all(np.isfinite(np.asarray(s))) and np.all(np.isfinite(np.asarray(R)))
    np.testing.assert_allclose(t, np.ones(3), atol=1e-6)
    g = jax.jit(jax.grad(_loss, argnums=1))(src, dst, np.ones(5, np.float32))
    assert np.all(np.isfinite(np.asarray(g)))
    # all-zero weights: finite
    s, R, t = umeyama(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), np.zeros(3))
    assert np.all(np.isfinite(np.asarray(R))) and np.all(np.isfinite(np.asarray(t)))


def test_shape_errors():
    with pytest.raises(ValueError, match="src"):
        alignment.umeyama(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="dst"):
        alignment.umeyama(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="weights"):
        alignment.umeyama(np.zeros((4, 3)), np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="points"):
        alignment.apply_similarity(1.0, np.eye(3), np.zeros(3), np.zeros(3))


@pytest.mark.peers
def test_rigid_matches_scipy_orthogonal_procrustes():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(8)
    src, dst, _, _, _ = _problem(rng, n=15, noise=0.05)
    a = src - src.mean(0)
    b = dst - dst.mean(0)
    R_op, _ = linalg.orthogonal_procrustes(a.astype(np.float64), b.astype(np.float64))
    assert np.linalg.det(R_op) > 0  # small noise: no reflection involved
    _, R, t = umeyama(src, dst, with_scale=False)
    # orthogonal_procrustes solves a @ R_op ~= b (row vectors), i.e. R_op = R^T
    np.testing.assert_allclose(np.asarray(R).T, R_op, atol=2e-5)
    np.testing.assert_allclose(t, dst.mean(0) - np.asarray(R) @ src.mean(0), atol=2e-5)


@pytest.mark.peers
def test_rigid_matches_scipy_align_vectors_weighted():
    spt = pytest.importorskip("scipy.spatial.transform")
    rng = np.random.default_rng(9)
    src, dst, _, _, _ = _problem(rng, n=15, noise=0.2)
    w = rng.uniform(0.1, 2.0, size=15)
    mu_s = (w[:, None] * src).sum(0) / w.sum()
    mu_d = (w[:, None] * dst).sum(0) / w.sum()
    # align_vectors(a, b, weights) finds C minimising sum w |a - C b|^2 (no translation)
    C, _ = spt.Rotation.align_vectors(dst - mu_d, src - mu_s, weights=w)
    _, R, _ = umeyama(src, dst, w.astype(np.float32), with_scale=False)
    np.testing.assert_allclose(R, C.as_matrix(), atol=2e-5)


def _skimage_fit(transform_cls, src, dst):
    """Homogeneous 4x4 matrix of a scikit-image transform estimated from 3D correspondences."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if hasattr(transform_cls, "from_estimate"):  # scikit-image >= 0.26
        tf = transform_cls.from_estimate(src, dst)
        assert tf, f"scikit-image estimation failed: {tf}"
    else:  # older releases: construct in 3D, then estimate in place
        tf = transform_cls(dimensionality=3)
        assert tf.estimate(src, dst)
    assert tf.params.shape == (4, 4)
    return tf.params


@pytest.mark.peers
def test_similarity_matches_skimage_on_noisy_points():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(13)
    batch = 5
    # noise 0.3 on unit-variance points: the optimal scale differs from both the generating
    # scale and sqrt(var_dst / var_src) by ~1e-3 .. 1e-1 (checked below), far above the tolerance
    src, dst, _, _, _ = _problem(rng, batch=(batch,), n=40, noise=0.3)
    s, R, t = (np.asarray(x) for x in umeyama(src, dst))
    s_rigid, R_rigid, t_rigid = (np.asarray(x) for x in umeyama(src, dst, with_scale=False))
    for b in range(batch):
        # scikit-image works in float64 on the same (float32-representable) points, so the only
        # difference is float32 rounding in dhjax: ~1e-7 relative for the means, the 3x3
        # cross-covariance and its SVD (the Procrustes rotation is well conditioned: its
        # sensitivity goes with 1 / (sigma_i + sigma_j), not a singular-value gap). 1e-5 is
        # ~100 float32 ulps of the O(1) quantities; the observed differences are ~3e-7.
        A = _skimage_fit(transform.SimilarityTransform, src[b], dst[b])
        s_ref = np.cbrt(np.linalg.det(A[:3, :3]))
        R_ref = A[:3, :3] / s_ref
        np.testing.assert_allclose(np.linalg.det(R_ref), 1.0, atol=1e-12)
        np.testing.assert_allclose(s[b], s_ref, rtol=1e-5)
        np.testing.assert_allclose(R[b], R_ref, atol=1e-5)
        np.testing.assert_allclose(t[b], A[:3, 3], atol=1e-5)
        # the data are noisy enough that a moment-ratio scale would be caught
        xs = src[b] - src[b].mean(0)
        xd = dst[b] - dst[b].mean(0)
        ratio = np.sqrt(np.sum(xd.astype(np.float64) ** 2) / np.sum(xs.astype(np.float64) ** 2))
        assert abs(ratio / s_ref - 1.0) > 1e-3

        # rigid (Kabsch) fit against scikit-image's Euclidean transform
        E = _skimage_fit(transform.EuclideanTransform, src[b], dst[b])
        np.testing.assert_allclose(s_rigid[b], 1.0)
        np.testing.assert_allclose(R_rigid[b], E[:3, :3], atol=1e-5)
        np.testing.assert_allclose(t_rigid[b], E[:3, 3], atol=1e-5)
