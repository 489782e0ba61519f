"""SynShot few-shot inversion (pivotal tuning) of the prior on N images of one subject.

Inputs per image: RGB, foreground mask, camera (K, R, t) and tracked head-model parameters
(shape, expression, pose, translation): the dataset layout of `dhjax.data.dataset`, as the
synthetic generator and the tracker write it. The network's input maps are built from them
(`subject_maps`): the neutral position map from the tracked shape, the expression-offset map of
each image's tracked expression, and an albedo map back-projected from the input images
(`dhjax.render.texture.extract_texture`; it carries the photos' lighting, which is the domain
gap the tuning bridges).

Stages (`run_stage`), each with warm-up + early stopping on an EMA of the loss (`EarlyStopper`)
and steps = steps_per_frame x N; `inversion_labels` gives each stage's trained groups:
  1. fine-tune E_id only (the pivot: a z_id that explains the images),
  2. fix q(z_id) and fine-tune D_feat, D_id, D_expr and the part regressors.
Stage 0 trains every parameter from the current weights (used for the from-scratch baseline
with randomly initialised weights).

Optional ArcFace terms (`arcface_loss`): with insightface weights (`dhjax.io.onnx_weights`),
the identity term 1 - cos(e(render), e(image)) and a feature term (mean squared difference of
the four stage outputs) on 112 x 112 crops aligned by the projected tracked landmarks.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dhjax.capture import align
from dhjax.data import textures
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import texture as texture_lib
from dhjax.synthesis import synshot
from dhjax.train import loop

REQUIRED = ("image", "mask", "K", "R", "t", "shape", "expression", "pose", "translation")


# ----------------------------------------------------------------------------------------------
# The subject's images and maps.


def subject_samples(dataset, item: int) -> list:
    """Every sample of item number `item` (ordinal in the split) of a `dhjax.data.dataset`
    FolderDataset."""
    idx = [i for i, e in enumerate(dataset.entries) if e[3] == item]
    if not idx:
        raise ValueError(f"split '{dataset.split_dir}' has no item {item} (it has "
                         f"{len({e[3] for e in dataset.entries})} items)")
    return [dataset[i] for i in idx]


def split_inputs(samples, frame_ordinals, views) -> tuple[list, list]:
    """(inputs, held out): the samples of the subject's frames `frame_ordinals` (an ordinal among
    its frames, or several: e.g. frames of a monocular video, each with its own tracked expression
    and pose) seen from `views` (camera numbers), in frame then view order, and every other sample."""
    ordinals = (frame_ordinals,) if np.ndim(frame_ordinals) == 0 else tuple(frame_ordinals)
    frames = sorted({int(s["frame"]) for s in samples})
    bad = [int(o) for o in ordinals if not 0 <= int(o) < len(frames)]
    if not ordinals or bad:
        raise ValueError(f"input frame(s) {bad or '()'} out of range (data.input_frame / data.input_frames): the "
                         f"subject has {len(frames)} frames")
    if len(set(int(o) for o in ordinals)) != len(ordinals):
        raise ValueError(f"data.input_frames {ordinals} names a frame twice")
    wanted = set(int(v) for v in views)
    chosen = []
    for o in ordinals:
        f = frames[int(o)]
        these = [s for s in samples if int(s["frame"]) == f and int(s["view"]) in wanted]
        if len(these) != len(views):
            have = sorted(int(s["view"]) for s in samples if int(s["frame"]) == f)
            raise ValueError(f"data.input_views {tuple(views)} not all present in frame {f} (views: {have})")
        chosen += sorted(these, key=lambda s: int(s["view"]))
    taken = {(int(s["frame"]), int(s["view"])) for s in chosen}
    rest = [s for s in samples if (int(s["frame"]), int(s["view"])) not in taken]
    return chosen, rest


def check_subject(samples) -> None:
    """Clear errors for unusable inversion inputs (missing cameras/masks/parameters, mixed
    image sizes, no images)."""
    if not samples:
        raise ValueError("inversion needs at least one image of the subject")
    for i, s in enumerate(samples):
        missing = [k for k in REQUIRED if k not in s]
        if missing:
            what = ("camera" if {"K", "R", "t"} & set(missing) else "mask" if "mask" in missing else
                    "tracked parameters")
            raise ValueError(f"image {i} of the subject lacks {missing} ({what}): inversion needs every image "
                             f"with its mask, camera (K, R, t) and tracked head-model parameters")
        if s["mask"].shape != s["image"].shape[:2]:
            raise ValueError(f"image {i}: mask {s['mask'].shape} does not match image {s['image'].shape[:2]}")
    sizes = {s["image"].shape for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"subject images differ in size: {sorted(sizes)}")


def subject_maps(samples, model, uv_size: int, *, texture_views=None, skin_only: bool = False):
    """Network input maps for a subject: extracted albedo [T,T,3] (shared), neutral position map
    [T,T,3] of the tracked shape (shared), expression-offset map [T,T,3] per sample.

    Args:
      samples: list of sample dicts (REQUIRED keys); texture_views: indices of the samples the
        albedo is extracted from (default all); model: the head model the parameters refer to.
    Returns:
      dict(uv_albedo [T,T,3], uv_position [T,T,3], uv_expression_offset [N,T,T,3], texture_weight [T,T]).
    """
    check_subject(samples)
    fields = textures.uv_fields(model, uv_size)
    views = list(range(len(samples))) if texture_views is None else list(texture_views)
    sel = [samples[i] for i in views]
    st = lambda k, ss: np.stack([np.asarray(s[k], np.float32) for s in ss])
    out = flame.forward(model, st("shape", sel), st("expression", sel), st("pose", sel), st("translation", sel))
    h, w = sel[0]["image"].shape[:2]
    cams = camera_lib.Camera(K=jnp.asarray(st("K", sel)), R=jnp.asarray(st("R", sel)), t=jnp.asarray(st("t", sel)),
                             width=int(w), height=int(h))
    masks = st("mask", sel)
    if skin_only:
        masks = masks * np.stack([(np.asarray(s["seg"]) == 1) if "seg" in s else np.ones_like(s["mask"]) for s in sel])
    tex, weight = texture_lib.extract_texture(st("image", sel), masks, cams, out.vertices, model.faces,
                                              model.uv_coords, model.uv_faces, uv_size)
    shape = np.asarray(samples[0]["shape"], np.float32)
    pos = textures.position_map(model, fields, shape)
    return dict(uv_albedo=np.asarray(tex), uv_position=np.asarray(pos),
                uv_expression_offset=expression_maps_for(samples, model, uv_size, fields=fields),
                texture_weight=np.asarray(weight))


def subject_batch(samples, maps: dict) -> dict:
    """Stack samples into a model batch with the subject's maps (expression maps per sample)."""
    n = len(samples)
    st = lambda k: np.stack([np.asarray(s[k], np.float32) for s in samples])
    batch = {k: st(k) for k in ("image", "mask", "K", "R", "t", "shape", "expression", "pose", "translation")}
    batch["uv_albedo"] = np.broadcast_to(maps["uv_albedo"], (n,) + maps["uv_albedo"].shape).copy()
    batch["uv_position"] = np.broadcast_to(maps["uv_position"], (n,) + maps["uv_position"].shape).copy()
    batch["uv_expression_offset"] = np.asarray(maps["uv_expression_offset"], np.float32)
    return batch


def expression_maps_for(samples, model, uv_size: int, *, fields=None) -> np.ndarray:
    """Expression-offset maps [N, T, T, 3] of the samples' tracked expressions (`fields`: the
    model's UVFields at uv_size, rasterised here when not given)."""
    fields = textures.uv_fields(model, uv_size) if fields is None else fields
    return np.stack([np.asarray(textures.expression_offset_map(model, fields, np.asarray(s["expression"], np.float32)))
                     for s in samples])


# ----------------------------------------------------------------------------------------------
# ArcFace terms.


def arcface_loss(arc_variables, model, *, id_weight: float = 1.0, feat_weight: float = 1.0):
    """(render [B,H,W,3], batch) -> (loss, metrics) of the ArcFace identity and feature terms.

    Crops: the 68 tracked landmarks (model.lmk_faces) are projected with each example's camera,
    reduced to 5 points (`align.five_points_from_68`) and both images are warped to the 112 x 112
    ArcFace template. Identity: 1 - cosine of the embeddings; features: mean squared difference of
    the outputs of the network's four stages (`capture_intermediates`)."""
    from dhjax.nn import iresnet

    net = iresnet.model_from_config(iresnet.config_from_variables(arc_variables))

    def feats(images):
        x = iresnet.preprocess(images)
        emb, state = net.apply(arc_variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
        inter = state["intermediates"]
        last = {}                                   # stage -> (block index, its output)
        for k, v in inter.items():
            if k.startswith("layer") and "_" in k:
                s_, b_ = k[5:].split("_", 1)
                if (int(b_), ) > (last.get(int(s_), (-1, None))[0],):
                    last[int(s_)] = (int(b_), v["__call__"][0])
        stages = [last[s_][1] for s_ in sorted(last)]
        return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-8), stages

    def fn(render, batch):
        lm = flame.forward(model, batch["shape"], batch["expression"], batch["pose"], batch["translation"]).landmarks
        cams = camera_lib.Camera(K=batch["K"], R=batch["R"], t=batch["t"], width=render.shape[2],
                                 height=render.shape[1])
        uv = jax.vmap(lambda c, p: camera_lib.project(c, p)[0])(cams, lm)          # [B,68,2]
        five = align.five_points_from_68(uv)
        target = batch["image"] * batch["mask"][..., None]
        crop = jax.vmap(align.arcface_crop)
        er, fr = feats(crop(render, five))
        et, ft = feats(crop(target, five))
        ident = jnp.mean(1.0 - jnp.sum(er * et, -1))
        feat = sum(jnp.mean((a - jax.lax.stop_gradient(b)) ** 2) for a, b in zip(fr, ft)) / max(len(fr), 1)
        return id_weight * ident + feat_weight * feat, {"arcface_id": ident, "arcface_feat": feat}

    return fn


# ----------------------------------------------------------------------------------------------
# Stages.

STAGE_GROUPS = {
    # stage 1: recover z_id by fine-tuning the identity encoder only
    1: ("enc_id",),
    # stage 2: z_id fixed; decoders and regressors adapt to the subject
    2: ("dec_feat", "dec_id", "dec_expr", "reg_"),
}


def inversion_labels(params, stage: int):
    """Pytree of 'train' | 'freeze' labels for inversion stage 1 or 2 (`STAGE_GROUPS`); 'scratch'
    (stage 0) trains everything."""
    if stage == 0:
        return jax.tree_util.tree_map(lambda _: "train", params)
    if stage not in STAGE_GROUPS:
        raise ValueError(f"inversion stage must be 0, 1 or 2, got {stage}")
    groups = STAGE_GROUPS[stage]
    return {k: jax.tree_util.tree_map(lambda _: "train" if k.startswith(groups) else "freeze", v)
            for k, v in params.items()}


class EarlyStopper(NamedTuple):
    """Early stopping on an exponential moving average of the loss, after a warm-up.

    Stops when the EMA has not improved by `min_delta` (relative) for `patience` steps after
    `warmup` steps. Host-side, immutable: `update` returns a new stopper and a stop flag."""

    warmup: int
    patience: int
    decay: float = 0.9
    min_delta: float = 1e-3
    ema: float = float("nan")
    best: float = float("inf")
    since_best: int = 0
    steps: int = 0

    def update(self, loss: float) -> tuple["EarlyStopper", bool]:
        """(the stopper after one more loss, whether to stop now)."""
        ema = loss if np.isnan(self.ema) else self.decay * self.ema + (1 - self.decay) * loss
        steps = self.steps + 1
        if ema < self.best * (1 - self.min_delta):
            best, since = ema, 0
        else:
            best, since = self.best, self.since_best + 1
        new = self._replace(ema=ema, best=best, since_best=since, steps=steps)
        return new, steps > self.warmup and since >= self.patience


def frozen_code(state, batch, ctx: synshot.Context):
    """The stage-2 pivot q(E_id(x_tex, x_verts)) [B,h,w,n] of a batch (identical for all images
    of one subject, whose maps share albedo and positions)."""

    def body(mdl, x_tex, x_verts, x_expr):
        z_id, z_expr = mdl.encode(x_tex, x_verts, x_expr)
        q_id, _, _ = mdl.quantize(z_id, z_expr, False)
        return q_id

    return nn.apply(body, ctx.net)(synshot.net_variables(state["params"], state["stats"]),
                                   *synshot.batch_maps(batch, ctx))


STAGE1_LOSSES = ("full", "photometric")


def stage1_context(ctx: synshot.Context, loss: str) -> synshot.Context:
    """The context of stage 1 for `loss`: "full" is ctx (the prior's loss: renders, maps,
    geometry, regularisers, VQ); "photometric" keeps only the render terms (L1, SSIM, LPIPS and
    the ArcFace terms when on) and the Gaussian regularisers, dropping the map, geometry and VQ
    terms, which compare the decoded maps with maps built from the photos (the back-projected
    albedo carries their lighting). Raises ValueError for another name."""
    if loss not in STAGE1_LOSSES:
        raise ValueError(f"config field stage1.loss must be one of {STAGE1_LOSSES}, got {loss!r}")
    if loss == "full":
        return ctx
    lc = ctx.loss_cfg.copy_and_resolve_references()
    lc.update(map_l1=0.0, map_ssim=0.0, geom=0.0, vq=0.0)
    return ctx.replace(loss_cfg=lc)


def run_stage(state, batch, ctx: synshot.Context, *, stage: int, steps: int, stopper: EarlyStopper, q_id=None,
              seed: int = 0, log: Callable | None = print):
    """Runs one inversion stage (1: E_id; 2: decoders + regressors with q_id fixed; 0: all) on a
    batch of the subject's images for at most `steps` steps (optimiser: ctx.optim_cfg, fresh
    state), stopping early when `stopper` (warm-up, patience, EMA decay) says so.
    Returns (state, info dict: steps, stopped_early, first_loss, last_loss, seconds)."""
    labels = inversion_labels(state["params"], stage)
    tx = synshot.make_optimizer(ctx.optim_cfg, labels)
    # The state is placed like the step's outputs (replicated over the data mesh): an uncommitted
    # state on the first call and a replicated one from the second on made jit compile the whole
    # step twice (as `dhjax.train.loop.train` notes for the prior's step).
    replicated = NamedSharding(loop.data_mesh(), P())
    state = jax.device_put(dict(state, opt_state=tx.init(state["params"])), replicated)
    step_fn = jax.jit(functools.partial(synshot.train_step, ctx=ctx, labels=labels), out_shardings=replicated)
    t0, losses, done = time.time(), [], 0
    mesh_n = jax.device_count()
    if batch["image"].shape[0] % mesh_n:
        raise ValueError(f"the subject batch ({batch['image'].shape[0]} images) must divide by the {mesh_n} devices")
    for i in range(int(steps)):
        state, metrics = step_fn(state, batch, jax.random.PRNGKey(seed + i), q_id=q_id)
        loss = float(metrics["loss"])
        losses.append(loss)
        done = i + 1
        stopper, stop = stopper.update(loss)
        if log and (done % max(steps // 10, 1) == 0 or stop):
            log(f"  stage {stage}: step {done}/{steps} loss {loss:.4f} (EMA {stopper.ema:.4f}) "
                f"PSNR {float(metrics['psnr']):.2f} dB, {time.time() - t0:.0f}s")
        if stop:
            break
    return state, dict(steps=done, stopped_early=done < int(steps), first_loss=losses[0] if losses else float("nan"),
                       last_loss=losses[-1] if losses else float("nan"), seconds=time.time() - t0)
