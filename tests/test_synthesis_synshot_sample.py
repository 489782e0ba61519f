"""Tests for dhjax.synthesis.synshot_sample: the code transformer is causal, its loss is the
cross-entropy of its logits (numpy reference), it learns a deterministic code set far below the
unigram entropy and greedy sampling reproduces it, sampling settings are checked, an end-to-end
run on a micro prior writes its picture, metrics and resumes, and bad priors are refused.

The micro prior of the end-to-end test is not trained: its folder is the prior's tiny config at
the toy sizes of tests/test_synthesis_synshot.py (`tiny_model_config`) on the one-item folder
dataset of tests/test_bench_synshot.py (`_write_folder`, its train split copied as the test split),
with a checkpoint of the network's initial state; what is tested (codes, training the
transformer, decoding and rendering sampled codes, resume) does not depend on the prior's quality.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dhjax.synthesis import synshot, synshot_data
from dhjax.synthesis import synshot_sample as ss
from dhjax.train import checkpoint as ckpt_lib
from dhjax.train import config as config_lib
from test_bench_synshot import _write_folder
from test_synthesis_synshot import tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8
GRID = (2, 2)


def _model(**over):
    kw = dict(num_codes=K, grid=GRID, width=32, num_layers=2, num_heads=4)
    kw.update(over)
    return ss.CodePrior(**kw)


def _config(name, variant, **overrides):
    return config_lib.apply_overrides(config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py:{variant}")),
                                      overrides)


def test_transformer_is_causal():
    model = _model()
    L = model.length
    codes = jnp.asarray(np.random.default_rng(0).integers(0, K, (3, L)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), codes)["params"]
    f = jax.jit(lambda c: model.apply({"params": params}, c))
    base = np.asarray(f(codes))
    assert base.shape == (3, L, K)
    for t in (0, 3, 5, L - 1):
        changed = np.asarray(f(codes.at[:, t].set((codes[:, t] + 1) % K)))
        np.testing.assert_array_equal(changed[:, :t + 1], base[:, :t + 1])     # exactly
        if t + 1 < L:
            assert np.abs(changed[:, t + 1:] - base[:, t + 1:]).max(axis=(0, 2)).min() > 1e-6


def test_loss_equals_numpy_cross_entropy():
    model = _model()
    L = model.length
    codes = np.random.default_rng(1).integers(0, K, (4, L)).astype(np.int32)
    params = model.init(jax.random.PRNGKey(1), codes)["params"]
    # a random head so the logits are far from uniform
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
    loss, m = jax.jit(lambda p, c: ss.loss_fn(p, c, model))(params, codes)
    logits = np.asarray(model.apply({"params": params}, codes), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, codes[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["nll_id"]), nll[:, :L // 2].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["nll_expr"]), nll[:, L // 2:].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), np.mean(logits.argmax(-1) == codes), rtol=1e-6)
    assert float(loss) > 0.5                      # not a degenerate (near-zero) comparison


def _train(model, sequences, steps, lr=3e-3, batch=8):
    init, step, evaluate = ss.method_functions(model, ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.99,
                                                                                     clip=1.0)))
    data = ss.CodeData(sequences, batch, seed=0)
    state = init(jax.random.PRNGKey(0), data.get_batch(0))
    step = jax.jit(step)
    for i in range(steps):
        state, _ = step(state, data.get_batch(i), None)
    return state, evaluate


def test_training_learns_two_patterns_and_greedy_sampling_reproduces_one():
    model = _model()
    L = model.length
    rng = np.random.default_rng(3)
    a = rng.permutation(K)[:L // 2].tolist() * 2     # id codes, then expr codes
    b = [(x + 3) % K for x in a]
    patterns = np.array([a, b], np.int32)
    sequences = patterns[np.arange(64) % 2]
    state, evaluate = _train(model, sequences, 250)
    held = ss.heldout_nll(state["params"], model, patterns)
    uni = ss.unigram_baseline(sequences, patterns, K)
    assert uni["entropy"] > 1.0                       # many codes in use: a hard unigram baseline
    # only the first code is uncertain: the ideal is log(2) / L = 0.087 nats per token
    assert held["nll_per_token"] < 0.2 * uni["entropy"], (held, uni)
    ids, exprs = ss.sample(state["params"], jax.random.PRNGKey(5), 6, 1e-3, 1, model=model)
    seq = ss.codes_to_sequence(ids, exprs)
    assert ids.shape == (6,) + GRID and exprs.shape == (6,) + GRID
    for row in seq:
        assert any(np.array_equal(row, p) for p in patterns), row
    # sampled at temperature 1 from all codes: still only the two patterns (the model is sure)
    ids, exprs = ss.sample(state["params"], jax.random.PRNGKey(6), 16, 1.0, K, model=model)
    seq = ss.codes_to_sequence(ids, exprs)
    hits = [any(np.array_equal(row, p) for p in patterns) for row in seq]
    assert np.mean(hits) >= 0.75
    assert {tuple(r) for r in seq[np.array(hits)]} == {tuple(p) for p in patterns}   # both appear


def test_top_k_one_is_deterministic_and_bad_settings_raise():
    model = _model()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, model.length), jnp.int32))["params"]
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
    one = ss.sample(params, jax.random.PRNGKey(0), 3, 1.0, 1, model=model)
    two = ss.sample(params, jax.random.PRNGKey(9), 3, 2.5, 1, model=model)
    for x, y in zip(one, two):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == np.int32 and x.shape == (3,) + GRID
        assert 0 <= int(np.min(x)) and int(np.max(x)) < K
    # every row the same (greedy, no randomness)
    assert all(np.array_equal(np.asarray(one[0][0]), np.asarray(one[0][i])) for i in range(3))
    rand = ss.sample(params, jax.random.PRNGKey(0), 8, 1.0, K, model=model)
    assert 0 <= int(np.min(rand[0])) and int(np.max(rand[1])) < K
    # top_k = 2 draws only among the two largest logits
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, K)), jnp.float32)
    draws = jax.vmap(lambda k: ss.sample_logits(k, logits, 1.0, 2))(jax.random.split(jax.random.PRNGKey(0), 200))
    assert set(np.unique(np.asarray(draws)).tolist()) == set(np.argsort(np.asarray(logits[0]))[-2:].tolist())
    for temperature, top_k in ((0.0, 1), (-1.0, 1), (float("nan"), 1), (1.0, 0), (1.0, -2), (1.0, 1.5)):
        with pytest.raises(ValueError, match="temperature" if top_k == 1 else "top_k"):
            ss.sample(params, jax.random.PRNGKey(0), 1, temperature, top_k, model=model)


def _micro_prior(tmp_path, **model_over):
    """A micro prior run folder (config.json + a checkpoint of the initial state) on a one-item
    folder dataset with train and test splits; returns its path."""
    data = tmp_path / "data"
    _write_folder(data)
    shutil.copytree(data / "train", data / "test")
    mc = tiny_model_config(**model_over)
    cfg = _config("synshot_prior", "tiny", **{"data.root": str(data)})
    cfg.model = mc
    prior = tmp_path / "prior"
    config_lib.save_config(cfg, str(prior))
    if mc.use_vq:
        ds = synshot_data.open_split(data, "train", in_memory=False)
        w, h = synshot_data.image_size(ds)
        ctx = synshot.make_context(mc, synshot.build_assets(mc), w, h, optim_cfg=cfg.optim)
        batch = synshot_data.model_batch(synshot_data.stack([ds[0]]))
        state = jax.jit(lambda b: synshot.init_state(jax.random.PRNGKey(0), b, ctx))(batch)
        ck = ckpt_lib.Checkpointer(str(prior), keep=1)
        ck.save(1, state, {"next_step": 1, "skipped": 0})
        ck.close()
    return prior


def _sample_config(prior, **over):
    return _config("synshot_sample", "tiny", **{
        "prior_workdir": str(prior), "transformer.width": 16, "transformer.heads": 2, "batch_size": 2,
        "train.steps": 20, "train.log_every": 10, "train.checkpoint_every": 10, "train.eval_every": 10,
        "sample.n": 2, "sample.views": (0, 1, 2), "sample.reconstructions": 1, **over})


def test_end_to_end_on_a_micro_prior_writes_samples_and_resumes(tmp_path):
    from dhjax import io as dio

    prior = _micro_prior(tmp_path)
    out = tmp_path / "sample"
    cfg = _sample_config(prior)
    summary = ss.run(cfg, str(out))
    assert summary["steps_run"] == 20 and summary["grid"] == (8, 8) and summary["reconstructions"] == 1
    img = dio.load_image(out / "samples.png")
    assert img.shape[:2] == ((1 + 2) * 24, 3 * 32)                  # rows: 1 + 2 avatars; columns: 3 views
    assert img.std() > 0                                            # something was rendered
    final = json.loads((out / "final_metrics.json").read_text())
    keys = {"loss", "eval/nll", "heldout/nll_per_token", "heldout/nll_id", "heldout/nll_expr", "unigram/entropy",
            "unigram/heldout_nll", "n_train_sequences", "n_test_sequences", "sample_seconds"}
    assert keys <= set(final), keys - set(final)
    assert final["n_train_sequences"] == 1 and final["sequence_length"] == 128
    assert final["heldout/nll_per_token"] == summary["heldout/nll_per_token"]
    assert np.isfinite(final["heldout/nll_per_token"]) and final["heldout/nll_per_token"] > 0
    codes = np.load(out / "codes.npz")
    assert codes["sample_id"].shape == (2, 8, 8) and codes["train_id"].shape == (1, 8, 8)
    assert codes["sample_id"].max() < 16 and codes["sample_expr"].min() >= 0
    again = ss.run(cfg, str(out))
    assert again["steps_run"] == 0
    np.testing.assert_allclose(again["heldout/nll_per_token"], summary["heldout/nll_per_token"], rtol=1e-6)


def test_bad_priors_and_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prior_workdir"):
        ss.run(_config("synshot_sample", "tiny"), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        ss.run(_sample_config(tmp_path / "missing"), str(tmp_path / "b"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"experiment": "synshot_invert"}))
    with pytest.raises(ValueError, match="not 'synshot_prior'"):
        ss.run(_sample_config(other), str(tmp_path / "c"))
    no_vq = _micro_prior(tmp_path, use_vq=False)
    with pytest.raises(ValueError, match="use_vq=False"):
        ss.run(_sample_config(no_vq), str(tmp_path / "d"))
    for field, value in (("sample.temperature", 0.0), ("sample.top_k", 0)):
        with pytest.raises(ValueError, match=field):
            ss.run(_sample_config(no_vq, **{field: value}), str(tmp_path / "e"))
    with pytest.raises(ValueError, match="use_vq"):
        ss.prior_codebooks({"params": {}, "stats": {}},
                           synshot.NetConfig.from_config(tiny_model_config(use_vq=False)))
