"""Shared pieces of the GEM tests (test_synthesis_gem, test_synthesis_gem_local): a small GEM
context on the default head, a small camera rig, the Gaussians at zero network output, and
collected attributes with a known low-rank global variation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.synthesis import gem


def small_context():
    """A GEM context with a 32^2 map, a narrow StyleUNet and SH degree 1 on a random identity."""
    m = flame.load()
    mc = gem.default_model_config()
    mc.update(map_size=32, widths=(8, 16, 16), style_dim=8, sh_degree=1)
    shape = np.random.default_rng(0).normal(size=10).astype(np.float32) * 0.5
    return gem.make_context(m, shape, mc)


def cams(n=3, w=40, h=48):
    """n frontal cameras of w x h pixels at 1 m, aimed at the face."""
    return camera_lib.synshot_rig(radius=1.0, width=w, height=h, n_frontal=n, n_upper=0, fov_y_deg=22.0,
                                  target=(0.0, -0.035, 0.0))


def base_attributes(ctx):
    """The posed Gaussians' attributes at zero network output and the canonical vertices."""
    return gem.pose_gaussians(ctx, jnp.zeros((ctx.n_gaussians, gem.NET_OUT)), ctx.canon_verts)


def random_collected(ctx, n, rng):
    """n frames of attributes with global variation: 3 latents moving every Gaussian (scale 1e-3)
    plus small noise (1e-5); {attribute: [n, G, dim]}."""
    G = ctx.n_gaussians
    base = base_attributes(ctx)
    lat = rng.normal(size=(n, 3))
    out = {}
    for a in gem.ATTRIBUTES:
        d = gem.ATTRIBUTE_DIMS[a]
        dirs = rng.normal(size=(3, G, d)) * 1e-3
        out[a] = np.asarray(base[a])[None] + np.einsum("nk,kgd->ngd", lat, dirs) + rng.normal(size=(n, G, d)) * 1e-5
    return out
