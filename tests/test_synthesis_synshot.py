"""Tests for dhjax.synthesis.synshot: map sampling and initial Gaussians, the static assets and the
hair part's area, posing, the data-parallel training step (4 fake CPU devices vs 1), the inversion
stages' frozen parameter groups (`synshot_invert`), the ablation configs and bad inputs.

References are independent: scipy's `ndimage.map_coordinates` (bilinear, clamped) and finite
differences for the map sampling, `scipy.spatial.cKDTree` and numpy loops for the neighbour
distances, `flame.forward` (with its pose correctives zeroed) and scipy rotations for the posing.

Everything runs at toy sizes (16 x 16 maps, 32 x 32 images, batch 4), and everything is jitted
with fast-compile options (`FAST`): XLA compilation is most of this module's time.
"""

import functools
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from dhjax.data import textures
from dhjax.models import flame
from dhjax.render import camera
from dhjax import losses
from dhjax.geometry import vectors
from dhjax.synthesis import synshot
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.synthesis import synshot_invert as inv
import harness_common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compile options of every jit here: LLVM at -O0 and XLA:CPU's classic (non-MLIR) fusion emitters.
# Together they cut the compile time of a SynShot step from ~25 s to ~7 s on a busy CPU; neither
# changes what is computed (the 1- and 4-device runs use the same options).
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
jit = functools.partial(jax.jit, compiler_options=FAST)
S = 16            # map size (the data maps are made at this size too)
B = 4             # batch
H = W = 32        # images
N_SHAPE, N_EXPR = 10, 10


def tiny_model_config(**over):
    mc = synshot.default_model_config()
    mc.update(map_size=S, channels=(8, 16), latent_dim=4, num_codes=16, feat_dim=8, part_density=(16, 12),
              regressor_width=8, nn_mode="grid")
    mc.update(**over)
    return mc


def optim_config():
    return ml_collections.ConfigDict(dict(lr=1e-3, gamma=0.5, milestones=(100,), clip=1.0))


def _batch(model, fields, seed=0):
    """A hand-made batch: the default head's maps for random shapes/expressions, cameras around the
    head looking at its centre, random images and masks, rest pose."""
    rs = np.random.RandomState(seed)
    shape = (0.8 * rs.normal(size=(B, N_SHAPE))).astype(np.float32)
    expr = (0.5 * rs.normal(size=(B, N_EXPR))).astype(np.float32)
    pos = jax.vmap(lambda s: textures.position_map(model, fields, s))(shape)
    offs = jax.vmap(lambda e: textures.expression_offset_map(model, fields, e))(expr)
    centre = textures.head_centre(model).astype(np.float32)
    eyes = centre + np.array([[0.0, 0.0, 0.6], [0.35, 0.1, 0.5], [-0.35, -0.05, 0.5], [0.1, 0.3, 0.5]],
                             np.float32)
    R, t = camera.look_at(eyes, np.broadcast_to(centre, (B, 3)))
    K = np.broadcast_to(np.asarray(camera.intrinsics(60.0, 60.0, (W - 1) / 2, (H - 1) / 2)), (B, 3, 3))
    return dict(image=rs.uniform(size=(B, H, W, 3)).astype(np.float32),
                mask=(rs.uniform(size=(B, H, W)) > 0.3).astype(np.float32),
                K=np.array(K, np.float32), R=np.asarray(R), t=np.asarray(t), shape=shape, expression=expr,
                pose=np.zeros((B, 5, 3), np.float32), translation=np.zeros((B, 3), np.float32),
                uv_albedo=rs.uniform(size=(B, S, S, 3)).astype(np.float32), uv_position=np.asarray(pos),
                uv_expression_offset=np.asarray(offs))


@pytest.fixture(scope="module")
def setup(request, tmp_path_factory):
    model = flame.load()
    mc, oc, lc = tiny_model_config(), optim_config(), synshot.default_loss_config()
    assets = synshot.build_assets(mc, model)
    fields = textures.uv_fields(model, S)
    batch = _batch(model, fields)
    # The step tests use one Gaussian layer: each layer adds several seconds of CPU to every XLA
    # compilation of a SynShot step, and the layers do not interact with the sharding or the frozen
    # groups (the two-layer forward is run by the ablation tests).
    step_mc = tiny_model_config(parts=("face",), part_density=(16,))
    step_assets = assets.replace(parts=assets.parts[:1])       # what build_assets(step_mc) gives
    context = synshot.make_context(step_mc, step_assets, W, H, loss_cfg=lc, optim_cfg=oc)
    # op by op with an RBG key: the compiled ops are reused by the ablation tests' inits, and RBG
    # keys compile much faster than threefry ones
    state = synshot.init_state(jax.random.key(0, impl="rbg"), batch, context)
    # The regressors' output heads start at zero, which zeroes the gradients of everything before
    # them (dec_feat, the regressor bodies) in a first step; small random heads give every
    # parameter a gradient, so the step tests below see all groups move.
    params = dict(state["params"])
    rs = np.random.RandomState(1)
    for k in params:
        if k.startswith("reg_"):
            head = dict(params[k]["head"])
            head["kernel"] = jnp.asarray(0.05 * rs.normal(size=head["kernel"].shape), jnp.float32)
            params[k] = dict(params[k], head=head)
    state = dict(params=params, stats=state["stats"], opt_state=synshot.make_optimizer(oc).init(params))
    ctx = dict(model=model, mc=mc, oc=oc, lc=lc, assets=assets, fields=fields, batch=batch, ctx=context,
               step_mc=step_mc, step_assets=step_assets, state=state, tmp=tmp_path_factory.mktemp("synshot"))
    # the 1- and 4-device steps compile and run in subprocesses while the other tests run here
    wanted = any("device_steps" in item.fixturenames for item in request.session.items)
    ctx["runs"] = _launch_device_runs(ctx) if wanted else {}
    yield ctx
    for p in ctx["runs"].values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _flat(tree, prefix=""):
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------------------------
# Map sampling and initial Gaussians.


def _scipy_bilinear(tex, uv):
    """Clamped bilinear samples [N, C] of tex [S, S, C] at uv [N, 2] (texel (i, j) centred at
    ((j + 0.5) / S, 1 - (i + 0.5) / S)), by scipy.ndimage in float64."""
    tex = np.asarray(tex, np.float64)
    h, w = tex.shape[:2]
    uv = np.asarray(uv, np.float64)
    coords = np.stack([(1.0 - uv[:, 1]) * h - 0.5, uv[:, 0] * w - 0.5])
    return np.stack([ndimage.map_coordinates(tex[..., c], coords, order=1, mode="nearest")
                     for c in range(tex.shape[-1])], -1)


def _uv_inside_cells(rs, n, size):
    """Random UVs strictly inside texel cells (fractional texel coordinate in [0.2, 0.8]), away
    from the derivative kinks of bilinear interpolation at texel centres."""
    x = rs.randint(0, size - 1, n) + rs.uniform(0.2, 0.8, n)
    y = rs.randint(0, size - 1, n) + rs.uniform(0.2, 0.8, n)
    return np.stack([(x + 0.5) / size, 1.0 - (y + 0.5) / size], -1).astype(np.float32)


def _head_map(ctx, i=0):
    return np.asarray(ctx["batch"]["uv_position"][i]) + np.asarray(ctx["batch"]["uv_expression_offset"][i])


def test_sample_positions_match_scipy_bilinear_and_finite_differences(setup):
    rs = np.random.RandomState(0)
    phi = _head_map(setup)
    uv_any = rs.uniform(-0.05, 1.05, size=(200, 2)).astype(np.float32)     # includes clamped borders
    p, _, _ = jit(gs.sample_positions_and_frames)(phi, uv_any)
    np.testing.assert_allclose(p, _scipy_bilinear(phi, uv_any), atol=2e-6)

    uv = _uv_inside_cells(rs, 300, S)
    p, dpdu, dpdv = jit(gs.sample_positions_and_frames)(phi, uv)
    np.testing.assert_allclose(p, _scipy_bilinear(phi, uv), atol=2e-6)
    h = 0.02 / S                                   # stays inside the texel cell on both sides
    du, dv = np.array([h, 0.0]), np.array([0.0, h])
    fd_u = (_scipy_bilinear(phi, uv + du) - _scipy_bilinear(phi, uv - du)) / (2 * h)
    fd_v = (_scipy_bilinear(phi, uv + dv) - _scipy_bilinear(phi, uv - dv)) / (2 * h)
    scale = np.abs(fd_u).max()
    assert scale > 1e-2                            # a real surface, not a flat map
    np.testing.assert_allclose(dpdu, fd_u, atol=2e-5 * scale)
    np.testing.assert_allclose(dpdv, fd_v, atol=2e-5 * scale)


def test_tbn_rotation_is_the_normalised_tangent_frame():
    rs = np.random.RandomState(1)
    dpdu = rs.normal(size=(500, 3))
    dpdv = rs.normal(size=(500, 3))
    R = np.asarray(jit(gs.tbn_rotation)(dpdu.astype(np.float32), dpdv.astype(np.float32)),
                   np.float64)
    np.testing.assert_allclose(R.transpose(0, 2, 1) @ R, np.broadcast_to(np.eye(3), R.shape), atol=2e-6)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=2e-6)
    t = dpdu / np.linalg.norm(dpdu, axis=1, keepdims=True)
    n = np.cross(dpdu, dpdv)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    np.testing.assert_allclose(R[:, :, 0], t, atol=2e-6)
    np.testing.assert_allclose(R[:, :, 2], n, atol=2e-6)
    # the bitangent lies in the tangent plane, on dp/dv's side of T
    assert np.all(np.einsum("nc,nc->n", R[:, :, 1], dpdv) > 0)


def test_nearest_neighbour_distance_matches_kdtree():
    rs = np.random.RandomState(2)
    pts = rs.normal(size=(300, 3)).astype(np.float32)
    ref = cKDTree(pts.astype(np.float64)).query(pts.astype(np.float64), k=2)[0][:, 1]
    # chunk 128: three chunks, the last one padded
    d = jit(functools.partial(vectors.nearest_neighbour_distance, chunk=128))(pts)
    np.testing.assert_allclose(d, ref, rtol=1e-5)
    d = jit(vectors.nearest_neighbour_distance)(pts)
    np.testing.assert_allclose(d, ref, rtol=1e-5)


def _np_grid_neighbour(points, valid):
    h, w, _ = points.shape
    out = np.full((h, w), np.inf)
    for i in range(h):
        for j in range(w):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if (di or dj) and 0 <= a < h and 0 <= b < w and valid[a, b]:
                        out[i, j] = min(out[i, j], np.linalg.norm(points[i, j] - points[a, b]))
    return out


def test_grid_neighbour_distance_matches_numpy_loop():
    rs = np.random.RandomState(3)
    pts = rs.normal(size=(9, 11, 3)).astype(np.float32)
    valid = rs.uniform(size=(9, 11)) > 0.5
    valid[0, :] = False
    valid[3:6, 4:7] = False
    valid[4, 5] = True                         # isolated: no valid neighbour, distance inf
    ref = _np_grid_neighbour(pts.astype(np.float64), valid)
    d = np.asarray(jit(gs.grid_neighbour_distance)(pts, valid))
    assert np.isinf(d[4, 5]) and np.isinf(ref[4, 5])
    np.testing.assert_array_equal(np.isinf(d), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(d[fin], ref[fin], rtol=1e-5)


@pytest.mark.parametrize("nn_mode", ["exact", "grid"])
def test_initial_gaussians_match_direct_computation(setup, nn_mode):
    phi = _head_map(setup, 1)
    for part in setup["assets"].parts:
        init = jit(functools.partial(gs.initial_gaussians, part=part, nn_mode=nn_mode))(phi)
        uv = np.asarray(part.uv)[np.asarray(part.index)]
        means = _scipy_bilinear(phi, uv)
        np.testing.assert_allclose(init["means"], means, atol=2e-6)
        if nn_mode == "exact":
            d = cKDTree(means).query(means, k=2)[0][:, 1]
        else:
            grid = np.zeros((part.h * part.w, 3))
            grid[np.asarray(part.index)] = means
            valid = np.zeros(part.h * part.w, bool)
            valid[np.asarray(part.index)] = True
            d = _np_grid_neighbour(grid.reshape(part.h, part.w, 3),
                                   valid.reshape(part.h, part.w)).reshape(-1)[np.asarray(part.index)]
        # the distance is clamped to [1e-5, 0.05] m (no neighbour -> 0.05)
        log_d = np.log(np.clip(d, 1e-5, 0.05))
        assert np.mean(d < 0.05) > 0.5             # mostly unclamped: the check below has teeth
        np.testing.assert_allclose(init["log_scales"], np.repeat(log_d[:, None], 3, 1), atol=2e-5)
        np.testing.assert_allclose(init["opacity_logits"], np.log(0.7 / 0.3), rtol=1e-6)
        assert init["rotations"].shape == (part.count, 3, 3)
        if part.name == "hair":
            # density 12 on a 16-texel map: no grid point sits on a texel centre (no kinks), so the
            # frame can be checked against finite differences of the interpolation.
            h = 0.02 / S
            fd_u = (_scipy_bilinear(phi, uv + [h, 0]) - _scipy_bilinear(phi, uv - [h, 0])) / (2 * h)
            fd_v = (_scipy_bilinear(phi, uv + [0, h]) - _scipy_bilinear(phi, uv - [0, h])) / (2 * h)
            t = fd_u / np.linalg.norm(fd_u, axis=1, keepdims=True)
            n = np.cross(fd_u, fd_v)
            n /= np.linalg.norm(n, axis=1, keepdims=True)
            np.testing.assert_allclose(np.asarray(init["rotations"])[:, :, 0], t, atol=1e-4)
            np.testing.assert_allclose(np.asarray(init["rotations"])[:, :, 2], n, atol=1e-4)
    with pytest.raises(ValueError, match="nn_mode"):
        gs.initial_gaussians(phi, setup["assets"].parts[0], "kdtree")


# ----------------------------------------------------------------------------------------------
# Assets: part grids, skinning-weight map, joints and posing.


def test_part_grids_lie_inside_the_layout_with_a_full_footprint(setup):
    assets, fields = setup["assets"], setup["fields"]
    layout = np.asarray(fields.mask)
    np.testing.assert_array_equal(np.asarray(assets.map_mask), layout.astype(np.float32))

    def footprint_ok(uv):
        x = np.clip(uv[:, 0] * S - 0.5, 0, S - 1)
        y = np.clip((1 - uv[:, 1]) * S - 0.5, 0, S - 1)
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        x1, y1 = np.minimum(x0 + 1, S - 1), np.minimum(y0 + 1, S - 1)
        return layout[y0, x0] & layout[y0, x1] & layout[y1, x0] & layout[y1, x1]

    parts = {p.name: p for p in assets.parts}
    assert set(parts) == {"face", "hair"}
    for name, d in (("face", 16), ("hair", 12)):
        p = parts[name]
        assert (p.h, p.w) == (d, d)
        # the grid: row-major, row 0 at the top (v near 1), texel-centre-like spacing
        jj, ii = np.meshgrid(np.arange(d), np.arange(d))
        grid = np.stack([(jj + 0.5) / d, 1 - (ii + 0.5) / d], -1).reshape(-1, 2)
        np.testing.assert_allclose(p.uv, grid, atol=1e-7)
        idx = np.asarray(p.index)
        assert len(np.unique(idx)) == len(idx) == p.count
        assert np.all(footprint_ok(grid[idx]))
        if name == "face":       # the face layer is the whole layout: every admissible grid point
            np.testing.assert_array_equal(idx, np.nonzero(footprint_ok(grid))[0])
        else:                    # hair: a proper, non-trivial subset of the admissible points
            admissible = set(np.nonzero(footprint_ok(grid))[0])
            assert set(idx) < admissible and 10 <= len(idx) < 0.8 * len(admissible)
    # the hair region excludes the eyeballs: no hair point's footprint is entirely eye
    eyes = np.asarray(fields.regions["eyes"])
    uv = np.asarray(parts["hair"].uv)[np.asarray(parts["hair"].index)]
    assert np.all(_scipy_bilinear(eyes[..., None], uv)[:, 0] < 0.999)
    assert assets.n_gaussians == parts["face"].count + parts["hair"].count


def test_lbs_map_is_a_partition_of_unity_inside_the_layout(setup):
    lbs_map = np.asarray(setup["assets"].lbs_map)
    layout = np.asarray(setup["fields"].mask)
    assert lbs_map.shape == (S, S, 5)
    np.testing.assert_allclose(lbs_map[layout].sum(-1), 1.0, atol=1e-5)
    assert np.all(lbs_map[layout] >= -1e-6)
    np.testing.assert_array_equal(lbs_map[~layout], 0.0)


def test_joint_transforms_at_rest_pose_are_identities(setup):
    rs = np.random.RandomState(4)
    rel = jit(functools.partial(gs.joint_transforms, setup["assets"]))(
        rs.normal(size=(3, N_SHAPE)).astype(np.float32), rs.normal(size=(3, N_EXPR)).astype(np.float32),
        np.zeros((3, 5, 3), np.float32))
    np.testing.assert_allclose(rel, np.broadcast_to(np.eye(4), (3, 5, 4, 4)), atol=1e-6)


def test_posing_matches_flame_without_pose_correctives(setup):
    model, assets = setup["model"], setup["assets"]
    rs = np.random.RandomState(5)
    n = 2
    shape = (0.8 * rs.normal(size=(n, N_SHAPE))).astype(np.float32)
    expr = (0.5 * rs.normal(size=(n, N_EXPR))).astype(np.float32)
    pose = (0.3 * rs.normal(size=(n, 5, 3))).astype(np.float32)
    trans = (0.05 * rs.normal(size=(n, 3))).astype(np.float32)
    no_correctives = model.replace(posedirs=jnp.zeros_like(model.posedirs))
    out = jit(flame.forward)(no_correctives, shape, expr, pose, trans)
    V = out.v_shaped.shape[1]
    weights = np.asarray(model.lbs_weights, np.float64)
    rots = Rotation.random(n * V, random_state=6).as_matrix().reshape(n, V, 3, 3)
    log_s = rs.normal(-4.0, 0.5, size=(n, V, 3))
    g = gs.Gaussians(means=out.v_shaped, rotations=jnp.asarray(rots, jnp.float32),
                          log_scales=jnp.asarray(log_s, jnp.float32), opacity_logits=jnp.zeros((n, V)),
                          sh=jnp.zeros((n, V, 16, 3)), lbs_weights=jnp.broadcast_to(model.lbs_weights, (n, V, 5)),
                          offsets={})
    rel = jit(functools.partial(gs.joint_transforms, assets))(shape, expr, pose)
    means, cov = jit(gs.pose_gaussians)(g, rel, jnp.asarray(trans))
    np.testing.assert_allclose(means, out.vertices, atol=1e-5)
    # covariances: M R diag(s^2) R^T M^T with M the skinning-weighted world rotations of the joints
    for b in range(n):
        world = []
        for j, parent in enumerate(model.parents):
            local = Rotation.from_rotvec(pose[b, j].astype(np.float64)).as_matrix()
            world.append(local if parent < 0 else world[parent] @ local)
        M = np.einsum("vj,jkl->vkl", weights, np.stack(world))
        A = M @ rots[b]
        ref = A @ (np.exp(2 * log_s[b])[:, :, None] * A.transpose(0, 2, 1))
        # float32 noise relative to the covariance scale (off-diagonal terms cancel)
        np.testing.assert_allclose(cov[b], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


# ----------------------------------------------------------------------------------------------
# Inversion stages.


def _labelled_step(setup, labels):
    return jit(lambda s, b, k, q: synshot.train_step(s, b, k, setup["ctx"], labels=labels, q_id=q))


def _changed_groups(old, new):
    """{top-level group: [leaf changed?, ...]} of two params trees."""
    out = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree_util.tree_leaves(new)):
        out.setdefault(path[0].key, []).append(not np.array_equal(np.asarray(a), np.asarray(b)))
    return out


STAGE2_GROUPS = ("dec_feat", "dec_id", "dec_expr", "reg_face_color", "reg_face_gauss")


@pytest.fixture(scope="module")
def stage_runs(setup):
    """Stage 1 (identity encoder) and stage 2 (decoders + regressors, fixed identity code) steps."""
    params, stats = setup["state"]["params"], setup["state"]["stats"]
    assert set(params) == {"enc_id", "enc_expr", "vq_id", "vq_expr"} | set(STAGE2_GROUPS)
    key = jax.random.key(2)
    out = {}
    labels1 = inv.inversion_labels(params, 1)
    st1 = dict(params=params, stats=stats, opt_state=synshot.make_optimizer(setup["oc"], labels1).init(params))
    out[1] = _labelled_step(setup, labels1)(st1, setup["batch"], key, None)
    labels2 = inv.inversion_labels(params, 2)
    st2 = dict(params=params, stats=stats, opt_state=synshot.make_optimizer(setup["oc"], labels2).init(params))
    q = inv.frozen_code(setup["state"], setup["batch"], setup["ctx"])
    step2 = _labelled_step(setup, labels2)
    out[2] = step2(st2, setup["batch"], key, q)
    out["2_other_code"] = step2(st2, setup["batch"], key, jnp.roll(q, 1, axis=0))
    out["q"] = q
    return out


def test_inversion_stage1_trains_only_the_identity_encoder(setup, stage_runs):
    new, _ = stage_runs[1]
    changed = _changed_groups(setup["state"]["params"], new["params"])
    # every enc_id leaf gets a gradient (through the commitment loss and the straight-through
    # codes), so every one of them moves; everything else stays bit for bit
    assert all(changed["enc_id"]), changed["enc_id"]
    for g, flags in changed.items():
        if g != "enc_id":
            assert not any(flags), g
    # the VQ statistics stay too (with model.vq_ema they hold the codebooks, which the thesis
    # keeps frozen in both stages); without labels a step moves them (the usage EMAs at least)
    for stage in (1, 2):
        assert not any(_changed_groups(setup["state"]["stats"], stage_runs[stage][0]["stats"])["vq_id"])


def test_inversion_stage2_trains_decoders_and_regressors_with_a_fixed_code(setup, stage_runs):
    q = np.asarray(stage_runs["q"])
    latent = setup["step_mc"].latent_dim
    assert q.shape == (B, S // 2, S // 2, latent)
    # the pivot is made of codebook entries
    book = np.asarray(setup["state"]["params"]["vq_id"]["codebook"])
    assert np.all(np.min(np.abs(q.reshape(-1, 1, latent) - book[None]).max(-1), 1) == 0)
    new, metrics = stage_runs[2]
    changed = _changed_groups(setup["state"]["params"], new["params"])
    for g, flags in changed.items():
        if g in STAGE2_GROUPS:
            assert all(flags), (g, flags)      # the setup's non-zero regressor heads give all a gradient
        else:
            assert not any(flags), g           # enc_id, enc_expr, vq_id, vq_expr untouched
    # the fixed code is what the encoder gives, so the loss equals stage 1's (same params, batch);
    # another code changes it
    np.testing.assert_allclose(metrics["loss"], stage_runs[1][1]["loss"], rtol=1e-5)
    assert abs(float(stage_runs["2_other_code"][1]["loss"]) - float(metrics["loss"])) > 1e-3


def test_inversion_stage0_trains_everything_and_bad_stages_raise(setup):
    params = setup["state"]["params"]
    labels = inv.inversion_labels(params, 0)
    assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(params)
    assert set(jax.tree_util.tree_leaves(labels)) == {"train"}
    for stage in (1, 2):
        labels = inv.inversion_labels(params, stage)
        assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(params)
        assert set(jax.tree_util.tree_leaves(labels)) == {"train", "freeze"}
    # the stage-0 optimiser moves every leaf (a small tree with the same groups keeps this cheap)
    small = {g: {"w": jnp.ones((3,))} for g in params}
    tx = synshot.make_optimizer(setup["oc"], inv.inversion_labels(small, 0))
    updates, _ = jit(tx.update)(small, tx.init(small), small)
    for g, u in updates.items():
        assert np.all(np.asarray(u["w"]) < 0), g           # a descent step on every element
    for bad in (3, -1):
        with pytest.raises(ValueError, match="stage"):
            inv.inversion_labels(params, bad)


# ----------------------------------------------------------------------------------------------
# Ablation configs.


@pytest.mark.parametrize("over", [dict(use_vq=False), dict(sampling=False), dict(feat_drop_levels=1)],
                         ids=["no_vq", "no_sampling", "feat_drop"])
def test_ablation_configs_build_init_and_forward(setup, over):
    mc = tiny_model_config(**over)
    # the assets depend only on map_size and the parts: the setup's two-part ones serve with VQ off
    # and with the feature decoder shortened
    assets = synshot.build_assets(mc, setup["model"]) if "sampling" in over else setup["assets"]
    ctx = synshot.make_context(mc, assets, W, H, optim_cfg=setup["oc"])
    net = ctx.net
    batch = setup["batch"]

    state = synshot.init_state(jax.random.key(3, impl="rbg"), batch, ctx)
    maps = synshot.batch_maps(batch, ctx)
    variables = synshot.net_variables(state["params"], state["stats"])
    out = jit(lambda v, m: synshot.forward(v, m, ctx)[0])(variables, maps)
    params = state["params"]
    n = sum(p.count for p in assets.parts)
    assert n == assets.n_gaussians
    g = out["gaussians"]
    shapes = dict(means=(B, n, 3), rotations=(B, n, 3, 3), log_scales=(B, n, 3), opacity_logits=(B, n),
                  sh=(B, n, 16, 3), lbs_weights=(B, n, 5))
    for k, s in shapes.items():
        assert getattr(g, k).shape == s, k
        assert np.all(np.isfinite(getattr(g, k))), k
    for k in ("tex", "verts", "expr", "phi"):
        assert out[k].shape == (B, S, S, 3)
    layout = np.asarray(setup["fields"].mask)
    if over.get("use_vq") is False:
        assert not any(k.startswith("vq_") for k in params) and not state["stats"]
        assert float(out["vq_loss"]) == 0.0
    if over.get("sampling") is False:
        (part,) = assets.parts
        assert (part.name, part.h, part.w) == ("all", S, S)
        # the Gaussians sit at the texel centres whose 2 x 2 forward neighbourhood is inside
        ii, jj = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
        i1, j1 = np.minimum(ii + 1, S - 1), np.minimum(jj + 1, S - 1)
        ok = layout[ii, jj] & layout[ii, j1] & layout[i1, jj] & layout[i1, j1]
        np.testing.assert_array_equal(np.asarray(part.index), np.nonzero(ok.reshape(-1))[0])
        assert params["reg_all_color"]["kernel"].shape == (1, 1, mc.feat_dim, 48)
        assert params["reg_all_gauss"]["kernel"].shape == (1, 1, mc.feat_dim, 11)
        # zero-initialised 1x1 heads: the Gaussians start at the decoded map's texels
        uv = np.asarray(part.uv)[np.asarray(part.index)]
        np.testing.assert_allclose(g.means[0], _scipy_bilinear(out["phi"][0], uv), atol=2e-6)
    if over.get("feat_drop_levels") == 1:
        feat = jax.eval_shape(lambda v, m: net.apply(v, *m)[0], variables, maps)
        assert feat.shape == (B, S // 2, S // 2, mc.feat_dim)


# ----------------------------------------------------------------------------------------------
# Bad inputs.


def test_resize_maps_averages_areas_and_rejects_non_multiples():
    rs = np.random.RandomState(8)
    x = rs.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref = np.zeros((2, 16, 16, 3))
    for i in range(16):
        for j in range(16):
            ref[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2))
    np.testing.assert_allclose(synshot._resize_maps(jnp.asarray(x), 16), ref, atol=1e-6)
    np.testing.assert_array_equal(synshot._resize_maps(jnp.asarray(x), 32), x)
    with pytest.raises(ValueError, match="map_size"):
        synshot._resize_maps(jnp.zeros((1, 24, 24, 3)), 16)


def test_build_assets_rejects_mismatched_or_unknown_parts(setup):
    with pytest.raises(ValueError, match="part_density"):
        synshot.build_assets(tiny_model_config(parts=("face", "hair"), part_density=(16,)), setup["model"])
    with pytest.raises(ValueError, match="unknown part"):
        synshot.build_assets(tiny_model_config(parts=("face", "beard"), part_density=(16, 12)), setup["model"])


# ----------------------------------------------------------------------------------------------
# Losses and the data-parallel training step.


def test_masked_map_l1_is_a_per_example_mean():
    """loss_fn's map terms (losses.l1 with the [1, S, S, 1] layout mask) are documented as L1
    over the layout; they must be a mean over the batch, otherwise the loss (and the step) scales
    with the per-device batch size and N devices differ from one."""
    rs = np.random.RandomState(7)
    a = rs.normal(size=(B, S, S, 3)).astype(np.float32)
    b = rs.normal(size=(B, S, S, 3)).astype(np.float32)
    m = (rs.uniform(size=(S, S)) > 0.4).astype(np.float32)
    ref = np.mean([np.abs(a[i] - b[i])[m > 0].mean() for i in range(B)])
    got = losses.l1(jnp.asarray(a), jnp.asarray(b), jnp.asarray(m)[None, ..., None])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


_WORKER = r"""
import functools, pickle, sys
import jax
import numpy as np
from dhjax.synthesis import synshot
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == n, (jax.device_count(), n)
with open(src, "rb") as f:
    d = pickle.load(f)
ctx = synshot.make_context(d["model_cfg"], d["assets"], d["width"], d["height"], loss_cfg=d["loss_cfg"],
                           optim_cfg=d["optim_cfg"])
step = jax.jit(functools.partial(synshot.train_step, ctx=ctx), compiler_options=d["compiler_options"])
state, metrics = step(d["state"], d["batch"], jax.random.key(1))
out = {}
for prefix, tree in (("params", state["params"]), ("stats", state["stats"]), ("opt", state["opt_state"]),
                     ("metrics", metrics)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
np.savez(dst, **out)
"""


def _launch_device_runs(ctx):
    """Starts one training step on 1 and on 4 fake CPU devices (XLA_FLAGS must be set before jax
    starts, hence subprocesses) from the same pickled state and batch."""
    src = ctx["tmp"] / "step_inputs.pkl"
    with open(src, "wb") as f:
        pickle.dump(dict(assets=ctx["step_assets"], state=ctx["state"], batch=ctx["batch"], model_cfg=ctx["step_mc"],
                         loss_cfg=ctx["lc"], optim_cfg=ctx["oc"], width=W, height=H, compiler_options=FAST), f)
    runs = {}
    for n in (1, 4):
        env = dict(os.environ, XLA_FLAGS=harness_common.xla_flags(n),
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        with open(ctx["tmp"] / f"step{n}.log", "w") as log:        # a file: a full pipe would block
            runs[n] = subprocess.Popen([sys.executable, "-c", _WORKER, str(src), str(ctx["tmp"] / f"step{n}.npz"),
                                        str(n)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return runs


@pytest.fixture(scope="module")
def device_steps(setup):
    out = {}
    for n, proc in setup["runs"].items():
        proc.wait(timeout=600)
        assert proc.returncode == 0, (setup["tmp"] / f"step{n}.log").read_text()[-4000:]
        with np.load(setup["tmp"] / f"step{n}.npz") as z:
            out[n] = dict(z)
    return out


def _part(steps, prefix):
    return {k[len(prefix):]: v for k, v in steps.items() if k.startswith(prefix)}


def _gradients(steps):
    """The step's (averaged, clipped) gradients, from Adam's first moment after one step:
    mu = (1 - b1) g with optax's default b1 = 0.9."""
    mu = {k: v / (1 - 0.9) for k, v in _part(steps, "opt").items() if ".mu[" in k}
    return {k[k.index(".mu[") + 3:]: v for k, v in mu.items()}


def test_one_step_on_four_devices_has_the_gradients_of_one_device(setup, device_steps):
    one, four = _gradients(device_steps[1]), _gradients(device_steps[4])
    assert one.keys() == four.keys() == _flat(setup["state"]["params"]).keys()
    scale = max(np.abs(v).max() for v in one.values())
    assert scale > 0
    for k in one:
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, atol=1e-5 * scale, err_msg=k)


def test_one_step_on_four_devices_equals_one_device_params(setup, device_steps):
    old = _flat(setup["state"]["params"])
    one, four = _part(device_steps[1], "params"), _part(device_steps[4], "params")
    grad = _gradients(device_steps[1])
    assert one.keys() == four.keys() == old.keys()
    assert all(not np.array_equal(one[k], old[k]) for k in one)          # every parameter took a step
    # Adam's first step is lr * g / (|g| + 1e-8): well conditioned where |g| >> 1e-8. Elements with
    # round-off gradients (e.g. conv biases right before a one-channel-per-group GroupNorm, which
    # cannot change the output) are compared through their gradients in the test above.
    compared = 0
    for k in one:
        sig = np.abs(grad[k]) > 1e-5
        compared += sig.sum()
        np.testing.assert_allclose(four[k][sig], one[k][sig], rtol=1e-5, atol=1e-7, err_msg=k)
    assert compared > 0.8 * sum(v.size for v in one.values())


def test_one_step_on_four_devices_equals_one_device_vq_stats(device_steps):
    """The usage EMAs count codes per batch (`vq.update_usage_ema`); the data-parallel step must
    count them over the global batch, as one device does."""
    one, four = _part(device_steps[1], "stats"), _part(device_steps[4], "stats")
    assert sorted(one) == sorted(four) == ["['vq_expr']['usage_ema']", "['vq_id']['usage_ema']"]
    for k in one:
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, err_msg=k)


def test_one_step_on_four_devices_equals_one_device_loss_metrics(device_steps):
    one, four = _part(device_steps[1], "metrics"), _part(device_steps[4], "metrics")
    assert one.keys() == four.keys()
    keys = ["['loss']", "['render_l1']", "['render_ssim']", "['map_loss']", "['geom_loss']", "['reg_loss']",
            "['vq_loss']"]
    assert set(keys) <= set(one)
    assert np.isfinite(one["['loss']"]) and one["['loss']"] > 0
    bad = {k: (float(four[k]), float(one[k])) for k in keys if not np.allclose(four[k], one[k], rtol=1e-5)}
    assert not bad, f"4 devices vs 1 device: {bad}"


def test_one_step_on_four_devices_equals_one_device_batch_metrics(device_steps):
    """PSNR and code perplexities are non-linear in the batch: averaging per-device values is not
    the value of the global batch."""
    one, four = _part(device_steps[1], "metrics"), _part(device_steps[4], "metrics")
    keys = ["['psnr']", "['perplexity_id']", "['perplexity_expr']"]
    bad = {k: (float(four[k]), float(one[k])) for k in keys if not np.allclose(four[k], one[k], rtol=1e-5)}
    assert not bad, f"4 devices vs 1 device: {bad}"


def test_hair_part_comes_from_the_head_model_and_covers_every_generated_shell(setup):
    """The hair part's area is the head model's (`models.hair_region.hair_area`, no synthetic
    generator involved); every hair and beard shell the generator samples lies inside it, and it
    leaves the eyeballs out."""
    from dhjax.data import hair as hair_lib
    from dhjax.models import hair_region

    model = setup["model"]
    area = hair_region.hair_area(model)
    phi, theta, _, _ = hair_region.area_weights(model)
    assert np.all(area[np.asarray(model.regions["eyes"])] == 0)
    assert area[np.argmax(np.asarray(model.v_template)[:, 1])] > 0.5        # the top of the head
    for k in jax.random.split(jax.random.PRNGKey(3), 20):
        h = hair_lib.sample_hair(k)
        b = hair_lib.sample_beard(jax.random.fold_in(k, 1), h, beard_prob=1.0)
        assert np.all(np.asarray(hair_lib.hair_thickness(phi, theta, h))[area == 0] == 0)
        assert np.all(np.asarray(hair_lib.beard_thickness(phi, theta, b))[area == 0] == 0)
    # the part's UV points lie where the baked area exceeds 0.05
    hair = next(p for p in setup["assets"].parts if p.name == "hair")
    baked = np.asarray(textures.bake(setup["fields"], model.faces, area[:, None]))[..., 0]
    uv = np.asarray(hair.uv)[np.asarray(hair.index)]
    i = np.clip(((1 - uv[:, 1]) * S).astype(int), 0, S - 1)
    j = np.clip((uv[:, 0] * S).astype(int), 0, S - 1)
    assert np.all(baked[i, j] > 0.05) and hair.count > 0


def test_context_passes_the_deterministic_flag_to_the_splatting(setup, monkeypatch):
    """Context.deterministic (config field deterministic_kernels) reaches splat.rasterize; on the
    CPU, whose backward is always deterministic, the renders are the same bits either way."""
    from dhjax.synthesis import synshot_gaussians as gs_mod

    seen = []
    real = gs_mod.splat.rasterize

    def recording(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gs_mod.splat, "rasterize", recording)
    batch = {k: v[:1] for k, v in setup["batch"].items()}
    images = {}
    for flag in (False, True):
        ctx = setup["ctx"].replace(deterministic=flag)
        images[flag] = np.asarray(synshot.predict(setup["state"], batch, ctx)[0])
        assert seen and set(seen) == {flag}
        seen.clear()
    np.testing.assert_array_equal(images[False], images[True])


def test_map_ssim_and_lpips_cover_every_decoded_map(setup):
    """The thesis's "L1 + SSIM + LPIPS on maps": with loss.map_ssim_on naming all three decoded
    maps, the map loss grows over the albedo-only loss (the pre-2026-12-05 default) by exactly
    map_ssim (1 - SSIM) of the position and expression maps in the [0, 1] layout-masked units,
    and an LPIPS function is applied to every named map with the `lpips` weight."""
    ctx0, state, batch = setup["ctx"], setup["state"], setup["batch"]
    params, stats = state["params"], state["stats"]

    def run(ctx):
        return synshot.loss_fn(params, stats, batch, ctx)[1][0]

    lc_all = synshot.default_loss_config()
    assert tuple(lc_all.map_ssim_on) == ("tex", "verts", "expr")
    lc_tex = synshot.default_loss_config()
    lc_tex.map_ssim_on = ("tex",)
    m_all, m_tex = run(ctx0.replace(loss_cfg=lc_all)), run(ctx0.replace(loss_cfg=lc_tex))
    out, _ = synshot.forward(synshot.net_variables(params, stats), synshot.batch_maps(batch, ctx0), ctx0, train=True)
    maps_in = synshot.batch_maps(batch, ctx0)
    mask = np.asarray(ctx0.assets.map_mask)[None, ..., None]

    def dssim(a, b):
        return 1.0 - float(np.mean(losses.ssim(np.asarray(a) * mask * 0.5 + 0.5, np.asarray(b) * mask * 0.5 + 0.5)))

    extra = lc_all.map_ssim * (dssim(out["verts"], maps_in[1]) + dssim(out["expr"], maps_in[2]))
    assert extra > 1e-3
    np.testing.assert_allclose(float(m_all["map_loss"]) - float(m_tex["map_loss"]), extra, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m_all["loss"]) - float(m_tex["loss"]), extra, rtol=1e-4, atol=1e-6)

    def fake_lpips(a, b):                         # [B, H, W, 3] x 2 -> [B]: mean absolute difference
        return jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))

    lc_lp = synshot.default_loss_config()
    lc_lp.lpips = 0.5
    m_lp = run(ctx0.replace(loss_cfg=lc_lp, lpips_fn=fake_lpips))
    for name, x in zip(synshot.MAP_NAMES, maps_in):
        want = float(np.mean(np.abs((np.asarray(out[name]) - np.asarray(x)) * mask * 0.5)))
        np.testing.assert_allclose(float(m_lp[f"lpips_{name}_map"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(m_lp["map_loss"]) - float(m_all["map_loss"]),
                               0.5 * sum(float(m_lp[f"lpips_{n}_map"]) for n in synshot.MAP_NAMES), rtol=1e-4)
    assert "lpips" in m_lp and "lpips_tex_map" not in m_all

    bad = synshot.default_loss_config()
    bad.map_ssim_on = ("tex", "normals")
    with pytest.raises(ValueError, match=r"loss.map_ssim_on must name distinct maps"):
        synshot.make_context(setup["step_mc"], setup["step_assets"], W, H, loss_cfg=bad)


def test_photometric_stage1_loss_drops_the_map_geometry_and_vq_terms(setup):
    """synshot_invert.stage1_context: "full" is the prior's loss, "photometric" is that loss less
    its map, geometry and VQ terms (render and regulariser terms unchanged); other names raise."""
    from dhjax.synthesis import synshot_invert as inv

    ctx, state, batch = setup["ctx"], setup["state"], setup["batch"]
    assert inv.stage1_context(ctx, "full") is ctx
    photo = inv.stage1_context(ctx, "photometric")
    assert ctx.loss_cfg.map_l1 > 0 and ctx.loss_cfg.vq > 0          # the prior's loss is untouched
    full_m = synshot.loss_fn(state["params"], state["stats"], batch, ctx)[1][0]
    photo_m = synshot.loss_fn(state["params"], state["stats"], batch, photo)[1][0]
    want = (float(full_m["loss"]) - float(full_m["map_loss"]) - float(full_m["geom_loss"])
            - ctx.loss_cfg.vq * float(full_m["vq_loss"]))
    np.testing.assert_allclose(float(photo_m["loss"]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(photo_m["render_l1"]), float(full_m["render_l1"]), rtol=1e-6)
    with pytest.raises(ValueError, match="stage1.loss must be one of"):
        inv.stage1_context(ctx, "maps")
