"""Image losses and metrics: SSIM against scikit-image (peers) and a direct 2D numpy reference with
zero padding (borders), PSNR against scikit-image, masked L1/PSNR against numpy formulas,
batching, jit, gradients, bad input."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dhjax import losses

# jitted once per module: eager calls would compile every primitive separately (slow on CPU)
ssim_map = jax.jit(losses.ssim_map, static_argnames=("window", "sigma", "data_range"))

def images(seed, shape=(2, 40, 48, 3)):
    """A smooth-ish image and a noisy, shifted copy, both in [0, 1]."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(size=shape)
    # a little local correlation so SSIM is far from 0 and from 1
    base = (base + np.roll(base, 1, -2) + np.roll(base, 1, -3)) / 3
    other = np.clip(0.8 * base + 0.1 + rng.normal(0, 0.05, shape), 0, 1)
    return base.astype(np.float32), other.astype(np.float32)


def ssim_map_reference(a, b, window=11, sigma=1.5, L=1.0):
    """Direct (non-separable) 2D window sums with zero padding, float64; a, b [H, W, C]."""
    x = np.arange(window) - window // 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    w2 = np.outer(g, g) / g.sum() ** 2
    p = window // 2
    H, W = a.shape[:2]

    def blur(img):
        pad = np.pad(img, ((p, p), (p, p), (0, 0)))
        out = np.zeros_like(img)
        for i in range(window):
            for j in range(window):
                out += w2[i, j] * pad[i:i + H, j:j + W]
        return out

    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ma, mb = blur(a), blur(b)
    va, vb, cab = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    return (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def test_ssim_map_matches_direct_reference_including_borders():
    a, b = images(0)
    got = np.asarray(ssim_map(a, b))
    assert got.shape == a.shape
    for n in range(a.shape[0]):
        np.testing.assert_allclose(got[n], ssim_map_reference(a[n], b[n]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.ssim(a, b)), got.mean(axis=(1, 2, 3)), rtol=1e-6)
    # other window / sigma / data range
    got7 = np.asarray(ssim_map(2 * a[0], 2 * b[0], window=7, sigma=1.0, data_range=2.0))
    np.testing.assert_allclose(got7, ssim_map_reference(2 * a[0], 2 * b[0], 7, 1.0, 2.0), atol=1e-5)


@pytest.mark.peers
def test_ssim_map_matches_skimage_interior():
    skm = pytest.importorskip("skimage.metrics")
    a, b = images(1)
    got = np.asarray(ssim_map(a, b))
    for n in range(a.shape[0]):
        _, S = skm.structural_similarity(
            a[n].astype(np.float64), b[n].astype(np.float64), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, channel_axis=-1, full=True)
        np.testing.assert_allclose(got[n, 5:-5, 5:-5], S[5:-5, 5:-5], atol=1e-5)


@pytest.mark.peers
def test_psnr_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    a, b = images(2)
    got = np.asarray(losses.psnr(a, b))
    assert got.shape == (2,)
    for n in range(2):
        want = skm.peak_signal_noise_ratio(a[n].astype(np.float64), b[n].astype(np.float64), data_range=1.0)
        np.testing.assert_allclose(got[n], want, rtol=1e-5)
    want = skm.peak_signal_noise_ratio(255 * a[0].astype(np.float64), 255 * b[0].astype(np.float64), data_range=255)
    np.testing.assert_allclose(np.asarray(losses.psnr(255 * a[0], 255 * b[0], data_range=255.0)), want, rtol=1e-5)


def test_psnr_from_mse():
    """The PSNR of a batch's MSE (one number for a whole batch, as a data-parallel step logs it)."""
    a, b = images(2)
    batch_mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    np.testing.assert_allclose(float(losses.psnr_from_mse(jnp.float32(batch_mse))), 10 * np.log10(1 / batch_mse),
                               rtol=1e-6)
    np.testing.assert_allclose(float(losses.psnr_from_mse(jnp.float32(4.0), data_range=255.0)),
                               10 * np.log10(255.0 ** 2 / 4.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(losses.psnr(a, b)),
                                  np.asarray(losses.psnr_from_mse(losses.mse(a, b))))
    assert np.isinf(float(losses.psnr_from_mse(jnp.float32(0.0))))


def test_identical_images():
    a, _ = images(3)
    np.testing.assert_array_equal(np.asarray(losses.ssim(a, a)), 1.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(losses.ssim)(a, a)), 1.0)
    assert float(losses.one_minus_ssim(a, a)) == 0.0
    assert float(losses.l1(a, a)) == 0.0
    assert np.all(np.isinf(np.asarray(losses.psnr(a, a))))


def test_batching_and_jit():
    a, b = images(4, (2, 3, 32, 36, 3))
    ssim = jax.jit(losses.ssim)
    per = np.asarray(ssim(a, b))
    assert per.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(per[i, j], float(ssim(a[i, j], b[i, j])), rtol=1e-6)
    assert np.asarray(losses.psnr(a, b)).shape == (2, 3)
    np.testing.assert_allclose(float(losses.one_minus_ssim(a, b)), 1 - per.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(losses.l1_ssim_loss(a, b)),
                               0.8 * np.abs(a - b).mean() + 0.2 * (1 - per.mean()), rtol=1e-6)


def test_gradient_step_reduces_dssim():
    a, b = images(5, (1, 32, 32, 3))
    f = jax.jit(lambda x: losses.one_minus_ssim(x, b))
    g = np.asarray(jax.grad(f)(jnp.asarray(a)))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    before = float(f(a))
    after = float(f(a - 0.5 * g / np.abs(g).max() * 0.05))
    assert after < before
    # the combined loss too, also with a mask
    g2 = jax.jit(jax.grad(lambda x: losses.l1_ssim_loss(x, b) + losses.l1(x, b, mask=np.ones((32, 32)))))(a)
    assert np.all(np.isfinite(np.asarray(g2)))


def test_masked_l1_and_psnr():
    a, b = images(6, (2, 16, 20, 3))
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(2, 16, 20)) > 0.4
    want = (np.abs(a - b) * mask[..., None]).sum() / (mask.sum() * 3)
    np.testing.assert_allclose(float(losses.l1(a, b, mask)), want, rtol=1e-6)
    np.testing.assert_allclose(float(losses.l1(a, b, mask[..., None])), want, rtol=1e-6)
    # one mask for all images (broadcast over the batch) counts its pixels once per image
    m1 = mask[0]
    want1 = (np.abs(a - b) * m1[None, :, :, None]).sum() / (2 * m1.sum() * 3)
    np.testing.assert_allclose(float(losses.l1(a, b, m1)), want1, rtol=1e-6)
    # soft weights
    w = rng.uniform(size=(2, 16, 20)).astype(np.float32)
    np.testing.assert_allclose(float(losses.l1(a, b, w)),
                               (np.abs(a - b) * w[..., None]).sum() / (w.sum() * 3), rtol=1e-5)
    assert float(losses.l1(a, b, np.zeros((16, 20)))) == 0.0
    np.testing.assert_allclose(float(losses.l1(a, b)), np.abs(a - b).mean(), rtol=1e-6)
    # masked PSNR per image
    for n in range(2):
        mse = ((a[n] - b[n]) ** 2 * mask[n][..., None]).sum() / (mask[n].sum() * 3)
        np.testing.assert_allclose(np.asarray(losses.psnr(a, b, mask))[n], 10 * np.log10(1 / mse), rtol=1e-5)


def test_bad_input():
    a, b = images(7, (1, 16, 16, 3))
    with pytest.raises(ValueError, match="same shape"):
        losses.ssim(a, b[..., :2])
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, C\]"):
        losses.l1(a[0, 0], b[0, 0])
    with pytest.raises(ValueError, match="odd"):
        losses.ssim(a, b, window=10)
    with pytest.raises(ValueError, match="mask"):
        losses.l1(a, b, np.ones((16, 15)))
    with pytest.raises(ValueError, match="mask"):
        losses.psnr(a, b, np.ones((3, 16, 16)))


@pytest.mark.parametrize("shape", [(2, 37, 50, 4), (1, 3, 5, 2), (1, 128, 96, 15)])
def test_banded_blur_equals_the_depthwise_convolution(shape):
    """SSIM's separable window as banded-matrix products equals the depthwise convolutions it
    replaced (zero padding, images smaller than the window included), values and gradients."""
    taps = losses.gaussian_window(11, 1.5)
    x = jax.random.normal(jax.random.PRNGKey(3), shape)
    np.testing.assert_allclose(losses._blur(x, taps), losses._blur_depthwise(x, taps), atol=2e-6, rtol=0)
    w = jax.random.normal(jax.random.PRNGKey(4), shape)
    g = jax.grad(lambda x: jnp.sum(w * losses._blur(x, taps)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(w * losses._blur_depthwise(x, taps)))(x)
    np.testing.assert_allclose(g, g_ref, atol=2e-6, rtol=0)
