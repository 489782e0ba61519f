"""Tile-based alpha compositing of projected 2D Gaussians: the rasterisation stage of 3DGS.

This is the op behind `dhjax.render.splat.rasterize`. Projection (EWA, spherical harmonics,
culling) happens before, in plain JAX; this op takes the projected Gaussians of one or more
cameras and composites them front to back, per 16x16 pixel tile:

* Tile binning: Gaussian i covers the tiles `rects[i] = (tx0, ty0, tx1, ty1)` (half-open,
  computed by `tile_rects` from the 2D mean and the per-axis radius). An empty rectangle culls it.
* Order: in each tile, Gaussians are sorted by depth (camera z), ties by index (a stable sort).
* Pixel (column j, row i) has its centre at image coordinates (u, v) = (j, i) (the OpenCV
  convention of `dhjax.render.camera`). With d = (j, i) - mean2d and the conic (inverse 2D
  covariance) [[a, b], [b, c]]: power = -a d_x^2 / 2 - c d_y^2 / 2 - b d_x d_y; a Gaussian is
  skipped where power > 0 (a numerical guard), otherwise alpha = min(0.99, o exp(power)),
  skipped where alpha < 1/255.
* Compositing: C = sum_i c_i alpha_i T_i with T_i = prod_{j<i} (1 - alpha_j); a pixel stops
  before the first Gaussian that would bring its transmittance below 1e-4 (that Gaussian is not
  composited). Outputs the accumulated channels (no background) and the final transmittance.
* Non-finite Gaussians are dropped: an entry (camera, Gaussian) with a NaN or infinite value in
  its mean, conic, colour channels, opacity or depth is culled (its rectangle emptied) and its
  values replaced by zeros before any backend sees them (`drop_non_finite`), so the output is
  finite and equals the output without that entry, and its gradients are zero, not NaN. This
  happens once, in `rasterize`, so the three backends cannot disagree on such input (left to
  themselves they did: the reference's per-tile sums spread a NaN colour over whole tiles, the
  C++ kernel only over the pixels it covers; the CPU kernel skips a NaN opacity where the CUDA
  code clamps it to alpha 0.99).

Three implementations of this one op:
* `backend="reference"`: pure JAX (`rasterize_reference`), differentiable by autodiff; the oracle.
* `backend="cpu"`: C++ handler (kernels/splat/splat_cpu.cc), threads over tiles.
* `backend="cuda"`: CUDA handler (kernels/splat/splat_cuda.cu).
The kernels are XLA FFI custom calls with a `jax.custom_vjp` whose backward is a second custom
call (front-to-back, exact transmittances, no division by (1 - alpha) to recover T). The CPU
backward sums each Gaussian's gradient in a fixed order (the same bits for any thread count);
the CUDA backward adds with atomics, so its last bits vary from call to call, unless
`deterministic=True`: then it writes one gradient record per (tile, Gaussian) intersection
into scratch memory and sums each Gaussian's records in row-major tile order, like the CPU
(the same bits on every call; extra GPU memory of about n_intersections x (6 + K) floats). That
deterministic CUDA path is compiled but has not yet run on a GPU (no device was available
when it was written); `pytest -m gpu tests/test_ops_splat_cuda.py` is its first check.
`backend="auto"` picks the kernel of JAX's default backend when it is built, else the reference.

Number of intersections: the kernels bin on their own (CPU with growing buffers, CUDA with one
8-byte count read back and scratch memory of the exact size), so no capacity is ever guessed and
no image is truncated. The reference works per tile on at most `capacity` Gaussians; with
`capacity=None` it uses the exact maximum when the inputs are concrete and all N otherwise, and a
tile whose count exceeds an explicit `capacity` comes out as NaN (loud, never silently cut).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.ops import _ffi

TILE = 16
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4

_TARGETS = {
    # The CPU backward is deterministic already: the deterministic target is the same handler.
    "cpu": (("dhjax_splat_fwd", "SplatForward"), ("dhjax_splat_bwd", "SplatBackward"),
            ("dhjax_splat_bwd_deterministic", "SplatBackward")),
    "cuda": (("dhjax_splat_fwd", "SplatForwardCuda"), ("dhjax_splat_bwd", "SplatBackwardCuda")),
}
# The deterministic CUDA backward has its own target (the handler signatures, and with them the
# kernel ABI, are unchanged). Registered on first use only, so that a CUDA library built before
# this handler existed keeps serving everything else.
_CUDA_DETERMINISTIC = (("dhjax_splat_bwd_deterministic", "SplatBackwardDeterministicCuda"),)


def _register_cuda_deterministic(required: bool) -> None:
    """Registers the deterministic CUDA backward; raises only when `required` (backend "cuda")."""
    try:
        ok = _ffi.register("splat", "cuda", _CUDA_DETERMINISTIC)
    except AttributeError as e:  # the library lacks the symbol: built before the handler existed
        if required:
            raise RuntimeError("the CUDA splat library predates the deterministic backward "
                               "(no SplatBackwardDeterministicCuda): rebuild it with "
                               "`bash kernels/build_inplace.sh -DDHJAX_CUDA=ON`") from e
        return
    except (OSError, RuntimeError):  # e.g. a CUDA library without a CUDA runtime here
        if required:
            raise
        return
    if required and not ok:
        raise RuntimeError("the cuda kernel of 'splat' is not built")


def num_tiles(width: int, height: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering a width x height image with 16x16 tiles."""
    return -(-int(width) // TILE), -(-int(height) // TILE)


def tile_rects(means2d, radii, width: int, height: int) -> jax.Array:
    """Half-open tile rectangles covered by each Gaussian's screen-space box.

    Args:
      means2d: [..., N, 2] float32 pixel coordinates (u, v) of the 2D means.
      radii: [..., N, 2] int32 or float pixel radii along u and v; a zero radius culls.
      width, height: image size in pixels.
    Returns:
      [..., N, 4] int32 (tx0, ty0, tx1, ty1): the Gaussian is binned into tiles tx0 <= x < tx1,
      ty0 <= y < ty1 (tile x holds pixel columns 16x .. 16x+15). Culled Gaussians (zero radius,
      non-finite mean, or a box entirely outside the image) get (0, 0, 0, 0).
    """
    tx, ty = num_tiles(width, height)
    m = jnp.asarray(means2d, jnp.float32)
    r = jnp.asarray(radii).astype(jnp.float32)
    ok = (r[..., 0] > 0) & (r[..., 1] > 0) & jnp.all(jnp.isfinite(m), axis=-1)
    lo = jnp.floor((m - r) / TILE)
    hi = jnp.floor((m + r) / TILE) + 1.0
    lim = jnp.array([tx, ty], jnp.float32)
    lo = jnp.clip(jnp.where(ok[..., None], lo, 0.0), 0.0, lim)
    hi = jnp.clip(jnp.where(ok[..., None], hi, 0.0), 0.0, lim)
    empty = jnp.any(hi <= lo, axis=-1, keepdims=True)
    rect = jnp.concatenate([lo, hi], axis=-1).astype(jnp.int32)
    return jnp.where(empty, 0, rect)


def tile_counts(rects, width: int, height: int) -> jax.Array:
    """Number of Gaussians binned into each tile.

    Args:
      rects: [..., N, 4] int32 from `tile_rects`.
    Returns:
      [..., tiles_y, tiles_x] int32.
    """
    tx, ty = num_tiles(width, height)
    xs = jnp.arange(tx, dtype=jnp.int32)
    ys = jnp.arange(ty, dtype=jnp.int32)
    inx = (rects[..., :, 0:1] <= xs) & (xs < rects[..., :, 2:3])  # [..., N, tx]
    iny = (rects[..., :, 1:2] <= ys) & (ys < rects[..., :, 3:4])  # [..., N, ty]
    return jnp.einsum("...ny,...nx->...yx", iny.astype(jnp.int32), inx.astype(jnp.int32))


def num_intersections(rects) -> jax.Array:
    """Total number of (Gaussian, tile) pairs, [...] int32, from rects [..., N, 4]."""
    area = (rects[..., 2] - rects[..., 0]) * (rects[..., 3] - rects[..., 1])
    return jnp.sum(area, axis=-1)


def drop_non_finite(means2d, conics, colors, opacities, depths, rects):
    """Culls the entries with a non-finite value (the rule of the module docstring).

    Args: as `rasterize` (float32 / int32 arrays of matching leading shape [..., N]).
    Returns:
      (means2d, conics, colors, opacities, depths, rects) where every entry (camera, Gaussian)
      with a NaN or infinite value in any of the five float arrays has rect (0, 0, 0, 0) (binned
      nowhere) and zeros in the float arrays. `jnp.where` passes a zero cotangent to the values
      it replaces, so such an entry's gradients are exactly zero.
    """
    finite = (jnp.all(jnp.isfinite(means2d), -1) & jnp.all(jnp.isfinite(conics), -1)
              & jnp.all(jnp.isfinite(colors), -1) & jnp.isfinite(opacities) & jnp.isfinite(depths))
    per_row = finite[..., None]
    return (jnp.where(per_row, means2d, 0.0), jnp.where(per_row, conics, 0.0), jnp.where(per_row, colors, 0.0),
            jnp.where(finite, opacities, 0.0), jnp.where(finite, depths, 0.0), jnp.where(per_row, rects, 0))


# ----------------------------------------------------------------------------------------------
# Pure-JAX reference.


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _reference_one(means2d, conics, colors, opacities, depths, rects, width, height, capacity, tile_batch):
    """One camera. Shapes as `rasterize` without the leading batch."""
    n, k = colors.shape
    tx, ty = num_tiles(width, height)
    order = jnp.lexsort((jnp.arange(n), depths)).astype(jnp.int32)  # depth, then index
    r = rects[order]
    # One padding row (index n): zero opacity and colour, never composited.
    pad = lambda a, v=0.0: jnp.concatenate([a, jnp.full((1,) + a.shape[1:], v, a.dtype)], 0)
    m_p, q_p, c_p, o_p = pad(means2d), pad(conics), pad(colors), pad(opacities)
    offs = jnp.arange(TILE, dtype=jnp.float32)

    def tile(t):
        x, y = t % tx, t // tx
        hit = (r[:, 0] <= x) & (x < r[:, 2]) & (r[:, 1] <= y) & (y < r[:, 3])
        count = jnp.sum(hit.astype(jnp.int32))
        pos = jnp.nonzero(hit, size=capacity, fill_value=n)[0]
        gid = jnp.where(pos < n, order[jnp.minimum(pos, n - 1)], n)  # [cap]
        px = (x * TILE).astype(jnp.float32) + offs
        py = (y * TILE).astype(jnp.float32) + offs
        pu, pv = jnp.meshgrid(px, py)  # [16, 16]; row = v
        pix = jnp.stack([pu.reshape(-1), pv.reshape(-1)], -1)  # [256, 2]
        mu = m_p[gid]  # [cap, 2]
        q = q_p[gid]
        d = pix[None, :, :] - mu[:, None, :]  # [cap, 256, 2]
        dx, dy = d[..., 0], d[..., 1]
        power = -0.5 * (q[:, None, 0] * dx * dx + q[:, None, 2] * dy * dy) - q[:, None, 1] * dx * dy
        g = jnp.exp(jnp.minimum(power, 0.0))
        alpha = jnp.minimum(ALPHA_MAX, o_p[gid][:, None] * g)
        valid = (gid < n)[:, None] & (power <= 0.0) & (alpha >= ALPHA_MIN)
        alpha = jnp.where(valid, alpha, 0.0)
        one_m = 1.0 - alpha
        # Transmittance through log-space sums (alpha <= 0.99 keeps the logs finite): cumsum's
        # transpose is a reversed cumsum, which compiles far faster than cumprod's gradient.
        log_one_m = jnp.log(one_m)
        t_excl = jnp.exp(jnp.cumsum(log_one_m, axis=0) - log_one_m)
        # The stop decision uses running products like the kernels (no gradient flows through it).
        # Monotone: once below 1e-4, every later Gaussian is cut too.
        keep = jax.lax.stop_gradient(jnp.cumprod(one_m, axis=0)) >= T_MIN
        w = jnp.where(keep, alpha * t_excl, 0.0)  # [cap, 256]
        img = jnp.einsum("gp,gk->pk", w, c_p[gid], precision=jax.lax.Precision.HIGHEST)
        t_fin = jnp.prod(jnp.where(keep, one_m, 1.0), axis=0)
        bad = count > capacity
        img = jnp.where(bad, jnp.nan, img)
        t_fin = jnp.where(bad, jnp.nan, t_fin)
        return img, t_fin

    tiles = jnp.arange(tx * ty, dtype=jnp.int32)
    if tile_batch is None or tile_batch >= tx * ty:
        imgs, ts = jax.vmap(tile)(tiles)  # one fused program: quickest to compile
    else:
        imgs, ts = jax.lax.map(jax.checkpoint(tile), tiles, batch_size=tile_batch)  # remat per tile
    img = imgs.reshape(ty, tx, TILE, TILE, k).transpose(0, 2, 1, 3, 4).reshape(ty * TILE, tx * TILE, k)
    tr = ts.reshape(ty, tx, TILE, TILE).transpose(0, 2, 1, 3).reshape(ty * TILE, tx * TILE)
    return img[:height, :width], tr[:height, :width]


_VMAP_ELEMENTS = 1 << 24


def rasterize_reference(means2d, conics, colors, opacities, depths, rects, width, height, *, capacity=None, tile_batch="auto"):
    """Pure-JAX tile compositing (the oracle). Arguments and results as `rasterize`.

    Args:
      capacity: Gaussians considered per tile. None: the exact maximum over tiles when the inputs
        are concrete (eager), else all N. Tiles with more Gaussians than an explicit capacity
        come out as NaN.
      tile_batch: tiles evaluated together (memory ~ tile_batch * capacity * 256 floats); each
        tile is rematerialised in the backward pass. "auto": all tiles in one vectorised program
        when that stays below 2^24 elements per array (quick to compile), else batches of tiles
        under `lax.map`. None: all tiles.
    """
    lead = means2d.shape[:-2]
    n = means2d.shape[-2]
    if capacity is None:
        rc = _concrete(rects)
        if rc is not None:
            # Concrete rects (e.g. closed over by a jitted function) while tracing: count them now,
            # not in the traced program (np.asarray of a traced count would raise).
            with jax.ensure_compile_time_eval():
                capacity = int(np.max(np.asarray(tile_counts(rc, width, height)), initial=0))
        else:
            capacity = n
    capacity = max(1, min(int(capacity), max(n, 1))) if n else 1
    if tile_batch == "auto":
        # All tiles at once while the per-tile arrays ([capacity, 256] pixels and the [N] hit
        # mask that selects the tile's Gaussians) stay below the budget, else batches of tiles.
        tx, ty = num_tiles(width, height)
        per_tile = max(capacity * TILE * TILE, n)
        tile_batch = None if tx * ty * per_tile <= _VMAP_ELEMENTS else max(1, _VMAP_ELEMENTS // per_tile)
    flat = lambda a: a.reshape((-1,) + a.shape[len(lead):])
    args = [flat(a) for a in (means2d, conics, colors, opacities, depths, rects)]
    img, tr = _reference_batched(*args, width=width, height=height, capacity=capacity, tile_batch=tile_batch)
    return img.reshape(lead + img.shape[1:]), tr.reshape(lead + tr.shape[1:])


@functools.partial(jax.jit, static_argnames=("width", "height", "capacity", "tile_batch"))
def _reference_batched(means2d, conics, colors, opacities, depths, rects, *, width, height, capacity, tile_batch):
    # jitted so that eager calls compile once per shape instead of dispatching op by op
    fn = functools.partial(_reference_one, width=width, height=height, capacity=capacity, tile_batch=tile_batch)
    return jax.vmap(fn)(means2d, conics, colors, opacities, depths, rects)


# ----------------------------------------------------------------------------------------------
# FFI kernels.


def _kernel_forward(means2d, conics, colors, opacities, depths, rects, width, height):
    lead = means2d.shape[:-2]
    k = colors.shape[-1]
    out_types = (
        jax.ShapeDtypeStruct(lead + (height, width, k), jnp.float32),
        jax.ShapeDtypeStruct(lead + (height, width), jnp.float32),
        jax.ShapeDtypeStruct(lead + (height, width), jnp.int32),
    )
    call = jax.ffi.ffi_call("dhjax_splat_fwd", out_types, vmap_method="broadcast_all")
    return call(means2d, conics, colors, opacities, depths, rects)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _kernel_raster(means2d, conics, colors, opacities, depths, rects, width, height, deterministic=False):
    out, trans, _ = _kernel_forward(means2d, conics, colors, opacities, depths, rects, width, height)
    return out, trans


def _kernel_raster_fwd(means2d, conics, colors, opacities, depths, rects, width, height, deterministic=False):
    out, trans, last = _kernel_forward(means2d, conics, colors, opacities, depths, rects, width, height)
    return (out, trans), (means2d, conics, colors, opacities, depths, rects, out, trans, last)


def _kernel_raster_bwd(width, height, deterministic, res, cts):
    means2d, conics, colors, opacities, depths, rects, out, trans, last = res
    g_out, g_trans = cts
    out_types = (
        jax.ShapeDtypeStruct(means2d.shape, jnp.float32),
        jax.ShapeDtypeStruct(conics.shape, jnp.float32),
        jax.ShapeDtypeStruct(colors.shape, jnp.float32),
        jax.ShapeDtypeStruct(opacities.shape, jnp.float32),
    )
    # One target per mode; on the CPU both are the (deterministic) SplatBackward.
    target = "dhjax_splat_bwd_deterministic" if deterministic else "dhjax_splat_bwd"
    call = jax.ffi.ffi_call(target, out_types, vmap_method="broadcast_all")
    g_m, g_q, g_c, g_o = call(
        means2d, conics, colors, opacities, depths, rects, out, trans, last,
        jnp.asarray(g_out, jnp.float32), jnp.asarray(g_trans, jnp.float32),
    )
    return g_m, g_q, g_c, g_o, None, None


_kernel_raster.defvjp(_kernel_raster_fwd, _kernel_raster_bwd)


def _check(means2d, conics, colors, opacities, depths, rects):
    means2d = jnp.asarray(means2d, jnp.float32)
    lead, n = means2d.shape[:-2], means2d.shape[-2] if means2d.ndim >= 2 else None
    if means2d.ndim < 2 or means2d.shape[-1] != 2:
        raise ValueError(f"means2d must be [..., N, 2], got {means2d.shape}")
    want = {"conics": (3,), "colors": None, "opacities": (), "depths": (), "rects": (4,)}
    arrays = {"conics": conics, "colors": colors, "opacities": opacities, "depths": depths, "rects": rects}
    out = {}
    for name, tail in want.items():
        a = jnp.asarray(arrays[name], jnp.int32 if name == "rects" else jnp.float32)
        exp_nd = len(lead) + 1 + (1 if tail is None else len(tail))
        if a.ndim != exp_nd or a.shape[: len(lead) + 1] != lead + (n,) or (tail is not None and a.shape[len(lead) + 1 :] != tail):
            shape = "[..., N, K]" if tail is None else "[..., N" + "".join(f", {t}" for t in tail) + "]"
            raise ValueError(f"{name} must be {shape} with the leading shape {lead + (n,)} of means2d, got {a.shape}")
        out[name] = a
    return means2d, out["conics"], out["colors"], out["opacities"], out["depths"], out["rects"]


def rasterize(means2d, conics, colors, opacities, depths, rects, width: int, height: int, *, backend: str = "auto",
              capacity=None, deterministic: bool = False):
    """Composite projected Gaussians per 16x16 tile (see the module docstring for the exact rule).

    Args:
      means2d: [..., N, 2] float32 pixel coordinates of the 2D means.
      conics: [..., N, 3] float32 (a, b, c) of the inverse 2D covariance [[a, b], [b, c]].
      colors: [..., N, K] float32 per-Gaussian channels (RGB, depth, features; any K >= 1).
      opacities: [..., N] float32 in [0, 1].
      depths: [..., N] float32 sort keys (camera z, metres); no gradient flows to them.
      rects: [..., N, 4] int32 tile rectangles from `tile_rects` (no gradient).
      width, height: image size in pixels (static).
      backend: "auto" | "reference" | "cpu" | "cuda".
      capacity: reference only, see `rasterize_reference`.
      deterministic: CUDA only (static): the backward sums every Gaussian's gradient in a fixed
        order instead of with atomics, so repeated calls give the same bits. It costs GPU memory
        of about n_intersections x (6 + K) floats (x (6 ceil(K/8) + K) for K > 8) plus two int32
        per intersection, and an extra pass. Not yet run on a GPU: it compiles, but no device
        was available when it was written (`pytest -m gpu tests/test_ops_splat_cuda.py`).
        Ignored by the CPU kernel (always deterministic) and by the reference (XLA autodiff).
    Returns:
      image: [..., H, W, K] float32 accumulated channels, without background.
      transmittance: [..., H, W] float32 final transmittance T (alpha = 1 - T).
    Gradients flow to means2d, conics, colors and opacities in every backend.

    Non-finite Gaussians are dropped: an entry (camera, Gaussian) with a NaN or infinite value in
    its means2d, conics, colors, opacities or depths row is culled whatever its rect says, the same
    way for every backend (`drop_non_finite`): the outputs are finite and equal those without
    that entry, and its gradients are zero.
    """
    args = _check(means2d, conics, colors, opacities, depths, rects)
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    impl = _ffi.resolve_backend(backend, "splat", _TARGETS)
    # Once, here, for every backend: non-finite entries never reach an implementation.
    args = drop_non_finite(*args)
    if args[0].shape[-2] == 0:  # no Gaussians: nothing to composite or launch
        lead = args[0].shape[:-2]
        k = args[2].shape[-1]
        zero = 0.0 * (jnp.sum(args[0]) + jnp.sum(args[1]) + jnp.sum(args[2]) + jnp.sum(args[3]))  # keeps grads defined
        return jnp.zeros(lead + (height, width, k), jnp.float32) + zero, jnp.ones(lead + (height, width), jnp.float32) + zero
    if impl == "reference":
        return rasterize_reference(*args, width, height, capacity=capacity)
    deterministic = bool(deterministic)
    if deterministic:
        # With "cpu" too: a CUDA build on this host must lower the target on either platform.
        _register_cuda_deterministic(required=impl == "cuda")
    return _kernel_raster(*args, width, height, deterministic)


def kernel_available(platform: str = "cpu") -> bool:
    """True when the splat library for `platform` ("cpu" | "cuda") is built and registered."""
    return _ffi.register("splat", platform, _TARGETS[platform])


def simd_lanes() -> int:
    """The lane group width (4 or 8 pixels per vector operation) of the CPU kernel's pixel loops in
    this process now: 8 (AVX2) where the library was built with GCC on x86-64 and the CPU has
    AVX2, unless the environment variable DHJAX_SPLAT_LANES is 4 (read at every call); else 4
    (SSE2, or plain arrays on other targets). Both widths give the same bits. Raises
    RuntimeError when the CPU library is not built (or predates lane groups)."""
    import ctypes

    return int(_cpu_function("dhjax_splat_simd_lanes", "simd_lanes", ctypes.c_int32, [])())


def _cpu_function(symbol: str, what: str, restype, argtypes):
    """The ctypes function `symbol` of the built CPU splat library; RuntimeError naming `what`
    when the library is not built or predates it."""
    lib = _ffi.load_built("splat", "cpu")
    try:
        fn = getattr(lib, symbol)
    except AttributeError:
        raise RuntimeError(f"the cpu kernel of 'splat' predates {what}: rebuild it ({_ffi.BUILD_HINT})") from None
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def exp_agreement(lo: float = -60.0, stride: int = 1) -> dict:
    """Compares the CPU kernel's exp (a lane group at a time, `simd_lanes`, glibc's expf algorithm
    in double precision; kernels/splat/splat_cpu.cc, `row_exp`) with the C library's `std::exp` on +0.0 and
    the floats x in [lo, 0] whose bit patterns are -0.0's plus multiples of `stride` (1: every
    float, about 1.1e9 of them for lo = -60, a few seconds).

    Args:
      lo: the most negative exponent compared (< 0). The pixel rule evaluates exp only above
        log(1 / (255 o)) - 1e-3, about -5.5 for opacities o up to 1; the kernel passes exponents
        below -60 to `std::exp` itself.
      stride: step between compared float bit patterns (>= 1).

    Returns:
      {"compared": values compared, "fast": those at or above -60, which the vectorised exp
      evaluated (compared on their own too), "mismatches": values whose bits differ, "max_ulp":
      the largest difference in units in the last place}. On x86-64 with glibc 2.36 every float
      in [-60, 0] agrees bit for bit. Raises RuntimeError when the CPU library is not built (or
      predates this check), ValueError for lo >= 0 or stride < 1.
    """
    import ctypes

    if not lo < 0 or int(stride) < 1:
        raise ValueError(f"exp_agreement: need lo < 0 and stride >= 1, got lo={lo}, stride={stride}")
    fn = _cpu_function("dhjax_splat_compare_exp", "exp_agreement", ctypes.c_int64,
                       [ctypes.c_float, ctypes.c_int64] + [ctypes.POINTER(ctypes.c_int64)] * 3)
    mismatches, max_ulp, fast = ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int64(0)
    n = fn(float(lo), int(stride), ctypes.byref(mismatches), ctypes.byref(max_ulp), ctypes.byref(fast))
    if n < 0:
        raise ValueError(f"exp_agreement: the kernel refused lo={lo}, stride={stride}")
    return {"compared": int(n), "fast": int(fast.value), "mismatches": int(mismatches.value),
            "max_ulp": int(max_ulp.value)}
