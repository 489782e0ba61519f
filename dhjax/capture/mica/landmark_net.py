"""MICA's landmark encoder (`encoder.kind = "landmarks"`): the landmark crop, a heatmap network
for the 68 iBUG face landmarks, and the shape descriptor made of them.

    crop = landmark_crop(image, five points)                     [96, 96, 3]  zoomed-out crop
    p    = HeatmapNet(crop)                                       [68, 2]      iBUG-68, crop pixels
    d    = descriptor(p)                                          [136]        similarity-normalised
    z    = 0.25 * M(d)                                            [300]        MICA's mapping network

Crop (`landmark_crop`, `CROP_TEMPLATE`): the same five-point similarity alignment as
ArcFace's crop, but zoomed out (ArcFace's template x 0.6, shifted) into a 96 x 96 crop, so the
jaw line and the chin, which ArcFace's 112 x 112 crop cuts off, stay inside it.

Network (`HeatmapNet`): a small U-Net (GroupNorm, so no batch statistics): stem conv stride 2,
residual blocks down to 1/16 of the crop, back up to 1/4 with skip connections, 68 heatmaps
at 1/4 resolution, and the expected position under each heatmap's spatial softmax (integral
regression, Sun et al. 2018) in crop pixels.

Descriptor (`descriptor`): the points aligned onto a fixed mean-face template
(`TEMPLATE`, 68 points in crop pixels) by the least-squares similarity (2D Procrustes with
scale, `dhjax.capture.align.similarity_from_points`), minus the template, divided by
`DESCRIPTOR_SCALE_PX`: invariant to where the face is, how it is rotated in the image plane and
how big it is, and of order one per coordinate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dhjax.capture import align

__all__ = ["CROP_SIZE", "N_POINTS", "CROP_TEMPLATE", "TEMPLATE", "DESCRIPTOR_SCALE_PX",
           "crop_transform", "landmark_crop", "to_crop", "from_crop", "HeatmapNet", "descriptor"]

CROP_SIZE = 96
"""Side of the landmark crop, pixels."""
N_POINTS = 68
"""iBUG-68 landmarks the network predicts."""
_ZOOM = 0.6
_SHIFT = (14.4, 4.2)
CROP_TEMPLATE = (align.ARCFACE_TEMPLATE * _ZOOM + np.asarray(_SHIFT, np.float32)).astype(np.float32)
"""[5, 2] where the five alignment points go in the landmark crop: ArcFace's template x 0.6,
shifted so that the face (jaw and chin included) sits in the middle of the 96 x 96 crop."""

TEMPLATE = np.array([
    [27.35, 44.14], [29.87, 51.67], [32.72, 57.22], [35.80, 62.45], [38.80, 67.35], [41.44, 71.44],
    [43.65, 74.54], [45.74, 76.59], [48.14, 77.37], [50.53, 76.57], [52.60, 74.48], [54.80, 71.35],
    [57.46, 67.24], [60.53, 62.31], [63.63, 57.05], [66.49, 51.46], [68.99, 43.88], [33.52, 28.21],
    [35.41, 27.13], [38.21, 26.42], [41.22, 26.65], [44.71, 27.81], [51.07, 27.72], [54.58, 26.47],
    [57.62, 26.20], [60.46, 26.88], [62.38, 27.96], [47.89, 35.16], [47.88, 38.58], [47.92, 43.20],
    [47.95, 47.79], [44.76, 51.89], [46.43, 51.84], [48.00, 51.78], [49.56, 51.82], [51.23, 51.85],
    [36.49, 34.70], [37.47, 32.13], [39.68, 32.08], [42.26, 34.75], [39.74, 37.35], [37.27, 37.20],
    [53.65, 34.65], [56.22, 31.91], [58.47, 31.94], [59.51, 34.56], [58.70, 37.09], [56.24, 37.25],
    [41.38, 59.83], [43.24, 57.19], [46.05, 56.02], [48.01, 56.54], [49.98, 55.99], [52.83, 57.11],
    [54.81, 59.72], [52.21, 66.45], [49.98, 68.06], [48.01, 68.45], [46.01, 68.10], [43.82, 66.55],
    [42.13, 60.25], [45.59, 60.99], [48.08, 61.07], [50.57, 60.95], [54.05, 60.14], [50.47, 62.45],
    [47.99, 62.61], [45.53, 62.52]], np.float32)
"""[68, 2] the descriptor's reference face (crop pixels): the generalised Procrustes mean (size
and centroid of the plain mean) of the projected ground-truth landmarks of the tiny MICA
config's 1200 training images (`configs/mica.py:tiny`) in the landmark crop. Any fixed
face-like template gives the same invariances; this one makes the descriptor's mean close to
zero."""

DESCRIPTOR_SCALE_PX = 2.0
"""Crop pixels per descriptor unit (about the spread of a landmark coordinate across faces,
expressions and views)."""


def crop_transform(five):
    """[..., 5, 2] five alignment points (image pixels, `dhjax.capture.align` order) -> [..., 2,
    3] similarity, image pixels -> landmark-crop pixels."""
    five = jnp.asarray(five)
    return align.similarity_from_points(five, jnp.asarray(CROP_TEMPLATE, five.dtype if
                                                          jnp.issubdtype(five.dtype, jnp.floating) else jnp.float32))


def landmark_crop(image, five):
    """The 96 x 96 landmark crop of an image [H, W, C] at five points [5, 2] (float output, the
    image's value range; vmap for batches)."""
    return align.warp_affine(image, crop_transform(five), (CROP_SIZE, CROP_SIZE))


def to_crop(points, M):
    """Image pixels [..., N, 2] -> crop pixels with transforms M [..., 2, 3]."""
    return jnp.einsum("...ij,...nj->...ni", M[..., :, :2], points) + M[..., None, :, 2]


def from_crop(points, M):
    """Crop pixels [..., N, 2] -> image pixels (the inverse of `to_crop`)."""
    return jnp.einsum("...ij,...nj->...ni", jnp.linalg.inv(M[..., :, :2]), points - M[..., None, :, 2])


class _Block(nn.Module):
    """conv3x3(stride) -> GroupNorm -> ReLU -> conv3x3 -> GroupNorm, plus a (1x1-projected)
    shortcut, ReLU."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        g = max(1, min(4, self.features // 4))
        y = nn.Conv(self.features, (3, 3), self.stride, padding=1, name="conv1")(x)
        y = nn.relu(nn.GroupNorm(num_groups=g, name="norm1")(y))
        y = nn.Conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
        y = nn.GroupNorm(num_groups=g, name="norm2")(y)
        if x.shape[-1] != self.features or self.stride != 1:
            x = nn.Conv(self.features, (1, 1), self.stride, name="skip")(x)
        return nn.relu(x + y)


class HeatmapNet(nn.Module):
    """Landmark crops [B, 96, 96, 3] (floats in [0, 1] or uint8) -> [B, 68, 2] landmark
    positions in crop pixels (soft-argmax of 68 heatmaps at 1/4 resolution).

    Layout (w = `width`): stem conv3x3 stride 2 (w) -> block(w) [1/2] -> block(2w, stride 2)
    [1/4] -> block(4w, s2) [1/8] -> block(4w, s2) [1/16] -> up x2, concat [1/8], block(4w) ->
    up x2, concat [1/4], block(2w) -> conv1x1 to 68 heatmaps -> softmax over pixels ->
    expected pixel centre."""

    width: int = 16
    n_points: int = N_POINTS

    @nn.compact
    def __call__(self, crops):
        x = jnp.asarray(crops)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"crops: expected [B, H, W, 3], got {x.shape}")
        x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        w = int(self.width)
        x = (x - 0.5) / 0.25
        x = nn.relu(nn.Conv(w, (3, 3), 2, padding=1, name="stem")(x))
        e1 = _Block(w, name="down1")(x)
        e2 = _Block(2 * w, 2, name="down2")(e1)
        e3 = _Block(4 * w, 2, name="down3")(e2)
        e4 = _Block(4 * w, 2, name="down4")(e3)
        up = lambda a, like: jax.image.resize(a, like.shape[:3] + (a.shape[-1],), "nearest")  # noqa: E731
        d3 = _Block(4 * w, name="up3")(jnp.concatenate([up(e4, e3), e3], -1))
        d2 = _Block(2 * w, name="up2")(jnp.concatenate([up(d3, e2), e2], -1))
        h = nn.Conv(int(self.n_points), (1, 1), name="heatmaps")(d2)
        B, H, W, K = h.shape
        p = jax.nn.softmax(h.reshape(B, H * W, K), axis=1)
        sy, sx = crops.shape[1] / H, crops.shape[2] / W
        ys, xs = jnp.meshgrid((jnp.arange(H) + 0.5) * sy - 0.5, (jnp.arange(W) + 0.5) * sx - 0.5, indexing="ij")
        grid = jnp.stack([xs.ravel(), ys.ravel()], -1)
        return jnp.einsum("bnk,nc->bkc", p, grid)


def descriptor(points):
    """Similarity-normalised landmarks: [..., 68, 2] (any pixel frame) -> [..., 136].

    The points are aligned onto `TEMPLATE` by the least-squares similarity (rotation, uniform
    scale, translation), then (aligned - TEMPLATE) / DESCRIPTOR_SCALE_PX, flattened. Moving,
    rotating or scaling the points in the image plane does not change it. jit/vmap-able,
    differentiable."""
    points = jnp.asarray(points, jnp.float32)
    if points.ndim < 2 or points.shape[-2:] != (N_POINTS, 2):
        raise ValueError(f"points: expected [..., {N_POINTS}, 2], got {tuple(points.shape)}")
    tmpl = jnp.asarray(TEMPLATE)
    M = align.similarity_from_points(points, jnp.broadcast_to(tmpl, points.shape))
    aligned = to_crop(points, M)
    d = (aligned - tmpl) / DESCRIPTOR_SCALE_PX
    return d.reshape(d.shape[:-2] + (2 * N_POINTS,))
