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


FINGERPRINT_ATOL = [2e-3] * 5 + [1e-5] * 7
"""`fingerprint`'s tolerances: the render's numbers may move by a few edge pixels that last-bit
differences flip between machines (one pixel of 48 x 64 moves a mean by 3.3e-4); the drawn
parameters are exact up to rounding."""


def fingerprint(sample) -> list[float]:
    """12 numbers that move when a generator draws or renders differently: the image's mean
    per channel, the mask's mean, the mean depth under the mask (m), shape[:3], expression[:3]
    and the sum of the SH light (tolerances: FINGERPRINT_ATOL)."""
    import numpy as np
    m = np.asarray(sample["mask"], np.float64)
    d = np.asarray(sample["depth"], np.float64)
    return [float(x) for x in (*np.asarray(sample["image"], np.float64).mean((0, 1)), m.mean(),
                               (d * m).sum() / max(m.sum(), 1e-9),
                               *np.asarray(sample["shape"]).ravel()[:3],
                               *np.asarray(sample["expression"]).ravel()[:3],
                               np.asarray(sample["sh"], np.float64).sum())]


IDENTITY_ATOL = [5e-4] * 6 + [1e-5] * 6 + [1e-3] * 2 + [0.1] * 3
"""`identity_fingerprint`'s tolerances: the UV maps are rasterised in UV space, so a texel at a
chart edge may flip between machines (one of 64 x 64 moves the albedo's mean by ~1e-4 and the
mean position by ~0.03 mm); the colours and thicknesses are drawn, exact up to rounding."""


def identity_fingerprint(identity) -> list[float]:
    """17 numbers of a head identity: the UV albedo's mean and std per channel, the hair colour,
    the iris colour, the mean hair and beard thickness (mm) and the mean neutral UV position (mm)
    (tolerances: IDENTITY_ATOL). Finer than a render's: the sclera's red 0.86 -> 0.80 (a few
    pixels of a 64 x 64 render) moves the albedo's mean by 1.4e-3 and its std by 2.3e-3."""
    import numpy as np
    a = np.asarray(identity["uv_albedo"], np.float64)
    mm = lambda x: 1000.0 * float(np.asarray(x, np.float64).mean()) if np.size(x) else 0.0
    return [float(x) for x in (*a.mean((0, 1)), *a.std((0, 1)), *np.asarray(identity["hair_colour"], np.float64),
                               *np.asarray(identity["iris"], np.float64), mm(identity["hair_thickness"]),
                               mm(identity["beard_thickness"]),
                               *(1000.0 * np.asarray(identity["uv_position"], np.float64).mean((0, 1))))]


def check_pinned(got: dict, pinned: dict, version: int, constant: str, atol: dict | None = None):
    """Fails, naming `constant`, when a generator's fingerprints differ from those recorded for
    its version (absolute tolerances atol[name], a number or one per value; default
    FINGERPRINT_ATOL), or none are recorded. A guard, not a proof: a change below the tolerances
    (the colour of a few pixels) slips through, and the version must be raised regardless."""
    import numpy as np
    import pytest
    shown = {k: [round(x, 6) for x in v] for k, v in got.items()}
    if version not in pinned or set(pinned[version]) != set(got):
        pytest.fail(f"no fingerprint (or not every one) recorded for {constant} = {version}; if this "
                    f"version's output is meant, record it: {version}: {shown}")
    for k, v in got.items():
        ref = pinned[version][k]
        tol = np.broadcast_to(np.asarray((atol or {}).get(k, FINGERPRINT_ATOL), np.float64), np.shape(ref))
        if not np.all(np.abs(np.asarray(v) - np.asarray(ref)) <= tol):
            pytest.fail(f"{k}: the generator's output changed for an unchanged config ({shown[k]} against "
                        f"{ref} recorded for {constant} = {version}). If the change is meant, raise "
                        f"{constant} (the dataset caches key on it) and record the new fingerprint.")
