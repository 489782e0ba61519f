"""Datasets of head images with cameras and FLAME parameters: disk format, reader, writer,
and a deterministic, shardable input pipeline.

A dataset is anything with `len()` and random access `ds[i]` -> sample dict (numpy arrays, the
keys of `SAMPLE_KEYS`; real data carries at least `REQUIRED_KEYS`), which is also Grain's
random-access data source protocol. The synthetic generators (`MultiviewGenerator`,
`VideoGenerator`) and `FolderDataset` (the disk reader) are datasets; `Pipeline` turns one into
batches for `dhjax.train.loop`, and `dhjax.data.grain_pipeline.GrainPipeline` gives the same
batches through Grain (decoding threads and worker processes, a checkpointable iterator).

On-disk layout (format "dhjax.dataset/1"; the same for synthetic data and for tracked real
videos, so real data loads through the same pipeline):

    <root>/meta.json                      format, kind, part labels, splits, units, generator config
                                          and version (synthetic datasets)
    <root>/<split>/<item>/identity.npz    shape [S] float32 (+ optional skin_tone, hair_style,
                                          beard_style, upper_kind, lower_kind, item); a .json
                                          describes it
    <root>/<split>/<item>/uv.npz          optional: uv_position [T, T, 3] (metres, neutral)
    <root>/<split>/<item>/uv_albedo.png   optional: albedo in the model's UV layout (8-bit RGB)
    <root>/<split>/<item>/<frame>/params.npz   expression [E], pose [5, 3] axis-angle (global,
                                          neck, jaw, left eye, right eye; bodies: [55, 3] in
                                          SMPL-X order, meta.json "pose_joints": 55), optional
                                          translation [3] (default 0), sh [9, 3],
                                          uv_expression_offset [T, T, 3], keypoints [K, 3],
                                          eyelids [2] (left, right closing; tracked videos)
    <root>/<split>/<item>/<frame>/cameras.json {"<view>": {"K": 3x3, "R": 3x3, "t": [3],
                                          "width": W, "height": H}} OpenCV, x_cam = R x + t, metres
    <root>/<split>/<item>/<frame>/<view>.png        RGB image
    <root>/<split>/<item>/<frame>/<view>_mask.png   foreground mask (8-bit, > 127 = foreground)
    <root>/<split>/<item>/<frame>/<view>_seg.png    optional: part labels (8-bit values, meta.json
                                          "labels": PART_LABELS for heads, body_synthetic's
                                          LAYER_LABELS for bodies)
    <root>/<split>/<item>/<frame>/<view>_depth.png  optional: 16-bit camera z in units of 0.1 mm
                                          (value / 10000 = metres; 0 = background; max 6.5535 m)

An item is an identity (multi-view) or a video sequence; a frame is an expression (multi-view) or a
video frame; a view is a camera. Synthetic writers name them `item_XXXXXXX`, `frame_XXXX`,
`cam_XX`; the reader takes any names, sorted, and reads the trailing number of a name as its
index (`item`, `frame`, `view` of the sample; the ordinal when a name has no number). The FLAME
parameters follow `dhjax.models.flame.forward` (metres; shape/expression coefficients of the
model the data was made with).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dhjax import io as dio

FORMAT = "dhjax.dataset/1"
# Part labels of the `<view>_seg.png` maps (value = index): 0 background, 1 face (all head skin not
# covered by hair: face, ears, bare scalp), 2 hair (hair and beard), 3 mouth (mouth interior),
# 4 eyes (eyeballs), 5 neck.
PART_LABELS = ("background", "face", "hair", "mouth", "eyes", "neck")
LABEL = {name: i for i, name in enumerate(PART_LABELS)}
# Keys of a sample (one image). Required ones are present for every dataset, real or synthetic.
REQUIRED_KEYS = ("image", "mask", "K", "R", "t", "shape", "expression", "pose", "translation")
SAMPLE_KEYS = REQUIRED_KEYS + (
    "seg", "depth", "sh", "uv_albedo", "uv_position", "uv_expression_offset",
    "skin_tone", "hair_style", "beard_style", "item", "frame", "view")
# Optional per-item and per-frame entries beyond the head's (body datasets: `dhjax.data.body_synthetic`).
IDENTITY_EXTRAS = (("skin_tone", np.float32), ("hair_style", np.int32), ("beard_style", np.int32),
                   ("upper_kind", np.int32), ("lower_kind", np.int32))
FRAME_EXTRAS = ("sh", "uv_expression_offset", "keypoints", "eyelids")
DEPTH_SCALE = 10000.0          # depth PNG units per metre (0.1 mm)
# Colours of the part labels in `colorize_seg` (background, face, hair, mouth, eyes, neck).
SEG_COLOURS = np.array([[0, 0, 0], [230, 180, 140], [90, 50, 20], [200, 30, 60], [60, 140, 255],
                        [150, 200, 110]], np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing.


def _json_array(a):
    return np.asarray(a, np.float64).tolist()


def _write_depth_png(path: Path, depth) -> None:
    import imageio.v3 as iio

    depth = np.asarray(depth, np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {depth.shape}")
    if np.any(depth < 0) or np.any(depth * DEPTH_SCALE > 65535):
        raise ValueError(f"{path}: depth outside [0, {65535 / DEPTH_SCALE}] m cannot be stored as 16-bit PNG")
    iio.imwrite(path, np.round(depth * DEPTH_SCALE).astype(np.uint16))


def _write_label_png(path: Path, seg) -> None:
    import imageio.v3 as iio

    seg = np.asarray(seg)
    if seg.min() < 0 or seg.max() > 255:
        raise ValueError(f"{path}: labels must lie in [0, 255]")
    iio.imwrite(path, seg.astype(np.uint8))


class Writer:
    """Writes sample dicts into the on-disk layout (see the module docstring).

    Usage: `w = Writer(root, split, kind=..., meta=...)`, `w.add(sample)` per image,
    `w.close()` (writes meta.json). Identity files are written once per item, cameras.json is
    rewritten as views of a frame arrive. Samples need `item`, `frame` and `view` ints.
    """

    def __init__(self, root, split: str = "train", *, kind: str = "multiview",
                 meta: Mapping[str, Any] | None = None, shard: tuple[int, int] | None = None,
                 labels: Sequence[str] = PART_LABELS):
        self.root, self.split, self.kind = Path(root), str(split), kind
        self.labels = tuple(labels)
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self.meta = dict(meta or {})
        self._items: set = set()
        self._cameras: dict = {}
        self._frames: set = set()
        self.count = 0

    @staticmethod
    def names(sample) -> tuple[str, str, str]:
        """(item, frame, camera) folder and file names of a sample: item_0000007, frame_0003, cam_02."""
        return (f"item_{int(sample['item']):07d}", f"frame_{int(sample['frame']):04d}",
                f"cam_{int(sample['view']):02d}")

    def add(self, sample: Mapping[str, np.ndarray]) -> Path:
        """Writes one sample; returns its frame folder."""
        missing = [k for k in REQUIRED_KEYS + ("item", "frame", "view") if k not in sample]
        if missing:
            raise ValueError(f"sample lacks keys {missing}")
        item, frame, view = self.names(sample)
        item_dir = self.root / self.split / item
        frame_dir = item_dir / frame
        frame_dir.mkdir(parents=True, exist_ok=True)
        if item not in self._items:
            ident = {"shape": sample["shape"], "item": np.int64(sample["item"])}
            for k, _ in IDENTITY_EXTRAS:
                if k in sample:
                    ident[k] = sample[k]
            dio.save_params(item_dir / "identity", ident, meta={"what": "identity of the item"})
            if "uv_position" in sample:
                dio.save_params(item_dir / "uv", {"uv_position": sample["uv_position"]},
                                meta={"units": "metres", "layout": "head model UV, texel (i, j) at "
                                      "((j + .5) / T, 1 - (i + .5) / T)"})
            if "uv_albedo" in sample:
                dio.save_image(item_dir / "uv_albedo.png", sample["uv_albedo"])
            self._items.add(item)
        if (item, frame) not in self._frames:
            # The reader checks poses against this (5 FLAME joints, 55 SMPL-X joints).
            self.meta.setdefault("pose_joints", int(np.shape(sample["pose"])[0]))
            params = {k: sample[k] for k in ("expression", "pose", "translation") + FRAME_EXTRAS
                      if k in sample}
            n_joints = int(np.shape(sample["pose"])[0])
            dio.save_params(frame_dir / "params", params,
                            meta={"pose": ("axis-angle [5, 3]: global, neck, jaw, left eye, right eye"
                                           if n_joints == 5 else
                                           f"axis-angle [{n_joints}, 3] in the body model's joint order"),
                                  "units": "metres"})
            self._frames.add((item, frame))
        image = np.asarray(sample["image"])
        H, W = image.shape[:2]
        dio.save_image(frame_dir / f"{view}.png", image)
        dio.save_image(frame_dir / f"{view}_mask.png", np.asarray(sample["mask"]) > 0.5)
        if "seg" in sample:
            _write_label_png(frame_dir / f"{view}_seg.png", sample["seg"])
        if "depth" in sample:
            _write_depth_png(frame_dir / f"{view}_depth.png", sample["depth"])
        cams = self._cameras.setdefault((item, frame), {})
        cams[view] = {"K": _json_array(sample["K"]), "R": _json_array(sample["R"]),
                      "t": _json_array(sample["t"]), "width": int(W), "height": int(H)}
        # Written last and atomically: a frame folder with cameras.json is complete (a reader of a
        # folder being filled, FolderDataset(partial=True), takes only those).
        tmp = frame_dir / f".cameras.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(cams, indent=1))
        os.replace(tmp, frame_dir / "cameras.json")
        self.count += 1
        return frame_dir

    def close(self) -> Path:
        """Writes (or updates) <root>/meta.json with this split's counts; returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".meta.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # shards of one dataset close one at a time
            try:
                return self._update_meta()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _update_meta(self) -> Path:
        path = self.root / "meta.json"
        meta = json.loads(path.read_text()) if path.exists() else {}
        meta.update({"format": FORMAT, "kind": self.kind, "labels": list(self.labels),
                     "units": "metres", "camera": "OpenCV: x_cam = R x_world + t, K in pixels",
                     "depth_png_units_per_metre": DEPTH_SCALE})
        meta.update(self.meta)
        splits = meta.setdefault("splits", {})
        counts = {"items": len(self._items), "frames": len(self._frames), "images": self.count}
        if self.shard is None:
            splits[self.split] = counts
        else:  # several hosts write one split: keep each shard's counts and their totals
            entry = splits.setdefault(self.split, {})
            shards = entry.setdefault("shards", {})
            shards[f"{self.shard[0]}/{self.shard[1]}"] = counts
            entry.update({k: sum(c[k] for c in shards.values()) for k in counts})
        tmp = path.with_name(f".meta.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return path


def write_dataset(dataset, root, split: str = "train", indices: Iterable[int] | None = None,
                  meta: Mapping[str, Any] | None = None, shard: tuple[int, int] | None = None,
                  labels: Sequence[str] | None = None) -> Path:
    """Writes samples `indices` (default all) of a dataset into the on-disk layout.

    Multi-view generators render all requested views of a frame in one batched call. With
    several hosts writing one dataset, give each `shard=(index, count)` and whole items
    (`shard_indices(..., group=items_size)`): meta.json then records every shard's counts.
    Returns the path of meta.json.
    """
    kind = getattr(dataset, "kind", "tracked")
    labels = getattr(dataset, "labels", PART_LABELS) if labels is None else labels
    writer = Writer(root, split, kind=kind, meta=meta, shard=shard, labels=labels)
    indices = range(len(dataset)) if indices is None else [int(i) for i in indices]
    if hasattr(dataset, "render_group"):
        groups: dict = {}
        for i in indices:
            it, fr, cam = dataset.locate(i)
            groups.setdefault((it, fr), []).append(cam)
        for (it, fr), cams in groups.items():
            for sample in dataset.render_group(it, fr, cams):
                writer.add(sample)
    else:
        for i in indices:
            writer.add(dataset[i])
    return writer.close()


# ----------------------------------------------------------------------------------------------
# Reading.


def _numbered(path: Path) -> tuple[int, str]:
    """Sort key: the trailing number of a folder name (frame_10000 after frame_2000), then the name."""
    return _trailing_number(path.name, -1), path.name


def _trailing_number(name: str, default: int) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else default


def _check_shape(path, key, array, shape):
    if tuple(np.shape(array)) != tuple(shape):
        raise ValueError(f"{path}: '{key}' must have shape {tuple(shape)}, got {tuple(np.shape(array))}")


def frame_views(frame_dir) -> list[str]:
    """The views (camera names) of a frame folder, from its cameras.json, in view-number order.
    Raises FileNotFoundError / ValueError naming the file when it is missing or malformed."""
    cam_path = dio.existing_file(Path(frame_dir) / "cameras.json")
    try:
        cams = json.loads(cam_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cam_path}: not valid JSON ({exc})") from exc
    if not isinstance(cams, dict) or not cams:
        raise ValueError(f"{cam_path}: expected a non-empty {{view: camera}} mapping")
    return sorted(cams, key=lambda v: (_trailing_number(v, -1), v))


class FolderDataset:
    """Reads a dataset in the on-disk layout: random access to one sample dict per image.

    Args:
      root: dataset folder (with meta.json, optional for real data); split: subfolder;
      partial: a folder another process is still filling (`dhjax.capture.tracker.DatasetStream`):
        frame folders without cameras.json (written last) are being written and are left out,
        and so are items with no complete frame yet.
    Samples hold REQUIRED_KEYS (image [H, W, 3] float32 in [0, 1], mask [H, W] float32, K, R,
    t, shape [S], expression [E], pose [J, 3] with J = meta.json's "pose_joints" (5 FLAME
    joints by default, 55 for bodies), translation [3]) plus whichever optional files and keys
    exist (seg [H, W] int32 with meta.json's "labels", depth [H, W] metres, sh, keypoints [K, 3],
    uv_albedo, uv_position, uv_expression_offset, skin_tone, hair_style, beard_style, upper_kind,
    lower_kind) and item / frame / view ints.
    Missing required files or keys and wrong shapes raise errors naming the file.

    A Grain random-access data source (`grain.MapDataset.source(FolderDataset(...))`): reads are
    thread-safe and deterministic, and the object pickles (paths only) into worker processes.
    """

    kind = "folder"

    def __init__(self, root, split: str = "train", *, partial: bool = False):
        self.root = Path(root)
        self.split_dir = self.root / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"no dataset folder '{self.root}'" + (
                " (it is a file)" if self.root.exists() else ""))
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"no split folder '{self.split_dir}'")
        meta_path = self.root / "meta.json"
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if self.meta and self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.kind = self.meta.get("kind", "tracked")
        self.entries = []     # (item_dir, frame_dir, view, item_ordinal)
        items = sorted((p for p in self.split_dir.iterdir() if p.is_dir()), key=_numbered)
        if not items:
            raise ValueError(f"'{self.split_dir}' holds no item folders")
        for n, item_dir in enumerate(items):
            frames = sorted((p for p in item_dir.iterdir() if p.is_dir()), key=_numbered)
            if partial:
                frames = [p for p in frames if (p / "cameras.json").exists()]
            elif not frames:
                raise ValueError(f"item folder '{item_dir}' holds no frame folders")
            for frame_dir in frames:
                for view in frame_views(frame_dir):
                    self.entries.append((item_dir, frame_dir, view, n))
        self._cams: tuple | None = None   # (frame folder, its cameras.json) of the last read

    def __len__(self):
        return len(self.entries)

    def __repr__(self) -> str:
        return f"FolderDataset('{self.split_dir}', {len(self)} images)"

    def _camera(self, frame_dir: Path, view: str):
        # One (folder, cameras) tuple swapped atomically: Grain reads samples from several threads.
        cached = self._cams
        if cached is None or cached[0] != frame_dir:
            cached = (frame_dir, json.loads((frame_dir / "cameras.json").read_text()))
            self._cams = cached
        cam = cached[1][view]
        path = frame_dir / "cameras.json"
        for k in ("K", "R", "t", "width", "height"):
            if k not in cam:
                raise ValueError(f"{path}: camera '{view}' lacks '{k}'")
        K, R, t = (np.asarray(cam[k], np.float32) for k in ("K", "R", "t"))
        _check_shape(f"{path} [{view}]", "K", K, (3, 3))
        _check_shape(f"{path} [{view}]", "R", R, (3, 3))
        _check_shape(f"{path} [{view}]", "t", t, (3,))
        return K, R, t, int(cam["width"]), int(cam["height"])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        return self.read(*self.entries[index])

    def read(self, item_dir: Path, frame_dir: Path, view: str, ordinal: int = 0) -> dict:
        """The sample of one view of one frame folder (`entries` holds (item_dir, frame_dir, view,
        ordinal) tuples; ordinal: the item's number when its identity has none). Lets a reader of
        a partial folder read frames that appeared after it was opened."""
        item_dir, frame_dir = Path(item_dir), Path(frame_dir)
        K, R, t, W, H = self._camera(frame_dir, view)
        image = dio.load_image(frame_dir / f"{view}.png")
        if image.shape[2] == 4:
            image = image[..., :3]
        if image.shape[:2] != (H, W) or image.shape[2] != 3:
            raise ValueError(f"{frame_dir / (view + '.png')}: image is {image.shape}, cameras.json says "
                             f"{H}x{W} RGB")
        mask = dio.load_image(frame_dir / f"{view}_mask.png")[..., 0]
        _check_shape(frame_dir / f"{view}_mask.png", "mask", mask, (H, W))
        ident = dio.load_params(item_dir / "identity", required=("shape",))
        params = dio.load_params(frame_dir / "params", required=("expression", "pose"))
        ppath = frame_dir / "params.npz"
        if ident["shape"].ndim != 1:
            raise ValueError(f"{item_dir / 'identity.npz'}: 'shape' must be [S], got {ident['shape'].shape}")
        if params["expression"].ndim != 1:
            raise ValueError(f"{ppath}: 'expression' must be [E], got {params['expression'].shape}")
        _check_shape(ppath, "pose", params["pose"], (int(self.meta.get("pose_joints", 5)), 3))
        translation = params.get("translation", np.zeros(3, np.float32))
        _check_shape(ppath, "translation", translation, (3,))
        sample = dict(image=image, mask=(mask > 0.5).astype(np.float32), K=K, R=R, t=t,
                      shape=ident["shape"].astype(np.float32),
                      expression=params["expression"].astype(np.float32),
                      pose=params["pose"].astype(np.float32), translation=translation.astype(np.float32))
        seg_path = frame_dir / f"{view}_seg.png"
        if seg_path.exists():
            import imageio.v3 as iio

            seg = np.asarray(iio.imread(seg_path)).astype(np.int32)
            _check_shape(seg_path, "seg", seg, (H, W))
            sample["seg"] = seg
        depth_path = frame_dir / f"{view}_depth.png"
        if depth_path.exists():
            import imageio.v3 as iio

            raw = np.asarray(iio.imread(depth_path))
            if raw.dtype != np.uint16:
                raise ValueError(f"{depth_path}: depth must be a 16-bit PNG, got {raw.dtype}")
            _check_shape(depth_path, "depth", raw, (H, W))
            sample["depth"] = (raw.astype(np.float64) / DEPTH_SCALE).astype(np.float32)
        if "keypoints" in params:
            if params["keypoints"].ndim != 2 or params["keypoints"].shape[1] != 3:
                raise ValueError(f"{ppath}: 'keypoints' must be [K, 3], got {params['keypoints'].shape}")
            sample["keypoints"] = params["keypoints"].astype(np.float32)
        if "sh" in params:
            _check_shape(ppath, "sh", params["sh"], (9, 3))
            sample["sh"] = params["sh"].astype(np.float32)
        if "eyelids" in params:
            _check_shape(ppath, "eyelids", params["eyelids"], (2,))
            sample["eyelids"] = params["eyelids"].astype(np.float32)
        if (item_dir / "uv_albedo.png").exists():
            sample["uv_albedo"] = dio.load_image(item_dir / "uv_albedo.png")[..., :3]
        if (item_dir / "uv.npz").exists():
            sample["uv_position"] = dio.load_params(item_dir / "uv", required=("uv_position",))[
                "uv_position"].astype(np.float32)
        if "uv_expression_offset" in params:
            sample["uv_expression_offset"] = params["uv_expression_offset"].astype(np.float32)
        for k, dtype in IDENTITY_EXTRAS:
            if k in ident:
                sample[k] = np.asarray(ident[k], dtype)
        sample["item"] = np.int32(ident["item"]) if "item" in ident else np.int32(ordinal)
        sample["frame"] = np.int32(_trailing_number(frame_dir.name, 0))
        sample["view"] = np.int32(_trailing_number(view, 0))
        return sample


# ----------------------------------------------------------------------------------------------
# Input pipeline.


def check_processes(batch_size: int | None, process_index: int, process_count: int) -> None:
    """ValueError unless 0 <= process_index < process_count and (when batch_size is given) the
    global batch divides by process_count (every process feeds an equal share)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if batch_size is not None and batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not divide by {process_count} processes: every process "
                         f"feeds an equal share of the global batch")


def shard_indices(n: int, process_index: int, process_count: int, group: int = 1) -> np.ndarray:
    """The contiguous block of [0, n) that process `process_index` of `process_count` owns.

    Blocks are disjoint, cover [0, n) exactly and start at multiples of `group` (e.g. all images
    of one identity, `n_frames * n_cameras`): whole groups differ in number by at most one between
    processes. Writers need whole items per host, so that no two hosts write the same item's
    files (identity maps, cameras.json of a frame).
    """
    check_processes(None, process_index, process_count)
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    groups = -(-n // group)
    lo = min(n, ((groups * process_index) // process_count) * group)
    hi = min(n, ((groups * (process_index + 1)) // process_count) * group)
    return np.arange(lo, hi, dtype=np.int64)


def stack_samples(samples: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Stacks sample dicts into a batch dict [B, ...]; every sample must have the same keys."""
    if not samples:
        raise ValueError("no samples to stack")
    keys = set(samples[0])
    for i, s in enumerate(samples[1:], 1):
        if set(s) != keys:
            raise ValueError(f"sample {i} has keys {sorted(set(s) ^ keys)} that sample 0 "
                             f"{'lacks' if set(s) - keys else 'has'}; batches need one key set")
    return {k: np.stack([np.asarray(s[k]) for s in samples]) for k in samples[0]}


class Pipeline:
    """Deterministic batches from a random-access dataset, for `dhjax.train.loop.train`.

    `get_batch(step)` gives the global batch of a step: the dataset indices of epoch
    step // steps_per_epoch are a permutation of `indices` drawn from (seed, epoch) (or the plain
    order with shuffle=False), cut into batches of `batch_size` (the remainder is dropped), and
    stacked (`stack_samples`). The same (seed, step) always gives the same batch, so a resumed
    run reads exactly the batches an uninterrupted one would.

    `local_batch(step, process_index, process_count)` gives the rows of that batch one process
    feeds (those `dhjax.train.loop.shard_batch` keeps), generating only them.
    `shard(process_index, process_count)` restricts the pipeline to a contiguous block of the
    indices (`shard_indices`): disjoint and complete across processes, for generating or
    iterating a dataset on several hosts.

    Args:
      dataset: object with len() and [i] -> sample dict.
      batch_size: global batch size B.
      seed: shuffling seed; shuffle: permute per epoch; indices: the dataset indices to use
        (default all).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 indices: Sequence[int] | None = None):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.indices = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(self.indices) < self.batch_size:
            raise ValueError(f"{len(self.indices)} samples cannot fill a batch of {self.batch_size}")
        self._order: tuple | None = None   # (epoch, its order of the indices), the last one drawn

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch (a last partial batch is dropped)."""
        return len(self.indices) // self.batch_size

    def __len__(self):
        return self.steps_per_epoch

    def batch_indices(self, step: int) -> np.ndarray:
        """Dataset indices [B] of the global batch at `step`."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        return self.epoch_order(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The indices in the order epoch `epoch` reads them [len(indices)] (the permutation of
        (seed, epoch), or the plain order with shuffle=False). The last epoch's is kept, so a
        batch costs no permutation of the whole dataset."""
        cached = self._order           # one tuple read: safe with several reading threads
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = self.indices
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = order[rng.permutation(len(order))]
        self._order = (epoch, order)
        return order

    def get_batch(self, step: int) -> dict:
        """Global batch of `step`: dict of numpy arrays with leading axis B."""
        return stack_samples([self.dataset[int(i)] for i in self.batch_indices(step)])

    def local_batch(self, step: int, process_index: int, process_count: int) -> dict:
        """Rows [p B / n, (p + 1) B / n) of `get_batch(step)` (B must divide by n)."""
        check_processes(self.batch_size, process_index, process_count)
        rows = self.batch_size // process_count
        idx = self.batch_indices(step)[process_index * rows:(process_index + 1) * rows]
        return stack_samples([self.dataset[int(i)] for i in idx])

    def shard(self, process_index: int, process_count: int) -> "Pipeline":
        """The pipeline over this process's contiguous block of the indices."""
        block = shard_indices(len(self.indices), process_index, process_count)
        return Pipeline(self.dataset, self.batch_size, seed=self.seed,
                        shuffle=self.shuffle, indices=self.indices[block])

    def __iter__(self):
        """Batches of one epoch (epoch 0)."""
        for step in range(self.steps_per_epoch):
            yield self.get_batch(step)


# ----------------------------------------------------------------------------------------------
# Inspection.


def colorize_seg(seg) -> np.ndarray:
    """Part labels [..., H, W] -> uint8 RGB [..., H, W, 3] (SEG_COLOURS)."""
    seg = np.asarray(seg)
    return SEG_COLOURS[np.clip(seg, 0, len(SEG_COLOURS) - 1)]


def contact_sheet(images, ncols: int = 8) -> np.ndarray:
    """A grid of images [N, H, W, 3] (float in [0, 1] or uint8), `ncols` per row."""
    return dio.image_grid(np.asarray(images), ncols=ncols, pad=2, pad_value=1.0)
