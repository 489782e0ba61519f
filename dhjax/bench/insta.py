"""INSTA benchmark: training throughput and whole-frame render time of `dhjax.synthesis.insta`
with dhjax's kernels against the pure-JAX reference, in one run (no timed assertions anywhere).

Setting: an INSTA config (`insta.config`, configs/insta.py:tiny by default: 48^3 occupancy, 12
hash levels x 2 features, T = 2^15, 2 frames x 1024 rays per step, 48 samples per ray) built by
`insta_run.build` from a short synthetic video (`insta.n_frames` frames; the sizes of the field,
the grid and the batch are the variant's, so the figures are those of the variant's training).
The kernel run uses Context.backend = "auto" (the kernels of the default device for every op:
raymarch, BVH closest point, hash grid; the output names what each op resolved to), the
reference run Context.backend = "reference" (pure JAX for every op, its closest point a brute
force over all triangles).

Occupancy: the weights are freshly initialised, but the occupancy grid of a trained avatar is not
all occupied (init's grid), so with insta.occupancy = "shell" the canonical grid holds the cells
within `shell_cells` cells of the canonical mesh (roughly what the updates prune it to); "full"
keeps init's all-occupied grid (the first steps of training, the most samples).

1. Training: `insta.train_step` jitted (state donated) on one ray batch, median of `repeats`
   steps after `warmup` (compilation). The reference is slow, so it runs on the first
   `reference.rays_per_frame` rays of each frame of the same batch (capacity scaled alike) and
   the kernels are timed on that reduced batch too: `insta_train_speedup_vs_reference` compares
   the two on the same rays; rays/s of each on its own batch are reported as well. The occupancy
   update (every model.occupancy.every steps) is timed alone and amortised into `..._step_s_amortised`,
   from which `insta_train_minutes_estimate` = train.steps x that / 60 (no evaluation, renders
   or checkpoints).
2. Parts of one step (insta.parts): deformed occupancy grids + march, closest point of the
   samples, canonicalisation (eqs. 2-4), hash encoding forward + backward to the table; the rest
   (MLPs, compositing, loss, Adam, EMA) is the step minus those.
3. Rendering: `insta_run.Renderer(ctx, render.chunk).render` of one held-out frame at
   render.size (the frame's K scaled from the video's size), seconds per frame and frames/s with
   the kernels; the reference renders the same view at render.reference_size (0: skipped) and is
   compared in rays/s (with the kernels timed at that size too).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhjax import ops
from dhjax.bench.timing import load_config, time_call
from dhjax.geometry import deformation
from dhjax.ops import _ffi
from dhjax.ops import bvh as bvh_op
from dhjax.ops import hashgrid as hg_op
from dhjax.ops import raymarch

RAY_KEYS = ("origins", "dirs", "color", "mouth", "face", "mesh_t", "pixel", "background")
OCCUPANCY = ("shell", "full")


def default_config() -> ml_collections.ConfigDict:
    """The settings of the INSTA bench (configs/bench.py:insta); see the module docstring.

    config: the INSTA config "path.py:variant" (a relative path is looked up from the working
      folder, then from the repository); cache_dir: its data.cache_dir ("" keeps the config's);
      n_frames: frames of the synthetic video (0: the config's), holdout: of those held out;
      video_size: width and height of the synthetic video (0: the config's);
      frames_per_step, rays_per_frame: the training batch (0: the config's); occupancy: 'shell'
      or 'full', shell_cells: the shell's half-width in cells; repeats, warmup: timed and untimed
      training steps; parts: time the parts of a step; reference: rays_per_frame (0: skip the
      reference), repeats; render: size (width of the frame, pixels; 0: skip), chunk (rays per
      render call), repeats, reference_size (the reference's frame width; 0: skipped).
    """
    c = ml_collections.ConfigDict()
    c.config = "configs/insta.py:tiny"
    c.cache_dir = ""
    c.n_frames = 8
    c.holdout = 2
    c.video_size = 0
    c.frames_per_step = 0
    c.rays_per_frame = 0
    c.occupancy = "shell"
    c.shell_cells = 2.0
    c.repeats = 5
    c.warmup = 2
    c.parts = True
    c.reference = ml_collections.ConfigDict(dict(rays_per_frame=128, repeats=2))
    c.render = ml_collections.ConfigDict(dict(size=512, chunk=1 << 15, repeats=2, reference_size=24))
    return c



def insta_config(bc):
    """The INSTA ConfigDict the bench builds (bench settings applied)."""
    cfg = load_config(bc.config)
    if bc.cache_dir:
        cfg.data.cache_dir = bc.cache_dir
    if int(bc.n_frames):
        if cfg.data.root:
            cfg.data.max_frames = int(bc.n_frames)
        else:
            cfg.data.synthetic.video.n_frames = int(bc.n_frames)
        cfg.data.holdout = bc.holdout
    if int(bc.video_size):
        cfg.data.synthetic.video.update(width=int(bc.video_size), height=int(bc.video_size))
    if int(bc.frames_per_step):
        cfg.batch.frames_per_step = int(bc.frames_per_step)
    if int(bc.rays_per_frame):
        cfg.batch.rays_per_frame = int(bc.rays_per_frame)
    cfg.backend = "auto"
    return cfg


def resolved_kernels() -> dict:
    """{op: implementation} that Context.backend = "auto" runs for INSTA's ops here."""
    return {op: _ffi.resolve_backend("auto", op, mod._TARGETS)
            for op, mod in (("raymarch", raymarch), ("bvh", bvh_op), ("hashgrid", hg_op))}


def shell_occupancy(ctx, cells: float) -> np.ndarray:
    """[D^3] uint8: the canonical cells whose centre lies within `cells` cell widths of the
    canonical mesh."""
    from dhjax.synthesis import insta

    centres = insta.cell_centres(ctx.box_min, ctx.box_max, ctx.resolution)
    cp = ops.closest_point(ctx.canon_verts, ctx.faces, centres, backend="auto")
    width = float(np.max(ctx.box_max - ctx.box_min)) / ctx.resolution
    return (np.sqrt(np.asarray(cp.sq_dist)) <= float(cells) * width).astype(np.uint8)


def _subset(batch: dict, rays: int) -> dict:
    return {k: (v[:, :rays] if k in RAY_KEYS else v) for k, v in batch.items()}


def _fresh_state(ctx, bits):
    from dhjax.synthesis import insta

    state = insta.init_state(jax.random.PRNGKey(0), ctx)
    state["occ"] = {"density": state["occ"]["density"], "bits": jnp.asarray(bits)}
    # params and ema share buffers after init: copy every leaf so the state can be donated
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)


def time_train(ctx, batch, bits, repeats: int, warmup: int):
    """(median seconds per train_step, last metrics) of ctx on a batch (jitted, state donated)."""
    from dhjax.synthesis import insta

    step = jax.jit(functools.partial(insta.train_step, ctx=ctx), donate_argnums=0)
    box = {"state": _fresh_state(ctx, bits), "metrics": None, "i": 0}
    b = {k: jnp.asarray(v) for k, v in batch.items()}

    def call():
        box["state"], box["metrics"] = step(box["state"], b, jax.random.PRNGKey(box["i"]))
        box["i"] += 1
        jax.block_until_ready((box["state"], box["metrics"]))

    t = time_call(call, repeats, warmup)
    return t, {k: float(v) for k, v in box["metrics"].items()}


def time_occupancy_update(ctx, bits, repeats: int) -> float:
    """Seconds of one jitted `insta.update_occupancy` (the field evaluated at `occupancy.cells`
    jittered cells, every cell of the D^3 grid with the default 0; `bits` only seeds the state),
    warm, the median of `repeats` calls."""
    from dhjax.synthesis import insta

    state = _fresh_state(ctx, bits)
    fn = jax.jit(lambda occ, params, key: insta.update_occupancy(occ, params, ctx, key))
    return time_call(lambda: jax.block_until_ready(fn(state["occ"], state["params"], jax.random.PRNGKey(0))),
                     repeats, 1)


def time_parts(ctx, batch, bits, repeats: int) -> dict:
    """Seconds of the parts of one training step (module docstring), each jitted alone."""
    from dhjax.synthesis import insta

    mc = ctx.model_cfg
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    frames = insta.batch_frames(b)
    bits = jnp.asarray(bits)
    params = insta.init_params(jax.random.PRNGKey(0), ctx)

    march = jax.jit(lambda bits, fr, o, d: insta.march_frames(bits, ctx, fr, o, d, capacity=ctx.capacity))
    samples = march(bits, frames, b["origins"], b["dirs"])

    def points(s):
        ray = jnp.maximum(s.ray, 0)
        o = jnp.take_along_axis(b["origins"], ray[..., None], axis=1)
        d = jnp.take_along_axis(b["dirs"], ray[..., None], axis=1)
        return o + s.t[..., None] * d

    p = jax.jit(points)(samples)
    closest = jax.jit(lambda v, p: ops.closest_point(v, ctx.faces, p, backend=ctx.backend).face)
    face = closest(frames.verts, p)
    nb = None if float(mc.nearest_beta) < 0 else float(mc.nearest_beta)
    canon = jax.jit(lambda p, v, f: deformation.canonicalize(
        p, v, jnp.asarray(ctx.canon_verts)[None], ctx.faces, face=f, beta=float(mc.beta), nearest_beta=nb,
        scale=mc.scale, neighbours=ctx.neighbours).points)
    x = canon(p, frames.verts, face)
    lo, hi = jnp.asarray(ctx.box_min), jnp.asarray(ctx.box_max)
    u = jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)
    w = jax.random.normal(jax.random.PRNGKey(1), u.shape[:-1] + (ctx.hash_cfg.n_output_dims,))
    encode = jax.jit(jax.value_and_grad(lambda table, u: jnp.sum(
        ops.hash_encode(u, table, ctx.hash_cfg, backend=ctx.backend, points_grad=False) * w)))

    def t(fn, *args):
        return time_call(lambda: jax.block_until_ready(fn(*args)), repeats, 1)

    return {"grids_march": t(march, bits, frames, b["origins"], b["dirs"]),
            "closest_point": t(closest, frames.verts, p),
            "canonicalize": t(canon, p, frames.verts, face),
            "hash_fwd_bwd": t(encode, params["table"], u),
            "samples": int(np.sum(np.asarray(samples.n_samples)))}


def _scaled_camera(test, i: int, width: int):
    """(K, R, t, width, height) of held-out frame i seen at `width` pixels across (same view)."""
    W, H = test.size
    s = width / W
    K = np.asarray(test.K[i], np.float64).copy()
    K[:2, :2] *= s
    K[:2, 2] = (K[:2, 2] + 0.5) * s - 0.5      # pixel centres at integer coordinates
    return K.astype(np.float32), test.R[i], test.t[i], int(width), int(round(H * s))


def time_render(ctx, params, bits, test, width: int, chunk: int, repeats: int):
    """(seconds per frame, rays, samples per ray) of `insta_run.Renderer` on held-out frame 0."""
    from dhjax.render import camera as camera_lib
    from dhjax.synthesis import insta, insta_data, insta_run

    frame = insta_data.frame_inputs(test, [0], [-1])
    K, R, t, w, h = _scaled_camera(test, 0, width)
    renderer = insta_run.Renderer(ctx, min(int(chunk), w * h))    # no padding of a small frame to a chunk
    sec = time_call(lambda: renderer.render(params, bits, frame, K, R, t, w, h), repeats, 1)
    # samples the frame's rays need (one counting pass of the march)
    cam = camera_lib.make_camera(jnp.asarray(K), jnp.asarray(R), jnp.asarray(t), w, h)
    o, d = camera_lib.pixel_rays(cam)
    fr = insta.Frames(**{k: jnp.asarray(v) for k, v in frame.items()})
    grids, lo, hi = insta.deformed_grids(jnp.asarray(bits), ctx, fr.verts, fr.head_R, fr.head_t)
    counted = raymarch.march(o.reshape(1, -1, 3), d.reshape(1, -1, 3), grids, lo, hi, step=ctx.step, capacity=0,
                             backend=ctx.backend)
    return sec, w * h, float(np.sum(np.asarray(counted.n_samples))) / (w * h)


def run(cfg, log=print) -> dict:
    """Times the INSTA bench (module docstring) with cfg.insta (`default_config()` fields);
    returns {name: value} (seconds, rates, ratios, the setting)."""
    from dhjax.synthesis import insta_run

    bc = cfg.insta
    if bc.occupancy not in OCCUPANCY:
        raise ValueError(f"insta.occupancy must be one of {OCCUPANCY}, got {bc.occupancy!r}")
    icfg = insta_config(bc)
    kernels = resolved_kernels()
    device = str(jax.devices()[0])
    res: dict = {"insta_device": device, "insta_config": bc.config, "insta_kernels": kernels}
    log(f"INSTA bench on {device} ({jax.default_backend()}); kernel run: Context.backend='auto' -> "
        + ", ".join(f"{k}={v}" for k, v in kernels.items()) + "; reference run: every op pure JAX")
    if any(v == "reference" for v in kernels.values()):
        log("  note: some kernels are not built here, so the 'kernel' run uses the reference for those ops")

    ctx, train, test, _, _ = insta_run.build(icfg, log=log)
    G, R = int(icfg.batch.frames_per_step), int(icfg.batch.rays_per_frame)
    spr = int(icfg.batch.samples_per_ray)
    batch = insta_run.ray_batches(icfg, train).get_batch(0)
    bits = shell_occupancy(ctx, bc.shell_cells) if bc.occupancy == "shell" else np.ones(ctx.resolution ** 3, np.uint8)
    W, H = train.size
    res.update(insta_video=f"{W}x{H}", insta_train_frames=int(train.images.shape[0]), insta_frames_per_step=G,
               insta_rays_per_frame=R, insta_samples_per_ray_capacity=spr, insta_occupancy=bc.occupancy,
               insta_occupied_fraction=float(np.mean(bits)), insta_occupancy_resolution=ctx.resolution)
    log(f"setting: {W}x{H} video of {train.images.shape[0]} training frames, "
        f"{G} frames x {R} rays per step, capacity {spr} samples/ray, occupancy '{bc.occupancy}' "
        f"({100 * res['insta_occupied_fraction']:.1f}% of {ctx.resolution}^3 cells)")
    kctx = ctx.replace(backend="auto", capacity=R * spr)

    # 1. training
    ts, m = time_train(kctx, batch, bits, int(bc.repeats), int(bc.warmup))
    occ_s = time_occupancy_update(kctx, bits, max(1, int(bc.repeats) // 2))
    every = int(icfg.model.occupancy.every)
    amort = ts + occ_s / every
    rays = G * R
    res.update(insta_train_kernels_step_s=ts, insta_train_kernels_steps_per_s=1.0 / ts,
               insta_train_kernels_rays_per_s=rays / ts, insta_train_kernels_samples_per_ray=m["samples_per_ray"],
               insta_occupancy_update_s=occ_s, insta_train_kernels_step_s_amortised=amort,
               insta_train_minutes_estimate=int(icfg.train.steps) * amort / 60.0)
    log(f"training step ({G} x {R} rays, {m['samples_per_ray']:.1f} samples/ray):")
    log(f"  kernels  : {ts * 1e3:9.1f} ms/step  {1 / ts:7.2f} steps/s  {rays / ts:9.0f} rays/s "
        f"| occupancy update {occ_s * 1e3:.0f} ms every {every} steps -> {amort * 1e3:.1f} ms/step amortised, "
        f"{icfg.train.steps} steps ~ {res['insta_train_minutes_estimate']:.1f} min (goal on 2 CPU cores: <= 10)")
    rr = int(bc.reference.rays_per_frame)
    if rr:
        rr = min(rr, R)
        small = _subset(batch, rr)
        rctx = ctx.replace(backend="reference", capacity=rr * spr)
        ksmall, _ = time_train(kctx.replace(capacity=rr * spr), small, bits, int(bc.repeats), int(bc.warmup))
        tref, mref = time_train(rctx, small, bits, int(bc.reference.repeats), 1)
        n = G * rr
        res.update(insta_train_reference_rays_per_frame=rr, insta_train_reference_step_s=tref,
                   insta_train_reference_steps_per_s=1.0 / tref, insta_train_reference_rays_per_s=n / tref,
                   insta_train_kernels_small_step_s=ksmall, insta_train_kernels_small_rays_per_s=n / ksmall,
                   insta_train_speedup_vs_reference=tref / ksmall,
                   insta_train_rays_per_s_ratio=(rays / ts) / (n / tref))
        log(f"  on {G} x {rr} rays (the reference is slow; same rays for both, {mref['samples_per_ray']:.1f} samples/ray):")
        log(f"  kernels  : {ksmall * 1e3:9.1f} ms/step  {1 / ksmall:7.2f} steps/s  {n / ksmall:9.0f} rays/s")
        log(f"  reference: {tref * 1e3:9.1f} ms/step  {1 / tref:7.2f} steps/s  {n / tref:9.1f} rays/s")
        log(f"  insta_train_speedup_vs_reference (same {G} x {rr} rays): {res['insta_train_speedup_vs_reference']:.1f}x "
            f"(goal >= 5x); kernels at {G} x {R} vs reference at {G} x {rr} in rays/s: "
            f"{res['insta_train_rays_per_s_ratio']:.1f}x")

    # 2. parts of a step
    if bc.parts:
        runs = [("kernels", kctx, batch, ts)]
        if rr:
            runs.append(("reference", rctx, small, tref))
        for name, c, bt, total in runs:
            reps = int(bc.repeats) if name == "kernels" else int(bc.reference.repeats)
            p = time_parts(c, bt, bits, reps)
            shown = ("grids_march", "closest_point", "canonicalize", "hash_fwd_bwd")
            rest = total - sum(p[k] for k in shown)
            for k in shown:
                res[f"insta_part_{name}_{k}_s"] = p[k]
            res[f"insta_part_{name}_rest_s"] = rest
            log(f"  parts ({name}, {bt['origins'].shape[0]} x {bt['origins'].shape[1]} rays, {p['samples']} samples): "
                + ", ".join(f"{k} {p[k] * 1e3:.1f} ms" for k in shown)
                + f", rest (MLPs, composite, loss, Adam, EMA) {rest * 1e3:.1f} ms")

    # 3. rendering
    state = _fresh_state(kctx, bits)
    params = state["params"]
    size = int(bc.render.size)
    chunk = int(bc.render.chunk)
    if size:
        sec, n_rays, spr_r = time_render(kctx, params, bits, test, size, chunk, int(bc.render.repeats))
        key = f"insta_render_{size}"
        res.update({f"{key}_kernels_s": sec, f"{key}_kernels_fps": 1.0 / sec,
                    f"{key}_kernels_rays_per_s": n_rays / sec, f"{key}_samples_per_ray": spr_r})
        log(f"render {size}x{n_rays // size} (held-out frame 0, chunk {chunk}, {spr_r:.1f} samples/ray) on {device}:")
        log(f"  kernels  : {sec:8.3f} s/frame  {1 / sec:7.2f} frames/s  {n_rays / sec:9.0f} rays/s "
            f"(goal on a GPU: >= 20 frames/s at 512^2)")
    rs = int(bc.render.reference_size)
    if rs:
        ksec, kn, _ = time_render(kctx, params, bits, test, rs, chunk, int(bc.render.repeats))
        rsec, rn, _ = time_render(ctx.replace(backend="reference"), params, bits, test, rs, chunk, 1)
        key = f"insta_render_{rs}"
        res.update({f"{key}_kernels_s": ksec, f"{key}_reference_s": rsec, f"{key}_reference_rays_per_s": rn / rsec,
                    "insta_render_speedup_vs_reference": rsec / ksec})
        log(f"  at {rs}x{rn // rs} (the reference is slow): kernels {ksec:.3f} s ({kn / ksec:.0f} rays/s), reference "
            f"{rsec:.3f} s ({rn / rsec:.0f} rays/s): {rsec / ksec:.1f}x")
        if size:
            est = res[f"insta_render_{size}_kernels_s"] * (res[f"insta_render_{size}_kernels_rays_per_s"] / (rn / rsec))
            res[f"insta_render_{size}_reference_s_estimate"] = est
            log(f"  reference at {size}^2 extrapolated from its rays/s: ~{est:.0f} s/frame")
    return res
