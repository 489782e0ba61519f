"""FLAME forward pass: equality with smplx.lbs.lbs, representations, transforms, default model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import rotations
from dhjax.models import flame


def random_model_arrays(seed=0, V=60, F=90, S=12, E=7):
    """Random arrays in dhjax's FLAME layout (not a mesh anyone would want to look at)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(size=(V, 5)) ** 3
    w /= w.sum(1, keepdims=True)
    jr = rng.uniform(size=(5, V))
    jr /= jr.sum(1, keepdims=True)
    return dict(
        v_template=rng.normal(scale=0.1, size=(V, 3)).astype(np.float32),
        faces=rng.integers(0, V, size=(F, 3)).astype(np.int32),
        shapedirs=rng.normal(scale=0.01, size=(V, 3, S)).astype(np.float32),
        exprdirs=rng.normal(scale=0.01, size=(V, 3, E)).astype(np.float32),
        posedirs=rng.normal(scale=0.01, size=(V, 3, 36)).astype(np.float32),
        j_regressor=jr.astype(np.float32), lbs_weights=w.astype(np.float32),
        lmk_faces=rng.integers(0, F, size=10).astype(np.int32),
        lmk_bary=rng.dirichlet(np.ones(3), size=10).astype(np.float32),
    )


def random_params(seed, B, S, E, scale=0.6):
    rng = np.random.default_rng(seed)
    return dict(shape=rng.normal(size=(B, S)).astype(np.float32),
                expression=rng.normal(size=(B, E)).astype(np.float32),
                pose=rng.normal(scale=scale, size=(B, 5, 3)).astype(np.float32),
                translation=rng.normal(scale=0.1, size=(B, 3)).astype(np.float32))


def smplx_forward(arrays, params):
    """The peer: smplx.lbs.lbs on the same arrays (FLAME's shapedirs = [shape | expression])."""
    torch = pytest.importorskip("torch")
    smplx_lbs = pytest.importorskip("smplx.lbs")
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    V = arrays["v_template"].shape[0]
    betas = torch.cat([t(params["shape"]), t(params["expression"])], 1)
    shapedirs = torch.cat([t(arrays["shapedirs"]), t(arrays["exprdirs"])], 2)
    posedirs = t(arrays["posedirs"]).reshape(V * 3, 36).T  # smplx keeps [36, 3V]
    B = betas.shape[0]
    verts, joints = smplx_lbs.lbs(
        betas, t(params["pose"]).reshape(B, 15), t(arrays["v_template"]), shapedirs, posedirs,
        t(arrays["j_regressor"]), torch.tensor([-1, 0, 1, 1, 1]), t(arrays["lbs_weights"]))
    trans = t(params["translation"])[:, None]
    return (verts + trans).numpy(), (joints + trans).numpy()


@pytest.mark.peers
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_equals_smplx_on_random_arrays(seed):
    arrays = random_model_arrays(seed)
    model = flame.from_arrays(arrays, "random")
    p = random_params(seed + 10, B=4, S=12, E=7)
    out = flame.forward(model, **p)
    ref_v, ref_j = smplx_forward(arrays, p)
    np.testing.assert_allclose(np.asarray(out.vertices), ref_v, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.joints), ref_j, atol=1e-5, rtol=0)


@pytest.mark.peers
def test_forward_equals_smplx_on_default_head():
    arrays = dict(flame.head_default.build_default_head_arrays())
    model = flame.load()
    p = random_params(3, B=3, S=300, E=100, scale=0.3)
    out = flame.forward(model, **p)
    ref_v, ref_j = smplx_forward(arrays, p)
    np.testing.assert_allclose(np.asarray(out.vertices), ref_v, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.joints), ref_j, atol=1e-5, rtol=0)


def test_pose_representations_agree():
    arrays = random_model_arrays(2)
    model = flame.from_arrays(arrays, "random")
    p = random_params(4, B=2, S=12, E=7)
    mats = rotations.axis_angle_to_matrix(jnp.asarray(p["pose"]))
    d6 = rotations.matrix_to_rotation_6d(mats)
    a = flame.forward(model, p["shape"], p["expression"], p["pose"]).vertices
    b = flame.forward(model, p["shape"], p["expression"], mats, pose_rep="matrix").vertices
    c = flame.forward(model, p["shape"], p["expression"], d6, pose_rep="6d").vertices
    # pytorch3d's convention: the first two rows, flattened row by row.
    d6_rows = np.asarray(mats)[..., :2, :].reshape(2, 5, 6)
    d = flame.forward(model, p["shape"], p["expression"], d6_rows, pose_rep="6d_rows").vertices
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-5)
    np.testing.assert_allclose(a, d, atol=1e-5)
    # Rows read as columns give the inverse rotations: a wrong convention must be visible.
    e = flame.forward(model, p["shape"], p["expression"], d6_rows, pose_rep="6d").vertices
    assert np.abs(np.asarray(a) - np.asarray(e)).max() > 1e-3


def test_rest_pose_is_template_plus_blendshapes_and_joints_regressed():
    arrays = random_model_arrays(5)
    model = flame.from_arrays(arrays, "random")
    p = random_params(6, B=2, S=12, E=7)
    out = flame.forward(model, p["shape"], p["expression"])
    expected = (arrays["v_template"][None]
                + np.einsum("bk,vck->bvc", p["shape"], arrays["shapedirs"])
                + np.einsum("bk,vck->bvc", p["expression"], arrays["exprdirs"]))
    np.testing.assert_allclose(out.vertices, expected, atol=1e-6)
    np.testing.assert_allclose(out.joints, np.einsum("jv,bvc->bjc", arrays["j_regressor"], expected),
                               atol=1e-6)


def test_global_rotation_and_translation_are_rigid():
    """Rotating the root rotates everything about the root joint; translation shifts all."""
    model = flame.load()
    p = random_params(7, B=1, S=20, E=10, scale=0.2)
    pose0 = np.array(p["pose"])
    pose0[:, 0] = 0.0
    pose1 = pose0.copy()
    pose1[:, 0] = [0.3, -0.5, 0.2]
    base = flame.forward(model, p["shape"], p["expression"], pose0)
    rot = flame.forward(model, p["shape"], p["expression"], pose1, p["translation"])
    R = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(pose1[0, 0])))
    root = np.asarray(base.joints[0, 0])
    expected = (np.asarray(base.vertices[0]) - root) @ R.T + root + p["translation"][0]
    np.testing.assert_allclose(rot.vertices[0], expected, atol=2e-6)
    np.testing.assert_allclose(rot.landmarks[0],
                               (np.asarray(base.landmarks[0]) - root) @ R.T + root + p["translation"][0],
                               atol=2e-6)


def test_jit_vmap_grad():
    model = flame.load(n_shape=50, n_expression=20)
    p = random_params(8, B=2, S=50, E=20, scale=0.2)
    f = jax.jit(lambda m, s, e, q: flame.forward(m, s, e, q).vertices)
    v = f(model, p["shape"], p["expression"], p["pose"])
    np.testing.assert_allclose(v, flame.forward(model, p["shape"], p["expression"], p["pose"]).vertices,
                               atol=1e-6)
    # vmap over an extra leading axis of parameters.
    vm = jax.vmap(lambda s, e, q: flame.forward(model, s, e, q).vertices)(
        p["shape"][:, None], p["expression"][:, None], p["pose"][:, None])
    np.testing.assert_allclose(vm[:, 0], v, atol=1e-6)

    def loss(s, e, q):
        return jnp.sum(flame.forward(model, s, e, q).landmarks ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(p["shape"], p["expression"], jnp.zeros((2, 5, 3)))
    for g in grads:
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    # Central differences on one shape coefficient.
    eps = 1e-2
    s = np.array(p["shape"])
    sp, sm = s.copy(), s.copy()
    sp[0, 0] += eps
    sm[0, 0] -= eps
    fd = (loss(sp, p["expression"], jnp.zeros((2, 5, 3))) - loss(sm, p["expression"], jnp.zeros((2, 5, 3)))) / (2 * eps)
    np.testing.assert_allclose(grads[0][0, 0], fd, rtol=1e-2)


def test_empty_batch_gives_empty_outputs():
    """B = 0 (e.g. an empty chunk of frames) gives [0, ...] outputs, eagerly, under jit and grad."""
    model = flame.load(n_shape=10, n_expression=5)
    V = model.num_vertices
    L, M = model.lmk_faces.shape[0], model.mp_lmk_faces.shape[0]
    p = random_params(3, B=0, S=10, E=5)
    want = dict(vertices=(0, V, 3), joints=(0, 5, 3), landmarks=(0, L, 3), landmarks_mp=(0, M, 3),
                v_shaped=(0, V, 3))
    calls = {
        "shape only": lambda: flame.forward(model, p["shape"]),
        "pose only": lambda: flame.forward(model, pose=p["pose"]),
        "all": lambda: flame.forward(model, p["shape"], p["expression"], p["pose"], p["translation"]),
        "6d": lambda: flame.forward(model, pose=np.zeros((0, 5, 6), np.float32), pose_rep="6d"),
        "jit": lambda: jax.jit(flame.forward)(model, p["shape"], p["expression"], p["pose"],
                                              p["translation"]),
    }
    for name, call in calls.items():
        out = call()
        for key, shape in want.items():
            got = getattr(out, key)
            assert got.shape == shape and got.dtype == jnp.float32, (name, key, got.shape, got.dtype)
    grads = jax.grad(lambda s, q: jnp.sum(flame.forward(model, s, pose=q).landmarks),
                     argnums=(0, 1))(p["shape"], p["pose"])
    assert grads[0].shape == (0, 10) and grads[1].shape == (0, 5, 3)
    # The inputs are still checked when the batch is empty.
    with pytest.raises(ValueError, match="shape"):
        flame.forward(model, np.zeros((0, 11)))
    with pytest.raises(ValueError, match="batch"):
        flame.forward(model, np.zeros((0, 10)), pose=np.zeros((2, 5, 3)))


def test_bad_inputs_name_the_problem():
    model = flame.load(n_shape=10, n_expression=5)
    with pytest.raises(ValueError, match="shape"):
        flame.forward(model, np.zeros((2, 11)))
    with pytest.raises(ValueError, match=r"\[B, 5, 3\]"):
        flame.forward(model, np.zeros((2, 10)), pose=np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="pose_rep"):
        flame.forward(model, pose=np.zeros((1, 5, 3)), pose_rep="euler")
    with pytest.raises(ValueError, match="translation"):
        flame.forward(model, np.zeros((2, 10)), translation=np.zeros((3,)))
    with pytest.raises(ValueError, match="n_shape"):
        flame.load(n_shape=301)


# ----------------------------------------------------------------------------- official files

def _official_layout(model):
    a = flame.official_arrays(model)
    return dict(v_template=a["v_template"], f=a["faces"],
                shapedirs=np.concatenate([a["shapedirs"], a["exprdirs"]], axis=2),
                posedirs=a["posedirs"], J_regressor=a["j_regressor"], weights=a["lbs_weights"],
                kintree_table=np.stack([np.array([2 ** 32 - 1, 0, 1, 1, 1]), np.arange(5)]))


def test_load_official_npz_and_landmarks_gives_same_forward(tmp_path):
    """A model written in the official layout (npz + MICA landmark_embedding.npy) loads back
    through flame.load and reproduces the default model's forward pass."""
    from dhjax import io as dio

    default = flame.load()
    path = dio.save_flame_npz(tmp_path / "model.npz", _official_layout(default))
    emb = {"full_lmk_faces_idx": np.asarray(default.lmk_faces)[None],
           "full_lmk_bary_coords": np.asarray(default.lmk_bary)[None],
           "static_lmk_faces_idx": np.asarray(default.lmk_faces)[17:],
           "static_lmk_bary_coords": np.asarray(default.lmk_bary)[17:]}
    np.save(tmp_path / "landmark_embedding.npy", emb, allow_pickle=True)
    loaded = flame.load(path, landmarks=tmp_path / "landmark_embedding.npy")
    assert loaded.num_shape == 300 and loaded.num_expression == 100
    p = random_params(11, B=2, S=300, E=100, scale=0.3)
    a = flame.forward(default, **p)
    b = flame.forward(loaded, **p)
    np.testing.assert_array_equal(np.asarray(a.vertices), np.asarray(b.vertices))
    np.testing.assert_array_equal(np.asarray(a.landmarks), np.asarray(b.landmarks))
    small = flame.load(path, n_shape=100, n_expression=50)
    assert small.num_shape == 100 and small.num_expression == 50 and small.lmk_faces is None
    # A different split stored in the same 400 components must be said, and is then honoured.
    split = flame.load(path, file_n_shape=250)
    assert split.num_shape == 250 and split.num_expression == 150
    # smplx's static embedding (51 inner points, iBUG 17..67) gives 51 landmarks.
    import pickle
    with open(tmp_path / "flame_static_embedding.pkl", "wb") as fh:
        pickle.dump({"lmk_face_idx": np.asarray(default.lmk_faces)[17:],
                     "lmk_b_coords": np.asarray(default.lmk_bary)[17:]}, fh, protocol=2)
    static = flame.load(path, landmarks=tmp_path / "flame_static_embedding.pkl")
    lmk51 = flame.forward(static, **p).landmarks
    assert lmk51.shape == (2, 51, 3)
    np.testing.assert_array_equal(np.asarray(lmk51), np.asarray(a.landmarks)[:, 17:])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        flame.load(tmp_path / "nope.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="bad.pkl"):
        flame.load(bad)
    with pytest.raises(ValueError, match="landmarks"):
        flame.load(landmarks=tmp_path / "x.npy")


def test_lbs_itself_takes_an_empty_batch():
    """The skinning function alone (not only flame.forward's early return) accepts B = 0."""
    from dhjax.geometry import lbs as lbs_lib

    m = flame.load()
    v = jnp.zeros((0,) + m.v_template.shape, jnp.float32)
    rot = jnp.zeros((0, m.j_regressor.shape[0], 3, 3), jnp.float32)
    verts, joints = lbs_lib.lbs(v, rot, m.posedirs, m.j_regressor, m.lbs_weights, m.parents)
    assert verts.shape == (0,) + m.v_template.shape and joints.shape == (0, m.j_regressor.shape[0], 3)


def test_eyelids_and_iris_of_an_official_model(tmp_path):
    """flame.load(..., eyelids=, iris=): the metrical tracker's eyelid files (in either order)
    and iris vertex ids give the same eyelids and iris points as the default head's arrays;
    bad files and ids get clear errors."""
    from dhjax import io as dio

    default = flame.load()
    path = dio.save_flame_npz(tmp_path / "model.npz", _official_layout(default))
    d = np.asarray(default.eyelid_dirs)
    np.save(tmp_path / "l_eyelid.npy", d[0])
    np.save(tmp_path / "r_eyelid.npy", d[1][None])          # [1, V, 3] as the tracker's files are
    # Iris points at vertices: the vertex nearest to each of the default's iris points.
    iris_pts = np.asarray(flame.forward(default).iris[0])
    vids = np.argmin(np.linalg.norm(np.asarray(default.v_template)[None] - iris_pts[:, None], axis=-1), 1)
    vids = vids.reshape(2, 5)
    m = flame.load(path, eyelids=(tmp_path / "r_eyelid.npy", tmp_path / "l_eyelid.npy"), iris=vids[::-1])
    np.testing.assert_array_equal(np.asarray(m.eyelid_dirs), d)
    e = jnp.asarray([[0.3, 0.9]])
    np.testing.assert_allclose(np.asarray(flame.forward(m, eyelids=e).vertices),
                               np.asarray(flame.forward(default, eyelids=e).vertices), atol=1e-7)
    got = np.asarray(flame.forward(m).iris[0])
    np.testing.assert_allclose(got, np.asarray(default.v_template)[vids.reshape(-1)], atol=1e-7)
    assert got[0, 0] < 0 < got[5, 0]                       # the right eye's row first
    faces_of = np.asarray(m.faces)[np.asarray(m.iris_faces)]
    assert all(v in f for v, f in zip(vids.reshape(-1), faces_of))
    # Errors: a model without eyelids, wrong shapes, two files of one side, bad ids.
    plain = flame.load(path)
    assert plain.eyelid_dirs is None and plain.iris_faces is None and flame.forward(plain).iris is None
    with pytest.raises(ValueError, match="no eyelid blendshapes"):
        flame.forward(plain, eyelids=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"eyelids must be \[B=1, 2\]"):
        flame.forward(default, eyelids=jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="both eyelid files move the left eye"):
        flame.load(path, eyelids=(tmp_path / "l_eyelid.npy", tmp_path / "l_eyelid.npy"))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        flame.load(path, eyelids=(tmp_path / "missing.npy", tmp_path / "l_eyelid.npy"))
    np.save(tmp_path / "short.npy", d[0][:10])
    with pytest.raises(ValueError, match="short.npy"):
        flame.load(path, eyelids=(tmp_path / "short.npy", tmp_path / "l_eyelid.npy"))
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        flame.load(path, iris=vids[:, :4])
    with pytest.raises(ValueError, match="one side"):
        flame.load(path, iris=np.stack([vids[0], vids[0]]))
    with pytest.raises(ValueError, match="eyelids/iris"):
        flame.load(eyelids=(tmp_path / "l_eyelid.npy", tmp_path / "r_eyelid.npy"))
    assert flame.METRICAL_TRACKER_IRIS_VERTICES[0][0] == 4597
