"""Tests for dhjax.io.image: PNG and mp4 round trips, image grids."""

import numpy as np
import pytest

from dhjax.io.image import image_grid, load_image, load_video, save_image, save_video


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip_uint8_is_exact(tmp_path, channels):
    image = np.random.default_rng(channels).integers(0, 256, size=(9, 13, channels)).astype(np.uint8)
    path = save_image(tmp_path / "a" / "b" / "img.png", image)
    loaded = load_image(path)
    assert loaded.dtype == np.float32 and loaded.shape == (9, 13, channels)
    np.testing.assert_array_equal(np.round(loaded * 255).astype(np.uint8), image)


def test_float_image_is_clipped_and_quantised(tmp_path):
    image = np.random.default_rng(0).uniform(-0.5, 1.5, size=(6, 7, 3)).astype(np.float32)
    loaded = load_image(save_image(tmp_path / "f.png", image))
    np.testing.assert_allclose(loaded, np.clip(image, 0, 1), atol=0.5 / 255 + 1e-6)


def test_image_errors(tmp_path):
    with pytest.raises(ValueError, match="C in"):
        save_image(tmp_path / "x.png", np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="dtype int64"):
        save_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.int64))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match="junk.png: not a readable image") as err:
        load_image(junk)
    assert "pip install" not in str(err.value) and "\n" not in str(err.value)   # the reason, not plugin advice


def _frames(t, h, w):
    """Smooth gradients with a distinct brightness offset per frame."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([0.2 + 0.5 * x, 0.2 + 0.5 * y, 0.5 * np.ones_like(x)], -1)
    return np.stack([np.clip(base + 0.06 * i, 0, 1) for i in range(t)]).astype(np.float32)


def test_video_round_trip(tmp_path):
    frames = _frames(5, 32, 48)
    path = save_video(tmp_path / "v" / "clip.mp4", frames, fps=10)
    video = load_video(path)
    assert video.dtype == np.float32 and video.shape == frames.shape
    # H.264 at CRF 15 with 4:2:0 chroma on smooth content: errors of a few 8-bit levels at most.
    # 0.02 (about 5 levels) on the mean still fails for a wrong, shifted or reordered frame: frames
    # differ by 0.06 in every pixel.
    for i, frame in enumerate(video):
        errors = [np.abs(frame - f).mean() for f in frames]
        assert errors[i] < 0.02, (i, errors[i])
        assert int(np.argmin(errors)) == i


def test_video_odd_size_is_padded_and_uint8_accepted(tmp_path):
    frames = (_frames(3, 33, 47) * 255).round().astype(np.uint8)
    video = load_video(save_video(tmp_path / "odd.mp4", frames))
    assert video.shape == (3, 34, 48, 3)
    np.testing.assert_allclose(video[:, :33, :47], frames / 255.0, atol=0.1)
    assert np.abs(video[:, :33, :47] - frames / 255.0).mean() < 0.02
    # The padded row/column repeats the edge pixels.
    assert np.abs(video[:, 33, :47] - frames[:, 32] / 255.0).mean() < 0.03
    with pytest.raises(FileNotFoundError, match="none.mp4"):
        load_video(tmp_path / "none.mp4")
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        save_video(tmp_path / "bad.mp4", np.zeros((2, 4, 4, 2)))


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), i / 10, np.float32) for i in range(5)])
    grid = image_grid(images, ncols=3, pad=1, pad_value=1.0)
    assert grid.shape == (2 * 2 + 3, 3 * 3 + 4, 1)
    for i in range(5):
        row, col = divmod(i, 3)
        top, left = 1 + row * 3, 1 + col * 4
        np.testing.assert_array_equal(grid[top:top + 2, left:left + 3], images[i])
    # Padding lines and the empty last cell hold pad_value.
    assert np.all(grid[0] == 1.0) and np.all(grid[:, 0] == 1.0) and np.all(grid[3] == 1.0)
    np.testing.assert_array_equal(grid[4:6, 9:12], 1.0)
    # Default: ceil(sqrt(5)) = 3 columns, pad 2.
    assert image_grid(images).shape == (2 * 2 + 3 * 2, 3 * 3 + 4 * 2, 1)


def test_image_grid_uint8_padding_and_errors():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    grid = image_grid(images, ncols=1, pad=2, pad_value=0.5)
    assert grid.dtype == np.uint8 and grid.shape == (14, 8, 3)
    assert grid[0, 0, 0] == 128 and grid[2, 2, 0] == 0
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        image_grid(np.zeros((4, 4, 3)))
