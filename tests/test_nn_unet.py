"""Tests for dhjax.nn.unet: ModulatedConv against a naive per-example conv, StyleUNet shapes,
initial output, styles, gradients, size checks and batch independence."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.nn import unet


# Flax initialisation with the default threefry key compiles slowly on CPU (~1 s per initialiser
# shape); an RBG key draws the same distributions and compiles in a fraction of that.
def _key(seed):
    return jax.random.key(seed, impl="rbg")


def _numpy_params(module, *args, seed=0):
    """Parameters of `module` with the shapes of its init, filled from numpy (no jax.random)."""
    shapes = jax.eval_shape(module.init, _key(0), *args)["params"]
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rs.normal(size=s.shape), s.dtype), shapes)


def _naive_modulated(params, x, style, *, demodulate, up, kernel, eps=1e-8):
    """Reference: build each example's own modulated/demodulated weight and convolve it alone."""
    w = params["kernel"]
    k, _, c_in, _ = w.shape
    w = w / math.sqrt(k * k * c_in)
    s = style @ params["affine"]["kernel"] + params["affine"]["bias"]  # [B, C_in]
    if up:
        x = unet.upsample2(x, "bilinear")
    outs = []
    for b in range(x.shape[0]):
        wb = w * s[b][None, None, :, None]
        if demodulate:
            wb = wb / jnp.sqrt(jnp.sum(wb ** 2, axis=(0, 1, 2), keepdims=True) + eps)
        yb = jax.lax.conv_general_dilated(
            x[b:b + 1], wb, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST)
        outs.append(yb[0])
    return jnp.stack(outs) + params["bias"]


@pytest.mark.parametrize("demodulate,up,kernel", [
    (True, False, 3), (True, True, 3), (False, False, 3), (True, False, 1)])
def test_modulated_conv_matches_naive(demodulate, up, kernel):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.normal(size=(3, 8, 8, 5)), jnp.float32)
    style = jnp.asarray(rs.normal(size=(3, 7)), jnp.float32)
    mod = unet.ModulatedConv(6, kernel=kernel, demodulate=demodulate, up=up)
    # Random values everywhere (bias and affine bias included), so every term is exercised.
    params = _numpy_params(mod, x, style, seed=1)
    got = jax.jit(mod.apply)({"params": params}, x, style)
    want = _naive_modulated(params, x, style, demodulate=demodulate, up=up, kernel=kernel)
    assert got.shape == (3, 16 if up else 8, 16 if up else 8, 6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,widths", [(32, (8, 16, 16)), (64, (8, 16, 16)),
                                         (32, (8, 16, 16, 16)), (64, (8, 16, 16, 16))])
def test_output_shape(size, widths):
    net = unet.StyleUNet(out_features=11, widths=widths, style_dim=16)
    x = jax.ShapeDtypeStruct((2, size, size, 9), jnp.float32)
    variables = jax.eval_shape(net.init, _key(1), x)
    out = jax.eval_shape(net.apply, variables, x)
    assert out.shape == (2, size, size, 11) and out.dtype == jnp.float32


@pytest.fixture(scope="module")
def small_net():
    """One small 3-level network with 3 styles, initialised once and shared (one compilation)."""
    net = unet.StyleUNet(out_features=11, widths=(8, 16, 16), style_dim=16, n_styles=3)
    x = jnp.asarray(np.random.RandomState(0).normal(size=(3, 16, 16, 9)), jnp.float32)
    idx = jnp.arange(3)
    params = jax.jit(net.init)(_key(1), x, idx)["params"]
    apply = jax.jit(lambda p, x, i: net.apply({"params": p}, x, i))
    return net, params, apply, x, idx


def test_near_zero_initial_output(small_net):
    _, params, apply, x, idx = small_net
    out = apply(params, x, idx)
    assert np.all(np.isfinite(out))
    # Head weights ~ N(0, 1e-6 / fan_in): outputs of order 1e-3, far from the unit-scale inputs.
    assert float(jnp.max(jnp.abs(out))) < 2e-2
    assert float(jnp.std(out)) > 0


def test_different_styles_differ(small_net):
    net, params, apply, x, _ = small_net
    same = jnp.repeat(x[:1], 3, axis=0)  # one input, three styles
    out = apply(params, same, jnp.arange(3))
    scale = float(jnp.max(jnp.abs(out)))
    for i in range(3):
        for j in range(i + 1, 3):
            assert float(jnp.max(jnp.abs(out[i] - out[j]))) > 1e-2 * scale
    # The default style index is 0.
    out_default = jax.jit(lambda p, x: net.apply({"params": p}, x))(params, same)
    np.testing.assert_allclose(np.asarray(out_default), np.asarray(out[:1].repeat(3, 0)),
                               atol=1e-6)
    with pytest.raises(ValueError, match="style_index"):
        net.apply({"params": params}, x, jnp.array([0, 1, 3]))
    with pytest.raises(ValueError, match="style_index"):
        net.apply({"params": params}, x, jnp.array([0, 1]))


def test_gradients_finite_and_nonzero(small_net):
    net, params, _, x, idx = small_net
    target = jnp.asarray(np.random.RandomState(2).normal(size=x.shape[:3] + (11,)), jnp.float32)

    @jax.jit
    def loss(p):
        return jnp.sum((net.apply({"params": p}, x, idx) - target) ** 2)

    grads = jax.grad(loss)(params)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == len(jax.tree_util.tree_leaves(params))
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        assert float(jnp.max(jnp.abs(g))) > 0, name


@pytest.mark.parametrize("size,widths", [(36, (8, 16, 16, 16)), (30, (8, 16, 16))])
def test_size_not_divisible_raises(size, widths):
    net = unet.StyleUNet(out_features=3, widths=widths, style_dim=8)
    x = jnp.zeros((1, size, size, 4))
    with pytest.raises(ValueError, match=f"{size}x{size}"):
        jax.eval_shape(net.init, _key(0), x)


def test_batch_independence_under_jit(small_net):
    _, params, apply, x, idx = small_net
    a = apply(params, x, idx)
    x2 = np.array(x)
    x2[1] = 10.0 * np.random.RandomState(3).normal(size=x.shape[1:])
    b = apply(params, x2, idx)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))
    assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 0


def test_parameter_count():
    net = unet.StyleUNet(out_features=11, widths=(8, 16), style_dim=4)
    params = jax.eval_shape(net.init, _key(0), jnp.zeros((1, 8, 8, 9)))["params"]
    n = unet.parameter_count(params)
    # style 4 + mapping 2*(4*4+4) + conv_in 3*3*9*8+8 + down1 3*3*8*16+16 + enc1 3*3*16*16+16
    # + bottleneck (9*16*16 + 4*16+16 + 16) + up0 (9*16*8 + 4*16+16 + 8)
    # + dec0 (9*16*8 + 4*16+16 + 8) + head 8*11+11
    want = (4 + 2 * 20 + (648 + 8) + (1152 + 16) + (2304 + 16) + (2304 + 80 + 16)
            + (1152 + 80 + 8) + (1152 + 80 + 8) + (88 + 11))
    assert n == want
