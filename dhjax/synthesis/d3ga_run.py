"""D3GA's run: train an avatar on one subject's multi-view video, evaluate it on held-out frames
and cameras, write renders, videos, PLYs, metrics and the size table; and drive a trained
avatar with a new pose sequence.

    run(cfg, workdir)             # python -m experiments.d3ga --config=configs/d3ga.py:tiny --workdir=...
    drive(workdir, out, ...)      # python -m experiments.d3ga_drive --workdir=... --out=...

Files of a run: config.json, checkpoints/, TensorBoard logs and metrics.jsonl (the harness;
TensorBoard also holds the config as HParams and the image eval/novel_view, ground truth |
render | layers of one training frame from a held-out camera, at every evaluation and the end),
parts.json (tets and Gaussians per part), metrics.json + final_metrics.json (novel view:
training frames seen from held-out cameras; novel pose: held-out frames from every camera;
PSNR, SSIM, L1, LPIPS when weights are given; all on random background colours), tables.md
(metrics and the size table), heldout.png (ground truth | render | layers), novel_pose.mp4
(the held-out frames from one camera: ground truth | render | layers), ply/frame_XXXX.ply (the
posed avatar of each held-out frame, plain 3DGS attributes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dhjax import io as dio
from dhjax import losses
from dhjax.data import cache
from dhjax.models import body as body_lib
from dhjax.nn import lpips
from dhjax.render import camera as camera_lib
from dhjax.synthesis import d3ga, d3ga_data
from dhjax.train import app, logs, loop


def open_capture(cfg, log=print):
    """(Capture, source description): the dataset at cfg.data.root, or the synthetic clothed body
    video of cfg.data.synthetic rendered once into the cache."""
    if cfg.data.root:
        root, source = cfg.data.root, cfg.data.root
    else:
        root = cache.cached_bodies(cfg.data.synthetic, cache_dir=cfg.data.cache_dir or None)
        source = f"synthetic bodies ({root})"
    cap = d3ga_data.load_capture(root, cfg.data.split, int(cfg.data.item), max_frames=int(cfg.data.max_frames),
                                 log=log)
    return cap, source


def build(cfg, cap, log=print):
    """(Split, Context, parts, model) of a capture under a config."""
    if not set(cfg.data.test_views) <= set(cap.view.tolist()):
        raise ValueError(f"data.test_views {tuple(cfg.data.test_views)} are not all cameras of the capture "
                         f"(cameras: {cap.view.tolist()})")
    # split takes camera numbers (not positions) and the count or fraction of held-out frames
    sp = d3ga_data.split(cap, tuple(cfg.data.test_views), cfg.data.test_frames)
    model = body_lib.load()
    t0 = time.time()
    parts = d3ga_data.build_parts(model, cap.shape, cap.upper_kind, cap.lower_kind, cfg.parts)
    log(f"parts built in {time.time() - t0:.1f}s: " + ", ".join(
        f"{p['name']} {p['stats']['tets']} tets / {p['stats']['gaussians']} Gaussians" for p in parts))
    mean, std = d3ga_data.face_keypoint_stats(cap.take(sp.train_frames), model)
    if int(np.max(sp.train_frames)) >= len(sp.train_frames):
        raise ValueError("training frames must be the capture's first frames (frame embeddings are indexed by them)")
    optim = cfg.optim.copy_and_resolve_references()
    optim.train_steps = int(cfg.train.steps)
    ctx = d3ga.make_context(parts, d3ga_data.rest_joints(model, cap.shape), model.parents,
                            n_frames=len(sp.train_frames), face_mean=mean, face_std=std,
                            model_cfg=cfg.model, loss_cfg=cfg.loss, optim_cfg=optim)
    return sp, ctx, parts, model


def _backgrounds(seed, n):
    return np.random.default_rng(seed).uniform(0, 1, (n, 3)).astype(np.float32)


def _cams(batch) -> camera_lib.Camera:
    H, W = batch["image"].shape[-3], batch["image"].shape[-2]
    return camera_lib.Camera(jnp.asarray(batch["K"]), jnp.asarray(batch["R"]), jnp.asarray(batch["t"]), W, H)


class Renderer:
    """A jitted render of one frame in V cameras (mean frame embedding)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._fn = jax.jit(lambda params, frame, K, R, t, bg, W, H: d3ga.render(
            params, ctx, frame, camera_lib.Camera(K, R, t, W, H), bg), static_argnums=(6, 7))

    def __call__(self, params, batch):
        H, W = batch["image"].shape[-3], batch["image"].shape[-2]
        frame = {k: jnp.asarray(batch[k]) for k in ("pose", "translation", "keypoints")}
        out = self._fn(params, frame, jnp.asarray(batch["K"]), jnp.asarray(batch["R"]), jnp.asarray(batch["t"]),
                       jnp.asarray(batch["background"]), W, H)
        return np.asarray(out["image"]), np.asarray(out["layers"])


def evaluate(rnd: Renderer, params, cap, frames, views, seed: int, lpips_fn=None, keep: int = 0):
    """Metrics (mean over frames x views) of renders against the ground truth on random
    backgrounds (psnr, ssim, l1, lpips with weights, and layers_l1: the layer render against the
    layer labels), and up to `keep` examples (gt, render, layers, layer labels)."""
    rows, examples = [], []
    for n, f in enumerate(frames):
        b = d3ga_data.frame_batch(cap, int(f), views, _backgrounds([seed, int(f)], len(views)))
        img, lay = rnd(params, b)
        gt = b["image"]
        for v in range(len(views)):
            r = {"psnr": float(losses.psnr(img[v], gt[v])), "ssim": float(losses.ssim(img[v], gt[v])),
                 "l1": float(losses.l1(img[v], gt[v])),
                 # how cleanly the layers separate: the one-colour-per-layer render against the labels
                 "layers_l1": float(np.mean(np.abs(lay[v] - np.asarray(d3ga.layer_targets(b["layers"][v])))))}
            if lpips_fn is not None:
                r["lpips"] = float(lpips_fn(img[v:v + 1], gt[v:v + 1]))
            rows.append(r)
        if len(examples) < keep:
            examples.append((gt[0], img[0], lay[0], d3ga.layer_targets(b["layers"][0])))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, examples


def train(cfg, run_, ctx, cap, sp, log):
    """Trains (or resumes) the avatar with the shared loop; returns the final state."""
    init, step, evaluate_fn = d3ga.method_functions(ctx)
    bs = max(int(cfg.batch.size), jax.device_count())
    bs -= bs % jax.device_count()
    batches = _OneViewBatches(d3ga_data.FrameBatches(cap, sp, batch_size=bs, seed=int(cfg.seed),
                                                     random_background=True))
    d3ga.check_batch(jax.tree.map(lambda x: x[0], batches.get_batch(0)))
    ev = [d3ga_data.frame_batch(cap, int(f), sp.test_views[:1], _backgrounds([cfg.seed, 7, int(f)], 1))
          for f in sp.train_frames[np.linspace(0, len(sp.train_frames) - 1, bs).astype(int)]]
    eval_batch = {k: np.stack([e[k] for e in ev]) for k in ev[0]}
    shapes = jax.eval_shape(lambda k: d3ga.init_state(k, ctx), jax.random.PRNGKey(0))
    log(app.parameter_overview(shapes["params"], "D3GA parameters"))
    rnd = Renderer(ctx)

    def render_hook(state, batch):
        """eval/novel_view: ground truth | render | layers of the middle training frame from the
        first held-out camera, on white."""
        f = int(sp.train_frames[len(sp.train_frames) // 2])
        b = d3ga_data.frame_batch(cap, f, sp.test_views[:1], np.ones((1, 3), np.float32))
        img, lay = rnd(state["params"], b)
        return {"eval/novel_view": logs.comparison_grid(b["image"][:1], img[:1], lay[:1])}

    method = loop.Method(init, step, jax.jit(evaluate_fn), render_hook)
    return loop.train(cfg, str(run_.workdir), method, batches, eval_batch=eval_batch)


class _OneViewBatches:
    """`d3ga_data.FrameBatches` with a view axis of 1 on the per-image arrays, the layout of
    `d3ga.loss_terms` (a frame seen by V cameras)."""

    def __init__(self, batches):
        self.batches = batches

    def get_batch(self, step: int) -> dict:
        b = self.batches.get_batch(step)
        return {k: (v[:, None] if k in d3ga_data.VIEW_KEYS else v) for k, v in b.items()}


def _picture(examples) -> np.ndarray:
    rows = [np.concatenate([gt, img, np.asarray(lay), np.asarray(target)], 1) for gt, img, lay, target in examples]
    return np.clip(np.concatenate(rows, 0), 0, 1)


def _fmt(title, rows: dict, keys=("psnr", "ssim", "l1", "lpips", "layers_l1")) -> str:
    table = [dict(split=k, **{m: v[m] for m in keys if m in v}) for k, v in rows.items()]
    return f"### {title}\n\n" + app.markdown_table(table)


def check_config(cfg) -> None:
    """Raises ValueError naming the field when the model's choices cannot work (model.geometry,
    model.bary_domain, parts.layers), and FileNotFoundError / ValueError naming eval.lpips_path's
    file when its LPIPS weights cannot be loaded: checked before the capture is loaded and the
    cages built (minutes)."""
    if cfg.model.geometry not in ("tets", "triangles"):
        raise ValueError(f"config field model.geometry must be 'tets' or 'triangles', got {cfg.model.geometry!r}")
    if cfg.model.bary_domain not in d3ga.BARY_DOMAINS:
        raise ValueError(f"config field model.bary_domain must be one of {d3ga.BARY_DOMAINS}, "
                         f"got {cfg.model.bary_domain!r}")
    if cfg.parts.layers not in ("full", "single"):
        raise ValueError(f"config field parts.layers must be 'full' or 'single', got {cfg.parts.layers!r}")
    lpips.load_configured(cfg.eval.lpips_path)


def run(cfg, workdir: str) -> dict:
    """Trains (or resumes) and evaluates one avatar; writes the files of the module docstring.
    Returns metrics.json's content. Raises app.Interrupted on SIGTERM (a checkpoint was written)."""
    app.check_experiment(cfg, "d3ga")
    check_config(cfg)
    run_ = app.start(workdir, cfg)
    log = run_.log
    cap, source = open_capture(cfg, log)
    sp, ctx, parts, _ = build(cfg, cap, log)
    log(f"data: {source}: {cap.images.shape[0]} frames ({len(sp.train_frames)} training, {len(sp.test_frames)} "
        f"held out) x {cap.images.shape[1]} cameras ({len(sp.test_views)} held out) at {cap.size[0]}x{cap.size[1]}; "
        f"garments {cap.upper_kind} + {cap.lower_kind}; geometry {cfg.model.geometry}, layers {cfg.parts.layers}")
    lpips_fn = lpips.make_lpips(lpips.load_configured(cfg.eval.lpips_path))
    result = train(cfg, run_, ctx, cap, sp, log)
    train_s = result.train_seconds
    if run_.lead:     # after training: a start stopped before its first step leaves only config.json
        Path(run_.path("parts.json")).write_text(json.dumps({p["name"]: p["stats"] for p in parts}, indent=1,
                                                            default=float))
    params = result.state["params"]
    rnd = Renderer(ctx)
    nvf = sp.train_frames[np.linspace(0, len(sp.train_frames) - 1,
                                      min(len(sp.train_frames), int(cfg.eval.novel_view_frames))).astype(int)]
    t0 = time.time()
    nv, nv_ex = evaluate(rnd, params, cap, nvf, sp.test_views, int(cfg.seed) + 1, lpips_fn, keep=2)
    npose, np_ex = evaluate(rnd, params, cap, sp.test_frames, np.arange(cap.images.shape[1]), int(cfg.seed) + 2,
                            lpips_fn, keep=2)
    tv, _ = evaluate(rnd, params, cap, nvf[:4], sp.train_views, int(cfg.seed) + 3, lpips_fn)
    log(f"evaluation ({time.time() - t0:.0f}s): novel view {nv['psnr']:.2f} dB, novel pose {npose['psnr']:.2f} dB, "
        f"training views {tv['psnr']:.2f} dB")
    size = d3ga.size_table(params)
    metrics = {"novel_view": nv, "novel_pose": npose, "training_views": tv, "size": size,
               "train_seconds": train_s, "steps": int(cfg.train.steps),
               "parts": {p["name"]: p["stats"] for p in parts}}
    if run_.lead:
        Path(run_.path("metrics.json")).write_text(json.dumps(metrics, indent=1, default=float))
        app.merge_final_metrics(run_.workdir, {**{f"novel_view/{k}": v for k, v in nv.items()},
                                               **{f"novel_pose/{k}": v for k, v in npose.items()},
                                               "parameters": size["parameters"], "megabytes": size["megabytes"]})
        md = [_fmt("Held-out evaluation (random backgrounds)", {"novel view": nv, "novel pose": npose,
                                                                "training views": tv}),
              "### Size\n\n" + app.markdown_table([{"group": k, "parameters": v} for k, v in size["groups"].items()]
                                                  + [{"group": "total", "parameters": size["parameters"]}])
              + f"\n\n{size['megabytes']:.2f} MB (float32)"]
        Path(run_.path("tables.md")).write_text("\n\n".join(md) + "\n")
        dio.save_image(run_.path("heldout.png"), _picture(nv_ex + np_ex))
        write_outputs(cfg, run_, ctx, params, cap, sp, rnd)
    log(f"size: {size['parameters']} parameters, {size['megabytes']:.2f} MB; wrote {run_.workdir}")
    return metrics


def write_outputs(cfg, run_, ctx, params, cap, sp, rnd):
    """novel_pose.mp4 (held-out frames from the first held-out camera: gt | render | layers) and
    a PLY per held-out frame."""
    v = sp.test_views[:1]
    frames = []
    ply_dir = Path(run_.path("ply"))
    ply_dir.mkdir(exist_ok=True)
    export = jax.jit(lambda p, fr, c: d3ga.export_gaussians(p, ctx, fr, c))
    for f in sp.test_frames:
        b = d3ga_data.frame_batch(cap, int(f), v, np.ones((1, 3), np.float32))
        img, lay = rnd(params, b)
        frames.append(np.concatenate([b["image"][0], img[0], lay[0]], 1))
        cam = _cams(b)
        g = export(params, {k: jnp.asarray(b[k]) for k in ("pose", "translation", "keypoints")},
                   camera_lib.camera_centre(cam)[0])
        dio.save_gaussians_ply(ply_dir / f"frame_{int(cap.frame[f]):04d}.ply", np.asarray(g["means"]),
                               np.asarray(g["quats"]), np.asarray(g["scales"]), np.asarray(g["opacities"]),
                               colors=np.asarray(g["colors"]))
    if frames:
        dio.save_video(run_.path("novel_pose.mp4"), np.clip(np.stack(frames), 0, 1), fps=float(cfg.eval.video_fps))


def drive(workdir, out, *, motion: str = "walk", n_frames: int = 48, camera: int = 0, seed: int = 1,
          log=print) -> Path:
    """Renders a trained avatar driven by a new pose sequence of the synthetic generator.

    Args:
      workdir: a D3GA run (config.json and a checkpoint); out: output folder (created).
      motion: one of `body_synthetic.MOTIONS`; n_frames: its length (at the dataset's fps);
      camera: the dome camera (capture camera number) to render from; seed: of the motion.
    Writes <out>/drive.mp4 (render | layers) and returns its path.
    """
    from dhjax.data import body_synthetic

    # Everything that can be checked is checked before the capture loads and the cages build.
    if motion not in body_synthetic.MOTIONS:
        raise ValueError(f"motion must be one of {body_synthetic.MOTIONS}, got {motion!r}")
    if isinstance(n_frames, bool) or int(n_frames) != n_frames or int(n_frames) < 1:
        raise ValueError(f"the number of frames to drive must be an integer >= 1, got {n_frames!r}")
    app.quiet_library_logs()
    # A run trained before a model option existed used the option's default (the behaviour of before).
    cfg = app.read_config(workdir, "d3ga", defaults={"model": d3ga.default_model_config()})
    ckpts = Path(workdir) / "checkpoints"
    if not ckpts.is_dir() or not any(c.name.isdigit() for c in ckpts.iterdir()):
        raise FileNotFoundError(f"run '{workdir}' has no checkpoint; train it first with python -m experiments.d3ga")
    check_config(cfg)
    cap, _ = open_capture(cfg, log)
    if camera not in set(cap.view.tolist()):
        raise ValueError(f"camera {camera} is not a camera of the capture ({cap.view.tolist()})")
    sp, ctx, _, model = build(cfg, cap, log)
    _, state, step = app.load_run(workdir, lambda c: d3ga.init_state(jax.random.PRNGKey(0), ctx), experiment="d3ga")
    c = int(np.nonzero(cap.view == camera)[0][0])
    fps = float(cfg.data.synthetic.fps) if not cfg.data.root else 30.0
    m = body_synthetic.motion_sequence(motion, body_synthetic.key(seed, body_synthetic.STREAM_MOTION, 99), int(n_frames),
                                       fps, np.asarray(model.joint_limits))
    betas = jnp.asarray(cap.shape)[None]
    fwd = jax.jit(lambda p, e, t: body_lib.forward(model, betas, e[None], p[None], t[None]).keypoints[0])
    rnd = Renderer(ctx)
    frames = []
    W, H = cap.size
    for t in range(int(n_frames)):
        kp = fwd(jnp.asarray(m["pose"][t]), jnp.asarray(m["expression"][t]), jnp.asarray(m["translation"][t]))
        b = dict(image=np.zeros((1, H, W, 3), np.float32), K=cap.K[0, [c]], R=cap.R[0, [c]], t=cap.t[0, [c]],
                 background=np.ones((1, 3), np.float32), pose=m["pose"][t], translation=m["translation"][t],
                 keypoints=np.asarray(kp))
        img, lay = rnd(state["params"], b)
        frames.append(np.concatenate([img[0], lay[0]], 1))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = dio.save_video(out / "drive.mp4", np.clip(np.stack(frames), 0, 1), fps=float(cfg.eval.video_fps))
    log(f"drove the avatar of {workdir} (step {step}) with a '{motion}' sequence of {n_frames} frames -> {path}")
    return path
