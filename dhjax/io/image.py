"""Images and videos as numpy arrays: PNG/JPEG through imageio, mp4 through imageio-ffmpeg.

Images in dhjax are float32 [H, W, C] with values in [0, 1] (C = 1, 3 or 4). Writers also take
uint8 arrays, which are written unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import numpy as np

from dhjax.io._common import existing_file

__all__ = ["save_image", "load_image", "save_video", "check_fps", "load_video", "image_grid"]


def _to_uint8(image, name: str = "image") -> np.ndarray:
    """float in [0, 1] (clipped, rounded) or uint8 -> uint8, same shape."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {array.dtype}")
    array = np.nan_to_num(array.astype(np.float64), nan=0.0)
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_float(array: np.ndarray) -> np.ndarray:
    """Decoded pixels (uint8/uint16/bool/float) -> float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise ValueError(f"unsupported pixel dtype {array.dtype}")


def save_image(path: str | os.PathLike, image) -> Path:
    """Write an image (format from the suffix: .png, .jpg, ...); parent folders are created.

    Args:
      path: output file.
      image: [H, W, C] with C in {1, 3, 4} (or [H, W], read as C = 1), float with values in
        [0, 1] (clipped, then rounded to 8 bits) or uint8 (written as is).

    Returns:
      the path written.
    """
    import imageio.v3 as iio

    pixels = _to_uint8(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have shape [H, W, C] with C in (1, 3, 4), got {np.shape(image)}")
    if pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, pixels)
    return path


# Suffixes of the image files dhjax reads from folders (lower case; compare with .suffix.lower()).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file.

    Args:
      path: image file (PNG, JPEG, ...). 8-bit and 16-bit images are supported.

    Returns:
      [H, W, C] float32 in [0, 1]; C = 1 for grey, 3 for RGB, 4 for RGBA (palette images are
      expanded to RGB or RGBA).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is not a readable image (the message names it).
    """
    import imageio.v3 as iio

    path = existing_file(path)
    try:
        pixels = np.asarray(iio.imread(path))
    except Exception as exc:
        # imageio's first line is the reason; the lines after it suggest installing plugins
        # (`pip install imageio[pyav]`), which does not help a file that is not an image.
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {reason})") from exc
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(f"{path}: expected a single image, decoded an array of shape {pixels.shape}")
    return _to_float(pixels)


@contextlib.contextmanager
def _ffmpeg_subprocess():
    """imageio-ffmpeg starts ffmpeg with subprocess, whose child runs only os.setpgrp (so that a
    Ctrl-C does not reach ffmpeg) before exec; JAX's fork hook warns about every fork as if the
    child went on running Python, so that one warning is silenced here (and nowhere else)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        yield


def check_fps(fps, name: str = "fps") -> float:
    """`fps` as a float; ValueError naming `name` unless it is a finite frame rate > 0 (tools
    check it before rendering the frames that save_video writes)."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not np.isfinite(fps) or not fps > 0:
        raise ValueError(f"{name} must be a frame rate > 0, got {fps!r}")
    return float(fps)


def save_video(path: str | os.PathLike, frames, fps: float = 25, *, crf: int = 15) -> Path:
    """Write frames as an H.264 mp4 (yuv420p) through imageio-ffmpeg.

    H.264 with yuv420p needs even width and height: odd sizes are padded by one row at the bottom
    and/or one column at the right, repeating the edge pixels, so :func:`load_video` then
    returns the padded size. Frames are never rescaled.

    Args:
      path: output file (.mp4); parent folders are created.
      frames: [T, H, W, 3] float in [0, 1] (clipped) or uint8; also [T, H, W, 1] or [T, H, W]
        (grey, written as RGB).
      fps: frames per second (finite, > 0: `check_fps`).
      crf: H.264 constant rate factor (0 best .. 51 worst); the default 15 is visually lossless.

    Returns:
      the path written.
    """
    import imageio.v2 as imageio

    fps = check_fps(fps)
    video = _to_uint8(frames, "frames")
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4 or video.shape[-1] not in (1, 3) or video.shape[0] == 0:
        raise ValueError(f"frames must have shape [T, H, W, 3] with T >= 1, got {np.shape(frames)}")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _ffmpeg_subprocess():
        writer = imageio.get_writer(
            str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=None,
            pixelformat="yuv420p", macro_block_size=1, output_params=["-crf", str(int(crf))],
            ffmpeg_log_level="error",
        )
        try:
            for frame in video:
                writer.append_data(np.ascontiguousarray(frame))
        finally:
            writer.close()
    return path


def load_video(path: str | os.PathLike) -> np.ndarray:
    """Decode all frames of a video file.

    Args:
      path: video file (mp4 or anything ffmpeg reads).

    Returns:
      [T, H, W, 3] float32 RGB in [0, 1].

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ffmpeg cannot decode the file, or it holds no frames.
    """
    import imageio.v2 as imageio

    path = existing_file(path)
    try:
        with _ffmpeg_subprocess():
            reader = imageio.get_reader(str(path), format="FFMPEG", mode="I")
            try:
                frames = [np.asarray(frame)[..., :3] for frame in reader]
            finally:
                reader.close()
    except Exception as exc:
        raise ValueError(f"{path}: cannot decode video ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise ValueError(f"{path}: the video holds no frames")
    return _to_float(np.stack(frames))


def image_grid(images, ncols: int | None = None, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile N images of the same size into one image, row by row.

    Args:
      images: [N, H, W, C] (float or uint8), or a sequence of [H, W, C] arrays of equal shape.
      ncols: images per row; default ceil(sqrt(N)). Rows = ceil(N / ncols); empty cells of the
        last row are filled with ``pad_value``.
      pad: pixels of padding between tiles and around the border.
      pad_value: padding value in [0, 1] units (scaled to round(255 * pad_value) for uint8).

    Returns:
      [rows * H + (rows + 1) * pad, ncols * W + (ncols + 1) * pad, C], dtype of ``images``;
      tile i sits at row i // ncols, column i % ncols.
    """
    stack = np.asarray(images)
    if stack.ndim != 4 or stack.shape[0] == 0:
        raise ValueError(f"images must have shape [N, H, W, C] with N >= 1, got {stack.shape}")
    n, h, w, c = stack.shape
    ncols = int(math.ceil(math.sqrt(n))) if ncols is None else int(ncols)
    if ncols < 1 or pad < 0:
        raise ValueError(f"need ncols >= 1 and pad >= 0, got ncols={ncols}, pad={pad}")
    nrows = int(math.ceil(n / ncols))
    fill = round(255 * pad_value) if stack.dtype == np.uint8 else pad_value
    grid = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), fill, dtype=stack.dtype)
    for i, image in enumerate(stack):
        row, col = divmod(i, ncols)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid
