"""D3GA's method functions (dhjax.synthesis.d3ga): cage embedding, Neo-Hookean term, garment
loss, a training step, data parallelism and input errors, on a small synthetic cage."""

import functools
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import isosurface as iso
from dhjax.geometry import tetra
from dhjax.models import body_default as bd
from dhjax.render import camera as camera_lib
from dhjax.synthesis import d3ga
import harness_common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = H = 48


def _part(name="body", layer=1, driver="pose", G=120, seed=0, offset=(0.0, 0.0, 0.0)):
    shape = (3, 4, 3)
    nodes = iso.lattice_nodes(shape, np.asarray((-0.2, -0.3, -0.2)) + offset, 0.2)
    tets = iso.cube_tets(iso.all_cells(shape), shape)
    rng = np.random.default_rng(seed)
    w = np.zeros((len(nodes), 55))
    w[:, 0] = 0.5
    w[:, bd.J["spine1"]] = 0.5
    return dict(name=name, layer=layer, driver=driver, rest_nodes=nodes, tets=tets,
                rest_inv=np.asarray(tetra.rest_inverse(nodes, tets)), node_weights=w,
                gauss_tet=rng.integers(0, len(tets), G), gauss_bary=rng.dirichlet(np.ones(4), G),
                gauss_log_scale=np.full((G, 3), np.log(0.04)), gauss_quat=np.tile([1.0, 0, 0, 0], (G, 1)))


def _context(parts=None, **kw):
    parts = [_part(), _part("upper", 2, seed=1, offset=(0.05, 0.1, 0.05))] if parts is None else parts
    return d3ga.make_context(parts, bd._rest_joints()[0], bd.PARENTS, n_frames=3, **kw)


def _batch(seed=0, views=1):
    cams = camera_lib.rig_from_angles(np.linspace(0, 40, views), np.zeros(views), 2.0, (0, 0, 0), 45, W, H)
    rng = np.random.default_rng(seed)
    return dict(image=rng.uniform(size=(views, H, W, 3)).astype(np.float32),
                layers=rng.integers(0, 4, (views, H, W)).astype(np.int32),
                K=np.asarray(cams.K), R=np.asarray(cams.R), t=np.asarray(cams.t),
                pose=(0.2 * rng.normal(size=(55, 3))).astype(np.float32),
                translation=(0.05 * rng.normal(size=3)).astype(np.float32),
                keypoints=rng.normal(size=(106, 3)).astype(np.float32),
                background=rng.uniform(size=3).astype(np.float32), index=np.int32(seed % 3))


def test_gaussians_follow_an_affine_cage_exactly():
    p = _part(G=50)
    rng = np.random.default_rng(3)
    A = np.eye(3) + 0.3 * rng.normal(size=(3, 3))
    t = rng.normal(size=3)
    rest, tets = jnp.asarray(p["rest_nodes"], jnp.float32), jnp.asarray(p["tets"], jnp.int32)
    posed = rest @ jnp.asarray(A.T, jnp.float32) + jnp.asarray(t, jnp.float32)
    J = tetra.deformation_gradients(rest, posed, tets)
    q = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)
    ls = jnp.asarray(np.log(rng.uniform(0.01, 0.05, (50, 3))), jnp.float32)
    bary = jnp.asarray(p["gauss_bary"], jnp.float32)
    cell = jnp.asarray(p["gauss_tet"], jnp.int32)
    means, cov = d3ga.embedded_gaussians(posed, tets, J, cell, bary, ls, q)
    rest_means, rest_cov = d3ga.embedded_gaussians(rest, tets, jnp.broadcast_to(jnp.eye(3), J.shape), cell, bary, ls, q)
    np.testing.assert_allclose(means, np.asarray(rest_means) @ A.T + t, atol=2e-5)
    np.testing.assert_allclose(cov, np.einsum("ij,gjk,lk->gil", A, rest_cov, A), rtol=2e-4, atol=1e-9)
    # Sigma = R S^2 R^T from the quaternion and log-scales.
    R = np.asarray(d3ga._quat_rot(q))
    np.testing.assert_allclose(rest_cov, np.einsum("gij,gj,gkj->gik", R, np.exp(2 * np.asarray(ls)), R), rtol=1e-5,
                               atol=1e-10)


def test_neo_hookean_zero_at_rest_and_its_gradient():
    lam, mu = 10.0, 1.0
    f = lambda J: tetra.neo_hookean_energy(J, lam, mu)
    assert float(f(jnp.broadcast_to(jnp.eye(3), (5, 3, 3)))) == pytest.approx(0.0, abs=1e-6)
    J = jnp.asarray(np.eye(3) + 0.2 * np.random.default_rng(0).normal(size=(7, 3, 3)), jnp.float32)
    # d/dJ [lam/2 (det J - 1)^2 + mu/2 (|J|^2 - 3)] = lam (det J - 1) det J J^-T + mu J, averaged.
    det = np.linalg.det(np.asarray(J, np.float64))
    analytic = (lam * (det - 1) * det)[:, None, None] * np.linalg.inv(np.asarray(J, np.float64)).transpose(0, 2, 1) \
        + mu * np.asarray(J, np.float64)
    np.testing.assert_allclose(jax.grad(f)(J), analytic / 7, rtol=2e-4, atol=1e-6)


def test_garment_loss_targets():
    lab = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(np.asarray(d3ga.layer_targets(lab)),
                                  [[[0, 0, 0], [1, 0, 0]], [[0, 1, 0], [0, 0, 1]]])


def test_render_and_one_step_reduce_the_loss():
    ctx = _context()
    state = d3ga.init_state(jax.random.PRNGKey(0), ctx)
    b = jax.tree.map(lambda x: np.asarray(x)[None], _batch())
    out = d3ga.render(state["params"], ctx, _batch(), camera_lib.Camera(*(jnp.asarray(_batch()[k]) for k in "KRt"), W, H),
                      _batch()["background"])
    assert out["image"].shape == (1, H, W, 3) and out["layers"].shape == (1, H, W, 3)
    # A render sees both layers, each in its own colour channel.
    assert float(out["layers"][..., 0].max()) > 0.3 and float(out["layers"][..., 1].max()) > 0.3
    step = jax.jit(functools.partial(d3ga.train_step, ctx=ctx, key=None))
    losses_ = []
    for _ in range(8):
        state, m = step(state, b)
        losses_.append(float(m["loss"]))
    assert np.isfinite(losses_).all() and losses_[-1] < losses_[0]
    # At initialisation the MLP corrections are zero: Gaussians sit at their barycentric rest
    # positions, skinned (the avatar's means equal the skinned embedding).
    st0 = d3ga.init_state(jax.random.PRNGKey(0), ctx)
    av = d3ga.posed_avatar(st0["params"], ctx, _batch())
    _, rel = d3ga.joint_transforms(ctx, _batch()["pose"])
    p = ctx.parts[0]
    posed = d3ga._skin(p.rest_nodes, p.node_weights, rel) + _batch()["translation"]
    exp = jnp.einsum("gk,gkc->gc", p.bary / p.bary.sum(-1, keepdims=True), posed[p.cells[p.gauss_cell]])
    np.testing.assert_allclose(av["means"][:p.n_gaussians], exp, atol=1e-5)
    size = d3ga.size_table(st0["params"])
    assert size["parameters"] == sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(st0["params"]))


def test_face_part_and_triangle_ablation():
    face = _part("face", 1, "face", G=40, seed=5)
    ctx = _context([_part(), face], face_mean=np.zeros((51, 3)), face_std=np.ones((51, 3)))
    st = d3ga.init_state(jax.random.PRNGKey(1), ctx)
    b = _batch(1)
    c1 = d3ga.posed_avatar(st["params"], ctx, b)["conds"][1]
    b2 = dict(b, keypoints=b["keypoints"] + np.concatenate([np.zeros((55, 3)), np.full((51, 3), 0.3)]).astype(np.float32))
    assert np.abs(np.asarray(c1) - np.asarray(d3ga.posed_avatar(st["params"], ctx, b2)["conds"][1])).max() > 1e-3
    with pytest.raises(ValueError, match="face_mean"):
        _context([_part(), face])
    # Triangles: the same Gaussians on a surface (rest_inv unused, no Neo-Hookean term).
    tri = dict(_part(), surf_vertices=np.array([[0, 0, 0], [0.3, 0, 0], [0, 0.3, 0], [0, 0, 0.3]]),
               surf_faces=np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]]),
               surf_weights=np.tile(np.eye(55)[0], (4, 1)), gauss_face=np.zeros(120, int),
               gauss_face_bary=np.full((120, 3), 1 / 3))
    mc = d3ga.default_model_config()
    mc.geometry = "triangles"
    ctx_t = d3ga.make_context([tri], bd._rest_joints()[0], bd.PARENTS, n_frames=3, model_cfg=mc)
    st = d3ga.init_state(jax.random.PRNGKey(0), ctx_t)
    total, m = d3ga.loss_terms(st["params"], _batch(), ctx_t)
    assert np.isfinite(float(total)) and float(m["neo"]) == 0.0


def test_single_layer_gaussians_keep_their_surface_labels():
    """The single-layer ablation: one part whose Gaussians carry per-Gaussian layer labels
    (gauss_layer), which the layer render and so the garment loss use."""
    part = _part(G=90)
    part["gauss_layer"] = np.repeat(np.array([1, 2, 3], np.int32), 30)
    ctx = _context([part])
    st = d3ga.init_state(jax.random.PRNGKey(0), ctx)
    av = d3ga.posed_avatar(st["params"], ctx, _batch())
    np.testing.assert_array_equal(np.asarray(av["layer"]), part["gauss_layer"])
    out = d3ga.render(st["params"], ctx, _batch(), camera_lib.Camera(*(jnp.asarray(_batch()[k]) for k in "KRt"), W, H),
                      _batch()["background"])
    lay = np.asarray(out["layers"])
    assert min(float(lay[..., c].max()) for c in range(3)) > 0.2     # all three layer colours appear
    # Without labels every Gaussian takes its part's layer.
    ctx1 = _context([_part(G=90)])
    assert set(np.unique(np.asarray(d3ga.posed_avatar(st["params"], ctx1, _batch())["layer"]))) == {1}
    with pytest.raises(ValueError, match="gauss_layer"):
        _context([dict(part, gauss_layer=np.zeros(90, np.int32))])


def test_bad_inputs():
    b = _batch()
    d3ga.check_batch(b)
    with pytest.raises(ValueError, match="layer segmentation"):
        d3ga.check_batch({k: v for k, v in b.items() if k != "layers"})
    with pytest.raises(ValueError, match="55, 3"):
        d3ga.check_batch(dict(b, pose=np.zeros((5, 3))))
    with pytest.raises(ValueError, match="geometry"):
        mc = d3ga.default_model_config()
        mc.geometry = "points"
        _context(model_cfg=mc)


_WORKER = r"""
import functools, pickle, sys
import jax, numpy as np
from dhjax.synthesis import d3ga
from dhjax.train import loop
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == n, (jax.device_count(), n)
with open(src, "rb") as f:
    d = pickle.load(f)
ctx = d3ga.make_context(d["parts"], d["rest_joints"], d["parents"], n_frames=3)
mesh = loop.data_mesh()
batch = loop.shard_batch(d["batch"], mesh)
state, metrics = jax.jit(functools.partial(d3ga.train_step, ctx=ctx, key=None))(d["state"], batch)
grads = jax.jit(jax.grad(lambda p, b: d3ga.batch_loss(p, b, ctx)[0]))(d["state"]["params"], batch)
out = {}
for prefix, tree in (("params", state["params"]), ("grads", grads), ("metrics", metrics)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
np.savez(dst, **out)
"""


def test_one_step_on_four_devices_equals_one(tmp_path):
    parts = [_part(G=60), _part("upper", 2, G=60, seed=1)]
    ctx = _context(parts)
    state = jax.device_get(d3ga.init_state(jax.random.PRNGKey(2), ctx))
    rows = [_batch(s) for s in range(4)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    src = tmp_path / "in.pkl"
    with open(src, "wb") as f:
        pickle.dump(dict(parts=parts, rest_joints=bd._rest_joints()[0], parents=bd.PARENTS, state=state, batch=batch), f)
    outs = {}
    for n in (1, 4):
        env = dict(os.environ, XLA_FLAGS=harness_common.xla_flags(n),
                   PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run([sys.executable, "-c", _WORKER, str(src), str(tmp_path / f"o{n}.npz"), str(n)],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        with np.load(tmp_path / f"o{n}.npz") as z:
            outs[n] = dict(z)
    one, four = outs[1], outs[4]
    assert one.keys() == four.keys()
    grads = {k: v for k, v in one.items() if k.startswith("grads")}
    scale = max(np.abs(v).max() for v in grads.values())
    assert scale > 0
    for k in grads:      # the batch's mean gradient, whether its 4 frames sit on 1 or 4 devices
        np.testing.assert_allclose(four[k], one[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
    for k in (k for k in one if k.startswith("metrics")):
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, err_msg=k)
    # Adam's first step is lr * g / (|g| + eps): compare the parameters where |g| is well above
    # round-off (elsewhere its sign is noise), i.e. every element with |g| > 1e-3 of the largest.
    for k in (k for k in one if k.startswith("params")):
        g = np.abs(one["grads" + k[len("params"):]])
        ok = g > 1e-3 * scale
        np.testing.assert_allclose(four[k][ok], one[k][ok], rtol=1e-5, atol=1e-7, err_msg=k)


def _simplex_projection_by_faces(y):
    """Independent oracle: the nearest point of the simplex to y [K] (float64), found by trying
    every face (support S): on its affine hull x_S = y_S - (sum y_S - 1) / |S|, kept if x_S >= 0."""
    K = len(y)
    best, best_d = None, np.inf
    for mask in range(1, 2 ** K):
        S = [k for k in range(K) if mask >> k & 1]
        x = np.zeros(K)
        x[S] = y[S] - (y[S].sum() - 1.0) / len(S)
        if (x[S] >= 0).all() and np.sum((x - y) ** 2) < best_d:
            best, best_d = x, np.sum((x - y) ** 2)
    return best


@pytest.mark.parametrize("K", (3, 4))
def test_simplex_projection_against_a_face_by_face_search(K):
    rng = np.random.default_rng(K)
    y = np.concatenate([rng.normal(0.3, 0.6, (300, K)), rng.dirichlet(np.ones(K), 50)]).astype(np.float32)
    x = np.asarray(d3ga.simplex_projection(jnp.asarray(y)))
    oracle = np.stack([_simplex_projection_by_faces(r.astype(np.float64)) for r in y])
    np.testing.assert_allclose(x, oracle, atol=2e-6)
    assert (x >= 0).all() and np.allclose(x.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(x[300:], y[300:], atol=1e-6)          # inside: unchanged
    assert (oracle[:300] == 0).any(1).mean() > 0.3                    # many rows were outside
    # Jacobian on the support S of the projection: I - 1 1^T / |S| there, 0 elsewhere.
    jac = np.asarray(jax.vmap(jax.jacobian(d3ga.simplex_projection))(jnp.asarray(y[:40])))
    for r in range(40):
        S = oracle[r] > 1e-4
        expect = np.where(S[:, None] & S[None, :], np.eye(K) - 1.0 / S.sum(), 0.0)
        np.testing.assert_allclose(jac[r], expect, atol=1e-5)


def test_simplex_bary_domain_keeps_gaussians_in_their_tetrahedra():
    p = _part(G=200)
    rng = np.random.default_rng(5)
    rest, tets = jnp.asarray(p["rest_nodes"], jnp.float32), jnp.asarray(p["tets"], jnp.int32)
    J = jnp.broadcast_to(jnp.eye(3), (len(p["tets"]), 3, 3))
    cell = jnp.asarray(p["gauss_tet"], jnp.int32)
    q = jnp.asarray(rng.normal(size=(200, 4)), jnp.float32)
    ls = jnp.full((200, 3), np.log(0.02), jnp.float32)
    inside = np.asarray(p["gauss_bary"], np.float32)
    outside = inside + rng.normal(0.0, 0.4, inside.shape).astype(np.float32)
    outside /= outside.sum(-1, keepdims=True)
    assert (outside < 0).any(1).mean() > 0.3
    for bary in (inside, outside):
        m_aff, c_aff = d3ga.embedded_gaussians(rest, tets, J, cell, jnp.asarray(bary), ls, q)
        m_sim, c_sim = d3ga.embedded_gaussians(rest, tets, J, cell, jnp.asarray(bary), ls, q, bary_domain="simplex")
        np.testing.assert_array_equal(c_sim, c_aff)                   # only means depend on b
        corners = np.asarray(p["rest_nodes"], np.float64)[np.asarray(p["tets"])[np.asarray(cell)]]
        proj = np.stack([_simplex_projection_by_faces(r.astype(np.float64)) for r in bary])
        np.testing.assert_allclose(m_sim, np.einsum("gk,gkc->gc", proj, corners), atol=1e-5)
        # The simplex mean's barycentrics in its own tetrahedron are >= 0 (it is inside).
        T = corners[:, 1:] - corners[:, :1]
        rel = (np.asarray(m_sim, np.float64) - corners[:, 0])[..., None]
        local = np.linalg.solve(np.transpose(T, (0, 2, 1)), rel)[..., 0]
        assert (local > -1e-4).all() and (local.sum(-1) < 1 + 1e-4).all()
    moved = np.linalg.norm(np.asarray(m_sim) - np.asarray(m_aff), axis=-1)  # the outside case
    assert (moved > 1e-3).mean() > 0.3
    inside_aff = d3ga.embedded_gaussians(rest, tets, J, cell, jnp.asarray(inside), ls, q)[0]
    inside_sim = d3ga.embedded_gaussians(rest, tets, J, cell, jnp.asarray(inside), ls, q, bary_domain="simplex")[0]
    np.testing.assert_allclose(inside_sim, inside_aff, atol=1e-6)      # inside: the thesis's model
    with pytest.raises(ValueError, match="bary_domain must be one of"):
        d3ga.embedded_gaussians(rest, tets, J, cell, jnp.asarray(inside), ls, q, bary_domain="convex")
    mc = d3ga.default_model_config()
    mc.bary_domain = "clamped"
    with pytest.raises(ValueError, match=r"model.bary_domain must be one of \('affine', 'simplex'\), got 'clamped'"):
        _context(model_cfg=mc)
