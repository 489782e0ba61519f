"""Tests of dhjax.ops.hashgrid: the reference against an independent loop-based numpy version of
tiny-cuda-nn's formula, the kernels against the reference (values and gradients), finite
differences, jit/vmap, the table helpers and the dtype rules."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.ops import _ffi
from kernel_common import need_kernel
from dhjax.ops import hashgrid as hg

# Small grids with dense levels (one with R^3 not a multiple of 8), hashed levels and a scale
# that is not a power of two; F = 2 (tcnn's default) and F = 4.
CFG = hg.HashGridConfig(n_levels=6, n_features_per_level=2, log2_hashmap_size=11, base_resolution=5,
                        per_level_scale=1.9)
CFG4 = hg.HashGridConfig(n_levels=4, n_features_per_level=4, log2_hashmap_size=9, base_resolution=3,
                         per_level_scale=2.3)


# ---------------------------------------------------------------------------------------------
# An independent implementation, written from tiny-cuda-nn's grid.h semantics with Python ints
# and explicit loops (different code from the library on purpose).

def tcnn_oracle(points, table, n_levels, n_feat, log2_t, base, b, dtype=np.float32):
    points = np.asarray(points, np.float64)
    table = np.asarray(table, np.float64)
    n = points.shape[0]
    out = np.zeros((n, n_levels * n_feat), np.float64)
    log2_b = np.log2(np.float32(b))  # float32 ops, as tcnn's exp2f(l * std::log2(float b)) * N_min - 1
    for level in range(n_levels):
        scale = float(np.exp2(np.float32(level) * log2_b) * np.float32(base) - np.float32(1.0))
        res = math.ceil(scale) + 1
        params = res ** 3
        params = ((params + 7) // 8) * 8
        hashmap_size = min(params, 2 ** log2_t)
        for i in range(n):
            frac, cell = [], []
            for d in range(3):
                if dtype == np.float32:  # fmaf(scale, x, 0.5f): exact product (in double), one rounding
                    p = float(np.float32(float(np.float32(points[i, d])) * scale + 0.5))
                else:
                    p = points[i, d] * scale + 0.5
                g = math.floor(p)
                frac.append(p - g)
                cell.append(g)
            for corner in itertools.product((0, 1), repeat=3):
                weight = 1.0
                local = []
                for d in range(3):
                    weight *= frac[d] if corner[d] else 1.0 - frac[d]
                    local.append((cell[d] + corner[d]) % 2 ** 32)
                stride, index, dim = 1, 0, 0
                while dim < 3 and stride <= hashmap_size:
                    index = (index + local[dim] * stride) % 2 ** 32
                    stride *= res
                    dim += 1
                if hashmap_size < stride:
                    index = 0
                    for d, prime in enumerate((1, 2654435761, 805459861)):
                        index ^= (local[d] * prime) % 2 ** 32
                row = index % hashmap_size
                out[i, level * n_feat:(level + 1) * n_feat] += weight * table[level, row]
    return out


def _oracle(points, table, cfg, dtype=np.float32):
    return tcnn_oracle(points, table, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size,
                       cfg.base_resolution, cfg.per_level_scale, dtype)


def _table(cfg, seed=0, dtype=jnp.float32):
    return jax.random.uniform(jax.random.PRNGKey(seed), cfg.table_shape, jnp.float32, -1.0, 1.0).astype(dtype)


def _points(n, seed=1):
    x = np.array(jax.random.uniform(jax.random.PRNGKey(seed), (n, 3)))
    # corners and faces of the unit cube: x = 1 reaches the wrap-around vertex of dense levels
    x[:4] = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.3, 0.0], [0.5, 1.0, 0.25]]
    return jnp.asarray(x, jnp.float32)


def _require(platform):
    need_kernel(_ffi.register("hashgrid", platform, hg._TARGETS[platform]), f"the {platform} hash-grid kernel")
    return platform


@pytest.fixture
def cpu_kernel():
    return _require("cpu")


@pytest.fixture
def cuda_kernel():
    return _require("cuda")


# Jitted reference (compiled once per config and shape: eager op-by-op dispatch is slow).
ref = jax.jit(hg.hash_encode_reference, static_argnums=2)


@functools.partial(jax.jit, static_argnums=3)
def ref_grads(x, t, w, cfg):
    return jax.grad(lambda x, t: jnp.sum(w * hg.hash_encode_reference(x, t, cfg)), argnums=(0, 1))(x, t)


def _loss(backend, cfg, weights):
    def f(x, t):
        return jnp.sum(weights * hg.hash_encode(x, t, cfg, backend=backend))
    return f


# ---------------------------------------------------------------------------------------------
# Level layout and helpers


def test_level_constants_match_tcnn_defaults():
    cfg = hg.HashGridConfig()  # tcnn defaults: 16 levels, 2 features, T = 2^19, N_min 16, b = 2
    np.testing.assert_array_equal(hg.level_scales(cfg)[:4], [15, 31, 63, 127])
    np.testing.assert_array_equal(hg.level_resolutions(cfg)[:4], [16, 32, 64, 128])
    np.testing.assert_array_equal(hg.level_sizes(cfg)[:4], [4096, 32768, 262144, 2 ** 19])
    np.testing.assert_array_equal(hg.level_is_dense(cfg)[:4], [True, True, True, False])
    assert cfg.n_output_dims == 32 and cfg.table_shape == (16, 2 ** 19, 2)
    # the float32 scales follow the formula 2^(l log2 b) N_min - 1 (b as a float32, as tcnn); log2(b)
    # rounded to float32 and multiplied by l moves the finer scales by a few ulp, so 1e-6 relative
    for c in (CFG, CFG4, hg.HashGridConfig(per_level_scale=1.3819)):
        b32 = float(np.float32(c.per_level_scale))
        exact = 2.0 ** (np.arange(c.n_levels) * math.log2(b32)) * c.base_resolution - 1.0
        np.testing.assert_allclose(hg.level_scales(c), exact, rtol=1e-6, atol=0)
    # level 1 of CFG: s = 5 * 1.9 - 1 = 8.5 -> R = 10, 1000 vertices (a multiple of 8)
    assert hg.level_resolutions(CFG)[1] == 10 and hg.level_sizes(CFG)[1] == 1000
    # level 0 of CFG4: R = 3, 27 vertices -> 32 rows (next multiple of 8), dense
    assert hg.level_sizes(CFG4)[0] == 32 and hg.level_is_dense(CFG4)[0]


def test_per_level_scale_for_insta():
    b = hg.per_level_scale_for(2048, 16, 16)
    assert b == pytest.approx(2 ** (7 / 15), rel=1e-12)
    cfg = hg.HashGridConfig(per_level_scale=b)
    assert hg.level_resolutions(cfg)[-1] == 2048  # 16 * b^15 - 1 = 2047 -> 2048 vertices
    assert hg.per_level_scale_for(64, 16, 1) == 1.0


def test_init_table_like_tcnn():
    t = hg.init_table(jax.random.PRNGKey(0), CFG)
    assert t.shape == CFG.table_shape and t.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(t))) <= 1e-4 and float(jnp.std(t)) > 5e-5
    assert hg.init_table(jax.random.PRNGKey(0), CFG, jnp.float16).dtype == jnp.float16


def test_tcnn_params_round_trip():
    t = _table(CFG)
    flat = hg.to_tcnn_params(t, CFG)
    assert flat.shape == (int(hg.level_sizes(CFG).sum()) * 2,)
    back = hg.from_tcnn_params(flat, CFG)
    x = _points(64)
    np.testing.assert_array_equal(ref(x, back, CFG), ref(x, t, CFG))
    unused = np.asarray(back[1, hg.level_sizes(CFG)[1]:])
    assert unused.size and not unused.any()


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        hg.hash_encode(_points(4), jnp.zeros((6, 100, 2)), CFG)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        hg.hash_encode(jnp.zeros((4, 2)), _table(CFG), CFG)
    with pytest.raises(ValueError):
        hg.HashGridConfig(n_levels=33)


# ---------------------------------------------------------------------------------------------
# Reference against the independent oracle


@pytest.mark.parametrize("cfg", [CFG, CFG4], ids=["F2", "F4"])
def test_reference_matches_tcnn_oracle(cfg):
    x, t = _points(48), _table(cfg)
    want = _oracle(x, t, cfg)
    got = ref(x, t, cfg)
    assert got.shape == (48, cfg.n_output_dims)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_configs_exercise_dense_and_hashed_levels():
    # the oracle comparisons above cover both index rules only if both occur
    for cfg in (CFG, CFG4):
        dense = hg.level_is_dense(cfg)
        assert dense.any() and not dense.all()


def test_reference_leading_dims():
    x, t = _points(24), _table(CFG)
    flat = ref(x, t, CFG)
    np.testing.assert_array_equal(ref(x.reshape(2, 3, 4, 3), t, CFG), flat.reshape(2, 3, 4, 12))


# ---------------------------------------------------------------------------------------------
# CPU kernel against the reference


@pytest.mark.parametrize("cfg", [CFG, CFG4], ids=["F2", "F4"])
def test_cpu_kernel_values(cpu_kernel, cfg):
    x, t = _points(3000), _table(cfg)
    got = hg.hash_encode(x, t, cfg, backend="cpu")
    np.testing.assert_allclose(got, ref(x, t, cfg), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got[:40], _oracle(x[:40], t, cfg), atol=2e-6, rtol=0)


@pytest.mark.parametrize("cfg", [CFG, CFG4], ids=["F2", "F4"])
def test_cpu_kernel_gradients(cpu_kernel, cfg):
    x, t = _points(2000), _table(cfg)
    w = jax.random.normal(jax.random.PRNGKey(3), (2000, cfg.n_output_dims))
    gx_r, gt_r = ref_grads(x, t, w, cfg)
    gx_k, gt_k = jax.grad(_loss("cpu", cfg, w), argnums=(0, 1))(x, t)
    np.testing.assert_allclose(gt_k, gt_r, atol=1e-5, rtol=1e-5)
    scale = float(jnp.max(jnp.abs(gx_r)))
    np.testing.assert_allclose(gx_k, gx_r, atol=1e-5 * scale, rtol=1e-5)
    # table-only gradient (points not perturbed: the kernel skips the points pass)
    np.testing.assert_allclose(jax.grad(_loss("cpu", cfg, w), argnums=1)(x, t), gt_r, atol=1e-5, rtol=1e-5)
    # points-only gradient
    np.testing.assert_allclose(jax.grad(_loss("cpu", cfg, w), argnums=0)(x, t), gx_r, atol=1e-5 * scale, rtol=1e-5)


def test_cpu_kernel_points_grad_off(cpu_kernel):
    x, t = _points(256), _table(CFG)
    w = jax.random.normal(jax.random.PRNGKey(3), (256, 12))
    f = lambda x, t: jnp.sum(w * hg.hash_encode(x, t, CFG, backend="cpu", points_grad=False))
    gx, gt = jax.grad(f, argnums=(0, 1))(x, t)
    assert not np.asarray(gx).any()
    np.testing.assert_allclose(gt, ref_grads(x, t, w, CFG)[1], atol=1e-5, rtol=1e-5)


def test_cpu_kernel_deterministic_for_any_thread_count(cpu_kernel, monkeypatch):
    x, t = _points(5000), _table(CFG)
    w = jax.random.normal(jax.random.PRNGKey(4), (5000, 12))
    grads = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("DHJAX_NUM_THREADS", threads)
        grads.append(jax.grad(_loss("cpu", CFG, w), argnums=(0, 1))(x, t))
    for gx, gt in grads[1:]:
        np.testing.assert_array_equal(gx, grads[0][0])
        np.testing.assert_array_equal(gt, grads[0][1])


# Finite differences, in float64 on the oracle: the encoding is linear in the table and, inside
# a cell, linear along each coordinate, so central differences are exact up to rounding when the
# step does not cross a cell boundary at any level (points where it would are skipped).


def _fd_gradients(backend, cfg):
    x, t = _points(40, seed=5), _table(cfg, seed=6)
    x = x.at[:4].set(jnp.array([[0.11, 0.52, 0.93], [0.3, 0.7, 0.2], [0.6, 0.4, 0.8], [0.9, 0.1, 0.5]]))
    w = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (40, cfg.n_output_dims)), np.float64)
    gx, gt = jax.jit(jax.grad(_loss(backend, cfg, jnp.asarray(w, jnp.float32)), argnums=(0, 1)))(x, t)
    xs, ts = np.asarray(x, np.float64), np.asarray(t, np.float64)
    loss = lambda xx, tt: np.sum(w * _oracle(xx, tt, cfg, dtype=np.float64), axis=1)  # per point
    h = 1e-5
    scales = hg.level_scales(cfg).astype(np.float64)
    checked = 0
    for d in range(3):
        xp, xm = xs.copy(), xs.copy()
        xp[:, d] += h
        xm[:, d] -= h
        fd = (loss(xp, ts) - loss(xm, ts)) / (2 * h)
        same_cell = np.all(np.floor(xp[:, d, None] * scales + 0.5) == np.floor(xm[:, d, None] * scales + 0.5), axis=1)
        np.testing.assert_allclose(np.asarray(gx)[same_cell, d], fd[same_cell], rtol=1e-3, atol=1e-3)
        checked += int(same_cell.sum())
    assert checked > 100
    # table: a few used entries of every level, chosen where the gradient is largest
    gt = np.asarray(gt)
    for level in range(cfg.n_levels):
        rows, feats = np.unravel_index(np.argsort(-np.abs(gt[level]).ravel())[:3], gt[level].shape)
        for r, f in zip(rows, feats):
            tp, tm = ts.copy(), ts.copy()
            tp[level, r, f] += 0.5
            tm[level, r, f] -= 0.5
            fd = (loss(xs, tp).sum() - loss(xs, tm).sum()) / 1.0
            assert abs(fd) > 1e-3
            assert gt[level, r, f] == pytest.approx(fd, rel=1e-4, abs=1e-5)


def test_reference_gradients_by_finite_differences():
    _fd_gradients("reference", CFG)


def test_cpu_kernel_gradients_by_finite_differences(cpu_kernel):
    _fd_gradients("cpu", CFG)


# ---------------------------------------------------------------------------------------------
# jit and vmap


def test_cpu_kernel_jit_and_vmap(cpu_kernel):
    t = _table(CFG)
    xb = jax.random.uniform(jax.random.PRNGKey(8), (3, 2, 50, 3))
    want = ref(xb, t, CFG)
    enc = jax.jit(lambda x, t: hg.hash_encode(x, t, CFG, backend="cpu"))
    np.testing.assert_allclose(enc(xb, t), want, atol=1e-6)
    # vmap over points (nested), over tables, over both
    v_pts = jax.vmap(jax.vmap(lambda x: hg.hash_encode(x, t, CFG, backend="cpu")))(xb)
    np.testing.assert_allclose(v_pts, want, atol=1e-6)
    tb = jnp.stack([t, -2.0 * t, t[::-1]])
    v_tab = jax.vmap(lambda tt: hg.hash_encode(xb[0, 0], tt, CFG, backend="cpu"))(tb)
    v_tab_ref = jax.vmap(lambda tt: ref(xb[0, 0], tt, CFG))(tb)
    np.testing.assert_allclose(v_tab, v_tab_ref, atol=1e-6)
    v_both = jax.jit(jax.vmap(lambda x, tt: hg.hash_encode(x, tt, CFG, backend="cpu")))(xb[:, 0], tb)
    v_both_ref = jax.vmap(lambda x, tt: ref(x, tt, CFG))(xb[:, 0], tb)
    np.testing.assert_allclose(v_both, v_both_ref, atol=1e-6)


def test_cpu_kernel_vmap_of_grad_and_grad_of_vmap(cpu_kernel):
    t = _table(CFG)
    xb = jax.random.uniform(jax.random.PRNGKey(9), (3, 40, 3))
    w = jax.random.normal(jax.random.PRNGKey(10), (40, 12))
    per_example = lambda b: jax.jit(jax.vmap(jax.grad(_loss(b, CFG, w), argnums=(0, 1)), in_axes=(0, None)))
    gx_k, gt_k = per_example("cpu")(xb, t)
    gx_r, gt_r = per_example("reference")(xb, t)
    assert gt_k.shape == (3,) + CFG.table_shape
    np.testing.assert_allclose(gt_k, gt_r, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx_k, gx_r, atol=1e-5 * float(jnp.max(jnp.abs(gx_r))), rtol=1e-5)
    summed = lambda b: jax.grad(lambda x, t: jnp.sum(jax.vmap(lambda xx: _loss(b, CFG, w)(xx, t))(x)), argnums=1)
    np.testing.assert_allclose(summed("cpu")(xb, t), gt_r.sum(0), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# dtype rules


def test_half_table_on_cpu(cpu_kernel):
    x, t16 = _points(100), _table(CFG, dtype=jnp.float16)
    with pytest.raises(TypeError, match="float32"):
        hg.hash_encode(x, t16, CFG, backend="cpu")
    if jax.default_backend() == "cpu":
        out = hg.hash_encode(x, t16, CFG, backend="auto")  # runs the reference in float32
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref(x, t16.astype(jnp.float32), CFG), atol=1e-6)


def test_reference_half_table_gradient_dtype():
    x, t16 = _points(50), _table(CFG, dtype=jnp.float16)
    g = jax.jit(jax.grad(lambda t: jnp.sum(hg.hash_encode(x, t, CFG, backend="reference"))))(t16)
    assert g.dtype == jnp.float16


# ---------------------------------------------------------------------------------------------
# CUDA kernel (GPU machine only)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [CFG, CFG4, hg.HashGridConfig()], ids=["F2", "F4", "tcnn_default"])
def test_cuda_kernel_matches_reference(cuda_kernel, cfg):
    n = 20000
    x, t = _points(n), _table(cfg)
    w = jax.random.normal(jax.random.PRNGKey(11), (n, cfg.n_output_dims))
    np.testing.assert_allclose(hg.hash_encode(x, t, cfg, backend="cuda"), ref(x, t, cfg),
                               atol=2e-6, rtol=0)
    gx_r, gt_r = ref_grads(x, t, w, cfg)
    gx_k, gt_k = jax.grad(_loss("cuda", cfg, w), argnums=(0, 1))(x, t)
    np.testing.assert_allclose(gt_k, gt_r, atol=1e-4, rtol=1e-4)
    scale = float(jnp.max(jnp.abs(gx_r)))
    np.testing.assert_allclose(gx_k, gx_r, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_vmap(cuda_kernel):
    t = _table(CFG)
    xb = jax.random.uniform(jax.random.PRNGKey(12), (3, 500, 3))
    tb = jnp.stack([t, -t, 0.5 * t])
    got = jax.jit(jax.vmap(lambda x, tt: hg.hash_encode(x, tt, CFG, backend="cuda")))(xb, tb)
    np.testing.assert_allclose(got, jax.vmap(lambda x, tt: ref(x, tt, CFG))(xb, tb), atol=2e-6)
    w = jax.random.normal(jax.random.PRNGKey(13), (500, 12))
    gk = jax.vmap(jax.grad(_loss("cuda", CFG, w), argnums=1), in_axes=(0, None))(xb, t)
    gr = jax.jit(jax.vmap(jax.grad(_loss("reference", CFG, w), argnums=1), in_axes=(0, None)))(xb, t)
    np.testing.assert_allclose(gk, gr, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_kernel_half_table(cuda_kernel):
    n = 20000
    x, t16 = _points(n), _table(CFG, dtype=jnp.float16)
    w = jax.random.normal(jax.random.PRNGKey(14), (n, 12))
    out = hg.hash_encode(x, t16, CFG, backend="cuda")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(x, t16.astype(jnp.float32), CFG), atol=2e-6)
    gx, gt = jax.grad(_loss("cuda", CFG, w), argnums=(0, 1))(x, t16)
    assert gt.dtype == jnp.float16
    gx_r, gt_r = ref_grads(x, t16.astype(jnp.float32), w, CFG)
    # f32 accumulation, one rounding to f16 at the end
    np.testing.assert_allclose(np.asarray(gt, np.float32), gt_r, rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(gx, gx_r, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(gx_r))))
