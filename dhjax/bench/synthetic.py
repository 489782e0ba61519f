"""Synthetic-data generation benchmark: samples/s of `dhjax.data.synthetic` (no timed assertions).

New identities each time (their textures, hair and shape are generated), rendered from the SynShot
rig: one image per call as the input pipeline reads them, and whole rig groups in one batched
render. Compilation is excluded (a warm-up identity first).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from dhjax.data import synthetic


def run(cfg, log=print) -> dict:
    """Returns {name: value}: synthetic_<size>_samples_per_s (one image per call) and
    synthetic_<size>_group_samples_per_s (n_views per call) for every size.

    cfg.synthetic: sizes (square images, pixels), uv_size (UV maps, pixels), n_identities (timed
    identities per measurement), n_views (views per identity, spread over the rig).
    """
    sc = cfg.synthetic
    results = {"device": str(jax.devices()[0]), "synthetic_uv_size": int(sc.uv_size)}
    assets = synthetic.build_assets(None, int(sc.uv_size))
    for size in sc.sizes:
        gcfg = synthetic.default_config()
        gcfg.uv_size = int(sc.uv_size)
        gcfg.multiview.update(width=int(size), height=int(size), n_identities=1 + 2 * int(sc.n_identities))
        gen = synthetic.MultiviewGenerator(gcfg, assets)
        views = np.linspace(0, gen.n_cameras - 1, int(sc.n_views)).round().astype(int)
        idx = lambda i: [gen.n_cameras * gen.n_frames * i + int(c) for c in views]
        for i in idx(0):                       # warm-up: compiles everything for this size
            gen[i]
        gen.render_group(0, 0, views)
        n = 0
        t0 = time.perf_counter()
        for i in range(1, 1 + int(sc.n_identities)):
            for j in idx(i):
                jax.block_until_ready(gen[j]["image"])
                n += 1
        dt = time.perf_counter() - t0
        m = 0
        t1 = time.perf_counter()
        for i in range(1 + int(sc.n_identities), 1 + 2 * int(sc.n_identities)):
            m += len(gen.render_group(i, 0, views))
        dg = time.perf_counter() - t1
        results[f"synthetic_{size}_samples_per_s"] = n / dt
        results[f"synthetic_{size}_group_samples_per_s"] = m / dg
        log(f"synthetic {size}x{size}: {n / dt:6.2f} samples/s one image per call, "
            f"{m / dg:6.2f} samples/s rendering {len(views)} views per call "
            f"({sc.n_identities} new identities each, UV {sc.uv_size})")
    return results
