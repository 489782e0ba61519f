"""Benchmarks dhjax against references and peers in one run (no timed assertions anywhere).

    python -m experiments.bench --config=configs/bench.py:flame --workdir=/tmp/bench

Variants (configs/bench.py): flame, synthetic, splat (experiments/bench_splat.py), geometry
(experiments/bench_geometry.py).
"""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render.raster import count_intersections, rasterize
from experiments.benchlib import time_call

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/bench.py:<suite>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where bench.json goes", required=True)




def bench_flame(cfg):
    arrays = flame.head_default.build_default_head_arrays()
    model = flame.load()
    rng = np.random.default_rng(0)
    results = {"device": str(jax.devices()[0]), "V": model.num_vertices, "F": int(model.faces.shape[0])}
    fwd = jax.jit(lambda m, s, e, p: flame.forward(m, s, e, p).vertices)
    try:
        import torch
        import smplx.lbs as smplx_lbs
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
    except ImportError:
        torch = None
        print("smplx/torch not installed (pip install '.[peers]'): peer timings skipped")
    for B in cfg.batch_sizes:
        s = rng.normal(size=(B, 300)).astype(np.float32)
        e = rng.normal(size=(B, 100)).astype(np.float32)
        p = rng.normal(scale=0.2, size=(B, 5, 3)).astype(np.float32)
        sj, ej, pj = map(jnp.asarray, (s, e, p))
        t = time_call(lambda: fwd(model, sj, ej, pj).block_until_ready(), cfg.repeats, cfg.warmup)
        results[f"flame_b{B}_dhjax_s"] = t
        line = f"FLAME forward B={B:3d}: dhjax {t * 1e3:8.2f} ms"
        if torch is not None:
            tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))
            V = arrays["v_template"].shape[0]
            betas = torch.cat([tt(s), tt(e)], 1)
            shapedirs = torch.cat([tt(arrays["shapedirs"]), tt(arrays["exprdirs"])], 2)
            posedirs = tt(arrays["posedirs"]).reshape(V * 3, 36).T.contiguous()
            args = (tt(p).reshape(B, 15), tt(arrays["v_template"]), shapedirs, posedirs,
                    tt(arrays["j_regressor"]), torch.tensor([-1, 0, 1, 1, 1]), tt(arrays["lbs_weights"]))

            def run_smplx():
                with torch.no_grad():
                    smplx_lbs.lbs(betas, *args)

            ts = time_call(run_smplx, cfg.repeats, cfg.warmup)
            results[f"flame_b{B}_smplx_s"] = ts
            results[f"flame_b{B}_speedup_vs_smplx"] = ts / t
            line += f" | smplx {ts * 1e3:8.2f} ms | speedup {ts / t:5.2f}x"
        print(line, flush=True)

    # Rasterizer: the default head (10.4k faces) filling a 512x512 frontal view.
    S = cfg.raster_size
    R, tvec = camera_lib.look_at(np.array([[0.0, -0.03, 0.75]]), np.array([[0.0, -0.03, 0.0]]))
    cam = camera_lib.camera_from_fov(25.0, S, S, R[0], tvec[0])
    verts = fwd(model, jnp.zeros((1, 300)), jnp.zeros((1, 100)), jnp.zeros((1, 5, 3)))
    cap = int(jnp.max(count_intersections(verts, model.faces, cam)))
    cap = int(cap * 1.25)
    rast = jax.jit(lambda v: rasterize(v, model.faces, cam, capacity=cap).face_id)
    tr = time_call(lambda: rast(verts).block_until_ready(), max(3, cfg.repeats // 4), cfg.warmup)
    coverage = float(jnp.mean(rast(verts) >= 0))
    results.update({f"raster_{S}_faces": int(model.faces.shape[0]), f"raster_{S}_s": tr,
                    f"raster_{S}_coverage": coverage, f"raster_{S}_capacity": cap})
    print(f"rasterize {model.faces.shape[0]} faces at {S}x{S} ({coverage:.0%} covered): "
          f"{tr * 1e3:.1f} ms", flush=True)
    return results


def bench_synthetic(cfg):
    """Samples/s of the synthetic generator (new identities each time; compile excluded)."""
    from dhjax.data import synthetic

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
        print(f"synthetic {size}x{size}: {n / dt:6.2f} samples/s one image per call, "
              f"{m / dg:6.2f} samples/s rendering {len(views)} views per call "
              f"({sc.n_identities} new identities each, UV {sc.uv_size})", flush=True)
    return results


def main(argv):
    del argv
    cfg = _CONFIG.value
    os.makedirs(_WORKDIR.value, exist_ok=True)
    results = {"suite": cfg.suite, "host": platform.node(), "jax": jax.__version__,
               "cpu_count": os.cpu_count()}
    if cfg.suite == "flame":
        results.update(bench_flame(cfg))
    elif cfg.suite == "synthetic":
        results.update(bench_synthetic(cfg))
    elif cfg.suite == "splat":
        from experiments import bench_splat

        results.update(bench_splat.run(cfg, log=lambda *a: print(*a, flush=True)))
    elif cfg.suite == "geometry":
        from experiments import bench_geometry

        results.update(bench_geometry.run_all(cfg.geometry, log=lambda *a: print(*a, flush=True)))
    path = os.path.join(_WORKDIR.value, "bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
