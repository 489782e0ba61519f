"""GEM (dhjax.synthesis.gem, gem_data, gem_run): posing, distillation, eigenmodel rendering and
file, refinement invariants, fitting, the regressor, data errors and a small end-to-end run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import gem_common as gc

from dhjax.geometry import pca as pca_lib
from dhjax.geometry import rotations
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import splat
from dhjax.synthesis import gem
from dhjax.synthesis import gem_data


@pytest.fixture(scope="module")
def ctx():
    return gc.small_context()



def test_head_frame_is_the_rigid_part_of_the_pose(ctx):
    rng = np.random.default_rng(1)
    shape = np.random.default_rng(0).normal(size=10).astype(np.float32) * 0.5
    pose = (rng.normal(size=(5, 3)) * 0.3).astype(np.float32)
    expr = rng.normal(size=10).astype(np.float32)
    tr = np.array([0.02, -0.01, 0.05], np.float32)
    full = flame.forward(ctx.model, shape[None], expr[None], pose[None], tr[None]).vertices[0]
    head = gem.head_vertices(ctx, shape, expr, pose)
    R0, T = gem.head_rigid(ctx, shape, pose, tr)
    np.testing.assert_allclose(gem.head_to_world(head, R0, T), full, atol=1e-6)
    # Cameras moved into the head frame see head-frame points where world cameras see world points.
    cams = gc.cams()
    uv_w, _ = camera_lib.project(cams, full)
    uv_h, _ = camera_lib.project(gem.head_cameras(cams, R0, T), head)
    np.testing.assert_allclose(uv_h, uv_w, atol=1e-3)


def test_pose_gaussians_at_rest_and_under_rigid_motion(ctx):
    G = ctx.n_gaussians
    raw = jnp.zeros((G, gem.NET_OUT))
    rest = gem.pose_gaussians(ctx, raw, ctx.canon_verts)
    np.testing.assert_allclose(rest["position"], ctx.canon_position, atol=1e-6)
    np.testing.assert_allclose(rest["scale"], np.asarray(ctx.log_spacing)[:, None] + gem.INIT_LOG_SCALE, atol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(rest["rotation"]) * np.asarray(ctx.ref_quat), -1)), 1.0,
                               atol=1e-5)
    # A rigid motion with uniform scale s: positions move with it, rotations are composed with
    # it (same hemisphere as the reference), log-scales grow by log s.
    R = np.asarray(rotations.axis_angle_to_matrix(jnp.array([0.1, -0.3, 0.2])))
    s, t = 1.2, np.array([0.01, 0.02, -0.03], np.float32)
    verts = s * np.asarray(ctx.canon_verts) @ R.T + t
    rng = np.random.default_rng(2)
    raw = jnp.asarray(rng.normal(size=(G, gem.NET_OUT)) * 0.1, jnp.float32)
    a0 = gem.pose_gaussians(ctx, raw, ctx.canon_verts)
    a1 = gem.pose_gaussians(ctx, raw, jnp.asarray(verts, jnp.float32))
    np.testing.assert_allclose(a1["position"], s * np.asarray(a0["position"]) @ R.T + t, atol=2e-5)
    np.testing.assert_allclose(a1["scale"], np.asarray(a0["scale"]) + np.log(s), atol=1e-4)
    R0 = np.asarray(rotations.quaternion_to_matrix(a0["rotation"]))
    R1 = np.asarray(rotations.quaternion_to_matrix(a1["rotation"]))
    np.testing.assert_allclose(R1, R @ R0, atol=1e-4)
    assert np.all(np.sum(np.asarray(a1["rotation"]) * np.asarray(ctx.ref_quat), -1) >= 0)



def test_distil_reconstructs_training_attributes_and_k0_is_the_mean(ctx):
    rng = np.random.default_rng(3)
    data = gc.random_collected(ctx, 12, rng)
    sh = jnp.asarray(rng.normal(size=(ctx.n_gaussians, 4, 3)) * 0.1, jnp.float32)
    model, k, ratio = gem.distil(data, sh, 5, sh_degree=1)
    assert model.n_components == 5 and k["position"].shape == (12, 5)
    for a in gem.ATTRIBUTES:
        flat = data[a].reshape(12, -1)
        rec = np.asarray(model.mean[a]) + np.asarray(k[a]) @ np.asarray(model.basis[a])
        # 3 latent directions + small noise: 5 components leave only the noise's residual.
        p = pca_lib.fit(flat, 11)
        expected = float(np.sum(np.asarray(p.explained_variance)[5:])) * 11 / 12
        err = float(np.mean(np.sum((rec - flat) ** 2, 1)))
        assert err == pytest.approx(expected, rel=0.05, abs=1e-12)
        assert float(np.sum(ratio[a])) > 0.99
    # k = 0 renders the mean Gaussians exactly.
    cams = gc.cams()
    img = gem.render(model, gem.zero_coefficients(model), cams, backend="reference")
    mean = gem.unflatten_attributes(model.mean, ctx.n_gaussians)
    q = mean["rotation"] / jnp.linalg.norm(mean["rotation"], axis=-1, keepdims=True)
    ref = splat.rasterize(mean["position"], q, jnp.exp(mean["scale"]), jax.nn.sigmoid(mean["opacity"][:, 0]), sh, cams,
                          sh_degree=1, background=jnp.ones(3), backend="reference").image
    np.testing.assert_allclose(img, ref, atol=1e-6)
    assert float(jnp.std(img)) > 0.01      # something is in view


def test_reorthonormalise_keeps_renders_and_orthonormality(ctx):
    rng = np.random.default_rng(4)
    data = gc.random_collected(ctx, 10, rng)
    sh = jnp.zeros((ctx.n_gaussians, 4, 3))
    model, k, _ = gem.distil(data, sh, 4, sh_degree=1)
    # perturb the bases as a refinement would
    model = model._replace(basis={a: b + 0.05 * jnp.asarray(rng.normal(size=b.shape), jnp.float32) * jnp.std(b)
                                  for a, b in model.basis.items()})
    before = {a: np.asarray(k[a]) @ np.asarray(model.basis[a]) for a in gem.ATTRIBUTES}
    m2, k2 = gem.reorthonormalise(model, k)
    for a in gem.ATTRIBUTES:
        B = np.asarray(m2.basis[a])
        np.testing.assert_allclose(B @ B.T, np.eye(4), atol=2e-5)
        after = np.asarray(k2[a]) @ B
        np.testing.assert_allclose(after, before[a], atol=1e-5 * np.abs(before[a]).max() + 1e-9)
        np.testing.assert_allclose(np.asarray(m2.sigma[a]), np.std(np.asarray(k2[a]), 0, ddof=1), rtol=1e-4)


def test_eigenmodel_file_round_trip_and_errors(ctx, tmp_path):
    rng = np.random.default_rng(5)
    model, k, _ = gem.distil(gc.random_collected(ctx, 8, rng), jnp.zeros((ctx.n_gaussians, 4, 3)), 3, sh_degree=1)
    path = gem.save_eigenmodel(tmp_path / "g.npz", model)
    back = gem.load_eigenmodel(path)
    for a in gem.ATTRIBUTES:
        np.testing.assert_array_equal(back.mean[a], model.mean[a])
        np.testing.assert_array_equal(back.basis[a], model.basis[a])
        np.testing.assert_array_equal(back.sigma[a], model.sigma[a])
    assert back.sh_degree == 1 and back.background == model.background
    G, M = ctx.n_gaussians, 3
    assert gem.size_bytes(back) == 4 * (sum(G * d * (M + 1) + M for d in gem.ATTRIBUTE_DIMS.values()) + G * 4 * 3)
    with np.load(path) as z:
        arrays = {n: z[n] for n in z.files if n != "basis_scale"}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="missing arrays.*basis_scale"):
        gem.load_eigenmodel(tmp_path / "bad.npz")
    arrays["basis_scale"] = np.zeros((3, 5), np.float32)
    np.savez(tmp_path / "bad2.npz", **arrays)
    with pytest.raises(ValueError, match="basis_scale"):
        gem.load_eigenmodel(tmp_path / "bad2.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        gem.load_eigenmodel(tmp_path / "nope.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])    # a truncated copy
    with pytest.raises(ValueError, match=r"cut.npz' is unreadable \(a GEM eigenmodel\): BadZipFile"):
        gem.load_eigenmodel(tmp_path / "cut.npz")
    # coefficients of the wrong size or missing attributes
    k0 = gem.zero_coefficients(model)
    with pytest.raises(ValueError, match=r"'scale' must be \[\.\.\., 3\]"):
        gem.eigen_attributes(model, dict(k0, scale=jnp.zeros(5)))
    with pytest.raises(ValueError, match="lack.*opacity"):
        gem.eigen_attributes(model, {a: k0[a] for a in ("position", "rotation", "scale")})
    with pytest.raises(ValueError, match="cannot keep 4 of 3"):
        gem.truncate(model, 4)


def test_fit_coefficients_recovers_a_rendered_state(ctx):
    rng = np.random.default_rng(6)
    data = gc.random_collected(ctx, 10, rng)
    # make the variation visible: larger position modes
    data["position"] = data["position"] + np.einsum("n,gd->ngd", rng.normal(size=10), rng.normal(size=(ctx.n_gaussians, 3)) * 4e-3)
    sh = jnp.asarray(rng.normal(size=(ctx.n_gaussians, 4, 3)) * 0.3, jnp.float32)
    model, k, _ = gem.distil(data, sh, 3, sh_degree=1)
    cams = gc.cams(4)
    target_k = {a: k[a][1] for a in gem.ATTRIBUTES}
    images = gem.render(model, target_k, cams)
    start = gem.render(model, gem.zero_coefficients(model), cams)
    fit_k, m = gem.fit_coefficients(model, images, cams, steps=80, lr=0.05, prior_weight=0.0)
    fitted = gem.render(model, fit_k, cams)
    err0 = float(jnp.mean(jnp.abs(start - images)))
    err1 = float(jnp.mean(jnp.abs(fitted - images)))
    assert err1 < 0.3 * err0, (err0, err1)


def test_regressor_bounds_and_fit():
    rng = np.random.default_rng(7)
    n, F, M = 40, 12, 4
    feats = rng.normal(size=(n, F)).astype(np.float32)
    A = rng.normal(size=(F, M)) * 0.2
    sigma = {a: jnp.full((M,), 2.0) for a in gem.ATTRIBUTES}
    coeffs = {a: jnp.asarray((feats - feats[0]) @ A, jnp.float32) for a in gem.ATTRIBUTES}
    reg = gem.train_regressor(feats, coeffs, sigma, 0, steps=600, lr=3e-3, n_pca=8)
    assert reg.pca.components.shape == (8, F)
    pred = gem.regressor_apply(reg, feats)
    for a in gem.ATTRIBUTES:
        assert np.all(np.abs(np.asarray(pred[a])) <= 3.0 * 2.0 + 1e-6)
        resid = np.mean((np.asarray(pred[a]) - np.asarray(coeffs[a])) ** 2) / np.mean(np.asarray(coeffs[a]) ** 2)
        assert resid < 0.1
    # extreme features stay within +-3 sigma
    far = gem.regressor_apply(reg, feats[:1] * 1e3)
    assert all(np.all(np.abs(np.asarray(far[a])) <= 6.0 + 1e-6) for a in gem.ATTRIBUTES)
    with pytest.raises(ValueError, match="neutral_index 40"):
        gem.train_regressor(feats, coeffs, sigma, 40, steps=1)
    with pytest.raises(ValueError, match="finite"):
        gem.train_regressor(np.full((n, F), np.nan), coeffs, sigma, 0, steps=1)


def test_linear_regressor_equals_scikit_learns_leave_one_out_ridge(tmp_path):
    """The linear head is ridge regression on the whitened feature PCA with the leave-one-out
    ridge: with equal sigmas its loss is the plain mean squared error, which is RidgeCV's
    criterion, so both pick the same ridge and predict the same. It is clipped to +-3 sigma and
    survives the regressor file."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(11)
    n, F, M = 30, 12, 3
    feats = rng.normal(size=(n, F)).astype(np.float32)
    A = rng.normal(size=(F, M)) * 0.3
    sigma = {a: jnp.full((M,), 1.5) for a in gem.ATTRIBUTES}
    coeffs = {a: jnp.asarray((feats - feats[0]) @ A * (1 + i) * 0.3 + rng.normal(0, 0.3, (n, M)), jnp.float32)
              for i, a in enumerate(gem.ATTRIBUTES)}
    reg = gem.train_linear_regressor(feats, coeffs, sigma, 0, n_pca=8)
    assert gem.is_linear(reg)
    kappa = np.asarray(gem.regressor_features(reg, feats), np.float64)
    Y = np.concatenate([np.asarray(coeffs[a], np.float64) / 1.5 for a in gem.ATTRIBUTES], 1)
    peer = linear_model.RidgeCV(alphas=gem.RIDGE_GRID, fit_intercept=True).fit(kappa, Y)
    assert gem.RIDGE_GRID[0] < peer.alpha_ < gem.RIDGE_GRID[-1]     # an interior choice: the test can tell
    pred = gem.regressor_apply(reg, feats)
    ours = np.concatenate([np.asarray(pred[a]) / 1.5 for a in gem.ATTRIBUTES], 1)
    np.testing.assert_allclose(ours, np.clip(peer.predict(kappa), -3, 3), atol=2e-4)
    far = gem.regressor_apply(reg, feats[:1] * 1e3)
    assert all(np.all(np.abs(np.asarray(far[a])) <= 4.5 + 1e-6) for a in gem.ATTRIBUTES)
    back, driver = gem.load_regressor(gem.save_regressor(tmp_path / "r.npz", reg, "params"))
    assert driver == "params" and gem.is_linear(back)
    again = gem.regressor_apply(back, feats)
    for a in gem.ATTRIBUTES:
        np.testing.assert_allclose(np.asarray(again[a]), np.asarray(pred[a]), atol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        gem.train_linear_regressor(np.full((n, F), np.inf), coeffs, sigma, 0)


def test_landmark_features_ignore_image_similarities_and_see_gaze_through_the_iris():
    """The landmark driver's features do not change when the image points move by a similarity
    (position, scale, in-plane rotation); a change of gaze moves only the iris part of them,
    and without the iris points (regressor.landmark_iris=False) it is invisible. Real landmarks
    without iris points are refused for an iris-trained regressor."""
    import synthetic_common as sc
    from dhjax.capture import landmarks as lmk_lib
    from dhjax.data import synthetic
    from dhjax.synthesis import gem_run

    model = synthetic.base_model(sc.tiny_assets())
    R, t = camera_lib.look_at(np.array([0.0, 0.0, 0.6]), np.zeros(3))
    K = np.array([[200.0, 0, 64], [0, 200, 64], [0, 0, 1]], np.float32)
    pose = np.zeros((2, 5, 3), np.float32)
    pose[1, 3:, 1] = 0.3                           # both eyes turned by 0.3 rad
    args = (np.zeros(model.shapedirs.shape[0], np.float32), np.zeros((2, 10), np.float32), pose,
            np.zeros((2, 3), np.float32), np.repeat(K[None], 2, 0), np.repeat(np.asarray(R)[None], 2, 0),
            np.repeat(np.asarray(t)[None], 2, 0), 128, 128)
    lm = gem_run.project_landmarks(model, *args, iris=True)
    assert lm.shape == (2, 61, 2)
    np.testing.assert_allclose(gem_run.project_landmarks(model, *args)[:, :51], lm[:, :51], atol=1e-4)
    f = gem_run.landmark_features(lm, lm[0])
    c, sn = np.cos(0.4), np.sin(0.4)
    moved = 1.7 * lm @ np.array([[c, -sn], [sn, c]]).T + np.array([13.0, -5.0])
    np.testing.assert_allclose(gem_run.landmark_features(moved, lm[0]), f, atol=1e-4)
    gaze = np.abs(f[1] - f[0]).reshape(61, 2).max(1)
    assert gaze[51:].min() > 0.02 and gaze[:51].max() < 1e-4, gaze    # iris: ~5% of the face size
    plain = gem_run.landmark_features(lm[:, :51], lm[0, :51])
    np.testing.assert_allclose(plain[1], plain[0], atol=1e-4)
    lms = [lmk_lib.Landmarks(points=np.concatenate([np.zeros((17, 2)), p[:51]]).astype(np.float32),
                             ibug_ids=np.arange(68), source="file", iris=p[51:].astype(np.float32)) for p in lm]
    np.testing.assert_allclose(gem_run.inner_landmarks(lms, iris=True), lm, atol=1e-5)
    no_iris = [lmk_lib.Landmarks(points=x.points, ibug_ids=x.ibug_ids, source="file") for x in lms]
    with pytest.raises(ValueError, match="frame 0 have no iris points"):
        gem_run.inner_landmarks(no_iris, iris=True)


def test_net_step_lowers_the_loss(ctx):
    ctx = ctx.replace(color_lr=0.05, lr=2e-3)
    rng = np.random.default_rng(8)
    shape = np.random.default_rng(0).normal(size=10).astype(np.float32) * 0.5
    fr = dict(shape=shape, expression=(rng.normal(size=10) * 0.5).astype(np.float32),
              pose=np.zeros((5, 3), np.float32), translation=np.zeros(3, np.float32))
    cams = gc.cams(2)
    state = gem.init_state(jax.random.PRNGKey(0), ctx)
    # the target: the template Gaussians in another colour
    target = jnp.asarray(np.broadcast_to(np.array([0.8, 0.3, 0.2], np.float32), (2, 48, 40, 3)))
    mask = np.asarray(gem.render_net(ctx, state["params"], fr, cams, background=jnp.zeros(3)).mean(-1) > 0.05, np.float32)
    batch = dict(fr, image=target, mask=mask, K=cams.K, R=cams.R, t=cams.t, background=np.ones(3, np.float32))
    batch = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)
    step = jax.jit(lambda s, b: gem.train_step(s, b, None, ctx))
    losses = []
    for _ in range(25):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def test_lpips_enters_the_net_and_refinement_losses(ctx):
    """With an LPIPS distance (weights given), stages A and C add loss.lpips_weight x LPIPS (the
    thesis's zeta VGG term); without one, or at weight 0, the losses are the photometric ones."""
    from dhjax.nn import lpips

    rng = np.random.default_rng(8)
    fr = dict(shape=np.random.default_rng(0).normal(size=10).astype(np.float32) * 0.5,
              expression=(rng.normal(size=10) * 0.5).astype(np.float32),
              pose=np.zeros((5, 3), np.float32), translation=np.zeros(3, np.float32))
    cams = gc.cams(2)
    state = gem.init_state(jax.random.PRNGKey(0), ctx)
    target = jnp.asarray(rng.uniform(0, 1, (2, 48, 40, 3)), jnp.float32)
    batch = dict(fr, image=target, mask=np.ones((2, 48, 40), np.float32), K=cams.K, R=cams.R, t=cams.t,
                 background=np.ones(3, np.float32))
    dist = lpips.make_lpips(lpips.init_params(jax.random.PRNGKey(1)))
    plain, m0 = gem.loss_terms(state["params"], batch, ctx)
    assert "lpips" not in m0
    with_lp, m1 = gem.loss_terms(state["params"], batch, ctx.replace(lpips_fn=dist, lpips_weight=0.3))
    assert float(m1["lpips"]) > 0
    np.testing.assert_allclose(float(with_lp), float(plain) + 0.3 * float(m1["lpips"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["photo"]), float(m0["photo"]) + 0.3 * float(m1["lpips"]), rtol=1e-5)
    off, m2 = gem.loss_terms(state["params"], batch, ctx.replace(lpips_fn=dist, lpips_weight=0.0))
    assert float(off) == float(plain) and "lpips" not in m2
    # it is differentiated through in a training step (jitted: op-by-op it takes 4x longer)
    b1 = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)
    lp_ctx = ctx.replace(lpips_fn=dist, lpips_weight=0.3)
    _, m = jax.jit(lambda s, b: gem.train_step(s, b, None, lp_ctx))(state, b1)
    assert np.isfinite(float(m["loss"])) and float(m["lpips"]) > 0
    # stage C: the eigenmodel's refinement loss
    data = gc.random_collected(ctx, 6, np.random.default_rng(4))
    model, k, _ = gem.distil(data, jnp.zeros((ctx.n_gaussians, 4, 3)), 3, sh_degree=1)
    k0 = {a: k[a][0] for a in gem.ATTRIBUTES}
    args = (gem.refine_params(model), model, k0, target, cams, jnp.ones(3), 0.2)
    r0, n0 = gem.refine_loss(*args)
    r1, n1 = gem.refine_loss(*args, lpips_fn=dist, lpips_weight=0.3)
    assert "lpips" not in n0
    np.testing.assert_allclose(float(r1), float(r0) + 0.3 * float(n1["lpips"]), rtol=1e-5)


def _capture(F=5, C=3, H=8, W=6):
    rng = np.random.default_rng(0)
    return gem_data.Capture(
        images=rng.integers(0, 255, (F, C, H, W, 3), dtype=np.uint8), masks=np.ones((F, C, H, W), bool),
        K=np.tile(np.eye(3, dtype=np.float32), (F, C, 1, 1)), R=np.tile(np.eye(3, dtype=np.float32), (F, C, 1, 1)),
        t=np.zeros((F, C, 3), np.float32), shape=np.zeros(4, np.float32), expression=np.zeros((F, 6), np.float32),
        pose=np.zeros((F, 5, 3), np.float32), translation=np.zeros((F, 3), np.float32),
        frame=np.arange(F, dtype=np.int32), view=np.array([0, 4, 7], np.int32)[:C])


def test_split_and_batches():
    cap = _capture()
    sp = gem_data.split(cap, (4,), 2)
    assert list(sp.train_frames) == [0, 1, 2] and list(sp.test_frames) == [3, 4]
    assert list(sp.train_views) == [0, 2] and list(sp.test_views) == [1]
    assert list(gem_data.split(cap, (4,), 0.4).test_frames) == [3, 4]
    with pytest.raises(ValueError, match=r"held-out cameras \[5\] are not among.*\[0, 4, 7\]"):
        gem_data.split(cap, (5,), 1)
    with pytest.raises(ValueError, match="cannot hold out 4 of 5 frames"):
        gem_data.split(cap, (4,), 4)
    for bad in (1.5, -1, -0.5):          # neither a count nor a fraction: not read as int(1.5) = 1
        with pytest.raises(ValueError, match=f"test_frames must be a count of frames or a fraction in \\(0, 1\\), "
                                             f"got {bad}"):
            gem_data.split(cap, (4,), bad)
    with pytest.raises(ValueError, match="every camera is held out"):
        gem_data.split(cap, (0, 4, 7), 1)
    b = gem_data.FrameBatches(cap, sp, frames_per_step=2, views_per_step=5, seed=1)
    x = b.get_batch(3)
    assert x["image"].shape == (2, 2, 8, 6, 3) and x["background"].shape == (2, 3)
    assert set(np.unique(x["index"])) <= {0, 1, 2}
    np.testing.assert_array_equal(b.get_batch(3)["image"], x["image"])    # deterministic


def test_load_capture_errors(tmp_path):
    from dhjax.data import dataset as ds

    def sample(frame, view, H=8, W=6):
        return dict(image=np.zeros((H, W, 3), np.float32), mask=np.ones((H, W), np.float32),
                    K=np.eye(3, dtype=np.float32), R=np.eye(3, dtype=np.float32), t=np.zeros(3, np.float32),
                    shape=np.zeros(4, np.float32), expression=np.zeros(6, np.float32),
                    pose=np.zeros((5, 3), np.float32), translation=np.zeros(3, np.float32),
                    item=np.int32(0), frame=np.int32(frame), view=np.int32(view))

    w = ds.Writer(tmp_path / "one", "train", kind="multiview")
    w.add(sample(0, 0)), w.add(sample(0, 1))
    w.close()
    with pytest.raises(ValueError, match="1 frame"):
        gem_data.load_capture(tmp_path / "one", log=lambda *a: None)
    w = ds.Writer(tmp_path / "mixed", "train", kind="multiview")
    w.add(sample(0, 0)), w.add(sample(0, 1)), w.add(sample(1, 0))
    w.close()
    with pytest.raises(ValueError, match="cameras .* differ from the first frame"):
        gem_data.load_capture(tmp_path / "mixed", log=lambda *a: None)
    with pytest.raises(FileNotFoundError):
        gem_data.load_capture(tmp_path / "absent", log=lambda *a: None)
    w = ds.Writer(tmp_path / "ok", "train", kind="multiview")
    for f in range(3):
        for v in range(2):
            w.add(sample(f, v))
    w.close()
    cap = gem_data.load_capture(tmp_path / "ok", log=lambda *a: None)
    assert cap.images.shape == (3, 2, 8, 6, 3) and cap.images.dtype == np.uint8


def test_per_frame_table_counts_frames_above_the_reference():
    from dhjax.synthesis import gem_run

    per = {"net": [{"psnr": 20.0}, {"psnr": 21.0}, {"psnr": 19.0}],
           "GEM (fit)": [{"psnr": 20.5}, {"psnr": 21.0}, {"psnr": 18.0}],
           "GEM (regressor)": [{"psnr": 22.0}, {"psnr": 23.0}, {"psnr": 19.5}]}
    md = gem_run.per_frame_table("T", [60, 61, 62], per).splitlines()
    assert md[0] == "### T"
    assert md[2] == "| method | frame 60 | frame 61 | frame 62 | mean | frames above net |"
    assert md[4] == "| net | 20.00 | 21.00 | 19.00 | 20.00 |  |"
    assert md[5] == "| GEM (fit) | 20.50 | 21.00 | 18.00 | 19.83 | 1/3 |"    # a tie is not above
    assert md[6] == "| GEM (regressor) | 22.00 | 23.00 | 19.50 | 21.50 | 3/3 |"


def _micro_config(tmp_path):
    from dhjax.train import config as config_lib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = config_lib.load_config(f"{root / 'configs' / 'gem.py'}:tiny")
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.synthetic.multiview.update(n_expressions=8, width=32, height=40, n_frontal=4, n_upper=1)
    cfg.data.update(test_views=(1,), test_frames=2)
    cfg.model.update(map_size=16, widths=(8, 8, 8), style_dim=4)
    cfg.train.update(steps=4, log_every=2, checkpoint_every=2, eval_every=2)
    cfg.gem.update(n_components=4, table_components=(2, 4))
    cfg.refine.update(qr_every=2, views_per_step=2)
    cfg.refine.train.update(steps=4, log_every=2, checkpoint_every=2)
    cfg.fit.update(steps=3, views=2)
    cfg.regressor.update(steps=10, kinds=("mlp", "linear"))
    cfg.eval.update(max_novel_view_frames=2, fps_repeats=1, cross_frames=2)
    return cfg


@pytest.mark.parametrize("field, value, match", [
    ("model.map_size", 0, "config field model.map_size must be an integer >= 1"),
    ("gem.table_components", (10, 20, 80), r"config field gem.table_components must hold sizes in \[1, "),
    ("refine.qr_every", 0, "config field refine.qr_every must be"),
    ("eval.lpips_path", "/nonexistent/lpips.npz", "config field eval.lpips_path: "),
])
def test_a_gem_config_that_cannot_work_is_refused_before_any_work(tmp_path, field, value, match):
    from pathlib import Path

    from dhjax.synthesis import gem_run
    from dhjax.train import config as config_lib

    root = Path(__file__).resolve().parents[1]
    cfg = config_lib.apply_overrides(config_lib.load_config(f"{root / 'configs' / 'gem.py'}:tiny"), {field: value})
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        gem_run.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_drive_checks_fps_and_frame_count_before_any_work(tmp_path):
    from dhjax.synthesis import gem_run

    for kw, match in ((dict(fps=float("nan")), "--fps must be a frame rate > 0, got nan"),
                      (dict(fps=0), "--fps must be a frame rate > 0, got 0"),
                      (dict(max_frames=-3), "--max_frames must be >= 0")):
        with pytest.raises(ValueError, match=match):
            gem_run.drive(str(tmp_path / "run"), str(tmp_path / "out"), source=str(tmp_path), log=lambda *a: None, **kw)
    assert not (tmp_path / "out").exists()


# slow (~100 s): colabs/06_gem (tests/test_colabs.py, default suite) runs gem_run.run and its
# driving on a shortened tiny variant; this test adds every output, the resume and the commands.
@pytest.mark.slow
def test_run_end_to_end_and_drive(tmp_path):
    from dhjax.synthesis import gem_run

    cfg = _micro_config(tmp_path)
    work = tmp_path / "run"
    res = gem_run.run(cfg, str(work))
    for name in ("gem.npz", "distilled.npz", "gem_2.npz", "gem_4.npz", "metrics.json", "tables.md", "comparison.png",
                 "novel_view.mp4", "novel_expression.mp4", "cross_reenactment.mp4", "regressor_params.npz",
                 "regressor_landmarks.npz", "regressor_params_linear.npz", "regressor_landmarks_linear.npz",
                 "drive_camera.npz"):
        assert (work / name).is_file(), name
    assert list(work.glob("frame_*.ply"))
    saved = json.loads((work / "metrics.json").read_text())
    assert saved["stage_b"]["components"] == 4 and saved["stage_a"]["train_seconds"] > 0
    for table in ("novel_view", "training_views"):
        for name in ("net", "GEM", "GEM refined"):
            assert np.isfinite(saved[table][name]["psnr"])
    ne = saved["novel_expression"]
    assert {"net", "GEM (fit)", "GEM refined (fit)", "GEM refined (regressor: params)",
            "GEM refined (regressor: landmarks)", "GEM refined (regressor: params_linear)"} <= set(ne)
    per = saved["novel_expression_per_frame"]
    assert len(per["frames"]) == 2 and set(per) == {"frames", *ne}
    for name in ne:                        # the per-frame values average to the table's means
        np.testing.assert_allclose(np.mean([m["psnr"] for m in per[name]]), ne[name]["held-out cameras"]["psnr"],
                                   rtol=1e-6)
    assert "Novel expression per held-out frame" in (work / "tables.md").read_text()
    assert [r["components"] for r in saved["size_table"]] == ["-", 2, 4]
    assert saved["local_pca"]["n_regions"] >= 1
    model = gem.load_eigenmodel(work / "gem.npz")
    assert model.n_components == 4
    for a in gem.ATTRIBUTES:             # saved bases are orthonormal after the refinement
        B = np.asarray(model.basis[a])
        np.testing.assert_allclose(B @ B.T, np.eye(4), atol=1e-4)
    # Driving: the run's own dataset as the source sequence (params driver).
    src = next((tmp_path / "cache").glob("gem-*"))
    video = gem_run.drive(str(work), str(tmp_path / "drive"), source=str(src), max_frames=3, ply_frames=[2],
                          log=lambda *a: None)
    assert video.is_file()
    with np.load(tmp_path / "drive" / "coefficients.npz") as z:
        assert z["position"].shape == (3, 4)
        k2 = {a: jnp.asarray(z[a][2]) for a in gem.ATTRIBUTES}
    # The PLY of a driven frame holds that frame's Gaussians (head frame), as gem.eigen_attributes gives them.
    from dhjax.io.gaussians import load_gaussians_ply

    ply = load_gaussians_ply(tmp_path / "drive" / "frame_0002.ply")
    np.testing.assert_allclose(ply["means"], np.asarray(gem.eigen_attributes(model, k2)["position"]), atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "drive").glob("*.ply")) == ["frame_0002.ply"]
    with pytest.raises(ValueError, match=r"ply frames \[5\] outside the source's 3 frames"):
        gem_run.drive(str(work), str(tmp_path / "drive3"), source=str(src), max_frames=3, ply_frames=[5],
                      log=lambda *a: None)
    video = gem_run.drive(str(work), str(tmp_path / "drive_linear"), source=str(src), max_frames=3, kind="linear",
                          log=lambda *a: None)
    assert video.is_file()
    (work / "regressor_params_linear.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"no 'linear' regressor .* the run has \['mlp'\]"):
        gem_run.drive(str(work), str(tmp_path / "drive_linear2"), source=str(src), kind="linear", log=lambda *a: None)
    with pytest.raises(ValueError, match="exactly one of --source .* or --landmarks"):
        gem_run.drive(str(work), str(tmp_path / "drive2"), log=lambda *a: None)
    for kw, match in ((dict(fps=float("nan")), "--fps must be a frame rate > 0, got nan"),
                      (dict(max_frames=-3), "--max_frames must be >= 0")):
        with pytest.raises(ValueError, match=match):
            gem_run.drive(str(work), str(tmp_path / "drive4"), source=str(src), log=lambda *a: None, **kw)
    with pytest.raises(FileNotFoundError, match="no GEM eigenmodel"):
        gem_run.drive(str(tmp_path / "nothing"), str(tmp_path / "d3"), source=str(src), log=lambda *a: None)
