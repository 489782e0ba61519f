"""INSTA (dhjax.synthesis.insta*): canonicalisation of surface samples, the occupancy grid, the
kernels against the pure-JAX path inside the method, overfitting a tiny scene, the data checks,
and one small end-to-end run with its reenactment."""

import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import insta as insta_config
from dhjax import ops
from dhjax.data import dataset as ds
from dhjax.geometry import deformation
from dhjax.ops import raymarch
from dhjax.synthesis import insta, insta_data, insta_run
import synthetic_common as sc


@functools.lru_cache(maxsize=None)
def _video_and_canon():
    gen = sc.video()
    samples = [gen[i] for i in range(gen.n_frames)]          # sequence 0: 6 frames of 64 x 64
    video, canon = insta_data.prepare(samples, gen.assets.model)
    return samples, video, canon


def _small_model_cfg(**kw):
    c = insta.default_model_config()
    c.hash.update(n_levels=4, log2_hashmap_size=12, finest_resolution=64.0)
    c.occupancy.update(resolution=16, every=4)
    c.step_divisor = 96.0
    c.update(kw)
    return c


def _context(model_cfg=None, backend="auto", capacity=1 << 14):
    _, video, canon = _video_and_canon()
    mouth, _ = insta_data.region_faces(sc.tiny_assets().model)
    return insta.make_context(canon, np.asarray(sc.tiny_assets().model.faces), mouth, n_frames=video.images.shape[0],
                              model_cfg=model_cfg or _small_model_cfg(), capacity=capacity, backend=backend)


# ----------------------------------------------------------------------------------------------
# Canonicalisation.


def _surface_points(verts, faces, n, seed):
    rng = np.random.default_rng(seed)
    f = rng.integers(0, len(faces), n)
    b = rng.dirichlet(np.ones(3), n)
    return np.einsum("nk,nkc->nc", b, verts[faces[f]]).astype(np.float32)


def test_surface_samples_of_a_rigid_frame_land_on_the_canonical_surface():
    _, _, canon = _video_and_canon()
    faces = np.asarray(sc.tiny_assets().model.faces)
    a = 0.4
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], np.float32)
    verts = canon @ R.T + np.array([0.01, -0.02, 0.5], np.float32)
    p = _surface_points(verts, faces, 2000, 0)
    face = ops.closest_point(verts, faces, p).face
    out = deformation.canonicalize(jnp.asarray(p), jnp.asarray(verts), jnp.asarray(canon), faces, face=face)
    d = np.sqrt(np.asarray(ops.closest_point(canon, faces, out.points).sq_dist))
    assert d.max() < 2e-5          # metres: exact up to float32 rounding for a rigid motion


def test_surface_samples_of_tracked_frames_stay_near_the_canonical_surface():
    """Expressions and jaw/neck poses deform the mesh non-rigidly; the smoothed map (eq. 4)
    keeps surface points within a millimetre of the canonical surface for most samples."""
    _, video, canon = _video_and_canon()
    faces = np.asarray(sc.tiny_assets().model.faces)
    for i in (0, 3):
        p = _surface_points(video.verts[i], faces, 3000, i)
        face = ops.closest_point(video.verts[i], faces, p).face
        out = deformation.canonicalize(jnp.asarray(p), jnp.asarray(video.verts[i]), jnp.asarray(canon), faces,
                                       face=face)
        d = np.sqrt(np.asarray(ops.closest_point(canon, faces, out.points).sq_dist))
        assert np.median(d) < 5e-4 and np.quantile(d, 0.95) < 3e-3, (np.median(d), np.quantile(d, 0.95))


# ----------------------------------------------------------------------------------------------
# Occupancy.


def _constant_density_params(ctx, sigma):
    params = insta.init_params(jax.random.PRNGKey(0), ctx)
    params = jax.tree_util.tree_map(jnp.zeros_like, params)
    last = f"layer_{len(params['density']) - 1}"
    params["density"][last]["b"] = params["density"][last]["b"].at[0].set(np.log(sigma))
    return params


def test_occupancy_update_keeps_the_max_of_decayed_and_new_thickness():
    ctx = _context()
    d3 = ctx.resolution ** 3
    occ = {"density": jnp.asarray(np.random.default_rng(0).uniform(0, 1.0, d3), jnp.float32),
           "bits": jnp.ones((d3,), jnp.uint8)}
    sigma = 3.0
    new = insta.update_occupancy(occ, _constant_density_params(ctx, sigma), ctx, jax.random.PRNGKey(1))
    expected = np.maximum(np.asarray(occ["density"]) * 0.95, sigma * ctx.step)
    np.testing.assert_allclose(np.asarray(new["density"]), expected, rtol=1e-6)
    thresh = min(0.01, expected.mean())
    np.testing.assert_array_equal(np.asarray(new["bits"]), (expected > thresh).astype(np.uint8))


def test_occupancy_update_of_a_cell_subset_decays_the_others():
    cfg = _small_model_cfg()
    cfg.occupancy.cells = 100
    ctx = _context(cfg)
    d3 = ctx.resolution ** 3
    occ = {"density": jnp.full((d3,), 0.5, jnp.float32), "bits": jnp.ones((d3,), jnp.uint8)}
    new = insta.update_occupancy(occ, _constant_density_params(ctx, 1e4), ctx, jax.random.PRNGKey(2))
    dens = np.asarray(new["density"])
    hot = dens > 0.5
    assert hot.sum() == 100
    np.testing.assert_allclose(dens[~hot], 0.5 * 0.95, rtol=1e-6)
    np.testing.assert_allclose(dens[hot], 1e4 * ctx.step, rtol=1e-5)


def test_empty_field_empties_the_grid_and_rays_get_no_samples():
    ctx = _context()
    occ = insta.update_occupancy(insta.init_occupancy(ctx), _constant_density_params(ctx, 1e-9), ctx,
                                 jax.random.PRNGKey(0))
    occ = insta.update_occupancy(occ, _constant_density_params(ctx, 1e-9), ctx, jax.random.PRNGKey(1))
    _, video, _ = _video_and_canon()
    assert np.asarray(occ["bits"]).sum() == 0
    frames = insta.Frames(**{k: jnp.asarray(v) for k, v in insta_data.frame_inputs(video, [0]).items()})
    o, d = insta_data.frame_rays(video, 0)
    s = insta.march_frames(occ["bits"], ctx, frames, jnp.asarray(o.reshape(1, -1, 3)), jnp.asarray(d.reshape(1, -1, 3)))
    assert int(s.n_samples[0]) == 0


def test_deformed_grid_of_the_canonical_mesh_is_the_dilated_canonical_grid():
    ctx = _context()
    D = ctx.resolution
    rng = np.random.default_rng(3)
    bits = (rng.uniform(size=D ** 3) < 0.02).astype(np.uint8)
    verts = jnp.asarray(ctx.canon_verts)[None]
    grids, lo, hi = insta.deformed_grids(jnp.asarray(bits), ctx, verts, jnp.eye(3)[None], jnp.zeros((1, 3)))
    np.testing.assert_allclose(np.asarray(lo[0]), ctx.box_min, atol=1e-6)
    g = bits.reshape(D, D, D).transpose(2, 1, 0)            # [i, j, k]
    pad = np.pad(g, 1)
    dil = np.zeros_like(g)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                dil |= pad[a:a + D, b:b + D, c:c + D]
    np.testing.assert_array_equal(np.asarray(grids[0]), dil)


def test_deformed_grid_follows_a_rigid_motion():
    """A translated head moves its occupied cells with it (the grid's box moves too)."""
    ctx = _context()
    D = ctx.resolution
    bits = np.zeros(D ** 3, np.uint8)
    bits[D // 2 + D * (D // 2 + D * (D // 2))] = 1
    shift = np.array([0.1, -0.05, 0.3], np.float32)
    verts = (jnp.asarray(ctx.canon_verts) + shift)[None]
    grids, lo, _ = insta.deformed_grids(jnp.asarray(bits), ctx, verts, jnp.eye(3)[None], jnp.asarray(shift)[None])
    np.testing.assert_allclose(np.asarray(lo[0]), ctx.box_min + shift, atol=1e-5)
    occ = np.argwhere(np.asarray(grids[0]))
    assert len(occ) == 27 and np.all(occ.min(0) == D // 2 - 1)


# ----------------------------------------------------------------------------------------------
# Kernels vs the pure-JAX path inside the method.


def _ray_batch(ctx, n_frames=2, n_rays=96, seed=0):
    _, video, _ = _video_and_canon()
    rb = insta_data.RayBatches(video, frames_per_step=n_frames, rays_per_frame=n_rays, seed=seed)
    return {k: jnp.asarray(v) for k, v in rb.get_batch(0).items()}


@pytest.mark.skipif(not raymarch.kernel_available("cpu"), reason="kernels not built")
def test_render_and_gradients_with_kernels_equal_the_reference(monkeypatch):
    """The raymarch and hash-grid kernels against the pure-JAX path inside the method. The
    nearest triangle comes from one closest-point backend in both runs: off the surface, where
    the nearest point is a vertex or an edge, several triangles are equally near and the BVH
    kernel and the brute-force reference may pick different ones (`deformation.canonicalize`)."""
    closest = ops.closest_point
    monkeypatch.setattr(insta.ops, "closest_point", lambda v, f, p, backend="auto": closest(v, f, p, backend="cpu"))
    ctx_k = _context(backend="cpu", capacity=1 << 13)
    ctx_r = ctx_k.replace(backend="reference")
    batch = _ray_batch(ctx_k)
    params = insta.init_params(jax.random.PRNGKey(0), ctx_k)
    bits = insta.init_occupancy(ctx_k)["bits"]
    frames = insta.batch_frames(batch)

    def loss(params, ctx):
        s = insta.march_frames(bits, ctx, frames, batch["origins"], batch["dirs"], capacity=ctx.capacity)
        out = insta.shade(params, ctx, frames, batch["origins"], batch["dirs"], s, insta.background_of(ctx))
        return insta.loss_terms(out, batch, ctx)[0], out

    (lk, ok), gk = jax.value_and_grad(loss, has_aux=True)(params, ctx_k)
    (lr, orr), gr = jax.value_and_grad(loss, has_aux=True)(params, ctx_r)
    assert bool(jnp.all(ok.complete))
    np.testing.assert_allclose(np.asarray(ok.color), np.asarray(orr.color), atol=2e-5)
    np.testing.assert_allclose(np.asarray(ok.depth), np.asarray(orr.depth), atol=2e-5)
    np.testing.assert_allclose(float(lk), float(lr), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(gk), jax.tree_util.tree_leaves(gr)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 + 1e-3 * float(jnp.max(jnp.abs(b))))


def test_truncated_rays_leave_the_loss_and_are_counted():
    ctx = _context(capacity=256)
    batch = _ray_batch(ctx)
    state = insta.init_state(jax.random.PRNGKey(0), ctx)
    _, metrics = jax.jit(functools.partial(insta.train_step, ctx=ctx))(state, batch, jax.random.PRNGKey(1))
    assert 0 < float(metrics["truncated_rays"]) < 1
    assert np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------------------------
# Training.


def test_a_tiny_scene_overfits():
    """Two frames at 64 x 64: the training PSNR of the rays climbs well above the start."""
    cfg = _small_model_cfg()
    cfg.hash.update(n_levels=8, log2_hashmap_size=14, finest_resolution=256.0)
    cfg.step_divisor = 128.0
    _, video, canon = _video_and_canon()
    two = video.take([0, 1])
    mouth, _ = insta_data.region_faces(sc.tiny_assets().model)
    ctx = insta.make_context(canon, np.asarray(sc.tiny_assets().model.faces), mouth, n_frames=2, model_cfg=cfg,
                             capacity=1 << 15)
    rb = insta_data.RayBatches(two, frames_per_step=2, rays_per_frame=512, seed=0)
    step = jax.jit(functools.partial(insta.train_step, ctx=ctx))
    state = insta.init_state(jax.random.PRNGKey(0), ctx)
    psnr = []
    for i in range(150):
        state, m = step(state, {k: jnp.asarray(v) for k, v in rb.get_batch(i).items()}, jax.random.PRNGKey(i))
        psnr.append(float(m["psnr"]))
    assert float(m["truncated_rays"]) == 0.0
    assert np.mean(psnr[-10:]) > np.mean(psnr[:5]) + 8.0, (psnr[:5], psnr[-10:])
    assert np.mean(psnr[-10:]) > 20.0
    assert float(jnp.mean(state["occ"]["bits"].astype(jnp.float32))) < 0.9     # the grid pruned empty space


def test_depth_term_covers_the_face_and_with_face_mouth_the_mouth_pixels():
    """Eq. 7's region: rays of four kinds (face, mouth, both flags off, face but no mesh hit),
    each with its own depth error; the depth term is their masked mean over the complete rays."""
    z = jnp.zeros((1, 4), jnp.float32)
    depth = jnp.asarray([[1.0, 1.0, 1.0, 1.0]])
    mesh_t = jnp.asarray([[1.5, 0.75, 1.125, 0.0]])                 # errors 0.5, 0.25, 0.125, (no hit)
    out = insta.RenderOut(color=jnp.zeros((1, 4, 3)), depth=depth, opacity=z,
                          complete=jnp.ones((1, 4), bool), n_samples=jnp.zeros((1,), jnp.int32))
    batch = {"color": jnp.zeros((1, 4, 3)), "mesh_t": mesh_t, "face": jnp.asarray([[1.0, 0.0, 0.0, 1.0]]),
             "mouth": jnp.asarray([[0.0, 1.0, 0.0, 0.0]])}
    ctx = _context()
    for region, expected in (("face", 0.5 / 4), ("face_mouth", (0.5 + 0.25) / 4)):
        lc = insta.default_loss_config()
        lc.depth_region = region
        _, terms = insta.loss_terms(out, batch, ctx.replace(loss_cfg=lc))
        np.testing.assert_allclose(float(terms["depth"]), expected, rtol=1e-6)
        np.testing.assert_allclose(float(terms["loss"]), 1.25 * expected, rtol=1e-6)
    assert insta.default_loss_config().depth_region == "face"          # the thesis's region is the default


def test_distortion_term_is_the_weighted_mean_of_the_rays_distortion():
    ctx = _context(capacity=1 << 13)
    batch = _ray_batch(ctx)
    params = insta.init_params(jax.random.PRNGKey(0), ctx)
    bits = insta.init_occupancy(ctx)["bits"]
    frames = insta.batch_frames(batch)
    samples = insta.march_frames(bits, ctx, frames, batch["origins"], batch["dirs"], capacity=ctx.capacity)
    lc = insta.default_loss_config()
    lc.distortion_weight = 0.1
    on = ctx.replace(loss_cfg=lc)
    out = insta.shade(params, on, frames, batch["origins"], batch["dirs"], samples, insta.background_of(ctx))
    off = insta.shade(params, ctx, frames, batch["origins"], batch["dirs"], samples, insta.background_of(ctx))
    assert off.distortion is None and "distortion" not in insta.loss_terms(off, batch, ctx)[1]
    assert out.distortion.shape == out.depth.shape and bool(jnp.all(out.distortion >= 0))
    assert float(jnp.max(out.distortion)) > 0
    loss_on, terms = insta.loss_terms(out, batch, on)
    loss_off, _ = insta.loss_terms(out, batch, ctx)
    valid = out.complete.astype(jnp.float32)
    expected = float(jnp.sum(valid * out.distortion) / jnp.maximum(jnp.sum(valid), 1.0))
    np.testing.assert_allclose(float(terms["distortion"]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(loss_on) - float(loss_off), 0.1 * expected, rtol=1e-4)
    # it trains: the kernels' composite passes the weights' cotangent back to the densities
    state = insta.init_state(jax.random.PRNGKey(0), on)
    new, metrics = jax.jit(functools.partial(insta.train_step, ctx=on))(state, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(metrics["distortion"])) and float(metrics["distortion"]) > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new["params"], state["params"])
    assert all(np.isfinite(v) for v in jax.tree_util.tree_leaves(moved)) and max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.parametrize("section, field, value", [("model", "conditioning", "mouth"),
                                                   ("model", "deformation", "latent"),
                                                   ("loss", "depth_region", "mouth"),
                                                   ("loss", "distortion_weight", -0.5)])
def test_make_context_names_an_option_value_it_cannot_use(section, field, value):
    _, video, canon = _video_and_canon()
    mouth, _ = insta_data.region_faces(sc.tiny_assets().model)
    cfgs = {"model": _small_model_cfg(), "loss": insta.default_loss_config()}
    cfgs[section][field] = value
    with pytest.raises(ValueError, match=f"{section}.{field} must be .*, got '?{value}'?"):
        insta.make_context(canon, np.asarray(sc.tiny_assets().model.faces), mouth, n_frames=2,
                           model_cfg=cfgs["model"], loss_cfg=cfgs["loss"])


# ----------------------------------------------------------------------------------------------
# Data.


def test_huber_is_eq_6():
    e = np.array([0.0, 0.05 ** 2, 0.0999 ** 2, 0.1001 ** 2, 0.5 ** 2], np.float32)
    n = np.sqrt(e)
    expected = np.where(n < 0.1, 0.5 * e, 0.1 * (n - 0.05))
    np.testing.assert_allclose(np.asarray(insta.huber(jnp.asarray(e), 0.1)), expected, rtol=1e-5)
    g = jax.grad(lambda x: jnp.sum(insta.huber(x, 0.1)))(jnp.asarray(e))
    assert np.all(np.isfinite(np.asarray(g)))


def test_prepared_video_regions_depth_and_rays():
    samples, video, canon = _video_and_canon()
    assert video.images.shape == (6, 64, 64, 3) and canon.shape == video.verts.shape[1:]
    assert video.mouth.any() and video.face.any()
    assert not (video.face & video.mouth).all()
    # mesh_t is the ray distance of the rasterised mesh: z = t * cos, close to the true depth on face skin
    o, d = insta_data.frame_rays(video, 0)
    cos = np.einsum("hwc,c->hw", d, video.R[0][2])
    sel = video.face[0] & (video.true_depth[0] > 0)
    err = np.abs(video.mesh_t[0][sel] * cos[sel] - video.true_depth[0][sel])
    assert np.median(err) < 2e-3
    # the rays of a batch go through the sampled pixels' colours
    rb = insta_data.RayBatches(video, frames_per_step=2, rays_per_frame=5, seed=1)
    b1, b2 = rb.get_batch(7), rb.get_batch(7)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k])
    np.testing.assert_allclose(np.linalg.norm(b1["dirs"], axis=-1), 1.0, atol=1e-5)
    # random backgrounds: background pixels take the ray's colour, foreground ones keep theirs
    rr = insta_data.RayBatches(video, frames_per_step=2, rays_per_frame=400, seed=1, random_background=True)
    b = rr.get_batch(3)
    plain = insta_data.RayBatches(video, frames_per_step=2, rays_per_frame=400, seed=1).get_batch(3)
    np.testing.assert_array_equal(b["origins"], plain["origins"])          # the same pixels
    alpha = np.stack([video.mask[f].ravel()[b["pixel"][g]] for g, f in enumerate(b["frame"])])[..., None]
    assert (alpha == 0).any() and (alpha == 1).any()
    np.testing.assert_allclose(b["color"], plain["color"] + (1 - alpha) * (b["background"] - 1.0), atol=1e-6)
    np.testing.assert_allclose(b["color"][alpha[..., 0] == 0], b["background"][alpha[..., 0] == 0], atol=1e-6)


def test_frame_buffer_and_online_arrival():
    _, video, _ = _video_and_canon()
    rb = insta_data.RayBatches(video, frames_per_step=1, rays_per_frame=1, buffer_frames=3, resample_every=10)
    assert len(rb.frames_at(0)) == 3
    np.testing.assert_array_equal(rb.frames_at(0), rb.frames_at(9))
    assert any(not np.array_equal(rb.frames_at(0), rb.frames_at(10 * k)) for k in range(1, 6))
    online = insta_data.RayBatches(video, frames_per_step=1, rays_per_frame=1, online_frames_per_step=0.5)
    assert [online.available(s) for s in (0, 1, 2, 4, 100)] == [1, 1, 2, 3, 6]
    for s in range(12):
        assert online.get_batch(s)["frame"][0] < online.available(s)
    arrived = [0]          # live mode: whatever the tracker has delivered, at least one frame
    live = insta_data.RayBatches(video, frames_per_step=2, rays_per_frame=1, arrived=lambda: arrived[0])
    for n in (0, 1, 3, 6, 9):
        arrived[0] = n
        assert live.available(5) == min(max(n, 1), 6)
        assert live.get_batch(5)["frame"].max() < live.available(5)


def _write_video(tmp_path, n=3):
    gen = sc.video()
    root = tmp_path / "video"
    ds.write_dataset(gen, root, "train", indices=range(n))
    return root


def test_bad_datasets_get_errors_naming_the_problem(tmp_path):
    root = _write_video(tmp_path)
    frame = sorted((root / "train").glob("*/frame_0001"))[0]
    samples = insta_data.load_video(root)
    assert len(samples) == 3
    with pytest.raises(ValueError, match="at least 2 frames"):
        insta_data.check_frames(samples[:1])
    bad = [dict(s) for s in samples]
    bad[1]["expression"] = bad[1]["expression"].copy()
    bad[1]["expression"][0] = np.nan
    with pytest.raises(ValueError, match="frame 1.*expression.*non-finite"):
        insta_data.check_frames(bad)
    no_depth = [{k: v for k, v in s.items() if k != "depth"} for s in samples]
    with pytest.raises(ValueError, match="no depth map"):
        insta_data.prepare(no_depth, sc.tiny_assets().model, depth_source="dataset")
    shutil.move(frame / "cam_00_mask.png", tmp_path / "mask.png")
    with pytest.raises(FileNotFoundError, match="cam_00_mask.png"):
        insta_data.load_video(root)
    shutil.move(tmp_path / "mask.png", frame / "cam_00_mask.png")
    (frame / "params.npz").unlink()
    with pytest.raises(FileNotFoundError, match="params"):
        insta_data.load_video(root)
    with pytest.raises(ValueError, match="no sequence with number 7"):
        insta_data.load_video(root, item=7)


def test_models_without_regions_are_refused():
    model = sc.tiny_assets().model.replace(regions=None)
    with pytest.raises(ValueError, match="region masks"):
        insta_data.region_faces(model)


def _run_config(variant: str, tmp_path):
    """A variant shrunk to a 6-frame 64^2 video (2 held out), a small field and 12 steps."""
    c = insta_config.get_config(variant)
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.synthetic = sc.tiny_config()
    c.data.synthetic.video.update(n_sequences=1, n_frames=6)
    c.data.holdout = 2
    c.model = _small_model_cfg()
    c.batch.update(rays_per_frame=128, samples_per_ray=64)
    c.eval.update(orbit_frames=3, mesh_resolution=24, mesh_threshold=1.0, chunk=2048, n_rays=256)
    c.train.update(steps=12, log_every=4, eval_every=6, checkpoint_every=6)
    return c


def test_live_mode_trains_while_the_tracker_tracks_and_resumes(tmp_path):
    """online.live: the tracker runs in a background thread, training starts with frame 0, frames
    join as they are tracked; online.json scores the avatar as it was at each evaluation on the
    held-out frames (tracked last); a rerun reads the saved tracking back instead of tracking again."""
    c = _run_config("tiny_live", tmp_path)
    c.eval.update(orbit_frames=0, mesh_resolution=0)
    c.train.update(eval_every=4)
    c.tracker.first.update(landmark_steps=10, steps=(5, 5, 5))
    c.tracker.frame.update(landmark_steps=3, steps=(3, 3, 3))
    work = tmp_path / "run"
    m = insta_run.run(c, str(work))
    assert m["n_frames"] == 2.0 and np.isfinite(m["psnr"])
    assert len(list((work / "tracking").iterdir())) >= 6
    online = json.loads((work / "online.json").read_text())
    assert [p["step"] for p in online] == [4, 8, 12] and (work / "online.png").is_file()
    tracked = [p["frames_tracked"] for p in online]
    assert tracked == sorted(tracked) and 1 <= tracked[0] and tracked[-1] <= 6
    assert all(1 <= p["frames_arrived"] <= 4 and np.isfinite(p["heldout_psnr"]) for p in online)
    assert [p["seconds"] for p in online] == sorted(p["seconds"] for p in online)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/frames_tracked" in r for r in rows)
    m2 = insta_run.run(c, str(work))        # finished: tracking is read back, nothing trains
    assert m2["psnr"] == m["psnr"]
    bad = c.copy_and_resolve_references()
    bad.data.tracked = False
    with pytest.raises(ValueError, match="set one of data.tracked=True .* or data.root"):
        insta_run.build_live(bad, str(tmp_path / "bad"))
    bad.data.tracked, bad.data.root = True, str(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        insta_run.build_live(bad, str(tmp_path / "bad"))
    bad.data.root, bad.online.frames_per_step = "", 0.5
    with pytest.raises(ValueError, match="two online modes"):
        insta_run.build_live(bad, str(tmp_path / "bad"))


def _fill_folder(src: Path, dst: Path, n: int, delay: float, *, error_after: int | None = None,
                 restart_after: int | None = None, hold=None, run_id: str = "run-a"):
    """Copies the first sequence of dataset `src` into `dst` frame by frame as
    tracker.DatasetStream does: meta.json with a "live" entry, rewritten atomically after each
    frame, whose folder is written with its cameras.json last and atomically. error_after /
    restart_after: after that many frames, record a writer error / another run's id and stop;
    hold: (frames, callable) writes that many frames, then waits until callable() is true."""
    import os
    import time

    item = sorted(p for p in (src / "train").iterdir() if p.is_dir())[0]
    out = dst / "train" / item.name
    meta = json.loads((src / "meta.json").read_text())

    def write_meta(k, error=None, run=run_id):
        meta["live"] = {"run": run, "frames": n, "tracked": k, "done": k == n, "error": error}
        (dst / ".meta.tmp").write_text(json.dumps(meta))
        os.replace(dst / ".meta.tmp", dst / "meta.json")

    dst.mkdir(parents=True, exist_ok=True)
    write_meta(0)                       # meta.json before any folder, as the stream does
    out.mkdir(parents=True)
    for f in item.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    for k, frame in enumerate(sorted(p for p in item.iterdir() if p.is_dir())[:n]):
        if k == error_after:
            write_meta(k, error="no face in frame 3")
            return
        if k == restart_after:
            write_meta(0, run="run-b")
            return
        if hold is not None and k == hold[0]:
            deadline = time.time() + 300
            while not hold[1]() and time.time() < deadline:
                time.sleep(0.2)
        time.sleep(delay)
        (out / frame.name).mkdir()
        for f in frame.iterdir():
            if f.name != "cameras.json":
                shutil.copy(f, out / frame.name / f.name)
        shutil.copy(frame / "cameras.json", out / frame.name / ".cameras.tmp")
        os.replace(out / frame.name / ".cameras.tmp", out / frame.name / "cameras.json")
        write_meta(k + 1)


def test_folder_feed_reads_frames_as_a_folder_fills(tmp_path):
    """online.live with data.root (FolderFeed): frames join one by one as their folders complete,
    into the same arrays as the offline build; a finished folder is read at once, with or without
    meta.json's "live" entry; a writer's error, a restarted folder, a folder that never appears
    and a missing sequence end the feed with clear errors."""
    import threading
    import time

    c = _run_config("tiny", tmp_path)
    from dhjax.data import cache as cache_lib
    src = cache_lib.cached_video(c.data.synthetic, name="insta_video", cache_dir=c.data.cache_dir)
    assets = sc.tiny_assets()
    video, _ = insta_data.prepare(insta_data.load_video(src), assets.model)
    want_train, want_test = insta_data.split(video, 2)
    c.online.live, c.data.root = True, str(tmp_path / "live")
    feed = insta_run.FolderFeed(c, assets, tmp_path, log=None, poll_s=0.05).start()   # before the folder exists
    writer = threading.Thread(target=_fill_folder, args=(src, tmp_path / "live", 6, 0.25))
    writer.start()
    feed.wait(6)
    writer.join()
    assert feed.n == 6 and feed.n_train == 4
    assert feed.tracked_at[-1] - feed.tracked_at[0] > 0.75, feed.tracked_at      # one by one, 0.25 s apart
    for got, want in ((feed.train, want_train), (feed.test, want_test)):
        for name, a, b in zip(insta_data.Video._fields, got, want):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)
    said = []
    done = insta_run.FolderFeed(c, assets, tmp_path, log=said.append).start()     # finished: read at once
    done.wait(6)
    np.testing.assert_array_equal(done.train.images, feed.train.images)
    assert any("holds a tracker run that finished" in m and "online.wait_for_new_run" in m for m in said), said
    # online.wait_for_new_run: the finished run's folder is not read; the next run's frames are.
    c.online.wait_for_new_run, c.online.timeout_s = True, 60.0
    fresh = insta_run.FolderFeed(c, assets, tmp_path, log=None, poll_s=0.05).start()
    time.sleep(0.5)
    assert fresh.count == 0 and fresh.n == 0

    def restart():                       # a new tracker run empties the folder, then fills it again
        shutil.rmtree(tmp_path / "live" / "train")
        _fill_folder(src, tmp_path / "live", 6, 0.05, run_id="run-c")

    writer = threading.Thread(target=restart)
    writer.start()
    fresh.wait(6)
    writer.join()
    np.testing.assert_array_equal(fresh.train.images, feed.train.images)
    c.online.wait_for_new_run, c.online.timeout_s = False, 900.0
    c.data.root = str(src)                       # a dataset without a "live" entry is complete
    plain = insta_run.FolderFeed(c, assets, tmp_path, log=None).start()
    plain.wait(6)
    np.testing.assert_array_equal(plain.test.images, feed.test.images)
    c.data.item = 7
    with pytest.raises(RuntimeError, match="no sequence with number 7"):
        insta_run.FolderFeed(c, assets, tmp_path, log=None).start().wait(1)
    c.data.item = -1

    c.online.timeout_s = 60.0          # a broken feed fails the test instead of hanging it
    for name, kw, match in (("broken", dict(error_after=3), "the writer failed: no face in frame 3"),
                            ("restarted", dict(restart_after=2), "another tracker run restarted the folder")):
        c.data.root = str(tmp_path / name)
        (tmp_path / name).mkdir()
        feed = insta_run.FolderFeed(c, assets, tmp_path, log=None, poll_s=0.05).start()
        _fill_folder(src, tmp_path / name, 6, 0.2, **kw)       # the feed reads run-a's meta.json first
        with pytest.raises(RuntimeError, match=match):
            feed.wait(6)
    c.data.root, c.online.timeout_s = str(tmp_path / "never"), 0.3
    with pytest.raises(RuntimeError, match=r"no meta.json after 0.3s \(online.timeout_s\)"):
        insta_run.FolderFeed(c, assets, tmp_path, log=None, poll_s=0.05).start().wait(1)


def test_folder_feed_sees_a_writer_that_starts_during_its_first_look(tmp_path, monkeypatch):
    """The race CI once hit, made deterministic: a tracker starts writing the folder right after
    the feed's first look at it (meta.json and the split folder are created together between two
    checks). The feed must wait for the frames, not read the half-written folder as finished."""
    import pathlib
    import threading

    c = _run_config("tiny", tmp_path)
    from dhjax.data import cache as cache_lib
    src = cache_lib.cached_video(c.data.synthetic, name="insta_video", cache_dir=c.data.cache_dir)
    live = tmp_path / "live"
    c.online.live, c.data.root, c.online.timeout_s = True, str(live), 60.0
    watched = {live / "meta.json", live / c.data.split}
    writer = threading.Thread(target=_fill_folder, args=(src, live, 6, 0.1))
    fired = []

    def hooked(original):
        def check(self):
            result = original(self)
            if (not fired and self in watched
                    and threading.current_thread().name == insta_run.FolderFeed.thread_name):
                fired.append(self.name)
                writer.start()                     # the writer starts after this look ...
                while not any((live / c.data.split).glob("*")) and writer.is_alive():
                    threading.Event().wait(0.01)   # ... and has made meta.json and its folder
            return result
        return check

    monkeypatch.setattr(pathlib.Path, "is_dir", hooked(pathlib.Path.is_dir))
    monkeypatch.setattr(pathlib.Path, "exists", hooked(pathlib.Path.exists))
    feed = insta_run.FolderFeed(c, sc.tiny_assets(), tmp_path, log=None, poll_s=0.02).start()
    try:
        feed.wait(6)
    finally:
        writer.join()
    assert fired, "the feed never looked at the folder"
    assert feed.n == 6 and feed.n_train == 4


def test_live_mode_trains_on_a_folder_as_it_fills(tmp_path):
    """The whole live run on a frame folder another process fills (what experiments.track's
    streamed dataset/ gives): training starts with the first frames; the rest are written only
    after the first evaluation, so online.json shows the avatar before and after they arrived."""
    import threading

    c = _run_config("tiny", tmp_path)
    from dhjax.data import cache as cache_lib
    src = cache_lib.cached_video(c.data.synthetic, name="insta_video", cache_dir=c.data.cache_dir)
    c.eval.update(orbit_frames=0, mesh_resolution=0)
    c.train.update(eval_every=4)
    c.online.live, c.data.root = True, str(tmp_path / "live")
    metrics = tmp_path / "run" / "metrics.jsonl"
    first_eval = lambda: metrics.exists() and "eval/frames_tracked" in metrics.read_text()
    writer = threading.Thread(target=_fill_folder, args=(src, tmp_path / "live", 6, 0.0),
                              kwargs=dict(hold=(2, first_eval)), daemon=True)
    writer.start()
    m = insta_run.run(c, str(tmp_path / "run"))
    writer.join()
    assert m["n_frames"] == 2.0 and np.isfinite(m["psnr"])
    online = json.loads((tmp_path / "run" / "online.json").read_text())
    assert [p["step"] for p in online] == [4, 8, 12]
    # trained on the first 2 frames at step 4; the held-out frames (written after it) came in too
    assert online[0]["frames_tracked"] == 2 and online[0]["frames_arrived"] == 2
    assert all(np.isfinite(p["heldout_psnr"]) for p in online)


def test_depth_evaluation_camera_undoes_the_trackers_rigid_head_pose():
    """A tracked world: the head moved rigidly into the camera and the camera moved with it (the
    same image). The generator's camera, moved into that world, sees the tracked head exactly as
    the generator's camera sees the true head (pixels and camera z); with true tracking it is the
    generator's camera itself."""
    rng = np.random.default_rng(3)
    true_head = rng.normal(0, 0.08, (200, 3))
    K = np.array([[300.0, 0, 64], [0, 300, 64], [0, 0, 1]], np.float32)
    Rt = np.asarray(insta_run.orbit_camera(K, np.eye(3), np.zeros(3), np.zeros(3), 20.0)[1], np.float64)
    tt = np.array([0.01, -0.02, 0.6])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    Rm = q * np.sign(np.linalg.det(q))                         # the tracker's head pose: x_video = Rm x + tm
    tm = np.array([0.1, 0.3, -0.2])
    video_head = true_head @ Rm.T + tm

    def project(K, R, t, x):
        c = x @ np.asarray(R, np.float64).T + np.asarray(t, np.float64)
        return (c @ np.asarray(K, np.float64).T)[:, :2] / c[:, 2:], c[:, 2]

    K2, R2, t2 = insta_run.camera_in_video_world(K, Rt, tt, video_head, true_head)
    uv_true, z_true = project(K, Rt, tt, true_head)
    uv, z = project(K2, R2, t2, video_head)
    np.testing.assert_allclose(uv, uv_true, atol=1e-3)        # pixels
    np.testing.assert_allclose(z, z_true, atol=1e-6)          # metres
    K3, R3, t3 = insta_run.camera_in_video_world(K, Rt, tt, true_head, true_head)
    np.testing.assert_allclose(R3, Rt, atol=1e-6)
    np.testing.assert_allclose(t3, tt, atol=1e-6)
    # a wrong tracked shape is not aligned away: it shows in the depth
    K4, R4, t4 = insta_run.camera_in_video_world(K, Rt, tt, video_head * 1.1, true_head)
    assert np.abs(project(K4, R4, t4, video_head * 1.1)[1] - z_true).mean() > 3e-3


# ----------------------------------------------------------------------------------------------
# The run, as a user runs it.


@pytest.mark.parametrize("field, value", [("eval.max_test_frames", -1), ("batch.rays_per_frame", 0),
                                          ("eval.orbit_frames", -2), ("eval.video_fps", 0.0),
                                          ("eval.train_frames", -1),
                                          ("model.step_divisor", 0.0), ("model.occupancy.resolution", 0),
                                          ("model.occupancy.every", 0), ("data.holdout", -1),
                                          ("online.timeout_s", -1.0), ("optim.lr", float("nan"))])
def test_a_config_field_that_cannot_work_is_refused_before_any_work(tmp_path, field, value):
    from dhjax.train import config as config_lib

    c = config_lib.apply_overrides(insta_config.get_config("tiny"), {field: value})
    with pytest.raises(ValueError, match=f"config field {re.escape(field)} must be"):
        insta_run.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_missing_lpips_weights_are_refused_before_any_work(tmp_path):
    c = insta_config.get_config("tiny")
    c.eval.lpips_path = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="config field eval.lpips_path: .*nope.npz"):
        insta_run.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_training_curve_and_plateau(tmp_path):
    """An offline run's recorder pairs each held-out evaluation in metrics.jsonl with the seconds
    since the first step (training_curve.json / .png); `plateau` is the first point from which
    the PSNR stays within the tolerance of the last one."""
    class FakeBatches:
        def available(self, step):
            return 5

        def get_batch(self, step):
            return {"step": step}

    class FakeRun:
        def path(self, name):
            return str(tmp_path / name)

    rec = insta_run._OnlineRecorder(FakeBatches())
    for step in range(7):                    # the loop's initial call, then steps 0..5
        rec.get_batch(max(step - 1, 0))
    rec.started = {s: 100.0 + 10.0 * s for s in range(6)}      # step s starts at 100 + 10 s
    rec.finished = 165.0
    psnr = {2: 20.0, 4: 24.6, 6: 25.0}
    rows = [{"step": s, "loss": 1.0} for s in (2, 4, 6)] + [{"step": s, "eval/psnr": v} for s, v in psnr.items()]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pts = rec.write_curve(FakeRun())
    assert [(p["step"], p["seconds"], p["heldout_psnr"]) for p in pts] == [(2, 20.0, 20.0), (4, 40.0, 24.6),
                                                                            (6, 65.0, 25.0)]
    assert json.loads((tmp_path / "training_curve.json").read_text()) == pts
    assert (tmp_path / "training_curve.png").is_file() and not (tmp_path / "online.json").exists()
    assert insta_run.plateau(pts, 0.5) == (40.0, 4)
    assert insta_run.plateau(pts, 0.3) == (65.0, 6)
    # a dip after an early high point: the plateau starts after the dip
    dip = [dict(step=s, seconds=float(s), heldout_psnr=v) for s, v in [(1, 25.0), (2, 23.0), (3, 24.8), (4, 25.0)]]
    assert insta_run.plateau(dip, 0.5) == (3.0, 3)
    with pytest.raises(ValueError, match="no points"):
        insta_run.plateau([])


def test_a_stopped_offline_run_keeps_its_training_curve(tmp_path, monkeypatch):
    """SIGTERM mid-training (as a time-boxed GPU run gets): the run checkpoints, stops, and has
    written the training curve of the evaluations it reached."""
    import os
    import signal

    from dhjax.train import app

    c = _run_config("tiny", tmp_path)
    c.train.update(eval_every=3, checkpoint_every=100)
    c.eval.update(orbit_frames=0, mesh_resolution=0)      # the resumed run's outputs: not under test here
    get_batch = insta_run._OnlineRecorder.get_batch

    def get_batch_then_stop(self, step):
        if step == 7 and self.calls > 1:
            os.kill(os.getpid(), signal.SIGTERM)        # noted by the loop; it stops at the step boundary
        return get_batch(self, step)

    monkeypatch.setattr(insta_run._OnlineRecorder, "get_batch", get_batch_then_stop)
    work = tmp_path / "run"
    with pytest.raises(app.Interrupted) as stop:
        insta_run.run(c, str(work))
    assert 7 <= stop.value.step < 12
    pts = json.loads((work / "training_curve.json").read_text())
    assert [p["step"] for p in pts] == [3, 6]
    assert 0 < pts[0]["seconds"] < pts[1]["seconds"] and (work / "training_curve.png").is_file()
    assert not (work / "heldout_metrics.json").exists()     # no outputs from a half-trained state
    stopped = json.loads((work / insta_run.CURVE_STOP_FILE).read_text())
    assert stopped["step"] == stop.value.step and stopped["seconds"] > pts[1]["seconds"]
    # The resumed session continues the curve: the stopped one's points as they were, then its
    # own, their seconds counted on from the stop's.
    monkeypatch.setattr(insta_run._OnlineRecorder, "get_batch", get_batch)
    insta_run.run(c, str(work))
    resumed = json.loads((work / "training_curve.json").read_text())
    assert resumed[:2] == pts
    assert [p["step"] for p in resumed] == [3, 6] + ([9] if stop.value.step < 9 else []) + [12]
    assert all(p["seconds"] > stopped["seconds"] for p in resumed[2:])
    assert np.all(np.diff([p["seconds"] for p in resumed]) > 0)
    assert not (work / insta_run.CURVE_STOP_FILE).exists() and (work / "heldout_metrics.json").is_file()


@pytest.mark.parametrize("scheduled", [False, True])
def test_training_curve_continues_only_from_the_stopped_step(tmp_path, scheduled):
    """A session continues the curve of the session stopped at its first step; one that resumed
    from another step (a SIGKILL after a periodic checkpoint: the steps since have no time)
    starts a curve of its own. The scheduled online mode's online.json continues the same way."""
    name = "online.json" if scheduled else "training_curve.json"
    stop_file = insta_run.ONLINE_STOP_FILE if scheduled else insta_run.CURVE_STOP_FILE
    other = "training_curve.json" if scheduled else "online.json"
    class FakeBatches:
        def available(self, step):
            return 5

    class FakeRun:
        def path(self, name):
            return str(tmp_path / name)

    earlier = [{"step": 2, "seconds": 5.0, "frames_arrived": 5, "heldout_psnr": 20.0},
               {"step": 4, "seconds": 9.0, "frames_arrived": 5, "heldout_psnr": 21.0}]
    rows = [{"step": 6, "eval/psnr": 22.0}, {"step": 8, "eval/psnr": 23.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for first, stop_step, want in [(5, 5, [(2, 5.0), (4, 9.0), (6, 12.0), (8, 14.0)]),
                                   (5, 4, [(6, 1.0), (8, 3.0)])]:
        (tmp_path / name).write_text(json.dumps(earlier))
        (tmp_path / stop_file).write_text(json.dumps({"step": stop_step, "seconds": 11.0}))
        rec = insta_run._OnlineRecorder(FakeBatches(), scheduled)
        rec.started = {s: 100.0 + s - first for s in range(first, 8)}   # steps 5..7, one second each
        rec.finished = 103.0
        pts = rec.write_curve(FakeRun())
        assert [(p["step"], p["seconds"]) for p in pts] == want, (first, stop_step)
        assert not (tmp_path / stop_file).exists() and not (tmp_path / other).exists()
        assert json.loads((tmp_path / name).read_text()) == pts
    # a session stopped again records its own stop, counted on from the earlier one
    (tmp_path / name).write_text(json.dumps(earlier))
    (tmp_path / stop_file).write_text(json.dumps({"step": 5, "seconds": 11.0}))
    rec.finished = 102.5
    rec.write_curve(FakeRun(), stopped_at=8)
    assert json.loads((tmp_path / stop_file).read_text()) == {"step": 8, "seconds": 13.5}
    # a session stopped before its first step leaves both files as they were
    before = {n: (tmp_path / n).read_text() for n in (name, stop_file)}
    assert insta_run._OnlineRecorder(FakeBatches(), scheduled).write_curve(FakeRun(), stopped_at=8) == []
    assert {n: (tmp_path / n).read_text() for n in before} == before


def test_run_writes_its_outputs_resumes_and_reenacts(tmp_path, monkeypatch):
    import os
    import signal

    from dhjax.train import app

    c = _run_config("tiny", tmp_path)
    c.online.frames_per_step = 0.25          # online mode: frame i arrives at step 4 i
    work = tmp_path / "run"
    # Stopped after the first evaluation (SIGTERM at step 8): online.json holds its point, and
    # the session resuming from the stop continues it.
    get_batch = insta_run._OnlineRecorder.get_batch

    def get_batch_then_stop(self, step):
        if step == 8 and self.calls > 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return get_batch(self, step)

    monkeypatch.setattr(insta_run._OnlineRecorder, "get_batch", get_batch_then_stop)
    with pytest.raises(app.Interrupted) as stop:
        insta_run.run(c, str(work))
    first = json.loads((work / "online.json").read_text())
    assert [p["step"] for p in first] == [6] and not (work / "training_curve.json").exists()
    stopped = json.loads((work / insta_run.ONLINE_STOP_FILE).read_text())
    assert stopped["step"] == stop.value.step and stopped["seconds"] > first[0]["seconds"]
    monkeypatch.setattr(insta_run._OnlineRecorder, "get_batch", get_batch)
    m = insta_run.run(c, str(work))
    assert not (work / insta_run.ONLINE_STOP_FILE).exists()
    for name in ("heldout.png", "heldout.mp4", "orbit.mp4", "heldout_metrics.json", "final_metrics.json",
                 "avatar.npz", "metrics.jsonl"):
        assert (work / name).is_file(), name
    rows = json.loads((work / "heldout_metrics.json").read_text())
    assert len(rows["frames"]) == 2 and np.isfinite(rows["mean"]["psnr"]) and np.isfinite(rows["mean"]["baseline_psnr"])
    assert {"depth_error_mm", "mouth_depth_error_mm", "side_depth_error_mm"} <= set(rows["frames"][0])
    assert {"baseline_depth_error_mm", "baseline_mouth_depth_error_mm"} <= set(rows["mean"])
    assert np.isfinite(rows["mean"]["train_psnr"]) and np.isfinite(m["train_psnr"])   # the training frames' fit
    assert np.isfinite(m["psnr"]) and m["n_frames"] == 2.0
    assert list((work / "tb").iterdir())
    online = json.loads((work / "online.json").read_text())
    assert [p["step"] for p in online] == [6, 12] and [p["frames_arrived"] for p in online] == [2, 3]
    assert online[0] == first[0] and online[1]["seconds"] > stopped["seconds"] and (work / "online.png").is_file()
    # a rerun of the finished run trains no more and gives the same held-out numbers
    m2 = insta_run.run(c, str(work))
    assert m2["psnr"] == m["psnr"]
    assert json.loads((work / "online.json").read_text()) == online     # kept from the run that trained
    out = insta_run.reenact(str(work), str(insta_run.cache_lib.cached_video(c.data.synthetic, name="insta_video",
                                                                          cache_dir=c.data.cache_dir)),
                            str(tmp_path / "re"), max_frames=2)
    assert out.is_file() and out.stat().st_size > 0
    src = insta_run.cache_lib.cached_video(c.data.synthetic, name="insta_video", cache_dir=c.data.cache_dir)
    # A run trained before loss.depth_region existed (its config.json lacks the field) still reenacts.
    saved = json.loads((work / "config.json").read_text())
    del saved["loss"]["depth_region"]
    (work / "config.json").write_text(json.dumps(saved))
    one = insta_run.reenact(str(work), str(src), str(tmp_path / "re1"), max_frames=1)     # nothing trains: one frame
    assert one.is_file()
    for kw, match in ((dict(fps=float("nan")), "--fps must be a frame rate > 0, got nan"),
                      (dict(fps=0.0), "--fps must be a frame rate > 0"),
                      (dict(max_frames=-3), "--max_frames must be >= 0")):
        with pytest.raises(ValueError, match=match):
            insta_run.reenact(str(work), str(src), str(tmp_path / "re2"), **kw)
    assert not (tmp_path / "re2").exists()
