"""Shared, cached set-up of the synthetic-data tests (built once per pytest process: the head
model's assets and their compilations take ~20 s on 2 cores)."""

import functools

from dhjax.data import synthetic


@functools.lru_cache(maxsize=None)
def tiny_assets():
    return synthetic.build_assets(None, 64)


def tiny_config(**multiview):
    """The tiny config at 64 x 64 images and 64 x 64 UV maps (fast enough for unit tests)."""
    c = synthetic.tiny_config()
    c.uv_size = 64
    c.multiview.update(dict(n_identities=3, width=64, height=64), **multiview)
    c.video.update(n_sequences=2, n_frames=6, width=64, height=64)
    return c


@functools.lru_cache(maxsize=None)
def multiview():
    return synthetic.MultiviewGenerator(tiny_config(), tiny_assets())


@functools.lru_cache(maxsize=None)
def video():
    return synthetic.VideoGenerator(tiny_config(), tiny_assets())
