"""SynShot runs: training the prior (`run_prior`) and inverting it on a few images of one subject
(`run_invert`), each writing its outputs into a run folder (`dhjax.train.app`).

Prior run folder: checkpoints/ (resumable), TensorBoard events (scalars, the config as
HParams, and the image eval/heldout: masked ground truth | render of 4 held-out images, at every
evaluation step and the end) and metrics.jsonl,
final_metrics.json (training metrics + held-out metrics + the mean-image baseline),
heldout_metrics.json, heldout_grid.png (held-out identities: ground truth above the render, for
several views and every expression), avatar_heldout0.ply (the first held-out identity's Gaussians
in 3DGS layout, model space) and config.json.

Inversion run folder: metrics.json (held-out L1 / PSNR / SSIM of the prior's encoder-only
reconstruction, after stage 1, after stage 2 = the inverted avatar, and of the same network
trained from scratch on the same images; the stages' step counts and losses), final_metrics.json
(the same held-out metrics, flat), renders.png (held-out views and expressions: ground truth,
prior, inverted, scratch), inputs.png (the input images and the extracted texture), avatar.ply
(3DGS file of the subject's neutral avatar, model space), checkpoints/ (the tuned parameters and
the pivot code), config.json, and TensorBoard events + metrics.jsonl at the evaluation points
(step = optimisation steps so far: 0 the prior, then after stage 1 and after stage 2; the
from-scratch baseline at its own step count): the held-out numbers as eval/<metric>
(eval_scratch/<metric>) and the image eval/heldout (eval/heldout_scratch), masked ground truth
| render of 4 held-out images; a rerun replaces them.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dhjax import io as dio
from dhjax.data import dataset as ds
from dhjax.data import grain_pipeline
from dhjax.models import flame
from dhjax.nn import lpips
from dhjax.synthesis import synshot, synshot_data
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.synthesis import synshot_invert as inv
from dhjax.train import app, logs, loop
from dhjax.train import checkpoint as ckpt_lib

PRIOR_EXPERIMENT = "synshot_prior"
INVERT_IMAGE_ROWS = 4    # held-out images in the inversion's TensorBoard grids


def _save_avatar(path, out) -> None:
    g = gs.export_gaussians(out)
    dio.save_gaussians_ply(path, g["means"], g["quats"], g["scales"], g["opacities"], g["sh"])


# ----------------------------------------------------------------------------------------------
# The prior.


def run_prior(cfg, workdir: str) -> dict:
    """Trains (or resumes) the prior of `configs/synshot_prior.py`, then evaluates it on every
    held-out image against the mean-image baseline and writes the pictures (module docstring).

    Returns the held-out metrics (`synshot_data.heldout_metrics`). Raises app.Interrupted when
    training was interrupted (SIGTERM: a checkpoint was written, nothing else; a rerun resumes).
    """
    app.check_experiment(cfg, "synshot_prior")
    grain_pipeline.check_loader_config(cfg.get("loader"))   # before the run starts (and data loads)
    lpips.load_configured(cfg.loss.lpips_path, field="loss.lpips_path")     # likewise
    run = app.start(workdir, cfg)
    root = synshot_data.dataset_root(cfg)
    train_ds = synshot_data.open_split(root, "train", in_memory=cfg.data.in_memory)
    test_ds = synshot_data.open_split(root, "test", in_memory=cfg.data.in_memory)
    width, height = synshot_data.image_size(train_ds)
    assets = synshot.build_assets(cfg.model)
    run.log(f"data {root}: {len(train_ds)} training / {len(test_ds)} held-out images of {width}x{height}; "
            f"{assets.n_gaussians} Gaussians per avatar "
            f"({', '.join(f'{p.name} {p.count}' for p in assets.parts)}); devices: {jax.device_count()}")
    lpips_fn = synshot_data.lpips_from_config(cfg.loss, log=run.log)
    ctx = synshot.make_context(cfg.model, assets, width, height, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                               backend=cfg.backend, deterministic=bool(cfg.deterministic_kernels), lpips_fn=lpips_fn)
    first = synshot_data.model_batch(synshot_data.stack([train_ds[0]]))
    shapes = jax.eval_shape(lambda b: synshot.init_state(jax.random.PRNGKey(0), b, ctx), first)
    run.log(app.parameter_overview(shapes["params"]))
    method = loop.Method(*synshot_data.prior_functions(ctx))
    pipeline = synshot_data.pipeline(train_ds, cfg.batch_size, seed=cfg.seed, loader=cfg.get("loader"))
    eval_batch = synshot_data.eval_batch(test_ds, int(cfg.eval.n_images), jax.device_count())
    result = loop.train(cfg, str(run.workdir), method, pipeline, eval_batch=eval_batch)
    state = result.state
    predict = synshot_data.predictor(ctx)
    metrics = synshot_data.heldout_metrics(predict, state, train_ds, test_ds, int(cfg.eval.batch_size),
                                           max_images=int(cfg.eval.max_test_images), devices=jax.device_count())
    if run.lead:
        app.merge_final_metrics(run.workdir, {f"heldout/{k}": v for k, v in metrics.items()})
        with open(run.path("heldout_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        grid = synshot_data.heldout_grid(predict, state, test_ds, int(cfg.eval.grid_identities),
                                         tuple(cfg.eval.grid_views))
        dio.save_image(str(run.path("heldout_grid.png")), grid)
        _, _, out = predict(state, synshot_data.stack([test_ds[0]]))
        _save_avatar(str(run.path("avatar_heldout0.ply")), out)
        run.log(synshot_data.format_metrics(metrics))
    run.done(f"{run.workdir}/heldout_grid.png", "final_metrics.json")
    return metrics


# ----------------------------------------------------------------------------------------------
# The inversion.


def _arcface_terms(cfg, model, log):
    """The ArcFace loss of cfg.arcface_path (None without a file; `log` says which)."""
    if not cfg.arcface_path:
        log("ArcFace terms off: no arcface_path given (an insightface ArcFace ONNX file turns them on)")
        return None
    from dhjax.io import onnx_weights

    _, arc_vars = onnx_weights.load_iresnet_onnx(cfg.arcface_path)
    log(f"ArcFace identity/feature terms on ({cfg.arcface_path})")
    return inv.arcface_loss(jax.tree_util.tree_map(jnp.asarray, arc_vars), model,
                            id_weight=cfg.arcface.id_weight, feat_weight=cfg.arcface.feat_weight)


def _heldout_eval(predict, batch):
    """(state, q_id=None) -> (metrics {l1, psnr, ssim}, renders [B,H,W,3]) on a held-out batch
    (({}, None) without one); q_id [1,h,w,n] is used for every image."""

    def evaluate(state, q_id=None):
        if batch is None:
            return {}, None
        n = batch["image"].shape[0]
        q = None if q_id is None else jnp.broadcast_to(q_id[:1], (n,) + q_id.shape[1:])
        image, _, _ = predict(state, batch, q_id=q)
        m = synshot.image_metrics(image, batch["image"] * batch["mask"][..., None])
        return {k: float(v) for k, v in m.items()}, np.asarray(image)

    return evaluate


def _save_pictures(run, inputs, maps, batch_held, renders) -> None:
    """inputs.png (input images, extracted texture) and renders.png (held-out rows: ground truth,
    then each method's renders)."""
    h, w = inputs[0]["image"].shape[:2]
    tex_img = np.asarray(jax.image.resize(np.asarray(maps["uv_albedo"]), (h, w, 3), "linear"))
    dio.save_image(str(run.path("inputs.png")),
                   np.clip(np.concatenate([s["image"] for s in inputs] + [tex_img], axis=1), 0, 1))
    if batch_held is None:
        return
    k = min(8, batch_held["image"].shape[0])
    rows = [np.concatenate(list(batch_held["image"][:k] * batch_held["mask"][:k, ..., None]), axis=1)]
    rows += [np.concatenate(list(renders[name][:k]), axis=1) for name in ("prior", "inverted", "scratch")
             if renders.get(name) is not None]
    dio.save_image(str(run.path("renders.png")), np.clip(np.concatenate(rows, axis=0), 0, 1))


def invert_subject(cfg):
    """(prior config, dataset root, input samples, held-out samples) of an inversion config: the
    subject read from cfg.data.root (or the prior's synthetic dataset), split into the input frames' views
    (data.input_frames, else data.input_frame; data.input_views) and the rest (at most data.max_heldout), checked."""
    prior_cfg = app.read_config(cfg.prior_workdir, experiment=PRIOR_EXPERIMENT)
    root = cfg.data.root or str(synshot_data.dataset_root(prior_cfg))
    samples = inv.subject_samples(ds.FolderDataset(root, cfg.data.split), int(cfg.data.item))
    frames = tuple(int(f) for f in cfg.data.get("input_frames", ())) or int(cfg.data.input_frame)
    inputs, heldout = inv.split_inputs(samples, frames, tuple(cfg.data.input_views))
    inv.check_subject(inputs)
    if cfg.data.max_heldout:
        heldout = heldout[: int(cfg.data.max_heldout)]
    return prior_cfg, root, inputs, heldout


def run_invert(cfg, workdir: str) -> dict:
    """Few-shot inversion of `configs/synshot_invert.py`: loads the prior of cfg.prior_workdir,
    builds the subject's maps from its input images, runs stage 1 (identity encoder) and stage 2
    (decoders and regressors with the pivot code fixed), optionally the from-scratch baseline,
    evaluates each on the held-out images and writes the files of the module docstring.

    Returns the summary written to metrics.json.
    """
    app.check_experiment(cfg, "synshot_invert")
    lpips.load_configured(cfg.loss.lpips_path, field="loss.lpips_path")     # before the run starts
    run = app.start(workdir, cfg)
    if not cfg.prior_workdir:
        raise ValueError("no prior given: point --config.prior_workdir at the workdir of experiments.synshot_prior")
    prior_cfg, root, inputs, heldout = invert_subject(cfg)
    model = flame.load()
    S = int(prior_cfg.model.map_size)
    h, w = inputs[0]["image"].shape[:2]
    maps = inv.subject_maps(inputs, model, S, skin_only=bool(cfg.data.skin_only_texture))
    batch_in = inv.subject_batch(inputs, maps)
    held_maps = dict(maps, uv_expression_offset=inv.expression_maps_for(heldout, model, S)) if heldout else None
    batch_held = inv.subject_batch(heldout, held_maps) if heldout else None
    n = len(inputs)
    run.log(f"subject item {cfg.data.item} of {root}/{cfg.data.split}: {n} input images, {len(heldout)} held out; "
            f"texture seen in {float((maps['texture_weight'] > 0).mean()) * 100:.0f}% of the UV square")

    assets = synshot.build_assets(prior_cfg.model)
    prior_ctx = synshot.make_context(prior_cfg.model, assets, w, h, optim_cfg=prior_cfg.optim, backend=cfg.backend,
                                    deterministic=bool(cfg.deterministic_kernels))
    # The template's shapes only (eval_shape): run for real, the network's initialisation went op by
    # op through hundreds of small compiled programs just to be overwritten by the checkpoint.
    _, prior_state, prior_step = app.load_run(
        cfg.prior_workdir,
        lambda pcfg: jax.eval_shape(lambda: synshot.init_state(jax.random.PRNGKey(0), batch_in, prior_ctx)),
        experiment=PRIOR_EXPERIMENT)
    run.log(f"prior: {cfg.prior_workdir} step {prior_step}")
    run.log(app.parameter_overview(prior_state["params"]))
    synshot.check_loss_config(cfg.loss)
    ctx = prior_ctx.replace(loss_cfg=cfg.loss, optim_cfg=cfg.optim, extra_loss=_arcface_terms(cfg, model, run.log),
                            lpips_fn=synshot_data.lpips_from_config(cfg.loss))
    predict = synshot_data.predictor(ctx)
    evaluate = _heldout_eval(predict, batch_held)
    seed = int(cfg.seed)

    stage1_loss = str(cfg.stage1.get("loss", "full"))
    stage_ctx = {1: inv.stage1_context(ctx, stage1_loss)}
    run.log(f"stage 1 loss: {stage1_loss}")

    def stage(state, number, steps, warmup, patience, q_id=None):
        stopper = inv.EarlyStopper(warmup=int(warmup), patience=int(patience), decay=cfg.ema_decay)
        return inv.run_stage(state, batch_in, stage_ctx.get(number, ctx), stage=number, steps=steps, stopper=stopper,
                             q_id=q_id, seed=seed, log=run.log)

    # TensorBoard at each evaluation point (step = optimisation steps so far): the held-out
    # metrics and ground truth | render; a rerun starts over, so it replaces the earlier log.
    writer = logs.MetricWriter(str(run.workdir), enabled=run.lead, resume_step=-1)

    def log_point(step, metrics, images, scratch=False):
        """The avatar's (or, scratch=True, the from-scratch baseline's) held-out numbers and images."""
        if metrics:
            writer.write_scalars(step, {f"{'eval_scratch' if scratch else 'eval'}/{k}": v for k, v in metrics.items()})
        if images is not None:
            writer.write_images(step, {f"eval/heldout{'_scratch' if scratch else ''}": logs.comparison_grid(
                batch_held["image"] * batch_held["mask"][..., None], images, max_rows=INVERT_IMAGE_ROWS)})

    results, renders = {}, {}
    try:
        results["prior"], renders["prior"] = evaluate(prior_state)
        log_point(0, results["prior"], renders["prior"])
        run.log(f"prior encoder-only on held-out views: {results['prior']}")
        s1, s2 = int(cfg.stage1.steps_per_frame) * n, int(cfg.stage2.steps_per_frame) * n
        state, info1 = stage(prior_state, 1, s1, cfg.stage1.warmup, cfg.stage1.patience)
        results["stage1"], renders["stage1"] = evaluate(state)
        log_point(info1["steps"], results["stage1"], renders["stage1"])
        run.log(f"after stage 1 ({info1['steps']} steps): {results['stage1']}")
        q_id = inv.frozen_code(state, synshot_data.model_batch(batch_in), ctx)
        state, info2 = stage(state, 2, s2, cfg.stage2.warmup, cfg.stage2.patience, q_id=q_id)
        results["inverted"], renders["inverted"] = evaluate(state, q_id)
        log_point(info1["steps"] + info2["steps"], results["inverted"], renders["inverted"])
        run.log(f"after stage 2 ({info2['steps']} steps): {results['inverted']}")
        info = {"stage1": info1, "stage2": info2}
        if cfg.baselines:
            scratch = synshot.init_state(jax.random.PRNGKey(seed + 1), batch_in, ctx)
            scratch, info["scratch"] = stage(scratch, 0, s1 + s2, s1 + s2, s1 + s2)     # no early stop
            results["scratch"], renders["scratch"] = evaluate(scratch)
            log_point(info["scratch"]["steps"], results["scratch"], renders["scratch"], scratch=True)
            run.log(f"from scratch ({info['scratch']['steps']} steps, same images): {results['scratch']}")
    finally:
        writer.close()

    summary = {"n_inputs": n, "n_heldout": len(heldout), "prior_step": prior_step, "heldout": results,
               "stages": info, "seconds": run.elapsed()}
    if run.lead:
        with open(run.path("metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
        app.merge_final_metrics(run.workdir, {f"heldout/{name}/{k}": v for name, m in results.items()
                                              for k, v in m.items()})
    ck = ckpt_lib.Checkpointer(str(run.workdir), keep=1)
    ck.save(0, {"state": state, "q_id": q_id[:1]}, {"prior_workdir": os.path.abspath(cfg.prior_workdir)})
    ck.close()
    if run.lead:
        _save_pictures(run, inputs, maps, batch_held, renders)
        neutral = {k: v[:1] for k, v in synshot_data.model_batch(batch_in).items()}
        neutral["uv_expression_offset"] = np.zeros_like(neutral["uv_expression_offset"])
        _, _, out = predict(state, neutral, q_id=q_id[:1])
        _save_avatar(str(run.path("avatar.ply")), out)
        run.log(json.dumps(results, indent=1))
    run.done(f"{run.workdir}/renders.png", "metrics.json", "avatar.ply")
    return summary
