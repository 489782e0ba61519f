"""Convolutional building blocks (flax linen, NHWC): residual blocks, a down-sampling encoder,
an up-sampling decoder and the light-weight regressor SynShot puts on sampled feature grids.

Normalisation is GroupNorm (no batch statistics), so a data-parallel step needs no cross-device
statistics and one example's output never depends on the others in its batch.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


def _groups(channels: int, max_groups: int = 8) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, plus a (1x1-projected when widths differ) skip.

    [B, H, W, C_in] -> [B, H, W, features].
    """

    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.swish(nn.GroupNorm(num_groups=_groups(x.shape[-1]))(x))
        h = nn.Conv(self.features, (3, 3))(h)
        h = nn.swish(nn.GroupNorm(num_groups=_groups(self.features))(h))
        h = nn.Conv(self.features, (3, 3))(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), name="skip")(x)
        return x + h


class Encoder(nn.Module):
    """Image-like map -> spatial latent, down-sampling by 2 between levels.

    [B, H, W, C] -> [B, H / 2^(L-1), W / 2^(L-1), latent_dim] for L = len(channels) levels
    (H and W must divide by 2^(L-1)).
    """

    channels: Sequence[int]
    latent_dim: int
    blocks: int = 1

    @nn.compact
    def __call__(self, x):
        n_down = len(self.channels) - 1
        if x.shape[-3] % (2 ** n_down) or x.shape[-2] % (2 ** n_down):
            raise ValueError(f"encoder input {x.shape[-3]}x{x.shape[-2]} must divide by 2^{n_down}")
        x = nn.Conv(self.channels[0], (3, 3), name="conv_in")(x)
        for level, ch in enumerate(self.channels):
            for _ in range(self.blocks):
                x = ResBlock(ch)(x)
            if level < n_down:
                x = nn.Conv(ch, (3, 3), strides=(2, 2), name=f"down{level}")(x)
        x = nn.swish(nn.GroupNorm(num_groups=_groups(x.shape[-1]))(x))
        return nn.Conv(self.latent_dim, (1, 1), name="conv_out")(x)


class Decoder(nn.Module):
    """Spatial latent -> map, up-sampling by 2 (nearest + conv3x3) between levels.

    [B, h, w, n] -> [B, h 2^(L-1), w 2^(L-1), out_dim]; `channels` is listed from the finest
    level to the coarsest (the encoder's order), so a decoder mirrors an encoder with the same
    tuple. The output convolution starts at zero weights scaled by `out_init_scale`.
    """

    channels: Sequence[int]
    out_dim: int
    blocks: int = 1
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, z):
        chans = list(self.channels)[::-1]
        x = nn.Conv(chans[0], (3, 3), name="conv_in")(z)
        for level, ch in enumerate(chans):
            for _ in range(self.blocks):
                x = ResBlock(ch)(x)
            if level < len(chans) - 1:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
                x = nn.Conv(chans[level + 1], (3, 3), name=f"up{level}")(x)
        x = nn.swish(nn.GroupNorm(num_groups=_groups(x.shape[-1]))(x))
        init = nn.initializers.variance_scaling(self.out_init_scale, "fan_in", "truncated_normal")
        return nn.Conv(self.out_dim, (3, 3), kernel_init=init, name="conv_out")(x)


class Regressor(nn.Module):
    """SynShot's per-part regressor: four stacked conv blocks with skip connections on a grid of
    sampled features, then a 1x1 output head.

    [B, h, w, F] -> [B, h, w, out_dim]. The head starts at zero (bias `out_bias`), so at
    initialisation the regressor outputs `out_bias` everywhere: corrective offsets start at 0.
    """

    out_dim: int
    width: int = 64
    blocks: int = 4
    out_bias: float = 0.0

    @nn.compact
    def __call__(self, s):
        x = nn.Conv(self.width, (1, 1), name="conv_in")(s)
        for i in range(self.blocks):
            h = nn.Conv(self.width, (3, 3), name=f"block{i}")(nn.swish(x))
            x = x + h
        return nn.Conv(self.out_dim, (1, 1), kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.constant(self.out_bias), name="head")(nn.swish(x))
