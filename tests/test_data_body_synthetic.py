"""Clothed synthetic bodies: garments (dhjax.data.garments) and the multi-view body video
generator (dhjax.data.body_synthetic): determinism, sharding, disk round trip, garment motion."""

import numpy as np
import pytest

import jax.numpy as jnp
import synthetic_common as common

from dhjax.data import body_synthetic as bs
from dhjax.data import dataset as ds
from dhjax.data import garments as G
from dhjax.geometry import rotations
from dhjax.models import body, body_default as bd


def _config(**kw):
    c = bs.tiny_config()
    c.n_subjects, c.n_frames = 2, 4
    c.skirt_prob = 0.5
    c.dome.update(n_cameras=3, width=48, height=64)
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def gen():
    return bs.BodyVideoGenerator(_config())


@pytest.fixture(scope="module")
def arrays():
    return bd.build_default_body_arrays()


# What each bs.GENERATOR_VERSION draws and renders for _config() (synthetic_common.fingerprint),
# recorded on a 2-core x86 CPU with jax 0.10.2.
PINNED = {1: {"last": [0.36263, 0.514983, 0.457567, 0.112305, 3.135542, -0.904723, -0.81694, 0.025022,
                       0.08883, 1.017117, 0.256073, 21.228006]}}


def test_generator_output_is_pinned_to_its_version(gen):
    """cached_bodies keys on GENERATOR_VERSION: output may change only with a raise."""
    common.check_pinned({"last": common.fingerprint(gen[len(gen) - 1])}, PINNED, bs.GENERATOR_VERSION,
                        "body_synthetic.GENERATOR_VERSION")


def test_sample_layout(gen):
    assert len(gen) == 2 * 4 * 3
    s = gen[5]
    assert gen.locate(5) == (0, 1, 2)
    assert s["image"].shape == (64, 48, 3) and s["mask"].shape == (64, 48)
    assert s["pose"].shape == (55, 3) and s["shape"].shape == (10,) and s["expression"].shape == (10,)
    assert s["keypoints"].shape == (106, 3) and s["depth"].shape == (64, 48)
    assert (int(s["item"]), int(s["frame"]), int(s["view"])) == (0, 1, 2)
    fg = s["mask"] > 0
    assert fg.any() and (s["seg"][fg] > 0).all() and (s["seg"][~fg] == 0).all()
    assert set(np.unique(s["seg"][fg])) <= {1, 2, 3}
    assert (s["depth"][fg] > 2.0).all() and (s["depth"][~fg] == 0).all()     # dome radius 3.2 m
    # Every layer is visible from some camera of the frame.
    group = gen.render_group(0, 1)
    assert set(np.unique(np.concatenate([g["seg"].ravel() for g in group]))) == {0, 1, 2, 3}
    with pytest.raises(IndexError):
        gen[len(gen)]


def test_samples_do_not_share_memory_and_sway_is_smooth(gen):
    a = gen[0]
    a["pose"] += 1.0
    a["shape"] += 1.0
    b = gen[0]
    np.testing.assert_allclose(a["pose"] - b["pose"], 1.0, atol=1e-6)
    np.testing.assert_allclose(a["shape"] - b["shape"], 1.0, atol=1e-6)
    root = gen.subject(0)["motion"]["root"]
    sway = np.stack([bs.hem_sway(root, t, 30.0) for t in range(gen.n_frames)])
    # The ends use the nearest triple: no spike at the first or last frame.
    np.testing.assert_allclose(sway[0], sway[1], atol=1e-6)
    np.testing.assert_allclose(sway[-1], sway[-2], atol=1e-6)
    # The global orientation is continuous in time (no 2 pi jumps of the axis-angle).
    m = bs.motion_sequence("walk", bs.key(0, bs.STREAM_MOTION, 0), 300, 30.0, gen.limits)
    assert np.linalg.norm(np.diff(m["pose"][:, 0], axis=0), axis=1).max() < 0.2


def test_deterministic_and_shardable(gen):
    other = bs.BodyVideoGenerator(_config(), model=gen.model)
    for i in (0, 7, 23):            # any index, any order, any process: the same bytes
        a, b = gen[i], other[i]
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    diff = bs.BodyVideoGenerator(_config(seed=1), model=gen.model)[0]
    assert np.abs(diff["image"] - gen[0]["image"]).mean() > 1e-3
    # Shards hold whole subjects and cover the index range once.
    parts = [ds.shard_indices(len(gen), p, 2, group=gen.n_frames * gen.n_cameras) for p in range(2)]
    assert np.array_equal(np.concatenate(parts), np.arange(len(gen)))
    assert {gen.locate(i)[0] for i in parts[0]}.isdisjoint({gen.locate(i)[0] for i in parts[1]})


def test_disk_round_trip(gen, tmp_path):
    ds.write_dataset(gen, tmp_path / "b", "train", indices=range(6))
    back = ds.FolderDataset(tmp_path / "b", "train")
    assert len(back) == 6 and back.meta["labels"] == list(bs.LAYER_LABELS) and back.meta["pose_joints"] == 55
    for i in range(6):
        a, b = gen[i], back[i]
        np.testing.assert_allclose(b["image"], a["image"], atol=1 / 255 + 1e-6)
        np.testing.assert_array_equal(b["seg"], a["seg"])
        np.testing.assert_allclose(b["depth"], a["depth"], atol=0.5 / ds.DEPTH_SCALE + 1e-6)
        for k in ("pose", "shape", "expression", "translation", "keypoints", "K", "R", "t"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)
        assert int(b["upper_kind"]) == int(a["upper_kind"]) and int(b["lower_kind"]) == int(a["lower_kind"])


def _posed(arrays, model, garment, pose):
    betas = jnp.zeros((1, 10))
    out = body.forward(model, betas, None, jnp.asarray(pose[None], jnp.float32))
    rel = G.joint_transforms(model, out.v_shaped, rotations.axis_angle_to_matrix(jnp.asarray(pose[None], jnp.float32)))[0]
    gv = G.pose_garment(garment, betas[0], rel, jnp.zeros(3), out.vertices[0], model.faces)
    return np.asarray(out.vertices[0]), np.asarray(gv)


def test_skirt_does_not_follow_one_leg_but_trousers_do(arrays):
    model = body.load()
    J = bd.J
    pose = np.zeros((55, 3))
    pose[J["left_hip"], 0] = -0.6           # left thigh forward
    pose[J["left_knee"], 0] = 0.3
    skirt = G.make_garment(arrays, "skirt")
    trousers = G.make_garment(arrays, "trousers")
    _, rest_skirt = _posed(arrays, model, skirt, np.zeros((55, 3)))
    bv, posed_skirt = _posed(arrays, model, skirt, pose)
    hem = skirt.hem > 0.99
    # The hem's centre moves much less than the knee (it follows the mean of both hips) ...
    knee_move = np.linalg.norm(np.asarray(body.forward(model, None, None, jnp.asarray(pose[None], jnp.float32)).joints[0, J["left_knee"]])
                               - bd._rest_joints()[0][J["left_knee"]])
    hem_move = np.linalg.norm(posed_skirt[hem].mean(0) - rest_skirt[hem].mean(0))
    assert hem_move < 0.6 * knee_move
    # ... while the left trouser cuff goes with the left knee.
    cuff = (trousers.hem > 0.95) & (trousers.rest_coords[:, 0] > 0)
    _, rest_tr = _posed(arrays, model, trousers, np.zeros((55, 3)))
    _, posed_tr = _posed(arrays, model, trousers, pose)
    assert np.linalg.norm(posed_tr[cuff].mean(0) - rest_tr[cuff].mean(0)) > 0.8 * knee_move
    # Skinning alone is not the garment's motion: weights differ from the body's (diffused).
    from scipy.spatial import cKDTree

    src = cKDTree(arrays["v_template"]).query(trousers.rest_coords)[1]
    assert np.abs(trousers.weights - arrays["lbs_weights"][src]).sum(1).max() > 0.2


def test_garments_stay_outside_the_body(arrays):
    from dhjax.ops import closest_point

    model = body.load()
    rng = np.random.default_rng(1)
    lim = arrays["joint_limits"]
    pose = 0.3 * (lim[..., 0] + rng.uniform(size=(55, 3)) * (lim[..., 1] - lim[..., 0]))
    for kind in ("shirt", "trousers"):
        g = G.make_garment(arrays, kind)
        bv, gv = _posed(arrays, model, g, pose)
        res = closest_point(jnp.asarray(bv), model.faces, jnp.asarray(gv[~g.outer]))
        f = np.asarray(model.faces)[np.asarray(res.face)]
        n = np.cross(bv[f[:, 1]] - bv[f[:, 0]], bv[f[:, 2]] - bv[f[:, 0]])
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        side = ((gv[~g.outer] - np.asarray(res.point)) * n).sum(1)
        assert side.min() > 0.003 - 1e-4         # the inner surface keeps the 3 mm clearance


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="unknown garment kind"):
        G.make_garment(arrays, "hat")
    with pytest.raises(ValueError, match="looseness"):
        G.make_garment(arrays, "shirt", looseness=-0.01)
    with pytest.raises(ValueError, match="unknown shirt parameters"):
        G.make_garment(arrays, "shirt", flare=0.1)
    with pytest.raises(ValueError, match="unknown motion"):
        bs.motion_sequence("dance", None, 4, 30.0, arrays["joint_limits"])
    with pytest.raises(ValueError, match="config field n_subjects must be an integer >= 1, got 0"):
        bs.BodyVideoGenerator(_config(n_subjects=0))
    # the config is checked before the body model loads, naming the field
    for field, value, match in [("skirt_prob", 1.5, "skirt_prob must be a probability in \\[0, 1\\], got 1.5"),
                                ("motions", ("walk", "dance"), "motions must name motions of"),
                                ("n_frames", 0, "n_frames must be an integer >= 1, got 0")]:
        c = bs.tiny_config()
        c[field] = value
        with pytest.raises(ValueError, match=match):
            bs.check_config(c)
    c = bs.tiny_config()
    c.dome.n_cameras = -1
    with pytest.raises(ValueError, match="dome.n_cameras must be an integer >= 1, got -1"):
        bs.BodyVideoGenerator(c, model=object())


def test_part_cages_hold_their_surfaces(arrays):
    from dhjax.data import body_cages
    from dhjax.geometry import tetra
    from dhjax.ops import closest_point

    gs = {"upper": G.make_garment(arrays, "shirt"), "lower": G.make_garment(arrays, "skirt")}
    cages = body_cages.build_cages(arrays, gs, body_spacing=0.03, shell_radius=0.02, shell_spacing=0.017)
    for name, c in cages.items():
        assert c.stats["tets"] > 1000 and c.stats["min_quality"] > 1e-3, name
        assert not tetra.inverted_tets(c.mesh.nodes, c.mesh.tets).any(), name
        np.testing.assert_allclose(c.weights.sum(1), 1.0, atol=1e-4)
    for name, g in gs.items():           # every garment point lies in its cage (shell_cage checks too)
        _, _, inside = tetra.locate_points(cages[name].mesh, g.vertices[g.outer], closest_point=closest_point)
        assert np.asarray(inside).all(), name
    # The inflated body cage holds the body surface, except the thin mitten fingers' tips.
    _, _, inside = tetra.locate_points(cages["body"].mesh, arrays["v_template"], closest_point=closest_point)
    hands = np.isin(arrays["part_labels"], [bd.PART_NAMES.index("left_hand"), bd.PART_NAMES.index("right_hand")])
    assert np.asarray(inside)[~hands].mean() > 0.999
    # Body cage volume: the body's volume plus the inflation shell (margin x area), within 10%.
    v, f = arrays["v_template"].astype(np.float64), arrays["faces"]
    p = v[f]
    vol = np.einsum("ij,ij->i", p[:, 0], np.cross(p[:, 1], p[:, 2])).sum() / 6
    area = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1).sum()
    expect = vol + body_cages.default_body_margin(0.03) * area
    assert abs(cages["body"].stats["volume"] - expect) < 0.1 * expect
