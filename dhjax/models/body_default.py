"""The embedded procedural body: a watertight mesh with SMPL-X's parameter layout.

`build_default_body_arrays()` returns the arrays `dhjax.models.body.from_arrays` takes (the
normalised layout of an official SMPL-X file plus part labels, joint limits, face keypoints and
a UV layout), so code written against `body.load()` runs unchanged on the official model.

THIS IS NOT A STATISTICAL MODEL OF PEOPLE. Nothing in it was learned from scans. It is a
hand-built mannequin in SMPL-X's coordinate frame (metres, y up, facing +z, the person's left
at +x, T-pose rest, the pelvis joint at the origin), about 1.71 m tall (the template vertices span 1.713 m), built as:

* Surface: the zero level of a smooth union (polynomial smooth-min) of ellipsoids and round
  cones (pelvis, abdomen, chest, shoulder girdle, buttocks, neck, skull, chin, nose, ears, limb
  segments, palms, fingers, feet), extracted by marching tetrahedra
  (`dhjax.geometry.isosurface`) at 1.5 cm and relaxed (tangential smoothing, re-projection on
  the level set). Watertight and genus 0.
* Joints: the 55 SMPL-X joints placed by hand; `j_regressor` reproduces them exactly at rest as
  an affine combination of the vertices of a ring around each joint, so joints follow shape.
* Skinning: per vertex a softmin over the distances to the joints' bone segments, limited to
  the bones of the body part the vertex belongs to, then diffused over the mesh so weights vary
  continuously; the jaw owns the chin below the mouth line; the eye joints own nothing.
* Shape space (10, coefficient 1 = one hand-chosen "standard deviation", displacements in
  metres, all exactly linear): 0 stature (7 cm), 1 girth (trunk and limbs), 2 shoulder width,
  3 hip width, 4 leg length (5 cm), 5 arm length (4 cm), 6 limb thickness, 7 belly, 8 chest
  depth, 9 head size. The components are not orthogonal and carry no population statistics.
* Expression space (10): local bumps on the face (0 smile, 1 lower lip down, 2 pucker, 3 brow
  raise, 4 brow furrow, 5 cheek puff, 6 nose wrinkle, 7 lip press, 8 left smirk, 9 squint).
* Pose correctives: none (`posedirs` is zero); the forward pass still applies them, so an
  official file's correctives work.

Simplified against SMPL-X: hands are mittens (fingers merge at this resolution; the finger
joints bend slices of the mitten), there are no eyeballs, eyelids or mouth interior (the face is
a smooth ellipsoid with nose, chin and ears), and the UV layout is one cylindrical chart per
part on a 4 x 3 grid of equal tiles (not area-balanced; seams run along the back, the underside
of the arms and hands, the back of the legs and the soles).
"""

from __future__ import annotations

import functools

import numpy as np

from dhjax.geometry import isosurface

JOINT_NAMES = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "jaw", "left_eye_smplhf", "right_eye_smplhf",
    *(f"{side}_{finger}{k}" for side in ("left", "right")
      for finger in ("index", "middle", "pinky", "ring", "thumb") for k in (1, 2, 3)))
PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
           20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
           21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53)
PART_NAMES = ("head", "torso", "left_arm", "right_arm", "left_hand", "right_hand", "left_leg",
              "right_leg", "left_foot", "right_foot")
SHAPE_NAMES = ("stature", "girth", "shoulder_width", "hip_width", "leg_length", "arm_length",
               "limb_thickness", "belly", "chest_depth", "head_size")
EXPRESSION_NAMES = ("smile", "lower_lip_down", "pucker", "brow_raise", "brow_furrow",
                    "cheek_puff", "nose_wrinkle", "lip_press", "left_smirk", "squint")
SPACING = 0.015          # marching-tetrahedra lattice spacing (m)
J = {n: i for i, n in enumerate(JOINT_NAMES)}
_FINGERS = ("index", "middle", "pinky", "ring", "thumb")


def _mirror(p):
    return np.array([-p[0], p[1], p[2]])


def _rest_joints() -> tuple[np.ndarray, dict]:
    """[55, 3] rest joints and the end points of leaf bones (metres)."""
    j = np.zeros((55, 3))
    left = {
        "hip": (0.095, -0.07, 0.0), "knee": (0.10, -0.50, 0.01), "ankle": (0.10, -0.87, -0.025),
        "foot": (0.11, -0.925, 0.10), "collar": (0.07, 0.41, -0.01), "shoulder": (0.18, 0.43, -0.015),
        "elbow": (0.44, 0.43, -0.025), "wrist": (0.685, 0.43, -0.01),
        "index1": (0.775, 0.43, 0.024), "middle1": (0.78, 0.43, 0.006), "ring1": (0.775, 0.43, -0.012),
        "pinky1": (0.765, 0.43, -0.029), "thumb1": (0.715, 0.42, 0.03),
        "thumb2": (0.745, 0.415, 0.052), "thumb3": (0.77, 0.41, 0.068),
    }
    step = {"index": (0.035, 0.025), "middle": (0.038, 0.027), "ring": (0.035, 0.025),
            "pinky": (0.028, 0.02)}
    for name, p in list(left.items()):
        if name.endswith("1") and name[:-1] in step:
            a, b = step[name[:-1]]
            left[name[:-1] + "2"] = (p[0] + a, p[1], p[2])
            left[name[:-1] + "3"] = (p[0] + a + b, p[1], p[2])
    for name, p in left.items():
        key = name if name in ("hip", "knee", "ankle", "foot", "collar", "shoulder", "elbow", "wrist") else name
        j[J["left_" + key]] = p
        j[J["right_" + key]] = _mirror(np.asarray(p))
    j[J["pelvis"]] = (0.0, 0.0, 0.0)
    j[J["spine1"]] = (0.0, 0.10, -0.01)
    j[J["spine2"]] = (0.0, 0.23, -0.005)
    j[J["spine3"]] = (0.0, 0.30, -0.005)
    j[J["neck"]] = (0.0, 0.465, -0.01)
    j[J["head"]] = (0.0, 0.585, -0.005)
    j[J["jaw"]] = (0.0, 0.615, 0.03)
    j[J["left_eye_smplhf"]] = (0.032, 0.665, 0.075)
    j[J["right_eye_smplhf"]] = (-0.032, 0.665, 0.075)
    ends = {"head": (0.0, 0.775, 0.0), "jaw": (0.0, 0.578, 0.085)}
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        ends[f"{side}_foot"] = (sgn * 0.11, -0.925, 0.165)
        for f in ("index", "middle", "ring", "pinky"):
            p = j[J[f"{side}_{f}3"]]
            ends[f"{side}_{f}3"] = (p[0] + sgn * 0.022, p[1], p[2])
        p = j[J[f"{side}_thumb3"]]
        ends[f"{side}_thumb3"] = (p[0] + sgn * 0.018, p[1] - 0.003, p[2] + 0.012)
    return j, {k: np.asarray(v) for k, v in ends.items()}


# ----------------------------------------------------------------------------------------------
# The implicit surface.


def _smin(a, b, k):
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def _round_cone(p, a, b, ra, rb):
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1) - (ra + t * (rb - ra))


def _ellipsoid(p, c, r):
    r = np.asarray(r, np.float64)
    q = (p - c) / r
    k0 = np.linalg.norm(q, axis=1)
    k1 = np.linalg.norm(q / r, axis=1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def _primitives(joints, ends):
    """[(name, group, sdf(p), allowed joint names)]: the pieces of the mannequin."""
    P = []
    jt = lambda n: joints[J[n]]

    def add(name, group, fn, allowed):
        P.append((name, group, fn, tuple(allowed)))

    add("pelvis", "trunk", lambda p: _ellipsoid(p, np.array([0, -0.03, 0.0]), (0.155, 0.11, 0.10)),
        ("pelvis", "spine1", "left_hip", "right_hip"))
    add("abdomen", "trunk", lambda p: _ellipsoid(p, np.array([0, 0.13, 0.0]), (0.135, 0.12, 0.092)),
        ("pelvis", "spine1", "spine2"))
    add("chest", "trunk", lambda p: _ellipsoid(p, np.array([0, 0.31, 0.0]), (0.16, 0.13, 0.102)),
        ("spine1", "spine2", "spine3", "left_collar", "right_collar", "neck"))
    add("neck", "trunk", lambda p: _round_cone(p, np.array([0, 0.43, -0.01]), np.array([0, 0.60, 0.0]),
                                               0.056, 0.05), ("spine3", "neck", "head"))
    add("skull", "head", lambda p: _ellipsoid(p, np.array([0, 0.665, 0.012]), (0.077, 0.11, 0.097)),
        ("neck", "head"))
    add("chin", "head", lambda p: _ellipsoid(p, np.array([0, 0.598, 0.045]), (0.052, 0.042, 0.056)),
        ("neck", "head"))
    add("nose", "head", lambda p: _ellipsoid(p, np.array([0, 0.652, 0.103]), (0.012, 0.022, 0.02)),
        ("head",))
    for side, sgn in (("left", 1.0), ("right", -1.0)):
        s = lambda n: f"{side}_{n}"
        add(s("ear"), "head", functools.partial(
            lambda p, c: _ellipsoid(p, c, (0.012, 0.03, 0.018)), c=np.array([sgn * 0.076, 0.66, 0.0])),
            ("head",))
        add(s("buttock"), "trunk", functools.partial(
            lambda p, c: _ellipsoid(p, c, (0.075, 0.09, 0.07)), c=np.array([sgn * 0.07, -0.08, -0.045])),
            ("pelvis", s("hip")))
        add(s("girdle"), "trunk", functools.partial(
            lambda p, a, b: _round_cone(p, a, b, 0.062, 0.05), a=np.array([0, 0.41, -0.012]),
            b=jt(s("shoulder"))), ("spine2", "spine3", s("collar"), s("shoulder")))
        seg = lambda a, b, ra, rb: functools.partial(
            lambda p, a, b, ra, rb: _round_cone(p, a, b, ra, rb), a=a, b=b, ra=ra, rb=rb)
        add(s("thigh"), s("leg"), seg(jt(s("hip")), jt(s("knee")), 0.08, 0.053),
            ("pelvis", s("hip"), s("knee")))
        add(s("shin"), s("leg"), seg(jt(s("knee")), jt(s("ankle")), 0.05, 0.034),
            (s("hip"), s("knee"), s("ankle")))
        add(s("foot"), s("leg"), functools.partial(
            lambda p, c: _ellipsoid(p, c, (0.043, 0.033, 0.118)), c=np.array([sgn * 0.105, -0.905, 0.045])),
            (s("knee"), s("ankle"), s("foot")))
        add(s("upper_arm"), s("arm"), seg(jt(s("shoulder")), jt(s("elbow")), 0.047, 0.036),
            ("spine3", s("collar"), s("shoulder"), s("elbow")))
        add(s("forearm"), s("arm"), seg(jt(s("elbow")), jt(s("wrist")), 0.035, 0.025),
            (s("shoulder"), s("elbow"), s("wrist")))
        add(s("palm"), s("hand"), functools.partial(
            lambda p, c: _ellipsoid(p, c, (0.05, 0.016, 0.045)), c=np.array([sgn * 0.733, 0.43, -0.004])),
            (s("elbow"), s("wrist"), *(s(f + "1") for f in _FINGERS)))
        for f in _FINGERS:
            chain = [jt(s(f"{f}{k}")) for k in (1, 2, 3)] + [ends[s(f"{f}3")]]
            # Neighbouring fingers overlap (spacing 1.8 cm, radius >= 0.95 cm): one solid mitten,
            # whose topology does not depend on how the lattice falls.
            r0 = 0.0125 if f == "thumb" else 0.0105
            for k in range(3):
                allowed = (s("wrist"),) + tuple(s(f"{f}{i}") for i in (1, 2, 3))
                add(s(f"{f}_{k}"), s("hand"), seg(chain[k], chain[k + 1], r0 - 0.0004 * k, r0 - 0.0004 * (k + 1)),
                    allowed)
    return P


_GROUP_K = {"trunk": 0.06, "head": 0.012}      # smooth-min radius within a group (m); limbs 0.02, hands 0.006
_JOIN_K = 0.02                                   # between groups


def _group_k(group):
    if group in _GROUP_K:
        return _GROUP_K[group]
    return 0.006 if group.endswith("hand") else 0.02


def _field(prims, p):
    """Smooth-union signed distance (approximate) of the mannequin at points p [N, 3]."""
    groups: dict = {}
    for _, g, fn, _ in prims:
        d = fn(p)
        groups[g] = d if g not in groups else _smin(groups[g], d, _group_k(g))
    out = None
    for g in ("trunk", "head", "left_arm", "right_arm", "left_leg", "right_leg", "left_hand", "right_hand"):
        out = groups[g] if out is None else _smin(out, groups[g], _JOIN_K)
    return out


# ----------------------------------------------------------------------------------------------
# Mesh utilities.


def _neighbours(faces, n):
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.unique(np.sort(e, axis=1), axis=0)
    deg = np.bincount(e.ravel(), minlength=n).astype(np.float64)
    return e, deg


def _umbrella(x, edges, deg):
    acc = np.zeros_like(x)
    np.add.at(acc, edges[:, 0], x[edges[:, 1]])
    np.add.at(acc, edges[:, 1], x[edges[:, 0]])
    return acc / deg.reshape((-1,) + (1,) * (x.ndim - 1))


def _vertex_normals(v, f):
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _relax(v, f, fn, iters=5):
    """Tangential smoothing then projection back on the level set, `iters` times."""
    edges, deg = _neighbours(f, v.shape[0])
    eps = 1e-4
    for _ in range(iters):
        n = _vertex_normals(v, f)
        lap = _umbrella(v, edges, deg) - v
        v = v + 0.5 * (lap - (lap * n).sum(1, keepdims=True) * n)
        d = fn(v)
        g = np.stack([(fn(v + eps * e) - d) / eps for e in np.eye(3)], 1)
        v = v - (d / np.maximum((g * g).sum(1), 1e-6))[:, None] * g
    d = fn(v)   # a last projection step so the vertices sit on the level set
    g = np.stack([(fn(v + eps * e) - d) / eps for e in np.eye(3)], 1)
    v = v - (d / np.maximum((g * g).sum(1), 1e-6))[:, None] * g
    return v


def _seg_dist(p, a, b):
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-12), 0.0, 1.0)
    q = a + t[:, None] * ab
    return np.linalg.norm(p - q, axis=1), q


def _bones(joints, ends):
    """{joint index: (start, end)}: the segment each joint owns (eyes own none)."""
    child = {}
    for j, p in enumerate(PARENTS):
        if p >= 0 and p not in child:
            child[p] = j
    child[J["pelvis"]] = J["spine1"]
    child[J["spine3"]] = J["neck"]
    child[J["left_wrist"]], child[J["right_wrist"]] = J["left_middle1"], J["right_middle1"]
    bones = {}
    for j, name in enumerate(JOINT_NAMES):
        if "eye" in name:
            continue
        if name in ends:
            bones[j] = (joints[j], ends[name])
        elif j in child:
            bones[j] = (joints[j], joints[child[j]])
    return bones


def _skinning(v, f, prims, joints, ends):
    """[V, 55] continuous skinning weights (rows sum to 1)."""
    bones = _bones(joints, ends)
    dist = np.full((v.shape[0], 55), np.inf)
    for j, (a, b) in bones.items():
        dist[:, j] = _seg_dist(v, a, b)[0]
    own = np.stack([fn(v) for _, _, fn, _ in prims], 1).argmin(1)        # dominant primitive
    allowed = np.zeros((len(prims), 55), bool)
    for i, (_, _, _, names) in enumerate(prims):
        allowed[i, [J[n] for n in names]] = True
    d = np.where(allowed[own], dist, np.inf)
    w = np.exp(-(d - d.min(1, keepdims=True)) / 0.012)
    w /= w.sum(1, keepdims=True)
    # The jaw owns the chin and lower face below the mouth line (a distance rule would also give
    # it the cheeks and eyes).
    head_like = np.isin(own, [i for i, (n, *_) in enumerate(prims) if n in ("skull", "chin")])
    ss = lambda x: np.clip(x, 0, 1) ** 2 * (3 - 2 * np.clip(x, 0, 1))
    jaw = head_like * ss((0.632 - v[:, 1]) / 0.03) * ss((v[:, 2] - 0.0) / 0.03) * ss((v[:, 1] - 0.548) / 0.02)
    w = w * (1 - jaw)[:, None]
    w[:, J["jaw"]] += jaw
    edges, deg = _neighbours(f, v.shape[0])
    for _ in range(25):
        w = 0.5 * w + 0.5 * _umbrella(w, edges, deg)
    return w / w.sum(1, keepdims=True)


def _regressor(v, w, joints):
    """[55, V]: each rest joint as an affine combination of a ring of vertices around it."""
    reg = np.zeros((55, v.shape[0]))
    bones = _bones(joints, _rest_joints()[1])
    for j in range(55):
        p = joints[j]
        if j in bones:
            axis = bones[j][1] - bones[j][0]
        else:
            axis = p - joints[PARENTS[j]]
        axis = axis / np.linalg.norm(axis)
        fam = [j] + ([PARENTS[j]] if PARENTS[j] >= 0 else [])
        near = np.linalg.norm(v - p, axis=1)
        cand = np.nonzero((np.abs((v - p) @ axis) < 0.02) & (w[:, fam].sum(1) > 0.3) & (near < 0.25))[0]
        if cand.size < 12:
            cand = np.argsort(near)[:40]
        A = np.concatenate([np.ones((1, cand.size)), v[cand].T])               # [4, k]
        w0 = np.full(cand.size, 1.0 / cand.size)
        lam = np.linalg.solve(A @ A.T, np.concatenate([[1.0], p]) - A @ w0)
        reg[j, cand] = w0 + A.T @ lam
    return reg


# ----------------------------------------------------------------------------------------------
# Shape and expression spaces.


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _side_weights(w, side):
    names = [n for n in JOINT_NAMES if n.startswith(side + "_")]
    arm = [J[n] for n in names if any(k in n for k in ("collar", "shoulder", "elbow", "wrist", *_FINGERS))]
    leg = [J[n] for n in names if any(k in n for k in ("hip", "knee", "ankle", "foot"))]
    return w[:, arm].sum(1), w[:, leg].sum(1)


def _radial(v, w, joints, ends, which):
    """Σ_j w_j (v - closest point of bone j), over the joints `which`: the outward offset of a
    vertex from its bones."""
    bones = _bones(joints, ends)
    out = np.zeros_like(v)
    for j in which:
        if j in bones:
            out += w[:, j:j + 1] * (v - _seg_dist(v, *bones[j])[1])
    return out


def _shape_fields(v, w, joints, ends):
    """[V, 3, 10] shape blendshapes (metres per unit coefficient)."""
    y_floor, y_top = v[:, 1].min(), v[:, 1].max()
    trunk = [J[n] for n in ("pelvis", "spine1", "spine2", "spine3")]
    limbs = [J[n] for n in JOINT_NAMES if any(k in n for k in ("shoulder", "elbow", "hip", "knee"))]
    sign = np.sign(v[:, 0])
    arm_l, leg_l = _side_weights(w, "left")
    arm_r, leg_r = _side_weights(w, "right")
    arm = np.where(v[:, 0] > 0, arm_l, arm_r)
    leg = np.where(v[:, 0] > 0, leg_l, leg_r)
    m_trunk = w[:, trunk].sum(1, keepdims=True)
    radial_trunk = np.stack([v[:, 0], np.zeros(len(v)), v[:, 2] + 0.005], 1)
    radial_limbs = _radial(v, w, joints, ends, limbs)
    head = w[:, [J["head"], J["jaw"]]].sum(1, keepdims=True)
    y_hip = joints[J["left_hip"], 1]
    x_sh, x_tip = joints[J["left_shoulder"], 0], np.abs(v[:, 0]).max()
    ex = np.eye(3)
    fields = [
        0.07 * ((v[:, 1] - y_floor) / (y_top - y_floor))[:, None] * ex[1],
        0.07 * m_trunk * radial_trunk + 0.05 * radial_limbs,
        0.02 * (sign * arm)[:, None] * ex[0],
        0.10 * (v[:, 0] * w[:, J["pelvis"]])[:, None] * ex[0] + 0.02 * (sign * leg)[:, None] * ex[0],
        -0.05 * np.clip((y_hip - v[:, 1]) / (y_hip - y_floor), 0, 1)[:, None] * ex[1],
        0.04 * (sign * arm * np.clip((np.abs(v[:, 0]) - x_sh) / (x_tip - x_sh), 0, 1))[:, None] * ex[0],
        0.08 * radial_limbs,
        0.035 * (np.exp(-((v[:, 1] - 0.1) ** 2 + v[:, 0] ** 2) / (2 * 0.07 ** 2)) * _smoothstep(v[:, 2] / 0.04))[:, None] * ex[2],
        0.3 * (m_trunk[:, 0] * np.exp(-(v[:, 1] - 0.3) ** 2 / (2 * 0.08 ** 2)) * (v[:, 2] + 0.005))[:, None] * ex[2],
        0.08 * head * (v - joints[J["head"]]),
    ]
    return np.stack(fields, -1)


def _face_anchors(v):
    """Named points on the front of the face (projected on the mesh along -z)."""
    def front(x, y):
        sel = (np.abs(v[:, 0] - x) < 0.012) & (np.abs(v[:, 1] - y) < 0.012) & (v[:, 2] > 0)
        z = v[sel, 2].max() if sel.any() else 0.09
        return np.array([x, y, z])
    return {
        "mouth": front(0.0, 0.612), "lower_lip": front(0.0, 0.602), "upper_lip": front(0.0, 0.622),
        "corner_l": front(0.024, 0.612), "corner_r": front(-0.024, 0.612),
        "brow_l": front(0.032, 0.69), "brow_r": front(-0.032, 0.69),
        "brow_in_l": front(0.014, 0.688), "brow_in_r": front(-0.014, 0.688),
        "cheek_l": front(0.045, 0.635), "cheek_r": front(-0.045, 0.635),
        "nose": front(0.0, 0.655), "under_eye_l": front(0.032, 0.652), "under_eye_r": front(-0.032, 0.652),
    }


def _expression_fields(v):
    """[V, 3, 10] expression blendshapes: Gaussian bumps of the face (metres per unit)."""
    a = _face_anchors(v)
    front = _smoothstep((v[:, 2] - 0.02) / 0.03) * _smoothstep((v[:, 1] - 0.55) / 0.02)

    def bump(name, vec, sigma=0.012):
        d2 = ((v - a[name]) ** 2).sum(1)
        return (np.exp(-d2 / (2 * sigma ** 2)) * front)[:, None] * np.asarray(vec)

    fields = [
        bump("corner_l", (0.004, 0.005, -0.002)) + bump("corner_r", (-0.004, 0.005, -0.002)),
        bump("lower_lip", (0.0, -0.006, 0.0), 0.01),
        bump("mouth", (0.0, 0.0, 0.008), 0.014) + bump("corner_l", (-0.004, 0, 0)) + bump("corner_r", (0.004, 0, 0)),
        bump("brow_l", (0.0, 0.006, 0.0), 0.015) + bump("brow_r", (0.0, 0.006, 0.0), 0.015),
        bump("brow_in_l", (-0.003, -0.003, 0.001)) + bump("brow_in_r", (0.003, -0.003, 0.001)),
        bump("cheek_l", (0.005, 0.0, 0.002), 0.016) + bump("cheek_r", (-0.005, 0.0, 0.002), 0.016),
        bump("nose", (0.0, 0.003, -0.001), 0.012),
        bump("mouth", (0.0, 0.0, -0.004), 0.012),
        bump("corner_l", (0.004, 0.005, -0.002)),
        bump("under_eye_l", (0.0, 0.004, 0.0), 0.01) + bump("under_eye_r", (0.0, 0.004, 0.0), 0.01),
    ]
    return np.stack(fields, -1)


# ----------------------------------------------------------------------------------------------
# Labels, UVs, limits, keypoints.

def _joint_part() -> np.ndarray:
    """[55] part of each joint: `dhjax.models.body.JOINT_PARTS`, one table for both models."""
    from dhjax.models import body

    assert body.PART_NAMES == PART_NAMES and body.JOINT_NAMES == JOINT_NAMES
    return np.asarray(body.JOINT_PARTS)


def _charts(joints):
    """Per part: (centre, axis, reference direction) of its cylindrical UV chart."""
    y, z, x = np.eye(3)[1], np.eye(3)[2], np.eye(3)[0]
    c = {"head": (joints[J["head"]], y, z), "torso": (joints[J["spine1"]], y, z)}
    for side, s in (("left", 1.0), ("right", -1.0)):
        c[f"{side}_arm"] = (joints[J[f"{side}_shoulder"]], s * x, y)
        c[f"{side}_hand"] = (joints[J[f"{side}_wrist"]], s * x, y)
        c[f"{side}_leg"] = (joints[J[f"{side}_hip"]], -y, z)
        c[f"{side}_foot"] = (joints[J[f"{side}_ankle"]], z, y)
    return c


def _uv_layout(v, f, face_part, joints):
    """(uv_coords [T, 2], uv_faces [F, 3]): one cylindrical chart per part on a 4 x 3 grid."""
    charts = _charts(joints)
    theta = np.zeros(f.shape + (1,))[..., 0]
    t = np.zeros(f.shape)
    for k, name in enumerate(PART_NAMES):
        sel = face_part == k
        centre, axis, ref = charts[name]
        side = np.cross(ref, axis)          # u grows clockwise seen along the axis: UV triangles
        d = v[f[sel]] - centre              # keep the mesh's (counter-clockwise) orientation
        theta[sel] = np.arctan2(d @ side, d @ ref)
        t[sel] = d @ axis
    # Faces across the seam (corners on both sides of theta = +-pi): move the corners below
    # -pi/2 up by 2 pi. Faces around a chart's axis (its poles) get squashed into the tile.
    wrap = (theta.max(1) > np.pi / 2) & (theta.min(1) < -np.pi / 2)
    shifted = wrap[:, None] & (theta < -np.pi / 2)
    theta = theta + 2 * np.pi * shifted
    uv = np.zeros(f.shape + (2,))
    for k, name in enumerate(PART_NAMES):
        sel = face_part == k
        if not sel.any():
            continue
        col, row = k % 4, k // 4
        u = np.clip((theta[sel] + np.pi) / (2 * np.pi) / 1.15, 0, 1)   # room for the seam's overhang
        tt = t[sel]
        s = (tt - tt.min()) / max(tt.max() - tt.min(), 1e-9)
        uv[sel, :, 0] = (col + 0.02 + 0.96 * u) / 4
        uv[sel, :, 1] = 1 - (row + 0.02 + 0.96 * s) / 3
    # One UV vertex per (vertex, chart, seam side): vertices on chart borders and seams split.
    key = (f * len(PART_NAMES) + face_part[:, None]) * 2 + shifted
    uniq, inv = np.unique(key.ravel(), return_inverse=True)
    coords = np.zeros((uniq.size, 2))
    coords[inv] = uv.reshape(-1, 2)
    return coords, inv.reshape(f.shape)


def _joint_limits():
    """[55, 3, 2] lower/upper bounds of each joint's axis-angle components (radians)."""
    L = np.zeros((55, 3, 2))

    def put(name, x, y, z):
        L[J[name]] = np.array([x, y, z])

    put("pelvis", (-0.3, 0.3), (-np.pi, np.pi), (-0.3, 0.3))
    for s in ("spine1", "spine2", "spine3"):
        put(s, (-0.2, 0.35), (-0.3, 0.3), (-0.2, 0.2))
    put("neck", (-0.3, 0.4), (-0.5, 0.5), (-0.25, 0.25))
    put("head", (-0.3, 0.3), (-0.4, 0.4), (-0.2, 0.2))
    put("jaw", (0.0, 0.35), (-0.05, 0.05), (-0.05, 0.05))
    for side, s in (("left", 1.0), ("right", -1.0)):
        lim = lambda lo, hi: tuple(sorted((s * lo, s * hi)))
        put(f"{side}_hip", (-1.6, 0.4), (-0.5, 0.5), lim(-0.3, 0.8))
        put(f"{side}_knee", (0.0, 2.2), (-0.1, 0.1), (-0.05, 0.05))
        put(f"{side}_ankle", (-0.5, 0.4), (-0.2, 0.2), (-0.25, 0.25))
        put(f"{side}_foot", (-0.3, 0.4), (0.0, 0.0), (0.0, 0.0))
        put(f"{side}_collar", (-0.1, 0.1), (-0.15, 0.15), lim(-0.1, 0.25))
        put(f"{side}_shoulder", (-0.8, 0.8), lim(-1.4, 0.5), lim(-1.35, 0.8))
        put(f"{side}_elbow", (-0.2, 0.2), lim(-2.4, 0.0), (-0.05, 0.05))
        put(f"{side}_wrist", (-0.8, 0.8), (-0.4, 0.4), lim(-0.9, 0.7))
        for f in _FINGERS:
            for k in (1, 2, 3):
                if f == "thumb":
                    put(f"{side}_{f}{k}", (-0.4, 0.4), (-0.3, 0.3), (-0.3, 0.3))
                else:
                    put(f"{side}_{f}{k}", (-0.05, 0.05), (-0.1, 0.1) if k == 1 else (0, 0), lim(-1.4, 0.1))
    return L


def _face_keypoints(v, f):
    """51 inner iBUG face points (iBUG 17..67) painted on the face: the default head model's
    landmark layout scaled to this face and projected on the mesh; (faces [51], bary [51, 3])."""
    import jax.numpy as jnp

    from dhjax.models import head_default
    from dhjax.ops import closest_point

    head = head_default.build_default_head_arrays()        # cached per process
    tri = head["v_template"][head["faces"][head["lmk_faces"]]]                        # [68, 3, 3]
    lmk = np.einsum("lkc,lk->lc", tri, head["lmk_bary"])[17:]                           # [51, 3]
    eyes = lmk[[36 - 17, 39 - 17, 42 - 17, 45 - 17]].reshape(2, 2, 3).mean(1)       # right, left
    mouth = lmk[[48 - 17, 54 - 17]].mean(0)
    anchors = _face_anchors(v)
    src_eye_c, src_mouth = eyes.mean(0), mouth
    dst_eye_c, dst_mouth = np.array([0.0, 0.665]), anchors["mouth"][:2]
    sy = (dst_eye_c[1] - dst_mouth[1]) / (src_eye_c[1] - src_mouth[1])
    sx = 0.064 / abs(eyes[1, 0] - eyes[0, 0])
    xy = np.stack([(lmk[:, 0] - src_eye_c[0]) * sx, (lmk[:, 1] - src_eye_c[1]) * sy + dst_eye_c[1]], 1)
    # Start each point in front of the face and take its closest point on the front of the head.
    front = np.nonzero((v[f].mean(1)[:, 2] > 0.03) & (v[f].mean(1)[:, 1] > 0.55))[0]
    q = np.concatenate([xy, np.full((51, 1), 0.15)], 1)
    res = closest_point(jnp.asarray(v, jnp.float32), jnp.asarray(f[front], jnp.int32), jnp.asarray(q, jnp.float32))
    # Re-project from the first hit straight along -z so points keep their x, y layout.
    q2 = np.asarray(res.point, np.float64)
    q2[:, :2] = xy
    res = closest_point(jnp.asarray(v, jnp.float32), jnp.asarray(f[front], jnp.int32), jnp.asarray(q2, jnp.float32))
    return front[np.asarray(res.face)], np.asarray(res.bary, np.float64)


@functools.lru_cache(maxsize=2)
def _build(spacing: float = SPACING) -> dict:
    joints, ends = _rest_joints()
    prims = _primitives(joints, ends)
    fn = lambda p: _field(prims, p)
    v, f = isosurface.extract_surface(fn, [-0.86, -0.97, -0.17], [0.86, 0.8, 0.24], spacing)
    v = _relax(v, f, fn)
    w = _skinning(v, f, prims, joints, ends)
    reg = _regressor(v, w, joints)
    vertex_part = _joint_part()[w.argmax(1)]
    counts = np.stack([(vertex_part[f] == k).sum(1) for k in range(len(PART_NAMES))], 1)
    face_part = counts.argmax(1)
    uv_coords, uv_faces = _uv_layout(v, f, face_part, joints)
    lmk_faces, lmk_bary = _face_keypoints(v, f)
    return dict(
        v_template=v.astype(np.float32), faces=f.astype(np.int32),
        shapedirs=_shape_fields(v, w, joints, ends).astype(np.float32),
        exprdirs=_expression_fields(v).astype(np.float32),
        posedirs=np.zeros((v.shape[0], 3, 486), np.float32),
        j_regressor=reg.astype(np.float32), lbs_weights=w.astype(np.float32),
        parents=np.asarray(PARENTS, np.int64),
        part_labels=vertex_part.astype(np.int32), face_part_labels=face_part.astype(np.int32),
        joint_limits=_joint_limits().astype(np.float32),
        lmk_faces=lmk_faces.astype(np.int32), lmk_bary=lmk_bary.astype(np.float32),
        uv_coords=uv_coords.astype(np.float32), uv_faces=uv_faces.astype(np.int32),
    )


def build_default_body_arrays() -> dict:
    """The procedural body's arrays (a fresh copy; built once per process, ~seconds).

    Keys (float32 metres unless stated): v_template [V, 3], faces [F, 3] int32, shapedirs
    [V, 3, 10], exprdirs [V, 3, 10], posedirs [V, 3, 486] (zero), j_regressor [55, V],
    lbs_weights [V, 55], parents [55] int, part_labels [V] int32 and face_part_labels [F] int32
    (indices into PART_NAMES), joint_limits [55, 3, 2] radians (lower, upper of each
    axis-angle component), lmk_faces [51] int32 + lmk_bary [51, 3] (face keypoints, iBUG
    17..67), uv_coords [T, 2] + uv_faces [F, 3].
    """
    return {k: np.array(a, copy=True) for k, a in _build().items()}
