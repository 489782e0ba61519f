"""The embedded procedural body (dhjax.models.body_default): topology, skinning, layout."""

import numpy as np
import pytest

from dhjax.geometry import lbs, rotations
from dhjax.models import body_default as bd


@pytest.fixture(scope="module")
def arrays():
    return bd.build_default_body_arrays()


def _edges(f):
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0, return_counts=True)


def test_watertight_genus_zero_outward(arrays):
    v, f = arrays["v_template"].astype(np.float64), arrays["faces"]
    edges, counts = _edges(f)
    assert (counts == 2).all()                                   # closed 2-manifold
    assert v.shape[0] - edges.shape[0] + f.shape[0] == 2         # one sphere-like surface
    p = v[f]
    vol = np.einsum("ij,ij->i", p[:, 0], np.cross(p[:, 1], p[:, 2])).sum() / 6
    assert 0.04 < vol < 0.09                                     # outward; a ~65 kg person is ~0.065 m^3
    assert 1.6 < v[:, 1].max() - v[:, 1].min() < 1.85            # stature in metres


def test_layout_matches_smplx(arrays):
    assert len(bd.JOINT_NAMES) == 55 and len(bd.PARENTS) == 55
    V = arrays["v_template"].shape[0]
    assert arrays["shapedirs"].shape == (V, 3, 10) and arrays["exprdirs"].shape == (V, 3, 10)
    assert arrays["posedirs"].shape == (V, 3, 486)
    assert arrays["j_regressor"].shape == (55, V) and arrays["lbs_weights"].shape == (V, 55)
    smplx = pytest.importorskip("smplx.joint_names")
    assert tuple(smplx.JOINT_NAMES[:55]) == bd.JOINT_NAMES
    lim = arrays["joint_limits"]
    assert lim.shape == (55, 3, 2) and (lim[..., 0] <= lim[..., 1]).all()


def test_regressor_reproduces_rest_joints(arrays):
    joints, _ = bd._rest_joints()
    np.testing.assert_allclose(arrays["j_regressor"] @ arrays["v_template"], joints, atol=2e-6)
    np.testing.assert_allclose(arrays["j_regressor"].sum(1), 1.0, atol=1e-5)


def test_skinning_is_continuous_and_local(arrays):
    w, f, v = arrays["lbs_weights"], arrays["faces"], arrays["v_template"]
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert (w >= 0).all()
    edges, _ = _edges(f)
    jump = np.abs(w[edges[:, 0]] - w[edges[:, 1]]).sum(1)
    # Diffused weights: neighbouring vertices (1.5 cm apart) differ by a small amount; in the
    # mitten hands, whose finger bones run 1.8 cm apart, the transitions are sharper.
    hand = np.isin(arrays["part_labels"][edges[:, 0]], [bd.PART_NAMES.index("left_hand"), bd.PART_NAMES.index("right_hand")])
    assert jump[~hand].max() < 0.5 and jump[hand].max() < 0.6
    # The eyes own nothing; the feet are owned by the leg joints of their side only.
    assert w[:, [bd.J["left_eye_smplhf"], bd.J["right_eye_smplhf"]]].max() == 0
    left_foot = v[:, 1] < -0.85
    assert w[left_foot & (v[:, 0] > 0)][:, [bd.J[n] for n in bd.JOINT_NAMES if n.startswith("right")]].max() < 1e-3


def test_posing_stretches_no_edge_far(arrays):
    """Random poses within the joint limits keep every edge within a factor of its rest length."""
    import jax
    import jax.numpy as jnp

    v, f = arrays["v_template"], arrays["faces"]
    lim = arrays["joint_limits"]
    rng = np.random.default_rng(0)
    pose = lim[..., 0] + rng.uniform(size=(4, 55, 3)) * (lim[..., 1] - lim[..., 0])
    # The mitten's fingers bend together (independent curls would shear it apart).
    for side in ("left", "right"):
        fingers = [bd.J[f"{side}_{f}{k}"] for f in ("index", "middle", "ring", "pinky") for k in (1, 2, 3)]
        pose[:, fingers] = pose[:, fingers[:1]]
    rot = rotations.axis_angle_to_matrix(jnp.asarray(pose, jnp.float32))
    out, _ = lbs.lbs(jnp.broadcast_to(jnp.asarray(v), (4,) + v.shape), rot,
                     jnp.asarray(np.moveaxis(arrays["posedirs"], -1, 0)), jnp.asarray(arrays["j_regressor"]),
                     jnp.asarray(arrays["lbs_weights"]), bd.PARENTS)
    edges, _ = _edges(f)
    rest = np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1)
    posed = np.linalg.norm(np.asarray(out)[:, edges[:, 0]] - np.asarray(out)[:, edges[:, 1]], axis=2)
    ratio = posed / rest
    assert np.isfinite(ratio).all()
    # A tear (a weight discontinuity between neighbours) would stretch a 7 mm edge by the joint's
    # lever arm times the angle: tens of times. Smooth LBS at the limits of the joint ranges
    # stretches skin at most a few times (the buttocks at 90 degrees of hip flexion).
    assert ratio.max() < 8.0
    assert np.quantile(ratio, 0.99) < 2.0


def test_parts_uv_and_keypoints(arrays):
    parts = arrays["part_labels"]
    assert set(np.unique(parts)) == set(range(len(bd.PART_NAMES)))
    v = arrays["v_template"]
    # left parts on the left (+x), head on top
    for name in ("left_arm", "left_hand", "left_leg", "left_foot"):
        assert (v[parts == bd.PART_NAMES.index(name), 0] > 0).mean() > 0.99
    assert v[parts == bd.PART_NAMES.index("head"), 1].min() > 0.5
    uv, uvf = arrays["uv_coords"], arrays["uv_faces"]
    assert uvf.shape == arrays["faces"].shape and uvf.max() < uv.shape[0]
    assert (uv >= 0).all() and (uv <= 1).all()
    # UV triangles keep the mesh's orientation (as the head's layout), except a few around the
    # charts' poles (the ends of limbs, the top of the head) that the cylindrical map folds.
    p = uv[uvf]
    area = np.cross(np.c_[p[:, 1] - p[:, 0], np.zeros(len(p))], np.c_[p[:, 2] - p[:, 0], np.zeros(len(p))])[:, 2]
    assert (area > 0).mean() > 0.97
    # each part's chart stays in its own tile of the 4 x 3 grid
    fp = arrays["face_part_labels"]
    for k in range(len(bd.PART_NAMES)):
        t = uv[uvf[fp == k]].reshape(-1, 2)
        col, row = k % 4, k // 4
        assert (np.floor(t[:, 0] * 4) == col).all() and (np.floor((1 - t[:, 1]) * 3) == row).all()
    # face keypoints lie on the front of the head, left eye corners at +x
    f, lf, lb = arrays["faces"], arrays["lmk_faces"], arrays["lmk_bary"]
    kp = np.einsum("lkc,lk->lc", v[f[lf]], lb)
    assert kp.shape == (51, 3) and (kp[:, 2] > 0.05).all() and (kp[:, 1] > 0.57).all()
    assert kp[45 - 17, 0] > 0.02 and kp[36 - 17, 0] < -0.02     # iBUG 45 = left outer eye corner


def test_shape_components_do_what_they_say(arrays):
    v, sd = arrays["v_template"], arrays["shapedirs"]
    height = lambda x: x[:, 1].max() - x[:, 1].min()
    assert height(v + sd[..., bd.SHAPE_NAMES.index("stature")]) - height(v) == pytest.approx(0.07, abs=1e-3)
    span = lambda x: x[:, 0].max() - x[:, 0].min()
    assert span(v + sd[..., bd.SHAPE_NAMES.index("arm_length")]) - span(v) == pytest.approx(0.08, abs=2e-3)
    legs = v + sd[..., bd.SHAPE_NAMES.index("leg_length")]
    assert v[:, 1].min() - legs[:, 1].min() == pytest.approx(0.05, abs=1e-3)
