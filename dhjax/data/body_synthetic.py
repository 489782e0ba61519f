"""Synthetic multi-view video of clothed bodies in motion, with full ground truth (D3GA's data).

`BodyVideoGenerator` renders subjects x frames x cameras of a camera dome. A subject is a body
shape (`dhjax.models.body`, the procedural default unless an official SMPL-X file is given), a
skin tone, hair and shoe colours, an upper garment (shirt or jacket) and a lower garment
(trousers or skirt) of `dhjax.data.garments` with their own looseness, thickness, colours and
pattern (plain, stripes, checks), one SH light and background, and one motion sequence:

* "walk": a gait cycle (hips, knees, ankles, counter-swinging arms, pelvis bob) walking on a
  circle inside the dome, facing along it;
* "arms": arm raises (sideways and forwards, elbows bending) while shifting weight;
* "turn": turning on the spot through a full revolution with small steps;
* "random": smooth random trajectories of every body joint within the joint limits (scaled).

Arms hang from the T-pose rest (shoulders lowered) in every motion, the face moves through
small smooth expressions and jaw openings, the fingers curl together. Secondary motion of
garment hems follows the horizontal acceleration of the root translation (`hem_sway`,
`garments.pose_garment(sway=...)`). The global orientation is stored unwrapped (continuous in
time).

Everything is a pure function of (seed, subject, frame): `synthetic.key(seed, stream, ...)`
derives every random number, so any host can render any shard, in any order, with the same
bytes. Index layout: index = ((s * n_frames) + t) * n_cameras + c (camera fastest).

Per image (the keys of `dhjax.data.dataset`, body layout): image [H, W, 3], mask [H, W], K, R,
t (OpenCV, x_cam = R x + t, metres), shape [10] (betas), expression [10], pose [55, 3]
(axis-angle, SMPL-X joint order), translation [3], seg [H, W] (LAYER_LABELS: 0 background,
1 body, 2 upper garment, 3 lower garment), depth [H, W] (camera z, metres, 0 = background),
sh [9, 3], keypoints [106, 3] (the 55 posed joints then 51 face points, metres), upper_kind,
lower_kind (indices into garments.UPPER_KINDS / LOWER_KINDS), item, frame, view.
"""

from __future__ import annotations

import numbers
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhjax.data import garments as garments_lib
from dhjax.data.synthetic import _LRU, key, sample_light
from dhjax.geometry import rotations
from dhjax.models import body as body_lib
from dhjax.render import camera as camera_lib
from dhjax.render import raster, shading

GENERATOR_VERSION = 1
"""The version of what `BodyVideoGenerator` draws and renders; `dhjax.data.cache.cached_bodies`
keys on it beside the config. Raise it with any change here, in `garments`, the default body,
the renderer or what this module takes from `synthetic` (`key`, `sample_light`) that changes a
sample for an unchanged config;
`tests/test_data_body_synthetic.py` pins each version's output."""

LAYER_LABELS = ("background", "body", "upper", "lower")
MOTIONS = ("walk", "arms", "turn", "random")
PATTERNS = ("plain", "stripes", "checks")
STREAM_SUBJECT, STREAM_MOTION, STREAM_LIGHT = 11, 12, 13
_HI = jax.lax.Precision.HIGHEST


def default_config() -> ml_collections.ConfigDict:
    """Paper-scale settings: a 200-camera dome at 667 x 1024 (D3GA's captures), 16 subjects
    x 300 frames at 30 fps."""
    return ml_collections.ConfigDict(dict(
        kind="bodies", seed=0, n_subjects=16, first_subject=0, n_frames=300, fps=30.0,
        motions=MOTIONS,                 # subject s performs motions[s % len(motions)]
        shape_std=1.0, expression_std=0.5, skirt_prob=0.4, jacket_prob=0.4,
        motion_scale=1.0,                # amplitude of the "random" motion, fraction of the limits
        dome=dict(n_cameras=200, width=667, height=1024, radius=3.2, fov_y_deg=42.0,
                  elevations_deg=(-10.0, 5.0, 20.0, 40.0, 65.0), target=(0.0, -0.05, 0.0)),
        walk_radius=0.3,                 # metres: the circle walked inside the dome
    ))


def check_config(c: Mapping) -> None:
    """Raises ValueError naming the field when a generator config cannot work: counts and image
    sizes must be integers >= 1, probabilities in [0, 1], motions a non-empty subset of MOTIONS.
    Cheap: `BodyVideoGenerator` calls it before loading the body model."""
    for name in ("n_subjects", "n_frames", "dome.n_cameras", "dome.width", "dome.height"):
        v = c[name] if "." not in name else c["dome"][name.split(".")[1]]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"config field {name} must be an integer >= 1, got {v!r}")
    for name in ("skirt_prob", "jacket_prob"):
        v = c[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"config field {name} must be a probability in [0, 1], got {v!r}")
    motions = (c["motions"],) if isinstance(c["motions"], str) else tuple(c["motions"])
    bad = [m for m in motions if m not in MOTIONS]
    if not motions or bad:
        raise ValueError(f"config field motions must name motions of {MOTIONS}, got {c['motions']!r} (on the "
                         "command line a tuple: \"--config.motions=('walk','arms')\")")


def tiny_config() -> ml_collections.ConfigDict:
    """A few cameras, small images: 4 subjects x 24 frames x 6 cameras at 96 x 128."""
    c = default_config()
    c.n_subjects, c.n_frames = 4, 24
    c.dome.update(n_cameras=6, width=96, height=128, elevations_deg=(0.0, 30.0))
    return c


def dome_cameras(n: int, width: int, height: int, *, radius: float, fov_y_deg: float,
                 elevations_deg, target) -> camera_lib.Camera:
    """`n` cameras on rings at the given elevations (as evenly as n allows), all looking at the
    target; azimuths interleave between rings. Camera batch [n], image width x height."""
    el = np.asarray(elevations_deg, np.float64)
    weights = np.cos(np.deg2rad(el))                     # fewer cameras on the small upper rings
    counts = np.floor(n * weights / weights.sum()).astype(int)
    counts[np.argsort(-weights)[: n - counts.sum()]] += 1
    az, elev = [], []
    for r, (e, m) in enumerate(zip(el, counts)):
        if m:
            az.append((360.0 * np.arange(m) / m + 180.0 * r / max(m, 1) * (r % 2)) % 360.0)
            elev.append(np.full(m, e))
    return camera_lib.rig_from_angles(np.concatenate(az), np.concatenate(elev), radius, target,
                                      fov_y_deg, int(width), int(height))


# ----------------------------------------------------------------------------------------------
# Subjects.


_SKIN = np.array([[0.95, 0.80, 0.69], [0.87, 0.68, 0.55], [0.74, 0.54, 0.40], [0.55, 0.38, 0.26],
                  [0.36, 0.24, 0.16]])
_HAIR = np.array([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08], [0.55, 0.40, 0.22], [0.75, 0.62, 0.40],
                  [0.45, 0.45, 0.45]])


def sample_subject(seed: int, s: int, n_shape: int, *, shape_std=1.0, skirt_prob=0.4,
                   jacket_prob=0.4) -> dict:
    """Subject s: betas [n_shape], skin [3], hair [3], shoes [3], garment kinds and parameters,
    colours and patterns (numpy)."""
    r = np.asarray(jax.random.uniform(key(seed, STREAM_SUBJECT, s), (40,)))
    betas = shape_std * np.asarray(jax.random.normal(key(seed, STREAM_SUBJECT, s, 1), (n_shape,)))
    betas = np.clip(betas, -2.5, 2.5)
    t = r[0] * (len(_SKIN) - 1)
    i = int(np.floor(t))
    skin = _SKIN[i] + (_SKIN[min(i + 1, len(_SKIN) - 1)] - _SKIN[i]) * (t - i)
    hue = lambda a, b, c: np.clip(np.array([a, b, c]), 0.03, 0.95)
    upper = "jacket" if r[1] < jacket_prob else "shirt"
    lower = "skirt" if r[2] < skirt_prob else "trousers"
    cloth = lambda o: hue(0.1 + 0.85 * r[o], 0.1 + 0.85 * r[o + 1], 0.1 + 0.85 * r[o + 2])
    return dict(
        betas=betas.astype(np.float32), skin=skin.astype(np.float32),
        hair=_HAIR[int(r[3] * len(_HAIR)) % len(_HAIR)].astype(np.float32),
        shoes=(0.05 + 0.5 * r[4] * np.ones(3) * np.array([1.0, 0.9, 0.8])).astype(np.float32),
        upper=upper, lower=lower,
        upper_params=dict(looseness=float(0.008 + 0.012 * r[5]) * (2.0 if upper == "jacket" else 1.0),
                          thickness=float(0.003 + 0.004 * r[6])),
        lower_params=(dict(looseness=float(0.006 + 0.01 * r[7]), thickness=float(0.003 + 0.003 * r[8]))
                      if lower == "trousers" else
                      dict(looseness=float(0.006 + 0.01 * r[7]), thickness=float(0.003 + 0.003 * r[8]),
                           flare=float(0.08 + 0.1 * r[9]), hem_y=float(-0.42 - 0.2 * r[10]))),
        upper_colours=np.stack([cloth(11), cloth(14)]).astype(np.float32),
        lower_colours=np.stack([cloth(17), cloth(20)]).astype(np.float32),
        upper_pattern=int(r[23] * len(PATTERNS)) % len(PATTERNS),
        lower_pattern=int(r[24] * len(PATTERNS)) % len(PATTERNS),
        pattern_freq=np.array([14 + 20 * r[25], 14 + 20 * r[26]], np.float32),  # cycles per metre
    )


# ----------------------------------------------------------------------------------------------
# Motions.


def _aa(axis, angle):
    return np.asarray(axis, np.float64) * angle


def _compose(*aas):
    """Axis-angle of R(aas[0]) @ R(aas[1]) @ ... (numpy, [..., 3] each)."""
    m = None
    for a in aas:
        r = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(a, jnp.float32)))
        m = r if m is None else m @ r
    return np.asarray(rotations.matrix_to_axis_angle(jnp.asarray(m)))


def _unwrap_axis_angle(aa):
    """[T, 3] axis-angles made continuous in time: each frame takes the representative of its
    rotation (angle + 2 pi k about the same axis) nearest the previous frame's."""
    out = np.array(aa, np.float64)
    for t in range(1, len(out)):
        th = np.linalg.norm(out[t])
        if th < 1e-8:
            continue
        cands = out[t][None] * (1.0 + 2.0 * np.pi * np.arange(-3, 4)[:, None] / th)
        out[t] = cands[np.argmin(np.linalg.norm(cands - out[t - 1], axis=1))]
    return out


def _smooth_noise(k, n, dims, sigma):
    half = int(np.ceil(3 * sigma))
    w = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    w /= np.sqrt((w ** 2).sum())
    x = np.asarray(jax.random.normal(k, (n + 2 * half, dims)), np.float64)
    return np.stack([np.convolve(x[:, d], w, mode="valid") for d in range(dims)], 1)


def motion_sequence(kind: str, k, n_frames: int, fps: float, limits, *, walk_radius=0.3,
                    n_expression=10, expression_std=0.5, motion_scale=1.0) -> dict:
    """A motion as per-frame arrays: pose [T, 55, 3] (axis-angle), translation [T, 3] (metres),
    expression [T, E]; and root [T, 3], the pelvis position used for secondary motion (numpy).

    limits: [55, 3, 2] joint limits (radians) the pose is clipped to (the global orientation,
    joint 0, is not clipped).
    """
    if kind not in MOTIONS:
        raise ValueError(f"unknown motion {kind!r}; choose from {MOTIONS}")
    from dhjax.models.body_default import J

    T = int(n_frames)
    t = np.arange(T) / float(fps)
    r = np.asarray(jax.random.uniform(jax.random.fold_in(k, 0), (16,)))
    pose = np.zeros((T, 55, 3))
    trans = np.zeros((T, 3))
    yaw = np.zeros(T)
    down = 1.15 + 0.15 * r[0]                        # arms lowered from the T-pose
    arm_l = np.zeros((T, 3))
    arm_r = np.zeros((T, 3))
    x, y, z = np.eye(3)
    if kind == "walk":
        f = 0.8 + 0.3 * r[1]                         # strides per second
        ph = 2 * np.pi * f * t + 2 * np.pi * r[2]
        amp = 0.3 + 0.12 * r[3]
        for side, sgn in (("left", 1.0), ("right", -1.0)):
            p = ph + (0 if side == "left" else np.pi)
            pose[:, J[f"{side}_hip"], 0] = -amp * np.sin(p)
            pose[:, J[f"{side}_knee"], 0] = 0.55 * np.maximum(0, np.sin(p - 0.8)) ** 1.5 + 0.05
            pose[:, J[f"{side}_ankle"], 0] = -0.15 * np.sin(p - 0.3)
        # Arms swing against the legs: about the shoulder's local y axis (in the T-pose frame,
        # positive moves the left arm back and the right arm forward).
        swing = 0.35 * amp / 0.35
        arm_l = np.stack([np.zeros(T), swing * np.sin(ph), np.zeros(T)], 1)
        arm_r = arm_l.copy()
        pose[:, J["left_elbow"], 1] = -0.25 - 0.15 * np.maximum(0, np.sin(ph + np.pi))
        pose[:, J["right_elbow"], 1] = 0.25 + 0.15 * np.maximum(0, np.sin(ph))
        speed = 2 * f * 0.55 * amp / 0.35 * 0.6        # metres per second along the circle
        ang = speed * t / walk_radius + 2 * np.pi * r[4]
        trans[:, 0] = walk_radius * np.sin(ang)
        trans[:, 2] = walk_radius * np.cos(ang)
        yaw = ang + np.pi / 2                          # facing along the circle
        trans[:, 1] = 0.012 * np.cos(2 * ph)
        pose[:, J["spine2"], 1] = 0.08 * np.sin(ph)
    elif kind == "arms":
        f = 0.25 + 0.15 * r[1]
        ph = 2 * np.pi * f * t + 2 * np.pi * r[2]
        lift = 0.5 - 0.5 * np.cos(ph)                      # 0 .. 1
        fwd = 0.5 - 0.5 * np.cos(ph * 0.5 + r[3] * 6)
        arm_l = np.stack([np.zeros(T), -1.2 * fwd * lift, (down + 0.5) * lift * (1 - fwd)], 1)
        arm_r = np.stack([np.zeros(T), 1.2 * fwd * lift, -(down + 0.5) * lift * (1 - fwd)], 1)
        pose[:, J["left_elbow"], 1] = -0.9 * (0.5 - 0.5 * np.cos(2 * ph))
        pose[:, J["right_elbow"], 1] = 0.9 * (0.5 - 0.5 * np.cos(2 * ph + 1))
        shift = 0.04 * np.sin(0.5 * ph)
        trans[:, 0] = shift
        pose[:, J["left_hip"], 2] = -shift * 2
        pose[:, J["right_hip"], 2] = -shift * 2
        yaw = 2 * np.pi * r[4] + 0.3 * np.sin(0.3 * ph)
    elif kind == "turn":
        yaw = 2 * np.pi * r[4] + 2 * np.pi * t / max(t[-1], 1e-6) * (1 if r[5] < 0.5 else -1)
        step = 2 * np.pi * 1.2 * t
        for side, p in (("left", 0.0), ("right", np.pi)):
            pose[:, J[f"{side}_hip"], 0] = -0.25 * np.maximum(0, np.sin(step + p))
            pose[:, J[f"{side}_knee"], 0] = 0.45 * np.maximum(0, np.sin(step + p))
        arm_l[:, 1] = 0.2 * np.sin(step)
        arm_r[:, 1] = 0.2 * np.sin(step)
        pose[:, J["left_elbow"], 1] = -0.4
        pose[:, J["right_elbow"], 1] = 0.4
    else:   # random
        noise = _smooth_noise(jax.random.fold_in(k, 1), T, 55 * 3, sigma=0.6 * fps)
        # Around the rest pose (clipped to the limits below), a third of each joint's range.
        half = 0.5 * (limits[..., 1] - limits[..., 0]) * motion_scale * 0.35
        pose = half * np.clip(noise.reshape(T, 55, 3), -1.5, 1.5)
        pose[:, 0] = 0.0
        yaw = 2 * np.pi * r[4] + 1.0 * _smooth_noise(jax.random.fold_in(k, 2), T, 1, sigma=1.0 * fps)[:, 0]
        trans[:, [0, 2]] = 0.15 * _smooth_noise(jax.random.fold_in(k, 3), T, 2, sigma=1.0 * fps)
        arm_l = pose[:, J["left_shoulder"]].copy() * 0.5
        arm_r = pose[:, J["right_shoulder"]].copy() * 0.5
        pose[:, [J["left_hip"], J["right_hip"]], 0] *= 0.5       # stay standing
        pose[:, [J["left_knee"], J["right_knee"]], 0] *= 0.4
    # Arms hang: lower from the T-pose first, then the motion's swing in the lowered frame.
    pose[:, J["left_shoulder"]] = _compose(np.broadcast_to(_aa(z, -down), (T, 3)), arm_l)
    pose[:, J["right_shoulder"]] = _compose(np.broadcast_to(_aa(z, down), (T, 3)), arm_r)
    # Fingers curl together (the mitten hands), a slow common curl.
    curl = 0.3 + 0.3 * np.sin(2 * np.pi * 0.2 * t + r[6] * 6)
    for side, sgn in (("left", -1.0), ("right", 1.0)):
        for fng in ("index", "middle", "ring", "pinky"):
            for i in (1, 2, 3):
                pose[:, J[f"{side}_{fng}{i}"]] = 0
                pose[:, J[f"{side}_{fng}{i}"], 2] = sgn * curl
    pose[:, 1:] = np.clip(pose[:, 1:], limits[1:, :, 0], limits[1:, :, 1])
    pose[:, 0] = _unwrap_axis_angle(_compose(np.stack([np.zeros(T), yaw, np.zeros(T)], 1), pose[:, 0]))
    # Face: smooth small expressions and jaw.
    expr = expression_std * _smooth_noise(jax.random.fold_in(k, 4), T, n_expression, sigma=0.5 * fps)
    pose[:, J["jaw"], 0] = np.clip(0.12 * _smooth_noise(jax.random.fold_in(k, 5), T, 1, sigma=0.4 * fps)[:, 0] + 0.05,
                                   0.0, 0.3)
    return dict(pose=pose.astype(np.float32), translation=trans.astype(np.float32),
                expression=expr.astype(np.float32), root=trans.astype(np.float64))


def hem_sway(root, t: int, fps: float, tau: float = 0.12, max_offset: float = 0.08):
    """[3] hem lag of frame t: -tau^2 times the horizontal acceleration of the root translation
    [T, 3] (second differences; one-sided at the first and last frame), clipped to max_offset
    metres. Only the translation's acceleration counts (turning on the spot gives none)."""
    T = root.shape[0]
    if T < 3:
        return np.zeros(3, np.float32)
    c = min(max(t, 1), T - 2)        # one-sided at the ends: the second difference of the nearest triple
    a = (root[c + 1] - 2 * root[c] + root[c - 1]) * fps * fps
    a[1] = 0.0
    off = -tau * tau * a
    n = np.linalg.norm(off)
    return (off * min(1.0, max_offset / max(n, 1e-12))).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _body_albedo(arrays, subject) -> np.ndarray:
    """[V] per-vertex albedo of the bare body: skin, hair cap, shoes, eyes and lips (rest pose)."""
    v = arrays["v_template"]
    skin = np.broadcast_to(subject["skin"], v.shape).copy()
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    hair = ((y > 0.705) | ((y > 0.6) & (z < -0.01))) & (y > 0.58) & (np.abs(x) < 0.1)
    skin[hair] = subject["hair"]
    skin[y < -0.86] = subject["shoes"]
    kp = np.einsum("lkc,lk->lc", v[arrays["faces"][arrays["lmk_faces"]]], arrays["lmk_bary"])
    for eye in (kp[19:25].mean(0), kp[25:31].mean(0)):            # iBUG 36..41 and 42..47
        skin[np.linalg.norm(v - eye, axis=1) < 0.011] = (0.12, 0.09, 0.08)
    lips = np.linalg.norm((v - kp[31:51].mean(0)) * np.array([0.7, 1.6, 1.0]), axis=1) < 0.017
    skin[lips] = subject["skin"] * np.array([0.85, 0.55, 0.55])
    return skin.astype(np.float32)


def _pattern(kind, coords, colours, freq):
    """Per-pixel garment colour [.., 3] of a pattern on rest-space coordinates [.., 3]."""
    a, b = colours[0], colours[1]
    stripes = (jnp.sin(2 * jnp.pi * freq * coords[..., 1]) > 0)[..., None]
    checks = ((jnp.sin(2 * jnp.pi * freq * coords[..., 0]) > 0) ^ (jnp.sin(2 * jnp.pi * freq * coords[..., 1]) > 0))[..., None]
    return jnp.where(kind == 0, a, jnp.where(kind == 1, jnp.where(stripes, a, b), jnp.where(checks, a, b)))


@jax.jit
def _shade(verts, faces, albedo, coords, material, labels, patterns, colours, freqs, sh, background,
           face_id, bary, depth, mask):
    frags = raster.Fragments(face_id=face_id, bary=bary, depth=depth, mask=mask,
                             overflow=jnp.zeros(face_id.shape[:1], bool))
    from dhjax.geometry.mesh import vertex_normals

    vn = vertex_normals(verts, faces)
    n = raster.interpolate(vn, faces, frags)
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    base = raster.interpolate(albedo, faces, frags)
    rc = raster.interpolate(coords, faces, frags)
    mat = material[jnp.maximum(face_id, 0)]
    up = _pattern(patterns[0], rc, colours[0], freqs[0])
    lo = _pattern(patterns[1], rc, colours[1], freqs[1])
    alb = jnp.where((mat == 1)[..., None], up, jnp.where((mat == 2)[..., None], lo, base))
    rgb = alb * shading.sh_irradiance(n, sh)
    C, H, W = face_id.shape
    ramp = (jnp.arange(H, dtype=jnp.float32) / max(H - 1, 1))[:, None, None]
    bg = background[0] * (1 - ramp) + background[1] * ramp
    image = jnp.clip(jnp.where(mask[..., None], rgb, bg[None]), 0.0, 1.0)
    seg = jnp.where(mask, labels[jnp.maximum(face_id, 0)], 0)
    return image, seg


class BodyVideoGenerator:
    """Subjects x frames x cameras of clothed bodies in motion, one image per index.

    Args:
      config: `default_config()`-like ConfigDict; model: a BodyModel (default: `body.load()`,
        the procedural body). The garment regions, hair and shoe colours are placed in the
        default body's frame and proportions (heights in metres), and motions need joint
        limits: the generator is made and tested for the default body only. Another model must
        at least carry joint_limits, part_labels and face keypoints (else ValueError).
    """

    kind = "multiview-video"
    labels = LAYER_LABELS

    def __init__(self, config: Mapping | None = None, model=None):
        self.config = default_config() if config is None else config
        c = self.config
        check_config(c)
        if model is None:
            model = body_lib.load()
        missing = [k for k in ("joint_limits", "part_labels", "lmk_faces") if getattr(model, k) is None]
        if missing:
            raise ValueError(f"the body generator needs a model with {missing} (the procedural default "
                             f"has them; official files have no joint limits)")
        self.model = model
        self.arrays = {**body_lib.official_arrays(model),
                       "part_labels": np.asarray(model.part_labels),
                       "lmk_faces": None if model.lmk_faces is None else np.asarray(model.lmk_faces),
                       "lmk_bary": None if model.lmk_bary is None else np.asarray(model.lmk_bary)}
        self.limits = np.asarray(model.joint_limits)
        d = c.dome
        self.cameras = dome_cameras(int(d.n_cameras), int(d.width), int(d.height), radius=float(d.radius),
                                    fov_y_deg=float(d.fov_y_deg), elevations_deg=tuple(d.elevations_deg),
                                    target=tuple(d.target))
        self.seed = int(c.seed)
        self.n_items, self.n_frames, self.n_cameras = int(c.n_subjects), int(c.n_frames), int(d.n_cameras)
        if min(self.n_items, self.n_frames, self.n_cameras) < 1:
            raise ValueError(f"need >= 1 subject, frame and camera; got {self.n_items}, {self.n_frames}, "
                             f"{self.n_cameras}")
        self._subjects = _LRU(4)
        self._frames = _LRU(8)

    def __len__(self):
        return self.n_items * self.n_frames * self.n_cameras

    def locate(self, index: int) -> tuple[int, int, int]:
        """(subject position s, frame t, camera c) of a global index."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        st, c = divmod(index, self.n_cameras)
        s, t = divmod(st, self.n_frames)
        return s, t, c

    def identity_number(self, s: int) -> int:
        """The global subject number of the generator's s-th subject (`first_subject` + s)."""
        return int(self.config.first_subject) + int(s)

    def subject(self, s: int) -> dict:
        """Subject s's parameters, garments, body albedo, motion and light (cached)."""
        def make():
            c = self.config
            n = self.identity_number(s)
            subj = sample_subject(self.seed, n, self.model.num_shape, shape_std=float(c.shape_std),
                                  skirt_prob=float(c.skirt_prob), jacket_prob=float(c.jacket_prob))
            subj["garments"] = (garments_lib.make_garment(self.arrays, subj["upper"], **subj["upper_params"]),
                                garments_lib.make_garment(self.arrays, subj["lower"], **subj["lower_params"]))
            subj["albedo"] = _body_albedo(self.arrays, subj)
            motions = tuple(c.motions)
            subj["motion_kind"] = motions[n % len(motions)]
            subj["motion"] = motion_sequence(subj["motion_kind"], key(self.seed, STREAM_MOTION, n), self.n_frames,
                                             float(c.fps), self.limits, walk_radius=float(c.walk_radius),
                                             n_expression=self.model.num_expression,
                                             expression_std=float(c.expression_std),
                                             motion_scale=float(c.motion_scale))
            subj.update(sample_light(key(self.seed, STREAM_LIGHT, n)))
            return subj
        return self._subjects.get(int(s), make)

    def frame(self, s: int, t: int) -> dict:
        """Posed geometry of (subject s, frame t): vertices, faces, attributes, keypoints."""
        def make():
            subj = self.subject(s)
            m = subj["motion"]
            betas = jnp.asarray(subj["betas"])[None]
            pose = jnp.asarray(m["pose"][t])[None]
            out = body_lib.forward(self.model, betas, jnp.asarray(m["expression"][t])[None], pose,
                                   jnp.asarray(m["translation"][t])[None])
            rot = rotations.axis_angle_to_matrix(pose)
            rel = garments_lib.joint_transforms(self.model, out.v_shaped, rot)[0]
            bv = out.vertices[0]
            upper, lower = subj["garments"]
            sway = jnp.asarray(hem_sway(m["root"], t, float(self.config.fps)))
            trans = jnp.asarray(m["translation"][t])
            lv = garments_lib.pose_garment(lower, betas[0], rel, trans, bv, self.model.faces, sway=sway)
            cv = jnp.concatenate([bv, lv])
            cf = jnp.concatenate([self.model.faces, jnp.asarray(lower.faces[:lower.n_outer_faces]) + bv.shape[0]])
            uv = garments_lib.pose_garment(upper, betas[0], rel, trans, cv, cf, sway=0.5 * sway)
            V, L = bv.shape[0], lv.shape[0]
            faces = jnp.concatenate([self.model.faces, jnp.asarray(lower.faces) + V,
                                     jnp.asarray(upper.faces) + V + L])
            verts = jnp.concatenate([bv, lv, uv])
            nf = (self.model.faces.shape[0], lower.faces.shape[0], upper.faces.shape[0])
            material = np.concatenate([np.zeros(nf[0]), np.full(nf[1], 2), np.full(nf[2], 1)]).astype(np.int32)
            labels = np.concatenate([np.full(nf[0], 1), np.full(nf[1], 3), np.full(nf[2], 2)]).astype(np.int32)
            albedo = np.concatenate([subj["albedo"], np.zeros((L + uv.shape[0], 3), np.float32)])
            coords = np.concatenate([np.asarray(self.model.v_template), lower.rest_coords, upper.rest_coords])
            return dict(verts=verts, faces=faces, material=jnp.asarray(material), labels=jnp.asarray(labels),
                        albedo=jnp.asarray(albedo), coords=jnp.asarray(coords, jnp.float32),
                        keypoints=np.asarray(out.keypoints[0]), pose=m["pose"][t],
                        translation=m["translation"][t], expression=m["expression"][t])
        return self._frames.get((int(s), int(t)), make)

    def render_group(self, s: int, t: int, cameras=None) -> list[dict]:
        """All views (or the given camera indices) of (subject s, frame t), one batched render;
        one sample dict per camera."""
        cams = list(range(self.n_cameras)) if cameras is None else [int(c) for c in cameras]
        subj = self.subject(s)
        fr = self.frame(s, t)
        cam = self.cameras[np.asarray(cams)]
        need = int(jnp.max(raster.count_intersections(fr["verts"][None], fr["faces"], cam)))
        capacity = int(2 ** np.ceil(np.log2(max(need, 1024) * 1.1)))
        frags = raster.rasterize(fr["verts"][None], fr["faces"], cam, capacity=capacity)
        patterns = jnp.asarray([subj["upper_pattern"], subj["lower_pattern"]])
        colours = jnp.asarray(np.stack([subj["upper_colours"], subj["lower_colours"]]))
        image, seg = _shade(fr["verts"], fr["faces"], fr["albedo"], fr["coords"], fr["material"], fr["labels"],
                            patterns, colours, jnp.asarray(subj["pattern_freq"]), subj["sh"], subj["background"],
                            frags.face_id, frags.bary, frags.depth, frags.mask)
        out = []
        for k, c in enumerate(cams):
            out.append(dict(
                image=np.asarray(image[k], np.float32), mask=np.asarray(frags.mask[k], np.float32),
                K=np.asarray(cam.K[k], np.float32), R=np.asarray(cam.R[k], np.float32),
                # Copies: a sample never shares memory with the generator's caches.
                t=np.asarray(cam.t[k], np.float32), shape=np.array(subj["betas"], np.float32),
                expression=np.array(fr["expression"], np.float32), pose=np.array(fr["pose"], np.float32),
                translation=np.array(fr["translation"], np.float32), seg=np.asarray(seg[k], np.int32),
                depth=np.asarray(frags.depth[k], np.float32), sh=np.array(subj["sh"], np.float32),
                keypoints=np.array(fr["keypoints"], np.float32),
                upper_kind=np.int32(garments_lib.UPPER_KINDS.index(subj["upper"])),
                lower_kind=np.int32(garments_lib.LOWER_KINDS.index(subj["lower"])),
                item=np.int32(self.identity_number(s)), frame=np.int32(t), view=np.int32(c)))
        return out

    def __getitem__(self, index: int) -> dict:
        s, t, c = self.locate(index)
        return self.render_group(s, t, [c])[0]
