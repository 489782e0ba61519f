"""Ray marching through an occupancy grid and volume-rendering compositing (instant-ngp style).

The sampling and compositing of INSTA's NeRF head avatars: rays are marched through a per-group
occupancy grid into one compacted list of samples per group (`march`), the field is evaluated at
the samples, and the samples are composited front to back (`composite`, differentiable).

Shapes: G groups (e.g. frames or cameras), R rays per group, C sample slots per group (the
capacity), occupancy grids of D^3 cells. Units: metres (any unit, as long as origins, boxes and
`step` agree). Distances t multiply the given direction: p = o + t d (directions need not be unit;
INSTA passes unit directions, so t is then in metres).

Marching rule (`march`; identical in the reference and both kernels, bit for bit):

* slab test: per axis a with d_a != 0, t_a = (box_min_a - o_a) / d_a and (box_max_a - o_a) / d_a,
  lo_a / hi_a their min / max; an axis with d_a == 0 gives (-inf, inf) when box_min_a <= o_a <=
  box_max_a and no samples otherwise. t0 = max(0, lo_x, lo_y, lo_z), t1 = min(hi_x, hi_y, hi_z).
  No samples when t1 <= t0 (ray misses, or box behind), when t1 = inf (d = 0), when any of o, d,
  box_min, box_max is not finite, or when box_max <= box_min on some axis.
* K = min(floor((t1 - t0) / step), MAX_STEPS) candidate steps (only full steps; MAX_STEPS = 2^20
  is a safety guard against absurd step counts, not a tuning knob). Candidate k = 0 .. K-1:
  t_k = t0 + (k + 0.5) step (the middle of its step), p = o + t_k d,
  cell_a = floor(((p_a - box_min_a) / (box_max_a - box_min_a)) * D) clamped to [0, D-1] (NaN -> 0).
  The sample is kept iff grid[g, cell_x, cell_y, cell_z] != 0 (i along x, j along y, k along z;
  cell (i, j, k) covers box_min + ((i, j, k) + [0, 1]) (box_max - box_min) / D).
* float32 throughout, each operation rounded once in exactly this order (no FMA contraction:
  the C++ is compiled with -ffp-contract=off, the CUDA code uses __f*_rn intrinsics, the
  reference puts optimization barriers between products and sums), so every implementation keeps
  the same samples at the same t.
* storage: kept samples of one ray are contiguous in increasing t, rays in index order (ray-major);
  ray_start = exclusive prefix sum of the per-ray counts within the group (true counts, so it is
  the same whatever the capacity); a sample whose slot would be >= C is not stored (its ray gets
  complete = False, ray_count = what was stored); n_samples = the true total (can exceed C).
  Unused slots: t = 0, delta = 0, ray = -1. One group's total must stay below 2^31.

Compositing (`composite`), per ray over its stored samples n = 0 .. ray_count - 1 in order:

* x_n = sigma_n delta_n, S_0 = 0, S_{n+1} = S_n + x_n (the optical depth; float32, summed in
  order in the kernels, by a segmented log-step scan in the reference),
  T_n = exp(-S_n), alpha_n = 1 - exp(-x_n) (computed as -expm1(-x_n)), w_n = T_n alpha_n.
* early termination: sample n is processed only while T_n >= min_transmittance, decided as
  S_n <= s_max = float32(-log(min_transmittance)) (a comparison of sums, so exp's last bits never
  flip it); after the first unprocessed sample the rest of the ray is skipped (weight 0, zero
  gradient). min_transmittance = 0 never stops.
* color = sum_n w_n rgb_n + T_end background, depth = sum_n w_n t_n (expected termination
  distance, not normalised: INSTA's z-hat), opacity = 1 - T_end, weights w_n, with
  T_end = exp(-S_end), S_end the optical depth after the last processed sample.
* gradients to sigma, rgb and background (the termination decision held constant; t and delta
  are constants). The kernels' backward is the exact derivative, per processed sample
  dL/drgb_n = w_n dL/dcolor and
  dL/dsigma_n = delta_n (g_n T_{n+1} - sum_{m>n} w_m g_m - dL/dT_end T_end),
  g_n = dL/dcolor . rgb_n + dL/ddepth t_n + dL/dw_n, evaluated as one forward walk (storing S_n)
  and one reverse walk accumulating the suffix sum (no total-minus-prefix cancellation). The
  background term and opacity = 1 - T_end are plain JAX around the kernel (T_end is a kernel
  output), so their gradients come from autodiff.

Implementations of both ops:
* `backend="reference"`: pure JAX, jit-able with static shapes (march: two vectorised
  `while_loop`s over the candidate index, a counting and a writing one, scattering into the slots;
  composite: segmented scans (log-step doubling) and segment sums over the compacted list), differentiated
  by autodiff; the oracle of the tests and the fallback.
* `backend="cpu"`: C++ handlers (kernels/raymarch/raymarch_cpu.cc), threads over rays
  (dhjax_parallel.h), deterministic (the same bits for any thread count).
* `backend="cuda"`: CUDA handlers (kernels/raymarch/raymarch_cuda.cu): march = count kernel +
  cub::DeviceScan + write kernel in one FFI call (no host round trip), composite forward/backward
  one thread per ray. Written and compiled with nvcc, but NOT yet run on a GPU (none was
  available): `pytest -m gpu tests/test_ops_raymarch.py` is the first thing to run on one.
`backend="auto"` picks the kernel of JAX's default backend when it is built, else the reference.

FFI targets: dhjax_raymarch_march_{cpu,cuda}, dhjax_raymarch_composite_fwd_{cpu,cuda},
dhjax_raymarch_composite_bwd_{cpu,cuda}; `vmap_method="broadcast_all"`: under vmap every operand
gets the batch dims in front and the handlers treat all leading dims as groups, so a vmapped call
is one kernel launch (unbatched operands are broadcast, i.e. copied, B times).

Capacity: under jit pass `capacity` (static). `capacity=None` sizes the list exactly: a counting
pass (the march with capacity 0), the total read on the host (concrete inputs only), rounded up
by `round_capacity` to limit recompilations, then the march. `check_complete` raises when a ray
was truncated.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dhjax.ops import _ffi

MAX_STEPS = 1 << 20  # safety cap on the candidate steps of one ray (raymarch_common.h: kMaxSteps)

_TARGETS = {
    "cpu": (
        ("dhjax_raymarch_march_cpu", "RaymarchMarch"),
        ("dhjax_raymarch_composite_fwd_cpu", "RaymarchCompositeForward"),
        ("dhjax_raymarch_composite_bwd_cpu", "RaymarchCompositeBackward"),
    ),
    "cuda": (
        ("dhjax_raymarch_march_cuda", "RaymarchMarchCuda"),
        ("dhjax_raymarch_composite_fwd_cuda", "RaymarchCompositeForwardCuda"),
        ("dhjax_raymarch_composite_bwd_cuda", "RaymarchCompositeBackwardCuda"),
    ),
}


class Samples(NamedTuple):
    """The compacted sample list of `march` (per group g; see the module docstring)."""

    t: jax.Array  # [G, C] float32 distance of each sample along its ray (middle of its step)
    delta: jax.Array  # [G, C] float32 step length (== step; 0 in unused slots)
    ray: jax.Array  # [G, C] int32 ray index (0..R-1); -1 in unused slots
    ray_start: jax.Array  # [G, R] int32 index of the ray's first sample in the compacted list
    ray_count: jax.Array  # [G, R] int32 number of the ray's samples stored (clipped to capacity)
    n_samples: jax.Array  # [G] int32 number of samples the rays need (can exceed C: overflow)
    complete: jax.Array  # [G, R] bool: all of the ray's samples are stored


class Composite(NamedTuple):
    """The result of `composite`."""

    color: jax.Array  # [G, R, 3] sum_n w_n c_n + T_end * background
    depth: jax.Array  # [G, R] sum_n w_n t_n (not normalised)
    opacity: jax.Array  # [G, R] 1 - T_end
    weights: jax.Array  # [G, C] w_n per sample (0 for unused slots and after termination)


def kernel_available(platform: str = "cpu") -> bool:
    """True when the raymarch library for `platform` ("cpu" | "cuda") is built and registered."""
    return _ffi.register("raymarch", platform, _TARGETS[platform])


def round_capacity(n: int) -> int:
    """Capacity used by `march(capacity=None)` for n needed samples: n rounded up to a multiple of
    4096 up to 65536, above that to a multiple of 2^(floor(log2 n) - 3) (at most 12.5% slack and
    8 distinct sizes per octave, to limit recompilations). 0 stays 0."""
    n = int(n)
    if n <= 0:
        return 0
    q = 4096 if n <= 65536 else 1 << (n.bit_length() - 1 - 3)
    return -(-n // q) * q


# ---------------------------------------------------------------------------------------------
# Argument checks


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_march(origins, directions, grid, box_min, box_max, step, capacity):
    origins = jnp.asarray(origins)
    directions = jnp.asarray(directions)
    grid = jnp.asarray(grid)
    box_min = jnp.asarray(box_min)
    box_max = jnp.asarray(box_max)
    if origins.ndim != 3 or origins.shape[-1] != 3:
        raise ValueError(f"origins must be [G, R, 3] float32, got shape {origins.shape}")
    G, R = origins.shape[:2]
    if directions.shape != origins.shape:
        raise ValueError(f"directions must be [G, R, 3] = {origins.shape} like origins, got shape {directions.shape}")
    if grid.ndim != 4:
        raise ValueError(f"grid must be 4-D [G, D, D, D] (bool or uint8), got shape {grid.shape}")
    D = grid.shape[1]
    if grid.shape != (G, D, D, D) or D < 1:
        raise ValueError(f"grid must be [G, D, D, D] = [{G}, D, D, D] with D >= 1 (a cube per group), got {grid.shape}")
    if D ** 3 >= 2**31:
        raise ValueError(f"grid: D^3 must be < 2^31, got D = {D}")
    if grid.dtype not in (jnp.bool_, jnp.uint8):
        raise TypeError(f"grid must be bool or uint8 occupancy, got dtype {grid.dtype}")
    for name, b in (("box_min", box_min), ("box_max", box_max)):
        if b.shape != (G, 3):
            raise ValueError(f"{name} must be [G, 3] = [{G}, 3], got shape {b.shape}")
    for name, a in (("origins", origins), ("directions", directions), ("box_min", box_min), ("box_max", box_max)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point (float32), got dtype {a.dtype}")
    if _is_traced(step) or not isinstance(step, (int, float, np.floating, np.integer)):
        raise TypeError(f"step must be a static python float, got {type(step).__name__}")
    if not (math.isfinite(float(step)) and float(step) > 0.0 and float(np.float32(step)) > 0.0):
        raise ValueError(f"step must be a positive finite float, got {step}")
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise TypeError(f"capacity must be a static int or None, got {type(capacity).__name__}")
        if capacity < 0 or capacity >= 2**31:
            raise ValueError(f"capacity must be in [0, 2^31), got {capacity}")
    f32 = jnp.float32
    return (origins.astype(f32), directions.astype(f32), (grid != 0).astype(jnp.uint8), box_min.astype(f32),
            box_max.astype(f32))


# ---------------------------------------------------------------------------------------------
# Reference march


def _barrier(x):
    return jax.lax.optimization_barrier(x)


def _ray_ranges(o, d, bmin, bmax, step):
    """t0 [G, R] and K [G, R] int32 of the marching rule (module docstring)."""
    bmn = bmin[:, None, :]
    bmx = bmax[:, None, :]
    inf = jnp.float32(np.inf)
    ok = jnp.all(jnp.isfinite(o) & jnp.isfinite(d) & jnp.isfinite(bmn) & jnp.isfinite(bmx) & (bmx > bmn), axis=-1)
    nz = d != 0
    ds = jnp.where(nz, d, jnp.float32(1.0))
    ta = (bmn - o) / ds
    tb = (bmx - o) / ds
    lo = jnp.where(nz, jnp.where(ta < tb, ta, tb), -inf)
    hi = jnp.where(nz, jnp.where(ta < tb, tb, ta), inf)
    ok = ok & jnp.all(nz | ((o >= bmn) & (o <= bmx)), axis=-1)
    t0 = jnp.zeros(o.shape[:-1], jnp.float32)
    t1 = jnp.full(o.shape[:-1], inf)
    for a in range(3):
        t0 = jnp.where(lo[..., a] > t0, lo[..., a], t0)
        t1 = jnp.where(hi[..., a] < t1, hi[..., a], t1)
    ok = ok & (t1 > t0) & (t1 != inf)
    q = jnp.floor((t1 - t0) / step)
    K = jnp.where(ok, jnp.where(q >= MAX_STEPS, jnp.float32(MAX_STEPS), q), jnp.float32(0.0)).astype(jnp.int32)
    return jnp.where(ok, t0, jnp.float32(0.0)), K


def _candidate(k, o, d, bmin, bmax, occ, t0, K, step, D):
    """Candidate k of every ray: (kept [G, R] bool, t_k [G, R])."""
    kf = k.astype(jnp.float32)
    tk = t0 + _barrier((kf + jnp.float32(0.5)) * step)
    p = o + _barrier(tk[..., None] * d)
    Df = jnp.float32(D)
    u = ((p - bmin[:, None, :]) / (bmax - bmin)[:, None, :]) * Df
    c = jnp.floor(u)
    ci = jnp.where(c >= 1.0, jnp.where(c < Df, c, Df - 1.0), jnp.float32(0.0)).astype(jnp.int32)
    flat = (ci[..., 0] * D + ci[..., 1]) * D + ci[..., 2]
    return (k < K) & jnp.take_along_axis(occ, flat, axis=1), tk


@functools.partial(jax.jit, static_argnames=("step", "capacity"))
def _march_reference(origins, directions, grid, box_min, box_max, *, step, capacity):
    o, d, bmin, bmax = (jax.lax.stop_gradient(x) for x in (origins, directions, box_min, box_max))
    G, R = o.shape[:2]
    D = grid.shape[1]
    C = capacity
    occ = grid.reshape(G, D * D * D) != 0
    # The step goes through a barrier so that XLA cannot turn "/ step" into "* (1 / step)".
    step_f = _barrier(jnp.float32(step))
    t0, K = _ray_ranges(o, d, bmin, bmax, step_f)
    k_max = jnp.max(K, initial=0)
    cand = functools.partial(_candidate, o=o, d=d, bmin=bmin, bmax=bmax, occ=occ, t0=t0, K=K, step=step_f, D=D)

    def count_body(state):
        k, cnt = state
        kept, _ = cand(k)
        return k + 1, cnt + kept.astype(jnp.int32)

    _, counts = jax.lax.while_loop(lambda s: s[0] < k_max, count_body, (jnp.int32(0), jnp.zeros((G, R), jnp.int32)))
    ray_start = jnp.cumsum(counts, axis=1, dtype=jnp.int32) - counts
    n_samples = jnp.sum(counts, axis=1, dtype=jnp.int32)
    stored = jnp.clip(C - ray_start, 0, counts)
    complete = stored == counts
    t_out = jnp.zeros((G * C,), jnp.float32)
    r_out = jnp.full((G * C,), -1, jnp.int32)
    if C > 0 and G * R > 0:
        base = (jnp.arange(G, dtype=jnp.int32) * C)[:, None]
        rays = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32), (G, R)).reshape(-1)

        def write_body(state):
            k, run, t_o, r_o = state
            kept, tk = cand(k)
            slot = ray_start + run
            idx = jnp.where(kept & (slot < C), base + slot, G * C).reshape(-1)
            t_o = t_o.at[idx].set(tk.reshape(-1), mode="drop")
            r_o = r_o.at[idx].set(rays, mode="drop")
            return k + 1, run + kept.astype(jnp.int32), t_o, r_o

        init = (jnp.int32(0), jnp.zeros((G, R), jnp.int32), t_out, r_out)
        _, _, t_out, r_out = jax.lax.while_loop(lambda s: s[0] < k_max, write_body, init)
    ray = r_out.reshape(G, C)
    delta = jnp.where(ray >= 0, jnp.float32(step), jnp.float32(0.0))
    return Samples(t_out.reshape(G, C), delta, ray, ray_start, stored, n_samples, complete)


# ---------------------------------------------------------------------------------------------
# Kernel march


def _march_ffi(o, d, grid, bmin, bmax, step, capacity, platform):
    G, R = o.shape[:2]
    C = capacity
    sds = jax.ShapeDtypeStruct
    outs = (
        sds((G, C), jnp.float32),
        sds((G, C), jnp.float32),
        sds((G, C), jnp.int32),
        sds((G, R), jnp.int32),
        sds((G, R), jnp.int32),
        sds((G,), jnp.int32),
        sds((G, R), jnp.bool_),
    )
    call = jax.ffi.ffi_call(_TARGETS[platform][0][0], outs, vmap_method="broadcast_all")
    sg = jax.lax.stop_gradient
    return Samples(*call(sg(o), sg(d), grid, sg(bmin), sg(bmax), step=np.float32(step)))


def _march_impl(o, d, grid, bmin, bmax, step, capacity, impl):
    if impl == "reference":
        return _march_reference(o, d, grid, bmin, bmax, step=float(step), capacity=int(capacity))
    return _march_ffi(o, d, grid, bmin, bmax, float(step), int(capacity), impl)


def march(origins, directions, grid, box_min, box_max, *, step, capacity=None, backend="auto") -> Samples:
    """March rays through per-group occupancy grids into a compacted sample list.

    Args:
      origins, directions: [G, R, 3] float32 rays, p = o + t d (directions need not be unit).
      grid: [G, D, D, D] bool or uint8 occupancy (nonzero = occupied), grid[g, i, j, k] with
        i along x, j along y, k along z; any D >= 1.
      box_min, box_max: [G, 3] float32 axis-aligned box of each group's grid.
      step: static python float > 0, step length in units of t.
      capacity: static int C >= 0, sample slots per group. None sizes it on the host from a
        counting pass (concrete inputs only; under jit, vmap or grad pass it).
      backend: "auto" | "reference" | "cpu" | "cuda" (see the module docstring).
    Returns:
      Samples (see the class); the marching rule is in the module docstring.

    No gradients flow through march (its inputs are stop_gradient'ed); it works inside jax.grad
    and jit (with a capacity) and vmap.
    """
    o, d, g, bmin, bmax = _check_march(origins, directions, grid, box_min, box_max, step, capacity)
    impl = _ffi.resolve_backend(backend, "raymarch", _TARGETS)
    if capacity is None:
        if _is_traced(origins, directions, grid, box_min, box_max):
            raise ValueError(
                "march(capacity=None) sizes the sample list on the host and needs concrete inputs, but some are "
                "traced (jit/vmap/grad): pass a static capacity=... (e.g. round_capacity of a count() total)"
            )
        counted = _march_impl(o, d, g, bmin, bmax, step, 0, impl)
        capacity = round_capacity(int(np.max(np.asarray(counted.n_samples), initial=0)))
    return _march_impl(o, d, g, bmin, bmax, step, capacity, impl)


def count(origins, directions, grid, box_min, box_max, *, step, backend="auto") -> jax.Array:
    """[G, R] int32 number of samples each ray needs under the marching rule (march's counting pass)."""
    o, d, g, bmin, bmax = _check_march(origins, directions, grid, box_min, box_max, step, 0)
    impl = _ffi.resolve_backend(backend, "raymarch", _TARGETS)
    s = _march_impl(o, d, g, bmin, bmax, step, 0, impl)
    nxt = jnp.concatenate([s.ray_start[:, 1:], s.n_samples[:, None]], axis=1)
    return nxt - s.ray_start


def check_complete(samples: Samples) -> None:
    """Raise a ValueError when any ray of `samples` was truncated by the capacity (host only)."""
    if _is_traced(samples.complete, samples.n_samples):
        raise ValueError("check_complete needs concrete samples (it reads them on the host), got traced arrays")
    complete = np.asarray(samples.complete)
    if complete.all():
        return
    needed = np.asarray(samples.n_samples)
    capacity = samples.t.shape[-1]
    stored = np.asarray(samples.ray_count).sum(axis=-1)
    groups = np.flatnonzero(needed.reshape(-1) > capacity)
    raise ValueError(
        f"raymarch: {int((~complete).sum())} rays truncated: the rays need {needed.reshape(-1).tolist()} samples per "
        f"group but the capacity {capacity} stores {stored.reshape(-1).tolist()} (groups {groups.tolist()} overflow); "
        f"pass capacity >= {int(needed.max())} (e.g. round_capacity({int(needed.max())}) = "
        f"{round_capacity(int(needed.max()))}) or capacity=None"
    )


# ---------------------------------------------------------------------------------------------
# Compositing


def _s_max(min_transmittance) -> float:
    mt = float(min_transmittance)
    if not 0.0 <= mt <= 1.0:
        raise ValueError(f"min_transmittance must be in [0, 1], got {min_transmittance}")
    return float(np.float32(np.inf if mt == 0.0 else -math.log(mt)))


def _seg_scan(x, reset):
    """Inclusive scan along axis 1 restarting where `reset` is True (segmented; Hillis-Steele
    doubling in a fori_loop: log2(C) steps, small to compile, differentiable)."""
    G, C = x.shape
    if C <= 1:
        return x
    zeros = jnp.zeros((G, C), x.dtype)
    ones = jnp.ones((G, C), bool)

    def body(j, state):
        f, v = state
        shift = jnp.left_shift(jnp.int32(1), j)
        v_prev = jax.lax.dynamic_slice_in_dim(jnp.concatenate([zeros, v], axis=1), C - shift, C, axis=1)
        f_prev = jax.lax.dynamic_slice_in_dim(jnp.concatenate([ones, f], axis=1), C - shift, C, axis=1)
        return f | f_prev, jnp.where(f, v, v + v_prev)

    return jax.lax.fori_loop(0, (C - 1).bit_length(), body, (reset, x))[1]


def _layout(ray_start, ray_count, C):
    """Ray index of every slot [G, C] (-1 outside any ray's [start, start+count) within [0, C))
    and whether the slot is its ray's first."""
    G, R = ray_start.shape
    slot = jnp.arange(C, dtype=jnp.int32)
    if R == 0:
        none = jnp.zeros((G, C), bool)
        return jnp.full((G, C), -1, jnp.int32), none, none
    has = (ray_count > 0) & (ray_start >= 0) & (ray_start < C)
    head = jnp.zeros((G, C), jnp.int32)
    gi = jnp.broadcast_to(jnp.arange(G)[:, None], (G, R))
    ri = jnp.broadcast_to(jnp.arange(1, R + 1, dtype=jnp.int32), (G, R))
    head = head.at[gi, jnp.where(has, ray_start, C)].max(ri, mode="drop")
    seg = jax.lax.cummax(head, axis=1) - 1
    segc = jnp.clip(seg, 0, R - 1)
    s_of = jnp.take_along_axis(ray_start, segc, axis=1)
    c_of = jnp.take_along_axis(jnp.clip(ray_count, 0, C), segc, axis=1)
    valid = (seg >= 0) & (slot - s_of < c_of)
    first = valid & (slot == s_of)
    return jnp.where(valid, seg, -1), valid, first


@functools.partial(jax.jit, static_argnames=("s_max",))
def _composite_core_reference(sigma, rgb, t, delta, ray_start, ray_count, s_max):
    """(color without background [G,R,3], depth [G,R], trans = T_end [G,R], weights [G,C])."""
    G, C = sigma.shape
    R = ray_start.shape[1]
    t = jax.lax.stop_gradient(t)
    delta = jax.lax.stop_gradient(delta)
    seg, valid, first = _layout(ray_start, ray_count, C)
    x = jnp.where(valid, sigma * delta, 0.0)
    reset = first | ~valid
    x_prev = jnp.concatenate([jnp.zeros((G, 1), x.dtype), x[:, :-1]], axis=1)
    S = _seg_scan(jnp.where(reset, 0.0, x_prev), reset)  # optical depth before each sample
    fails = (valid & ~(S <= s_max)).astype(jnp.int32)
    processed = valid & (_seg_scan(fails, reset) == 0)
    w = jnp.where(processed, jnp.exp(-S) * -jnp.expm1(-x), 0.0)
    ids = jnp.where(processed, jnp.arange(G, dtype=jnp.int32)[:, None] * R + seg, G * R).reshape(-1)
    ssum = functools.partial(jax.ops.segment_sum, segment_ids=ids, num_segments=G * R)
    color = ssum((w[..., None] * rgb).reshape(-1, 3)).reshape(G, R, 3)
    depth = ssum((w * t).reshape(-1)).reshape(G, R)
    s_end = ssum(jnp.where(processed, x, 0.0).reshape(-1)).reshape(G, R)
    return color, depth, jnp.exp(-s_end), w


def _composite_ffi_fwd(sigma, rgb, t, delta, start, count, s_max, platform):
    G, C = sigma.shape[-2:]
    R = start.shape[-1]
    sds = jax.ShapeDtypeStruct
    outs = (sds((G, R, 3), jnp.float32), sds((G, R), jnp.float32), sds((G, R), jnp.float32), sds((G, C), jnp.float32))
    call = jax.ffi.ffi_call(_TARGETS[platform][1][0], outs, vmap_method="broadcast_all")
    return call(sigma, rgb, t, delta, start, count, s_max=np.float32(s_max))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _composite_kernel(sigma, rgb, t, delta, start, count, s_max, platform):
    return _composite_ffi_fwd(sigma, rgb, t, delta, start, count, s_max, platform)


def _composite_kernel_fwd(sigma, rgb, t, delta, start, count, s_max, platform):
    out = _composite_ffi_fwd(sigma, rgb, t, delta, start, count, s_max, platform)
    return out, (sigma, rgb, t, delta, start, count)


def _composite_kernel_bwd(s_max, platform, res, g):
    sigma, rgb, t, delta, start, count = res
    gc, gd, gt, gw = g
    outs = (jax.ShapeDtypeStruct(sigma.shape, jnp.float32), jax.ShapeDtypeStruct(rgb.shape, jnp.float32))
    call = jax.ffi.ffi_call(_TARGETS[platform][2][0], outs, vmap_method="broadcast_all")
    d_sigma, d_rgb = call(sigma, rgb, t, delta, start, count, gc, gd, gt, gw, s_max=np.float32(s_max))
    return d_sigma, d_rgb, None, None, None, None


_composite_kernel.defvjp(_composite_kernel_fwd, _composite_kernel_bwd)


def distortion(weights, samples: Samples, *, scale: float = 1.0) -> jax.Array:
    """Mip-NeRF 360's distortion loss of each ray [G, R] over its stored samples (pure JAX).

    L = sum_{i,j} w_i w_j |t_i - t_j| + 1/3 sum_i w_i^2 delta_i over the ray's samples, with t (the
    middle of each step, as mip-NeRF 360's interval midpoints) and delta divided by `scale` (e.g.
    the box extent, so that the loss weight does not depend on the scene's size); small when a
    ray's weight sits in one short interval, large when it is spread along the ray.

    Args:
      weights: [G, C] float32 per-sample weights (`composite`'s).
      samples: the Samples they belong to (t, delta, ray_start, ray_count).
      scale: static length that t and delta are divided by (> 0).
    Returns:
      [G, R] float32. Differentiable w.r.t. weights (t and delta are constants). The pairwise
      sum is 2 sum_i w_i sum_{j<i} w_j (t_i - t_j) (t increases along a ray) by segmented
      prefix sums of w and w t over the compacted list, O(C), with t taken relative to the
      ray's first sample.
    """
    weights = jnp.asarray(weights)
    if weights.ndim != 2 or tuple(samples.t.shape) != weights.shape:
        raise ValueError(f"weights must be [G, C] like samples.t {tuple(samples.t.shape)}, got {weights.shape}")
    if not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    G, C = weights.shape
    R = samples.ray_start.shape[1]
    if R == 0 or C == 0:
        return jnp.zeros((G, R), jnp.float32)
    seg, valid, first = _layout(samples.ray_start, samples.ray_count, C)
    t = jax.lax.stop_gradient(jnp.asarray(samples.t, jnp.float32)) / float(scale)
    delta = jax.lax.stop_gradient(jnp.asarray(samples.delta, jnp.float32)) / float(scale)
    start = jnp.take_along_axis(samples.ray_start, jnp.clip(seg, 0, R - 1), axis=1)
    t = jnp.where(valid, t - jnp.take_along_axis(t, jnp.clip(start, 0, C - 1), axis=1), 0.0)
    w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
    reset = first | ~valid
    w_before = _seg_scan(w, reset) - w                 # sum_{j<i} w_j within the ray
    wt_before = _seg_scan(w * t, reset) - w * t        # sum_{j<i} w_j t_j
    per = 2.0 * w * (t * w_before - wt_before) + w * w * delta / 3.0
    ids = jnp.where(valid, jnp.arange(G, dtype=jnp.int32)[:, None] * R + seg, G * R).reshape(-1)
    return jax.ops.segment_sum(per.reshape(-1), ids, num_segments=G * R).reshape(G, R)


def composite(sigma, rgb, samples: Samples, background, *, min_transmittance=1e-4, backend="auto") -> Composite:
    """Front-to-back volume compositing of the samples of `march` (formulas: module docstring).

    Args:
      sigma: [G, C] float32 densities (>= 0, already activated).
      rgb: [G, C, 3] float32 colours.
      samples: the Samples the field was evaluated at (uses t, delta, ray_start, ray_count).
      background: float32 broadcastable to [G, R, 3] (e.g. [3], [G, 1, 3], [G, R, 3]).
      min_transmittance: static float in [0, 1]; a ray stops before the first sample whose
        transmittance T_n is below it (0: never).
      backend: "auto" | "reference" | "cpu" | "cuda".
    Returns:
      Composite(color [G, R, 3], depth [G, R], opacity [G, R], weights [G, C]).

    Differentiable w.r.t. sigma, rgb and background (t and delta are constants); jit, vmap and
    grad work on every backend (the kernels give first derivatives).
    """
    sigma = jnp.asarray(sigma)
    rgb = jnp.asarray(rgb)
    background = jnp.asarray(background)
    if sigma.ndim != 2:
        raise ValueError(f"sigma must be [G, C] float32, got shape {sigma.shape}")
    G, C = sigma.shape
    if rgb.shape != (G, C, 3):
        raise ValueError(f"rgb must be [G, C, 3] = [{G}, {C}, 3] like sigma, got shape {rgb.shape}")
    for name in ("t", "delta", "ray"):
        a = getattr(samples, name)
        if tuple(a.shape) != (G, C):
            raise ValueError(f"samples.{name} must be [G, C] = [{G}, {C}] like sigma, got shape {tuple(a.shape)}")
    R = samples.ray_start.shape[-1] if samples.ray_start.ndim == 2 else -1
    for name in ("ray_start", "ray_count"):
        a = getattr(samples, name)
        if a.ndim != 2 or a.shape[0] != G:
            raise ValueError(f"samples.{name} must be [G, R] with G = {G}, got shape {tuple(a.shape)}")
        if a.shape[1] != R:
            raise ValueError(f"samples.ray_start and ray_count must both be [G, R], got {tuple(a.shape)}")
    try:
        bshape = np.broadcast_shapes(background.shape, (G, R, 3))
    except ValueError:
        bshape = None
    if bshape != (G, R, 3):
        raise ValueError(f"background must broadcast to [G, R, 3] = [{G}, {R}, 3], got shape {background.shape}")
    for name, a in (("sigma", sigma), ("rgb", rgb), ("background", background)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point (float32), got dtype {a.dtype}")
    s_max = _s_max(min_transmittance)
    impl = _ffi.resolve_backend(backend, "raymarch", _TARGETS)
    f32 = jnp.float32
    args = (
        sigma.astype(f32),
        rgb.astype(f32),
        jax.lax.stop_gradient(jnp.asarray(samples.t, f32)),
        jax.lax.stop_gradient(jnp.asarray(samples.delta, f32)),
        jnp.asarray(samples.ray_start, jnp.int32),
        jnp.asarray(samples.ray_count, jnp.int32),
    )
    if impl == "reference":
        acc, depth, trans, weights = _composite_core_reference(*args, s_max=s_max)
    else:
        acc, depth, trans, weights = _composite_kernel(*args, s_max, impl)
    color = acc + trans[..., None] * jnp.broadcast_to(background.astype(f32), (G, R, 3))
    return Composite(color, depth, 1.0 - trans, weights)
