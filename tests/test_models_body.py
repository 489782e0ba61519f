"""SMPL-X-layout body forward pass: equality with smplx.SMPLX on random official-layout files
(v1.1 and legacy layouts, hand PCA, pickle), pose parts and representations, errors, B = 0,
jit/vmap/grad, sampling."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import rotations
from dhjax.io import body_files
from dhjax.models import body

B = 3
# Peer tolerance: vertices lie within ~1.5 m of the origin, where float32 spacing is ~1.2e-7 m;
# both sides chain up to 8 float32 4x4 transforms (pelvis -> fingertip) and sum 486 pose
# correctives and 20-400 blendshapes, in different orders (torch vs XLA). Observed differences
# are ~3e-7 m; 2e-6 m (2 um) leaves room for other BLAS builds while a wrong joint order, parent,
# pose-corrective layout or blendshape split moves vertices by millimetres or more.
ATOL = 2e-6


def write_official(path, seed=0, n_components=400, V=240):
    content = body_files.random_smplx_content(seed, n_vertices=V, n_components=n_components)
    np.savez(path, **content)
    return content


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("smplx") / "SMPLX_NEUTRAL.npz"
    write_official(path)
    return path


def random_parts(seed, batch=B, scale=0.4):
    """smplx-style pose parts (axis-angle), all non-zero so every pose corrective is driven."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: rng.normal(scale=scale, size=(batch,) + shape).astype(np.float32)
    return dict(global_orient=n(3), body_pose=n(21, 3), jaw=n(3), left_eye=n(3), right_eye=n(3),
                left_hand=n(15, 3), right_hand=n(15, 3))


def smplx_model(path, **kw):
    torch = pytest.importorskip("torch")
    smplx = pytest.importorskip("smplx")
    kw = dict(dict(num_betas=10, num_expression_coeffs=10, use_pca=False, flat_hand_mean=True,
                   batch_size=B), **kw)
    m = smplx.SMPLX(str(path), ext="pkl" if str(path).endswith(".pkl") else "npz", **kw)
    # smplx appends extra keypoints at SMPL-X vertex ids (up to 9120) that a few-hundred-vertex
    # test mesh does not have; point them at vertex 0 (they are not compared).
    sel = m.vertex_joint_selector
    sel.extra_joints_idxs = torch.zeros_like(sel.extra_joints_idxs)
    return m, len(sel.extra_joints_idxs)


def smplx_forward(m, parts, betas, expression, translation, left_hand=None, right_hand=None):
    import torch

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))
    flat = lambda a: t(a).reshape(a.shape[0], -1)
    with torch.no_grad():
        out = m(betas=t(betas), expression=t(expression), global_orient=t(parts["global_orient"]),
                body_pose=flat(parts["body_pose"]), jaw_pose=t(parts["jaw"]),
                leye_pose=t(parts["left_eye"]), reye_pose=t(parts["right_eye"]),
                left_hand_pose=flat(parts["left_hand"] if left_hand is None else left_hand),
                right_hand_pose=flat(parts["right_hand"] if right_hand is None else right_hand),
                transl=t(translation))
    return out.vertices.numpy(), out.joints.numpy()


def coefficients(seed, S=10, E=10):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, S)).astype(np.float32), rng.normal(size=(B, E)).astype(np.float32),
            rng.normal(scale=0.2, size=(B, 3)).astype(np.float32))


def assert_matches_smplx(out, ref_v, ref_j, n_extra):
    np.testing.assert_allclose(np.asarray(out.vertices), ref_v, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.joints), ref_j[:, :55], atol=ATOL, rtol=0)
    # smplx's joints: 55 joints, extra vertex keypoints, then the 51 face landmarks.
    np.testing.assert_allclose(np.asarray(out.keypoints[:, 55:]), ref_j[:, 55 + n_extra:], atol=ATOL, rtol=0)


@pytest.mark.peers
def test_forward_equals_smplx_v11_layout(official):
    model = body.load(official)
    assert (model.num_shape, model.num_expression, model.num_keypoints) == (300, 100, 55 + 51)
    betas, expr, trans = coefficients(1)
    parts = random_parts(2)
    out = body.forward(model, betas, expr, body.pose_from_parts(**parts), trans)
    m, n_extra = smplx_model(official)
    ref_v, ref_j = smplx_forward(m, parts, betas, expr, trans)
    # Pose correctives are really driven (else the test would not see their layout).
    assert np.abs(ref_v - np.asarray(body.forward(model, betas, expr, None, trans).vertices)).max() > 0.05
    assert_matches_smplx(out, ref_v, ref_j, n_extra)


@pytest.mark.peers
@pytest.mark.parametrize("weights,posedirs,batch", [("sparse", "random", 3), ("dense", "random", 3),
                                                   ("sparse", "zero", 32), ("dense", "zero", 32)])
def test_fast_paths_equal_smplx(tmp_path, weights, posedirs, batch):
    """Sparse (<= 8 influences) vs dense skinning, skipped all-zero pose correctives, and joints
    regressed from the basis (batch > basis rows) all keep smplx's results."""
    content = body_files.random_smplx_content(11, n_vertices=240, n_components=20)
    if weights == "dense":
        w = np.random.default_rng(0).uniform(size=content["weights"].shape) ** 4
        content["weights"] = w / w.sum(1, keepdims=True)
    if posedirs == "zero":
        content["posedirs"] = np.zeros_like(content["posedirs"])
    path = tmp_path / "SMPLX_NEUTRAL.npz"
    np.savez(path, **content)
    model = body.load(path)
    assert (model.skin_index is None) == (weights == "dense")
    assert model.pose_correctives == (posedirs == "random")
    assert (batch > model.blend_basis.shape[0]) == (batch == 32)
    rng = np.random.default_rng(batch)
    betas, expr = (rng.normal(size=(batch, 10)).astype(np.float32) for _ in range(2))
    trans = rng.normal(scale=0.2, size=(batch, 3)).astype(np.float32)
    parts = random_parts(6, batch=batch)
    out = jax.jit(body.forward)(model, betas, expr, body.pose_from_parts(**parts), trans)
    m, n_extra = smplx_model(path, batch_size=batch)
    assert_matches_smplx(out, *smplx_forward(m, parts, betas, expr, trans), n_extra)


@pytest.mark.peers
def test_forward_equals_smplx_legacy_20_component_layout(tmp_path):
    path = tmp_path / "SMPLX_NEUTRAL.npz"
    write_official(path, seed=3, n_components=20)
    model = body.load(path)
    assert (model.num_shape, model.num_expression) == (10, 10)
    betas, expr, trans = coefficients(4)
    parts = random_parts(5)
    out = body.forward(model, betas, expr, body.pose_from_parts(**parts), trans)
    m, n_extra = smplx_model(path)
    assert_matches_smplx(out, *smplx_forward(m, parts, betas, expr, trans), n_extra)


@pytest.mark.peers
def test_hand_pca_equals_smplx_use_pca(official):
    model = body.load(official, n_shape=10, n_expression=10)
    betas, expr, trans = coefficients(6)
    parts = random_parts(7)
    rng = np.random.default_rng(8)
    lc, rc = (rng.normal(size=(B, 6)).astype(np.float32) for _ in range(2))
    left, right = body.hand_pose_from_pca(model, lc, rc)   # with the mean hand pose, as smplx's default
    out = body.forward(model, betas, expr, body.pose_from_parts(**dict(parts, left_hand=left, right_hand=right)),
                       trans)
    m, n_extra = smplx_model(official, use_pca=True, num_pca_comps=6, flat_hand_mean=False)
    assert_matches_smplx(out, *smplx_forward(m, parts, betas, expr, trans, lc, rc), n_extra)
    flat_left, _ = body.hand_pose_from_pca(model, lc, rc, flat_mean=True)
    np.testing.assert_allclose(np.asarray(left - flat_left).reshape(B, 45),
                               np.broadcast_to(np.asarray(model.hands_mean[0]), (B, 45)), atol=1e-6)


@pytest.mark.peers
def test_pickle_with_sparse_regressor_equals_smplx(tmp_path):
    sparse = pytest.importorskip("scipy.sparse")
    content = body_files.random_smplx_content(9, n_vertices=200)
    content["J_regressor"] = sparse.csc_matrix(content["J_regressor"])
    path = tmp_path / "SMPLX_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    model = body.load(path)
    betas, expr, trans = coefficients(10)
    parts = random_parts(11)
    out = body.forward(model, betas, expr, body.pose_from_parts(**parts), trans)
    m, n_extra = smplx_model(path)
    assert_matches_smplx(out, *smplx_forward(m, parts, betas, expr, trans), n_extra)


def test_pose_from_parts_order_and_flattened_inputs():
    parts = random_parts(12)
    pose = np.asarray(body.pose_from_parts(**parts))
    assert pose.shape == (B, 55, 3)
    idx = {n: i for i, n in enumerate(body.JOINT_NAMES)}
    np.testing.assert_array_equal(pose[:, idx["pelvis"]], parts["global_orient"])
    np.testing.assert_array_equal(pose[:, idx["left_hip"]: idx["right_wrist"] + 1], parts["body_pose"])
    np.testing.assert_array_equal(pose[:, idx["jaw"]], parts["jaw"])
    np.testing.assert_array_equal(pose[:, idx["right_eye_smplhf"]], parts["right_eye"])
    np.testing.assert_array_equal(pose[:, idx["left_index1"]: idx["left_thumb3"] + 1], parts["left_hand"])
    np.testing.assert_array_equal(pose[:, idx["right_index1"]:], parts["right_hand"])
    flat = body.pose_from_parts(body_pose=parts["body_pose"].reshape(B, 63),
                                right_hand=parts["right_hand"].reshape(B, 45))
    np.testing.assert_array_equal(np.asarray(flat)[:, 1:22], parts["body_pose"])
    assert not np.asarray(flat)[:, 0].any()
    with pytest.raises(ValueError, match=r"left_hand must be \[B=3, 15, 3\]"):
        body.pose_from_parts(global_orient=parts["global_orient"], left_hand=np.zeros((B, 14, 3)))
    with pytest.raises(ValueError, match="at least one part"):
        body.pose_from_parts()


def test_tables():
    assert len(body.JOINT_NAMES) == len(body.SMPLX_PARENTS) == len(body.JOINT_PARTS) == body.N_JOINTS == 55
    assert body.N_POSE_FEATURES == 486
    name = dict(enumerate(body.JOINT_NAMES))
    parent = lambda j: name[body.SMPLX_PARENTS[body.JOINT_NAMES.index(j)]]
    assert parent("left_wrist") == "left_elbow" and parent("left_index1") == "left_wrist"
    assert parent("jaw") == "head" and parent("right_eye_smplhf") == "head" and parent("right_thumb3") == "right_thumb2"
    part = lambda j: body.PART_NAMES[body.JOINT_PARTS[body.JOINT_NAMES.index(j)]]
    assert [part(j) for j in ("head", "spine2", "left_elbow", "right_wrist", "left_knee", "right_foot")] == [
        "head", "torso", "left_arm", "right_hand", "left_leg", "right_foot"]


def test_official_file_part_labels_and_round_trip(official):
    model = body.load(official)
    arrays = body.official_arrays(model)
    raw = body_files.load_smplx_arrays(official)
    for key in raw:
        np.testing.assert_array_equal(arrays[key], raw[key], err_msg=key)
    np.testing.assert_array_equal(arrays["part_labels"], body.part_labels_from_weights(raw["lbs_weights"]))
    assert arrays["part_labels"].max() < len(body.PART_NAMES)
    again = body.from_arrays(arrays, "again")
    p = body.pose_from_parts(**random_parts(13))
    np.testing.assert_array_equal(body.forward(again, pose=p).vertices, body.forward(model, pose=p).vertices)


def test_pose_representations_agree(official):
    model = body.load(official, n_shape=10, n_expression=5)
    pose = body.pose_from_parts(**random_parts(14, batch=2))
    mats = rotations.axis_angle_to_matrix(pose)
    a = body.forward(model, pose=pose).vertices
    np.testing.assert_allclose(body.forward(model, pose=pose.reshape(2, 165)).vertices, a, atol=0)
    np.testing.assert_allclose(body.forward(model, pose=mats, pose_rep="matrix").vertices, a, atol=1e-6)
    d6 = rotations.matrix_to_rotation_6d(mats)
    np.testing.assert_allclose(body.forward(model, pose=d6, pose_rep="6d").vertices, a, atol=1e-5)
    d6_rows = np.asarray(mats)[..., :2, :].reshape(2, 55, 6)
    np.testing.assert_allclose(body.forward(model, pose=d6_rows, pose_rep="6d_rows").vertices, a, atol=1e-5)


def test_rest_pose_is_template_plus_blendshapes(official):
    model = body.load(official)
    raw = body_files.load_smplx_arrays(official)
    betas, expr, trans = coefficients(15, S=7, E=4)
    out = body.forward(model, betas, expr, translation=trans)
    shaped = (raw["v_template"] + np.einsum("bk,vck->bvc", betas, raw["shapedirs"][..., :7])
              + np.einsum("bk,vck->bvc", expr, raw["exprdirs"][..., :4]))
    np.testing.assert_allclose(out.v_shaped, shaped, atol=1e-6)
    np.testing.assert_allclose(out.vertices, shaped + trans[:, None], atol=1e-6)
    np.testing.assert_allclose(out.joints, np.einsum("jv,bvc->bjc", raw["j_regressor"], shaped) + trans[:, None],
                               atol=1e-6)
    assert out.keypoints.shape == (B, 55 + 51, 3)


def test_parameter_errors_name_the_argument(official):
    model = body.load(official, n_shape=10, n_expression=10)
    with pytest.raises(ValueError, match=r"axis-angle pose must be \[B, 55, 3\], got \(3, 54, 3\)"):
        body.forward(model, pose=np.zeros((B, 54, 3)))
    with pytest.raises(ValueError, match=r"6D pose must be \[B, 55, 6\]"):
        body.forward(model, pose=np.zeros((B, 55, 3)), pose_rep="6d")
    with pytest.raises(ValueError, match="betas has 11 coefficients but the model has 10"):
        body.forward(model, betas=np.zeros((B, 11)))
    with pytest.raises(ValueError, match=r"expression must be \[B=3, K\]"):
        body.forward(model, betas=np.zeros((B, 10)), expression=np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"translation must be \[B=3, 3\]"):
        body.forward(model, pose=np.zeros((B, 55, 3)), translation=np.zeros((B, 2)))
    with pytest.raises(ValueError, match="pose has batch 2, other parameters 3"):
        body.forward(model, betas=np.zeros((B, 10)), pose=np.zeros((2, 55, 3)))
    with pytest.raises(ValueError, match="betas needs a leading batch dimension"):
        body.forward(model, betas=np.float32(1.0))
    with pytest.raises(ValueError, match="left_coeffs must be"):
        body.hand_pose_from_pca(model, np.zeros((B, 46)), np.zeros((B, 6)))


@pytest.mark.parametrize("what", ["betas", "expression", "pose", "translation"])
def test_non_finite_parameters_are_named(official, what):
    model = body.load(official, n_shape=10, n_expression=10)
    params = dict(betas=np.zeros((B, 10)), expression=np.zeros((B, 10)), pose=np.zeros((B, 55, 3)),
                  translation=np.zeros((B, 3)))
    params[what] = params[what].copy()
    params[what].flat[4] = np.nan
    with pytest.raises(ValueError, match=f"{what} contains non-finite values"):
        body.forward(model, **params)
    params[what] = jnp.asarray(params[what])   # a concrete jax array is checked too
    with pytest.raises(ValueError, match=f"{what} contains non-finite values"):
        body.forward(model, **params)


def test_empty_batch(official):
    model = body.load(official, n_shape=10, n_expression=10)
    for out in (body.forward(model, np.zeros((0, 10)), pose=np.zeros((0, 55, 3))),
                jax.jit(body.forward)(model, jnp.zeros((0, 10)), pose=jnp.zeros((0, 55, 3)))):
        assert out.vertices.shape == (0, model.num_vertices, 3) and out.joints.shape == (0, 55, 3)
        assert out.keypoints.shape == (0, 106, 3) and out.v_shaped.shape == (0, model.num_vertices, 3)
    g = jax.grad(lambda p: body.forward(model, pose=p).vertices.sum())(jnp.zeros((0, 55, 3)))
    assert g.shape == (0, 55, 3)


def test_jit_vmap_grad(official):
    model = body.load(official, n_shape=10, n_expression=10)
    betas, expr, trans = coefficients(16)
    pose = body.pose_from_parts(**random_parts(17))
    eager = body.forward(model, betas, expr, pose, trans)
    f = jax.jit(lambda m, *a: body.forward(m, *a).keypoints)
    np.testing.assert_allclose(f(model, betas, expr, pose, trans), eager.keypoints, atol=1e-6)
    vm = jax.jit(jax.vmap(lambda b, e, p, t: body.forward(model, b, e, p, t).vertices))(
        betas[:, None], expr[:, None], pose[:, None], trans[:, None])
    np.testing.assert_allclose(vm[:, 0], eager.vertices, atol=1e-6)
    # One compiled value-and-gradient (the 55-joint chain takes seconds to compile), reused below.
    loss = jax.jit(jax.value_and_grad(lambda p, b: jnp.sum(body.forward(model, b, pose=p).joints ** 2),
                                      argnums=(0, 1)))
    _, (gp, gb) = loss(pose, jnp.asarray(betas))
    assert gp.shape == (B, 55, 3) and gb.shape == (B, 10)
    assert np.all(np.isfinite(gp)) and np.abs(gp).max() > 0 and np.abs(gb).max() > 0
    # Finite at the rest pose too (Rodrigues at 0).
    assert np.all(np.isfinite(loss(jnp.zeros_like(pose), jnp.asarray(betas))[1][0]))
    # A central finite difference of one pose component (a wrist).
    eps = 1e-2
    e = np.zeros((B, 55, 3), np.float32)
    e[1, 20, 2] = eps
    fd = (loss(pose + e, betas)[0] - loss(pose - e, betas)[0]) / (2 * eps)
    np.testing.assert_allclose(fd, gp[1, 20, 2], rtol=2e-2, atol=1e-3)


def test_from_arrays_shape_errors(official):
    arrays = body.official_arrays(body.load(official))
    bad = dict(arrays, posedirs=arrays["posedirs"][..., :207])
    with pytest.raises(ValueError, match=r"posedirs must have shape \(240, 3, 486\), got \(240, 3, 207\)"):
        body.from_arrays(bad, "m")
    with pytest.raises(ValueError, match=r"lbs_weights must have shape \(240, 55\), got \(240, 24\)"):
        body.from_arrays(dict(arrays, lbs_weights=arrays["lbs_weights"][:, :24]), "m")
    with pytest.raises(ValueError, match=r"joint_limits must have shape \(55, 3, 2\)"):
        body.from_arrays(dict(arrays, joint_limits=np.zeros((55, 3))), "m")
    with pytest.raises(ValueError, match="part_labels must index PART_NAMES"):
        body.from_arrays(dict(arrays, part_labels=np.full(240, 10)), "m")
    with pytest.raises(ValueError, match="missing key 'exprdirs'"):
        body.from_arrays({k: v for k, v in arrays.items() if k != "exprdirs"}, "m")
    with pytest.raises(ValueError, match="n_shape=301 but the model 'm' has 300"):
        body.from_arrays(arrays, "m", n_shape=301)


def test_sampling(official):
    model = body.load(official)
    key = jax.random.PRNGKey(0)
    assert not np.asarray(body.sample_pose(key, model, 4)).any()   # no limits: the rest pose
    rng = np.random.default_rng(18)
    lo = -rng.uniform(0, 1, size=(55, 3, 1))
    limits = np.concatenate([lo, lo + rng.uniform(0, 1, size=(55, 3, 1))], -1).astype(np.float32)
    limits[0] = 0.0
    arrays = dict(body.official_arrays(model), joint_limits=limits)
    limited = body.from_arrays(arrays, "limited")
    pose = np.asarray(body.sample_pose(key, limited, 256))
    assert pose.shape == (256, 55, 3)
    assert np.all(pose >= limits[..., 0] - 1e-6) and np.all(pose <= limits[..., 1] + 1e-6)
    assert not pose[:, 0].any()
    # Uniform over the range: standard deviation (upper - lower) / sqrt(12).
    np.testing.assert_allclose(pose[:, 1:].std(0), np.diff(limits[1:], axis=-1)[..., 0] / np.sqrt(12), rtol=0.25)
    half = np.asarray(body.sample_pose(key, limited, 256, scale=0.5))
    np.testing.assert_allclose(half, 0.5 * pose, atol=1e-6)
    betas = np.asarray(body.sample_betas(key, 512, 10, std=2.0))
    assert betas.shape == (512, 10) and 1.8 < betas.std() < 2.2
