"""FLAME forward and rasterizer benchmark (no timed assertions anywhere).

FLAME forward of the embedded default head for each batch size, against smplx.lbs.lbs on the same
arrays (torch, CPU) when smplx is installed; the pure-JAX rasterizer on the default head filling a
frontal square view.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.bench.timing import import_smplx, time_call
from dhjax.models import flame as flame_lib
from dhjax.models import head_default
from dhjax.render import camera as camera_lib
from dhjax.render.raster import count_intersections, rasterize


def run(cfg, log=print) -> dict:
    """Times FLAME forward and the rasterizer; returns {name: value} (seconds, counts, ratios).

    cfg: batch_sizes (B of each timed forward), repeats (timed calls, median), warmup (untimed
    calls first), raster_size (pixels, square), torch_threads (0 = torch's default).
    Keys: flame_b<B>_dhjax_s, flame_b<B>_smplx_s and flame_b<B>_speedup_vs_smplx (with smplx),
    raster_<S>_s / _faces / _coverage (fraction of pixels hit) / _capacity (per-pixel list size).
    """
    arrays = head_default.build_default_head_arrays()
    model = flame_lib.load()
    rng = np.random.default_rng(0)
    results = {"device": str(jax.devices()[0]), "V": model.num_vertices, "F": int(model.faces.shape[0])}
    fwd = jax.jit(lambda m, s, e, p: flame_lib.forward(m, s, e, p).vertices)
    torch, smplx_lbs = import_smplx(cfg.torch_threads, log)
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
        log(line)

    # Rasterizer: the default head (10.4k faces) filling a frontal square view.
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
    log(f"rasterize {model.faces.shape[0]} faces at {S}x{S} ({coverage:.0%} covered): {tr * 1e3:.1f} ms")
    return results
