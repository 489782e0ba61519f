"""D3GA's data: one subject's multi-view body video (frames x cameras) in memory, its splits and
batches, and the per-part geometry the avatar is built on (cages, embedded Gaussians).

A capture is read from a `dhjax.data.dataset` folder of bodies (one item = the subject, frames
= video frames, views = cameras; `dhjax.data.body_synthetic` writes them, and
`dhjax.data.cache.cached_bodies` generates one once into the cache). Every image needs its
layer labels (`<view>_seg.png`: 0 background, 1 body, 2 upper garment, 3 lower garment) for
D3GA's garment loss, and every frame the body pose [55, 3] and the keypoints [106, 3] (the 55
posed joints, then 51 face points) for the face code. Splits: held-out cameras (novel view:
training frames seen from cameras never trained on) and held-out frames, the last ones (novel
pose: seen from every camera). Training and evaluation composite the images over random
background colours (`frame_batch`, `FrameBatches`).

Per-part geometry (`build_parts`) on the subject's rest body (T-pose, shaped, expression 0):

* "full" layers: body (a solid cage of the body, `body_cages.build_cages`), face (the body
  cage's tetrahedra in front of the head, moved into their own part with their own copy of the
  nodes, so the face deforms on its own, driven by face keypoints), upper and lower garment
  (hollow shells around the garments' outer surfaces).
* "single" layer: one part "body" whose Gaussians lie on the body and on the garments' outer
  surfaces, all in one solid cage of the clothed body (see `build_parts`).

Gaussians are sampled uniformly by area on each part's surface and embedded in its cage (tet id
+ barycentrics); the surface triangles, their skinning weights and each Gaussian's triangle and
triangle barycentrics are kept too (the triangle ablation). Units: metres.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dhjax.data import dataset as ds
from dhjax.data import garments as garments_lib
from dhjax.geometry import lbs as lbs_lib
from dhjax.geometry import rotations, tetra
from dhjax.synthesis import gem_data

LAYER_LABELS = ("background", "body", "upper", "lower")      # body_synthetic.LAYER_LABELS
PART_NAMES = ("body", "face", "upper", "lower")              # parts of layers="full", in order
PART_LAYER = {"body": 1, "face": 1, "upper": 2, "lower": 3}   # their layer labels
N_POSE_JOINTS = 55
HEAD_JOINT = 15                                              # "head" in SMPL-X joint order
_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Capture.


class Capture(NamedTuple):
    """One subject's frames x cameras.

    images [F, C, H, W, 3] uint8; masks [F, C, H, W] bool; layers [F, C, H, W] uint8 (layer
    labels: 0 background, 1 body, 2 upper garment, 3 lower garment); K [F, C, 3, 3], R [F, C, 3, 3],
    t [F, C, 3] (OpenCV, x_cam = R x + t, metres); shape [S] betas; expression [F, E]; pose
    [F, 55, 3] axis-angle radians (SMPL-X joint order); translation [F, 3] metres; keypoints
    [F, 106, 3] metres (55 posed joints, then 51 face points; translation included); frame [F]
    and view [C] numbers of the dataset; upper_kind ("shirt" | "jacket") and lower_kind
    ("trousers" | "skirt").
    """

    images: np.ndarray
    masks: np.ndarray
    layers: np.ndarray
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    shape: np.ndarray
    expression: np.ndarray
    pose: np.ndarray
    translation: np.ndarray
    keypoints: np.ndarray
    frame: np.ndarray
    view: np.ndarray
    upper_kind: str = "shirt"
    lower_kind: str = "trousers"

    @property
    def size(self) -> tuple[int, int]:
        """(W, H)."""
        return int(self.images.shape[3]), int(self.images.shape[2])

    def take(self, frames=None, views=None) -> "Capture":
        """A sub-capture of the given frame and view positions (index arrays or None = all)."""
        return gem_data.take_frames_views(
            self, frames, views, frame_view=("images", "masks", "layers", "K", "R", "t"),
            per_frame=("expression", "pose", "translation", "keypoints", "frame"))


def _kind(sample, key, kinds, default):
    if key not in sample:
        return default
    i = int(sample[key])
    if not 0 <= i < len(kinds):
        raise ValueError(f"'{key}' {i} is not an index into {kinds}")
    return kinds[i]


def load_capture(root, split: str = "train", item: int = -1, *, max_frames: int = 0, log=print) -> Capture:
    """Reads one subject's frames x cameras of a body dataset folder.

    Args:
      root, split: a `dhjax.data.dataset` folder of bodies and its split.
      item: the item number (the trailing number of its folder name; -1: the first item).
      max_frames: keep the first frames only (0: all).
      log: progress printer.
    Returns:
      Capture (upper_kind / lower_kind from identity.npz; shirt / trousers when absent).
    Raises:
      ValueError naming the file or folder: the item is missing; a `<view>_seg.png` is missing
      (D3GA's garment loss needs the layer labels) or holds labels > 3; meta.json's labels are
      not the body layers; a pose is not [55, 3]; keypoints are missing or not [K >= 56, 3]
      (the face code needs them); frames have different cameras or image sizes; parameters are
      not finite.
    """
    reader = ds.FolderDataset(root, split)
    if "pose_joints" not in reader.meta:
        reader.meta["pose_joints"] = N_POSE_JOINTS       # files without meta.json: check against 55
    elif int(reader.meta["pose_joints"]) != N_POSE_JOINTS:
        raise ValueError(f"{root}/meta.json: pose_joints is {reader.meta['pose_joints']}; D3GA needs body "
                         f"poses [{N_POSE_JOINTS}, 3] (SMPL-X joint order)")
    labels = reader.meta.get("labels")
    if labels is not None and tuple(labels) != LAYER_LABELS:
        raise ValueError(f"{root}/meta.json: labels {labels} are not the body layers {LAYER_LABELS}; D3GA's "
                         f"garment loss needs layer labels")
    ordinals = sorted({e[3] for e in reader.entries})
    if int(item) < 0:
        ordinal = ordinals[0]
    else:
        by_number = {ds._trailing_number(reader.entries[i][0].name, -1): reader.entries[i][3]
                     for i in range(len(reader.entries))}
        if int(item) not in by_number:
            raise ValueError(f"{root}/{split}: no item {item} (items: {sorted(by_number)})")
        ordinal = by_number[int(item)]
    idx = [i for i, e in enumerate(reader.entries) if e[3] == ordinal]
    frames: dict = {}
    for i in idx:
        frames.setdefault(reader.entries[i][1], []).append(i)
    frame_dirs = sorted(frames, key=lambda p: ds._numbered(p))
    if max_frames:
        frame_dirs = frame_dirs[: int(max_frames)]
    views0 = [reader.entries[i][2] for i in frames[frame_dirs[0]]]
    imgs, masks, layers, Ks, Rs, ts, ex, po, tr, kp, fr = ([] for _ in range(11))
    shape, view_numbers, kinds = None, None, None
    for fd in frame_dirs:
        views = [reader.entries[i][2] for i in frames[fd]]
        if views != views0:
            raise ValueError(f"{fd}: cameras {views} differ from the first frame's {views0}; D3GA needs every "
                             f"frame seen by the same cameras")
        samples = []
        for i in frames[fd]:
            s = reader[i]
            seg_path = fd / f"{reader.entries[i][2]}_seg.png"
            if "seg" not in s:
                raise ValueError(f"{seg_path}: missing; D3GA's garment loss needs layer labels per image "
                                 f"(0 background, 1 body, 2 upper garment, 3 lower garment)")
            if s["seg"].min() < 0 or s["seg"].max() >= len(LAYER_LABELS):
                raise ValueError(f"{seg_path}: labels {int(s['seg'].min())}..{int(s['seg'].max())}, expected "
                                 f"0..{len(LAYER_LABELS) - 1} ({LAYER_LABELS})")
            samples.append(s)
        s0 = samples[0]
        ppath = fd / "params.npz"
        if s0["pose"].shape != (N_POSE_JOINTS, 3):
            raise ValueError(f"{ppath}: 'pose' must be [{N_POSE_JOINTS}, 3] (SMPL-X joints), got {s0['pose'].shape}")
        if "keypoints" not in s0:
            raise ValueError(f"{ppath}: no 'keypoints'; D3GA's face code needs the 3D keypoints [106, 3] "
                             f"(55 posed joints, then 51 face points: body.forward(...).keypoints)")
        if s0["keypoints"].shape[0] <= N_POSE_JOINTS:
            raise ValueError(f"{ppath}: 'keypoints' is {s0['keypoints'].shape}; needs the 55 joints followed by "
                             f"the face points")
        for k in ("expression", "pose", "translation", "shape", "keypoints"):
            if not np.all(np.isfinite(s0[k])):
                raise ValueError(f"{ppath}: '{k}' has non-finite values")
        im = np.stack([s["image"] for s in samples])
        if imgs and im.shape != imgs[0].shape:
            raise ValueError(f"{fd}: images are {im.shape[1:]}, the first frame's {imgs[0].shape[1:]}")
        imgs.append(np.clip(np.round(im * 255.0), 0, 255).astype(np.uint8))
        masks.append(np.stack([s["mask"] > 0.5 for s in samples]))
        layers.append(np.stack([s["seg"] for s in samples]).astype(np.uint8))
        Ks.append(np.stack([s["K"] for s in samples]))
        Rs.append(np.stack([s["R"] for s in samples]))
        ts.append(np.stack([s["t"] for s in samples]))
        if kp and s0["keypoints"].shape != kp[0].shape:
            raise ValueError(f"{ppath}: 'keypoints' is {s0['keypoints'].shape}, the first frame's {kp[0].shape}")
        shape = s0["shape"] if shape is None else shape
        ex.append(s0["expression"]), po.append(s0["pose"]), tr.append(s0["translation"])
        kp.append(s0["keypoints"]), fr.append(s0["frame"])
        if view_numbers is None:
            view_numbers = np.asarray([s["view"] for s in samples], np.int32)
            kinds = (_kind(s0, "upper_kind", garments_lib.UPPER_KINDS, "shirt"),
                     _kind(s0, "lower_kind", garments_lib.LOWER_KINDS, "trousers"))
    cap = Capture(np.stack(imgs), np.stack(masks), np.stack(layers), np.stack(Ks).astype(np.float32),
                  np.stack(Rs).astype(np.float32), np.stack(ts).astype(np.float32), np.asarray(shape, np.float32),
                  np.stack(ex).astype(np.float32), np.stack(po).astype(np.float32), np.stack(tr).astype(np.float32),
                  np.stack(kp).astype(np.float32), np.asarray(fr, np.int32), view_numbers, *kinds)
    W, H = cap.size
    log(f"capture: {root}/{split} item {ordinal}: {cap.images.shape[0]} frames x {cap.images.shape[1]} cameras "
        f"of {W}x{H}, {cap.upper_kind} + {cap.lower_kind}")
    return cap


# ----------------------------------------------------------------------------------------------
# Splits and batches.


#: Frame and camera positions of the three sets (GEM's): train (train frames x train cameras),
#: novel view (train frames x test cameras) and novel pose (test frames x all cameras).
Split = gem_data.Split


def split(capture: Capture, test_views: Sequence[int], n_test_frames) -> Split:
    """Held-out cameras by view number (`capture.view`) and the last frames (a count, or a
    fraction < 1 of the frames); at least one frame and one camera stay for training
    (`gem_data.split`)."""
    return gem_data.split(capture, test_views, n_test_frames, min_train_frames=1)


def frame_batch(capture: Capture, f: int, views, background) -> dict:
    """One frame seen by some cameras, composited over background colours (numpy).

    Args:
      capture: a Capture; f: frame position; views: [V] camera positions;
      background: [3] or [V, 3] colours in [0, 1].
    Returns:
      dict: image [V, H, W, 3] float32 in [0, 1] (the mask's pixels from the capture, the rest
      the background colour), mask [V, H, W] float32 (0/1), layers [V, H, W] int32 (0..3),
      background [V, 3] float32, K [V, 3, 3], R [V, 3, 3], t [V, 3] (metres), view [V] int32
      (positions), shape [S], expression [E], pose [55, 3] radians, translation [3] metres,
      keypoints [106, 3] metres, index int32 (the frame position f).
    """
    v = np.atleast_1d(np.asarray(views, np.int64))
    bg = np.broadcast_to(np.asarray(background, np.float32), (v.size, 3))
    m = capture.masks[f, v]
    img = capture.images[f, v].astype(np.float32) / 255.0
    img = np.where(m[..., None], img, bg[:, None, None, :]).astype(np.float32)
    return dict(image=img, mask=m.astype(np.float32), layers=capture.layers[f, v].astype(np.int32),
                background=np.array(bg, np.float32), K=capture.K[f, v], R=capture.R[f, v], t=capture.t[f, v],
                view=v.astype(np.int32), shape=capture.shape, expression=capture.expression[f],
                pose=capture.pose[f], translation=capture.translation[f], keypoints=capture.keypoints[f],
                index=np.int32(f))


class FrameBatches:
    """Training batches: per step, `batch_size` random (training frame, training camera) pairs,
    each image over a random background colour (or the fixed one). Deterministic in (seed, step).

    `get_batch(step)` returns the keys of `frame_batch` with the view axis folded into the batch:
    image [B, H, W, 3], mask [B, H, W], layers [B, H, W], background [B, 3], K [B, 3, 3],
    R [B, 3, 3], t [B, 3], view [B], shape [B, S], expression [B, E], pose [B, 55, 3],
    translation [B, 3], keypoints [B, 106, 3], index [B] (frame positions).
    """

    def __init__(self, capture: Capture, sp: Split, *, batch_size: int = 1, seed: int = 0,
                 random_background: bool = True, background=(1.0, 1.0, 1.0)):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.capture, self.sp = capture, sp
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.random_background, self.background = bool(random_background), np.asarray(background, np.float32)

    def get_batch(self, step: int) -> dict:
        """Training batch of a step: batch_size (frame, camera) pairs drawn from the training frames and
        cameras by a generator seeded with (seed, step), each with its own random background when
        `random_background` (`frame_batch` keys, stacked)."""
        rng = np.random.default_rng([self.seed, int(step)])
        fpos = rng.choice(self.sp.train_frames, self.batch_size)
        vpos = rng.choice(self.sp.train_views, self.batch_size)
        rows = []
        for f, v in zip(fpos, vpos):
            bg = rng.uniform(0, 1, 3).astype(np.float32) if self.random_background else self.background
            r = frame_batch(self.capture, int(f), [int(v)], bg)
            rows.append({k: (a[0] if k in VIEW_KEYS else a) for k, a in r.items()})
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


#: The per-image keys of `frame_batch` (they carry a view axis).
VIEW_KEYS = ("image", "mask", "layers", "background", "K", "R", "t", "view")


# ----------------------------------------------------------------------------------------------
# Rest body, face keypoints.


def _betas(model, betas) -> np.ndarray:
    b = np.asarray(betas, np.float32).reshape(-1)
    if b.size > model.num_shape:
        raise ValueError(f"betas has {b.size} coefficients, the body model {model.num_shape}")
    return np.pad(b, (0, model.num_shape - b.size))


def rest_vertices(model, betas) -> np.ndarray:
    """The subject's rest body [V, 3] float64 (metres): v_template + shapedirs @ betas, T-pose,
    expression 0. betas: [S'] (S' <= model.num_shape; missing ones are zero)."""
    b = _betas(model, betas)
    return (np.asarray(model.v_template, np.float64)
            + np.einsum("s,svc->vc", b, np.asarray(model.shapedirs, np.float64)))


def rest_joints(model, betas) -> np.ndarray:
    """The subject's rest joints [55, 3] float32 (metres): j_regressor @ shaped template
    (`rest_vertices`, expression 0)."""
    return (np.asarray(model.j_regressor, np.float64) @ rest_vertices(model, betas)).astype(np.float32)


def face_code_input(model, betas, pose, translation, keypoints):
    """The face keypoints with the posed head joint's rigid transform removed (D3GA's face input).

    x_local = R_h^T (x - translation - T_h), with [R_h | T_h] the head joint's rest -> posed
    transform (`garments.joint_transforms`, i.e. `lbs.batch_rigid_transform`'s rel, of the
    shaped body at expression 0). These are head-frame coordinates expressed in rest space (a
    rigid motion of the whole body or of the head leaves them unchanged; a face at rest gives
    the rest face points); `d3ga.face_keypoints_local` computes the same at run time.

    Args:
      model: a BodyModel; betas: [S'] or [B, S'] shape coefficients.
      pose: [B, 55, 3] axis-angle radians; translation: [B, 3] metres.
      keypoints: [B, 55 + L, 3] metres (joints, then L face points; L = 51).
    Returns:
      [B, L, 3] float32 metres (jnp; jit/vmap/grad safe).
    """
    pose = jnp.asarray(pose, jnp.float32)
    B = pose.shape[0]
    pose = pose.reshape(B, N_POSE_JOINTS, 3)
    betas = jnp.asarray(betas, jnp.float32)
    betas = jnp.broadcast_to(betas, (B, betas.shape[-1])) if betas.ndim == 1 else betas
    betas = jnp.pad(betas, ((0, 0), (0, model.num_shape - betas.shape[-1])))
    joint_tpl = jnp.einsum("jv,vc->jc", model.j_regressor, model.v_template, precision=_HI)
    joint_dirs = jnp.einsum("jv,svc->sjc", model.j_regressor, model.shapedirs, precision=_HI)
    joints = joint_tpl[None] + jnp.einsum("bs,sjc->bjc", betas, joint_dirs, precision=_HI)
    rot = rotations.axis_angle_to_matrix(pose)
    _, rel = lbs_lib.batch_rigid_transform(rot, joints, model.parents)    # = garments.joint_transforms
    T = rel[:, HEAD_JOINT]
    face = jnp.asarray(keypoints, jnp.float32)[:, N_POSE_JOINTS:] - jnp.asarray(translation, jnp.float32)[:, None]
    return jnp.einsum("bji,bnj->bni", T[:, :3, :3], face - T[:, None, :3, 3], precision=_HI)


def face_keypoint_stats(capture: Capture, model=None, *, min_std: float = 1e-4):
    """Mean and std [L, 3] (L = 51, metres) of the face keypoints in the head's frame
    (`face_code_input`) over the capture's frames (pass the training frames:
    `capture.take(sp.train_frames)`).

    Args:
      capture: a Capture (uses shape, pose, translation, keypoints); model: the BodyModel
        (None: `body.load()`, the procedural default); min_std: floor of the std (metres).
    Returns:
      (mean [L, 3] float32, std [L, 3] float32).
    """
    if model is None:
        from dhjax.models import body as body_lib

        model = body_lib.load()
    x = np.asarray(face_code_input(model, capture.shape, capture.pose, capture.translation, capture.keypoints),
                   np.float64)
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), min_std).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Per-part geometry.


def default_parts_config() -> ml_collections.ConfigDict:
    """`build_parts` settings (metres): cage spacings, Gaussians per part, layers, seed.

    garment_fit: "blendshapes" builds each garment on the mean body and adds its blendshapes
    (garment.shapedirs @ betas), as `body_synthetic` does, so hems and waistbands sit where the
    data has them; "template" builds it on the shaped template (heights are then absolute).
    """
    return ml_collections.ConfigDict(dict(
        body_spacing=0.025, body_margin=None, shell_radius=0.02, shell_spacing=0.015,
        n_gaussians=dict(body=20000, face=4000, upper=12000, lower=12000),
        layers="full", garment_fit="blendshapes", seed=0))


def _get(cfg, name, default):
    if isinstance(cfg, Mapping):
        v = cfg.get(name, default)
    else:
        v = getattr(cfg, name, default)
    return default if v is None and default is not None else v


def _counts(n) -> dict:
    """{part: count} from a mapping, 4 numbers (body, face, upper, lower) or one number."""
    if isinstance(n, (int, np.integer)):
        out = {k: int(n) for k in PART_NAMES}
    elif isinstance(n, Mapping) or hasattr(n, "to_dict"):
        d = n.to_dict() if hasattr(n, "to_dict") else dict(n)
        missing = [k for k in PART_NAMES if k not in d]
        if missing:
            raise ValueError(f"n_gaussians lacks {missing} (needs {PART_NAMES})")
        out = {k: int(d[k]) for k in PART_NAMES}
    else:
        seq = list(n)
        if len(seq) != len(PART_NAMES):
            raise ValueError(f"n_gaussians needs {len(PART_NAMES)} numbers {PART_NAMES}, got {seq}")
        out = {k: int(x) for k, x in zip(PART_NAMES, seq)}
    bad = {k: v for k, v in out.items() if v < 1}
    if bad:
        raise ValueError(f"n_gaussians must be positive, got {bad}")
    return out


def _areas(v, f):
    tri = v[f]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def _sample_surface(v, f, n, rng, areas=None):
    """n points uniformly by area on triangles f of v: (face ids [n], bary [n, 3], points [n, 3])."""
    a = _areas(v, f) if areas is None else areas
    fid = rng.choice(len(f), size=n, p=a / a.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    bary = np.stack([1.0 - s, s * (1.0 - r2), s * r2], 1)
    pts = np.einsum("nk,nkc->nc", bary, v[f[fid]])
    return fid, bary, pts


def _reindex(f):
    """Vertices used by cells f [K, n], reindexed: (vertex ids [Vs], cells [K, n] int32 into them)."""
    used, inv = np.unique(f, return_inverse=True)
    return used, inv.reshape(f.shape).astype(np.int32)


def _log_scales(points) -> np.ndarray:
    """[G, 3] isotropic log-scales: log of the mean distance to the 3 nearest other points."""
    from scipy.spatial import cKDTree

    k = min(3, len(points) - 1)
    if k < 1:
        return np.full((len(points), 3), math.log(0.01), np.float32)
    d, _ = cKDTree(points).query(points, k=k + 1)
    s = np.maximum(d[:, 1:].mean(1), 1e-5)
    return np.repeat(np.log(s)[:, None], 3, 1).astype(np.float32)


def _finish(name, driver, nodes, tets, node_weights, tet_id, bary, inside, gauss_points, gauss_layer,
            surf_v, surf_f, surf_w, gauss_face, gauss_face_bary, t0, extra_s=0.0) -> dict:
    bary = np.clip(bary, 0.0, None)
    bary = bary / bary.sum(1, keepdims=True)
    G = len(tet_id)
    nodes = np.asarray(nodes, np.float64)
    return dict(
        name=name, layer=PART_LAYER.get(name, 1), driver=driver,
        rest_nodes=nodes.astype(np.float32), tets=np.asarray(tets, np.int32),
        rest_inv=tetra.rest_inverse(nodes, np.asarray(tets, np.int64)).astype(np.float32),
        node_weights=np.asarray(node_weights, np.float32),
        gauss_tet=np.asarray(tet_id, np.int32), gauss_bary=bary.astype(np.float32),
        gauss_log_scale=_log_scales(gauss_points),
        gauss_quat=np.tile(np.array([1.0, 0.0, 0.0, 0.0], np.float32), (G, 1)),
        gauss_rest=np.asarray(gauss_points, np.float32), gauss_layer=np.asarray(gauss_layer, np.int32),
        surf_vertices=np.asarray(surf_v, np.float32), surf_faces=np.asarray(surf_f, np.int32),
        surf_weights=np.asarray(surf_w, np.float32), gauss_face=np.asarray(gauss_face, np.int32),
        gauss_face_bary=np.asarray(gauss_face_bary, np.float32),
        stats=dict(tets=int(len(tets)), nodes=int(len(nodes)), gaussians=int(G), outside=int((~inside).sum()),
                   surface_faces=int(len(surf_f)), build_s=round(time.perf_counter() - t0 + extra_s, 3)))


def _garments(model, betas, upper_kind, lower_kind, fit, base, v_rest) -> dict:
    if upper_kind not in garments_lib.UPPER_KINDS:
        raise ValueError(f"unknown upper garment kind {upper_kind!r}; choose from {garments_lib.UPPER_KINDS}")
    if lower_kind not in garments_lib.LOWER_KINDS:
        raise ValueError(f"unknown lower garment kind {lower_kind!r}; choose from {garments_lib.LOWER_KINDS}")
    if fit not in ("blendshapes", "template"):
        raise ValueError(f"garment_fit must be 'blendshapes' or 'template', got {fit!r}")
    b = _betas(model, betas)
    out = {}
    for name, kind in (("upper", upper_kind), ("lower", lower_kind)):
        if fit == "template":
            out[name] = garments_lib.make_garment({**base, "v_template": v_rest.astype(np.float32)}, kind)
        else:
            g = garments_lib.make_garment(base, kind)
            v = np.asarray(g.vertices, np.float64) + np.einsum("gcs,s->gc", np.asarray(g.shapedirs, np.float64),
                                                               b[:g.shapedirs.shape[-1]])
            out[name] = dataclasses.replace(g, vertices=v.astype(np.float32))
    return out


def _garment_surface(g):
    """Outer surface of a garment: (vertices [Vo, 3] float64, faces [Fo, 3], weights [Vo, J])."""
    used, f = _reindex(np.asarray(g.faces[:g.n_outer_faces]))
    return np.asarray(g.vertices, np.float64)[used], f, np.asarray(g.weights)[used]


def build_parts(model, betas, upper_kind: str, lower_kind: str, cfg=None) -> list[dict]:
    """Per-part cages and embedded Gaussians of a subject on its rest body (metres).

    The rest body is the shaped template (v_template + shapedirs @ betas, expression 0, T-pose);
    garments are `garments.make_garment` with default parameters (cfg.garment_fit, see
    `default_parts_config`). Cages: `body_cages.build_cages` (solid body cage of spacing
    body_spacing inflated by body_margin (None: `body_cages.default_body_margin`); hollow garment
    shells of radius shell_radius, spacing shell_spacing, around the garments' outer surfaces);
    nodes take the skinning weights of their closest template vertex.

    layers="full": parts body, face, upper, lower. The FACE part is made of the body cage's
    tetrahedra whose centroid lies in the head region in front of the head: the closest rest
    body vertex of the centroid has the "head" part label and the centroid's z exceeds the rest
    head joint's z. They are taken out of the body part into their own part with their own copy
    of the nodes (both parts reindexed to the nodes they use; nodes on the cut exist in both).
    The surface of the body is split at sub-triangle resolution by the same tetrahedra: body
    Gaussians are sampled uniformly by area on the body surface outside the face tetrahedra, face
    Gaussians on the surface inside them (rejection sampling on the triangles that touch the
    part); garment Gaussians on the garments' outer surfaces.

    layers="single": one part "body" (layer 1, driver "pose") whose Gaussians (as many as the
    four parts' together) lie uniformly by area on the body AND the garments' outer surfaces,
    all in ONE solid cage of the clothed body: the region {min(sd_body - margin, d_garments - r)
    < 0} (sd_body the signed distance to the body, d_garments the distance to the garments' outer
    surfaces), i.e. the body's solid cage inflated where, and only where, garments are: by a
    shell of radius r = max(shell_radius, 1.15 body_spacing) around them (the smallest radius a
    lattice of body_spacing can hold a surface in, `tetra.shell_alpha`), on one lattice of
    spacing body_spacing; nodes take the weights of their closest vertex of the body or of a
    garment's outer surface (the garment's own weights).

    Gaussians: cfg.n_gaussians per part ({body, face, upper, lower} or 4 numbers), deterministic
    in cfg.seed; each is located in its part's cage (`tetra.locate_points`): tet id and
    barycentrics (clamped to >= 0 and renormalised; points outside the cage, counted in
    stats["outside"], get the nearest cage point's). Initial log-scales: log of the mean distance
    to the 3 nearest Gaussians of the part (isotropic, x3); quaternion (1, 0, 0, 0).

    Args:
      model: a BodyModel (`body.load()`); betas: [S'] the subject's shape (Capture.shape).
      upper_kind: "shirt" | "jacket"; lower_kind: "trousers" | "skirt".
      cfg: `default_parts_config()`-like (ConfigDict or mapping; missing keys take its defaults).
    Returns:
      A list of part dicts (full: body, face, upper, lower; single: body) with keys
        name (str), layer (int: 1 body / 1 face / 2 upper / 3 lower; single: 1),
        driver ("pose", or "face" for the face part),
        rest_nodes [N, 3] float32 metres, tets [M, 4] int32 (positively oriented),
        rest_inv [M, 3, 3] float32 (`tetra.rest_inverse`, 1/metres), node_weights [N, 55] float32,
        gauss_tet [G] int32, gauss_bary [G, 4] float32 (>= 0, rows sum to 1),
        gauss_log_scale [G, 3] float32 (log metres), gauss_quat [G, 4] float32 (w, x, y, z),
        gauss_rest [G, 3] float32 (the sampled rest positions, metres), gauss_layer [G] int32 (the
        layer label of the surface each Gaussian was sampled on),
        surf_vertices [Vs, 3] float32 metres, surf_faces [Fs, 3] int32, surf_weights [Vs, 55]
        float32 (body weights for body/face, the garment's for garments), gauss_face [G] int32
        (into surf_faces), gauss_face_bary [G, 3] float32 (triangle barycentrics); the surface
        of body / face is the body triangles touching the part's tetrahedra (a band of
        triangles along the cut belongs to both), of a garment its outer surface, of "single"
        the body and both outer surfaces;
        stats {tets, nodes, gaussians, outside (Gaussians outside the cage), surface_faces,
        build_s (seconds: the part's cage and Gaussians)}.
    Raises:
      ValueError: unknown garment kind, layers, garment_fit or bad n_gaussians.
    """
    from dhjax.data import body_cages
    from dhjax.models import body as body_lib
    from dhjax.ops import closest_point

    d = default_parts_config()
    cfg = {} if cfg is None else cfg
    get = lambda k: _get(cfg, k, d[k])
    layers = str(get("layers"))
    if layers not in ("full", "single"):
        raise ValueError(f"layers must be 'full' or 'single', got {layers!r}")
    counts = _counts(get("n_gaussians"))
    h, r, hs = float(get("body_spacing")), float(get("shell_radius")), float(get("shell_spacing"))
    margin = _get(cfg, "body_margin", None)
    rng = np.random.default_rng(int(get("seed")))
    t_start = time.perf_counter()

    v_rest = rest_vertices(model, betas)
    faces = np.asarray(model.faces, np.int64)
    weights = np.asarray(model.lbs_weights, np.float32)
    part_labels = np.asarray(model.part_labels)
    base = dict(v_template=np.asarray(model.v_template), faces=np.asarray(model.faces),
                lbs_weights=weights, shapedirs=np.moveaxis(np.asarray(model.shapedirs), 0, -1),
                part_labels=part_labels)
    garments = _garments(model, betas, upper_kind, lower_kind, str(get("garment_fit")), base, v_rest)
    arrays = {**base, "v_template": v_rest}

    if layers == "single":
        return [_single_part(v_rest, faces, weights, garments, counts, h, r, margin, rng, t_start)]

    cages = body_cages.build_cages(arrays, garments, body_spacing=h, body_margin=margin, shell_radius=r,
                                   shell_spacing=hs)
    parts = []
    # Body and face: split the body cage's tetrahedra.
    t0 = time.perf_counter()
    mesh = cages["body"].mesh
    nodes, tets = np.asarray(mesh.nodes), np.asarray(mesh.tets, np.int64)
    cent = nodes[tets].mean(1)
    from scipy.spatial import cKDTree

    tree = cKDTree(v_rest)
    head_z = rest_joints(model, betas)[HEAD_JOINT, 2]
    head_label = body_lib.PART_NAMES.index("head")
    is_face = (part_labels[tree.query(cent)[1]] == head_label) & (cent[:, 2] > head_z)
    # Which part holds each body vertex and each triangle's centroid.
    tv, _, _ = tetra.locate_points(mesh, v_rest, closest_point=closest_point)
    tc, _, _ = tetra.locate_points(mesh, v_rest[faces].mean(1), closest_point=closest_point)
    face_v, face_c = is_face[tv], is_face[tc]
    setup_s = time.perf_counter() - t0
    for name, sel in (("body", ~is_face), ("face", is_face)):
        t0 = time.perf_counter()
        want = name == "face"
        touch = np.any(face_v[faces] == want, axis=1) | (face_c == want)
        cand = faces[touch]
        areas = _areas(v_rest, cand)
        pts, fids, fbs, tids, bys, ins = [], [], [], [], [], []
        need = counts[name]
        for _ in range(100):
            m = int(need * 1.3) + 64
            fid, fb, p = _sample_surface(v_rest, cand, m, rng, areas)
            tid, by, inside = tetra.locate_points(mesh, p, closest_point=closest_point)
            ok = np.nonzero(is_face[tid] == want)[0][:need]
            for lst, a in ((pts, p), (fids, fid), (fbs, fb), (tids, tid), (bys, by), (ins, inside)):
                lst.append(a[ok])
            need -= ok.size
            if need <= 0:
                break
        if need > 0:
            raise RuntimeError(f"could not sample {counts[name]} Gaussians on the {name} part's surface")
        p, fid, fb, tid, by, inside = (np.concatenate(x) for x in (pts, fids, fbs, tids, bys, ins))
        keep = np.nonzero(sel)[0]
        sub_tets = tets[keep]
        used, local = _reindex(sub_tets)
        tet_map = np.full(len(tets), -1, np.int64)
        tet_map[keep] = np.arange(keep.size)
        sv, sf = _reindex(cand)
        parts.append(_finish(name, "face" if want else "pose", nodes[used], local, cages["body"].weights[used],
                             tet_map[tid], by, inside, p, np.full(len(p), 1), v_rest[sv], sf, weights[sv],
                             fid, fb, t0, setup_s + (cages["body"].stats["build_s"] if name == "body" else 0.0)))
    for name in ("upper", "lower"):
        t0 = time.perf_counter()
        cage = cages[name]
        gv, gf, gw = _garment_surface(garments[name])
        fid, fb, p = _sample_surface(gv, gf, counts[name], rng)
        tid, by, inside = tetra.locate_points(cage.mesh, p, closest_point=closest_point)
        parts.append(_finish(name, "pose", cage.mesh.nodes, cage.mesh.tets, cage.weights, tid, by, inside, p,
                             np.full(len(p), PART_LAYER[name]), gv, gf, gw, fid, fb, t0,
                             cage.stats["build_s"]))
    return parts


def _single_part(v_rest, faces, weights, garments, counts, h, r, margin, rng, t0) -> dict:
    """layers="single" (see `build_parts`)."""
    from dhjax.data import body_cages
    from dhjax.geometry import isosurface as iso
    from dhjax.ops import closest_point

    r = max(r, 1.15 * h)
    alpha = tetra.shell_alpha(r, h)
    margin = body_cages.default_body_margin(h, alpha=alpha) if margin is None else float(margin)
    surfs = [(v_rest, faces, weights, 1)]
    for name in ("upper", "lower"):
        gv, gf, gw = _garment_surface(garments[name])
        surfs.append((gv, gf, gw, PART_LAYER[name]))
    gv_all = np.concatenate([s[0] for s in surfs[1:]])
    off = np.cumsum([0] + [len(s[0]) for s in surfs])
    gf_all = np.concatenate([s[1] + off[i] - off[1] for i, s in enumerate(surfs) if i > 0])
    allv = np.concatenate([s[0] for s in surfs])
    pad = max(margin, r) + h
    shape, origin = iso.grid_for_box(allv.min(0) - pad, allv.max(0) + pad, h)
    d_body = tetra.lattice_distances(v_rest, faces, shape, origin, h, abs(margin) + 2 * h, closest_point=closest_point)
    wind = tetra.lattice_winding_numbers(v_rest, faces, shape, origin, h)
    d_garm = tetra.lattice_distances(gv_all, gf_all, shape, origin, h, r + 2 * h, closest_point=closest_point)
    values = np.minimum(np.where(wind != 0, -d_body, d_body) - margin, d_garm - r)
    mesh = tetra.cage_from_lattice(values, shape, origin, h, alpha=alpha)
    allf = np.concatenate([s[1] + off[i] for i, s in enumerate(surfs)])
    allw = np.concatenate([s[2] for s in surfs])
    node_w = tetra.skin_nodes(mesh.nodes, allv, allw)
    face_layer = np.concatenate([np.full(len(s[1]), s[3]) for s in surfs])
    n = sum(counts.values())
    fid, fb, p = _sample_surface(allv, allf, n, rng)
    tid, by, inside = tetra.locate_points(mesh, p, closest_point=closest_point)
    return _finish("body", "pose", mesh.nodes, mesh.tets, node_w, tid, by, inside, p, face_layer[fid], allv, allf,
                   allw, fid, fb, t0)
