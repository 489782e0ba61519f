"""MICA: mapping network, region weights, loss, fine-tuning mask, train step and model selection,
prediction to .obj, synthetic scans, bad inputs; the landmark encoder (`mica.landmark_net`: crop,
descriptor invariance, heatmap network, its train step); slow: data generation and train ->
predict -> eval end to end in subprocesses, for both encoder kinds.

The encoder here is a tiny IResNet (width 4, embedding 16): iresnet100 compiles and runs far
too slowly on a 2-core CPU for unit tests. The freezing test uses the block layout (1, 2, 2, 1)
(6 blocks, so 3 are frozen and 3 train, as MICA's last-3-blocks rule does on r100's 49). The
landmark encoder's U-Net is width 4 here (16 in the tiny config).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax import io as dio
from dhjax.capture import mica
from dhjax.capture.mica import landmark_net as mlm
from dhjax.models import flame
from dhjax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARCH = {"layers": (1, 1, 1, 1), "width": 4, "embedding": 16, "bn_eps": 1e-5}
LANDMARK_ARCH = {"kind": "landmarks", "width": 4}


@pytest.fixture(scope="module")
def model():
    return flame.load()


def small_cfg(**encoder):
    cfg = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny_iresnet"))
    cfg.encoder.update(layers=TINY_ARCH["layers"], width=TINY_ARCH["width"], embedding=TINY_ARCH["embedding"])
    cfg.encoder.update(**encoder)
    cfg.mapping.update(hidden_dim=16)
    cfg.data.landmark_noise_px = 0.0
    cfg.select_every = 1
    cfg.optim.update(lr=1e-3, warmup_steps=0, schedule="constant")
    return cfg


FIVE = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]], np.float32) + 8.0


def random_batch(n, seed=0, size=128):
    """Random images with the five points FIVE and 68 landmarks around the landmark encoder's
    template, placed consistently with the five points."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    base = np.stack([xx, yy, 0.5 * (xx + yy)], -1)
    images = np.stack([(255 * np.clip(base * rng.uniform(0.3, 1.0, 3) + 0.2 * rng.random((size, size, 3)), 0, 1))
                       for _ in range(n)]).astype(np.uint8)
    M = mlm.crop_transform(jnp.asarray(FIVE))
    lmk68 = np.asarray(mlm.from_crop(jnp.asarray(mlm.TEMPLATE), M))[None] + rng.normal(0, 1.0, (n, 68, 2))
    return {"image": images, "five": np.repeat(FIVE[None], n, 0),
            "shape": rng.normal(size=(n, mica.N_SHAPE)).astype(np.float32), "lmk68": lmk68.astype(np.float32)}


@pytest.fixture(scope="module")
def trained(model):
    """A state after a few steps of the tiny net, with its step function (compiled once)."""
    cfg = small_cfg()
    batch = random_batch(4)
    val = {"crops": mica.crop_batch(batch["image"], batch["five"]), "shape": batch["shape"]}
    _, step, evaluate = mica.method_functions(cfg, TINY_ARCH, model, val=val)
    state = mica.init_state(jax.random.PRNGKey(0), cfg, TINY_ARCH)
    step = jax.jit(step)
    return dict(cfg=cfg, batch=batch, val=val, state=state, step=step, evaluate=jax.jit(evaluate))


def landmark_cfg():
    cfg = small_cfg()
    cfg.encoder.update(kind="landmarks", heatmap_width=LANDMARK_ARCH["width"])
    return cfg


@pytest.fixture(scope="module")
def trained_landmarks(model):
    """The landmark encoder's initial state and compiled step (width 4)."""
    cfg = landmark_cfg()
    assert mica.encoder_arch(cfg) == LANDMARK_ARCH
    batch = random_batch(4, seed=5)
    val = {"crops": mica.crop_batch(batch["image"], batch["five"], "landmarks"), "shape": batch["shape"]}
    init, step, evaluate = mica.method_functions(cfg, LANDMARK_ARCH, model, val=val)
    state = jax.jit(init)(jax.random.PRNGKey(0), batch)
    return dict(cfg=cfg, batch=batch, val=val, state=state, step=jax.jit(step), evaluate=jax.jit(evaluate))


# ----------------------------------------------------------------------------------------------
# Networks.


def test_mapping_network_shapes_and_output_scale():
    net = mica.MappingNetwork(hidden_dim=32, n_hidden=3, n_shape=300)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 512))
    variables = net.init(jax.random.PRNGKey(0), x)
    p = variables["params"]
    assert sorted(p) == ["hidden0", "hidden1", "hidden2", "output"]
    assert p["hidden0"]["kernel"].shape == (512, 32) and p["hidden2"]["kernel"].shape == (32, 32)
    assert p["output"]["kernel"].shape == (32, 300)
    z = net.apply(variables, x)
    assert z.shape == (5, 300)
    # the same computation by hand: leaky ReLU 0.2 after each hidden layer, output x 0.25
    h = x
    for i in range(3):
        h = h @ p[f"hidden{i}"]["kernel"] + p[f"hidden{i}"]["bias"]
        h = jnp.where(h > 0, h, 0.2 * h)
    ref = 0.25 * (h @ p["output"]["kernel"] + p["output"]["bias"])
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)


def test_micanet_variables_round_trip_the_architecture():
    net = mica.MicaNet(layers=(1, 2, 1, 1), width=4, embedding=16, hidden_dim=8, n_hidden=2, n_shape=50)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)))
    assert sorted(shapes["params"]) == ["encoder", "mapping"]
    assert sorted(shapes["batch_stats"]) == ["encoder"]
    back = mica.net_from_variables(shapes)
    assert (back.layers, back.width, back.embedding, back.hidden_dim, back.n_hidden, back.n_shape) == (
        (1, 2, 1, 1), 4, 16, 8, 2, 50)
    with pytest.raises(ValueError, match="not MICA variables"):
        mica.net_from_variables({"params": {"encoder": {}}})


# ----------------------------------------------------------------------------------------------
# Region weights and loss.


def test_region_weights_values(model):
    regions = {k: np.asarray(v) for k, v in model.regions.items()}
    w = mica.region_weights(model, {"face": 150.0, "back_of_head": 1.0, "eyes": 0.01, "ears": 0.01})
    assert w.shape == (model.num_vertices,) and w.dtype == np.float32
    np.testing.assert_allclose(w[regions["face"]], 150.0)
    np.testing.assert_allclose(w[regions["eyes"]], 0.01)
    np.testing.assert_allclose(w[regions["ears"]], 0.01)
    np.testing.assert_allclose(w[regions["back_of_head"]], 1.0)
    np.testing.assert_allclose(w[regions["neck"]], 1.0)          # in no listed region: default
    scalp_only = regions["scalp"] & ~regions["back_of_head"]
    np.testing.assert_allclose(w[scalp_only], 1.0)
    # the reference implementation's extra weights: a sub-region (nose) refines its parent (face)
    w2 = mica.region_weights(model, {"nose": 50.0, "face": 150.0, "lips": 50.0}, default=2.0)
    np.testing.assert_allclose(w2[regions["nose"]], 50.0)
    np.testing.assert_allclose(w2[regions["lips"]], 50.0)
    rest = regions["face"] & ~regions["nose"] & ~regions["lips"]
    np.testing.assert_allclose(w2[rest], 150.0)
    np.testing.assert_allclose(w2[regions["neck"]], 2.0)
    # the configs' default (thesis) weights
    cfg = mica.default_config()
    w3 = mica.region_weights(model, dict(cfg.loss.region_weights), cfg.loss.default_weight)
    np.testing.assert_allclose(w3[regions["face"]], 150.0)
    np.testing.assert_allclose(w3[regions["eyes"] | regions["ears"]], 0.01)
    with pytest.raises(ValueError, match="unknown region.*'chin'"):
        mica.region_weights(model, {"chin": 3.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        mica.region_weights(model, {"face": -1.0})


def test_loss_zero_at_ground_truth_and_region_weighted(model):
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(3, 300)).astype(np.float32)
    pred = gt + 0.5 * rng.normal(size=(3, 300)).astype(np.float32)
    w = mica.region_weights(model, {"face": 150.0, "back_of_head": 1.0, "eyes": 0.01, "ears": 0.01})
    assert float(mica.loss_fn(gt, gt, model, w)) == 0.0
    loss = float(mica.loss_fn(pred, gt, model, w))
    assert loss > 0
    # reference: mean over batch, vertices and coordinates of w_v |v_pred - v_gt| (metres)
    vp = np.asarray(mica.neutral_vertices(model, pred), np.float64)
    vg = np.asarray(mica.neutral_vertices(model, gt), np.float64)
    ref = np.mean(np.abs(vp - vg) * w[None, :, None])
    np.testing.assert_allclose(loss, ref, rtol=1e-4)
    # the weighting: an error only on the face counts 150x, only on the eyes 0.01x
    face = np.asarray(model.regions["face"])
    eyes = np.asarray(model.regions["eyes"])
    diff = np.abs(vp - vg)
    on = lambda mask: np.mean(diff * mask[None, :, None])  # noqa: E731
    np.testing.assert_allclose(ref, 150 * on(face) + 0.01 * on(eyes) + 0.01 * on(np.asarray(model.regions["ears"]))
                               + on(~face & ~eyes & ~np.asarray(model.regions["ears"])), rtol=1e-6)
    w_face_only = np.where(face, 150.0, 0.0).astype(np.float32)
    w_eyes_only = np.where(eyes, 150.0, 0.0).astype(np.float32)
    lf = float(mica.loss_fn(pred, gt, model, w_face_only))
    le = float(mica.loss_fn(pred, gt, model, w_eyes_only))
    assert lf > 0 and le > 0
    np.testing.assert_allclose(lf, 150 * on(face), rtol=1e-4)
    with pytest.raises(ValueError, match="differ"):
        mica.loss_fn(pred[:, :10], gt, model, w)


def test_neutral_vertices_is_the_forward_pass_at_rest(model):
    z = np.random.default_rng(1).normal(size=(2, 300)).astype(np.float32)
    v = mica.neutral_vertices(model, z)
    ref = flame.forward(model, z).vertices
    np.testing.assert_allclose(v, ref, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# Training.


def test_one_train_step_decreases_the_loss(trained):
    step, state, batch = trained["step"], trained["state"], trained["batch"]
    s1, m1 = step(state, batch, jax.random.PRNGKey(1))
    s2, m2 = step(s1, batch, jax.random.PRNGKey(2))       # m2: the loss after one update
    assert np.isfinite(float(m1["loss"])) and float(m1["loss"]) > 0
    assert float(m2["loss"]) < float(m1["loss"])
    assert int(s2["step"]) == int(state["step"]) + 2
    # batch statistics are updated in train mode (from-scratch encoder)
    bs0 = state["batch_stats"]["encoder"]["bn1"]["mean"]
    bs1 = s1["batch_stats"]["encoder"]["bn1"]["mean"]
    assert not np.allclose(bs0, bs1)


def test_model_selection_keeps_the_best_network(trained):
    step, state, batch = trained["step"], trained["state"], trained["batch"]
    s1, m1 = step(state, batch, jax.random.PRNGKey(1))   # select_every = 1: validates every step
    assert int(s1["best"]["step"]) == 1
    assert float(s1["best"]["val_mm"]) == pytest.approx(float(m1["val_mm"]))
    np.testing.assert_array_equal(s1["best"]["params"]["mapping"]["output"]["kernel"],
                                  s1["params"]["mapping"]["output"]["kernel"])
    # an unbeatable best stays, with its network
    frozen = dict(s1, best=dict(s1["best"], val_mm=jnp.asarray(0.0, jnp.float32)))
    s2, _ = step(frozen, batch, jax.random.PRNGKey(2))
    assert int(s2["best"]["step"]) == 1
    np.testing.assert_array_equal(s2["best"]["params"]["mapping"]["output"]["kernel"],
                                  s1["params"]["mapping"]["output"]["kernel"])
    assert not np.array_equal(s2["params"]["mapping"]["output"]["kernel"],
                              s1["params"]["mapping"]["output"]["kernel"])
    # the selection metric is the validation face error of the selected network (recomputed
    # here by `evaluate`, outside the step)
    ev = trained["evaluate"](s1, trained["val"])
    np.testing.assert_allclose(float(ev["best_face_mm"]), float(s1["best"]["val_mm"]), rtol=1e-4)
    # before any validation, best_variables is the current network
    assert mica.best_variables(trained["state"])["params"] is trained["state"]["params"]


def test_pretrained_encoder_trains_only_the_last_three_blocks(model):
    arch = {"layers": (1, 2, 2, 1), "width": 4, "embedding": 16, "bn_eps": 1e-5}
    cfg = small_cfg(onnx_path="given.onnx", last_blocks=3)   # the path is only a flag here
    cfg.encoder.update(layers=arch["layers"])
    assert mica.bn_mode(cfg) == "frozen"
    net = mica.make_net(cfg, arch)
    enc = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)))
    rng = np.random.default_rng(3)
    pretrained = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.0, s.shape).astype(np.float32), {
        "params": enc["params"]["encoder"], "batch_stats": enc["batch_stats"]["encoder"]})
    batch = random_batch(4, seed=1)
    init, step, _ = mica.method_functions(cfg, arch, model, encoder_variables=pretrained)
    state = jax.jit(init)(jax.random.PRNGKey(0), batch)     # as the training loop calls it
    np.testing.assert_array_equal(state["params"]["encoder"]["conv1"]["kernel"],
                                  pretrained["params"]["conv1"]["kernel"])
    new, metrics = jax.jit(step)(state, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(metrics["loss"]))
    before, after = state["params"]["encoder"], new["params"]["encoder"]
    changed = {k: any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before[k]),
                                                               jax.tree_util.tree_leaves(after[k])))
               for k in before}
    frozen = ["conv1", "bn1", "prelu", "layer1_0", "layer2_0", "layer2_1"]
    trained_blocks = ["layer3_0", "layer3_1", "layer4_0", "fc"]
    assert not any(changed[k] for k in frozen), {k: changed[k] for k in frozen}
    assert all(changed[k] for k in trained_blocks), {k: changed[k] for k in trained_blocks}
    np.testing.assert_array_equal(before["features"]["scale"], after["features"]["scale"])  # arcface_torch
    assert not np.array_equal(before["features"]["bias"], after["features"]["bias"])
    # frozen BatchNorm statistics, and the mapping network trains
    for a, b in zip(jax.tree_util.tree_leaves(state["batch_stats"]), jax.tree_util.tree_leaves(new["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(state["params"]["mapping"]["output"]["kernel"],
                              new["params"]["mapping"]["output"]["kernel"])
    with pytest.raises(ValueError, match="do not fit the encoder"):
        mica.init_state(jax.random.PRNGKey(0), cfg, {**arch, "width": 8}, pretrained)


def test_configs_encoder_kinds():
    tiny = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny"))
    assert tiny.encoder.kind == "landmarks" and mica.encoder_arch(tiny) == {"kind": "landmarks", "width": 16}
    assert config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny_iresnet")).encoder.kind == "iresnet"
    paper = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:paper"))
    assert paper.encoder.kind == "iresnet" and mica.encoder_arch(paper)["layers"] == (3, 13, 30, 3)
    bad = landmark_cfg()
    bad.encoder.onnx_path = "glint360k_r100.onnx"
    with pytest.raises(ValueError, match="trained from scratch"):
        mica.encoder_arch(bad)
    bad = landmark_cfg()
    bad.encoder.kind = "mediapipe"
    with pytest.raises(ValueError, match="encoder.kind must be one of"):
        mica.encoder_arch(bad)


# ----------------------------------------------------------------------------------------------
# The landmark encoder.


def _similarity(points, angle_deg, scale, shift):
    a = np.deg2rad(angle_deg)
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return scale * points @ R.T + np.asarray(shift)


def test_landmark_descriptor_is_similarity_invariant():
    rng = np.random.default_rng(0)
    pts = mlm.TEMPLATE[None] + rng.normal(0, 2.0, (3, 68, 2))
    d = np.asarray(mlm.descriptor(pts))
    assert d.shape == (3, 136)
    np.testing.assert_allclose(mlm.descriptor(mlm.TEMPLATE), 0.0, atol=1e-4)
    for angle, scale, shift in ((30.0, 1.7, (40.0, -12.0)), (-75.0, 0.4, (300.0, 210.0)), (180.0, 3.0, (0.0, 0.0))):
        moved = np.stack([_similarity(p, angle, scale, shift) for p in pts]).astype(np.float32)
        np.testing.assert_allclose(mlm.descriptor(moved), d, atol=2e-3)
    # a change of the face's proportions does change it (by the move in descriptor units)
    wider = pts.copy()
    wider[:, :17, 0] += np.where(np.arange(17) < 8, -2.0, 2.0)      # jaw line 2 px wider per side
    change = np.abs(np.asarray(mlm.descriptor(wider)) - d).max()
    assert change > 0.3
    # a reflection is not a similarity: a mirrored face (points relabelled) differs
    assert np.abs(np.asarray(mlm.descriptor(pts * np.array([-1.0, 1.0]))) - d).max() > 1.0
    with pytest.raises(ValueError, match=r"\[\.\.\., 68, 2\]"):
        mlm.descriptor(np.zeros((5, 2)))


def test_landmark_crop_places_the_five_points_and_keeps_the_chin():
    from dhjax.capture.align import ARCFACE_TEMPLATE

    # five points that are an exact similarity of the template land exactly on the crop's
    five = _similarity(ARCFACE_TEMPLATE.astype(np.float64), 12.0, 1.3, (20.0, 5.0)).astype(np.float32)
    np.testing.assert_allclose(mlm.to_crop(jnp.asarray(five), mlm.crop_transform(jnp.asarray(five))),
                               mlm.CROP_TEMPLATE, atol=1e-3)
    M = mlm.crop_transform(jnp.asarray(FIVE))
    pts = np.random.default_rng(1).uniform(0, 140, (10, 2)).astype(np.float32)
    np.testing.assert_allclose(mlm.from_crop(mlm.to_crop(pts, M), M), pts, atol=1e-3)
    # the template face, jaw and chin included, lies inside the crop with a margin
    assert mlm.TEMPLATE.min() > 10 and mlm.TEMPLATE.max() < mlm.CROP_SIZE - 10
    # a bright dot on every five point lands on the crop template
    image = np.zeros((140, 140, 3), np.float32)
    for p in FIVE:
        x, y = np.round(p).astype(int)
        image[y - 1:y + 2, x - 1:x + 2] = 1.0
    crop = mica.crop_from_landmarks(image, FIVE, kind="landmarks")
    assert crop.shape == (96, 96, 3)
    for q in mlm.CROP_TEMPLATE:
        x, y = np.round(q).astype(int)
        assert crop[y, x].max() > 0.3
    batch = mica.crop_batch((image[None] * 255).astype(np.uint8), FIVE[None], "landmarks")
    np.testing.assert_allclose(batch[0] / 255.0, crop, atol=1 / 255 + 1e-6)


def test_heatmap_net_points_lie_in_the_crop():
    net = mlm.HeatmapNet(width=4)
    crops = random_batch(2, size=96)["image"]
    variables = jax.jit(net.init)(jax.random.PRNGKey(0), crops)
    apply = jax.jit(net.apply)
    pts = np.asarray(apply(variables, crops))
    assert pts.shape == (2, 68, 2)
    assert np.all((pts > -0.5) & (pts < 95.5))
    # uint8 and [0, 1] floats are the same input
    np.testing.assert_allclose(apply(variables, crops.astype(np.float32) / 255.0), pts, atol=1e-4)


def test_landmark_encoder_train_step(trained_landmarks, model):
    step, state, batch = trained_landmarks["step"], trained_landmarks["state"], trained_landmarks["batch"]
    assert sorted(state["params"]) == ["heatmap", "mapping"] and state["batch_stats"] == {}
    s1, m1 = step(state, batch, jax.random.PRNGKey(1))
    s2, m2 = step(s1, batch, jax.random.PRNGKey(2))
    for k in ("loss", "shape_loss", "landmark_px"):
        assert np.isfinite(float(m1[k])) and float(m1[k]) > 0, k
    # both parts of the loss go down after an update on the same batch
    assert float(m2["shape_loss"]) < float(m1["shape_loss"])
    assert float(m2["landmark_px"]) < float(m1["landmark_px"])
    assert float(m2["loss"]) < float(m1["loss"])
    np.testing.assert_allclose(float(m1["loss"]), float(m1["shape_loss"]) + float(m1["landmark_px"]), rtol=1e-5)
    assert int(s1["best"]["step"]) == 1          # select_every = 1
    # the shape loss reaches only the mapping network (stop-gradient on the landmarks)
    cfg = trained_landmarks["cfg"]
    net = mica.make_net(cfg, LANDMARK_ARCH)
    crops = jnp.asarray(mica.crop_batch(batch["image"], batch["five"], "landmarks"))
    weights = mica.region_weights(model, dict(cfg.loss.region_weights))
    g = jax.jit(jax.grad(lambda p: mica.loss_fn(net.apply({"params": p}, crops), batch["shape"], model, weights)))(
        state["params"])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g["heatmap"]))
    assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree_util.tree_leaves(g["mapping"]))
    # a batch without landmark targets is a clear error
    with pytest.raises(KeyError, match="lmk68"):
        step(state, {k: v for k, v in batch.items() if k != "lmk68"}, jax.random.PRNGKey(1))


def test_landmark_encoder_predict_and_crop_kind(trained_landmarks, tmp_path):
    variables = mica.best_variables(trained_landmarks["state"])
    assert mica.variables_kind(variables) == "landmarks"
    back = mica.net_from_variables(variables)
    assert isinstance(back, mica.LandmarkMicaNet) and back.width == 4 and back.hidden_dim == 16
    crops = trained_landmarks["val"]["crops"]
    z = mica.predict(variables, crops)
    assert z.shape == (4, 300) and np.all(np.isfinite(z))
    ev = trained_landmarks["evaluate"](trained_landmarks["state"], trained_landmarks["val"])
    assert np.isfinite(float(ev["face_mm"]))
    # ArcFace crops are the wrong input for this network: a clear error naming the fix
    batch = trained_landmarks["batch"]
    with pytest.raises(ValueError, match=r"\[B, 96, 96, 3\] landmark crops.*kind='landmarks'.*\(4, 112, 112, 3\)"):
        mica.predict(variables, mica.crop_batch(batch["image"], batch["five"]))
    # one image: the crop of the network's kind
    z1, crop = mica.predict_image(variables, batch["image"][0], batch["five"][0])
    assert crop.shape == (96, 96, 3)
    np.testing.assert_allclose(z1, z[0], atol=2e-3)
    # the run record names the kind and reads back its architecture
    cfg = trained_landmarks["cfg"]
    config_lib.save_config(cfg, tmp_path)
    mica.write_run_model(tmp_path, cfg, LANDMARK_ARCH, flame.load())
    _, arch, rec = mica.read_run(tmp_path)
    assert arch == LANDMARK_ARCH and rec["encoder"]["kind"] == "landmarks"


# ----------------------------------------------------------------------------------------------
# Mapping calibration (landmark encoder).


def test_aligned_face_errors_match_a_procrustes_oracle(model):
    from scipy.linalg import orthogonal_procrustes

    rng = np.random.default_rng(3)
    gt = rng.normal(size=(3, 300)).astype(np.float32)
    pred = (gt + 0.7 * rng.normal(size=(3, 300))).astype(np.float32)
    got = mica.aligned_face_errors_mm(model, pred, gt)
    keep = np.asarray(model.regions["face"])
    a = np.asarray(mica.neutral_vertices(model, pred), np.float64)[:, keep]
    b = np.asarray(mica.neutral_vertices(model, gt), np.float64)[:, keep]
    for i in range(3):
        A, B = a[i] - a[i].mean(0), b[i] - b[i].mean(0)
        R, _ = orthogonal_procrustes(A, B)
        assert np.linalg.det(R) > 0
        np.testing.assert_allclose(got[i], 1000 * np.linalg.norm(A @ R - B, axis=1).mean(), rtol=2e-3)
    # a rigidly equal prediction scores zero, a wrong one does not
    np.testing.assert_allclose(mica.aligned_face_errors_mm(model, gt, gt), 0.0, atol=2e-3)
    assert got.min() > 0.1
    with pytest.raises(ValueError, match="two \\[N, S\\] arrays"):
        mica.aligned_face_errors_mm(model, gt, gt[:2])


def test_fit_linear_mapping_recovers_a_linear_relation_and_picks_its_strength(model):
    rng = np.random.default_rng(4)
    n, d = 240, 12
    X = rng.normal(size=(n, d))
    W = np.zeros((d, 300))
    W[:, :20] = rng.normal(size=(d, 20)) * 0.3
    Y = X @ W + 0.05 * rng.normal(size=(n, 300))
    groups = np.repeat(np.arange(n // 2), 2)          # two items per identity
    fit = mica.fit_linear_mapping(X, Y, model, lambdas=(1e-3, 1.0, 1e4), folds=4, groups=groups)
    assert fit["lam"] in (1e-3, 1.0) and fit["cv_mm"][2] > fit["cv_mm"].min()
    np.testing.assert_allclose(fit["W"][:, :20], W[:, :20], atol=0.03)
    assert fit["cv_mm"].min() < 0.3 * fit["mean_face_mm"]
    # descriptors that carry nothing: the strongest ridge (closest to the mean face) wins
    noise = mica.fit_linear_mapping(rng.normal(size=(n, d)), Y, model, lambdas=(1e-3, 1e4), folds=4, groups=groups)
    assert noise["lam"] == 1e4
    with pytest.raises(ValueError, match="one identity per fold"):
        mica.fit_linear_mapping(X[:6], Y[:6], model, lambdas=(1.0,), folds=4, groups=groups[:6])
    with pytest.raises(ValueError, match="positive ridge strengths"):
        mica.fit_linear_mapping(X, Y, model, lambdas=(0.0,))


def test_calibrated_network_predicts_the_linear_mapping(trained_landmarks, tmp_path, model):
    variables = mica.best_variables(trained_landmarks["state"])
    crops = trained_landmarks["val"]["crops"]
    X = mica.landmark_descriptors(variables, crops)
    assert X.shape == (4, 136) and np.all(np.isfinite(X))
    rng = np.random.default_rng(5)
    W, b = 0.1 * rng.normal(size=(136, 300)), rng.normal(size=300)
    cal = mica.with_linear_mapping(variables, W, b)
    net = mica.net_from_variables(cal)
    assert isinstance(net, mica.LandmarkMicaNet) and net.n_hidden == 0
    np.testing.assert_allclose(mica.predict(cal, crops), X @ W + b, atol=2e-3)
    # written for a checkpoint, read back with the training state of that checkpoint only
    fit = dict(W=W, b=b, lam=1.0, lambdas=np.ones(1), cv_mm=np.ones(1), mean_face_mm=1.0)
    with pytest.raises(FileNotFoundError, match="no mapping_calibration.npz"):
        mica.calibrated_variables(tmp_path, trained_landmarks["state"], 7)
    mica.save_calibration(tmp_path, fit, 7)
    back = mica.calibrated_variables(tmp_path, trained_landmarks["state"], 7)
    np.testing.assert_allclose(mica.predict(back, crops), X @ W + b, atol=2e-3)
    with pytest.raises(ValueError, match="fitted for checkpoint 7, the latest checkpoint is 8"):
        mica.calibrated_variables(tmp_path, trained_landmarks["state"], 8)
    with pytest.raises(ValueError, match="landmark-encoder"):
        mica.landmark_descriptors({"params": {"encoder": {}, "mapping": {}}}, crops)


def test_calibration_settings_and_split():
    tiny = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny"))
    assert mica.calibration_enabled(tiny)
    assert not mica.calibration_enabled(config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny_iresnet")))
    bad = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny_iresnet"))
    bad.calibration.enabled = True
    with pytest.raises(ValueError, match="needs the landmark encoder"):
        mica.calibration_enabled(bad)
    small = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny"))
    small.data.calib_identities = (250_000, 6)
    with pytest.raises(ValueError, match="at least 2 x calibration.folds = 10 identities, got 6"):
        mica.calibration_enabled(small)
    # the calibration split is its own identities; other splits' caches do not depend on it
    assert mica.split_spec(tiny.data, "calib") == (250_000, 900, 1, 1)
    other = config_lib.load_config(os.path.join(ROOT, "configs/mica.py:tiny"))
    other.data.calib_identities = (250_000, 50)
    for split in ("train", "val", "test"):
        assert mica.cache_path(tiny.data, split) == mica.cache_path(other.data, split)
    assert mica.cache_path(tiny.data, "calib") != mica.cache_path(other.data, "calib")
    with pytest.raises(ValueError, match="'calib'"):
        mica.split_spec(tiny.data, "holdout")


@pytest.mark.slow
@pytest.mark.peers
def test_onnx_encoder_weights_load_into_the_net(model, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from iresnet_common import export_onnx, torch_iresnet

    from dhjax.nn import iresnet

    path = export_onnx(torch_iresnet(layers=(1, 2, 1, 1), width=8, embedding=32), tmp_path / "r.onnx")
    conf, variables = mica.load_encoder_weights(path)
    cfg = small_cfg(onnx_path=str(path))
    arch = mica.encoder_arch(cfg)
    assert arch["layers"] == (1, 2, 1, 1) and arch["width"] == 8 and arch["embedding"] == 32
    state = mica.init_state(jax.random.PRNGKey(0), cfg, arch, variables)
    crops = random_batch(2, size=112)["image"]
    net = mica.make_net(cfg, arch)
    emb = jax.jit(lambda v, c: net.apply(v, c, method=mica.MicaNet.embed))(mica.best_variables(state), crops)
    np.testing.assert_allclose(emb, jax.jit(iresnet.embed)(variables, crops), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Prediction.


def test_predict_to_obj_round_trip(trained, model, tmp_path):
    variables = mica.best_variables(trained["state"])
    crops = trained["val"]["crops"]
    z = mica.predict(variables, crops)
    assert z.shape == (4, 300) and z.dtype == np.float32
    np.testing.assert_allclose(mica.predict(variables, crops.astype(np.float32) / 255.0), z, atol=1e-5)
    # the same network as evaluate's: its face error of these crops is that of the predictions
    ev = trained["evaluate"](trained["state"], trained["val"])
    err = np.asarray(mica.vertex_errors_mm(model, z, trained["val"]["shape"]))
    face = np.asarray(model.regions["face"])
    np.testing.assert_allclose(float(ev["face_mm"]), err[:, face].mean(), rtol=1e-4)
    v = np.asarray(mica.neutral_vertices(model, z[:1])[0])
    dio.save_obj(tmp_path / "head.obj", v, np.asarray(model.faces))
    v2, f2 = dio.load_mesh(tmp_path / "head.obj")
    np.testing.assert_allclose(v2, v, atol=1e-6)
    np.testing.assert_array_equal(f2, np.asarray(model.faces))


def test_crop_from_landmarks_matches_the_arcface_template():
    image = np.zeros((140, 140, 3), np.float32)
    for p in FIVE:                      # a bright dot on every point
        x, y = np.round(p).astype(int)
        image[y - 1:y + 2, x - 1:x + 2] = 1.0
    crop = mica.crop_from_landmarks(image, FIVE)
    assert crop.shape == (112, 112, 3)
    from dhjax.capture.align import ARCFACE_TEMPLATE
    for q in ARCFACE_TEMPLATE:
        x, y = np.round(q).astype(int)
        assert crop[y, x].max() > 0.5
    # 68 iBUG points and uint8 images work too
    lmk68 = np.zeros((68, 2), np.float32)
    lmk68[36:42], lmk68[42:48], lmk68[30], lmk68[48], lmk68[54] = FIVE[0], FIVE[1], FIVE[2], FIVE[3], FIVE[4]
    crop2 = mica.crop_from_landmarks((image * 255).astype(np.uint8), lmk68)
    np.testing.assert_allclose(crop2, crop, atol=1 / 255 + 1e-6)


def test_bad_inputs_are_clear_errors(trained):
    variables = mica.best_variables(trained["state"])
    with pytest.raises(ValueError, match=r"\[B, 112, 112, 3\].*got shape \(2, 96, 96, 3\)"):
        mica.predict(variables, np.zeros((2, 96, 96, 3), np.float32))
    with pytest.raises(ValueError, match="empty batch"):
        mica.predict(variables, np.zeros((0, 112, 112, 3), np.float32))
    with pytest.raises(ValueError, match="one image"):
        mica.predict(variables, np.zeros((112, 112, 3), np.float32))
    bad = np.zeros((1, 112, 112, 3), np.float32)
    bad[0, 5, 5, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        mica.predict(variables, bad)
    with pytest.raises(ValueError, match="dtype"):
        mica.predict(variables, np.zeros((1, 112, 112, 3), np.int64))
    img = np.zeros((100, 100, 3), np.float32)
    img[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        mica.crop_from_landmarks(img, FIVE)
    with pytest.raises(ValueError, match=r"\[68, 2\] iBUG or \[5, 2\]"):
        mica.crop_from_landmarks(np.zeros((100, 100, 3)), np.zeros((7, 2)))
    with pytest.raises(ValueError, match="eye points coincide"):
        mica.crop_from_landmarks(np.zeros((100, 100, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="not MICA variables"):
        mica.predict({"params": {"x": 1}}, np.zeros((1, 112, 112, 3), np.float32))


def test_missing_run_and_checkpoint_are_clear_errors(tmp_path, model, capsys):
    with pytest.raises(FileNotFoundError, match="not a MICA training run.*config.json"):
        mica.run.load_run(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:       # the programs' shared exit path
        mica.run.load_run_or_exit(str(tmp_path))
    assert exit_info.value.code == 2 and "error: " in capsys.readouterr().err
    cfg = small_cfg()
    config_lib.save_config(cfg, tmp_path)
    mica.write_run_model(tmp_path, cfg, TINY_ARCH, model)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        mica.run.load_run(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        mica.run.load_run_or_exit(str(tmp_path))
    assert exit_info.value.code == 2 and "has no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["iresnet", "landmarks"])
def test_image_without_a_face_is_a_clear_error(tmp_path, kind, request, model):
    pytest.importorskip("mediapipe", reason="face detection needs mediapipe (pip install 'dhjax[landmarks]')")
    from dhjax.capture import landmarks

    fixture = request.getfixturevalue("trained" if kind == "iresnet" else "trained_landmarks")
    path = dio.save_image(tmp_path / "wall.png", np.full((128, 128, 3), 0.5, np.float32))
    with pytest.raises(landmarks.NoFaceError, match="wall.png"):
        mica.run.predict_file(path, mica.best_variables(fixture["state"]), model, tmp_path / "out")
    assert not (tmp_path / "out" / "wall.obj").exists()


def _fake_splits(monkeypatch):
    """Replaces the synthetic data generator by random images (`random_batch`, with identities),
    so that the run functions' flow can be tested in seconds."""
    made = {"train": random_batch(8, seed=11), "val": random_batch(4, seed=12), "test": random_batch(4, seed=13),
            "calib": random_batch(4, seed=14)}
    for i, (name, d) in enumerate(made.items()):
        n = len(d["image"])
        d["identity"] = (1000 * i + np.arange(n) // (2 if name in ("train", "val", "test") else 1)).astype(np.int32)
        d["shape"][1::2] = d["shape"][::2]      # two images per identity share their shape
    monkeypatch.setattr(mica.data, "cached_splits", lambda data_cfg, names, verbose=True: {n: made[n] for n in names})
    monkeypatch.setattr(mica.data, "cached_split", lambda data_cfg, name, verbose=True: made[name])
    return made


def test_run_train_predict_evaluate_in_process(tmp_path, model, monkeypatch, capsys):
    """mica.run.train / predict / evaluate on a tiny landmark-encoder config (calibrated), with
    random data in place of the synthetic generator."""
    made = _fake_splits(monkeypatch)
    cfg = landmark_cfg()
    cfg.update(batch_size=4, select_every=2)
    cfg.train.update(steps=4, log_every=2, checkpoint_every=2, eval_every=2)
    cfg.eval.scan_points = 300
    cfg.calibration.update(enabled=True, folds=2, lambdas=(1.0, 100.0))
    cfg.data.calib_identities = (250_000, 4)
    work = tmp_path / "run"
    final = mica.run.train(cfg, work)
    out = capsys.readouterr().out
    assert "parameters:" in out and "heatmap/stem/kernel" in out       # the parameter overview
    assert "calibrating the mapping on the landmarks of 4 images of 4 held-out identities" in out
    assert final == json.loads((work / "final_metrics.json").read_text())
    assert final["selected_step"] in (2, 4) and final["calibration/lam"] in (1.0, 100.0)
    for split in ("val", "test"):
        assert final[f"{split}/per_identity_metric/n"] == 2
        for row in ("MICA_metric", "mean_face_metric"):
            assert final[f"{split}/{row}/median_mm"] > 0
    assert final["loss"] > 0                     # the training loop's metrics are merged, not replaced
    assert int(np.load(work / mica.CALIBRATION_FILE)["step"]) == 4
    assert json.loads((work / mica.RUN_MODEL_FILE).read_text())["encoder"]["kind"] == "landmarks"

    # the run predicts with its calibrated network
    _, variables, rec, step = mica.run.load_run(work)
    assert step == 4 and mica.net_from_variables(variables).n_hidden == 0

    # predict: two images with landmark files and one without a face (or without mediapipe)
    images, lmks = tmp_path / "images", tmp_path / "lmk"
    lmks.mkdir()
    for i in range(2):
        dio.save_image(images / f"face{i}.png", made["test"]["image"][i])
        np.save(lmks / f"face{i}.npy", made["test"]["lmk68"][i])
    dio.save_image(images / "wall.png", np.full((96, 96, 3), 0.4, np.float32))
    paths = mica.run.image_files(images)
    assert [p.name for p in paths] == ["face0.png", "face1.png", "wall.png"]
    failed = mica.run.predict(paths, work, landmarks_dir=lmks, out=tmp_path / "pred")
    assert [p.name for p, _ in failed] == ["wall.png"]
    npz = np.load(tmp_path / "pred" / "face0.npz")
    z, _ = mica.predict_image(variables, dio.load_image(images / "face0.png"), made["test"]["lmk68"][0])
    np.testing.assert_allclose(npz["shape"], z, atol=1e-5)     # float32: the five points by another route
    with pytest.raises(ValueError, match="no .png"):
        mica.run.image_files(lmks)

    # evaluate the run on its test split
    res = mica.run.evaluate(work, tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["summary"] == res["summary"]
    assert res["n_images"] == 4 and res["n_identities"] == 2 and res["checkpoint_step"] == 4
    assert list(res["summary"]) == list(mica.run.EVAL_ROWS)
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "Wilcoxon" in md and "| mean face | scaled |" in md


# ----------------------------------------------------------------------------------------------
# Data and benchmark.


def test_sample_cameras_deterministic_and_in_range():
    d = mica.default_data_config()
    a = mica.sample_cameras(d, 7, 1, 5)
    b = mica.sample_cameras(d, 7, 1, 5)
    np.testing.assert_array_equal(a.R, b.R)
    assert not np.allclose(mica.sample_cameras(d, 8, 1, 5).R, a.R)
    centre = -np.einsum("cji,cj->ci", np.asarray(a.R), np.asarray(a.t))
    rel = centre - np.asarray(d.target)
    dist = np.linalg.norm(rel, axis=1)
    assert np.all((dist > d.radius[0] - 0.03) & (dist < d.radius[1] + 0.03))
    az = np.degrees(np.arctan2(rel[:, 0], rel[:, 2]))
    assert np.all(np.abs(az) < d.azimuth_deg + 2)
    assert a.width == a.height == d.image_size


def test_benchmark_perfect_prediction_beats_the_mean_face(model):
    rng = np.random.default_rng(2)
    gt = rng.normal(size=(2, 300)).astype(np.float32)
    gt[:, 0] = [2.5, -2.5]        # clearly larger / smaller than the mean head
    scans = mica.synthetic_scans(model, gt, n_points=400, noise_mm=0.2)
    assert scans[0]["points"].shape == (400, 3) and scans[0]["landmarks"].shape == (7, 3)
    # landmarks are the moved NoW landmarks of the true mesh
    lm = np.asarray(mica.neutral_landmarks(model, mica.neutral_vertices(model, gt[:1]), mica.NOW_LANDMARKS)[0])
    np.testing.assert_allclose(scans[0]["landmarks"], lm @ scans[0]["R"].T + scans[0]["t"], atol=1e-5)
    rows = mica.benchmark(model, gt, gt, np.array([0, 1]), n_points=400)
    s = {k: v["summary"] for k, v in rows.items()}
    assert set(s) == {"MICA metric", "MICA scaled", "mean face metric", "mean face scaled"}
    assert s["MICA metric"]["median_mm"] < 0.3              # only the 0.2 mm scan noise is left
    assert s["mean face metric"]["median_mm"] > 3 * s["MICA metric"]["median_mm"]
    assert s["mean face scaled"]["median_mm"] < s["mean face metric"]["median_mm"]
    with pytest.raises(ValueError, match="same length"):
        mica.benchmark(model, gt, gt[:1], np.array([0, 1]))
    c = mica.compare_per_identity(rows, np.array([0, 1]))
    assert c["wins"] == 2 and c["identities"] == [0, 1] and c["mean_diff"] < -1.0
    with pytest.raises(ValueError, match="missing"):
        mica.compare_per_identity({"MICA metric": rows["MICA metric"]}, np.array([0, 1]))


def test_compare_per_identity_averages_an_identitys_images():
    per = lambda *m: {"per_scan": [{"mean_mm": x} for x in m]}  # noqa: E731
    # identities 7 (images 0, 2) and 3 (images 1, 3): MICA 1.0 / 3.0 on average; mean face 2.0 / 2.5
    rows = {"MICA metric": per(0.5, 2.0, 1.5, 4.0), "mean face metric": per(2.5, 2.0)}
    c = mica.compare_per_identity(rows, np.array([7, 3, 7, 3]))
    assert c["identities"] == [3, 7]
    np.testing.assert_allclose(c["mica_mm"], [3.0, 1.0])
    np.testing.assert_allclose(c["mean_face_mm"], [2.5, 2.0])
    assert c["wins"] == 1 and c["n"] == 2
    with pytest.raises(ValueError, match="hold 4 MICA and 2 mean-face scans; expected 3 and 2"):
        mica.compare_per_identity(rows, np.array([7, 3, 7]))


def test_cached_split_cleans_temp_files_of_killed_runs(tmp_path, monkeypatch):
    """A run killed while saving a split leaves a hidden temp .npz next to the cache; the next
    call removes it when its process is gone, keeps a live process's, and leaves none of its own."""
    import time

    from dhjax.data import cache as cache_lib

    d = mica.default_data_config()
    d.update(cache_dir=str(tmp_path))
    fake = {"image": np.zeros((2, 4, 4, 3), np.uint8), "five": np.zeros((2, 5, 2), np.float32),
            "shape": np.zeros((2, 3), np.float32)}
    monkeypatch.setattr(mica.data, "generate_split", lambda data_cfg, split, assets=None, verbose=True: fake)
    folder = mica.cache_path(d, "train").parent
    folder.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = cache_lib.host_tag()
    stale = folder / f".train.tmp.{host}.{proc.pid}.abc123_x.npz"
    live = folder / f".val.tmp.{host}.{os.getpid()}.abc123_x.npz"
    legacy = folder / ".train-k2j4h5g6.npz"         # the unowned name of earlier versions
    for p in (stale, live, legacy):
        p.write_bytes(b"partial")
    month_ago = time.time() - 30 * 24 * 3600
    os.utime(legacy, (month_ago, month_ago))
    data = mica.cached_split(d, "train", verbose=False)
    np.testing.assert_array_equal(data["five"], fake["five"])
    assert mica.cache_path(d, "train").exists()
    assert not stale.exists() and not legacy.exists() and live.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "key.json", "train.npz"])
    # A reuse marks the folder used (python -m dhjax.data.cache prunes by last use).
    os.utime(folder, (month_ago, month_ago))
    mica.cached_split(d, "train", verbose=False)
    assert time.time() - folder.stat().st_mtime < 60


# ----------------------------------------------------------------------------------------------
# Slow: data generation and the experiments end to end.


@pytest.mark.slow
def test_generated_five_points_lie_on_the_rendered_face(tmp_path):
    d = mica.default_data_config()
    d.synthetic.uv_size = 64
    d.update(image_size=96, train_identities=(0, 2), train_expressions=1, train_views=2, cache_dir=str(tmp_path))
    data = mica.cached_split(d, "train", verbose=False)
    assert data["image"].shape == (4, 96, 96, 3) and data["image"].dtype == np.uint8
    assert data["five"].shape == (4, 5, 2)
    np.testing.assert_array_equal(data["identity"], [0, 0, 1, 1])
    np.testing.assert_allclose(data["shape"][0], data["shape"][1])
    assert not np.allclose(data["shape"][0], data["shape"][2])
    assert np.all((data["five"] > 0) & (data["five"] < 96))
    # the eye points are left of / right of each other, the mouth below the eyes
    assert np.all(data["five"][:, 0, 0] < data["five"][:, 1, 0])
    assert np.all(data["five"][:, 3, 1] > data["five"][:, 0, 1])
    # cached: the second call reads the same arrays
    again = mica.cached_split(d, "train", verbose=False)
    np.testing.assert_array_equal(again["image"], data["image"])


def _run(module, *args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny_iresnet", "tiny"])
def test_train_predict_eval_end_to_end(tmp_path, variant, capsys):
    """mica.run.train / evaluate in-process on generated data; the programs (mica_train resuming
    the finished run, mica_predict, mica_eval) in subprocesses."""
    work = tmp_path / "run"
    over = {"data.train_identities": (0, 4), "data.val_identities": (500000, 2),
            "data.test_identities": (1000000, 2), "data.image_size": 128, "data.synthetic.uv_size": 64,
            "data.cache_dir": str(tmp_path / "cache"), "encoder.width": 4, "encoder.embedding": 16,
            "encoder.heatmap_width": 4, "batch_size": 4, "train.steps": 6, "train.log_every": 2,
            "train.checkpoint_every": 3, "train.eval_every": 3, "select_every": 2, "eval.scan_points": 500,
            "data.calib_identities": (250000, 4), "calibration.folds": 2}
    cfg = config_lib.apply_overrides(config_lib.load_config(os.path.join(ROOT, f"configs/mica.py:{variant}")),
                                     over)
    mica.run.train(cfg, work)
    out = capsys.readouterr().out
    kind = "landmarks" if variant == "tiny" else "iresnet"
    assert json.loads((work / "mica_model.json").read_text())["encoder"]["kind"] == kind
    assert "metric benchmark on the test split" in out
    final = json.loads((work / "final_metrics.json").read_text())
    for split in ("val", "test"):
        for row in ("MICA_metric", "mean_face_metric"):
            assert final[f"{split}/{row}/median_mm"] > 0
    assert final["selected_step"] in (2, 4, 6)
    if variant == "tiny":             # the landmark encoder's mapping is calibrated after training
        assert "calibrating the mapping on the landmarks of 4 images of 4 held-out identities" in out
        assert int(np.load(work / mica.CALIBRATION_FILE)["step"]) == 6 and final["calibration/lam"] > 0
    else:
        assert not (work / mica.CALIBRATION_FILE).exists()
    assert (work / "metrics.jsonl").read_text().count("\n") >= 3
    # resuming a finished run trains no more steps
    out = _run("experiments.mica_train", f"--config=configs/mica.py:{variant}", f"--workdir={work}",
               *config_lib.override_flags(over)).stdout
    assert "resumed from" in out and "training: 0 steps" in out

    # predict: two test images with landmark files, one image without a face
    cfg = config_lib.apply_overrides(config_lib.load_config(os.path.join(ROOT, f"configs/mica.py:{variant}")), {
        "data.test_identities": (1_000_000, 2), "data.image_size": 128, "data.synthetic.uv_size": 64,
        "data.cache_dir": str(tmp_path / "cache")})
    test = mica.cached_split(cfg.data, "test", verbose=False)
    images, lmks = tmp_path / "images", tmp_path / "lmk"
    lmks.mkdir()
    for i in range(2):
        dio.save_image(images / f"face{i}.png", test["image"][i])
        np.save(lmks / f"face{i}.npy", test["lmk68"][i])
    dio.save_image(images / "wall.png", np.full((96, 96, 3), 0.4, np.float32))
    proc = _run("experiments.mica_predict", f"--images={images}", f"--workdir={work}", f"--landmarks={lmks}",
                f"--out={tmp_path / 'pred'}", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "wall.png" in proc.stderr and "2 of 3 images predicted" in proc.stdout
    v, f = dio.load_mesh(tmp_path / "pred" / "face0.obj")
    npz = np.load(tmp_path / "pred" / "face0.npz")
    assert npz["shape"].shape == (300,) and npz["landmarks3d"].shape == (68, 3)
    np.testing.assert_allclose(npz["vertices"], v, atol=1e-6)
    size = mica.crop_size(kind)
    assert dio.load_image(tmp_path / "pred" / "face0_crop.png").shape == (size, size, 3)

    # eval
    mica.run.evaluate(work, tmp_path / "eval")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(res["summary"]) == {"MICA metric", "MICA scaled", "mean face metric", "mean face scaled"}
    assert res["n_images"] == 4 and res["n_identities"] == 2
    assert res["per_identity"]["metric"]["n"] == 2 and len(res["per_identity"]["scaled"]["mica_mm"]) == 2
    assert "Wilcoxon" in (tmp_path / "eval" / "results.md").read_text()
    assert "| mean face | scaled |" in (tmp_path / "eval" / "results.md").read_text()
    assert (tmp_path / "eval" / "cumulative_errors.png").stat().st_size > 1000
    # a workdir without a run
    proc = _run("experiments.mica_eval", f"--workdir={tmp_path / 'nothing'}", check=False)
    assert proc.returncode == 2 and "not a MICA training run" in proc.stderr
