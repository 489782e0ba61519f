"""GEM distilled from a SynShot avatar (dhjax.synthesis.gem_synshot): the collected head-frame
attributes against SynShot's own world-space posing, the PCA's reconstruction, GEM renders
against SynShot's own renders, held-out evaluation and bad inputs.

A tiny randomly initialised SynShot network (16 x 16 maps, one Gaussian layer, as in
tests/test_synthesis_synshot.py) with random regressor heads stands in for a trained avatar; the
"inverted avatar" route (identity code q_id, no identity maps) is the main one, the prior route
(identity maps through the encoder) is checked to give the same attributes. References are
independent where they can be: SynShot's `synshot_gaussians.pose_gaussians` with the full world
pose, `flame.forward`'s posed root joint, scipy rotations, `splat.eval_sh` and
`synshot.predict`'s renders.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dhjax import losses
from dhjax.data import textures
from dhjax.models import flame
from dhjax.render import camera
from dhjax.render import splat
from dhjax.synthesis import gem
from dhjax.synthesis import gem_synshot as gsy
from dhjax.synthesis import synshot
from dhjax.synthesis import synshot_gaussians as gs
from dhjax.synthesis import synshot_invert as inv

S = 16                # map size
H = W = 32            # images
N = 8                 # training frames (= gem_synshot's default chunk: one compiled shape)
N_SHAPE, N_EXPR = 10, 10
GLOBAL = np.array([0.1, 0.3, -0.05], np.float32)      # the frames' global rotation (axis-angle)
TRANSLATION = np.array([0.01, -0.02, 0.03], np.float32)


def tiny_model_config():
    mc = synshot.default_model_config()
    mc.update(map_size=S, channels=(8, 16), latent_dim=4, num_codes=16, feat_dim=8, parts=("face",),
              part_density=(16,), regressor_width=8, nn_mode="grid")
    return mc


def _with_heads(params, rs, color_scale, gauss_scale):
    """Random regressor output heads (they start at zero: constant colours and no offsets)."""
    params = dict(params)
    for k, scale in (("reg_face_color", color_scale), ("reg_face_gauss", gauss_scale)):
        head = dict(params[k]["head"])
        head["kernel"] = jnp.asarray(scale * rs.normal(size=head["kernel"].shape), jnp.float32)
        head["bias"] = jnp.asarray(scale * rs.normal(size=head["bias"].shape), jnp.float32)
        params[k] = dict(params[k], head=head)
    return params


def _cameras(centre, n=3):
    eyes = centre + np.array([[0.0, 0.0, 0.6], [0.35, 0.1, 0.5], [-0.35, -0.05, 0.5]], np.float32)[:n]
    R, t = camera.look_at(eyes, np.broadcast_to(centre, (n, 3)))
    K = np.broadcast_to(np.asarray(camera.intrinsics(60.0, 60.0, (W - 1) / 2, (H - 1) / 2)), (n, 3, 3))
    return camera.Camera(K=jnp.asarray(K, jnp.float32), R=R, t=t, width=W, height=H)


@pytest.fixture(scope="module")
def setup():
    model = flame.load()
    mc = tiny_model_config()
    assets = synshot.build_assets(mc, model)
    ctx = synshot.make_context(mc, assets, W, H)
    fields = textures.uv_fields(model, S)
    rs = np.random.RandomState(0)
    shape = (0.8 * rs.normal(size=N_SHAPE)).astype(np.float32)
    maps = dict(uv_albedo=rs.uniform(size=(S, S, 3)).astype(np.float32),
                uv_position=np.asarray(textures.position_map(model, fields, shape)))
    batch = {k: v[None] for k, v in maps.items()}
    batch["uv_expression_offset"] = np.zeros((1, S, S, 3), np.float32)
    variables = ctx.net.init(jax.random.key(0, impl="rbg"), *synshot.batch_maps(batch, ctx))
    params = _with_heads(variables["params"], rs, color_scale=0.01, gauss_scale=0.05)
    state = dict(params=params, stats=variables.get("vq_stats", {}))
    q_id = inv.frozen_code(state, batch, ctx)                     # the "inverted" identity code
    expr = (0.8 * rs.normal(size=(N, N_EXPR))).astype(np.float32)
    pose = np.zeros((N, 5, 3), np.float32)
    pose[:, 0] = GLOBAL
    trans = np.tile(TRANSLATION, (N, 1))
    ident = {"shape": shape}                                       # with q_id: no identity maps
    collected = gsy.collect(state, ctx, ident, expr, pose, q_id=q_id)
    return dict(model=model, ctx=ctx, assets=assets, shape=shape, maps=maps, state=state, q_id=q_id, expr=expr,
                pose=pose, trans=trans, ident=ident, collected=collected, cams=_cameras(np.asarray(assets.centre)))


def _head_rigid_flame(setup, i):
    """(R_0, T) of frame i from scipy and `flame.forward`'s posed root joint (j_0 + translation)."""
    R0 = Rotation.from_rotvec(setup["pose"][i, 0].astype(np.float64)).as_matrix()
    out = flame.forward(setup["model"], setup["shape"][None], setup["expr"][i:i + 1], setup["pose"][i:i + 1],
                        setup["trans"][i:i + 1])
    j0 = np.asarray(out.joints[0, 0], np.float64) - setup["trans"][i]
    return R0, j0 - R0 @ j0 + setup["trans"][i]


def _world_gaussians(setup, frames):
    """SynShot's own world-space means [F, G, 3], covariances [F, G, 3, 3] and model-space
    Gaussians of some frames (`synshot.forward` and `synshot_gaussians.pose_gaussians`)."""
    ctx, s = setup["ctx"], setup
    f = np.asarray(frames)
    n = len(f)
    maps_in = synshot.normalise_maps(ctx.assets, ctx.model_cfg, np.broadcast_to(s["maps"]["uv_albedo"], (n, S, S, 3)),
                                     np.broadcast_to(s["maps"]["uv_position"], (n, S, S, 3)),
                                     gsy.expression_maps(s["model"], s["expr"][f], S))

    @jax.jit
    def world(params, stats, maps_in, q_id, shape, expr, pose, trans):
        out, _ = synshot.forward(synshot.net_variables(params, stats), maps_in, ctx, q_id=q_id)
        rel = gs.joint_transforms(ctx.assets, shape, expr, pose)
        means, cov = gs.pose_gaussians(out["gaussians"], rel, trans)
        return means, cov, out["gaussians"]

    q = jnp.broadcast_to(s["q_id"], (n,) + s["q_id"].shape[1:])
    means, cov, g = world(s["state"]["params"], s["state"]["stats"], maps_in, q, np.tile(s["shape"], (n, 1)),
                          s["expr"][f], s["pose"][f], s["trans"][f])
    return np.asarray(means, np.float64), np.asarray(cov, np.float64), g


def _covariances(attrs, i):
    R = Rotation.from_quat(np.asarray(attrs["rotation"][i], np.float64)[:, [1, 2, 3, 0]]).as_matrix()
    s2 = np.exp(2.0 * np.asarray(attrs["scale"][i], np.float64))
    return np.einsum("gij,gj,gkj->gik", R, s2, R)


# ----------------------------------------------------------------------------------------------


def test_collected_attributes_are_synshots_gaussians_in_the_head_frame(setup):
    col = setup["collected"]
    G = setup["assets"].n_gaussians
    shapes = {a: col[a].shape for a in gem.ATTRIBUTES + ("sh",)}
    assert shapes == {"position": (N, G, 3), "rotation": (N, G, 4), "scale": (N, G, 3), "opacity": (N, G, 1),
                      "sh": (N, G, 16, 3)}
    for a in gem.ATTRIBUTES + ("sh",):
        assert np.all(np.isfinite(col[a])), a
    q = col["rotation"]
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-6)
    assert np.all(np.sum(q * q[:1], -1) >= 0.0)               # one hemisphere per Gaussian
    # neck, jaw and eyes at rest: the head-frame covariances are exact
    assert np.all(col["covariance_error"] < 1e-5)
    frames = (0, N - 1)
    means, cov, g = _world_gaussians(setup, frames)
    for j, i in enumerate(frames):
        R0, T = _head_rigid_flame(setup, i)
        # SynShot's world Gaussians = head-frame ones moved by the frame's rigid head pose
        np.testing.assert_allclose(np.einsum("ij,gj->gi", R0, col["position"][i]) + T, means[j], atol=2e-6)
        head_cov = np.einsum("ji,gjk,kl->gil", R0, cov[j], R0)
        # relative to each covariance, or to (0.1 mm)^2 for flat or point-like ones
        scale = np.maximum(np.abs(cov[j]).max(axis=(1, 2), keepdims=True), 1e-8)
        np.testing.assert_allclose(_covariances(col, i) / scale, head_cov / scale, atol=2e-5)
        np.testing.assert_allclose(col["opacity"][i, :, 0], g.opacity_logits[j], rtol=1e-6)
        # SH: the head-frame colour in direction d is SynShot's world colour in direction R_0 d
        d = np.random.RandomState(i).normal(size=(G, 3)).astype(np.float32)
        np.testing.assert_allclose(splat.eval_sh(3, d, col["sh"][i]), splat.eval_sh(3, d @ R0.T, g.sh[j]), atol=2e-5)
        # Gaussians whose SynShot tangent frame is singular (zero UV derivative) are counted
        assert col["n_degenerate"][i] == int(np.sum(np.abs(np.linalg.det(np.asarray(g.rotations[j]))) < 0.5))

    # the prior route (identity maps through the encoder) gives the same avatar as the code q_id
    prior = gsy.collect(setup["state"], setup["ctx"], dict(setup["ident"], **setup["maps"]), setup["expr"],
                        setup["pose"])
    for a in gem.ATTRIBUTES + ("sh",):
        np.testing.assert_allclose(prior[a], col[a], atol=1e-5, err_msg=a)

    # a jaw and neck pose: unit quaternions in the reference's hemisphere, a small covariance error
    pose = setup["pose"].copy()
    pose[:, 1:3] = np.random.RandomState(3).normal(size=(N, 2, 3)) * 0.15
    posed = gsy.collect(setup["state"], setup["ctx"], setup["ident"], setup["expr"], pose, q_id=setup["q_id"],
                        reference=col["rotation"][0])
    np.testing.assert_allclose(np.linalg.norm(posed["rotation"], axis=-1), 1.0, atol=1e-6)
    assert np.all(np.sum(posed["rotation"] * col["rotation"][:1], -1) >= 0.0)
    assert np.all(posed["covariance_error"] > 1e-5) and np.all(posed["covariance_error"] < 0.2)
    assert not np.allclose(posed["position"], col["position"], atol=1e-4)


def test_rotate_sh_matches_evaluating_in_rotated_directions():
    rs = np.random.RandomState(0)
    R = Rotation.random(7, random_state=1).as_matrix().astype(np.float32)
    for degree in (0, 1, 2, 3):
        sh = rs.normal(size=(7, (degree + 1) ** 2, 3)).astype(np.float32)
        d = rs.normal(size=(7, 50, 3)).astype(np.float32)
        rot = gsy.rotate_sh(sh, R)
        got = splat.eval_sh(degree, d, jnp.broadcast_to(rot[:, None], (7, 50) + rot.shape[1:]))
        want = splat.eval_sh(degree, np.einsum("bij,bpj->bpi", R, d),
                             np.broadcast_to(sh[:, None], (7, 50) + sh.shape[1:]))
        np.testing.assert_allclose(got, want, atol=2e-5)
    with pytest.raises(ValueError, match=r"\(d\+1\)\^2"):
        gsy.rotate_sh(np.zeros((4, 5, 3), np.float32), np.eye(3))


def test_mean_hemisphere_puts_every_quaternion_on_its_means_side():
    """Quaternions aligned to their first frame can still lie on the far side of their mean (a
    Gaussian turning more than 90 degrees, or an arbitrary rotation of a degenerate one): after
    `mean_hemisphere` none does, and every rotation is unchanged."""
    rs = np.random.RandomState(3)
    q = Rotation.random(40 * 50, random_state=rs).as_quat()[:, [3, 0, 1, 2]].reshape(40, 50, 4)
    q = q * np.sign(np.sum(q * q[:1], -1, keepdims=True))            # the first frame's hemisphere
    assert (np.einsum("ngc,gc->ng", q, q.sum(0)) < 0).any()          # the case this is for
    out = gsy.mean_hemisphere(q.astype(np.float32))
    assert out.dtype == np.float32 and out.shape == q.shape
    assert (np.einsum("ngc,gc->ng", out.astype(np.float64), out.astype(np.float64).sum(0)) >= 0).all()
    np.testing.assert_allclose(np.abs(out), np.abs(q), atol=1e-7)    # only signs change
    same = np.einsum("ngc,ngc->ng", out, q)
    np.testing.assert_allclose(np.abs(same), 1.0, atol=1e-6)
    np.testing.assert_array_equal(gsy.mean_hemisphere(out), out)      # a fixed point
    with pytest.raises(ValueError, match=r"rotation must be \[N, G, 4\]"):
        gsy.mean_hemisphere(np.zeros((3, 4)))


def test_distilled_gem_reconstructs_and_renders_like_synshot(setup):
    s = setup
    col = s["collected"]
    model, k, info = gsy.distil_collected(col, N - 1)
    assert model.n_components == N - 1 and model.sh_degree == 3 and model.background == (0.0, 0.0, 0.0)
    # N - 1 components reconstruct the N frames (quaternions in their mean's hemisphere)
    aligned = dict(col, rotation=gsy.mean_hemisphere(col["rotation"]))
    for i in range(N):
        rec = gem.eigen_attributes(model, {a: k[a][i] for a in gem.ATTRIBUTES})
        for a in gem.ATTRIBUTES:
            atol = 1e-5 * max(1.0, float(np.abs(col[a]).max()))
            np.testing.assert_allclose(rec[a], aligned[a][i], atol=atol, err_msg=f"{a} of frame {i}")
    # the frames' coefficients are their projections; the wrapper distils the same model
    kp = gsy.project(model, col)
    for a in gem.ATTRIBUTES:
        np.testing.assert_allclose(kp[a], k[a], atol=1e-4 * max(1.0, float(np.abs(k[a]).max())))
    model2, _, info2 = gsy.distil_synshot(s["state"], s["ctx"], s["ident"], s["expr"], s["pose"], N - 1, q_id=s["q_id"])
    np.testing.assert_allclose(model2.sh, model.sh, atol=1e-6)
    np.testing.assert_allclose(model2.mean["position"], model.mean["position"], atol=1e-6)
    assert info2["colour"] == pytest.approx(info["colour"])

    # GEM renders in head-frame cameras against SynShot's own world renders of the training frames
    ref = gsy.synshot_render(s["state"], s["ctx"], s["ident"], s["expr"], s["pose"], s["trans"], s["cams"],
                             q_id=s["q_id"])
    assert ref.shape == (N, 3, H, W, 3) and ref.max() > 0.05
    render = jax.jit(lambda m, kk, c: gem.render(m, kk, c))
    for i in (0, 5):
        R0, T = _head_rigid_flame(s, i)
        hc = gem.head_cameras(s["cams"], jnp.asarray(R0, jnp.float32), jnp.asarray(T, jnp.float32))
        ki = {a: k[a][i] for a in gem.ATTRIBUTES}
        own = render(model._replace(sh=jnp.asarray(col["sh"][i])), ki, hc)     # the frame's own colours
        assert float(jnp.abs(own - ref[i]).max()) < 1e-5
        mean = render(model, ki, hc)                                            # the GEM's mean colours
        err = float(jnp.abs(mean - ref[i]).max())
        psnr = float(jnp.mean(losses.psnr(mean, ref[i])))
        print(f"frame {i}: GEM (mean colours) vs SynShot PSNR {psnr:.2f} dB, max error {err:.4f}, "
              f"colour bound {info['colour']['max_rgb_bound']:.4f}, colour RMS {info['colour']['rms']:.5f}")
        assert 0.0 < err <= info["colour"]["max_rgb_bound"] + 1e-5
        # SynShot's world-frame SH used unrotated in the head frame would be wrong
        world_sh = np.asarray(gsy.rotate_sh(col["sh"][i], R0.T.astype(np.float32)))
        unrot = render(model._replace(sh=jnp.asarray(world_sh)), ki, hc)
        assert float(jnp.abs(unrot - ref[i]).max()) > 100 * float(jnp.abs(own - ref[i]).max()) + 1e-4

    # colours that do not vary over the frames: the mean-colour GEM renders SynShot's frames
    rs = np.random.RandomState(5)
    params = dict(s["state"]["params"])
    head = dict(params["reg_face_color"]["head"])
    head["kernel"] = jnp.zeros_like(head["kernel"])
    head["bias"] = jnp.asarray(0.3 * rs.normal(size=head["bias"].shape), jnp.float32)
    params["reg_face_color"] = dict(params["reg_face_color"], head=head)
    state = dict(s["state"], params=params)
    const = gsy.collect(state, s["ctx"], s["ident"], s["expr"], s["pose"], q_id=s["q_id"])
    cmodel, ck, cinfo = gsy.distil_collected(const, N - 1)
    assert cinfo["colour"]["rms"] < 1e-6
    cref = gsy.synshot_render(state, s["ctx"], s["ident"], s["expr"], s["pose"], s["trans"], s["cams"], q_id=s["q_id"])
    R0, T = _head_rigid_flame(s, 2)
    hc = gem.head_cameras(s["cams"], jnp.asarray(R0, jnp.float32), jnp.asarray(T, jnp.float32))
    img = render(cmodel, {a: ck[a][2] for a in gem.ATTRIBUTES}, hc)
    assert float(jnp.abs(img - cref[2]).max()) < 1e-5


def test_evaluate_on_held_out_expressions(setup):
    s = setup
    model, _, _ = gsy.distil_collected(s["collected"], N - 1)
    rs = np.random.RandomState(7)
    expr = (0.8 * rs.normal(size=(1, N_EXPR))).astype(np.float32)
    cams = s["cams"]
    res = gsy.evaluate(model, s["state"], s["ctx"], s["ident"], expr, s["pose"][:1], s["trans"][:1], cams,
                       q_id=s["q_id"], fit_steps=30, return_images=True)
    print(f"held out: PSNR projected {res['psnr_projected']:.2f} dB, fitted {res['psnr_fitted']:.2f} dB, "
          f"mean {res['psnr_mean']:.2f} dB; GEM {res['gem_mb']:.4f} MB, SynShot {res['synshot_mb']:.4f} MB")
    assert res["n_frames"] == 1 and res["n_cameras"] == 3
    assert res["images"]["synshot"].shape == res["images"]["fitted"].shape == (1, 3, H, W, 3)
    for name in ("projected", "fitted", "mean"):
        assert 15.0 < res[f"psnr_{name}"] < 80.0
        # the PSNRs are those of the returned images
        want = np.mean(np.asarray(losses.psnr(res["images"][name][0], res["images"]["synshot"][0])))
        assert res[f"psnr_{name}"] == pytest.approx(float(want), rel=1e-5)
    assert res["psnr_fitted"] > res["psnr_mean"]
    assert res["gem_mb"] == pytest.approx(gem.size_bytes(model) / 2 ** 20)
    n_par = sum(np.asarray(x).size for x in jax.tree_util.tree_leaves((s["state"]["params"], s["state"]["stats"])))
    assert res["synshot_mb"] == pytest.approx(4 * (n_par + np.asarray(s["q_id"]).size) / 2 ** 20)


def test_bad_inputs_raise_clear_errors(setup):
    s = setup
    st, ctx, ident, expr, pose = s["state"], s["ctx"], s["ident"], s["expr"], s["pose"]
    with pytest.raises(ValueError, match="expression has 8 frames but pose has 4"):
        gsy.collect(st, ctx, ident, expr, pose[:4], q_id=s["q_id"])
    with pytest.raises(ValueError, match="no frames"):
        gsy.collect(st, ctx, ident, expr[:0], pose[:0], q_id=s["q_id"])
    with pytest.raises(ValueError, match="no frames"):
        gsy.distil_synshot(st, ctx, ident, expr[:0], pose[:0], 1, q_id=s["q_id"])
    with pytest.raises(ValueError, match=r"n_components=8 must be in \[1, N - 1\]"):
        gsy.distil_synshot(st, ctx, ident, expr, pose, N, q_id=s["q_id"])
    with pytest.raises(ValueError, match="at least 2 frames"):
        gsy.distil_collected({k: v[:1] for k, v in s["collected"].items()}, 1)
    with pytest.raises(ValueError, match="'sh' has 4 frames"):
        gsy.distil_collected(dict(s["collected"], sh=s["collected"]["sh"][:4]), 2)
    with pytest.raises(ValueError, match="uv_albedo"):
        gsy.collect(st, ctx, ident, expr, pose)                       # the prior needs the maps
    with pytest.raises(ValueError, match="lacks 'shape'"):
        gsy.collect(st, ctx, {}, expr, pose, q_id=s["q_id"])
    with pytest.raises(ValueError, match="q_id"):
        gsy.collect(st, ctx, ident, expr, pose, q_id=np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"pose must be \[N, 5, 3\]"):
        gsy.collect(st, ctx, ident, expr, pose[:, :3], q_id=s["q_id"])
    with pytest.raises(ValueError, match="translation must be"):
        gsy.synshot_render(st, ctx, ident, expr, pose, s["trans"][:2], s["cams"], q_id=s["q_id"])
    with pytest.raises(ValueError, match=r"per frame \[N, C\]"):
        gsy.frame_cameras(camera.Camera(K=jnp.zeros((2, 3, 3, 3)), R=jnp.zeros((2, 3, 3, 3)), t=jnp.zeros((2, 3, 3)),
                                        width=W, height=H), N)
    with pytest.raises(ValueError, match="non-finite"):
        gsy.collect(st, ctx, ident, np.where(expr > 0, np.nan, expr), pose, q_id=s["q_id"])
    model, _, _ = gsy.distil_collected(s["collected"], 2)
    with pytest.raises(ValueError, match=r"attrs\['position'\] must be"):
        gsy.project(model, {a: s["collected"][a][:, :3] for a in gem.ATTRIBUTES})


@pytest.mark.slow
def test_run_distillation_of_an_inversion_run_folder(setup, tmp_path):
    """A SynShot inversion run folder (prior and inversion config.json, the checkpoint {state,
    q_id} as run_invert writes it, a subject dataset) -> gem.npz, metrics.json, renders.png."""
    from dhjax.data import dataset as ds
    from dhjax.train import checkpoint as ckpt_lib
    from dhjax.train import config as config_lib

    s = setup
    prior_cfg = config_lib.load_config("configs/synshot_prior.py:tiny")
    prior_cfg.model = tiny_model_config()
    config_lib.save_config(prior_cfg, str(tmp_path / "prior"))
    root = tmp_path / "data"
    writer = ds.Writer(root, "test")
    rs = np.random.RandomState(11)
    cams = s["cams"]
    for frame in range(2):
        for view in range(3):
            writer.add(dict(image=rs.uniform(size=(H, W, 3)).astype(np.float32), mask=np.ones((H, W), np.float32),
                            K=np.asarray(cams.K[view]), R=np.asarray(cams.R[view]), t=np.asarray(cams.t[view]),
                            shape=s["shape"], expression=s["expr"][frame], pose=s["pose"][frame],
                            translation=s["trans"][frame], item=0, frame=frame, view=view))
    writer.close()
    cfg = config_lib.load_config("configs/synshot_invert.py:tiny")
    cfg.prior_workdir = str(tmp_path / "prior")
    cfg.data.update(root=str(root), split="test", item=0, input_frame=0, input_views=(0, 1, 2))
    inv_dir = tmp_path / "inv"
    config_lib.save_config(cfg, str(inv_dir))
    params = s["state"]["params"]
    opt = synshot.make_optimizer(cfg.optim, inv.inversion_labels(params, 2)).init(params)
    ck = ckpt_lib.Checkpointer(str(inv_dir), keep=1)
    ck.save(0, {"state": dict(s["state"], opt_state=opt), "q_id": s["q_id"]}, {"prior_workdir": cfg.prior_workdir})
    ck.close()

    av = gsy.load_inverted_avatar(inv_dir)
    np.testing.assert_array_equal(av["q_id"], s["q_id"])
    np.testing.assert_array_equal(av["identity"]["shape"], s["shape"])
    assert len(av["inputs"]) == 3 and len(av["heldout"]) == 3
    out = tmp_path / "gem"
    metrics = gsy.run_distillation(inv_dir, out, n_frames=6, n_components=3, fit_steps=5, log=print)
    model = gem.load_eigenmodel(out / "gem.npz")
    assert model.n_components == 3 and model.n_gaussians == s["assets"].n_gaussians
    assert (out / "renders.png").exists() and (out / "metrics.json").exists()
    assert metrics["n_heldout_images"] == 3 and metrics["n_training_frames"] == 6
    for k in ("psnr_gem_projected_vs_synshot", "psnr_gem_fitted_vs_synshot", "psnr_synshot_vs_truth"):
        assert np.isfinite(metrics[k]) and metrics[k] > 5.0
    with pytest.raises(ValueError, match="synshot_invert"):
        gsy.load_inverted_avatar(tmp_path / "prior")
