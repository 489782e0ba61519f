"""A small StyleUNet (flax linen, NHWC) for UV-space avatars: GEM's CNN avatar.

The network maps UV-space input maps of a tracked head mesh (e.g. position, normal and
expression-offset maps) to per-texel Gaussian attributes, as Animatable Gaussians and StyleAvatar
do with their StyleUNet:

    x: [B, S, S, C_in]  ->  [B, S, S, out_features]   (e.g. out_features = 11: 3 position offset
                                                        + 4 rotation + 3 log scale + 1 opacity)

Architecture (L = len(widths) levels, S must divide by 2^(L-1)):

    style:    a learned constant per style index (`style`: [n_styles, style_dim]) -> mapping MLP
              (2 x Dense + leaky ReLU) -> w: [B, style_dim], shared by every modulated conv
    encoder:  conv_in 3x3 -> widths[0]; per level l >= 1: stride-2 conv 3x3 -> widths[l], then a
              conv 3x3; the features of every level (before it is down-sampled) are kept as skips
    bottleneck: ModulatedConv(widths[-1]) at S / 2^(L-1)
    decoder:  per level l = L-2 .. 0: ModulatedConv(widths[l], up=True) (x2 bilinear resize +
              conv), concatenate the skip of level l, ModulatedConv(widths[l])
    head:     conv 1x1 -> out_features, weights N(0, out_init_std^2 / fan_in), zero bias, so the
              output starts near zero (std ~ out_init_std): GEM adds it as offsets to a template.

Every conv is followed by StyleGAN's leaky ReLU (slope 0.2, gain sqrt(2)); with fan-in scaled
initialisation this keeps activations at unit scale through the depth.

`ModulatedConv` is StyleGAN2's weight modulation/demodulation: a Dense (bias initialised to 1)
turns the style w into per-input-channel scales s: [B, C_in]; the per-example weight is
w'[b] = w * s[b] (over input channels), demodulated per output channel by
1 / sqrt(sum_{k,k,C_in} w'[b]^2 + 1e-8). It is computed in the fused, exactly equivalent form
(scale the input activations by s, convolve with the shared w, scale the output by the
demodulation factor), so one ordinary batched convolution serves all examples.

Simplified versus StyleUNet (Wang et al. 2023, StyleAvatar; used by Animatable Gaussians):
- the style is a learned constant per style index (no noise inputs, no latent sampled from a
  distribution, no style mixing); every modulated conv reads the same w;
- up-sampling is a bilinear resize then a 3x3 conv (StyleGAN2 uses a transposed conv + FIR blur);
  down-sampling is a plain stride-2 conv (no blur) and the encoder has plain convs, not ResBlocks;
- no equalised learning rate on the plain convs (flax's fan-in initialisation instead; the
  modulated convs keep StyleGAN2's N(0, 1) weights scaled at run time by 1/sqrt(fan_in));
- no toRGB skip branches: one 1x1 head at full resolution.

There is no batch statistic anywhere (demodulation is per example, no normalisation layer), so an
example's output never depends on the other examples of its batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_LRELU_GAIN = math.sqrt(2.0)


def leaky_relu(x):
    """StyleGAN's activation: leaky ReLU (slope 0.2) times sqrt(2). Any shape -> same shape."""
    return nn.leaky_relu(x, 0.2) * _LRELU_GAIN


def upsample2(x, method: str = "bilinear"):
    """[B, H, W, C] -> [B, 2H, 2W, C] by `jax.image.resize` ('nearest' or 'bilinear')."""
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), method)


class ModulatedConv(nn.Module):
    """StyleGAN2 modulated (and demodulated) convolution, stride 1, SAME padding.

    __call__(x: [B, H, W, C_in], style: [B, style_dim]) -> [B, H', W', features], with
    H' = 2H, W' = 2W when `up` (x2 `resize` of the input before the conv), else H' = H, W' = W.

    Parameters: `kernel` [kernel, kernel, C_in, features] ~ N(0, 1) (scaled by 1/sqrt(fan_in) at
    run time), `affine` (Dense style_dim -> C_in, bias initialised to 1), `bias` [features] (zeros,
    added after demodulation).
    """

    features: int
    kernel: int = 3
    demodulate: bool = True
    up: bool = False
    resize: str = "bilinear"
    eps: float = 1e-8

    @nn.compact
    def __call__(self, x, style):
        if x.ndim != 4:
            raise ValueError(f"ModulatedConv input must be [B, H, W, C], got shape {x.shape}")
        if style.ndim != 2 or style.shape[0] != x.shape[0]:
            raise ValueError(f"style must be [B, style_dim] with B = {x.shape[0]}, "
                             f"got shape {style.shape}")
        c_in = x.shape[-1]
        k = self.kernel
        w = self.param("kernel", nn.initializers.normal(1.0), (k, k, c_in, self.features))
        w = w * (1.0 / math.sqrt(k * k * c_in))
        s = nn.Dense(c_in, bias_init=nn.initializers.ones, name="affine")(style)  # [B, C_in]
        if self.up:
            x = upsample2(x, self.resize)
        y = jax.lax.conv_general_dilated(
            x * s[:, None, None, :], w.astype(x.dtype), window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.demodulate:
            # sum_{k,k,i} (w[.., i, o] s[b, i])^2 = sum_i s[b, i]^2 * sum_{k,k} w[.., i, o]^2
            wsq = jnp.sum(jnp.square(w), axis=(0, 1))  # [C_in, features]
            d = jax.lax.rsqrt(jnp.square(s) @ wsq + self.eps)  # [B, features]
            y = y * d[:, None, None, :]
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return y + bias


class StyleUNet(nn.Module):
    """UV-space StyleUNet: input maps -> per-texel attributes (see the module docstring).

    __call__(x: [B, S_h, S_w, C_in] float, style_index: [B] int or None) -> [B, S_h, S_w,
    out_features]. S_h and S_w must divide by 2^(len(widths) - 1) (ValueError otherwise).
    `style_index` picks each example's learned style (default: style 0 for every example);
    indices outside [0, n_styles) raise a ValueError when concrete and are clipped under jit.
    `widths` lists the channels per level, finest first.
    """

    out_features: int
    widths: Sequence[int] = (32, 64, 128, 128)
    style_dim: int = 64
    n_styles: int = 1
    out_init_std: float = 1e-3
    resize: str = "bilinear"

    @nn.compact
    def __call__(self, x, style_index=None):
        if x.ndim != 4:
            raise ValueError(f"StyleUNet input must be [B, H, W, C], got shape {x.shape}")
        if len(self.widths) < 1:
            raise ValueError("StyleUNet needs at least one level in `widths`")
        n_down = len(self.widths) - 1
        b, h, w_, _ = x.shape
        if h % (2 ** n_down) or w_ % (2 ** n_down):
            raise ValueError(f"StyleUNet input size {h}x{w_} must divide by 2^{n_down} = "
                             f"{2 ** n_down} (len(widths) = {len(self.widths)} levels)")

        # Style: learned constant per index -> mapping MLP -> w [B, style_dim].
        table = self.param("style", nn.initializers.normal(1.0), (self.n_styles, self.style_dim))
        if style_index is None:
            idx = jnp.zeros((b,), jnp.int32)
        else:
            idx = jnp.asarray(style_index)
            if idx.shape != (b,):
                raise ValueError(f"style_index must be [B] = [{b}], got shape {idx.shape}")
            if not isinstance(style_index, jax.core.Tracer):
                bad = np.asarray(style_index)
                if bad.size and (bad.min() < 0 or bad.max() >= self.n_styles):
                    raise ValueError(f"style_index must be in [0, {self.n_styles}), got "
                                     f"{bad.tolist()}")
        style = jnp.take(table, idx, axis=0, mode="clip").astype(x.dtype)
        for i in range(2):
            style = leaky_relu(nn.Dense(self.style_dim, name=f"mapping{i}")(style))

        # Encoder, keeping one skip per level (before down-sampling).
        h_ = leaky_relu(nn.Conv(self.widths[0], (3, 3), name="conv_in")(x))
        skips = [h_]
        for level in range(1, len(self.widths)):
            ch = self.widths[level]
            h_ = leaky_relu(nn.Conv(ch, (3, 3), strides=(2, 2), name=f"down{level}")(h_))
            h_ = leaky_relu(nn.Conv(ch, (3, 3), name=f"enc{level}")(h_))
            if level < n_down:
                skips.append(h_)

        h_ = leaky_relu(ModulatedConv(self.widths[-1], name="bottleneck")(h_, style))

        # Decoder: up x2 (modulated), concatenate the skip, modulated conv.
        for level in range(n_down - 1, -1, -1):
            ch = self.widths[level]
            h_ = leaky_relu(ModulatedConv(ch, up=True, resize=self.resize,
                                          name=f"up{level}")(h_, style))
            h_ = jnp.concatenate([h_, skips[level]], axis=-1)
            h_ = leaky_relu(ModulatedConv(ch, name=f"dec{level}")(h_, style))

        init = nn.initializers.variance_scaling(self.out_init_std ** 2, "fan_in", "normal")
        return nn.Conv(self.out_features, (1, 1), kernel_init=init, name="head")(h_)


def parameter_count(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


__all__ = ["leaky_relu", "upsample2", "ModulatedConv", "StyleUNet", "parameter_count"]
