"""MICA's training state, optimiser and step, for `dhjax.train.loop` (`method_functions`).

BatchNorm (`encoder.batch_stats`): "auto" trains a from-scratch iresnet with batch statistics
(running averages updated) and runs a pretrained one on its frozen running statistics
(insightface's ONNX files fold most BatchNorms into the convolutions, imported as identity
BatchNorms); "train" / "frozen" force either mode. The landmark encoder has GroupNorm only.

Trainable parameters (`labels`): with pretrained weights only the encoder's last
`encoder.last_blocks` blocks and head (`dhjax.nn.iresnet.trainable_mask`); from scratch, and in
the landmark encoder, every parameter. The mapping network always trains.

Model selection: the training state keeps a copy of the network with the lowest validation
error seen so far (`validation_error`: mean face-region vertex distance in mm between predicted
and true neutral meshes in the model's canonical frame, no alignment), evaluated every
`select_every` steps inside the jitted step; `best_variables(state)` returns it.

Images (`render_function`, the harness's images convention): eval/meshes, for the first
RENDER_ROWS validation crops, the true neutral mesh | the current network's prediction (both
shaded grey, from the front, `front_views`) | the prediction coloured by vertex error (white 0 mm
-> red >= ERROR_RED_MM) | the input crop.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dhjax.capture.mica import landmark_net as mlm
from dhjax.capture.mica.crops import crop_images
from dhjax.capture.mica.loss import loss_fn, neutral_vertices, region_weights, vertex_errors_mm
from dhjax.capture.mica.model import LandmarkMicaNet, arch_kind, check_kind, crop_size, make_net
from dhjax.models import flame
from dhjax.nn import iresnet
from dhjax.render import camera as camera_lib
from dhjax.render import shading
from dhjax.train import logs

_NO_BEST = 1e30  # validation error before the first selection (finite: the loop skips non-finite states)
RENDER_ROWS = 4        # validation images in the render's grid
ERROR_RED_MM = 5.0     # vertex error drawn fully red in the render


def bn_mode(cfg) -> str:
    """The BatchNorm mode of a config: "train" (batch statistics), "frozen" (running
    statistics) or "none" (the landmark encoder, GroupNorm only)."""
    if check_kind(cfg.encoder.get("kind", "iresnet")) == "landmarks":
        return "none"          # GroupNorm only
    mode = cfg.encoder.batch_stats
    if mode == "auto":
        return "frozen" if cfg.encoder.onnx_path else "train"
    if mode not in ("train", "frozen"):
        raise ValueError(f"encoder.batch_stats must be 'auto', 'train' or 'frozen', got {mode!r}")
    return mode


def labels(cfg, params) -> dict:
    """'train' / 'freeze' label per parameter: with pretrained weights only the encoder's last
    `encoder.last_blocks` blocks and head train (`iresnet.trainable_mask`, features.scale fixed as
    in arcface_torch); from scratch (and in the landmark encoder) every parameter trains. The
    mapping network always trains."""
    if "encoder" not in params:     # landmark encoder
        return jax.tree_util.tree_map(lambda _: "train", dict(params))
    if cfg.encoder.onnx_path:
        mask = iresnet.trainable_mask(params["encoder"], last_blocks=int(cfg.encoder.last_blocks))
    else:
        mask = iresnet.trainable_mask(params["encoder"], last_blocks=None, freeze_feature_scale=False)
    enc = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", mask)
    return {"encoder": enc, "mapping": jax.tree_util.tree_map(lambda _: "train", params["mapping"])}


def _schedule(optim, steps: int):
    lr, warm = float(optim.lr), int(optim.warmup_steps)
    if optim.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(int(steps) - warm, 1))
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")
    if warm > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
    return main


def make_optimizer(cfg, params, steps: int | None = None):
    """AdamW (optim.lr, optim.weight_decay, schedule, optional clipping) on the trainable
    parameters (`labels`); frozen ones get exactly zero updates. steps: total steps for the
    cosine schedule (cfg.train.steps when None)."""
    steps = int(cfg.train.steps) if steps is None else int(steps)
    o = cfg.optim
    parts = [optax.clip_by_global_norm(float(o.clip))] if o.clip else []
    tx = optax.chain(*parts, optax.adamw(_schedule(o, steps), weight_decay=float(o.weight_decay)))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels(cfg, params))


def _init_variables(net, rng, x):
    """net.init; called with a concrete key on CPU it compiles without XLA's expensive
    optimisations (a one-off random initialisation: ~3 s to compile instead of ~10 s)."""
    init = functools.partial(net.init, train=False)
    if isinstance(rng, jax.core.Tracer) or jax.default_backend() != "cpu":
        return init(rng, x)
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(init).lower(rng, x).compile(compiler_options=fast)(rng, x)


def init_state(rng, cfg, arch: Mapping[str, Any], encoder_variables: Mapping[str, Any] | None = None) -> dict:
    """A fresh training state.

    Args:
      rng: PRNG key; cfg: config (`default_config` layout, with `train.steps`);
      arch: encoder architecture (`encoder_arch`);
      encoder_variables: pretrained IResNet variables to start from (`load_encoder_weights`),
        or None for random initialisation (always for the landmark encoder).
    Returns:
      {"step", "params", "batch_stats", "opt_state", "best": {"params", "batch_stats",
      "val_mm", "step"}} (best.step = -1 until the first validation; batch_stats is {} for
      the landmark encoder).
    """
    net = make_net(cfg, arch)
    size = crop_size(arch_kind(arch))
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    if encoder_variables is not None and arch_kind(arch) != "iresnet":
        raise ValueError("encoder_variables: pretrained weights exist only for the iresnet encoder")
    if encoder_variables is not None:
        shapes = jax.eval_shape(functools.partial(net.init, train=False), rng, x)
        want = jax.tree_util.tree_map(lambda a: tuple(a.shape), {"params": shapes["params"]["encoder"],
                                                                  "batch_stats": shapes["batch_stats"]["encoder"]})
        have = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), {
            "params": encoder_variables["params"], "batch_stats": encoder_variables["batch_stats"]})
        if want != have:
            raise ValueError("encoder_variables do not fit the encoder architecture "
                             f"{dict(arch)} (different layers or shapes)")
    variables = _init_variables(net, rng, x)
    params = dict(variables["params"])
    stats = dict(variables.get("batch_stats", {}))
    if encoder_variables is not None:
        params["encoder"] = jax.tree_util.tree_map(jnp.asarray, encoder_variables["params"])
        stats["encoder"] = jax.tree_util.tree_map(jnp.asarray, encoder_variables["batch_stats"])
    opt_state = make_optimizer(cfg, params).init(params)
    return dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats, opt_state=opt_state,
                best=dict(params=params, batch_stats=stats, val_mm=jnp.asarray(_NO_BEST, jnp.float32),
                          step=jnp.asarray(-1, jnp.int32)))


def state_template(cfg, arch: Mapping[str, Any]):
    """Abstract training state (ShapeDtypeStructs) of a config, for restoring checkpoints."""
    return jax.eval_shape(lambda k: init_state(k, cfg, arch), jax.random.PRNGKey(0))


def best_variables(state) -> dict:
    """The selected network {"params", "batch_stats"} of a (concrete, not traced) training
    state; the current network when no validation has run yet (best.step = -1)."""
    best = state["best"]
    if int(np.asarray(jax.device_get(best["step"]))) < 0:
        return {"params": state["params"], "batch_stats": state["batch_stats"]}
    return {"params": best["params"], "batch_stats": best["batch_stats"]}


def _apply(net, params, stats, crops, train: bool):
    variables = {"params": params, "batch_stats": stats}
    if train:
        z, upd = net.apply(variables, crops, train=True, mutable=["batch_stats"])
        return z, upd["batch_stats"]
    return net.apply(variables, crops, train=False), stats


def validation_error(net, variables, crops, gt_shape, model, face_mask, chunk: int = 32):
    """Model-selection metric: mean over images of the mean face-region vertex distance (mm)
    between predicted and true neutral meshes (canonical frame, no alignment).

    crops [N, C, C, 3] uint8 or floats (the net's crops); gt_shape [N, S]; face_mask [V] bool. jit-able
    (chunks of `chunk` images through lax.map; N must divide by chunk or be smaller)."""
    n = crops.shape[0]
    chunk = min(int(chunk), n)
    if n % chunk:
        raise ValueError(f"validation set of {n} images does not split into chunks of {chunk}")
    c = crops.reshape((n // chunk, chunk) + crops.shape[1:])
    z = jax.lax.map(lambda x: net.apply(variables, x, train=False), c).reshape(n, -1)
    err = vertex_errors_mm(model, z, gt_shape)
    w = jnp.asarray(face_mask, jnp.float32)
    return jnp.mean(jnp.sum(err * w, axis=1) / jnp.maximum(jnp.sum(w), 1.0))


def train_step(state, batch, rng, *, cfg, net, model, weights, face_mask, val=None):
    """One MICA step: crop the batch at its (noise-augmented) five points, predict, weighted
    vertex L1, AdamW; every `select_every` steps validate and keep the best network.

    With the landmark encoder (`LandmarkMicaNet`) the loss adds loss.landmark_weight x the mean
    absolute error (crop pixels) of the 68 predicted landmarks against the ground-truth ones
    moved into the (jittered) crop; the shape loss reaches only the mapping network.

    batch: image [B, H, W, 3] uint8, five [B, 5, 2] pixels, shape [B, S] (and lmk68 [B, 68, 2]
    pixels for the landmark encoder). val: None or {"crops" [N, S, S, 3] uint8, "shape" [N, S]}
    (constants of the step).
    Returns (state, metrics: loss, face_mm, mean_mm, grad_norm, val_mm (best so far); with the
    landmark encoder also shape_loss and landmark_px).
    """
    images = batch["image"]
    five = batch["five"].astype(jnp.float32)
    noise = float(cfg.data.landmark_noise_px)
    if noise > 0:
        five = five + noise * jax.random.normal(rng, five.shape)
    landmark_net = isinstance(net, LandmarkMicaNet)
    crops = crop_images(images, five, kind="landmarks" if landmark_net else "iresnet")
    gt = batch["shape"].astype(jnp.float32)
    train_bn = bn_mode(cfg) == "train"
    scale = float(cfg.loss.scale)
    extra = {}

    if landmark_net:
        if "lmk68" not in batch:
            raise KeyError("the landmark encoder trains on batches with 'lmk68' (the projected "
                           f"ground-truth 68 landmarks); this batch has {sorted(batch)}")
        target = mlm.to_crop(batch["lmk68"].astype(jnp.float32), mlm.crop_transform(five))
        lw = float(cfg.loss.landmark_weight)

        def objective(params):
            z, pts = net.apply({"params": params}, crops, method=LandmarkMicaNet.shape_and_landmarks)
            shape_loss = scale * loss_fn(z, gt, model, weights)
            lmk = jnp.mean(jnp.abs(pts - target))
            return shape_loss + lw * lmk, (z, state["batch_stats"], shape_loss, lmk)

        (loss, (z, stats, shape_loss, lmk)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        extra = dict(shape_loss=shape_loss, landmark_px=lmk)
    else:
        def objective(params):
            z, stats = _apply(net, params, state["batch_stats"], crops, train_bn)
            return scale * loss_fn(z, gt, model, weights), (z, stats)

        (loss, (z, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    tx = make_optimizer(cfg, state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    best = state["best"]
    if val is not None:
        every = max(int(cfg.select_every), 1)

        def select(best):
            err = validation_error(net, {"params": params, "batch_stats": stats}, val["crops"],
                                   val["shape"], model, face_mask)
            new = dict(params=params, batch_stats=stats, val_mm=err.astype(jnp.float32), step=step)
            return jax.lax.cond(err < best["val_mm"], lambda: new, lambda: best)

        best = jax.lax.cond(step % every == 0, select, lambda b: b, best)
    err = jax.lax.stop_gradient(vertex_errors_mm(model, z, gt))
    fm = jnp.asarray(face_mask, jnp.float32)
    metrics = dict(loss=loss, face_mm=jnp.mean(jnp.sum(err * fm, 1) / jnp.sum(fm)), mean_mm=jnp.mean(err),
                   grad_norm=optax.tree.norm(grads), val_mm=best["val_mm"],
                   best_step=best["step"].astype(jnp.float32), **extra)
    return dict(step=step, params=params, batch_stats=stats, opt_state=opt_state, best=best), metrics


def front_views(model: flame.FlameModel, vertices, size: int, vertex_colors=None) -> jax.Array:
    """Head meshes in the model's canonical frame seen from the front (0.95 m, 20 degrees field of
    view), Lambert-shaded from the upper right on white (`dhjax.render.shading.render_mesh`).

    vertices [N, V, 3] metres; vertex_colors [N, V, 3] in [0, 1] (default light grey).
    Returns [N, size, size, 3] in [0, 1]. Eager: the rasterizer sizes its buffers on the host."""
    vertices = jnp.asarray(vertices, jnp.float32)
    n = vertices.shape[0]
    cam = camera_lib.rig_from_angles([0.0], 0.0, 0.95, target=(0.0, -0.02, 0.0), fov_y_deg=20.0,
                                     width=int(size), height=int(size))
    cam = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[0], (n,) + a.shape[1:]), cam)
    colors = jnp.full(vertices.shape, 0.85, jnp.float32) if vertex_colors is None else vertex_colors
    out = shading.render_mesh(vertices, model.faces, cam, vertex_colors=colors)
    light = jnp.array([0.2, 0.3, 1.0]) / jnp.linalg.norm(jnp.array([0.2, 0.3, 1.0]))
    shade = 0.25 + 0.75 * jnp.clip(jnp.sum(out["normals"] * light, -1, keepdims=True), 0.0, 1.0)
    mask = out["mask"]
    return jnp.clip(out["image"] * shade * mask + (1.0 - mask), 0.0, 1.0)


def method_functions(cfg, arch, model: flame.FlameModel, *, encoder_variables=None, val=None):
    """(init, train_step, evaluate) for `dhjax.train.loop.Method` (its render: `render_function`).

    evaluate(state, batch) with batch {"crops", "shape"} gives the current network's face_mm /
    mean_mm and the selected one's best_mm on it."""
    net = make_net(cfg, arch)
    weights = jnp.asarray(region_weights(model, dict(cfg.loss.region_weights), float(cfg.loss.default_weight)))
    if "face" not in model.regions:
        raise ValueError(f"model {model.name!r} has no 'face' region (model selection uses it)")
    face_mask = jnp.asarray(model.regions["face"])
    val = None if val is None else {"crops": jnp.asarray(val["crops"]), "shape": jnp.asarray(val["shape"])}

    def init(rng, batch):
        del batch
        return init_state(rng, cfg, arch, encoder_variables)

    def step(state, batch, rng):
        return train_step(state, batch, rng, cfg=cfg, net=net, model=model, weights=weights,
                          face_mask=face_mask, val=val)

    def evaluate(state, batch):
        z = net.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, batch["crops"])
        zb = net.apply({"params": state["best"]["params"], "batch_stats": state["best"]["batch_stats"]},
                       batch["crops"])
        gt = batch["shape"].astype(jnp.float32)
        err, errb = vertex_errors_mm(model, z, gt), vertex_errors_mm(model, zb, gt)
        fm = face_mask.astype(jnp.float32)
        face = lambda e: jnp.mean(jnp.sum(e * fm, 1) / jnp.sum(fm))  # noqa: E731
        return dict(face_mm=face(err), mean_mm=jnp.mean(err), best_face_mm=face(errb),
                    loss=float(cfg.loss.scale) * loss_fn(z, gt, model, weights))

    return init, step, evaluate


def render_function(cfg, arch, model: flame.FlameModel):
    """render(state, batch) for `dhjax.train.loop.Method`: with batch {"crops", "shape"} (the
    evaluation batch), {"eval/meshes": grid [1, H', W', 3]} of the module docstring (the current
    network on the first RENDER_ROWS crops; the network runs jitted, the rasterizer eagerly)."""
    net = make_net(cfg, arch)

    @jax.jit
    def _predict_few(state, batch):
        crops = batch["crops"][:RENDER_ROWS]
        z = net.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, crops)
        gt = batch["shape"][:RENDER_ROWS].astype(jnp.float32)
        frac = jnp.clip(vertex_errors_mm(model, z, gt) / ERROR_RED_MM, 0.0, 1.0)[..., None]
        colours = (1.0 - frac) * jnp.ones(3) + frac * jnp.array([0.85, 0.1, 0.1])
        return crops, neutral_vertices(model, gt), neutral_vertices(model, z), colours

    def render(state, batch):
        crops, v_true, v_pred, colours = (np.asarray(a) for a in _predict_few(state, batch))
        size = crops.shape[1]
        return {"eval/meshes": logs.comparison_grid(front_views(model, v_true, size), front_views(model, v_pred, size),
                                                    front_views(model, v_pred, size, colours), crops)}

    return render
