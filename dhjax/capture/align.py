"""Five-point face alignment to the ArcFace 112x112 crop (what ArcFace/MICA embeddings expect).

insightface aligns a face by the least-squares similarity (rotation, uniform scale,
translation; no reflection) that maps five detected points (eye centres, nose tip, mouth
corners) onto fixed template positions in a 112x112 crop (`ARCFACE_TEMPLATE`), then resamples
the image with it (bilinear, zero outside the image, as OpenCV's warpAffine).

Conventions: points are (x, y) in pixels, x along columns, y down the rows, the centre of the
top-left pixel at (0, 0) (OpenCV's and scikit-image's). A [2, 3] matrix ``M`` maps source
pixel coordinates to destination ones, ``dst = M[:, :2] @ src + M[:, 2]``. "Left" in the
five-point order means the left side of the image (the subject's right eye / mouth corner).

    M = arcface_transform(landmarks5)                       # [2, 3]
    crop = arcface_crop(image, landmarks5)                  # [112, 112, C]
    crop = arcface_crop(image, five_points_from_68(lmk68))  # from iBUG-68 landmarks

Everything is jit/vmap-able (sizes are static Python ints) and differentiable in the points
and the image.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = [
    "ARCFACE_SIZE",
    "ARCFACE_TEMPLATE",
    "similarity_from_points",
    "warp_affine",
    "arcface_transform",
    "arcface_crop",
    "five_points_from_68",
]

ARCFACE_SIZE = 112

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye centre (image left)
        [73.5318, 51.5014],  # right eye centre
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    np.float32,
)
"""[5, 2] insightface's ArcFace template (arcface_dst), pixels of the 112x112 crop."""


def _points(x, n, name):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim < 2 or x.shape[-2:] != (n, 2):
        raise ValueError(f"{name}: expected shape [..., {n}, 2] (x, y pixels), got {tuple(x.shape)}")
    return x


def similarity_from_points(src, dst):
    """Least-squares 2D similarity (Umeyama with scale, rotations only) mapping src to dst.

    Minimises ``sum_i |dst_i - (s R src_i + t)|^2`` over ``s >= 0``, ``R in SO(2)`` and
    ``t``. In 2D the solution is closed form: with centred points ``a_i = src_i - mean(src)``,
    ``b_i = dst_i - mean(dst)``, ``c = sum a_i . b_i``, ``d = sum a_i x b_i`` (z of the cross
    product), ``s R = [[c, -d], [d, c]] / sum |a_i|^2``, ``t = mean(dst) - s R mean(src)``
    (identical to Umeyama's SVD solution with its reflection correction, and to
    skimage.transform.SimilarityTransform.estimate). All-equal source points give s R = 0
    (a pure translation to mean(dst)).

    Args:
      src: [..., N, 2] float source points (N >= 2), pixels.
      dst: [..., N, 2] float destination points, pixels.

    Returns:
      [..., 2, 3] float ``M`` with ``dst ~= src @ M[:, :2]^T + M[:, 2]``.
    """
    src = jnp.asarray(src)
    n = src.shape[-2] if src.ndim >= 2 else -1
    if n < 2 or src.shape[-1] != 2:
        raise ValueError(f"src: expected shape [..., N, 2] with N >= 2, got {tuple(src.shape)}")
    src = _points(src, n, "src")
    dst = _points(dst, n, "dst (same N as src)")
    dtype = jnp.result_type(src.dtype, dst.dtype)
    src, dst = src.astype(dtype), dst.astype(dtype)
    mu_s = jnp.mean(src, axis=-2)
    mu_d = jnp.mean(dst, axis=-2)
    a = src - mu_s[..., None, :]
    b = dst - mu_d[..., None, :]
    c = jnp.sum(a * b, axis=(-2, -1))
    d = jnp.sum(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0], axis=-1)
    var = jnp.sum(a * a, axis=(-2, -1))
    ok = var > 0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, var, 1.0), 0.0)
    A = jnp.stack([jnp.stack([c, -d], -1), jnp.stack([d, c], -1)], -2) * inv[..., None, None]
    t = mu_d - jnp.einsum("...ij,...j->...i", A, mu_s)
    return jnp.concatenate([A, t[..., None]], axis=-1)


def _size(out_size):
    if isinstance(out_size, (int, np.integer)):
        out_size = (int(out_size), int(out_size))
    try:
        h, w = (int(v) for v in out_size)
    except (TypeError, ValueError) as e:
        raise ValueError(f"out_size: expected an int or (height, width), got {out_size!r}") from e
    if h < 1 or w < 1:
        raise ValueError(f"out_size: expected positive sizes, got {(h, w)}")
    return h, w


def warp_affine(image, M, out_size):
    """Resamples `image` so that output pixel q shows the input at ``M^-1 q`` (OpenCV's
    warpAffine convention with a forward matrix), bilinear, zero outside the image.

    A tap outside the image contributes zero, so the one-pixel seam along the image border
    fades to zero as with OpenCV's BORDER_CONSTANT (scipy.ndimage's mode="grid-constant").

    Args:
      image: [H, W, C] image (any numeric dtype; computed in float32 or the image's float dtype).
      M: [2, 3] float forward transform, input pixels -> output pixels (e.g. from
        `similarity_from_points`); must be invertible.
      out_size: int or (height, width) of the output, static.

    Returns:
      [out_h, out_w, C] float image.
    """
    image = jnp.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image: expected shape [H, W, C], got {tuple(image.shape)}")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    M = jnp.asarray(M)
    if M.shape != (2, 3):
        raise ValueError(f"M: expected shape [2, 3], got {tuple(M.shape)}")
    M = M.astype(jnp.result_type(M.dtype, jnp.float32))
    oh, ow = _size(out_size)
    H, W, _ = image.shape

    A, t = M[:, :2], M[:, 2]
    det = A[0, 0] * A[1, 1] - A[0, 1] * A[1, 0]
    A_inv = jnp.stack([jnp.stack([A[1, 1], -A[0, 1]]), jnp.stack([-A[1, 0], A[0, 0]])]) / det
    ys, xs = jnp.meshgrid(jnp.arange(oh, dtype=M.dtype), jnp.arange(ow, dtype=M.dtype),
                          indexing="ij")
    q = jnp.stack([xs - t[0], ys - t[1]], axis=-1)  # [oh, ow, 2]
    p = jnp.einsum("ij,hwj->hwi", A_inv, q)
    px, py = p[..., 0], p[..., 1]

    x0 = jnp.floor(px)
    y0 = jnp.floor(py)
    fx = (px - x0).astype(image.dtype)[..., None]
    fy = (py - y0).astype(image.dtype)[..., None]
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)

    def tap(yi, xi):
        inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        v = image[jnp.clip(yi, 0, H - 1), jnp.clip(xi, 0, W - 1)]
        return jnp.where(inside[..., None], v, jnp.zeros((), image.dtype))

    top = tap(y0, x0) * (1 - fx) + tap(y0, x0 + 1) * fx
    bottom = tap(y0 + 1, x0) * (1 - fx) + tap(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def arcface_transform(landmarks5, size: int = ARCFACE_SIZE):
    """Similarity from image pixels to the ArcFace crop for five landmarks.

    Args:
      landmarks5: [..., 5, 2] float (x, y) pixels: left eye, right eye, nose tip, left mouth
        corner, right mouth corner (left = image left).
      size: crop side; the template is scaled by size / 112 (insightface's rule for sizes
        that are multiples of 112).

    Returns:
      [..., 2, 3] float forward matrix (image -> crop pixels).
    """
    landmarks5 = _points(landmarks5, 5, "landmarks5")
    if int(size) != size or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    dst = jnp.asarray(ARCFACE_TEMPLATE * (float(size) / ARCFACE_SIZE), landmarks5.dtype)
    return similarity_from_points(landmarks5, dst)


def arcface_crop(image, landmarks5, size: int = ARCFACE_SIZE):
    """The aligned ArcFace crop of a face.

    Args:
      image: [H, W, C] image (e.g. RGB floats in [0, 1] or uint8; the output is float).
      landmarks5: [5, 2] float (x, y) pixels in `image`, order as in `ARCFACE_TEMPLATE`
        (see `five_points_from_68` for iBUG-68 landmarks).
      size: crop side (112 for ArcFace).

    Returns:
      [size, size, C] float crop (vmap over both arguments for batches).
    """
    landmarks5 = _points(landmarks5, 5, "landmarks5")
    if landmarks5.ndim != 2:
        raise ValueError(f"landmarks5: expected shape [5, 2] (vmap for batches), got "
                         f"{tuple(landmarks5.shape)}")
    return warp_affine(image, arcface_transform(landmarks5, size), (int(size), int(size)))


def five_points_from_68(lmk68):
    """ArcFace's five points from the 68 iBUG/300-W landmarks (0-based indices).

    Eye centres: means of 36-41 (image-left eye) and 42-47; nose tip: 30; mouth corners: 48
    (image left) and 54.

    Args:
      lmk68: [..., 68, 2] float (x, y) pixels.

    Returns:
      [..., 5, 2] float in `ARCFACE_TEMPLATE` order.
    """
    lmk68 = _points(lmk68, 68, "lmk68")
    return jnp.stack(
        [
            jnp.mean(lmk68[..., 36:42, :], axis=-2),
            jnp.mean(lmk68[..., 42:48, :], axis=-2),
            lmk68[..., 30, :],
            lmk68[..., 48, :],
            lmk68[..., 54, :],
        ],
        axis=-2,
    )
