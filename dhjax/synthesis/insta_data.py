"""INSTA's data: a tracked monocular video turned into per-frame arrays and ray batches.

Input: a dataset of kind 'video' in the `dhjax.data.dataset` layout (what `experiments.track`
writes, or the synthetic `VideoGenerator` through `dhjax.data.cache.cached_video`), one item
(sequence). Every frame needs an image, a foreground mask, a camera and the head-model
parameters (shape, expression, pose, translation); `load_video` raises an error naming the
file or frame otherwise, and on non-finite values.

`prepare` turns the frames into numpy arrays (`Video`): images composited over the background
with the mask; the tracked mesh of every frame (the head model with the mouth proxy, in world
= model space); its rasterised depth as a distance along each pixel's ray (`mesh_t`, m; 0 where
the mesh is not hit) for the geometry term (or the dataset's own depth maps with
depth_source='dataset'); the mouth and face pixel regions from the rasterised mesh's triangle
labels (intersected with the dataset's segmentation when present); expression codes; the rigid
head transforms; and the canonical mesh (the identity's neutral head).

`RayBatches` gives the training batches by step number (so a resumed run reads the same data):
a frame buffer of `buffer_frames` training frames redrawn every `resample_every` steps (thesis:
1700 frames every 1500 steps), from which each step takes `frames_per_step` frames and
`rays_per_frame` random pixels of each. With `random_background` every ray gets a random
background colour (its target is recomposited with the mask, and the render uses the same
colour), as instant-ngp trains on masked images: a fixed background would let haze of that
colour stand in the empty space, invisible in the training views and in front of the face in
novel ones. With `online_frames_per_step` > 0 the frames arrive
over time (frame i is usable from step i / online_frames_per_step on): the online mode, where
the avatar trains while the video is still coming in.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from dhjax.data import dataset as ds
from dhjax.geometry import rotations
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import raster

PARAM_KEYS = ("shape", "expression", "pose", "translation")
MIN_FRAMES = 2


class Video(NamedTuple):
    """One tracked video as arrays (N frames of H x W pixels, V mesh vertices).

    images [N, H, W, 3] composited over the background; mask [N, H, W] float; mouth/face
    [N, H, W] bool pixel regions; mesh_t [N, H, W] ray distance of the tracked mesh (m, 0: not
    hit); verts [N, V, 3] tracked meshes (m); expression [N, E]; head_R [N, 3, 3]; head_t
    [N, 3]; K [N, 3, 3], R [N, 3, 3], t [N, 3] cameras (x_cam = R x + t); true_depth [N, H, W]
    the dataset's depth maps (camera z, m; zeros when the dataset has none); frame [N] int32 the
    frames' numbers in the dataset.
    """

    images: np.ndarray
    mask: np.ndarray
    mouth: np.ndarray
    face: np.ndarray
    mesh_t: np.ndarray
    verts: np.ndarray
    expression: np.ndarray
    head_R: np.ndarray
    head_t: np.ndarray
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    true_depth: np.ndarray
    frame: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.images.shape[2]), int(self.images.shape[1])

    def take(self, idx) -> "Video":
        """The frames at indices `idx`, as a Video."""
        idx = np.asarray(idx)
        return Video(*(np.asarray(a)[idx] for a in self))


def load_video(root, split: str = "train", item: int | None = None, max_frames: int = 0) -> list[dict]:
    """The frames (sample dicts, in frame order) of one sequence of a 'video' dataset.

    Args:
      root: dataset folder; split: its split; item: the sequence's number (None: the first);
      max_frames: keep the first frames only (0: all).
    Raises:
      FileNotFoundError / ValueError naming the folder or file that is missing or wrong
      (`dhjax.data.dataset.FolderDataset` checks images, masks, cameras and parameters).
    """
    folder = ds.FolderDataset(root, split)
    entries = folder.entries
    names = sorted({e[0] for e in entries})
    if not names:
        raise ValueError(f"{root}/{split}: no frames")
    numbers = {p: ds._trailing_number(p.name, k) for k, p in enumerate(names)}
    if item is None:
        chosen = names[0]
    else:
        match = [p for p in names if numbers[p] == int(item)]
        if not match:
            raise ValueError(f"{root}/{split}: no sequence with number {item} "
                             f"(found {sorted(numbers.values())})")
        chosen = match[0]
    idx = [i for i, e in enumerate(entries) if e[0] == chosen]
    views = {entries[i][2] for i in idx}
    if len(views) > 1:
        raise ValueError(f"{chosen}: INSTA takes a monocular video, this sequence has views {sorted(views)}")
    if max_frames:
        idx = idx[: int(max_frames)]
    return [folder[i] for i in idx]


def check_frames(samples: Sequence[dict], names: Sequence[str] | None = None, *, min_frames: int = MIN_FRAMES) -> None:
    """Errors for too few frames, missing keys, inconsistent sizes and non-finite values."""
    if len(samples) < min_frames:
        raise ValueError(f"INSTA needs at least {min_frames} frames (one to train on, one held out), got {len(samples)}")
    names = list(names) if names is not None else [f"frame {i}" for i in range(len(samples))]
    size = samples[0]["image"].shape[:2]
    for s, name in zip(samples, names):
        missing = [k for k in ("image", "mask", "K", "R", "t") + PARAM_KEYS if k not in s]
        if missing:
            raise ValueError(f"{name}: missing {', '.join(missing)} (INSTA needs images, masks, cameras and "
                             "head-model parameters)")
        if s["image"].shape[:2] != size:
            raise ValueError(f"{name}: image is {s['image'].shape[:2]}, the first frame {size}")
        for k in ("K", "R", "t") + PARAM_KEYS:
            if not np.all(np.isfinite(np.asarray(s[k]))):
                raise ValueError(f"{name}: '{k}' holds non-finite values")


def region_faces(model) -> tuple[np.ndarray, np.ndarray]:
    """(mouth [F] bool, face [F] bool) triangle regions of a head model with region masks.

    mouth: triangles touching the lips or the mouth interior (the expression-conditioned
    region); face: triangles of the facial skin (all vertices in the 'face' region, none in the
    eyes or the mouth interior), the region of the geometry term.
    """
    if model.regions is None or "lips" not in model.regions or "face" not in model.regions:
        raise ValueError(f"model {model.name!r} has no 'lips'/'face' region masks: INSTA needs them for its mouth "
                         "and face regions (the embedded default head has them)")
    reg = {k: np.asarray(v, bool) for k, v in model.regions.items()}
    faces = np.asarray(model.faces)
    interior = reg.get("mouth_interior", np.zeros_like(reg["lips"]))
    mouth = (reg["lips"] | interior)[faces].any(1)
    face = reg["face"][faces].all(1) & ~(reg["eyes"] | interior)[faces].any(1)
    return mouth, face


def _head_transform(model, shape, pose, translation, joints_posed):
    """Rigid canonical -> world transform of the head: x = R0 (x - j0) + j0_posed."""
    rest = flame.forward(model, jnp.asarray(shape)[None]).joints[0, 0]
    R0 = np.asarray(rotations.axis_angle_to_matrix(jnp.asarray(pose[0])))
    return R0, np.asarray(joints_posed) - R0 @ np.asarray(rest)


def prepare(samples: Sequence[dict], model, *, background=(1.0, 1.0, 1.0), depth_source: str = "mesh",
            names: Sequence[str] | None = None, min_frames: int = MIN_FRAMES) -> tuple[Video, np.ndarray]:
    """Per-frame arrays of a tracked video and its canonical mesh (module docstring).

    Args:
      samples: frames (`load_video`); model: the head model the parameters refer to, extended by
        the mouth proxy (`dhjax.data.synthetic.build_assets(...).model`); background: RGB in
        [0, 1]; depth_source: 'mesh' (rasterise the tracked mesh, the thesis) or 'dataset' (the
        dataset's depth maps, e.g. the tracker's); names: frame names for error messages;
        min_frames: fewer frames are an error (1 to prepare frames one at a time).
    Returns:
      (Video, canonical vertices [V, 3]).
    """
    if depth_source not in ("mesh", "dataset"):
        raise ValueError(f"depth_source must be 'mesh' or 'dataset', got {depth_source!r}")
    check_frames(samples, names, min_frames=min_frames)
    names = list(names) if names is not None else [f"frame {i}" for i in range(len(samples))]
    mouth_f, face_f = region_faces(model)
    faces = jnp.asarray(model.faces)
    H, W = samples[0]["image"].shape[:2]
    bg = np.asarray(background, np.float32).reshape(1, 1, 3)
    shapes = np.stack([np.asarray(s["shape"], np.float32) for s in samples])
    if np.ptp(shapes, axis=0).max(initial=0.0) > 1e-5:
        raise ValueError("the frames have different identity shapes; INSTA builds one canonical mesh per video")
    canon = np.asarray(flame.forward(model, jnp.asarray(shapes[:1])).vertices[0])
    out = {k: [] for k in Video._fields}
    for s, name in zip(samples, names):
        if depth_source == "dataset" and "depth" not in s:
            raise ValueError(f"{name}: depth_source='dataset' but the frame has no depth map (<view>_depth.png)")
        params = {k: jnp.asarray(s[k], jnp.float32)[None] for k in PARAM_KEYS}
        # Tracked eyelids (the INSTA tracker's blendshapes) shape the frame's mesh too.
        eyelids = (jnp.asarray(s["eyelids"], jnp.float32)[None]
                   if "eyelids" in s and model.eyelid_dirs is not None else None)
        fo = flame.forward(model, params["shape"], params["expression"], params["pose"], params["translation"],
                           eyelids=eyelids)
        verts = np.asarray(fo.vertices[0])
        cam = camera_lib.make_camera(jnp.asarray(s["K"]), jnp.asarray(s["R"]), jnp.asarray(s["t"]), W, H)
        frags = raster.rasterize(jnp.asarray(verts)[None], faces, cam)
        fid = np.asarray(frags.face_id[0])
        hit = np.asarray(frags.mask[0]) > 0.5
        z = np.asarray(frags.depth[0])
        if depth_source == "dataset":
            z = np.asarray(s["depth"], np.float32)
            hit = z > 0
        _, dirs = camera_lib.pixel_rays(cam)
        cos = np.einsum("hwc,c->hw", np.asarray(dirs), np.asarray(s["R"])[2])
        mesh_t = np.where(hit, z / np.maximum(cos, 1e-6), 0.0).astype(np.float32)
        f_safe = np.clip(fid, 0, len(mouth_f) - 1)
        mask = np.asarray(s["mask"], np.float32)
        mouth = hit & mouth_f[f_safe] & (mask > 0.5)
        face = hit & face_f[f_safe] & (mask > 0.5)
        if "seg" in s:
            seg = np.asarray(s["seg"])
            mouth = mouth | (seg == ds.LABEL["mouth"])
            face = face & (seg == ds.LABEL["face"])
        img = np.asarray(s["image"], np.float32)[..., :3]
        R0, t0 = _head_transform(model, s["shape"], np.asarray(s["pose"]), s["translation"], fo.joints[0, 0])
        out["images"].append(img * mask[..., None] + bg * (1.0 - mask[..., None]))
        out["mask"].append(mask)
        out["mouth"].append(mouth)
        out["face"].append(face)
        out["mesh_t"].append(mesh_t)
        out["verts"].append(verts.astype(np.float32))
        out["expression"].append(np.asarray(s["expression"], np.float32))
        out["head_R"].append(R0.astype(np.float32))
        out["head_t"].append(t0.astype(np.float32))
        out["K"].append(np.asarray(s["K"], np.float32))
        out["R"].append(np.asarray(s["R"], np.float32))
        out["t"].append(np.asarray(s["t"], np.float32))
        out["true_depth"].append(np.asarray(s.get("depth", np.zeros((H, W))), np.float32))
        out["frame"].append(np.int32(s.get("frame", len(out["frame"]))))
    return Video(**{k: np.stack(v) for k, v in out.items()}), canon.astype(np.float32)


def holdout_count(n: int, holdout: float | int) -> int:
    """Held-out frames of n (holdout: a count >= 1, or a fraction < 1; at least 1, at most n - 1)."""
    k = int(holdout) if holdout >= 1 else int(round(float(holdout) * n))
    return min(max(k, 1), n - 1)


def split(video: Video, holdout: float | int) -> tuple[Video, Video]:
    """(train, test): the last frames are held out (holdout: a count >= 1, or a fraction < 1)."""
    n = video.images.shape[0]
    k = holdout_count(n, holdout)
    return video.take(np.arange(n - k)), video.take(np.arange(n - k, n))


def frame_rays(video: Video, i: int) -> tuple[np.ndarray, np.ndarray]:
    """World rays of frame i: origins, unit directions [H, W, 3]."""
    W, H = video.size
    cam = camera_lib.make_camera(jnp.asarray(video.K[i]), jnp.asarray(video.R[i]), jnp.asarray(video.t[i]), W, H)
    o, d = camera_lib.pixel_rays(cam)
    return np.asarray(o), np.asarray(d)


def _camera_rays(K, R, t, px):
    """Rays through pixel centres px [..., 2] (column, row) of OpenCV cameras [G, ...]."""
    uv1 = np.concatenate([px + 0.0, np.ones(px.shape[:-1] + (1,), np.float32)], -1)    # [G, R, 3]
    cam_dirs = np.einsum("gij,grj->gri", np.linalg.inv(K), uv1)
    dirs = np.einsum("gji,grj->gri", R, cam_dirs)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    centre = -np.einsum("gji,gj->gi", R, t)
    return np.broadcast_to(centre[:, None], dirs.shape).astype(np.float32), dirs.astype(np.float32)


def frame_inputs(video: Video, idx, frame_index=None) -> dict:
    """The `insta.Frames` fields of frames idx [G] (frame: training index for latent codes)."""
    idx = np.asarray(idx)
    return dict(verts=video.verts[idx], expression=video.expression[idx], head_R=video.head_R[idx],
                head_t=video.head_t[idx],
                frame=np.asarray(idx if frame_index is None else frame_index, np.int32).reshape(idx.shape))


class RayBatches:
    """Training ray batches by step (module docstring); `get_batch(step)` -> dict of numpy arrays
    with leading axis G = frames_per_step (origins, dirs, color, mouth, face, mesh_t, pixel (flat
    pixel index row * W + column) [G, R, ...], background [G, R, 3] with random backgrounds, and
    the frame inputs)."""

    def __init__(self, video: Video, *, frames_per_step: int, rays_per_frame: int, buffer_frames: int = 0,
                 resample_every: int = 0, online_frames_per_step: float = 0.0, seed: int = 0,
                 random_background: bool = False, background=(1.0, 1.0, 1.0), arrived=None):
        self.video = video
        self.arrived = arrived          # live online mode: () -> frames usable now (overrides the schedule)
        self.n = int(video.images.shape[0])
        self.G, self.R = int(frames_per_step), int(rays_per_frame)
        if self.G < 1 or self.R < 1:
            raise ValueError(f"frames_per_step and rays_per_frame must be >= 1, got {self.G}, {self.R}")
        self.buffer = int(buffer_frames) if 0 < int(buffer_frames) < self.n else self.n
        self.every = int(resample_every)
        self.online = float(online_frames_per_step)
        self.seed = int(seed)
        self.random_background = bool(random_background)
        self.background = np.asarray(background, np.float32)

    def available(self, step: int) -> int:
        """Frames usable at a step (all, or the arrived ones in online mode; at least one)."""
        if self.arrived is not None:
            return int(min(self.n, max(1, self.arrived())))
        if self.online <= 0:
            return self.n
        return int(min(self.n, max(1, 1 + np.floor(step * self.online))))

    def frames_at(self, step: int) -> np.ndarray:
        """The frame buffer at a step (sorted training frame indices)."""
        n = self.available(step)
        if self.buffer >= n:
            return np.arange(n)
        epoch = step // self.every if self.every > 0 else 0
        rng = np.random.default_rng([self.seed, 1, epoch, n])
        return np.sort(rng.choice(n, self.buffer, replace=False))

    def get_batch(self, step: int) -> dict:
        """Training rays of a step: G frames from the frame buffer of the step, R random pixels each,
        drawn by a generator seeded with (seed, step): origins and dirs [G, R, 3], colour, pixel,
        mouth and face masks, mesh depth, the frames' `insta.Frames` fields, and a random background
        per ray when `random_background`."""
        v = self.video
        W, H = v.size
        rng = np.random.default_rng([self.seed, 2, int(step)])
        buf = self.frames_at(int(step))
        idx = buf[rng.integers(0, len(buf), self.G)]
        pix = rng.integers(0, W * H, (self.G, self.R))
        rows, cols = pix // W, pix % W
        px = np.stack([cols, rows], -1).astype(np.float32)
        o, d = _camera_rays(v.K[idx], v.R[idx], v.t[idx], px)
        g = idx[:, None]
        color = v.images[g, rows, cols]
        batch = dict(origins=o, dirs=d, color=color, pixel=pix.astype(np.int32),
                     mouth=v.mouth[g, rows, cols].astype(np.float32),
                     face=v.face[g, rows, cols].astype(np.float32), mesh_t=v.mesh_t[g, rows, cols])
        if self.random_background:
            # the video's images are composited over `background`; swap it for a random colour
            bg = rng.uniform(0.0, 1.0, (self.G, self.R, 3)).astype(np.float32)
            alpha = v.mask[g, rows, cols][..., None]
            batch["color"] = (color + (1.0 - alpha) * (bg - self.background)).astype(np.float32)
            batch["background"] = bg
        batch.update(frame_inputs(v, idx))
        return batch
