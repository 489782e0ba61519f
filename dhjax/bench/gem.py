"""GEM benchmark: frames/s of the Net (stage A: head model -> UV maps -> StyleUNet -> posed
Gaussians -> splat) against the eigenmodel (mean + k B -> splat, no network), in one run, for
several Gaussian map sizes and component counts (no timed assertions anywhere).

Setting: the default head with a random identity; the Net is freshly initialised (its cost does
not depend on its weights) at the paper's widths; the eigenmodel's mean is the Net's Gaussians
of one frame and its bases random orthonormal rows of small amplitude (its cost depends only on
the sizes), so both splat Gaussians of the template's sizes. One camera of the GEM capture rig
(the most frontal) at `width` x `height` (550 x 802, NeRSemble's, by default). For every map size
S: Net s/frame and frames/s; for every M: GEM s/frame, frames/s and `gem_speedup_vs_net` (the
same camera, the same splatting backend); and the parts: the GEM's linear combination alone
(`..._linear_s`), and for every S the splat alone (`gem_s<S>_splat_s`: projection, SH colours and
compositing of the Net's Gaussians, what both models pay) and with its backward to the
Gaussians and colours (`gem_s<S>_splat_grad_s`: what a training step pays). The thesis (A100):
201.7 (GEM) vs 35.8 (Net) frames/s.
"""

from __future__ import annotations

import ml_collections
import numpy as np

import jax
import jax.numpy as jnp

from dhjax.bench.timing import time_call
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.synthesis import gem


def default_config() -> ml_collections.ConfigDict:
    """map_sizes, components, widths of the Net per level, image width/height, repeats, warmup,
    backend (the splatting backend of both)."""
    return ml_collections.ConfigDict(dict(
        map_sizes=(64, 128, 256), components=(10, 20, 50), widths=(32, 64, 128, 128, 128),
        style_dim=64, sh_degree=3, width=550, height=802, repeats=5, warmup=2, backend="auto", seed=0))


def _camera(width: int, height: int) -> camera_lib.Camera:
    cams = camera_lib.synshot_rig(radius=1.0, target=(0.0, -0.035, 0.0), width=width, height=height,
                                  n_frontal=12, n_upper=4, fov_y_deg=22.0)
    return cams[np.asarray([5])]


def run(cfg, log=print) -> dict:
    """Runs the GEM bench (`cfg.gem`, module docstring); returns flat results."""
    c = cfg.gem
    model = flame.load()
    rng = np.random.default_rng(int(c.seed))
    shape = (rng.normal(size=20) * 0.5).astype(np.float32)
    frame = dict(shape=jnp.asarray(shape), expression=jnp.asarray((rng.normal(size=20) * 0.5).astype(np.float32)),
                 pose=jnp.zeros((5, 3)), translation=jnp.zeros(3))
    cam = _camera(int(c.width), int(c.height))
    reps, warm = int(c.repeats), int(c.warmup)
    out = {"gem_image": f"{int(c.width)}x{int(c.height)}", "gem_backend": str(c.backend),
           "gem_devices": str(jax.devices()[0].platform)}
    for S in c.map_sizes:
        S = int(S)
        widths = tuple(int(w) for w in c.widths)
        while S % (2 ** (len(widths) - 1)):
            widths = widths[:-1]
        mc = gem.default_model_config()
        mc.update(map_size=S, widths=widths, style_dim=int(c.style_dim), sh_degree=int(c.sh_degree),
                  backend=str(c.backend))
        ctx = gem.make_context(model, shape, mc)
        state = gem.init_state(jax.random.PRNGKey(0), ctx)
        params = state["params"]
        net = jax.jit(lambda p, fr: gem.render_net(ctx, p, fr, cam))
        t_net = time_call(lambda: jax.block_until_ready(net(params, frame)), reps, warm)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        key = f"gem_s{S}"
        out.update({f"{key}_gaussians": ctx.n_gaussians, f"{key}_net_s_per_frame": t_net,
                    f"{key}_net_fps": 1.0 / t_net, f"{key}_net_mb": 4.0 * n_params / 2 ** 20})
        log(f"GEM bench: map {S}^2, {ctx.n_gaussians} Gaussians, Net {n_params:,} parameters "
            f"({4.0 * n_params / 2 ** 20:.1f} MB): {t_net * 1e3:.1f} ms/frame ({1 / t_net:.1f} fps)")
        attrs, _ = gem.net_gaussians(ctx, params["net"], frame)
        splat = jax.jit(lambda at, sh: gem.splat_attributes(ctx, at, sh, cam).image)
        splat_grad = jax.jit(jax.grad(lambda at, sh: jnp.sum(gem.splat_attributes(ctx, at, sh, cam).image),
                                      argnums=(0, 1)))
        t_splat = time_call(lambda: jax.block_until_ready(splat(attrs, params["sh"])), reps, warm)
        t_splat_grad = time_call(lambda: jax.block_until_ready(splat_grad(attrs, params["sh"])), reps, warm)
        out.update({f"{key}_splat_s": t_splat, f"{key}_splat_grad_s": t_splat_grad})
        log(f"  splat alone (projection, SH, compositing): {t_splat * 1e3:.1f} ms, with its backward "
            f"{t_splat_grad * 1e3:.1f} ms")
        flat = gem.flatten_attributes(attrs)
        for M in c.components:
            M = int(M)
            basis, sigma = {}, {}
            for a in gem.ATTRIBUTES:
                q, _ = np.linalg.qr(rng.normal(size=(flat[a].shape[0], M)))
                basis[a] = jnp.asarray(q.T * 1e-3, jnp.float32)
                sigma[a] = jnp.ones((M,), jnp.float32)
            eig = gem.EigenModel({a: flat[a] for a in gem.ATTRIBUTES}, basis, sigma, params["sh"], ctx.sh_degree,
                                 ctx.background)
            k = {a: jnp.asarray(rng.normal(size=M), jnp.float32) for a in gem.ATTRIBUTES}
            render = jax.jit(lambda m, kk: gem.render(m, kk, cam, backend=ctx.backend))
            combine = jax.jit(gem.eigen_attributes)
            t_gem = time_call(lambda: jax.block_until_ready(render(eig, k)), reps, warm)
            t_lin = time_call(lambda: jax.block_until_ready(combine(eig, k)), reps, warm)
            g = f"{key}_m{M}"
            out.update({f"{g}_s_per_frame": t_gem, f"{g}_fps": 1.0 / t_gem, f"{g}_linear_s": t_lin,
                        f"{g}_mb": gem.size_bytes(eig) / 2 ** 20, f"{g}_speedup_vs_net": t_net / t_gem})
            log(f"  GEM M={M}: {t_gem * 1e3:.1f} ms/frame ({1 / t_gem:.1f} fps, {t_net / t_gem:.1f}x the Net), "
                f"linear combination {t_lin * 1e3:.2f} ms, {gem.size_bytes(eig) / 2 ** 20:.1f} MB")
    return out
