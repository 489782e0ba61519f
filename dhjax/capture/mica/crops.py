"""The aligned face crops MICA's encoders read, and prediction from them.

Both crops are placed by the five ArcFace points (eye centres, nose tip, mouth corners): the
iresnet reads ArcFace's 112 x 112 crop (`dhjax.capture.align.arcface_crop`), the landmark
encoder the zoomed-out 96 x 96 crop of `dhjax.capture.mica.landmark_net.landmark_crop`.
`crop_from_landmarks`, `crop_batch` take the encoder kind; `predict` checks the crops' size
against the network's kind (`variables_kind`); `predict_image` crops and predicts one image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.capture import align
from dhjax.capture import landmarks as lmk_lib
from dhjax.capture.mica import landmark_net as mlm
from dhjax.capture.mica.model import check_kind, crop_size, net_from_variables, variables_kind

_CROP_NAMES = {"iresnet": "aligned ArcFace crops (crop_from_landmarks)",
               "landmarks": "landmark crops (encoder kind 'landmarks': crop_from_landmarks(image, "
                            "landmarks, kind='landmarks'))"}


def check_crops(crops, kind: str = "iresnet") -> jax.Array:
    """Validates crops [B, S, S, 3] (floats in [0, 1] or uint8) for an encoder kind (S =
    `crop_size(kind)`: 112 ArcFace crops for iresnet, 96 landmark crops); returns them as an
    array. Raises ValueError naming the problem (shape, dtype, non-finite values)."""
    size = crop_size(kind)
    arr = np.asarray(crops)
    if arr.ndim == 3:
        raise ValueError(f"crops: expected a batch [B, {size}, {size}, 3], got one image "
                         f"{arr.shape} (add a leading axis)")
    if arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise ValueError(f"crops: expected [B, {size}, {size}, 3] {_CROP_NAMES[kind]}, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("crops: empty batch (no crops)")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"crops: expected floats in [0, 1] or uint8, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"crops: {int(np.sum(~np.isfinite(arr)))} non-finite values (NaN/inf)")
    return jnp.asarray(arr)


def _image_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: expected [H, W, 3] (or grey / RGBA), got shape {img.shape}")
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        if not np.all(np.isfinite(img)):
            raise ValueError(f"image: {int(np.sum(~np.isfinite(img)))} non-finite values (NaN/inf)")
        img = img.astype(np.float32)
    else:
        raise ValueError(f"image: expected floats in [0, 1] or uint8, got dtype {img.dtype}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img[..., :3]


def _five(landmarks) -> np.ndarray:
    """Five ArcFace points [5, 2] from a Landmarks object, 68 iBUG points or five points."""
    if isinstance(landmarks, lmk_lib.Landmarks):
        pts = np.asarray(lmk_lib.five_points(landmarks), np.float32)
    else:
        pts = np.asarray(landmarks, np.float32)
        if pts.shape == (68, 2):
            pts = np.asarray(align.five_points_from_68(pts))
        elif pts.shape != (5, 2):
            raise ValueError(f"landmarks: expected a Landmarks object, [68, 2] iBUG or [5, 2] points "
                             f"(pixels), got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks: non-finite five points")
    if np.linalg.norm(pts[1] - pts[0]) < 1e-3:
        raise ValueError(f"landmarks: the two eye points coincide ({pts[0]}); not a face")
    return pts


def _crop_fn(kind: str):
    return align.arcface_crop if check_kind(kind) == "iresnet" else mlm.landmark_crop


def crop_from_landmarks(image, landmarks, kind: str = "iresnet") -> np.ndarray:
    """The aligned crop of a face that an encoder kind reads: ArcFace's 112 x 112 crop
    (iresnet) or the 96 x 96 landmark crop (`landmark_net.landmark_crop`), both
    placed by the five ArcFace points.

    Args:
      image: [H, W, 3] RGB floats in [0, 1] or uint8 (grey and RGBA are converted).
      landmarks: `dhjax.capture.landmarks.Landmarks`, [68, 2] iBUG points or [5, 2] ArcFace
        points (x, y pixels of `image`).
      kind: the encoder kind ("iresnet" or "landmarks"; `variables_kind` of a network).
    Returns:
      [S, S, 3] float32 crop in [0, 1] (S = `crop_size(kind)`).
    """
    crop = _crop_fn(kind)
    img = _image_rgb(image)
    return np.asarray(crop(jnp.asarray(img), jnp.asarray(_five(landmarks))), np.float32)


@functools.partial(jax.jit, static_argnames="kind")
def crop_images(images, five, kind: str = "iresnet"):
    """Jitted crops [N, S, S, 3] float32 in [0, 1] of images [N, H, W, 3] (uint8 or floats in
    [0, 1]) at five points [N, 5, 2] (pixels) for an encoder kind (S = `crop_size(kind)`)."""
    imgs = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
    return jax.vmap(_crop_fn(kind))(imgs, five)


def crop_batch(images, five, kind: str = "iresnet") -> np.ndarray:
    """Crops [N, S, S, 3] uint8 of images [N, H, W, 3] uint8 at five points [N, 5, 2] for an
    encoder kind (`crop_from_landmarks`)."""
    out = [crop_images(jnp.asarray(images[i:i + 64]), jnp.asarray(five[i:i + 64], jnp.float32), kind=kind)
           for i in range(0, len(images), 64)]
    return np.clip(np.round(np.concatenate([np.asarray(o) for o in out]) * 255.0), 0, 255).astype(np.uint8)


@jax.jit
def _predict(variables, crops):
    return net_from_variables(variables).apply(variables, crops, train=False)


def predict(variables, crops, batch_size: int = 64) -> np.ndarray:
    """Shape coefficients of aligned crops (eval mode).

    Args:
      variables: MICA variables {"params", "batch_stats"} (`train.best_variables`).
      crops: [B, S, S, 3] floats in [0, 1] or uint8, the crops of the network's encoder kind
        (`crop_from_landmarks(image, landmarks, variables_kind(variables))`: S = 112 for
        iresnet, 96 for landmarks).
    Returns:
      [B, n_shape] float32.
    """
    net_from_variables(variables)   # clear error for a wrong tree before tracing
    crops = np.asarray(check_crops(crops, variables_kind(variables)))
    out = [np.asarray(_predict(variables, jnp.asarray(crops[i:i + batch_size])))
           for i in range(0, len(crops), batch_size)]
    return np.concatenate(out).astype(np.float32)


def predict_image(variables, image, landmarks) -> tuple[np.ndarray, np.ndarray]:
    """Shape coefficients of one face image: the crop of the network's encoder kind at the
    landmarks' five points, then `predict`.

    Args:
      variables: MICA variables (`train.best_variables`); image: [H, W, 3] RGB floats in [0, 1] or
        uint8; landmarks: as `crop_from_landmarks` takes them.
    Returns:
      (z [n_shape] float32, the crop [S, S, 3] float32 in [0, 1]).
    """
    crop = crop_from_landmarks(image, landmarks, variables_kind(variables))
    return predict(variables, crop[None])[0], crop
