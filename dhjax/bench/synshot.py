"""SynShot prior benchmark: where the main job's time goes (no timed assertions anywhere).

On the dataset of `config` (configs/synshot_prior.py:tiny by default: 128 x 128 images, 64^2 maps,
~4.6k Gaussians, batch 4), or the folder `root`, with `overrides` applied to that config, one run
times: the first jitted train_step call (compilation included) and the step's median; the parts of
a step, each as a jitted forward+backward: the whole network (encoders, VQ, decoders, map
sampling, regressors, initial Gaussians), its encode/quantise/decode convolutions alone, the
splatting of the batch's renders, the SSIM window of the render term (the banded-matrix blur of
`dhjax.losses` against the depthwise convolution it replaced: `synshot_ssim_blur_speedup`); and
the estimated minutes of the config's train.steps at the measured step. The loop's own costs
(input pipeline, logging, evaluation, checkpoints) are not in these parts: `experiments.synshot_prior`
prints steps/s including them.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dhjax import losses
from dhjax.bench.timing import load_config, time_call
from dhjax.synthesis import synshot, synshot_data
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.train import config as config_lib


def default_config() -> ml_collections.ConfigDict:
    """config (the prior's "path:variant"), root ("" = its cached synthetic data), cache_dir,
    overrides ((dotted key, value) pairs applied to the prior's config), repeats, warmup, seed."""
    return ml_collections.ConfigDict(dict(config="configs/synshot_prior.py:tiny", root="", cache_dir="",
                                          overrides=(), repeats=10, warmup=2, seed=0))


def prior_config(c):
    """The prior's ConfigDict with the bench's data folder and overrides applied."""
    cfg = load_config(c.config)
    if c.root:
        cfg.data.root = str(c.root)
    if c.cache_dir:
        cfg.data.cache_dir = str(c.cache_dir)
    return config_lib.apply_overrides(cfg, {str(k): v for k, v in c.overrides})


def _sum(tree):
    return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(tree))


def run(cfg, log=print) -> dict:
    """Runs the SynShot bench (`cfg.synshot`, module docstring); returns flat results."""
    c = cfg.synshot
    reps, warm = int(c.repeats), int(c.warmup)
    if reps < 1 or warm < 0:
        raise ValueError(f"synshot.repeats must be >= 1 and synshot.warmup >= 0, got {reps}, {warm}")
    pcfg = prior_config(c)
    root = synshot_data.dataset_root(pcfg)
    train_ds = synshot_data.open_split(root, "train", in_memory=True)
    W, H = synshot_data.image_size(train_ds)
    B = int(pcfg.batch_size)
    assets = synshot.build_assets(pcfg.model)
    ctx = synshot.make_context(pcfg.model, assets, W, H, loss_cfg=pcfg.loss, optim_cfg=pcfg.optim,
                               backend=pcfg.backend)
    batch = synshot_data.model_batch(synshot_data.stack([train_ds[i % len(train_ds)] for i in range(B)]))
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    state = synshot.init_state(jax.random.PRNGKey(int(c.seed)), batch, ctx)
    out = {"synshot_config": str(c.config), "synshot_image": f"{W}x{H}", "synshot_batch": B,
           "synshot_gaussians": int(assets.n_gaussians), "synshot_map_size": int(pcfg.model.map_size),
           "synshot_device": str(jax.devices()[0].platform)}
    log(f"SynShot prior {c.config}: batch {B} of {W}x{H}, {assets.n_gaussians} Gaussians, "
        f"{pcfg.model.map_size}^2 maps ({root})")

    step = jax.jit(functools.partial(synshot.train_step, ctx=ctx))
    key = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, batch, key))
    out["synshot_first_step_s"] = time.perf_counter() - t0
    out["synshot_step_s"] = time_call(lambda: jax.block_until_ready(step(state, batch, key)), reps, warm)
    out["synshot_steps_per_s"] = 1.0 / out["synshot_step_s"]
    steps = int(pcfg.train.steps)
    out["synshot_train_steps"] = steps
    out["synshot_train_minutes_estimate"] = (out["synshot_first_step_s"] + steps * out["synshot_step_s"]) / 60.0
    log(f"  train_step: first call (compile) {out['synshot_first_step_s']:.1f} s, then "
        f"{out['synshot_step_s'] * 1e3:.0f} ms ({out['synshot_steps_per_s']:.2f} steps/s); "
        f"{steps} steps ~ {out['synshot_train_minutes_estimate']:.1f} min")

    params, stats = state["params"], state["stats"]
    maps_in = synshot.batch_maps(batch, ctx)
    variables = lambda p: synshot.net_variables(p, stats)  # noqa: E731

    def network(p):
        o, _ = synshot.forward(variables(p), maps_in, ctx, train=True)
        return _sum((o["tex"], o["verts"], o["expr"])) + 1e-3 * _sum(o["gaussians"]) + o["vq_loss"]

    def convolutions(p):
        def body(mdl, x_tex, x_verts, x_expr):
            z_id, z_expr = mdl.encode(x_tex, x_verts, x_expr)
            qi, qe, aux = mdl.quantize(z_id, z_expr, True)
            return _sum(mdl.decode(qi, qe)) + aux["vq_loss"]
        mutable = ["vq_stats"] if stats else False
        res = nn.apply(body, ctx.net, mutable=mutable)(variables(p), *maps_in)
        return res[0] if mutable else res

    g0 = synshot.forward(variables(params), maps_in, ctx, train=True)[0]["gaussians"]
    pb = {k: batch[k] for k in synshot.PARAM_KEYS}

    def render(g):
        img, _ = gs.render_gaussians(g, pb, assets, batch["K"], batch["R"], batch["t"], W, H, backend=ctx.backend)
        return jnp.mean(jnp.abs(img - batch["image"]))

    taps = losses.gaussian_window()
    stacked = jnp.concatenate([batch["image"]] * 5, axis=-1)       # what SSIM blurs: 5 statistics x C
    parts = {"network": (jax.grad(network), params), "convolutions": (jax.grad(convolutions), params),
             "render": (jax.grad(render), g0),
             "ssim_blur": (jax.grad(lambda x: _sum(losses._blur(x, taps) ** 2)), stacked),
             "ssim_blur_depthwise": (jax.grad(lambda x: _sum(losses._blur_depthwise(x, taps) ** 2)), stacked)}
    for name, (fn, arg) in parts.items():
        f = jax.jit(fn)
        out[f"synshot_{name}_s"] = time_call(lambda: jax.block_until_ready(f(arg)), reps, warm)
        log(f"  {name:20s} forward+backward {out[f'synshot_{name}_s'] * 1e3:8.1f} ms "
            f"({100 * out[f'synshot_{name}_s'] / out['synshot_step_s']:.0f}% of a step)")
    out["synshot_ssim_blur_speedup"] = out["synshot_ssim_blur_depthwise_s"] / out["synshot_ssim_blur_s"]
    log(f"  SSIM window: banded matmul {out['synshot_ssim_blur_speedup']:.1f}x faster than the depthwise convolution")
    return out
