"""Tests of dhjax.ops.raymarch: the marching rule against an independent loop-based numpy version
(float32 scalars, one rounding per operation) and the analytic step count, the CPU kernel against
the reference bit for bit, capacity overflow and sizing; compositing against a float64 numpy
loop, kernel values and gradients against the reference's autodiff, finite differences, early
termination, empty rays, jit/vmap/grad. CUDA tests are marked `gpu` (the CUDA handlers have not
run on a GPU yet: these are their first run)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.ops import _ffi
from dhjax.ops import raymarch as rm
from kernel_common import need_kernel

F = np.float32


def _require(platform):
    if platform == "cuda" and jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU (jax.default_backend() is not 'gpu')")
    need_kernel(_ffi.register("raymarch", platform, rm._TARGETS[platform]), f"the {platform} raymarch kernel",
                "bash kernels/build_inplace.sh" + (" -DDHJAX_CUDA=ON" if platform == "cuda" else ""))
    return platform


@pytest.fixture
def cpu_kernel():
    return _require("cpu")


@pytest.fixture
def cuda_kernel():
    return _require("cuda")


# ---------------------------------------------------------------------------------------------
# Scenes


BOX_MIN = np.array([[-1.0, -1.0, -1.0], [-0.6, -1.3, -0.45]], F)
BOX_MAX = np.array([[1.0, 1.0, 1.0], [0.9, 1.1, 0.8]], F)


def _rays(seed, G=2, R=160, box_min=BOX_MIN, box_max=BOX_MAX):
    """Rays of every kind per group: random (many miss), aimed at the box from outside, starting
    inside, box behind the origin, axis-parallel (zero direction components), grazing a face or
    running inside a face plane, along an edge, non-unit directions, a zero direction."""
    rng = np.random.default_rng(seed)
    o = np.zeros((G, R, 3), F)
    d = np.zeros((G, R, 3), F)
    for g in range(G):
        lo, hi = box_min[g].astype(np.float64), box_max[g].astype(np.float64)
        c, half = (lo + hi) / 2, (hi - lo) / 2
        n = R // 8
        oo = rng.uniform(-3, 3, (R, 3))
        target = c + rng.uniform(-1.2, 1.2, (R, 3)) * half
        dd = target - oo
        # inside the box
        oo[n:2 * n] = c + rng.uniform(-0.95, 0.95, (n, 3)) * half
        dd[n:2 * n] = rng.normal(size=(n, 3))
        # box behind: outside, pointing away
        oo[2 * n:3 * n] = c + np.sign(rng.normal(size=(n, 3))) * half * 2.5
        dd[2 * n:3 * n] = oo[2 * n:3 * n] - c
        # axis-parallel rays (one or two zero components), some inside the slab, some outside
        sl = slice(3 * n, 4 * n)
        dd[sl] = rng.normal(size=(n, 3))
        dd[sl][rng.uniform(size=(n, 3)) < 0.5] = 0.0
        dd[sl][np.all(dd[sl] == 0, axis=1), 0] = 1.0
        oo[sl] = c + rng.uniform(-1.3, 1.3, (n, 3)) * half
        oo[sl][dd[sl] != 0] = (c + 3 * half * np.sign(-dd[sl]))[dd[sl] != 0]
        # in a face plane (o_a == box bound exactly, d_a == 0) and grazing an edge
        sl = slice(4 * n, 5 * n)
        a = rng.integers(0, 3, n)
        oo[sl] = c + rng.uniform(-0.9, 0.9, (n, 3)) * half
        dd[sl] = rng.normal(size=(n, 3))
        rows = np.arange(4 * n, 5 * n)
        oo[rows, a] = np.where(rng.uniform(size=n) < 0.5, lo[a], hi[a])
        dd[rows, a] = 0.0
        oo[5 * n] = [lo[0] - 1.0, lo[1], lo[2]]  # along an edge
        dd[5 * n] = [1.0, 0.0, 0.0]
        oo[5 * n + 1] = [lo[0] - 1.0, hi[1], c[2]]  # along a face's edge line
        dd[5 * n + 1] = [1.0, 0.0, 0.0]
        oo[5 * n + 2] = c  # zero direction: no samples
        dd[5 * n + 2] = 0.0
        # non-unit directions: scale some
        scale = np.ones(R)
        scale[6 * n:7 * n] = rng.uniform(0.3, 4.0, n)
        norm = np.linalg.norm(dd, axis=1, keepdims=True)
        d[g] = np.where(norm > 0, dd / np.where(norm > 0, norm, 1) * scale[:, None], 0.0)
        o[g] = oo
    return o, d


def _grid(seed, G, D, p=0.35):
    return np.random.default_rng(seed).uniform(size=(G, D, D, D)) < p


# ---------------------------------------------------------------------------------------------
# An independent implementation of the marching rule: python loops over numpy float32 scalars
# (each operation rounded once, no FMA), written from the docstring.


def np_march(o, d, grid, bmin, bmax, step, C):
    G, R = o.shape[:2]
    D = grid.shape[1]
    step = F(step)
    t_out = np.zeros((G, C), F)
    ray_out = np.full((G, C), -1, np.int32)
    counts = np.zeros((G, R), np.int64)
    per_ray = [[[] for _ in range(R)] for _ in range(G)]
    for g in range(G):
        lo_b, hi_b = bmin[g], bmax[g]
        for r in range(R):
            oo, dd = o[g, r], d[g, r]
            if not (np.all(np.isfinite(oo)) and np.all(np.isfinite(dd)) and np.all(hi_b > lo_b)):
                continue
            t0, t1, miss = F(0.0), F(np.inf), False
            for a in range(3):
                if dd[a] != 0:
                    ta = F(F(lo_b[a] - oo[a]) / dd[a])
                    tb = F(F(hi_b[a] - oo[a]) / dd[a])
                    lo, hi = min(ta, tb), max(ta, tb)
                elif lo_b[a] <= oo[a] <= hi_b[a]:
                    lo, hi = F(-np.inf), F(np.inf)
                else:
                    miss = True
                    break
                t0, t1 = max(t0, lo), min(t1, hi)
            if miss or not t1 > t0 or np.isinf(t1):
                continue
            K = min(int(np.floor(F(F(t1 - t0) / step))), rm.MAX_STEPS)
            for k in range(K):
                tk = F(t0 + F(F(F(k) + F(0.5)) * step))
                cell = []
                for a in range(3):
                    p = F(oo[a] + F(tk * dd[a]))
                    u = F(F(F(p - lo_b[a]) / F(hi_b[a] - lo_b[a])) * F(D))
                    cell.append(int(min(max(np.floor(u), 0), D - 1)))
                if grid[g, cell[0], cell[1], cell[2]]:
                    per_ray[g][r].append(tk)
        start = 0
        for r in range(R):
            counts[g, r] = len(per_ray[g][r])
            for j, tk in enumerate(per_ray[g][r]):
                if start + j < C:
                    t_out[g, start + j] = tk
                    ray_out[g, start + j] = r
            start += len(per_ray[g][r])
    ray_start = (np.cumsum(counts, axis=1) - counts).astype(np.int32)
    stored = np.clip(C - ray_start, 0, counts).astype(np.int32)
    return dict(t=t_out, delta=np.where(ray_out >= 0, step, F(0)), ray=ray_out, ray_start=ray_start,
                ray_count=stored, n_samples=counts.sum(1).astype(np.int32), complete=stored == counts)


def _assert_samples_equal(a, b, what=""):
    for name in rm.Samples._fields:
        x, y = np.asarray(getattr(a, name) if hasattr(a, name) else a[name]), np.asarray(
            getattr(b, name) if hasattr(b, name) else b[name])
        assert x.shape == y.shape, (what, name, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: {name}")


def _march_all(o, d, grid, step, capacity, backend):
    return rm.march(o, d, grid, BOX_MIN, BOX_MAX, step=step, capacity=capacity, backend=backend)


# ---------------------------------------------------------------------------------------------
# march


@pytest.mark.parametrize("D,step", [(1, 0.05), (6, 0.037), (16, 0.011)])
def test_march_reference_matches_numpy_oracle(D, step):
    o, d = _rays(D, R=96)
    grid = _grid(D + 100, 2, D, p=0.4 if D > 1 else 1.0)
    want = np_march(o, d, grid, BOX_MIN, BOX_MAX, step, 4096)
    got = _march_all(o, d, grid, step, 4096, "reference")
    assert int(want["n_samples"].min()) > 0
    _assert_samples_equal(got, want, f"D={D}")


@pytest.mark.parametrize("D,step", [(1, 0.05), (5, 0.023), (16, 0.0071), (33, 0.013)])
def test_march_cpu_kernel_matches_reference_exactly(cpu_kernel, D, step):
    o, d = _rays(10 + D)
    grid = _grid(D, 2, D)
    want = _march_all(o, d, grid, step, None, "reference")
    got = _march_all(o, d, grid, step, None, "cpu")
    assert want.t.shape[1] == rm.round_capacity(int(np.max(want.n_samples)))
    _assert_samples_equal(got, want, "cpu vs reference")
    # under jit too (the reference's float operations must not be fused differently)
    C = want.t.shape[1]
    jit_ref = jax.jit(lambda *a: rm.march(*a, step=step, capacity=C, backend="reference"))
    _assert_samples_equal(jit_ref(o, d, grid, BOX_MIN, BOX_MAX), want, "jit reference")


def test_march_cpu_kernel_matches_oracle_on_random_steps(cpu_kernel):
    rng = np.random.default_rng(3)
    o, d = _rays(4, R=64)
    grid = _grid(5, 2, 9, p=0.5)
    for step in rng.uniform(0.004, 0.2, 3):
        want = np_march(o, d, grid, BOX_MIN, BOX_MAX, float(step), 3000)
        _assert_samples_equal(_march_all(o, d, grid, float(step), 3000, "cpu"), want, f"step={step}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_march_empty_grid(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    o, d = _rays(5, R=40)
    s = _march_all(o, d, np.zeros((2, 4, 4, 4), np.uint8), 0.01, None, backend)
    assert s.t.shape == (2, 0)
    np.testing.assert_array_equal(s.n_samples, 0)
    np.testing.assert_array_equal(s.ray_count, 0)
    np.testing.assert_array_equal(s.ray_start, 0)
    assert bool(np.all(s.complete))
    s = _march_all(o, d, np.zeros((2, 4, 4, 4), bool), 0.01, 16, backend)
    np.testing.assert_array_equal(s.ray, -1)
    np.testing.assert_array_equal(s.t, 0.0)
    np.testing.assert_array_equal(s.delta, 0.0)


def _slab64(o, d, lo, hi):
    o, d = o.astype(np.float64), d.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ta, tb = (lo - o) / d, (hi - o) / d
    inside = (o >= lo) & (o <= hi)
    tmin = np.where(d != 0, np.minimum(ta, tb), np.where(inside, -np.inf, np.inf))
    tmax = np.where(d != 0, np.maximum(ta, tb), np.where(inside, np.inf, -np.inf))
    return np.maximum(tmin.max(-1), 0.0), tmax.min(-1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_march_full_grid_gives_the_analytic_step_count(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    step = 0.0173
    o, d = _rays(6)
    s = _march_all(o, d, np.ones((2, 3, 3, 3), bool), step, None, backend)
    n = np.asarray(rm.count(o, d, np.ones((2, 3, 3, 3), bool), BOX_MIN, BOX_MAX, step=step, backend=backend))
    np.testing.assert_array_equal(n, s.ray_count)
    checked = 0
    for g in range(2):
        t0, t1 = _slab64(o[g], d[g], BOX_MIN[g].astype(np.float64), BOX_MAX[g].astype(np.float64))
        q = np.where(t1 > t0, (t1 - t0) / step, 0.0)
        q = np.where(np.isfinite(q), q, 0.0)
        clear = np.abs(q - np.round(q)) > 1e-3  # away from a float32 tie on an integer
        np.testing.assert_array_equal(n[g][clear], np.floor(q[clear]).astype(int))
        checked += int(clear.sum())
        # contiguous ray-major layout, t increasing by exactly one step's distance per ray
        t, ray = np.asarray(s.t[g]), np.asarray(s.ray[g])
        for r in np.flatnonzero(n[g] > 1)[:20]:
            a, b = int(s.ray_start[g, r]), int(s.ray_start[g, r] + s.ray_count[g, r])
            np.testing.assert_array_equal(ray[a:b], r)
            np.testing.assert_allclose(np.diff(t[a:b]), step, rtol=1e-3)
    assert checked > 200
    assert int(n.max()) > 50


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_march_capacity_overflow(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    o, d = _rays(7)
    grid = _grid(7, 2, 8, p=0.6)
    full = _march_all(o, d, grid, 0.02, None, backend)
    total = np.asarray(full.n_samples)
    C = int(total.min()) // 2
    s = _march_all(o, d, grid, 0.02, C, backend)
    np.testing.assert_array_equal(s.n_samples, total)  # the true totals
    np.testing.assert_array_equal(s.ray_start, full.ray_start)
    np.testing.assert_array_equal(s.t, np.asarray(full.t)[:, :C])  # the stored prefix
    np.testing.assert_array_equal(s.ray, np.asarray(full.ray)[:, :C])
    counts = np.asarray(full.ray_count)
    end = np.asarray(full.ray_start) + counts
    np.testing.assert_array_equal(s.complete, (end <= C) | (counts == 0))
    np.testing.assert_array_equal(s.ray_count, np.clip(C - np.asarray(full.ray_start), 0, counts))
    assert not bool(np.all(s.complete)) and bool(np.any(s.complete))
    np.testing.assert_array_equal(np.asarray(s.ray_count).sum(1), C)
    rm.check_complete(full)
    with pytest.raises(ValueError, match=rf"need {re.escape(str(total.tolist()))} samples.*capacity {C} stores"):
        rm.check_complete(s)
    assert s == s  # NamedTuple of arrays (no exception)


def test_round_capacity():
    assert rm.round_capacity(0) == 0
    assert rm.round_capacity(1) == 4096
    assert rm.round_capacity(4096) == 4096
    assert rm.round_capacity(4097) == 8192
    assert rm.round_capacity(65536) == 65536
    for n in (65537, 100_000, 1_234_567, 9_999_999):
        c = rm.round_capacity(n)
        assert n <= c <= n * 1.125 + 1


def test_march_capacity_none_needs_concrete_inputs():
    o, d = _rays(8, R=16)
    grid = _grid(8, 2, 4)

    @jax.jit
    def f(o):
        return rm.march(o, d, grid, BOX_MIN, BOX_MAX, step=0.05, backend="reference").t

    with pytest.raises(ValueError, match="capacity"):
        f(o)


def test_bad_inputs():
    o, d = _rays(9, R=8)
    grid = _grid(9, 2, 4)
    kw = dict(step=0.05, capacity=64, backend="reference")
    with pytest.raises(ValueError, match=r"origins must be \[G, R, 3\]"):
        rm.march(o[..., :2], d, grid, BOX_MIN, BOX_MAX, **kw)
    with pytest.raises(ValueError, match="directions"):
        rm.march(o, d[:, :4], grid, BOX_MIN, BOX_MAX, **kw)
    with pytest.raises(ValueError, match="grid must be 4-D"):
        rm.march(o, d, grid[0], BOX_MIN, BOX_MAX, **kw)
    with pytest.raises(ValueError, match="grid must be"):
        rm.march(o, d, grid[:1], BOX_MIN, BOX_MAX, **kw)
    with pytest.raises(ValueError, match="grid must be"):
        rm.march(o, d, grid[:, :, :3], BOX_MIN, BOX_MAX, **kw)
    with pytest.raises(TypeError, match="grid must be bool or uint8"):
        rm.march(o, d, grid.astype(np.float32), BOX_MIN, BOX_MAX, **kw)
    with pytest.raises(ValueError, match=r"box_max must be \[G, 3\]"):
        rm.march(o, d, grid, BOX_MIN, BOX_MAX[:1], **kw)
    with pytest.raises(ValueError, match="step must be a positive"):
        rm.march(o, d, grid, BOX_MIN, BOX_MAX, step=0.0, capacity=4, backend="reference")
    with pytest.raises(ValueError, match="capacity must be"):
        rm.march(o, d, grid, BOX_MIN, BOX_MAX, step=0.1, capacity=-1, backend="reference")
    s = rm.march(o, d, grid, BOX_MIN, BOX_MAX, **kw)
    sig, rgb = jnp.ones((2, 64)), jnp.ones((2, 64, 3))
    with pytest.raises(ValueError, match=r"sigma must be \[G, C\]"):
        rm.composite(sig[0], rgb, s, jnp.zeros(3), backend="reference")
    with pytest.raises(ValueError, match=r"rgb must be \[G, C, 3\]"):
        rm.composite(sig, rgb[..., :2], s, jnp.zeros(3), backend="reference")
    with pytest.raises(ValueError, match=r"samples.t must be \[G, C\]"):
        rm.composite(sig[:, :10], rgb[:, :10], s, jnp.zeros(3), backend="reference")
    with pytest.raises(ValueError, match="background must broadcast"):
        rm.composite(sig, rgb, s, jnp.zeros((2, 5, 3)), backend="reference")
    with pytest.raises(ValueError, match="min_transmittance"):
        rm.composite(sig, rgb, s, jnp.zeros(3), min_transmittance=2.0, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        rm.composite(sig, rgb, s, jnp.zeros(3), backend="tpu")


def test_march_inside_grad_jit_and_vmap(cpu_kernel):
    o, d = _rays(11, R=48)
    grid = _grid(11, 2, 6, p=0.5)
    C = 4096

    def loss(o, sig_scale, backend):
        s = rm.march(o, d, grid, BOX_MIN, BOX_MAX, step=0.03, capacity=C, backend=backend)
        sigma = sig_scale * (1.0 + s.t) * (s.ray >= 0)
        out = rm.composite(sigma, jnp.ones(s.t.shape + (3,)) * 0.5, s, jnp.zeros(3), backend=backend)
        return jnp.sum(out.color) + jnp.sum(out.depth)

    for backend in ("reference", "cpu"):
        go, gs = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(jnp.asarray(o), 2.0, backend)
        np.testing.assert_array_equal(go, 0.0)  # no gradient through the marching
        assert float(gs) != 0.0
    # vmap over a leading axis: groups of groups
    vm = jax.vmap(lambda oo, dd, gg, b0, b1: rm.march(oo, dd, gg, b0, b1, step=0.03, capacity=C, backend="cpu"))
    got = vm(o[:, None], d[:, None], grid[:, None], BOX_MIN[:, None], BOX_MAX[:, None])
    want = _march_all(o, d, grid, 0.03, C, "reference")
    _assert_samples_equal(jax.tree.map(lambda x: x[:, 0], got), want, "vmap")


def test_cpu_kernel_deterministic_for_any_thread_count(cpu_kernel, monkeypatch):
    o, d = _rays(12)
    grid = _grid(12, 2, 10)
    outs = []
    for n in ("1", "2", "5"):
        monkeypatch.setenv("DHJAX_NUM_THREADS", n)
        s = _march_all(o, d, grid, 0.01, 8192, "cpu")
        sig = jnp.asarray(np.random.default_rng(0).exponential(3.0, s.t.shape), jnp.float32)
        g = jax.grad(lambda x: jnp.sum(rm.composite(x, jnp.ones(s.t.shape + (3,)), s, jnp.ones(3),
                                                    backend="cpu").color ** 2))(sig)
        outs.append([np.asarray(x) for x in s] + [np.asarray(g)])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# composite: an independent float64 loop


def np_composite(sigma, rgb, s, background, min_t=1e-4):
    sigma, rgb = np.asarray(sigma, np.float64), np.asarray(rgb, np.float64)
    t, delta = np.asarray(s.t, np.float64), np.asarray(s.delta, np.float64)
    start, count = np.asarray(s.ray_start), np.asarray(s.ray_count)
    G, R = start.shape
    bg = np.broadcast_to(np.asarray(background, np.float64), (G, R, 3))
    color, depth, opac = np.zeros((G, R, 3)), np.zeros((G, R)), np.zeros((G, R))
    weights = np.zeros(sigma.shape)
    for g in range(G):
        for r in range(R):
            S = 0.0  # optical depth; T = exp(-S) keeps tiny transmittances (1 - alpha would round to 0)
            for n in range(start[g, r], start[g, r] + count[g, r]):
                if math.exp(-S) < min_t:
                    break
                x = sigma[g, n] * delta[g, n]
                w = math.exp(-S) * -math.expm1(-x)
                weights[g, n] = w
                color[g, r] += w * rgb[g, n]
                depth[g, r] += w * t[g, n]
                S += x
            T = math.exp(-S)
            color[g, r] += T * bg[g, r]
            opac[g, r] = 1.0 - T
    return color, depth, opac, weights


def _scene(seed=13, R=64, D=6, step=0.025, capacity=None, sigma_scale=4.0):
    o, d = _rays(seed, R=R)
    grid = _grid(seed, 2, D, p=0.6)
    s = rm.march(o, d, grid, BOX_MIN, BOX_MAX, step=step, capacity=capacity, backend="reference")
    rng = np.random.default_rng(seed)
    sigma = rng.exponential(sigma_scale, s.t.shape).astype(F)
    rgb = rng.uniform(size=s.t.shape + (3,)).astype(F)
    bg = rng.uniform(size=(2, R, 3)).astype(F)
    return s, jnp.asarray(sigma), jnp.asarray(rgb), jnp.asarray(bg)


def _random_loss(s, seed=0, with_weights=True):
    G, R = s.ray_start.shape
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    wc, wd, wo = (jax.random.normal(k[0], (G, R, 3)), jax.random.normal(k[1], (G, R)),
                  jax.random.normal(k[2], (G, R)))
    ww = jax.random.normal(k[3], s.t.shape) if with_weights else jnp.zeros(s.t.shape)

    def loss(sigma, rgb, bg, backend):
        out = rm.composite(sigma, rgb, s, bg, backend=backend)
        return (jnp.sum(out.color * wc) + jnp.sum(out.depth * wd) + jnp.sum(out.opacity * wo)
                + jnp.sum(out.weights * ww))

    return loss


def _close(got, want, rtol=1e-5, atol=1e-6, what=""):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_composite_matches_numpy_oracle(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    s, sigma, rgb, bg = _scene()
    want = np_composite(sigma, rgb, s, bg)
    got = rm.composite(sigma, rgb, s, bg, backend=backend)
    for name, a, b in zip(rm.Composite._fields, got, want):
        _close(a, b, rtol=2e-5, atol=2e-6, what=name)
    T_end = 1.0 - want[2]
    assert np.any(T_end < 1e-4) and np.mean((T_end > 0.05) & (T_end < 0.95)) > 0.1  # terminated and partial rays


def test_composite_cpu_kernel_matches_reference(cpu_kernel):
    s, sigma, rgb, bg = _scene(seed=14, R=128, capacity=None)
    ref = jax.jit(lambda a, b, c: rm.composite(a, b, s, c, backend="reference"))(sigma, rgb, bg)
    got = rm.composite(sigma, rgb, s, bg, backend="cpu")
    for name, a, b in zip(rm.Composite._fields, got, ref):
        _close(a, b, what=name)
    assert float(jnp.max(ref.weights)) > 0.1


@pytest.mark.parametrize("with_weights", [False, True])
def test_composite_cpu_kernel_gradients_match_reference_autodiff(cpu_kernel, with_weights):
    s, sigma, rgb, bg = _scene(seed=15, R=96)
    loss = _random_loss(s, with_weights=with_weights)
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(sigma, rgb, bg, "reference")
    got = jax.grad(loss, argnums=(0, 1, 2))(sigma, rgb, bg, "cpu")
    for name, a, b in zip(("sigma", "rgb", "background"), got, want):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0
        _close(a, b, rtol=1e-4, atol=1e-5 * scale, what=name)
    # samples outside any ray get no gradient
    unused = np.asarray(s.ray) < 0
    assert unused.any()
    np.testing.assert_array_equal(np.asarray(got[0])[unused], 0.0)


def test_composite_reference_gradients_by_finite_differences():
    s, sigma, rgb, bg = _scene(seed=16, R=24, step=0.05, sigma_scale=2.0)
    G, R = s.ray_start.shape
    rng = np.random.default_rng(1)
    wc, wd, wo = rng.normal(size=(G, R, 3)), rng.normal(size=(G, R)), rng.normal(size=(G, R))
    ww = rng.normal(size=s.t.shape)

    def np_loss(sig, col, b):
        c, dep, op, w = np_composite(sig, col, s, b)
        return np.sum(c * wc) + np.sum(dep * wd) + np.sum(op * wo) + np.sum(w * ww)

    def loss(sig, col, b):
        out = rm.composite(sig, col, s, b, backend="reference")
        return jnp.sum(out.color * wc) + jnp.sum(out.depth * wd) + jnp.sum(out.opacity * wo) + jnp.sum(
            out.weights * ww)

    g = jax.grad(loss, argnums=(0, 1, 2))(sigma, rgb, bg)
    base = [np.asarray(x, np.float64) for x in (sigma, rgb, bg)]
    used = np.flatnonzero(np.asarray(s.ray).reshape(-1) >= 0)
    eps = 1e-6
    for which, flat_idx in ((0, used[:: max(1, len(used) // 25)]), (1, used[:: max(1, len(used) // 15)] * 3 + 1),
                            (2, np.arange(0, G * R * 3, 7))):
        for i in flat_idx:
            plus = [b.copy() for b in base]
            minus = [b.copy() for b in base]
            plus[which].reshape(-1)[i] += eps
            minus[which].reshape(-1)[i] -= eps
            fd = (np_loss(*plus) - np_loss(*minus)) / (2 * eps)
            assert float(np.asarray(g[which]).reshape(-1)[i]) == pytest.approx(fd, rel=2e-3, abs=2e-4), (which, i)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_composite_early_termination_and_empty_rays(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    # hand-made list: ray 0 has 4 samples with a very dense first one, ray 1 none, ray 2 has 3
    t = jnp.asarray([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.0]])
    ray = jnp.asarray([[0, 0, 0, 0, 2, 2, 2, -1]], jnp.int32)
    delta = jnp.where(ray >= 0, 0.1, 0.0)
    s = rm.Samples(t, delta, ray, jnp.asarray([[0, 4, 4]], jnp.int32), jnp.asarray([[4, 0, 3]], jnp.int32),
                   jnp.asarray([7], jnp.int32), jnp.ones((1, 3), bool))
    sigma = jnp.asarray([[500.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 9.0]])
    rgb = jnp.tile(jnp.asarray([0.2, 0.4, 0.6]), (1, 8, 1))
    bg = jnp.asarray([0.9, 0.8, 0.7])
    out = rm.composite(sigma, rgb, s, bg, backend=backend)
    w = np.asarray(out.weights)[0]
    assert w[0] == pytest.approx(1.0 - math.exp(-50.0))
    np.testing.assert_array_equal(w[1:4], 0.0)  # terminated
    assert w[7] == 0.0  # unused slot
    assert float(out.opacity[0, 0]) == pytest.approx(1.0, abs=1e-6)
    _close(out.color[0, 0], [0.2, 0.4, 0.6], atol=1e-6)
    # the empty ray: background, zero depth and opacity
    np.testing.assert_allclose(out.color[0, 1], bg, atol=0)
    assert float(out.depth[0, 1]) == 0.0 and float(out.opacity[0, 1]) == 0.0
    want = np_composite(sigma, rgb, s, bg)
    for name, a, b in zip(rm.Composite._fields, out, want):
        _close(a, b, rtol=1e-5, atol=1e-6, what=name)
    # zero gradient after termination; min_transmittance=0 never stops
    g = jax.grad(lambda x: jnp.sum(rm.composite(x, rgb, s, bg, backend=backend).depth))(sigma)
    np.testing.assert_array_equal(np.asarray(g)[0, 1:4], 0.0)
    assert float(g[0, 5]) != 0.0
    all_on = rm.composite(sigma, rgb, s, bg, min_transmittance=0.0, backend=backend)
    assert float(all_on.weights[0, 3]) > 0.0
    _close(all_on.weights, np_composite(sigma, rgb, s, bg, min_t=0.0)[3], rtol=1e-5, atol=1e-30)


def test_composite_jit_and_vmap(cpu_kernel):
    s, sigma, rgb, bg = _scene(seed=17, R=40)
    loss = _random_loss(s)
    jg = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    want = jg(sigma, rgb, bg, "reference")
    got = jg(sigma, rgb, bg, "cpu")
    for a, b in zip(got, want):
        _close(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    # vmap over a stack of densities (the samples are shared)
    stack = jnp.stack([sigma, 0.5 * sigma, 2.0 * sigma])
    f = lambda backend: jax.jit(jax.vmap(lambda x: rm.composite(x, rgb, s, bg[0, 0], backend=backend).color))
    _close(f("cpu")(stack), f("reference")(stack))
    gv = lambda backend: jax.vmap(jax.grad(lambda x: jnp.sum(rm.composite(x, rgb, s, bg, backend=backend).depth)))
    _close(gv("cpu")(stack), gv("reference")(stack), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA (GPU machine only; not yet run)


@pytest.mark.gpu
@pytest.mark.parametrize("D,step", [(1, 0.05), (16, 0.0071), (33, 0.013)])
def test_cuda_march_matches_reference_exactly(cuda_kernel, D, step):
    o, d = _rays(20 + D, R=512)
    grid = _grid(D, 2, D)
    want = _march_all(o, d, grid, step, None, "reference")
    _assert_samples_equal(_march_all(o, d, grid, step, None, "cuda"), want, "cuda vs reference")
    C = int(np.min(want.n_samples)) // 2  # overflow
    _assert_samples_equal(_march_all(o, d, grid, step, C, "cuda"), _march_all(o, d, grid, step, C, "reference"),
                          "cuda overflow")
    s = _march_all(o, d, np.zeros_like(grid), step, 0, "cuda")
    np.testing.assert_array_equal(s.n_samples, 0)


@pytest.mark.gpu
def test_cuda_composite_matches_reference(cuda_kernel):
    s, sigma, rgb, bg = _scene(seed=21, R=256)
    ref = rm.composite(sigma, rgb, s, bg, backend="reference")
    got = rm.composite(sigma, rgb, s, bg, backend="cuda")
    for name, a, b in zip(rm.Composite._fields, got, ref):
        _close(a, b, rtol=1e-4, atol=1e-5, what=name)
    loss = _random_loss(s)
    want = jax.grad(loss, argnums=(0, 1, 2))(sigma, rgb, bg, "reference")
    g = jax.grad(loss, argnums=(0, 1, 2))(sigma, rgb, bg, "cuda")
    for a, b in zip(g, want):
        _close(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    stack = jnp.stack([sigma, 2.0 * sigma])
    f = lambda backend: jax.vmap(lambda x: rm.composite(x, rgb, s, bg, backend=backend).color)
    _close(f("cuda")(stack), f("reference")(stack), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Distortion (mip-NeRF 360) of the composite weights.


def _np_distortion(w, s, scale):
    """Per-ray double sum over the stored samples, float64, straight from the definition."""
    w, t, delta = (np.asarray(a, np.float64) for a in (w, s.t, s.delta))
    start, count = np.asarray(s.ray_start), np.asarray(s.ray_count)
    G, R = start.shape
    out = np.zeros((G, R))
    for g in range(G):
        for r in range(R):
            idx = np.arange(start[g, r], start[g, r] + count[g, r])
            wi, ti, di = w[g, idx], t[g, idx] / scale, delta[g, idx] / scale
            out[g, r] = np.sum(wi[:, None] * wi[None] * np.abs(ti[:, None] - ti[None])) + np.sum(wi ** 2 * di) / 3
    return out


def test_distortion_equals_the_double_sum_and_its_gradient():
    s, sigma, rgb, bg = _scene(seed=15, R=48, capacity=None, sigma_scale=1.0)
    w = rm.composite(sigma, rgb, s, bg, backend="reference").weights
    want = _np_distortion(w, s, 0.3)
    assert np.mean(want > 1e-3) > 0.3                                   # rays with spread weight
    _close(rm.distortion(w, s, scale=0.3), want, rtol=1e-4, atol=1e-7)
    _close(jax.jit(lambda a: rm.distortion(a, s, scale=0.3))(w), want, rtol=1e-4, atol=1e-7)

    def brute(a):                                   # the double sum in JAX, per group over all slots
        same = (s.ray[:, :, None] == s.ray[:, None, :]) & (s.ray[:, :, None] >= 0)
        t, d = s.t / 0.3, s.delta / 0.3
        pair = jnp.sum(jnp.where(same, a[:, :, None] * a[:, None] * jnp.abs(t[:, :, None] - t[:, None]), 0), (1, 2))
        return jnp.sum(pair) + jnp.sum(jnp.where(s.ray >= 0, a * a * d, 0)) / 3

    g = jax.grad(lambda a: jnp.sum(rm.distortion(a, s, scale=0.3)))(w)
    _close(g, jax.grad(brute)(w), rtol=1e-4, atol=1e-6)


def test_distortion_of_a_truncated_list_and_of_concentrated_weight():
    s, sigma, rgb, bg = _scene(seed=16, R=32, capacity=256, sigma_scale=1.0)
    assert not bool(jnp.all(s.complete))                                # some rays lost samples
    w = rm.composite(sigma, rgb, s, bg, backend="reference").weights
    _close(rm.distortion(w, s), _np_distortion(w, s, 1.0), rtol=1e-4, atol=1e-7)
    # all weight on one sample: only the w^2 delta / 3 term remains
    one = jnp.zeros_like(w).at[0, int(s.ray_start[0, 0])].set(1.0)
    got = np.asarray(rm.distortion(one, s))
    assert got[0, 0] == pytest.approx(float(s.delta[0, 0]) / 3, rel=1e-6) and np.all(np.delete(got[0], 0) == 0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        rm.distortion(w, s, scale=0.0)
    with pytest.raises(ValueError, match="weights must be"):
        rm.distortion(w[:, :-1], s)
