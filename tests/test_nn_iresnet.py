"""ArcFace iresnet: layout of the variables (r100 by shape only), equality with a PyTorch
iresnet of the arcface_torch layout (peers), train mode, preprocessing, embeddings, the
fine-tuning mask with optax, bad input."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from dhjax.nn import iresnet as ir

from iresnet_common import flax_variables_from_torch, torch_forward, torch_input, torch_iresnet

TINY = dict(layers=(1, 2, 1, 1), width=8, embedding=32)


def shapes_of(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))


def random_variables(model, seed=0):
    """Variables with random values (model.init's RNG is slow to compile on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = shapes_of(model)

    def fill(path, s):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return rng.normal(0, 1 / np.sqrt(fan_in), s.shape).astype(np.float32)
        return rng.normal(0, 0.1, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_layout_and_config():
    v = shapes_of(ir.IResNet())  # r100, by shape only
    p = v["params"]
    assert ir.config_from_variables(v) == {"layers": (3, 13, 30, 3), "width": 64, "embedding": 512}
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert p["prelu"]["slope"].shape == (64,)
    assert p["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 64)
    assert "downsample_conv" not in p["layer3_29"]
    assert p["layer4_2"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    assert p["fc"]["kernel"].shape == (512 * 7 * 7, 512)
    assert set(v["batch_stats"]["layer2_0"]) == {"bn1", "bn2", "bn3", "downsample_bn"}
    n = sum(x.size for x in jax.tree_util.tree_leaves(p))
    assert 65.0e6 < n < 65.3e6  # iresnet100: ~65.2 M parameters
    assert ir.config_from_variables(shapes_of(ir.IResNet(layers=ir.ARCH_LAYERS["r50"])))["layers"] == (3, 4, 14, 3)


@pytest.mark.peers
def test_matches_torch_iresnet():
    pytest.importorskip("torch")
    net = torch_iresnet(**TINY)
    x = torch_input(batch=2)
    ref = torch_forward(net, x)
    variables = flax_variables_from_torch(net)
    model = ir.IResNet(**TINY)
    # the hand-mapped tree has exactly the module's structure and shapes
    shapes = shapes_of(model)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(shapes),
                                                  jax.tree_util.tree_leaves(variables)))
    out = np.asarray(jax.jit(model.apply)(variables, np.transpose(x, (0, 2, 3, 1))))
    assert out.shape == (2, 32)
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
    # embed = unit-normalised features of the preprocessed [0, 1] images
    imgs01 = (np.transpose(x, (0, 2, 3, 1)) + 1) / 2
    emb = np.asarray(jax.jit(ir.embed)(variables, imgs01))
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-4)


def test_train_mode_batch_stats_and_dropout():
    model = ir.IResNet(**TINY, dropout=0.5)
    v = random_variables(model)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4, 112, 112, 3)), jnp.float32)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    eval_out = apply(v, x)
    np.testing.assert_array_equal(np.asarray(eval_out), np.asarray(apply(v, x)))  # deterministic
    out1, upd = apply(v, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(1)})
    out2, _ = apply(v, x, train=True, mutable=("batch_stats",), rngs={"dropout": jax.random.key(2)})
    assert out1.shape == eval_out.shape == (4, 32)
    assert np.all(np.isfinite(np.asarray(out1)))
    assert not np.allclose(np.asarray(out1), np.asarray(out2))  # different dropout masks
    # running statistics moved towards the batch's (momentum 0.9)
    old = v["batch_stats"]["layer4_0"]["bn3"]["mean"]
    new = np.asarray(upd["batch_stats"]["layer4_0"]["bn3"]["mean"])
    assert new.shape == old.shape and not np.allclose(new, old)
    assert jax.tree_util.tree_structure(upd["batch_stats"]) == jax.tree_util.tree_structure(v["batch_stats"])


def test_preprocess_and_embed():
    u8 = np.array([[[0, 255, 51]]], np.uint8)
    np.testing.assert_allclose(np.asarray(ir.preprocess(u8)), [[[-1.0, 1.0, -0.6]]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(ir.preprocess(u8.astype(np.float32) / 255)),
                               [[[-1.0, 1.0, -0.6]]], atol=1e-6)
    with pytest.raises(ValueError, match=r"\[..., H, W, 3\]"):
        ir.preprocess(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        ir.preprocess(np.zeros((4, 4, 3), np.int32))
    model = ir.IResNet(**TINY)
    v = random_variables(model, seed=3)
    imgs = np.random.default_rng(0).uniform(0, 1, (2, 112, 112, 3)).astype(np.float32)
    emb = np.asarray(jax.jit(ir.embed)(v, imgs))
    feats = np.asarray(jax.jit(model.apply)(v, ir.preprocess(imgs)))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, feats / np.linalg.norm(feats, axis=1, keepdims=True), atol=1e-5)


def test_bad_input():
    model = ir.IResNet(**TINY)
    v = shapes_of(model)
    with pytest.raises(ValueError, match="112x112"):
        jax.eval_shape(model.apply, v, jnp.zeros((1, 96, 96, 3)))
    with pytest.raises(ValueError, match=r"\[B, 112, 112, 3\]"):
        jax.eval_shape(model.apply, v, jnp.zeros((112, 112, 3)))
    with pytest.raises(ValueError, match="4 positive"):
        shapes_of(ir.IResNet(layers=(1, 1, 1)))
    with pytest.raises(ValueError, match="IResNet tree"):
        ir.config_from_variables({"params": {"conv1": {}}})


def test_trainable_mask_r100():
    params = shapes_of(ir.IResNet())["params"]
    mask = ir.trainable_mask(params, last_blocks=3)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    on = {k for k, v in mask.items() if all(jax.tree_util.tree_leaves(v))}
    some = {k for k, v in mask.items() if any(jax.tree_util.tree_leaves(v))}
    # MICA: the last 3 blocks (= layer4 of r100) and the head; features' scale stays fixed
    assert on == {"layer4_0", "layer4_1", "layer4_2", "bn2", "fc"}
    assert some == on | {"features"}
    assert mask["features"] == {"scale": False, "bias": True}
    assert not any(jax.tree_util.tree_leaves(ir.trainable_mask(params, 0, head=False)))
    m1 = ir.trainable_mask(params, last_blocks=1, freeze_feature_scale=False)
    assert {k for k, v in m1.items() if any(jax.tree_util.tree_leaves(v))} == {"layer4_2", "bn2", "fc", "features"}
    m4 = ir.trainable_mask(params, last_blocks=4)
    assert all(jax.tree_util.tree_leaves(m4["layer3_29"])) and not any(jax.tree_util.tree_leaves(m4["layer3_28"]))
    mall = ir.trainable_mask(params, last_blocks=None, freeze_feature_scale=False)
    assert all(jax.tree_util.tree_leaves(mall))
    with pytest.raises(ValueError, match="variables\\['params'\\]"):
        ir.trainable_mask({"params": params})
    with pytest.raises(ValueError, match="last_blocks"):
        ir.trainable_mask(params, last_blocks=-1)
    with pytest.raises(ValueError, match="unexpected entry 'Dense_0'"):
        ir.trainable_mask({"Dense_0": {"kernel": 0}})


def test_trainable_mask_with_optax():
    model = ir.IResNet(**TINY)
    v = random_variables(model, seed=4)
    mask = ir.trainable_mask(v["params"], last_blocks=1)
    labels = jax.tree.map(lambda t: "train" if t else "freeze", mask)
    opt = optax.multi_transform({"train": optax.sgd(0.1), "freeze": optax.set_to_zero()}, labels)
    x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 112, 112, 3)), jnp.float32)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            return jnp.sum(model.apply({"params": p, "batch_stats": v["batch_stats"]}, x) ** 2)
        g = jax.grad(loss)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd)

    new = step(v["params"], opt.init(v["params"]))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), v["params"], new)
    flat_mask = jax.tree_util.tree_leaves_with_path(mask)
    flat_changed = dict(jax.tree_util.tree_leaves_with_path(changed))
    for path, trainable in flat_mask:
        if not trainable:
            assert not flat_changed[path], jax.tree_util.keystr(path)
    assert flat_changed[(jax.tree_util.DictKey("layer4_0"), jax.tree_util.DictKey("conv2"),
                         jax.tree_util.DictKey("kernel"))]
    assert flat_changed[(jax.tree_util.DictKey("fc"), jax.tree_util.DictKey("kernel"))]
