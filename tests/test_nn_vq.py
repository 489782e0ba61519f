"""Tests for dhjax.nn.vq: quantisation, straight-through gradients, EMA codebook, restarts, modules.

Reference values are computed independently with numpy (float64) inside the tests.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.nn import vq

# Jitted entry points: one compilation per shape instead of op-by-op dispatch.
_quantize = jax.jit(vq.quantize, static_argnames=("beta", "use_ema"))
_ema_update = jax.jit(vq.ema_update, static_argnames=("decay", "eps"))


def _random_problem(seed, lead=(3, 5), num_codes=12, dim=6):
    """Random latents and codebook whose nearest-code assignment has no near ties."""
    rs = np.random.RandomState(seed)
    codebook = rs.normal(size=(num_codes, dim)).astype(np.float32)
    z = rs.normal(size=lead + (dim,)).astype(np.float32)
    d = _np_distances(z, codebook)
    ds = np.sort(d, axis=-1)
    assert np.all(ds[..., 1] - ds[..., 0] > 1e-3), "seed produced a near tie; pick another"
    return z, codebook


def _np_distances(z, codebook):
    z64 = np.asarray(z, np.float64)[..., None, :]
    return np.sum((z64 - np.asarray(codebook, np.float64)) ** 2, axis=-1)


# ----------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------


def test_nearest_code_matches_bruteforce_argmin():
    z, codebook = _random_problem(0, lead=(4, 7), num_codes=32, dim=8)
    expected = np.argmin(_np_distances(z, codebook), axis=-1)
    out = _quantize(z, codebook)
    assert out.indices.dtype == jnp.int32
    assert out.indices.shape == (4, 7)
    np.testing.assert_array_equal(np.asarray(out.indices), expected)
    np.testing.assert_array_equal(np.asarray(vq.nearest_code(z, codebook)), expected)


def test_straight_through_value_and_gradient():
    z, codebook = _random_problem(1)
    w = np.random.RandomState(2).normal(size=z.shape).astype(np.float32)

    def f(z, cb):
        return jnp.sum(w * vq.quantize(z, cb).quantized)

    out = _quantize(z, codebook)
    np.testing.assert_array_equal(np.asarray(out.quantized), codebook[np.asarray(out.indices)])
    np.testing.assert_array_equal(
        np.asarray(vq.lookup_codes(out.indices, codebook)), np.asarray(out.quantized)
    )
    gz, gcb = jax.jit(jax.grad(f, argnums=(0, 1)))(z, codebook)
    np.testing.assert_array_equal(np.asarray(gz), w)  # exact identity
    np.testing.assert_array_equal(np.asarray(gcb), 0.0)


def test_losses_and_usage_match_numpy():
    beta = 0.3
    z, codebook = _random_problem(3, lead=(2, 9), num_codes=10, dim=5)
    out = _quantize(z, codebook, beta=beta)
    idx = np.argmin(_np_distances(z, codebook), axis=-1)
    e = codebook[idx].astype(np.float64)
    mse = np.mean((z - e) ** 2)
    np.testing.assert_allclose(out.codebook_loss, mse, rtol=1e-5)
    np.testing.assert_allclose(out.commitment_loss, beta * mse, rtol=1e-5)
    np.testing.assert_allclose(out.loss, (1 + beta) * mse, rtol=1e-5)

    counts = np.bincount(idx.ravel(), minlength=10).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(out.usage), counts)
    p = counts / counts.sum()
    p = p[p > 0]
    np.testing.assert_allclose(out.perplexity, np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
    # perplexity bounds: uniform use of all codes -> K, a single code -> 1.
    np.testing.assert_allclose(vq.perplexity(jnp.full((7,), 3.0)), 7.0, rtol=1e-6)
    np.testing.assert_allclose(vq.perplexity(jnp.array([0.0, 5.0, 0.0])), 1.0, rtol=1e-6)


def test_loss_gradients_go_to_the_right_place():
    beta = 0.25
    z, codebook = _random_problem(4, lead=(11,), num_codes=6, dim=4)
    idx = np.argmin(_np_distances(z, codebook), axis=-1)
    m, n = z.shape
    diff = z.astype(np.float64) - codebook[idx]  # z - e, [M, n]

    def term(name, use_ema=False):
        return jax.jit(
            jax.grad(
                lambda z, cb: getattr(vq.quantize(z, cb, beta=beta, use_ema=use_ema), name),
                argnums=(0, 1),
            )
        )

    # codebook loss: gradient only to the codebook, d/de mean((z-e)^2) = -2 (z - e) / (M n).
    gz, gcb = term("codebook_loss")(z, codebook)
    np.testing.assert_array_equal(np.asarray(gz), 0.0)
    expected_cb = np.zeros_like(codebook, dtype=np.float64)
    np.add.at(expected_cb, idx, -2.0 * diff / (m * n))
    np.testing.assert_allclose(gcb, expected_cb, rtol=1e-5, atol=1e-7)

    # commitment loss: gradient only to z, 2 beta (z - e) / (M n).
    gz, gcb = term("commitment_loss")(z, codebook)
    np.testing.assert_array_equal(np.asarray(gcb), 0.0)
    np.testing.assert_allclose(gz, 2.0 * beta * diff / (m * n), rtol=1e-5, atol=1e-7)

    # EMA mode: no codebook loss and no codebook gradient at all.
    out = _quantize(z, codebook, beta=beta, use_ema=True)
    assert float(out.codebook_loss) == 0.0
    assert float(out.loss) == float(out.commitment_loss)
    gz, gcb = term("loss", use_ema=True)(z, codebook)
    np.testing.assert_array_equal(np.asarray(gcb), 0.0)
    np.testing.assert_allclose(gz, 2.0 * beta * diff / (m * n), rtol=1e-5, atol=1e-7)


def test_quantize_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=re.escape("(2, 3, 5)") + ".*" + re.escape("(8, 4)")):
        vq.quantize(jnp.zeros((2, 3, 5)), jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="codebook must have shape"):
        vq.quantize(jnp.zeros((2, 4)), jnp.zeros((8, 4, 1)))


# ----------------------------------------------------------------------------------------------
# EMA codebook
# ----------------------------------------------------------------------------------------------


def test_ema_update_matches_hand_computed_numpy():
    decay, eps = 0.9, 1e-3  # a large eps so the Laplace smoothing visibly matters
    codebook = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, -5.0]], np.float32)
    z = np.array([[0.1, -0.1], [0.9, 1.2], [1.1, 0.7], [0.2, 0.0]], np.float32)
    indices = np.array([0, 1, 1, 0], np.int32)
    state = vq.init_ema_state(codebook)
    np.testing.assert_array_equal(np.asarray(state.cluster_size), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(state.embed_sum), codebook)

    new = _ema_update(state, z, indices, decay=decay, eps=eps)

    counts = np.array([2.0, 2.0, 0.0])
    sums = np.array([z[0] + z[3], z[1] + z[2], [0.0, 0.0]], np.float64)
    cs = decay * 1.0 + (1 - decay) * counts
    es = decay * codebook + (1 - decay) * sums
    total = cs.sum()
    smoothed = (cs + eps) / (total + 3 * eps) * total
    np.testing.assert_allclose(new.cluster_size, cs, rtol=1e-6)
    np.testing.assert_allclose(new.embed_sum, es, rtol=1e-6)
    np.testing.assert_allclose(new.codebook, es / smoothed[:, None], rtol=1e-5)
    np.testing.assert_allclose(
        vq.codebook_from_ema(new.cluster_size, new.embed_sum, eps=eps), new.codebook, rtol=1e-6
    )
    # an unused code stays (almost) where it was, thanks to the pseudo-count initialisation
    np.testing.assert_allclose(new.codebook[2], codebook[2], rtol=0.05)


def test_repeated_ema_moves_codes_to_cluster_means():
    rs = np.random.RandomState(5)
    centres = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [-3.0, -3.0, 0.0]])
    data = np.concatenate([c + 0.3 * rs.normal(size=(40, 3)) for c in centres]).astype(np.float32)
    means = np.stack([data[40 * i : 40 * (i + 1)].mean(0) for i in range(4)])
    codebook = (centres + rs.normal(size=centres.shape)).astype(np.float32)  # rough start

    @jax.jit
    def run(state):
        def step(state, _):
            out = vq.quantize(data, state.codebook, use_ema=True)
            return vq.ema_update(state, data, out.indices, decay=0.9), None

        return jax.lax.scan(step, state, None, length=200)[0]

    state = run(vq.init_ema_state(codebook))
    np.testing.assert_allclose(state.codebook, means, atol=1e-4)
    np.testing.assert_allclose(state.cluster_size, 40.0, rtol=1e-4)


def test_ema_update_rejects_mismatched_indices():
    state = vq.init_ema_state(jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=re.escape("(5,)")):
        vq.ema_update(state, jnp.zeros((6, 3)), jnp.zeros((5,), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Dead-code restarts
# ----------------------------------------------------------------------------------------------


def test_usage_ema_update():
    u = vq.update_usage_ema(jnp.array([1.0, 2.0]), jnp.array([3.0, 0.0]), decay=0.75)
    np.testing.assert_allclose(u, [0.75 + 0.75, 1.5], rtol=1e-6)


def test_restart_replaces_only_dead_codes_with_batch_vectors():
    rs = np.random.RandomState(6)
    codebook = rs.normal(size=(8, 4)).astype(np.float32)
    z_flat = (10.0 + rs.normal(size=(20, 4))).astype(np.float32)  # far from every code
    usage = np.array([5.0, 0.0, 3.0, 0.0, 0.0, 0.5, 2.0, 1.0], np.float32)
    restart = jax.jit(functools.partial(vq.restart_dead_codes, threshold=0.75, noise_std=1e-4))
    new, n_restarted = restart(codebook, usage, z_flat, jax.random.key(0))
    new = np.asarray(new)

    dead = usage < 0.75
    assert int(n_restarted) == dead.sum() == 4
    np.testing.assert_array_equal(new[~dead], codebook[~dead])  # used codes untouched
    dist = np.sqrt(_np_distances(new[dead], z_flat))  # [4, 20]
    assert np.all(dist.min(axis=1) < 1e-3)  # each restarted code sits on a batch vector
    assert len(set(dist.argmin(axis=1))) == 4  # on distinct ones (M >= K: no replacement)

    new0, n0 = restart(codebook, np.full(8, 1.0, np.float32), z_flat, jax.random.key(0))
    assert int(n0) == 0
    np.testing.assert_array_equal(np.asarray(new0), codebook)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def test_vector_quantizer_module_train_eval_vmap_and_param_restarts():
    model = vq.VectorQuantizer(num_codes=16, dim=4, restart_threshold=0.5)
    z = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    variables = jax.jit(model.init)(jax.random.key(0), z)
    params, stats = variables["params"], variables["vq_stats"]
    assert params["codebook"].shape == (16, 4)
    assert np.all(np.abs(np.asarray(params["codebook"])) <= 1.0 / 16)
    np.testing.assert_allclose(stats["usage_ema"], 18 / 16)  # uniform share M / K

    @jax.jit
    def train_step(params, stats, z, key):
        def loss_fn(params):
            (q, aux), new = model.apply(
                {"params": params, "vq_stats": stats},
                z,
                train=True,
                mutable=["vq_stats"],
                rngs={"vq": key},
            )
            return aux["loss"], (q, aux, new["vq_stats"])

        (_, (q, aux, new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return q, aux, new, grads

    q, aux, new_stats, grads = train_step(params, stats, z, jax.random.key(5))
    assert q.shape == z.shape and aux["indices"].shape == (2, 3, 3)
    for key in ("loss", "codebook_loss", "commitment_loss", "perplexity"):
        assert aux[key].shape == ()
    expected = _quantize(z, params["codebook"])
    np.testing.assert_array_equal(np.asarray(q), np.asarray(expected.quantized))
    np.testing.assert_array_equal(np.asarray(aux["indices"]), np.asarray(expected.indices))
    np.testing.assert_allclose(aux["loss"], expected.loss, rtol=1e-6)
    np.testing.assert_allclose(
        new_stats["usage_ema"], 0.99 * (18 / 16) + 0.01 * np.asarray(expected.usage), rtol=1e-6
    )
    assert np.abs(np.asarray(grads["codebook"])).sum() > 0  # the codebook parameter learns
    assert int(aux["n_restarted"]) == 0  # every usage EMA is still >= 1.11
    np.testing.assert_array_equal(
        np.asarray(aux["restarted_codebook"]), np.asarray(params["codebook"])
    )

    # a dead code: the restarted codebook comes back in aux for the train step to store
    dead_stats = {"usage_ema": stats["usage_ema"].at[3].set(0.0)}
    _, aux, new_stats, _ = train_step(params, dead_stats, z, jax.random.key(6))
    assert int(aux["n_restarted"]) == 1
    restarted = np.asarray(aux["restarted_codebook"])
    old = np.asarray(params["codebook"])
    np.testing.assert_array_equal(np.delete(restarted, 3, 0), np.delete(old, 3, 0))
    z_flat = np.asarray(z).reshape(-1, 4)
    assert np.sqrt(_np_distances(restarted[3:4], z_flat)).min() < 1e-2
    assert float(new_stats["usage_ema"][3]) >= 0.5  # reset, so not restarted again at once

    # eval mode leaves the statistics alone even when the collection is mutable
    _, eval_stats = jax.jit(lambda v, z: model.apply(v, z, mutable=["vq_stats"]))(variables, z)
    np.testing.assert_array_equal(
        np.asarray(eval_stats["vq_stats"]["usage_ema"]), np.asarray(stats["usage_ema"])
    )

    # vmap over the batch (train=True but immutable stats: no update, no rng needed) gives the
    # same quantisation as the batched call
    qv, auxv = jax.jit(jax.vmap(lambda x: model.apply(variables, x, train=True)))(z)
    np.testing.assert_array_equal(np.asarray(qv), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(auxv["indices"]), np.asarray(expected.indices))
    assert auxv["loss"].shape == (2,)


def test_vector_quantizer_ema_mode_with_restarts():
    model = vq.VectorQuantizer(num_codes=8, dim=3, use_ema=True, restart_threshold=0.5)
    z = 5.0 + jax.random.normal(jax.random.key(1), (4, 6, 3))
    variables = jax.jit(model.init)(jax.random.key(0), z)
    assert "params" not in variables  # EMA codebook is a statistic, not a parameter
    stats = variables["vq_stats"]
    assert set(stats) == {"usage_ema", "codebook", "cluster_size", "embed_sum"}
    # usage starts at M / K = 3 per code; codes 1 and 4 are made dead by hand
    stats = {**stats, "usage_ema": stats["usage_ema"].at[jnp.array([1, 4])].set(0.0)}

    @jax.jit
    def train_step(stats, z, key):
        return model.apply(
            {"vq_stats": stats}, z, train=True, mutable=["vq_stats"], rngs={"vq": key}
        )

    (q, aux), new = train_step(stats, z, jax.random.key(2))
    new = new["vq_stats"]
    assert q.shape == z.shape
    assert float(aux["loss"]) == float(aux["commitment_loss"])
    assert "restarted_codebook" not in aux  # applied to the stored codebook directly
    assert int(aux["n_restarted"]) == 2
    assert np.all(np.asarray(new["usage_ema"])[[1, 4]] >= 0.5)  # not restarted again at once

    # the other codes got exactly the plain EMA update
    state = vq.EMAState(stats["cluster_size"], stats["embed_sum"], stats["codebook"])
    expected = _ema_update(state, z, aux["indices"], decay=model.ema_decay)
    cb = np.asarray(new["codebook"])
    keep = np.array([0, 2, 3, 5, 6, 7])
    np.testing.assert_allclose(cb[keep], np.asarray(expected.codebook)[keep], rtol=1e-6)
    # codes 1 and 4 now sit on batch vectors (near 5, far from the +-1/K initial codebook)
    z_flat = np.asarray(z).reshape(-1, 3)
    assert np.sqrt(_np_distances(cb[[1, 4]], z_flat)).min(axis=1).max() < 1e-2
    # and their EMA statistics agree with them, so the next update keeps them in place
    np.testing.assert_allclose(
        np.asarray(new["embed_sum"])[[1, 4]] / np.asarray(new["cluster_size"])[[1, 4], None],
        cb[[1, 4]],
        rtol=1e-5,
    )


def test_vector_quantizer_rejects_wrong_last_dim():
    model = vq.VectorQuantizer(num_codes=16, dim=4)
    with pytest.raises(ValueError, match=re.escape("(2, 5, 3)") + ".*" + re.escape("(16, 4)")
                       + "|" + re.escape("(16, 4)") + ".*" + re.escape("(2, 5, 3)")):
        model.init(jax.random.key(0), jnp.zeros((2, 5, 3)))


def test_code_transformer_identity_at_init_and_bidirectional_after_perturbation():
    model = vq.CodeTransformer(dim=16, num_layers=2, num_heads=4)
    codes = np.random.RandomState(0).normal(size=(2, 3, 4, 8)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(1), codes)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(np.asarray(apply(params, codes)), np.asarray(codes))

    rs = np.random.RandomState(2)  # numpy noise: no per-shape compilation of random ops
    perturbed = jax.tree.map(
        lambda p: np.asarray(p) + np.float32(0.1) * rs.normal(size=p.shape).astype(np.float32),
        params,
    )
    out = apply(perturbed, codes)
    assert out.shape == codes.shape
    assert np.abs(np.asarray(out - codes)).max() > 1e-3

    # non-causal: changing the last grid position changes the output at the first one
    codes2 = codes.copy()
    codes2[:, -1, -1] += 1.0
    out2 = apply(perturbed, codes2)
    assert np.abs(np.asarray(out2[:, 0, 0] - out[:, 0, 0])).max() > 1e-5

    # zero layers: exactly the identity, no parameters
    ident = vq.CodeTransformer(dim=16, num_layers=0)
    v = ident.init(jax.random.key(0), codes)
    assert not jax.tree.leaves(v)
    np.testing.assert_array_equal(np.asarray(ident.apply(v, codes)), np.asarray(codes))
