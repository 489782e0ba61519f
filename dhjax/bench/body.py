"""SMPL-X-layout body forward benchmark (no timed assertions anywhere).

`dhjax.models.body.forward` (jitted) for each batch size against smplx.lbs.lbs on the same
arrays (torch, CPU) when smplx is installed, with random betas, expression and a random full
55-joint pose (every pose corrective driven), plus the largest vertex difference between the two
(metres) as an agreement check next to the timings.

Model (`cfg.body.model`): "default" = `body.load()`, the embedded procedural body; "random" = a
random official-layout model (`dhjax.io.body_files.random_smplx_content`, noise, not a body)
with `cfg.body.vertices` vertices (10475 = SMPL-X's) and `cfg.body.components` shapedirs
components (400 = SMPL-X v1.1's 300 + 100), whose cost is that of an official SMPL-X file of the
same sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhjax.bench.timing import import_smplx, time_call
from dhjax.io import body_files
from dhjax.models import body as body_lib


def default_config() -> ml_collections.ConfigDict:
    """model ("default" | "random"), vertices / components (random model only), n_shape /
    n_expression (coefficients used, smplx.SMPLX's defaults 10 / 10; None = all the model has),
    pose_std (radians, per axis-angle component), seed. Batch sizes, repeats, warmup and
    torch_threads are the bench config's top-level fields."""
    return ml_collections.ConfigDict(dict(model="default", vertices=10475, components=400,
                                          n_shape=10, n_expression=10, pose_std=0.3, seed=0))


def _model(c):
    if c.model == "default":
        return body_lib.load(), "default"
    if c.model == "random":
        content = body_files.random_smplx_content(int(c.seed), n_vertices=int(c.vertices),
                                                  n_components=int(c.components))
        arrays = body_files.smplx_arrays(content, source="random SMPL-X layout")
        return body_lib.from_arrays(arrays, "random SMPL-X layout"), "random"
    raise ValueError(f"body.model must be 'default' or 'random', got {c.model!r}")


def run(cfg, log=print) -> dict:
    """Times the body forward; returns {name: value} (seconds, ratios, metres).

    cfg: batch_sizes, repeats (timed calls, median), warmup (untimed calls first), torch_threads
    (0 = torch's default), body (`default_config`).
    Keys: body_model, body_V, body_F, body_n_shape, body_n_expression; per batch size B:
    body_b<B>_dhjax_s, and with smplx body_b<B>_smplx_s, body_b<B>_speedup_vs_smplx (smplx time /
    dhjax time) and body_b<B>_max_abs_diff_m.
    """
    c = cfg.body
    full, which = _model(c)
    n_shape = full.num_shape if c.n_shape is None else min(int(c.n_shape), full.num_shape)
    n_expr = full.num_expression if c.n_expression is None else min(int(c.n_expression), full.num_expression)
    model = body_lib.from_arrays(body_lib.official_arrays(full), full.name, n_shape, n_expr)
    arrays = body_lib.official_arrays(model)
    V = model.num_vertices
    results = {"device": str(jax.devices()[0]), "body_model": which, "body_V": V,
               "body_F": int(model.faces.shape[0]), "body_n_shape": n_shape, "body_n_expression": n_expr}
    fwd = jax.jit(lambda m, b, e, p: body_lib.forward(m, b, e, p).vertices)
    torch, smplx_lbs = import_smplx(cfg.torch_threads, log)
    if torch is not None:
        tt = lambda a: torch.from_numpy(np.array(a, np.float32))   # a writable copy
        shapedirs = torch.cat([tt(arrays["shapedirs"]), tt(arrays["exprdirs"])], 2)
        posedirs = tt(arrays["posedirs"]).reshape(V * 3, body_lib.N_POSE_FEATURES).T.contiguous()  # smplx's [486, 3V]
        static = (tt(arrays["v_template"]), shapedirs, posedirs, tt(arrays["j_regressor"]),
                  torch.tensor(body_lib.SMPLX_PARENTS), tt(arrays["lbs_weights"]))
    rng = np.random.default_rng(int(c.seed) + 1)
    for B in cfg.batch_sizes:
        B = int(B)
        s = rng.normal(size=(B, n_shape)).astype(np.float32)
        e = rng.normal(size=(B, n_expr)).astype(np.float32)
        p = rng.normal(scale=float(c.pose_std), size=(B, body_lib.N_JOINTS, 3)).astype(np.float32)
        sj, ej, pj = map(jnp.asarray, (s, e, p))
        t = time_call(lambda: fwd(model, sj, ej, pj).block_until_ready(), cfg.repeats, cfg.warmup)
        results[f"body_b{B}_dhjax_s"] = t
        line = f"body forward B={B:3d} (V={V}): dhjax {t * 1e3:8.2f} ms"
        if torch is not None:
            betas = torch.cat([tt(s), tt(e)], 1)
            pose = tt(p).reshape(B, 3 * body_lib.N_JOINTS)

            def run_smplx():
                with torch.no_grad():
                    return smplx_lbs.lbs(betas, pose, *static)

            ts = time_call(run_smplx, cfg.repeats, cfg.warmup)
            diff = float(np.abs(run_smplx()[0].numpy() - np.asarray(fwd(model, sj, ej, pj))).max())
            results[f"body_b{B}_smplx_s"] = ts
            results[f"body_b{B}_speedup_vs_smplx"] = ts / t
            results[f"body_b{B}_max_abs_diff_m"] = diff
            line += f" | smplx {ts * 1e3:8.2f} ms | speedup {ts / t:5.2f}x | max |diff| {diff:.1e} m"
        log(line)
    return results
