"""Five-point ArcFace alignment: exact recovery of known similarities, least squares against
scikit-image's SimilarityTransform (peer), bilinear warping against scipy.ndimage and
scikit-image (peers) and exactly on linear ramps, the crop placing the landmarks on the
template, the 68 -> 5 point reduction, jit/vmap/grad, bad shapes."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dhjax.capture import align

# jitted once each: one compile instead of eager op-by-op dispatch
warp = jax.jit(align.warp_affine, static_argnums=2)
fit = jax.jit(align.similarity_from_points)


def similarity(s, theta, t):
    c, sn = np.cos(theta), np.sin(theta)
    return np.array([[s * c, -s * sn, t[0]], [s * sn, s * c, t[1]]])


def apply(M, pts):
    return pts @ np.asarray(M)[:, :2].T + np.asarray(M)[:, 2]


def ramp_image(h, w):
    """[h, w, 3] image whose channels are x, y and 1 + 0.5 x - 0.25 y (linear in the pixel)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([xs, ys, 1 + 0.5 * xs - 0.25 * ys], -1)


def test_recovers_known_similarity():
    rng = np.random.default_rng(0)
    for n in (5, 5, 5, 9):
        M = similarity(rng.uniform(0.3, 3), rng.uniform(-np.pi, np.pi), rng.normal(0, 50, 2))
        src = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        got = np.asarray(fit(src, apply(M, src).astype(np.float32)))
        np.testing.assert_allclose(got, M, rtol=1e-5, atol=2e-4)  # float32 (jax without x64)
    # float32 and batched
    Ms = np.stack([similarity(rng.uniform(0.5, 2), rng.uniform(-3, 3), rng.normal(0, 9, 2)) for _ in range(4)])
    src = rng.uniform(0, 100, (4, 5, 2))
    dst = np.einsum("bij,bnj->bni", Ms[:, :, :2], src) + Ms[:, None, :, 2]
    got = np.asarray(fit(src.astype(np.float32), dst.astype(np.float32)))
    assert got.shape == (4, 2, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, Ms, atol=2e-3, rtol=1e-4)
    # a reflection is not a similarity here: the best rotation is returned, det > 0
    mirrored = src[0] * np.array([-1.0, 1.0])
    A = np.asarray(fit(src[0].astype(np.float32), mirrored.astype(np.float32)))[:, :2]
    assert np.linalg.det(A) >= 0
    # all-equal source points: finite, a translation to the mean of dst
    M0 = np.asarray(fit(np.ones((5, 2), np.float32), src[0].astype(np.float32)))
    np.testing.assert_allclose(M0, np.c_[np.zeros((2, 2)), src[0].mean(0)], rtol=1e-6)


@pytest.mark.peers
def test_least_squares_matches_skimage():
    tf = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(1)
    for _ in range(5):
        src = rng.uniform(0, 250, (5, 2))
        M = similarity(rng.uniform(0.3, 1.5), rng.uniform(-1, 1), rng.normal(0, 30, 2))
        dst = apply(M, src) + rng.normal(0, 3.0, src.shape)  # noisy: a genuine fit
        if hasattr(tf.SimilarityTransform, "from_estimate"):
            want = tf.SimilarityTransform.from_estimate(src, dst).params[:2]
        else:  # scikit-image < 0.26
            t = tf.SimilarityTransform()
            assert t.estimate(src, dst)
            want = t.params[:2]
        np.testing.assert_allclose(np.asarray(fit(src.astype(np.float32), dst.astype(np.float32))), want,
                                   rtol=1e-5, atol=2e-4)


def test_warp_exact_on_ramps():
    img = ramp_image(60, 80)
    M = similarity(0.8, 0.4, (10.0, -5.0))
    out = np.asarray(warp(img, M, (50, 70)))
    assert out.shape == (50, 70, 3)
    ys, xs = np.mgrid[0:50, 0:70].astype(np.float64)
    Minv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
    px = Minv[0, 0] * xs + Minv[0, 1] * ys + Minv[0, 2]
    py = Minv[1, 0] * xs + Minv[1, 1] * ys + Minv[1, 2]
    inside = (px >= 0) & (px <= 79) & (py >= 0) & (py <= 59)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[inside][:, 0], px[inside], atol=1e-3)
    np.testing.assert_allclose(out[inside][:, 1], py[inside], atol=1e-3)
    far = (px < -1) | (px > 80) | (py < -1) | (py > 60)
    assert far.any() and np.all(out[far] == 0)
    # the identity reproduces the image; int sizes; uint8 input gives floats
    np.testing.assert_allclose(np.asarray(warp(img, np.eye(2, 3), (60, 80))), img, atol=1e-4)
    u8 = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    out_u8 = np.asarray(warp(u8, np.eye(2, 3), 16))
    assert out_u8.dtype == np.float32
    np.testing.assert_array_equal(out_u8, u8.astype(np.float32))


@pytest.mark.peers
def test_warp_matches_scipy_and_skimage():
    ndimage = pytest.importorskip("scipy.ndimage")
    tf = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (90, 70, 3)).astype(np.float32)
    M = similarity(1.3, -0.3, (-12.0, 20.0))
    out = np.asarray(warp(img, M, (100, 96)))
    # scipy: (row, col) coordinates, output -> input matrix; grid-constant = OpenCV's zero border
    Minv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
    P = np.array([[0, 1], [1, 0]])
    mat, off = P @ Minv[:2, :2] @ P, P @ Minv[:2, 2]
    want = np.stack([ndimage.affine_transform(img[..., c].astype(np.float64), mat, off,
                                              output_shape=(100, 96), order=1, mode="grid-constant")
                     for c in range(3)], -1)
    np.testing.assert_allclose(out, want, atol=1e-4)
    # skimage: same on the interior (its border handling differs)
    want_sk = tf.warp(img.astype(np.float64), tf.AffineTransform(matrix=Minv), output_shape=(100, 96),
                      order=1, mode="constant", cval=0.0)
    ys, xs = np.mgrid[0:100, 0:96]
    px = Minv[0, 0] * xs + Minv[0, 1] * ys + Minv[0, 2]
    py = Minv[1, 0] * xs + Minv[1, 1] * ys + Minv[1, 2]
    interior = (px > 1) & (px < 68) & (py > 1) & (py < 88)
    assert interior.mean() > 0.3
    np.testing.assert_allclose(out[interior], want_sk[interior], atol=1e-4)


def test_arcface_crop_puts_landmarks_on_template():
    rng = np.random.default_rng(3)
    img = ramp_image(400, 400)
    M_true = similarity(2.1, 0.25, (120.0, 60.0))  # crop -> image, roughly a face of 230 px
    lmk5 = apply(M_true, align.ARCFACE_TEMPLATE.astype(np.float64)) + rng.normal(0, 0.5, (5, 2))
    crop = jax.jit(align.arcface_crop)(img.astype(np.float32), lmk5.astype(np.float32))
    crop = np.asarray(crop)
    assert crop.shape == (112, 112, 3)
    # the crop of a ramp is the ramp of the source coordinates: read it at the template points
    M = np.asarray(jax.jit(align.arcface_transform)(lmk5.astype(np.float32)))
    Minv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))
    ys, xs = np.mgrid[0:112, 0:112]
    np.testing.assert_allclose(crop[..., 0], Minv[0, 0] * xs + Minv[0, 1] * ys + Minv[0, 2], atol=2e-3)
    np.testing.assert_allclose(crop[..., 1], Minv[1, 0] * xs + Minv[1, 1] * ys + Minv[1, 2], atol=2e-3)
    # the fitted transform maps the landmarks (least squares) onto the template
    np.testing.assert_allclose(apply(M, lmk5), align.ARCFACE_TEMPLATE, atol=1.0)
    np.testing.assert_allclose(np.asarray(align.arcface_transform(apply(M_true, align.ARCFACE_TEMPLATE))),
                               np.linalg.inv(np.vstack([M_true, [0, 0, 1]]))[:2], atol=1e-5)
    # larger crops scale the template (insightface's rule for multiples of 112)
    big = np.asarray(align.arcface_transform(lmk5, size=224))
    np.testing.assert_allclose(big, 2 * M, atol=1e-4)
    # batches by vmap; gradients w.r.t. the landmarks are finite
    crops = jax.jit(jax.vmap(align.arcface_crop))(jnp.stack([img, img]).astype(jnp.float32),
                                         jnp.stack([lmk5, lmk5 + 3]).astype(jnp.float32))
    assert crops.shape == (2, 112, 112, 3)
    g = jax.jit(jax.grad(lambda p: jnp.sum(align.arcface_crop(img.astype(jnp.float32), p)[..., 2])))(
        jnp.asarray(lmk5, jnp.float32))
    assert g.shape == (5, 2) and np.all(np.isfinite(np.asarray(g)))


def test_five_points_from_68():
    rng = np.random.default_rng(4)
    lmk = rng.uniform(0, 100, (68, 2))
    five = np.asarray(align.five_points_from_68(lmk))
    np.testing.assert_allclose(five, [lmk[36:42].mean(0), lmk[42:48].mean(0), lmk[30], lmk[48], lmk[54]],
                               rtol=1e-6)
    batched = np.asarray(align.five_points_from_68(np.stack([lmk, lmk + 1])))
    assert batched.shape == (2, 5, 2)
    np.testing.assert_allclose(batched[1], five + 1, rtol=1e-6)


def test_bad_shapes():
    img = np.zeros((50, 50, 3), np.float32)
    with pytest.raises(ValueError, match=r"landmarks5: expected shape \[\.\.\., 5, 2\].*\(4, 2\)"):
        align.arcface_crop(img, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"landmarks5.*\(5, 3\)"):
        align.arcface_transform(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"landmarks5: expected shape \[5, 2\]"):
        align.arcface_crop(img, np.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match=r"lmk68: expected shape \[\.\.\., 68, 2\].*\(67, 2\)"):
        align.five_points_from_68(np.zeros((67, 2)))
    with pytest.raises(ValueError, match=r"lmk68.*\(68,\)"):
        align.five_points_from_68(np.zeros(68))
    with pytest.raises(ValueError, match="same N as src"):
        align.similarity_from_points(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        align.similarity_from_points(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"image: expected shape \[H, W, C\]"):
        align.warp_affine(np.zeros((50, 50)), np.eye(2, 3), 10)
    with pytest.raises(ValueError, match=r"M: expected shape \[2, 3\]"):
        align.warp_affine(img, np.eye(3), 10)
    with pytest.raises(ValueError, match="out_size"):
        align.warp_affine(img, np.eye(2, 3), (0, 10))
