"""The embedded procedural head model: structure, orientation, metric shape space, UVs, joints."""

import jax.numpy as jnp
import numpy as np

from dhjax.geometry import alignment
from dhjax.geometry import mesh as mesh_lib
from dhjax.io import landmark_schemes
from dhjax.models import flame, head_default


def test_default_head_structure():
    m = flame.load()
    V, F = m.num_vertices, m.faces.shape[0]
    assert m.shapedirs.shape == (300, V, 3) and m.exprdirs.shape == (100, V, 3)
    assert m.posedirs.shape == (36, V, 3) and m.j_regressor.shape == (5, V)
    official = flame.official_arrays(m)
    assert official["shapedirs"].shape == (V, 3, 300) and official["posedirs"].shape == (V, 3, 36)
    assert m.lbs_weights.shape == (V, 5) and m.parents == (-1, 0, 1, 1, 1)
    np.testing.assert_allclose(m.lbs_weights.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(m.j_regressor.sum(1), 1.0, atol=1e-6)
    assert m.lmk_faces.shape == (68,) and m.mp_lmk_faces.shape == m.mp_indices.shape
    assert m.uv_faces.shape == (F, 3) and float(m.uv_coords.min()) >= 0 and float(m.uv_coords.max()) <= 1
    assert int(m.faces.max()) < V and int(m.uv_faces.max()) < m.uv_coords.shape[0]
    assert set(m.regions) >= {"face", "scalp", "back_of_head", "eyes", "ears", "lips", "neck"}
    for name, mask in m.regions.items():
        assert mask.shape == (V,) and int(mask.sum()) > 0, name
    # Deterministic: two builds give identical bytes.
    a = flame.head_default.build_default_head_arrays.__wrapped__()
    b = flame.head_default.build_default_head_arrays.__wrapped__()
    for k in ("v_template", "shapedirs", "exprdirs", "posedirs", "lbs_weights", "lmk_bary"):
        assert a[k].tobytes() == b[k].tobytes(), k


def test_default_head_is_metric_and_oriented():
    m = flame.load()
    v = np.asarray(m.v_template)
    size = v.max(0) - v.min(0)
    assert 0.14 < size[0] < 0.22 and 0.25 < size[1] < 0.40 and 0.18 < size[2] < 0.26  # metres
    lmk = np.asarray(flame.forward(m).landmarks[0])
    # iBUG layout: the nose tip (30) is the most forward landmark, the chin (8) the lowest,
    # the subject's right eye (36-41) is at -x, the left eye (42-47) at +x.
    assert np.argmax(lmk[:, 2]) == 30
    assert np.argmin(lmk[:, 1]) == 8
    assert lmk[36:42, 0].mean() < 0 < lmk[42:48, 0].mean()
    iod = np.linalg.norm(lmk[36:42].mean(0) - lmk[42:48].mean(0))
    assert 0.05 < iod < 0.075
    # Face normals point outwards: the front of the face looks along +z.
    n = np.asarray(mesh_lib.vertex_normals(m.v_template, m.faces))
    tip = np.argmax(v[:, 2])
    assert n[tip, 2] > 0.8


def test_default_head_shape_space_is_metric():
    """Unit shape coefficients change the head by millimetres; +-3 sigma by tens of millimetres."""
    m = flame.load()
    v0 = np.asarray(flame.forward(m).vertices[0])
    s = np.zeros((1, 300), np.float32)
    s[0, 0] = 3.0
    v1 = np.asarray(flame.forward(m, s).vertices[0])
    width0, width1 = np.ptp(v0[:, 0]), np.ptp(v1[:, 0])
    assert 0.005 < abs(width1 - width0) < 0.05
    rng = np.random.default_rng(0)
    heights = [np.ptp(np.asarray(flame.forward(m, rng.normal(size=(1, 300))).vertices[0][:, 1]))
               for _ in range(6)]
    assert np.ptp(heights) > 0.003


def test_default_head_eyes_rotate_and_jaw_opens():
    m = flame.load()
    eyes = np.asarray(m.regions["eyes"])
    left = np.asarray(m.lbs_weights[:, 3]) > 0.5
    pose = np.zeros((1, 5, 3), np.float32)
    pose[0, 3] = [0.0, 0.4, 0.0]  # turn the left eye
    v0 = np.asarray(flame.forward(m).vertices[0])
    v1 = np.asarray(flame.forward(m, pose=pose).vertices[0])
    moved = np.linalg.norm(v1 - v0, axis=1) > 1e-4
    assert moved[left].mean() > 0.5 and not moved[~eyes].any()
    # The eyeball keeps its radius about the eye joint.
    j = np.asarray(flame.forward(m).joints[0, 3])
    np.testing.assert_allclose(np.linalg.norm(v1[left] - j, axis=1), np.linalg.norm(v0[left] - j, axis=1),
                               atol=1e-6)
    # Opening the jaw separates the inner lips (iBUG 62 upper, 66 lower).
    pose = np.zeros((1, 5, 3), np.float32)
    lmk0 = np.asarray(flame.forward(m, pose=pose).landmarks[0])
    pose[0, 2] = [0.3, 0.0, 0.0]
    lmk1 = np.asarray(flame.forward(m, pose=pose).landmarks[0])
    assert np.linalg.norm(lmk0[62] - lmk0[66]) < 1e-4
    assert lmk1[62, 1] - lmk1[66, 1] > 0.01
    assert np.linalg.norm(lmk1[27] - lmk0[27]) < 1e-6  # the nose bridge does not move


def test_metric_and_scale_aligned_errors_differ():
    """As for real faces (NoW: 1.92 mm metric vs 1.53 mm with scale), solving a scale hides part
    of the error of the mean head against random identities, because size varies."""
    m = flame.load()
    rng = np.random.default_rng(1)
    mean = np.asarray(flame.forward(m).vertices[0])
    rigid_err, sim_err = [], []
    for _ in range(8):
        v = np.asarray(flame.forward(m, rng.normal(size=(1, 300)).astype(np.float32)).vertices[0])
        for with_scale, errs in ((False, rigid_err), (True, sim_err)):
            s, R, t = alignment.umeyama(jnp.asarray(mean), jnp.asarray(v), with_scale=with_scale)
            aligned = np.asarray(alignment.apply_similarity(s, R, t, jnp.asarray(mean)))
            errs.append(np.mean(np.linalg.norm(aligned - v, axis=1)))
    rigid, sim = np.mean(rigid_err), np.mean(sim_err)
    assert 0.001 < rigid < 0.02           # millimetres to a couple of centimetres
    assert sim < 0.9 * rigid               # scale hides a real part of the error


def test_uv_layout_consistent():
    m = flame.load()
    uv, uvf, f = np.asarray(m.uv_coords), np.asarray(m.uv_faces), np.asarray(m.faces)
    assert uvf.shape == f.shape
    # Signed UV areas: every head face maps with one orientation (no flipped charts), nearly all
    # with non-zero area (the only zero-area ones are allowed at the lip seam).
    a = uv[uvf]
    area = 0.5 * ((a[:, 1, 0] - a[:, 0, 0]) * (a[:, 2, 1] - a[:, 0, 1])
                  - (a[:, 2, 0] - a[:, 0, 0]) * (a[:, 1, 1] - a[:, 0, 1]))
    skin = ~np.asarray(m.regions["eyes"])[f].any(1)
    assert (np.abs(area[skin]) > 0).all()
    signs = np.sign(area[skin])
    assert np.all(signs == signs[0])
    # Eyes live in the bottom strip, the head above it.
    eyes = np.asarray(m.regions["eyes"])[f].all(1)
    assert a[eyes][..., 1].max() < 0.16 and a[skin][..., 1].min() >= 0.16 - 1e-6


def test_landmarks_and_joints_where_their_names_say():
    m = flame.load()
    assert len(set(np.asarray(m.mp_indices).tolist())) == m.mp_indices.shape[0]
    assert int(np.asarray(m.mp_indices).max()) < landmark_schemes.N_MEDIAPIPE
    # The mediapipe subset is the io floor's table, and its points are the embedded iBUG ones.
    np.testing.assert_array_equal(np.asarray(m.mp_indices), landmark_schemes.MEDIAPIPE_INDICES)
    ids = landmark_schemes.MEDIAPIPE_TO_IBUG
    np.testing.assert_array_equal(np.asarray(m.mp_lmk_faces), np.asarray(m.lmk_faces)[ids])
    np.testing.assert_array_equal(np.asarray(m.mp_lmk_bary), np.asarray(m.lmk_bary)[ids])
    assert len(landmark_schemes.LANDMARK68_NAMES) == landmark_schemes.N_IBUG == m.lmk_faces.shape[0]
    np.testing.assert_allclose(np.asarray(m.lmk_bary).sum(1), 1.0, atol=1e-6)
    assert (np.asarray(m.lmk_bary) >= -1e-6).all()
    # Joints sit where the names say: eyes at the eyeball centres, jaw behind the mouth.
    j = np.asarray(flame.forward(m).joints[0])
    assert j[3, 0] > 0 > j[4, 0] and abs(j[3, 1] - j[4, 1]) < 1e-6
    assert j[0, 1] < j[1, 1] < j[2, 1] < j[3, 1]
    # The eyelid landmarks lie where the skin meets the eyeball (the visible eye contour).
    lmk = np.asarray(flame.forward(m).landmarks[0])
    for joint, sl in ((4, slice(36, 42)), (3, slice(42, 48))):
        d = np.linalg.norm(lmk[sl] - j[joint], axis=1)
        np.testing.assert_allclose(d, head_default.EYE_RADIUS, atol=1e-4)


def test_eye_uv_squares_show_the_front_of_the_eyes():
    """Texture space of each eyeball: the iris (square centre) maps to the front pole and no
    triangle overlaps another in UV."""
    from dhjax.render import raster

    m = flame.load()
    size = 512
    frags = raster.rasterize_uv(m.uv_coords, m.uv_faces, size, size)
    fid = np.asarray(frags.face_id[0])
    j = np.asarray(flame.forward(m).joints[0])
    v, f = np.asarray(m.v_template), np.asarray(m.faces)
    for u0, joint in ((0.02, 3), (0.18, 4)):
        # Texel of the square centre (u, v) = (u0 + 0.07, 0.075); rows count from the top (v = 1).
        col, row = int((u0 + 0.07) * size), int((1 - 0.075) * size)
        face = fid[row, col]
        assert face >= 0
        assert np.all(v[f[face], 2] > j[joint, 2] + 0.9 * head_default.EYE_RADIUS)
    uv = np.asarray(m.uv_coords)[np.asarray(m.uv_faces)]
    eye_faces = np.asarray(m.regions["eyes"])[f].all(1)
    area = 0.5 * np.abs((uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
                        - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1]))
    # No overlaps: the UV areas of one eye's triangles add up to at most its disc (radius 0.07).
    assert area[eye_faces].sum() / 2 <= np.pi * 0.07 ** 2 * 1.001


def test_eyelid_blendshapes_shut_each_eye_and_leave_the_rest():
    """At 1 an eyelid blendshape shuts its eye (the lid landmarks meet), at 0 nothing moves;
    each moves only its own side's skin, never an eyeball, and follows the head when posed."""
    m = flame.load()
    d = np.asarray(m.eyelid_dirs)
    assert d.shape == (2, m.num_vertices, 3) and np.all(np.isfinite(d))
    eyes = np.asarray(m.regions["eyes"])
    assert np.abs(d[:, eyes]).max() == 0.0
    x = np.asarray(m.v_template)[:, 0]
    moved = np.linalg.norm(d, axis=-1) > 1e-5
    assert moved[0].any() and moved[1].any()
    assert (x[moved[0]] > 0).all() and (x[moved[1]] < 0).all()     # left (+x) first
    # Skin moves only near the eyes: not on the nose, lips or below the cheeks.
    for name in ("lips", "nose", "neck"):
        assert not moved[:, np.asarray(m.regions[name])].any(), name

    def gaps(eyelids):
        lmk = np.asarray(flame.forward(m, eyelids=jnp.asarray([eyelids], jnp.float32)).landmarks[0])
        right = np.linalg.norm(lmk[[37, 38]] - lmk[[41, 40]], axis=1)
        left = np.linalg.norm(lmk[[43, 44]] - lmk[[47, 46]], axis=1)
        return left, right

    open_l, open_r = gaps([0.0, 0.0])
    np.testing.assert_array_equal(
        np.asarray(flame.forward(m, eyelids=jnp.zeros((1, 2))).vertices), np.asarray(flame.forward(m).vertices))
    shut_l, shut_r = gaps([1.0, 0.0])
    assert shut_l.max() < 0.1 * open_l.min()            # shut: within 10% of the opening
    np.testing.assert_allclose(shut_r, open_r, atol=1e-7)  # the other eye untouched
    half_l, _ = gaps([0.5, 0.0])
    assert shut_l.max() < half_l.min() < open_l.min()
    # Posed: the blendshape is skinned with the head (the whole head turns with the neck).
    pose = np.zeros((1, 5, 3), np.float32)
    pose[0, 1] = [0.0, 0.4, 0.0]
    rest = flame.forward(m, pose=pose)
    shut = flame.forward(m, pose=pose, eyelids=jnp.asarray([[1.0, 1.0]]))
    lm = np.asarray(shut.landmarks[0])
    assert np.linalg.norm(lm[[43, 44]] - lm[[47, 46]], axis=1).max() < 0.1 * open_l.min()
    assert not np.allclose(np.asarray(rest.vertices), np.asarray(shut.vertices))


def test_iris_points_sit_on_the_eyeballs_and_turn_with_the_eyes():
    """mediapipe's iris points 468-477: the centres at the eyeballs' front poles, the contour
    points IRIS_ANGLE_DEG from them (up, down, +x, -x), the subject's right eye first; they
    follow the eye joints."""
    m = flame.load()
    out = flame.forward(m)
    iris = np.asarray(out.iris[0]).reshape(2, 5, 3)
    j = np.asarray(out.joints[0])
    for k, joint in ((0, 4), (1, 3)):                   # right eye (joint 4, x < 0) first
        rel = iris[k] - j[joint]
        r = np.linalg.norm(rel, axis=1)
        assert np.all(r > 0.97 * head_default.EYE_RADIUS) and np.all(r <= head_default.EYE_RADIUS + 1e-6)
        ang = np.degrees(np.arccos(rel[1:] @ rel[0] / (r[1:] * r[0])))
        np.testing.assert_allclose(ang, head_default.IRIS_ANGLE_DEG, atol=0.5)
        np.testing.assert_allclose(rel[0] / r[0], [0, 0, 1], atol=1e-3)
        assert rel[1, 0] > rel[0, 0] > rel[3, 0] and rel[2, 1] > rel[0, 1] > rel[4, 1]
    assert iris[0, 0, 0] < 0 < iris[1, 0, 0]
    # The iris angle is the one the synthetic textures paint.
    from dhjax.data import textures
    np.testing.assert_allclose(np.cos(np.deg2rad(head_default.IRIS_ANGLE_DEG)), textures.IRIS_COS)
    pose = np.zeros((1, 5, 3), np.float32)
    pose[0, 3:] = [0.0, 0.3, 0.0]                       # both eyes look towards +x
    turned = np.asarray(flame.forward(m, pose=pose).iris[0]).reshape(2, 5, 3)
    assert np.all(turned[:, 0, 0] > iris[:, 0, 0] + 0.003)
