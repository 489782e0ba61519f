"""The GEM experiment: Net (stage A) -> distillation (B) -> refinement (C) -> drivers (D) on one
subject's multi-view capture, with evaluation, pictures, videos and the eigenmodel file.

`run(cfg, workdir)` writes into workdir:
  checkpoints/, metrics.jsonl, TensorBoard events     stage A (the Net), resumable; TensorBoard:
                                                      scalars, the config as HParams, and the image
                                                      eval/novel_view (ground truth | Net) at every
                                                      evaluation step and the end
  distilled.npz                                       stage B: the eigenmodel straight from the PCA
                                                      (+ the training frames' coefficients k_*)
  refine/ (checkpoints, metrics, TensorBoard)         stage C, resumable; eval/novel_view
                                                      (ground truth | refined GEM) likewise
  gem.npz                                             the refined eigenmodel (the product)
  gem_<M>.npz                                         truncated eigenmodels of the size table
  metrics.json                                        every table below, machine-readable
  tables.md                                           novel view, novel expression (also per held-out frame), size/speed tables
  comparison.png                                      GT | Net | GEM (distilled) | GEM (refined) (+ fitted, regressed)
  novel_view.mp4, novel_expression.mp4                GT | Net | GEM over the held-out sets
  cross_reenactment.mp4                               another identity drives the GEM (regressor)
  frame_<n>.ply                                       3DGS PLY of the GEM at the last training frame (world)
  regressor_<driver>[_linear].npz, drive_camera.npz   stage D's regressors per driver and kind; the
                                                      frontal camera `drive` renders from
Each stage resumes: the Net and the refinement from their checkpoints, the distillation from
distilled.npz; the drivers and evaluation (seconds to minutes) are recomputed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dhjax import io as dio
from dhjax import losses
from dhjax.data import cache
from dhjax.data import synthetic
from dhjax.models import flame
from dhjax.geometry import pca as pca_lib
from dhjax.nn import lpips
from dhjax.render import camera as camera_lib
from dhjax.synthesis import gem
from dhjax.synthesis import gem_data
from dhjax.synthesis import gem_local
from dhjax.synthesis.insta_run import image_metrics
from dhjax.train import app
from dhjax.train import config as config_lib
from dhjax.train import logs
from dhjax.train import loop

ATTRS = gem.ATTRIBUTES


# ----------------------------------------------------------------------------------------------
# Data and context.


def synthetic_generator_config(cfg) -> ml_collections.ConfigDict:
    """The config's synthetic multi-view generator settings restricted to its one subject
    (`data.identity`)."""
    s = cfg.data.synthetic.copy_and_resolve_references()
    s.multiview.first_identity = int(cfg.data.identity)
    s.multiview.n_identities = 1
    return s


def open_capture(cfg, log=print) -> tuple[gem_data.Capture, object, str]:
    """(capture, head model, source description) of a config."""
    if cfg.data.root:
        root, split = cfg.data.root, cfg.data.split
        model = flame.load(cfg.data.model_path or None)
    else:
        s = synthetic_generator_config(cfg)
        root = cache.cached_multiview(s, {"train": (int(cfg.data.identity), 1)}, name="gem",
                                      cache_dir=cfg.data.cache_dir or None)
        split = "train"
        model = flame.load()
    cap = gem_data.load_capture(root, split, int(cfg.data.item), max_frames=int(cfg.data.max_frames), log=log)
    if cap.expression.shape[1] > model.num_expression:
        raise ValueError(f"the capture has {cap.expression.shape[1]} expression coefficients, the head model "
                         f"{model.num_expression}; give data.model_path of the model the data was made with")
    return cap, model, str(root)


def head_cameras_of(ctx: gem.Context, cap: gem_data.Capture, f: int, views) -> camera_lib.Camera:
    """Cameras [V] of frame position f moved into its head frame."""
    v = np.asarray(views)
    R0, T = gem.head_rigid(ctx, cap.shape, cap.pose[f], cap.translation[f])
    W, H = cap.size
    return gem.head_cameras(camera_lib.Camera(jnp.asarray(cap.K[f, v]), jnp.asarray(cap.R[f, v]),
                                              jnp.asarray(cap.t[f, v]), W, H), R0, T)


def gt_images(ctx: gem.Context, cap: gem_data.Capture, f: int, views, background=None) -> np.ndarray:
    """Frame f's images [V, H, W, 3] composited on the background (default ctx.background)."""
    v = np.asarray(views)
    bg = ctx.background if background is None else background
    return np.asarray(gem.composite(cap.images[f, v].astype(np.float32) / 255.0, cap.masks[f, v], bg))


# ----------------------------------------------------------------------------------------------
# Stage A.


def train_net(cfg, run_, ctx, cap, sp, log):
    """Stage A: trains (or resumes) the Net through the harness in the run's workdir on the training
    frames and cameras of split `sp`. Returns (the Net's final parameters, training seconds over all
    resumed calls)."""
    init, step, evaluate = gem.method_functions(ctx)
    batches = gem_data.FrameBatches(cap, sp, frames_per_step=int(cfg.batch.frames_per_step),
                                    views_per_step=int(cfg.batch.views_per_step), seed=int(cfg.seed),
                                    random_background=bool(cfg.batch.random_background),
                                    background=tuple(cfg.model.background))
    g = max(int(cfg.batch.frames_per_step), jax.device_count())
    g -= g % jax.device_count()
    ev = [gem_data.frame_batch(cap, int(f), sp.test_views, np.asarray(cfg.model.background, np.float32))
          for f in sp.train_frames[np.linspace(0, len(sp.train_frames) - 1, g).astype(int)]]
    eval_batch = {k: np.stack([e[k] for e in ev]) for k in ev[0]}
    shapes = jax.eval_shape(lambda k: gem.init_state(k, ctx), jax.random.PRNGKey(0))
    log(app.parameter_overview(shapes["params"], "Net parameters"))

    f0 = int(sp.train_frames[0])
    net_view = jax.jit(lambda p: gem.render_net(ctx, p, cap.frame_params(f0), _world_cams(cap, f0, sp.test_views[:1])))

    def render_hook(state, batch):
        """eval/novel_view: ground truth | Net render of the first training frame from the
        first held-out camera."""
        return {"eval/novel_view": logs.comparison_grid(gt_images(ctx, cap, f0, sp.test_views[:1]),
                                                        np.asarray(net_view(state["params"])))}

    method = loop.Method(init, step, jax.jit(evaluate), render_hook)
    log(f"stage A: training the Net ({int(cfg.train.steps)} steps)")
    result = loop.train(cfg, str(run_.workdir), method, batches, eval_batch=eval_batch)
    return result.state["params"], result.train_seconds


def _world_cams(cap, f, views) -> camera_lib.Camera:
    v = np.asarray(views)
    W, H = cap.size
    return camera_lib.Camera(jnp.asarray(cap.K[f, v]), jnp.asarray(cap.R[f, v]), jnp.asarray(cap.t[f, v]), W, H)


# ----------------------------------------------------------------------------------------------
# Stage B.


def collect(ctx, net_params, cap, frames) -> dict:
    """The Net's head-frame attributes of the given frame positions: {attribute: [N, G, A]}.
    net_params: the stage-A parameters {net, sh}."""
    fn = jax.jit(lambda p, fr: gem.net_gaussians(ctx, p["net"], fr)[0])
    rows = [fn(net_params, cap.frame_params(int(f))) for f in frames]
    return {a: np.stack([np.asarray(r[a]) for r in rows]) for a in ATTRS}


def distil_stage(cfg, run_, ctx, net_params, cap, sp, log):
    """(distilled EigenModel, k {attribute: [N, M]}, explained variance ratios, seconds)."""
    path = run_.path("distilled.npz")
    M = int(cfg.gem.n_components)
    if path.is_file():
        model = gem.load_eigenmodel(path)
        with np.load(path) as z:
            k = {a: jnp.asarray(z[f"k_{a}"]) for a in ATTRS}
            ratio = {a: np.asarray(z[f"ratio_{a}"]) for a in ATTRS}
            secs = float(z["build_seconds"])
        if model.n_components == M and k["position"].shape[0] == len(sp.train_frames):
            log(f"distillation: read {path}")
            return model, k, ratio, secs
    n = len(sp.train_frames)
    if M > n - 1:
        raise ValueError(f"gem.n_components={M} needs at least {M + 1} training frames, the capture has {n}")
    t0 = time.time()
    data = collect(ctx, net_params, cap, sp.train_frames)
    t1 = time.time()
    model, k, ratio = gem.distil(data, net_params["sh"], M, sh_degree=ctx.sh_degree,
                                 background=ctx.background, method=cfg.gem.pca_method)
    jax.block_until_ready(model)
    secs = time.time() - t0
    log(f"distillation: {n} frames x {ctx.n_gaussians} Gaussians collected in {t1 - t0:.1f}s, 4 PCAs of "
        f"{M} components in {time.time() - t1:.1f}s; explained variance "
        + ", ".join(f"{a} {float(np.sum(ratio[a])):.4f}" for a in ATTRS))
    if run_.lead:
        gem.save_eigenmodel(path, model, extra={**{f"k_{a}": np.asarray(k[a]) for a in ATTRS},
                                                 **{f"ratio_{a}": ratio[a] for a in ATTRS},
                                                 "build_seconds": np.float64(secs)})
    return model, k, ratio, secs


# ----------------------------------------------------------------------------------------------
# Stage C.


def refine_stage(cfg, run_, ctx, model, k_train, cap, sp, log):
    """Photometric refinement of means and bases (loop.train in workdir/refine). Returns the
    refined (EigenModel, k {attribute: [N, M]})."""
    rc = cfg.refine
    sub = ml_collections.ConfigDict({"experiment": "gem_refine", "seed": int(cfg.seed),
                                     "refine": rc.to_dict(), "model": cfg.model.to_dict(),
                                     "n_components": model.n_components})
    sub.train = rc.train
    qr_every = int(rc.qr_every)
    opt = optax.adam(float(rc.lr))
    fixed = model

    def init(key, batch):
        p = gem.refine_params(fixed)
        return {"p": p, "opt": opt.init(p), "k": dict(k_train), "sigma": dict(fixed.sigma),
                "step": jnp.zeros((), jnp.int32)}

    def one_loss(p, b, k_all):
        R0, T = gem.head_rigid(ctx, b["shape"], b["pose"], b["translation"])
        W, H = b["image"].shape[-2], b["image"].shape[-3]
        cams = gem.head_cameras(camera_lib.Camera(b["K"], b["R"], b["t"], W, H), R0, T)
        k = {a: k_all[a][b["index"]] for a in ATTRS}
        gt = gem.composite(b["image"], b["mask"], b["background"])
        return gem.refine_loss(p, fixed, k, gt, cams, b["background"], ctx.ssim_weight, ctx.backend,
                               lpips_fn=ctx.lpips_fn, lpips_weight=ctx.lpips_weight)

    def step(state, batch, key):
        del key

        def lossf(p):
            tot, m = jax.vmap(lambda b: one_loss(p, b, state["k"]))(batch)
            return jnp.mean(tot), jax.tree.map(jnp.mean, m)

        (_, metrics), g = jax.value_and_grad(lossf, has_aux=True)(state["p"])
        u, o = opt.update(g, state["opt"], state["p"])
        p = optax.apply_updates(state["p"], u)
        n = state["step"] + 1

        def qr(args):
            p, k, s = args
            m, k2 = gem.reorthonormalise(gem.with_params(fixed, p)._replace(sigma=s), k)
            return gem.refine_params(m), k2, m.sigma

        p, k, s = jax.lax.cond(n % qr_every == 0, qr, lambda a: a, (p, state["k"], state["sigma"]))
        return {"p": p, "opt": o, "k": k, "sigma": s, "step": n}, metrics

    batches = gem_data.FrameBatches(cap, sp, frames_per_step=int(cfg.batch.frames_per_step),
                                    views_per_step=int(rc.views_per_step), seed=int(cfg.seed) + 7,
                                    random_background=bool(cfg.batch.random_background),
                                    background=tuple(cfg.model.background))
    # Images: the first training frame (its training coefficients, row 0 of k) from the first
    # held-out camera, refined GEM against the ground truth, at every evaluation and the end.
    f0 = int(sp.train_frames[0])
    view_cams = head_cameras_of(ctx, cap, f0, sp.test_views[:1])
    gem_view = jax.jit(lambda p, sigma, k: gem.render(gem.with_params(fixed, p)._replace(sigma=sigma),
                                                      {a: k[a][0] for a in ATTRS}, view_cams, backend=ctx.backend))

    def render(state, batch):
        """eval/novel_view: ground truth | refined GEM (first training frame, first held-out camera)."""
        return {"eval/novel_view": logs.comparison_grid(gt_images(ctx, cap, f0, sp.test_views[:1]),
                                                        np.asarray(gem_view(state["p"], state["sigma"], state["k"])))}

    g = max(int(cfg.batch.frames_per_step), jax.device_count())
    g -= g % jax.device_count()
    ev = [gem_data.frame_batch(cap, f0, sp.test_views[:1], np.asarray(cfg.model.background, np.float32))] * g
    eval_batch = {key: np.stack([e[key] for e in ev]) for key in ev[0]}
    log(f"stage C: refining means and bases ({int(rc.train.steps)} steps, QR every {qr_every})")
    result = loop.train(sub, str(run_.path("refine")), loop.Method(init, step, render=render), batches,
                        eval_batch=eval_batch)
    st = result.state
    refined = gem.with_params(fixed, st["p"])._replace(sigma=st["sigma"])
    # A last re-orthonormalisation: the saved bases are orthonormal (renders unchanged).
    refined, k = gem.reorthonormalise(refined, st["k"])
    took = f"{result.train_seconds:.0f}s" if math.isfinite(result.train_seconds) else "an unrecorded time"
    log(f"refinement: {int(rc.train.steps)} steps (QR every {qr_every}) in {took}"
        + ("" if result.steps_run else " (resumed at its end)"))
    return refined, k


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _rows_mean(rows) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def evaluate_images(pred, gt, lpips_fn=None) -> list[dict]:
    """Per-image metrics (`insta_run.image_metrics`: L2, PSNR, SSIM, L1, and LPIPS with a distance
    `lpips_fn`) of predictions against ground truth, both [N, H, W, 3] in [0, 1]."""
    return [image_metrics(p, g, lpips_fn) for p, g in zip(np.asarray(pred), np.asarray(gt))]


def timed(fn, repeats: int) -> float:
    """Frames per second of fn() (jitted, warm; the median of `repeats` calls)."""
    jax.block_until_ready(fn())
    ts = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(1.0 / np.median(ts))


def _k_of(k_all, i):
    return {a: k_all[a][i] for a in ATTRS}


def _frontal_view(cap) -> int:
    """Position of the camera looking most directly at the head (largest -z of its viewing axis
    against the world's +z face direction)."""
    axis = cap.R[0, :, 2, :]            # camera z axis in world coordinates per view
    return int(np.argmin(axis[:, 2]))


def neutral_position(cfg, cap, frames) -> int:
    """Position (within `frames`) of the neutral reference frame (config or smallest params)."""
    if int(cfg.regressor.neutral_frame) >= 0:
        return int(cfg.regressor.neutral_frame)
    energy = np.sum(cap.expression[frames] ** 2, 1) + 10.0 * np.sum(cap.pose[frames, 2:] ** 2, (1, 2))
    return int(np.argmin(energy))


def param_features(expression, pose) -> np.ndarray:
    """The 'params' driver: expression [N, E] and the neck, jaw and eye rotations of pose
    [N, 5, 3] (everything but the rigid global pose, which the head frame removes) -> [N, E + 12]."""
    return np.concatenate([np.asarray(expression), np.asarray(pose)[:, 1:].reshape(len(pose), -1)], 1).astype(np.float32)


def landmark_features(lmk2d, reference) -> np.ndarray:
    """The 'landmarks' driver: 2D landmarks [N, L, 2] (pixels) similarity-aligned to a reference
    [L, 2] (removes head position, scale and in-plane rotation; the alignment is fitted on the
    51 inner iBUG points, the first ones, and applied to all, so that the iris points that may
    follow keep the gaze), in units of the reference's size, flattened: [N, 2L]."""
    ref = np.asarray(reference, np.float64)
    n_fit = min(len(INNER_IBUG), ref.shape[0])
    rc = ref[:n_fit] - ref[:n_fit].mean(0)
    size = np.sqrt(np.mean(np.sum(rc ** 2, 1)))
    out = []
    for x in np.asarray(lmk2d, np.float64):
        s, R, t = _umeyama2d(x[:n_fit], ref[:n_fit])
        y = (s * (R @ x.T)).T + t
        out.append(((y - ref[:n_fit].mean(0)) / size).reshape(-1))
    return np.asarray(out, np.float32)


def _umeyama2d(x, y):
    """Similarity (s, R, t) minimising |s R x + t - y|^2 for 2D point sets [L, 2]."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    U, S, Vt = np.linalg.svd(yc.T @ xc / len(x))
    d = np.sign(np.linalg.det(U @ Vt))
    D = np.diag([1.0, d])
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / np.mean(np.sum(xc ** 2, 1))
    return s, R, my - s * R @ mx


INNER_IBUG = tuple(range(17, 68))     # the 51 inner iBUG points: mediapipe and 68-point files give them


N_IRIS = 10                            # mediapipe's iris points 468-477 (both eyes)


def project_landmarks(model, shape, expression, pose, translation, cam_K, cam_R, cam_t, W, H,
                      iris: bool = False) -> np.ndarray:
    """The 51 inner iBUG landmarks (17..67) of the head model projected into per-frame cameras,
    followed with iris=True by mediapipe's 10 iris points (468-477; the model must embed them):
    [N, 51 (+10), 2] pixels (the synthetic stand-in for a detector; real videos give landmarks
    through `dhjax.capture.landmarks`: mediapipe detection or files)."""
    out = flame.forward(model, jnp.broadcast_to(jnp.asarray(shape), (len(expression), len(shape))),
                        jnp.asarray(expression), jnp.asarray(pose), jnp.asarray(translation))
    cam = camera_lib.Camera(jnp.asarray(cam_K), jnp.asarray(cam_R), jnp.asarray(cam_t), W, H)
    pts = out.landmarks[:, INNER_IBUG[0]:]
    if iris:
        if out.iris is None:
            raise ValueError(f"regressor.landmark_iris: the head model {model.name!r} embeds no iris points "
                             "(flame.load(..., iris=flame.METRICAL_TRACKER_IRIS_VERTICES) adds them for FLAME)")
        pts = jnp.concatenate([pts, out.iris], 1)
    uv, _ = camera_lib.project(cam, pts)
    return np.asarray(uv)


def inner_landmarks(lms, iris: bool = False) -> np.ndarray:
    """`dhjax.capture.landmarks.Landmarks` per frame -> [T, 51 (+10), 2] pixels of iBUG 17..67,
    followed with iris=True by mediapipe's iris points 468-477; ValueError naming the frame
    when a point is missing."""
    out = []
    for i, lm in enumerate(lms):
        pos = {int(j): p for j, p in zip(lm.ibug_ids, lm.points)}
        missing = [j for j in INNER_IBUG if j not in pos]
        if missing:
            raise ValueError(f"landmarks of frame {i} lack iBUG points {missing[:5]}...: the landmark driver "
                             f"needs the 51 inner points 17..67 (mediapipe or 68-point files give them)")
        pts = [np.stack([pos[j] for j in INNER_IBUG])]
        if iris:
            if lm.iris is None:
                raise ValueError(f"landmarks of frame {i} have no iris points: this regressor was trained with "
                                 "them (regressor.landmark_iris); give mediapipe's refined 478-point mesh")
            pts.append(np.asarray(lm.iris))
        out.append(np.concatenate(pts, 0))
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------------------------
# The run.


class _Renderers:
    """Jitted renders of one context: the Net of a frame, a GEM at coefficients k."""

    def __init__(self, ctx: gem.Context):
        self.ctx = ctx
        self.net = jax.jit(lambda p, fr, cams: gem.render_net(ctx, p, fr, cams))
        self.gem = jax.jit(lambda m, k, cams: gem.render(m, k, cams, backend=ctx.backend))


def _params_jnp(cap, f):
    return {k: jnp.asarray(v) for k, v in cap.frame_params(int(f)).items()}


def novel_view(ctx, rnd, net_params, models: dict, cap, sp, frames, lpips_fn, log) -> tuple[dict, dict]:
    """Train frames x held-out cameras: per method mean metrics; models {name: (EigenModel, k)}
    rendered at the frames' training coefficients. Returns (means, one example image per method)."""
    rows = {"net": [], **{n: [] for n in models}}
    example = {}
    for i, f in enumerate(frames):
        gt = gt_images(ctx, cap, f, sp.test_views)
        pred = {"net": np.asarray(rnd.net(net_params, _params_jnp(cap, f), _world_cams(cap, f, sp.test_views)))}
        cams = head_cameras_of(ctx, cap, f, sp.test_views)
        for n, (m, k) in models.items():
            pred[n] = np.asarray(rnd.gem(m, _k_of(k, int(f)), cams))
        for n, p in pred.items():
            rows[n] += evaluate_images(p, gt, lpips_fn)
        if i == 0:
            example = {"ground truth": gt[0], **{n: p[0] for n, p in pred.items()}}
    return {n: _rows_mean(r) for n, r in rows.items()}, example


def novel_expression(cfg, ctx, rnd, net_params, models: dict, cap, sp, lpips_fn, log, regressors=None):
    """Held-out frames x all cameras. GEMs get their coefficients by analysis-by-synthesis on the
    frame's training cameras (fit.views of them, spread; 0 = all), warm-started from the previous frame: sequential fitting), and from
    each regressor; metrics on the held-out camera(s) and on all cameras. Returns (means
    {method: {view set: metrics}}, example images, per-frame predictions for the video, per-frame
    metrics {method: [metrics of frame i over the held-out cameras]} in sp.test_frames' order)."""
    fc = cfg.fit
    all_views = np.arange(cap.images.shape[1])
    fit_views = sp.train_views
    if 0 < int(fc.views) < len(fit_views):       # a spread subset of the training cameras
        fit_views = fit_views[np.linspace(0, len(fit_views) - 1, int(fc.views)).round().astype(int)]
    test_pos = np.searchsorted(all_views, sp.test_views)
    rows: dict = {}
    per_frame: dict = {}
    frames_out = []
    example = {}
    prev = {n: None for n in models}
    ticker = logs.Ticker("novel expression: held-out frames fitted and rendered:", len(sp.test_frames), log)

    def add(name, pred, gt):
        r = rows.setdefault(name, {"all cameras": [], "held-out cameras": []})
        ms = evaluate_images(pred, gt, lpips_fn)
        r["all cameras"] += ms
        r["held-out cameras"] += [ms[j] for j in test_pos]
        per_frame.setdefault(name, []).append(_rows_mean([ms[j] for j in test_pos]))

    for i, f in enumerate(sp.test_frames):
        gt = gt_images(ctx, cap, f, all_views)
        preds = {"net": np.asarray(rnd.net(net_params, _params_jnp(cap, f), _world_cams(cap, f, all_views)))}
        cams_all = head_cameras_of(ctx, cap, f, all_views)
        cams_train = head_cameras_of(ctx, cap, f, fit_views)
        gt_train = gt_images(ctx, cap, f, fit_views)
        for n, (m, _) in models.items():
            k, _ = gem.fit_coefficients(m, gt_train, cams_train, k0=prev[n], steps=int(fc.steps), lr=float(fc.lr),
                                        ssim_weight=ctx.ssim_weight, prior_weight=float(fc.prior_weight),
                                        backend=ctx.backend)
            prev[n] = k
            preds[f"{n} (fit)"] = np.asarray(rnd.gem(m, k, cams_all))
        for n, (reg, m, feats) in (regressors or {}).items():
            k = gem.regressor_apply(reg, jnp.asarray(feats[i]))
            preds[n] = np.asarray(rnd.gem(m, k, cams_all))
        for n, p in preds.items():
            add(n, p, gt)
        frames_out.append({"ground truth": gt[test_pos[0]], **{n: p[test_pos[0]] for n, p in preds.items()}})
        if i == 0:
            example = frames_out[0]
        ticker.tick()
    means = {n: {s: _rows_mean(v) for s, v in r.items()} for n, r in rows.items()}
    return means, example, frames_out, per_frame


def per_frame_table(title: str, frame_ids, per_frame: dict, key: str = "psnr") -> str:
    """Markdown: one row per method, one column per held-out frame (its `key`, e.g. PSNR in dB),
    then the mean and on how many frames the method is above the first row (the reference, the
    Net): the paired reading that a mean over a few frames does not give."""
    ref_name = next(iter(per_frame))
    ref = np.array([m[key] for m in per_frame[ref_name]])
    cols = [f"frame {int(f)}" for f in frame_ids]
    above = f"frames above {ref_name}"
    rows = []
    for n, ms in per_frame.items():
        v = np.array([m[key] for m in ms])
        rows.append({"method": n, **dict(zip(cols, v.tolist())), "mean": float(v.mean()),
                     above: "" if n == ref_name else f"{int(np.sum(v > ref))}/{len(v)}"})
    return f"### {title}\n\n" + app.markdown_table(rows, ["method", *cols, "mean", above], floatfmt=".2f")


def size_table(cfg, ctx, rnd, net_params, distilled, k_train, cap, sp, frames, lpips_fn, workdir, lead):
    """Thesis Table 4 analogue: per M in gem.table_components, the distilled GEM truncated to M
    (novel-view PSNR at the training coefficients, MB, frames/s of one camera) and the Net."""
    f0 = int(frames[0])
    cam1 = _world_cams(cap, f0, sp.test_views[:1])
    hcam1 = head_cameras_of(ctx, cap, f0, sp.test_views[:1])
    reps = int(cfg.eval.fps_repeats)
    p0 = _params_jnp(cap, f0)
    net_mb = 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(net_params)) / 2 ** 20
    rows = []
    net_fps = timed(lambda: rnd.net(net_params, p0, cam1), reps)
    nv, _ = novel_view(ctx, rnd, net_params, {}, cap, sp, frames, lpips_fn, None)
    rows.append({"model": "Net", "components": "-", "gaussians": ctx.n_gaussians, "psnr": nv["net"]["psnr"],
                 "mb": net_mb, "fps": net_fps})
    for m in cfg.gem.table_components:
        m = int(m)
        if m > distilled.n_components:
            continue
        tm = gem.truncate(distilled, m)
        tk = {a: k_train[a][:, :m] for a in ATTRS}
        nvm, _ = novel_view(ctx, rnd, net_params, {"gem": (tm, tk)}, cap, sp, frames, lpips_fn, None)
        k0 = _k_of(tk, f0)
        fps = timed(lambda: rnd.gem(tm, k0, hcam1), reps)
        if lead:
            gem.save_eigenmodel(Path(workdir) / f"gem_{m}.npz", tm)
        rows.append({"model": "GEM", "components": m, "gaussians": ctx.n_gaussians, "psnr": nvm["gem"]["psnr"],
                     "mb": gem.size_bytes(tm) / 2 ** 20, "fps": fps})
    return rows


REGRESSOR_KINDS = ("mlp", "linear")


def regressor_key(driver: str, kind: str) -> str:
    """The name of a (driver, kind) regressor: its file is regressor_<key>.npz ('params',
    'params_linear', ...)."""
    if kind not in REGRESSOR_KINDS:
        raise ValueError(f"unknown regressor kind {kind!r}; use one of {REGRESSOR_KINDS}")
    return driver if kind == "mlp" else f"{driver}_{kind}"


def driver_of(key: str) -> str:
    """The driver of a `regressor_key`."""
    return key.split("_")[0]


def train_regressors(cfg, ctx, cap, sp, model, k_train, log):
    """One regressor per configured driver and kind (regressor.kinds: 'mlp', the thesis's, and/or
    'linear', `gem.train_linear_regressor`) on the training frames. Returns {regressor_key:
    (Regressor, features of the held-out frames [T, F])} and the neutral frame's position."""
    rc = cfg.regressor
    tf = sp.train_frames
    neutral = neutral_position(cfg, cap, tf)
    kinds = tuple(rc.get("kinds", ("mlp",)))
    for kind in kinds:
        regressor_key("params", kind)        # an unknown kind is refused before any training
    out = {}
    for driver in rc.drivers:
        if driver == "params":
            ftr = param_features(cap.expression[tf], cap.pose[tf])
            fte = param_features(cap.expression[sp.test_frames], cap.pose[sp.test_frames])
        elif driver == "landmarks":
            ftr, fte = _landmark_driver(cfg, ctx, cap, sp, neutral)
        else:
            raise ValueError(f"unknown regressor driver {driver!r}; use 'params' or 'landmarks'")
        k = {a: k_train[a] for a in ATTRS}
        for kind in kinds:
            t0 = time.time()
            if kind == "mlp":
                reg = gem.train_regressor(ftr, k, model.sigma, neutral, steps=int(rc.steps), lr=float(rc.lr),
                                          weight_decay=float(rc.weight_decay), n_pca=int(rc.n_pca),
                                          seed=int(cfg.seed))
            else:
                reg = gem.train_linear_regressor(ftr, k, model.sigma, neutral, n_pca=int(rc.n_pca), log=log)
            log(f"regressor '{driver}': {ftr.shape[1]} features -> PCA {reg.pca.components.shape[0]} -> "
                f"{'MLP 3x256' if kind == 'mlp' else 'linear (ridge)'} -> {len(ATTRS)} x {model.n_components} "
                f"coefficients, trained in {time.time() - t0:.0f}s")
            out[regressor_key(driver, kind)] = (reg, fte)
    return out, neutral


def _landmark_view(cfg, cap) -> int:
    if int(cfg.regressor.landmark_view) >= 0:
        return int(np.searchsorted(cap.view, int(cfg.regressor.landmark_view)))
    return _frontal_view(cap)


def _landmark_driver(cfg, ctx, cap, sp, neutral):
    v = _landmark_view(cfg, cap)
    W, H = cap.size
    lm = project_landmarks(ctx.model, cap.shape, cap.expression, cap.pose, cap.translation,
                           cap.K[:, v], cap.R[:, v], cap.t[:, v], W, H,
                           iris=bool(cfg.regressor.get("landmark_iris", False)))
    ref = lm[sp.train_frames[neutral]]
    feats = landmark_features(lm, ref)
    return feats[sp.train_frames], feats[sp.test_frames]


def cross_reenactment(cfg, ctx, rnd, model, regs, neutral, cap, sp, out_path, log):
    """Another synthetic identity drives the GEM through each regressor: the source's frames
    (its own neutral as reference) -> k -> the GEM rendered from the frontal camera at the
    subject's neutral head pose. Writes an mp4 (source | GEM per driver); returns the frame count."""
    n = int(cfg.eval.cross_frames)
    if n <= 0 or not regs:
        return 0
    s = synthetic_generator_config(cfg)
    s.multiview.update(first_identity=int(cfg.data.identity) + 1, n_expressions=n)
    gen = synthetic.MultiviewGenerator(s)
    v = _frontal_view(cap)
    src_frames = [gen.frame(0, e) for e in range(n)]
    expr = np.stack([np.asarray(fr["expression"]) for fr in src_frames])
    pose = np.stack([np.asarray(fr["pose"]) for fr in src_frames])
    trans = np.stack([np.asarray(fr["translation"]) for fr in src_frames])
    src_shape = np.asarray(gen.identity(gen.identity_number(0))["shape"])
    energy = np.sum(expr ** 2, 1) + 10.0 * np.sum(pose[:, 2:] ** 2, (1, 2))
    src_neutral = int(np.argmin(energy))
    feats = {}
    for key in regs:
        if driver_of(key) == "params":
            f = param_features(expr, pose)
            # relative transfer: the source's offsets from its own neutral on the subject's neutral
            f = f - f[src_neutral] + regs[key][0].neutral
        else:
            W, H = cap.size
            lm = project_landmarks(ctx.model, src_shape, expr, pose, trans,
                                   cap.K[0, v][None].repeat(n, 0), cap.R[0, v][None].repeat(n, 0),
                                   cap.t[0, v][None].repeat(n, 0), W, H,
                                   iris=bool(cfg.regressor.get("landmark_iris", False)))
            f = landmark_features(lm, lm[src_neutral])
            f = f - f[src_neutral] + regs[key][0].neutral
        feats[key] = f
    fneutral = int(sp.train_frames[neutral])
    cams = head_cameras_of(ctx, cap, fneutral, [v])
    frames = []
    for e in range(n):
        src = np.asarray(gen.render_group(0, e, [int(cap.view[v])])[0]["image"])
        row = [src]
        for key, (reg, _) in regs.items():
            k = gem.regressor_apply(reg, jnp.asarray(feats[key][e]))
            row.append(np.asarray(rnd.gem(model, k, cams))[0])
        frames.append(np.concatenate(row, 1))
    dio.save_video(out_path, np.stack(frames), fps=float(cfg.eval.video_fps))
    log(f"cross-reenactment: {n} frames of identity {int(cfg.data.identity) + 1} -> {out_path} "
        f"(source | " + " | ".join(f"GEM via {d}" for d in regs) + ")")
    return n


def _fmt_table(title: str, rows: dict, keys=("psnr", "ssim", "l1", "lpips")) -> str:
    present = [k for k in keys if any(k in r for r in rows.values())]
    lines = [f"### {title}", "", "| method | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for n, r in rows.items():
        lines.append(f"| {n} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in present) + " |")
    return "\n".join(lines) + "\n"


def _picture(path, examples: list[tuple[str, dict]]):
    """Rows of labelled images (one row per example set) -> png. A bare Figure (no pyplot): the
    caller's matplotlib backend, e.g. a notebook's inline one, is left alone."""
    from matplotlib.figure import Figure

    ncol = max(len(e) for _, e in examples)
    fig = Figure(figsize=(2.0 * ncol, 2.6 * len(examples)), dpi=110)
    axes = fig.subplots(len(examples), ncol, squeeze=False)
    for r, (title, ex) in enumerate(examples):
        for c in range(ncol):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(ex):
                name, img = list(ex.items())[c]
                ax.imshow(np.clip(img, 0, 1))
                label = name.replace(" (", "\n(") if len(name) > 20 else name      # long names on two lines
                ax.set_title(f"{title}\n{label}" if c == 0 else label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def check_config(cfg) -> None:
    """Raises ValueError naming the field when the model or eigenbasis sizes cannot work
    (model.map_size, gem.n_components, gem.table_components, refine.qr_every), and loads
    eval.lpips_path's weights: before anything is written, so that a bad value does not cost
    the Net's training before stage B refuses it. (That M leaves a training frame over is
    checked once the capture is split, still before stage A.)"""
    for field in ("model.map_size", "gem.n_components", "refine.qr_every", "refine.views_per_step"):
        config_lib.check_integer(cfg, field, 1)
    M = int(cfg.gem.n_components)
    bad = [m for m in cfg.gem.table_components if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= M]
    if bad:
        raise ValueError(f"config field gem.table_components must hold sizes in [1, gem.n_components = {M}], "
                         f"got {tuple(cfg.gem.table_components)}")
    lpips.load_configured(cfg.eval.lpips_path)


def run(cfg, workdir: str) -> dict:
    """Runs (or resumes) GEM's stages A -> D on one subject and writes the files of the module
    docstring. Returns metrics.json's content.

    Raises app.Interrupted on SIGTERM during a training stage (a checkpoint was written),
    ValueError for a config field that cannot work (`check_config`, before anything is written).
    """
    app.check_experiment(cfg, "gem")
    check_config(cfg)
    run_ = app.start(workdir, cfg)
    log = run_.log
    cap, model, source = open_capture(cfg, log)
    sp = gem_data.split(cap, tuple(cfg.data.test_views), cfg.data.test_frames)
    if int(cfg.gem.n_components) > len(sp.train_frames) - 1:     # stage B's bound, before stage A trains
        raise ValueError(f"gem.n_components={int(cfg.gem.n_components)} needs at least "
                         f"{int(cfg.gem.n_components) + 1} training frames, the capture has {len(sp.train_frames)}")
    lpips_fn = lpips.make_lpips(lpips.load_configured(cfg.eval.lpips_path))
    # With LPIPS weights, the Net's and the refinement's losses add loss.lpips_weight x LPIPS.
    ctx = gem.make_context(model, cap.shape, cfg.model, cfg.loss, cfg.optim, lpips_fn=lpips_fn)
    log(f"data: {source}: {len(sp.train_frames)} training / {len(sp.test_frames)} held-out frames, "
        f"{len(sp.train_views)} training / {len(sp.test_views)} held-out cameras; {ctx.n_gaussians} Gaussians "
        f"({ctx.map_size}^2 map); devices: {jax.device_count()}")
    if lpips_fn is not None:
        log(f"LPIPS: in the metrics, and in the Net's and the refinement's losses with weight "
            f"{ctx.lpips_weight:g} (loss.lpips_weight)")

    # A: the Net.
    net_params, net_seconds = train_net(cfg, run_, ctx, cap, sp, log)
    # B: distillation.
    distilled, k_train, ratio, build_seconds = distil_stage(cfg, run_, ctx, net_params, cap, sp, log)
    # C: refinement.
    refined, k_refined = refine_stage(cfg, run_, ctx, distilled, k_train, cap, sp, log)
    if run_.lead:
        gem.save_eigenmodel(run_.path("gem.npz"), refined)
    rnd = _Renderers(ctx)
    nvf = sp.train_frames
    if int(cfg.eval.max_novel_view_frames):
        nvf = nvf[np.linspace(0, len(nvf) - 1, min(len(nvf), int(cfg.eval.max_novel_view_frames))).astype(int)]
    models = {"GEM": (distilled, k_train), "GEM refined": (refined, k_refined)}
    t0 = time.time()
    nv, nv_example = novel_view(ctx, rnd, net_params, models, cap, sp, nvf, lpips_fn, log)
    log(f"novel view ({len(nvf)} training frames x {len(sp.test_views)} held-out cameras, {time.time() - t0:.0f}s): "
        + ", ".join(f"{n} {r['psnr']:.2f} dB" for n, r in nv.items()))
    # Training-view PSNR before/after refinement (the thesis's 34.75 -> 36.85 figure).
    tv, _ = novel_view(ctx, rnd, net_params, models, cap, sp._replace(test_views=sp.train_views), nvf[:4],
                       lpips_fn, log)
    # D: drivers.
    regs, neutral = train_regressors(cfg, ctx, cap, sp, refined, k_refined, log)
    if run_.lead:
        for d, (r, _) in regs.items():
            gem.save_regressor(run_.path(f"regressor_{d}.npz"), r, driver_of(d))
        v, fn = _frontal_view(cap), int(sp.train_frames[neutral])
        cam = head_cameras_of(ctx, cap, fn, [v])
        np.savez(run_.path("drive_camera.npz"), K=np.asarray(cam.K[0]), R=np.asarray(cam.R[0]),
                 t=np.asarray(cam.t[0]), width=np.int32(cam.width), height=np.int32(cam.height))
    t0 = time.time()
    reg_models = {f"GEM refined (regressor: {d})": (r, refined, f) for d, (r, f) in regs.items()}
    ne, ne_example, ne_frames, ne_per_frame = novel_expression(cfg, ctx, rnd, net_params, models, cap, sp, lpips_fn, log,
                                                 reg_models)
    log(f"novel expression ({len(sp.test_frames)} frames x {cap.images.shape[1]} cameras, {time.time() - t0:.0f}s): "
        + ", ".join(f"{n} {r['held-out cameras']['psnr']:.2f} dB" for n, r in ne.items()) + " (held-out cameras)")
    table = size_table(cfg, ctx, rnd, net_params, distilled, k_train, cap, sp, nvf, lpips_fn, run_.workdir, run_.lead)
    log("size table: " + "; ".join(f"{r['model']} M={r['components']}: {r['psnr']:.2f} dB {r['mb']:.2f} MB "
                                   f"{r['fps']:.0f} fps" for r in table))
    local = None
    if bool(cfg.gem.local_regions):
        try:
            local = local_pca_comparison(cfg, ctx, net_params, cap, sp, lpips_fn, log)
        except ValueError as err:       # an optional comparison must not lose the run's results
            log(f"localised PCA comparison skipped: {err}")
            local = {"skipped": str(err)}
    result = {
        "local_pca": local,
        "stage_a": {"train_seconds": net_seconds, "gaussians": ctx.n_gaussians, "map_size": ctx.map_size},
        "stage_b": {"build_seconds": build_seconds, "components": distilled.n_components,
                    "explained_variance": {a: float(np.sum(ratio[a])) for a in ATTRS}},
        "training_views": tv, "novel_view": nv, "novel_expression": ne, "size_table": table,
        "novel_expression_per_frame": {"frames": [int(cap.frame[f]) for f in sp.test_frames], **ne_per_frame},
        "regressor": {"drivers": list(regs), "neutral_frame": int(sp.train_frames[neutral])},
        "gem_mb": gem.size_bytes(refined) / 2 ** 20,
    }
    if run_.lead:
        Path(run_.path("metrics.json")).write_text(json.dumps(result, indent=1, default=float))
        md = [_fmt_table(f"Training views ({len(nvf[:4])} frames, all training cameras)", tv),
              _fmt_table(f"Novel view ({len(nvf)} training frames, held-out cameras {list(map(int, cap.view[sp.test_views]))})", nv),
              _fmt_table("Novel expression, held-out cameras", {n: r["held-out cameras"] for n, r in ne.items()}),
              _fmt_table("Novel expression, all cameras", {n: r["all cameras"] for n, r in ne.items()}),
              per_frame_table("Novel expression per held-out frame, PSNR (dB) on the held-out cameras",
                              [cap.frame[f] for f in sp.test_frames], ne_per_frame),
              app.markdown_table(table, ["model", "components", "gaussians", "psnr", "mb", "fps"])]
        Path(run_.path("tables.md")).write_text("\n".join(md))
        app.merge_final_metrics(run_.workdir, {
            "novel_view/net_psnr": nv["net"]["psnr"], "novel_view/gem_psnr": nv["GEM"]["psnr"],
            "novel_view/gem_refined_psnr": nv["GEM refined"]["psnr"],
            "novel_expression/net_psnr": ne["net"]["held-out cameras"]["psnr"],
            "novel_expression/gem_refined_fit_psnr": ne["GEM refined (fit)"]["held-out cameras"]["psnr"],
            **{f"size/{'net' if r['model'] == 'Net' else 'm' + str(r['components'])}_{k}": float(r[k])
               for r in table for k in ("psnr", "mb", "fps")}})
        _picture(run_.path("comparison.png"), [("novel view", nv_example), ("novel expression", ne_example)])
        dio.save_video(run_.path("novel_expression.mp4"),
                       np.stack([np.concatenate(list(fr.values()), 1) for fr in ne_frames]), fps=float(cfg.eval.video_fps))
        vid = []
        for f in nvf:
            gt = gt_images(ctx, cap, f, sp.test_views[:1])[0]
            net = np.asarray(rnd.net(net_params, _params_jnp(cap, f), _world_cams(cap, f, sp.test_views[:1])))[0]
            g = np.asarray(rnd.gem(refined, _k_of(k_refined, int(f)), head_cameras_of(ctx, cap, f, sp.test_views[:1])))[0]
            vid.append(np.concatenate([gt, net, g], 1))
        dio.save_video(run_.path("novel_view.mp4"), np.stack(vid), fps=float(cfg.eval.video_fps))
        # A PLY of the refined GEM at the last training frame's coefficients, placed in the world.
        f = int(sp.train_frames[-1])
        R0, T = gem.head_rigid(ctx, cap.shape, cap.pose[f], cap.translation[f])
        gem.export_ply(run_.path(f"frame_{int(cap.frame[f]):04d}.ply"),
                       gem.eigen_attributes(refined, _k_of(k_refined, f)), refined.sh, R0=R0, T=T)
        cross_reenactment(cfg, ctx, rnd, refined, regs, neutral, cap, sp, run_.path("cross_reenactment.mp4"), log)
    run_.done(f"{run_.workdir}/tables.md", "comparison.png", "gem.npz")
    return result


def local_pca_comparison(cfg, ctx, net_params, cap, sp, lpips_fn, log) -> dict:
    """Global vs localised PCA (`gem_local.compare`: per-attribute reconstruction RMSE on training
    and held-out frames at equal size and at equal coefficient count), plus the held-out frames'
    PSNR of both GEMs at their projected coefficients (the Net's attributes of the frame projected
    onto the basis: the best any driver can reach), rendered from every camera."""
    M = int(cfg.gem.n_components)
    # Regions smaller than M Gaussians cannot hold M components (opacity has one value per
    # Gaussian): they are merged into the rest.
    assign = gem_local.region_assignment(ctx, min_items=max(16, M))
    train = collect(ctx, net_params, cap, sp.train_frames)
    test = collect(ctx, net_params, cap, sp.test_frames)
    report = gem_local.compare(train, test, net_params["sh"], assign.labels, M, names=assign.names,
                               method=cfg.gem.pca_method)
    glob, _, _ = gem.distil(train, net_params["sh"], M, sh_degree=ctx.sh_degree, background=ctx.background,
                            method=cfg.gem.pca_method)
    loc, _ = gem_local.distil_local(train, net_params["sh"], M, assign.labels, sh_degree=ctx.sh_degree,
                                    background=ctx.background, method=cfg.gem.pca_method)
    views = np.arange(cap.images.shape[1])
    flat = gem.flatten_attributes({a: jnp.asarray(test[a]) for a in ATTRS})
    kg = {a: jnp.einsum("nd,md->nm", flat[a] - glob.mean[a], glob.basis[a]) for a in ATTRS}
    psnr = {"global": [], "local_equal_size": []}
    rg = jax.jit(lambda k, cams: gem.render(glob, k, cams, backend=ctx.backend))
    rl = jax.jit(lambda k, cams: gem_local.render_local(loc, k, cams, backend=ctx.backend))
    for i, f in enumerate(sp.test_frames):
        gt = jnp.asarray(gt_images(ctx, cap, f, views))
        cams = head_cameras_of(ctx, cap, f, views)
        psnr["global"].append(float(jnp.mean(losses.psnr(rg(_k_of(kg, i), cams), gt))))
        k_loc = {a: pca_lib.project_local(loc.pca[a], jnp.asarray(test[a][i])) for a in ATTRS}
        psnr["local_equal_size"].append(float(jnp.mean(losses.psnr(rl(k_loc, cams), gt))))
    report["heldout_psnr_projected"] = {k: float(np.mean(v)) for k, v in psnr.items()}
    log(f"localised PCA ({report['n_regions']} regions {list(assign.names)}): held-out PSNR at projected "
        f"coefficients: global {report['heldout_psnr_projected']['global']:.2f} dB, local (equal size) "
        f"{report['heldout_psnr_projected']['local_equal_size']:.2f} dB; position RMSE held-out: global "
        f"{report['global']['rmse_test']['position'] * 1e3:.3f} mm, local "
        f"{report['local_equal_size']['rmse_test']['position'] * 1e3:.3f} mm")
    return report


# ----------------------------------------------------------------------------------------------
# Driving a finished GEM with another sequence.


def _source_frames(root, split: str, item: int, max_frames: int):
    """(images [T, H, W, 3] of each frame's first view, expression [T, E], pose [T, 5, 3]) of one
    item of a dataset folder (tracked video or multi-view)."""
    from dhjax.data import dataset as ds

    reader = ds.FolderDataset(root, split)
    items = sorted({e[3] for e in reader.entries})
    ordinal = items[0] if int(item) < 0 else int(item)
    if ordinal not in items:
        raise ValueError(f"{root}/{split}: no item {item}")
    first: dict = {}
    for i, e in enumerate(reader.entries):
        if e[3] == ordinal and e[1] not in first:
            first[e[1]] = i
    idx = [first[k] for k in sorted(first, key=ds._numbered)]
    if max_frames:
        idx = idx[: int(max_frames)]
    samples = [reader[i] for i in idx]
    return (np.stack([s["image"] for s in samples]), np.stack([s["expression"] for s in samples]),
            np.stack([s["pose"] for s in samples]))


def drive_camera(workdir) -> camera_lib.Camera:
    """The head-frame camera [1] a finished run saved for driving (drive_camera.npz: the most
    frontal capture camera at the neutral training frame), for `gem.render`."""
    cam_file = Path(workdir) / "drive_camera.npz"
    if not cam_file.is_file():
        raise FileNotFoundError(f"no '{cam_file}': '{workdir}' is not a finished GEM run")
    z = dio.read_npz(cam_file, ("K", "R", "t", "width", "height"), what="the driving camera of a GEM run")
    return camera_lib.Camera(jnp.asarray(z["K"])[None], jnp.asarray(z["R"])[None], jnp.asarray(z["t"])[None],
                             int(z["width"]), int(z["height"]))


def drive(workdir, out, *, source: str = "", split: str = "train", item: int = -1, landmarks_path: str = "",
          neutral: int = -1, max_frames: int = 0, fps: float = 12.0, kind: str = "mlp", ply_frames=(),
          log=print) -> Path:
    """Drives the GEM of a finished run (`run`'s workdir: gem.npz, regressor_<driver>.npz,
    drive_camera.npz) with another sequence, through a regressor, with no network but the
    regressor's MLP and no head model:

    * source: a dataset folder (a tracked video from `experiments.track`, or any multi-view
      dataset): the 'params' driver on its per-frame expression and jaw/eye rotations;
    * landmarks_path: 2D landmarks of a video ([T, N, 2] array or per-frame files that
      `dhjax.capture.landmarks.load` reads; 68, 51 or mediapipe points, and mediapipe's refined
      478-point mesh when the regressor was trained with the iris points, regressor.landmark_iris):
      the 'landmarks' driver.
    Features are taken relative to the source's neutral frame (`neutral`; -1: the smallest
    parameters for 'params', the first frame for 'landmarks') and added to the subject's
    neutral (relative transfer). kind: which regressor ('mlp', the thesis's, or 'linear'; the run
    must have trained it, regressor.kinds). Writes <out>/drive.mp4 (source | GEM when images are known),
    <out>/coefficients.npz and, for each source frame number in ply_frames, <out>/frame_<i>.ply
    (the driven GEM as a 3DGS PLY, in the head frame: driving gives no head pose); returns the
    video's path.
    """
    app.quiet_library_logs()
    work = Path(workdir)
    dio.check_fps(fps, "--fps")
    if int(max_frames) < 0:
        raise ValueError(f"--max_frames must be >= 0 (0: every frame), got {max_frames}")
    if bool(source) == bool(landmarks_path):
        raise ValueError("give exactly one of --source (a dataset folder, e.g. experiments.track's <workdir>/dataset) "
                         "or --landmarks (a video's landmark file or folder); Python: source= / landmarks_path=")
    model = gem.load_eigenmodel(work / "gem.npz")
    cam = drive_camera(work)
    driver = "params" if source else "landmarks"
    path = work / f"regressor_{regressor_key(driver, kind)}.npz"
    if not path.is_file():
        have = [k for k in REGRESSOR_KINDS if (work / f"regressor_{regressor_key(driver, k)}.npz").is_file()]
        raise FileNotFoundError(f"no '{kind}' regressor for the '{driver}' driver in {work} ({path.name}); "
                                + (f"the run has {have} (kind=... / --regressor=...)" if have else
                                   "the run trains it when regressor.drivers and regressor.kinds include them"))
    reg, _ = gem.load_regressor(path)
    images = None
    if source:
        images, expr, pose = _source_frames(source, split, item, max_frames)
        feats = param_features(expr, pose)
        if feats.shape[1] != reg.neutral.shape[0]:
            raise ValueError(f"{source}: {expr.shape[1]} expression coefficients give {feats.shape[1]} features; the "
                             f"regressor was trained on {reg.neutral.shape[0]}")
        n0 = int(np.argmin(np.sum(expr ** 2, 1) + 10.0 * np.sum(pose[:, 2:] ** 2, (1, 2)))) if neutral < 0 else int(neutral)
    else:
        from dhjax.capture import landmarks as lmk_lib

        lms = lmk_lib.load(landmarks_path)
        lms = lms if isinstance(lms, list) else [lms]
        if max_frames:
            lms = lms[: int(max_frames)]
        # A regressor trained with the iris points (regressor.landmark_iris) takes 2 x 61 features.
        pts = inner_landmarks(lms, iris=reg.neutral.shape[0] == 2 * (len(INNER_IBUG) + N_IRIS))
        n0 = 0 if neutral < 0 else int(neutral)
        if not 0 <= n0 < len(pts):
            raise ValueError(f"neutral frame {n0} outside the source's {len(pts)} frames")
        feats = landmark_features(pts, pts[n0])
        if feats.shape[1] != reg.neutral.shape[0]:
            raise ValueError(f"{landmarks_path}: {pts.shape[1]} points give {feats.shape[1]} features; the "
                             f"regressor was trained on {reg.neutral.shape[0]}")
    if not 0 <= n0 < len(feats):
        raise ValueError(f"neutral frame {n0} outside the source's {len(feats)} frames")
    ply_frames = [int(i) for i in ply_frames]
    bad = [i for i in ply_frames if not 0 <= i < len(feats)]
    if bad:
        raise ValueError(f"ply frames {bad} outside the source's {len(feats)} frames")
    feats = feats - feats[n0] + np.asarray(reg.neutral)
    k = gem.regressor_apply(reg, jnp.asarray(feats))
    rnd = jax.jit(lambda kk: gem.render(model, kk, cam))
    frames = []
    for i in range(len(feats)):
        img = np.asarray(rnd({a: k[a][i] for a in ATTRS}))[0]
        if images is not None:
            src = images[i]
            if src.shape[0] != img.shape[0]:
                import skimage.transform

                src = skimage.transform.resize(src, (img.shape[0], round(src.shape[1] * img.shape[0] / src.shape[0])))
            img = np.concatenate([src, img], 1)
        frames.append(img)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "coefficients.npz", **{a: np.asarray(k[a]) for a in ATTRS})
    for i in ply_frames:
        gem.export_ply(out / f"frame_{i:04d}.ply", gem.eigen_attributes(model, {a: k[a][i] for a in ATTRS}), model.sh)
    path = dio.save_video(out / "drive.mp4", np.stack(frames), fps=float(fps))
    plys = f" and {len(ply_frames)} PLY file(s)" if ply_frames else ""
    log(f"drove the GEM of {work} with {len(feats)} frames ({driver} driver, {kind} regressor) -> {path}{plys}")
    return path
