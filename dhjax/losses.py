"""Image losses and metrics of the synthesis methods (today SynShot; shared by every one to come).

Images are channels-last arrays `[..., H, W, C]` (any number of leading batch axes), float,
nominally in [0, data_range]. Everything here is a pure, jittable, differentiable function.

SSIM follows the convention of the 3DGS and INSTA training code (Wang et al. 2004 with a
Gaussian window), which differs from scikit-image's only at the borders:

* local statistics use an 11 x 11 Gaussian window with sigma 1.5 (normalised to sum 1), applied
  separably, with zero padding so the map has the input's size ('same');
* mu_a, mu_b are windowed means; var_a = E[a^2] - mu_a^2, var_b likewise, cov = E[ab] - mu_a mu_b
  (population, not sample, statistics);
* SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)) with
  C1 = (0.01 L)^2 and C2 = (0.03 L)^2, L = data_range;
* the image score is the mean of the map over every pixel and channel, borders included.

`one_minus_ssim` is the D-SSIM term of the 3DGS photometric loss (1 - lambda) L1 + lambda (1 - SSIM)
with lambda = 0.2 (`l1_ssim_loss`). It is *not* halved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def _check_pair(a, b, name: str):
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"{name}: expected images [..., H, W, C], got shape {a.shape}")
    return a, b


def _pixel_mask(mask, image_shape, name: str):
    """Mask [..., H, W] or [..., H, W, 1] -> float array broadcast to image_shape[:-1] + (1,)."""
    mask = jnp.asarray(mask, jnp.float32)
    hw = tuple(image_shape[-3:-1])
    if mask.ndim >= 3 and mask.shape[-1] == 1 and tuple(mask.shape[-3:-1]) == hw:
        pass
    elif mask.ndim >= 2 and tuple(mask.shape[-2:]) == hw:
        mask = mask[..., None]
    else:
        raise ValueError(
            f"{name}: mask must be [..., H, W] or [..., H, W, 1] with (H, W) = {hw}, got {mask.shape}")
    try:
        return jnp.broadcast_to(mask, tuple(image_shape[:-1]) + (1,))
    except ValueError:
        raise ValueError(
            f"{name}: mask {mask.shape} does not broadcast against images {tuple(image_shape)}") from None


def l1(a, b, mask=None) -> jax.Array:
    """Mean absolute error, a scalar.

    a, b: [..., H, W, C] images. mask: optional [..., H, W] or [..., H, W, 1] weights (bool or
    float, broadcast over leading axes); then the result is
    sum(mask * |a - b|) / (sum(mask) * C), 0 when the mask is empty.
    """
    a, b = _check_pair(a, b, "l1")
    err = jnp.abs(a - b)
    if mask is None:
        return jnp.mean(err)
    m = _pixel_mask(mask, a.shape, "l1")
    den = jnp.sum(m) * a.shape[-1]
    return jnp.sum(err * m) / jnp.maximum(den, 1e-12)


def gaussian_window(window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1D Gaussian taps [window] float32 summing to 1, centred on tap window // 2."""
    if window < 1 or window % 2 != 1:
        raise ValueError(f"SSIM window must be a positive odd number of pixels, got {window}")
    if not sigma > 0:
        raise ValueError(f"SSIM sigma must be > 0, got {sigma}")
    x = np.arange(window, dtype=np.float64) - window // 2
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _band_matrix(n: int, taps) -> np.ndarray:
    """[n, n] matrix M with (M @ v)[i] = sum_j taps[j] v[i + j - k // 2] (zero padding)."""
    t = np.asarray(taps, np.float64)
    p = t.shape[0] // 2
    i = np.arange(n)[:, None]
    r = np.arange(n)[None, :]
    j = r - i + p
    inside = (j >= 0) & (j < t.shape[0])
    return np.where(inside, t[np.clip(j, 0, t.shape[0] - 1)], 0.0)


def _blur(x, taps):
    """Separable 'same' correlation with zero padding. x: [N, H, W, K]; taps: [k] -> [N, H, W, K].

    Each pass is a product with a banded [H, H] (then [W, W]) matrix, which XLA runs far faster
    on CPUs than the equivalent depthwise convolution, forward and backward (`configs/bench.py:
    synshot` measures both); on GPUs it is a small matmul. Products are float32 at HIGHEST
    precision (no TF32)."""
    H, W = x.shape[1], x.shape[2]
    my = jnp.asarray(_band_matrix(H, taps), x.dtype)
    mx = jnp.asarray(_band_matrix(W, taps), x.dtype)
    y = jnp.einsum("ij,njwk->niwk", my, x, precision=_HI)
    return jnp.einsum("ij,nhjk->nhik", mx, y, precision=_HI)


def _blur_depthwise(x, taps):
    """`_blur` as two depthwise convolutions (the former implementation): the oracle of the
    tests and the reference of `configs/bench.py:synshot`."""
    k = taps.shape[0]
    p = k // 2
    K = x.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    wy = jnp.broadcast_to(jnp.asarray(taps)[:, None, None, None], (k, 1, 1, K))
    wx = jnp.broadcast_to(jnp.asarray(taps)[None, :, None, None], (1, k, 1, K))
    y = jax.lax.conv_general_dilated(x, wy, (1, 1), ((p, p), (0, 0)), dimension_numbers=dn,
                                     feature_group_count=K, precision=_HI)
    return jax.lax.conv_general_dilated(y, wx, (1, 1), ((0, 0), (p, p)), dimension_numbers=dn,
                                        feature_group_count=K, precision=_HI)


def _window_mass(H: int, W: int, taps) -> jax.Array:
    """Total window weight inside an H x W image at each pixel, [H, W] (1 away from the borders)."""
    t = np.asarray(taps, np.float64)
    p = t.shape[0] // 2

    def mass(n):
        ones = np.pad(np.ones(n), p)
        return np.array([t @ ones[i:i + t.shape[0]] for i in range(n)])

    return jnp.asarray(np.outer(mass(H), mass(W)), jnp.asarray(taps).dtype)


def ssim_map(a, b, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> jax.Array:
    """Per-pixel, per-channel SSIM [..., H, W, C] of images a, b [..., H, W, C] (module docstring).

    Values lie in [-1, 1]; 1 where the images agree locally. Channels are treated independently.
    """
    a, b = _check_pair(a, b, "ssim_map")
    dtype = jnp.result_type(a.dtype, b.dtype, jnp.float32)
    a = a.astype(dtype)
    b = b.astype(dtype)
    lead, (H, W, C) = a.shape[:-3], a.shape[-3:]
    a4 = a.reshape((-1, H, W, C))
    b4 = b.reshape((-1, H, W, C))
    taps = gaussian_window(window, sigma).astype(dtype)
    # Variances as E[x^2] - E[x]^2 cancel badly in float32 when the local spread is small next to
    # the mean, so the statistics are taken of images centred on their global per-channel means
    # s_a, s_b and shifted back exactly. With zero padding the window's weight inside the image,
    # w = blur(1), is below 1 near the borders, which adds the (1 - w) terms below (they vanish
    # in the interior). The result equals the plain formula in exact arithmetic.
    s_a = jax.lax.stop_gradient(jnp.mean(a4, axis=(1, 2), keepdims=True))
    s_b = jax.lax.stop_gradient(jnp.mean(b4, axis=(1, 2), keepdims=True))
    c = a4 - s_a
    d = b4 - s_b
    # one depthwise pass over the five quantities whose local means SSIM needs
    stats = _blur(jnp.concatenate([c, d, c * c, d * d, c * d], axis=-1), taps)
    m_c, m_d, e_cc, e_dd, e_cd = jnp.split(stats, 5, axis=-1)
    w = _window_mass(H, W, taps)[None, :, :, None]
    u = 1.0 - w
    mu_a = m_c + s_a * w
    mu_b = m_d + s_b * w
    var_a = e_cc - m_c * m_c + 2.0 * s_a * m_c * u + s_a * s_a * w * u
    var_b = e_dd - m_d * m_d + 2.0 * s_b * m_d * u + s_b * s_b * w * u
    cov = e_cd - m_c * m_d + (s_b * m_c + s_a * m_d) * u + s_a * s_b * w * u
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return (num / den).reshape(lead + (H, W, C))


def ssim(a, b, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> jax.Array:
    """Mean SSIM per image: [...] for images a, b [..., H, W, C] (mean of `ssim_map` over H, W, C).

    Identical images give exactly 1.
    """
    m = ssim_map(a, b, window=window, sigma=sigma, data_range=data_range)
    return jnp.mean(m, axis=(-3, -2, -1))


def one_minus_ssim(a, b, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> jax.Array:
    """The 3DGS D-SSIM loss term 1 - SSIM (not halved), averaged over all images: a scalar in [0, 2].

    a, b: [..., H, W, C].
    """
    return 1.0 - jnp.mean(ssim(a, b, window=window, sigma=sigma, data_range=data_range))


def l1_ssim_loss(a, b, *, ssim_weight: float = 0.2, data_range: float = 1.0) -> jax.Array:
    """3DGS photometric loss (1 - w) * L1 + w * (1 - SSIM), w = ssim_weight (0.2 in 3DGS). Scalar.

    a, b: [..., H, W, C].
    """
    return (1.0 - ssim_weight) * l1(a, b) + ssim_weight * one_minus_ssim(a, b, data_range=data_range)


def mse(a, b, mask=None) -> jax.Array:
    """Mean squared error per image: [...] for a, b [..., H, W, C].

    With mask [..., H, W] or [..., H, W, 1]: sum(mask (a - b)^2) / (sum(mask) C) per image.
    """
    a, b = _check_pair(a, b, "mse")
    err = jnp.square(a - b)
    if mask is None:
        return jnp.mean(err, axis=(-3, -2, -1))
    m = _pixel_mask(mask, a.shape, "mse")
    num = jnp.sum(err * m, axis=(-3, -2, -1))
    den = jnp.sum(m, axis=(-3, -2, -1)) * a.shape[-1]
    return num / jnp.maximum(den, 1e-12)


def psnr_from_mse(mse_value, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB of a mean squared error (any shape; e.g. the MSE of a
    whole batch averaged over devices): 10 log10(data_range^2 / MSE); MSE = 0 gives +inf."""
    return 10.0 * jnp.log10(data_range ** 2 / mse_value)


def psnr(a, b, mask=None, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: [...] for a, b [..., H, W, C].

    PSNR = 10 log10(data_range^2 / MSE), MSE as in `mse` (masked when a mask is given). Identical
    images give +inf.
    """
    return psnr_from_mse(mse(a, b, mask), data_range)
