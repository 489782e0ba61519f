"""GEM's data: one subject's multi-view capture (frames x cameras) in memory, its splits and the
frame batches of stage A.

A capture is read from a `dhjax.data.dataset` folder (kind 'multiview': one item = the subject,
frames = expressions, views = cameras) or generated once by the synthetic multi-view generator
into the cache. Splits follow NeRSemble-based work: held-out cameras (novel view: training
frames seen from cameras never trained on) and held-out frames, the last ones (novel expression:
seen from every camera).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from dhjax.data import dataset as ds


def take_frames_views(capture, frames, views, frame_view: Sequence[str], per_frame: Sequence[str],
                      per_view: Sequence[str] = ("view",)):
    """A copy of a frames x cameras NamedTuple keeping the given frame and view positions (index
    arrays, or None for all): fields named in frame_view are indexed [frames][:, views], those in
    per_frame by frames, those in per_view by views; the others (e.g. the identity) are kept."""
    f = np.arange(capture.images.shape[0]) if frames is None else np.asarray(frames)
    v = np.arange(capture.images.shape[1]) if views is None else np.asarray(views)
    fv = np.ix_(f, v)
    return capture._replace(**{n: getattr(capture, n)[fv] for n in frame_view},
                            **{n: getattr(capture, n)[f] for n in per_frame},
                            **{n: getattr(capture, n)[v] for n in per_view})

class Capture(NamedTuple):
    """One subject's frames x cameras.

    images [F, C, H, W, 3] uint8; masks [F, C, H, W] bool; K [F, C, 3, 3], R [F, C, 3, 3],
    t [F, C, 3] (OpenCV, world -> camera, metres); shape [S']; expression [F, E]; pose [F, 5, 3]
    axis-angle; translation [F, 3] metres; frame [F] and view [C] numbers of the dataset.
    """

    images: np.ndarray
    masks: np.ndarray
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    shape: np.ndarray
    expression: np.ndarray
    pose: np.ndarray
    translation: np.ndarray
    frame: np.ndarray
    view: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(W, H)."""
        return int(self.images.shape[3]), int(self.images.shape[2])

    def take(self, frames=None, views=None) -> "Capture":
        """A sub-capture of the given frame and view positions (index arrays or None = all)."""
        return take_frames_views(self, frames, views, frame_view=("images", "masks", "K", "R", "t"),
                                 per_frame=("expression", "pose", "translation", "frame"))

    def frame_params(self, i: int) -> dict:
        """shape, expression, pose, translation of frame position i (float32 numpy)."""
        return dict(shape=self.shape, expression=self.expression[i], pose=self.pose[i],
                    translation=self.translation[i])


def load_capture(root, split: str = "train", item: int = -1, *, max_frames: int = 0, log=print) -> Capture:
    """Reads one subject's frames x cameras from a dataset folder.

    Args:
      root, split: a `dhjax.data.dataset` folder and split; item: the item number (-1: the first).
      max_frames: keep the first frames only (0: all).
    Raises FileNotFoundError / ValueError naming the folder when the item is missing, frames
    have different cameras or image sizes, or parameters are not finite.
    """
    reader = ds.FolderDataset(root, split)
    items = sorted({e[3] for e in reader.entries})
    ordinal = items[0] if int(item) < 0 else int(item)
    if ordinal not in items:
        raise ValueError(f"{root}/{split}: no item {item} (items 0..{len(items) - 1} by position)")
    idx = [i for i, e in enumerate(reader.entries) if e[3] == ordinal]
    frames: dict = {}
    for i in idx:
        frames.setdefault(reader.entries[i][1], []).append(i)
    frame_dirs = sorted(frames, key=lambda p: ds._numbered(p))
    if max_frames:
        frame_dirs = frame_dirs[: int(max_frames)]
    if len(frame_dirs) < 2:
        raise ValueError(f"{root}/{split}: the subject has {len(frame_dirs)} frame(s); GEM needs several "
                         f"frames (expressions) to build a basis")
    views0 = [reader.entries[i][2] for i in frames[frame_dirs[0]]]
    imgs, masks, Ks, Rs, ts, ex, po, tr, fr = [], [], [], [], [], [], [], [], []
    shape = None
    view_numbers = None
    for fd in frame_dirs:
        views = [reader.entries[i][2] for i in frames[fd]]
        if views != views0:
            raise ValueError(f"{fd}: cameras {views} differ from the first frame's {views0}; GEM needs every "
                             f"frame seen by the same cameras")
        samples = [reader[i] for i in frames[fd]]
        im = np.stack([s["image"] for s in samples])
        if imgs and im.shape != imgs[0].shape:
            raise ValueError(f"{fd}: images are {im.shape[1:]}, the first frame's {imgs[0].shape[1:]}")
        imgs.append(im.astype(np.float32))
        masks.append(np.stack([s["mask"] > 0.5 for s in samples]))
        Ks.append(np.stack([s["K"] for s in samples]))
        Rs.append(np.stack([s["R"] for s in samples]))
        ts.append(np.stack([s["t"] for s in samples]))
        s0 = samples[0]
        for k in ("expression", "pose", "translation", "shape"):
            if not np.all(np.isfinite(s0[k])):
                raise ValueError(f"{fd}: '{k}' has non-finite values")
        shape = s0["shape"] if shape is None else shape
        ex.append(s0["expression"]), po.append(s0["pose"]), tr.append(s0["translation"]), fr.append(s0["frame"])
        if view_numbers is None:
            view_numbers = np.asarray([s["view"] for s in samples], np.int32)
    images = np.clip(np.round(np.stack(imgs) * 255.0), 0, 255).astype(np.uint8)
    cap = Capture(images, np.stack(masks), np.stack(Ks), np.stack(Rs), np.stack(ts), np.asarray(shape, np.float32),
                  np.stack(ex).astype(np.float32), np.stack(po).astype(np.float32), np.stack(tr).astype(np.float32),
                  np.asarray(fr, np.int32), view_numbers)
    W, H = cap.size
    log(f"capture: {root}/{split} item {ordinal}: {images.shape[0]} frames x {images.shape[1]} cameras of {W}x{H}")
    return cap


class Split(NamedTuple):
    """Frame and camera positions of the three sets: train (train frames x train cameras),
    novel view (train frames x test cameras) and novel expression (test frames x all cameras)."""

    train_frames: np.ndarray
    test_frames: np.ndarray
    train_views: np.ndarray
    test_views: np.ndarray


def split(capture, test_views: Sequence[int], n_test_frames, *, min_train_frames: int = 2) -> Split:
    """Held-out cameras by view number (`capture.view`) and the last frames (a count, or a
    fraction < 1 of the frames); at least `min_train_frames` frames and one camera stay for
    training. Any capture with images [F, C, ...] and view numbers [C] (also D3GA's)."""
    F, C = capture.images.shape[:2]
    x = float(n_test_frames)
    if not (0 < x < 1 or (x >= 0 and x == int(x))):
        raise ValueError(f"data.test_frames must be a count of frames or a fraction in (0, 1), got {n_test_frames!r}")
    n_test = int(round(x * F)) if 0 < x < 1 else int(x)
    if not 0 <= n_test <= F - min_train_frames:
        raise ValueError(f"cannot hold out {n_test} of {F} frames (at least {min_train_frames} must remain "
                         f"for training)")
    pos = {int(v): i for i, v in enumerate(capture.view)}
    bad = [v for v in test_views if int(v) not in pos]
    if bad:
        one = " (a single camera: GEM and D3GA train on multi-view video)" if len(pos) == 1 else ""
        raise ValueError(f"held-out cameras {bad} are not among the capture's cameras {sorted(pos)}{one}")
    tv = np.asarray(sorted({pos[int(v)] for v in test_views}), np.int64)
    trv = np.asarray([i for i in range(C) if i not in set(tv.tolist())], np.int64)
    if trv.size == 0:
        raise ValueError("every camera is held out; none is left for training")
    return Split(np.arange(F - n_test), np.arange(F - n_test, F), trv, tv)


class FrameBatches:
    """Stage A batches: per step, `frames_per_step` random training frames, each seen by
    `views_per_step` random training cameras, with a random background colour per frame (or the
    fixed one). Deterministic in (seed, step)."""

    def __init__(self, capture: Capture, sp: Split, *, frames_per_step: int = 1, views_per_step: int = 4,
                 seed: int = 0, random_background: bool = True, background=(1.0, 1.0, 1.0)):
        self.capture, self.sp = capture, sp
        self.frames_per_step, self.seed = int(frames_per_step), int(seed)
        self.views_per_step = min(int(views_per_step), len(sp.train_views))
        self.random_background, self.background = bool(random_background), np.asarray(background, np.float32)

    def get_batch(self, step: int) -> dict:
        """Training batch of a step: frames_per_step training frames, each seen by views_per_step
        training cameras, drawn by a generator seeded with (seed, step) (`frame_batch` keys, stacked)."""
        rng = np.random.default_rng([self.seed, int(step)])
        fpos = rng.choice(self.sp.train_frames, self.frames_per_step, replace=len(self.sp.train_frames) < self.frames_per_step)
        rows = []
        for f in fpos:
            v = np.sort(rng.choice(self.sp.train_views, self.views_per_step, replace=False))
            bg = rng.uniform(0, 1, 3).astype(np.float32) if self.random_background else self.background
            rows.append(frame_batch(self.capture, int(f), v, bg))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def frame_batch(capture: Capture, f: int, views, background) -> dict:
    """One frame's batch dict (`gem.loss_terms`): params, images [V, H, W, 3] float32, masks,
    cameras, background [3], index (the frame position f)."""
    v = np.asarray(views)
    p = capture.frame_params(f)
    return dict(shape=p["shape"], expression=p["expression"], pose=p["pose"], translation=p["translation"],
                image=capture.images[f, v].astype(np.float32) / 255.0, mask=capture.masks[f, v].astype(np.float32),
                K=capture.K[f, v], R=capture.R[f, v], t=capture.t[f, v],
                background=np.asarray(background, np.float32), index=np.int32(f))
