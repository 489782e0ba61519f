"""Linear albedo models of the synthetic identities (`dhjax.models.albedo`), in the embedded
default head's UV layout: the tracker's default appearance model.

The identities are drawn with the synthetic seed SYNTHETIC_SEED_BASE + seed (23000 for seed=0),
indices 0 .. n_identities - 1, whereas the tracker's synthetic benchmark and the other
generators use seed 0: no benchmark sequence shows a training identity. Indices >= n_identities
of the same seed are held out (the tests use them).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from dhjax.data import synthetic
from dhjax.models import albedo

__all__ = ["SYNTHETIC_SEED_BASE", "synthetic_albedos", "build_synthetic"]

SYNTHETIC_SEED_BASE = 23_000
"""`build_synthetic`'s identities come from synthetic seed SYNTHETIC_SEED_BASE + seed."""


def _default_uv_size(size: int) -> int:
    """The smallest multiple of size that is >= 128 (so the box filter averages >= 128^2 texels)."""
    return size * max(1, -(-128 // size))


def synthetic_albedos(indices: Sequence[int], size: int, seed: int = 0, *, assets=None,
                      uv_size: int | None = None, log: Callable | None = None) -> np.ndarray:
    """UV albedos of the synthetic identities `indices` of seed SYNTHETIC_SEED_BASE + seed.

    Identity i is `dhjax.data.synthetic.sample_identity(assets, SYNTHETIC_SEED_BASE + seed,
    i)["uv_albedo"]` (the default head's UV layout, at the assets' UV size), resampled to
    size x size with `albedo.resample` (a box filter when the UV size is a multiple of size).

    Args:
      indices: identity indices (ints >= 0).
      size: A, the output texture size.
      seed: >= 0; the synthetic seed is SYNTHETIC_SEED_BASE + seed (never the benchmark's 0).
      assets: `synthetic.build_assets` output to reuse; None builds it at uv_size.
      uv_size: UV size of the built assets (default: the smallest multiple of size >= 128);
        ignored when assets are given.
      log: progress callback (e.g. print) or None.
    Returns:
      [N, A, A, 3] float32 RGB albedos.
    """
    if int(seed) < 0:
        raise ValueError(f"synthetic_albedos: seed must be >= 0, got {seed}")
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise ValueError(f"synthetic_albedos: indices must be >= 0, got {indices}")
    log = log or (lambda *a: None)
    if assets is None:
        uv_size = _default_uv_size(int(size)) if uv_size is None else int(uv_size)
        log(f"albedo: building the synthetic head's UV assets at {uv_size} x {uv_size}")
        assets = synthetic.build_assets(uv_size=uv_size)
    syn_seed = SYNTHETIC_SEED_BASE + int(seed)
    out = np.empty((len(indices), int(size), int(size), 3), np.float32)
    t0 = time.time()
    step = max(1, len(indices) // 10)
    for n, i in enumerate(indices):
        alb = np.asarray(synthetic.sample_identity(assets, syn_seed, i)["uv_albedo"])
        out[n] = albedo.resample(alb, size)
        if (n + 1) % step == 0 or n + 1 == len(indices):
            log(f"albedo: identity {n + 1}/{len(indices)} (seed {syn_seed}, index {i}), "
                f"{time.time() - t0:.1f} s")
    return out


def build_synthetic(n_identities: int, n_components: int, size: int, seed: int = 0,
                    log: Callable | None = print, *, assets=None, uv_size: int | None = None,
                    method: str = "auto") -> albedo.AlbedoModel:
    """A PCA albedo model of synthetic identities, in the default head's UV layout.

    Fits `albedo.fit_pca` to the flattened albedos of identities 0 .. n_identities - 1
    of the synthetic seed SYNTHETIC_SEED_BASE + seed (`synthetic_albedos`), so the benchmark's
    sequences (seed 0) are not in the training set; indices >= n_identities of the same seed
    are free for held-out tests.

    Args:
      n_identities: N >= 2 identities.
      n_components: K, 1 <= K <= N - 1.
      size: A, the texture size (the tracker's albedo_size, e.g. 32).
      seed: >= 0, selects the training set (synthetic seed SYNTHETIC_SEED_BASE + seed).
      log: progress callback (default print; None for silence).
      assets, uv_size: as in `synthetic_albedos`.
      method: `pca.fit`'s method.
    Returns:
      AlbedoModel (mean [A, A, 3], basis [K, A, A, 3] = the PCA's orthonormal components,
      sigma [K] = their standard deviations, n - 1 denominator).
    """
    log = log or (lambda *a: None)
    n, k, size = int(n_identities), int(n_components), int(size)
    if n < 2 or not 1 <= k <= n - 1:
        raise ValueError(f"build_synthetic: needs n_identities >= 2 and 1 <= n_components <= "
                         f"n_identities - 1, got n_identities={n}, n_components={k}")
    x = synthetic_albedos(range(n), size, seed, assets=assets, uv_size=uv_size, log=log)
    return albedo.fit_pca(x, k, method=method, log=log,
                          name=f"synthetic (seed {SYNTHETIC_SEED_BASE + int(seed)}, identities 0..{n - 1}, "
                               f"dhjax default head UV layout)")
