"""Shared by the kernel test modules (not a test module itself)."""

import pytest

from dhjax.ops import _ffi


def need_kernel(available: bool, what: str, build: str = "bash kernels/build_inplace.sh") -> None:
    """Skip the calling test or fixture when `what` is not built, or fail when
    DHJAX_REQUIRE_KERNELS is set (CI builds the kernels, so there a missing one is a bug)."""
    if available:
        return
    msg = f"{what} is not built ({build})"
    if _ffi.require_kernels():
        pytest.fail(msg + " but DHJAX_REQUIRE_KERNELS is set")
    pytest.skip(msg)


def splat_backward_digest(backend: str = "cpu") -> str:
    """SHA-256 of the splat op's gradients (means2d, conics, colours, opacities) on a fixed random
    scene of 2 cameras, 128x112 pixels, 4000 overlapping Gaussians and 4 channels; the determinism
    tests compare it across calls and thread counts (also from subprocesses)."""
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dhjax.ops import splat as op

    rng = np.random.default_rng(0)
    b, n, k, w, h = 2, 4000, 4, 128, 112
    sigma = np.exp(rng.normal(np.log(3.0), 0.5, (b, n, 2)))
    rho = rng.uniform(-0.5, 0.5, (b, n))
    cov = np.stack([sigma[..., 0] ** 2, rho * sigma[..., 0] * sigma[..., 1], sigma[..., 1] ** 2], -1)
    det = cov[..., 0] * cov[..., 2] - cov[..., 1] ** 2
    conics = np.stack([cov[..., 2], -cov[..., 1], cov[..., 0]], -1) / det[..., None]
    means2d = rng.uniform(0, [w, h], (b, n, 2))
    colors = rng.uniform(0, 1, (b, n, k))
    opacities = rng.uniform(0.1, 0.9, (b, n))
    depths = rng.uniform(1, 3, (b, n))
    rects = op.tile_rects(means2d.astype(np.float32), np.ceil(3 * sigma), w, h)
    w_img = jnp.asarray(rng.normal(size=(b, h, w, k)), jnp.float32)
    w_t = jnp.asarray(rng.normal(size=(b, h, w)), jnp.float32)

    def loss(m, q, c, o):
        img, t = op.rasterize(m, q, c, o, depths.astype(np.float32), rects, w, h, backend=backend)
        return jnp.sum(img * w_img) + jnp.sum(t * w_t)

    args = [jnp.asarray(a, jnp.float32) for a in (means2d, conics, colors, opacities)]
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    return hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in g)).hexdigest()
