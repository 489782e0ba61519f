"""MICA's synthetic training data: image / neutral-shape pairs, generated once per data config
and cached.

`generate_split` renders identities of the synthetic generator (`dhjax.data.synthetic`; each
split a disjoint range of identity numbers) with random expressions, head poses and lights,
seen by cameras at random azimuths / elevations / distances around the front of the head
(`sample_cameras`). The five alignment points are the projected ground-truth 68 landmarks of the
posed mesh (what a perfect detector gives); training adds Gaussian pixel noise to them
(`data.landmark_noise_px`) inside the step. `cached_split` stores a split as an npz under
<cache>/mica-<hash of the data config>/<split>.npz.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from dhjax.capture import align
from dhjax.capture.mica.crops import crop_batch
from dhjax.data import cache as cache_lib
from dhjax.data import synthetic
from dhjax.models import flame
from dhjax.render import camera as camera_lib

DATA_FORMAT = 1
"""Version of the cached data layout (part of the cache key)."""
STREAM_CAMERA = 21
"""Random stream of MICA's camera sampling (`dhjax.data.synthetic.key`)."""


def sample_cameras(data_cfg, identity_number: int, expression: int, n: int) -> camera_lib.Camera:
    """`n` cameras around the front of the head for one (identity, expression): azimuth
    U(-azimuth_deg, azimuth_deg), elevation U(elevation_deg), distance U(radius), looking at
    `target` + U(-target_jitter, target_jitter)^3; square image_size, fov_y_deg. Pure function
    of (data.synthetic.seed, identity, expression)."""
    k = synthetic.key(int(data_cfg.synthetic.seed), STREAM_CAMERA, int(identity_number), int(expression))
    u = np.asarray(jax.random.uniform(k, (n, 6)), np.float64)
    lo, hi = (float(x) for x in data_cfg.elevation_deg)
    r0, r1 = (float(x) for x in data_cfg.radius)
    az = np.deg2rad((2 * u[:, 0] - 1) * float(data_cfg.azimuth_deg))
    el = np.deg2rad(lo + (hi - lo) * u[:, 1])
    rad = r0 + (r1 - r0) * u[:, 2]
    target = np.asarray(data_cfg.target, np.float64) + (2 * u[:, 3:6] - 1) * float(data_cfg.target_jitter)
    eye = target + rad[:, None] * np.stack([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], -1)
    R, t = camera_lib.look_at(eye.astype(np.float32), target.astype(np.float32))
    size = int(data_cfg.image_size)
    return camera_lib.camera_from_fov(float(data_cfg.fov_y_deg), size, size, R, t)


def split_spec(data_cfg, split: str) -> tuple[int, int, int, int]:
    """(first identity number, identities, expressions per identity, views per expression) of a
    split ("train", "val", "test" or "calib") of a data config."""
    if split == "train":
        first, count = data_cfg.train_identities
        return int(first), int(count), int(data_cfg.train_expressions), int(data_cfg.train_views)
    if split in ("val", "test"):
        first, count = data_cfg[f"{split}_identities"]
        return int(first), int(count), int(data_cfg.eval_expressions), int(data_cfg.eval_views)
    if split == "calib":
        first, count = data_cfg.get("calib_identities", (250_000, 0))
        return (int(first), int(count), int(data_cfg.get("calib_expressions", 1)),
                int(data_cfg.get("calib_views", 1)))
    raise ValueError(f"split must be 'train', 'val', 'test' or 'calib', got {split!r}")


@jax.jit
def _landmarks_2d(model, verts, cams):
    lmk = flame.embed_landmarks(verts[None], model.faces, model.lmk_faces, model.lmk_bary)[0]
    uv, _ = camera_lib.project(cams, lmk[None])
    return uv


def generate_split(data_cfg, split: str, *, assets=None, verbose: bool = True) -> dict:
    """Renders one split of image / neutral-shape pairs.

    Returns numpy arrays with N = identities x expressions x views: image [N, S, S, 3] uint8,
    lmk68 [N, 68, 2] and five [N, 5, 2] float32 pixels (projected ground-truth landmarks),
    shape [N, n_shape] float32, identity / expression / view [N] int32.
    """
    first, count, n_expr, n_views = split_spec(data_cfg, split)
    if count < 1 or n_expr < 1 or n_views < 1:
        raise ValueError(f"split {split!r}: need at least one identity, expression and view, got "
                         f"{count}, {n_expr}, {n_views}")
    syn = data_cfg.synthetic.copy_and_resolve_references()
    syn.multiview.first_identity, syn.multiview.n_identities = first, count
    syn.multiview.n_expressions = n_expr
    if assets is None:
        if verbose:
            print("building the synthetic head assets ...", flush=True)
        assets = synthetic.build_assets(None, int(syn.uv_size))
    gen = synthetic.MultiviewGenerator(syn, assets)
    base = synthetic.base_model(assets)
    out = {k: [] for k in ("image", "lmk68", "shape", "identity", "expression", "view")}
    t0, last = time.time(), time.time()
    for i in range(count):
        number = gen.identity_number(i)
        ident = gen.identity(number)
        for e in range(n_expr):
            frame = gen.frame(i, e)
            cams = sample_cameras(data_cfg, number, e, n_views)
            views = synthetic.render_views(assets, ident, frame, cams, geometry=frame["geometry"])
            uv = _landmarks_2d(base, frame["geometry"][3], cams)
            out["image"].append(np.clip(np.round(np.asarray(views["image"]) * 255), 0, 255).astype(np.uint8))
            out["lmk68"].append(np.asarray(uv, np.float32))
            out["shape"].append(np.repeat(np.asarray(ident["shape"], np.float32)[None], n_views, 0))
            out["identity"].append(np.full(n_views, number, np.int32))
            out["expression"].append(np.full(n_views, e, np.int32))
            out["view"].append(np.arange(n_views, dtype=np.int32))
        if verbose and (time.time() - last > 15 or i + 1 == count):
            last = time.time()
            el = last - t0
            print(f"  mica data '{split}': {i + 1}/{count} identities ({(i + 1) * n_expr * n_views} images) "
                  f"in {el:.0f}s, ETA {el / (i + 1) * (count - i - 1):.0f}s", flush=True)
    data = {k: np.concatenate(v) for k, v in out.items()}
    data["five"] = np.asarray(align.five_points_from_68(data["lmk68"]), np.float32)
    return data


def _cache_key(data_cfg, split: str) -> dict:
    d = data_cfg.to_dict()
    d.pop("cache_dir", None)
    d.pop("landmark_noise_px", None)   # augmentation, applied at training time
    for s in ("train", "val", "test", "calib"):
        if s != split:
            d.pop(f"{s}_identities", None)
    counts = {"train": ("train_expressions", "train_views"), "eval": ("eval_expressions", "eval_views"),
              "calib": ("calib_expressions", "calib_views")}
    used = "eval" if split in ("val", "test") else split
    for group, keys in counts.items():
        if group != used:
            for k in keys:
                d.pop(k, None)
    return {"mica_data": d, "split": split, "format": DATA_FORMAT, "generator_version": synthetic.GENERATOR_VERSION}


def cache_path(data_cfg, split: str) -> Path:
    """Where `cached_split` keeps a split of a data config: <cache>/mica-<hash>/<split>.npz."""
    key = _cache_key(data_cfg, split)
    return cache_lib.cache_root(data_cfg.cache_dir or None) / f"mica-{cache_lib.config_hash(key)}" / f"{split}.npz"


# Temp files of `cached_split` before owners were recorded: `.<split>-<8 random>.npz`.
_LEGACY_TEMP_RE = re.compile(r"^\.[A-Za-z0-9_]+-[a-z0-9_]{8}\.npz$")


def cached_split(data_cfg, split: str, *, assets=None, verbose: bool = True) -> dict:
    """`generate_split` once per (data config, split), cached as an npz under
    <cache>/mica-<hash>/<split>.npz (`dhjax.data.cache.cache_root`; written atomically through a
    temp file named after its owner; temp files that killed runs left in that folder are removed
    first, `dhjax.data.cache.clean_stale_temps`)."""
    key = _cache_key(data_cfg, split)
    path = cache_path(data_cfg, split)
    root = path.parent
    for stale in cache_lib.clean_stale_temps(root, legacy=_LEGACY_TEMP_RE):
        if verbose:
            print(f"removed the temp file of an interrupted run: {stale}", flush=True)
    if path.exists():
        cache_lib.touch(root)                   # the folder is the cache entry (python -m dhjax.data.cache)
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
        if verbose:
            print(f"mica data '{split}': {len(data['image'])} images from {path}", flush=True)
        return data
    first, count, n_expr, n_views = split_spec(data_cfg, split)
    if verbose:
        print(f"generating mica data '{split}': identities {first}..{first + count - 1} x {n_expr} "
              f"expressions x {n_views} views at {data_cfg.image_size}px -> {path}", flush=True)
    data = generate_split(data_cfg, split, assets=assets, verbose=verbose)
    root.mkdir(parents=True, exist_ok=True)
    # Named after its owner (host, pid): a run killed while saving leaves it for the next to clean.
    tmp = cache_lib.make_temp_file(root, split, suffix=".npz")
    try:
        np.savez(tmp, **data)
        os.replace(tmp, path)
        (root / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return data


def cached_splits(data_cfg, names: Sequence[str] = ("train", "val", "test"), *, verbose: bool = True) -> dict:
    """{name: `cached_split`} for several splits, building the generator's assets (~20 s) at
    most once, and only when some split is not cached yet."""
    missing = [n for n in names if not cache_path(data_cfg, n).exists()]
    assets = None
    if missing:
        if verbose:
            print(f"building the synthetic head assets for the splits {missing} ...", flush=True)
        assets = synthetic.build_assets(None, int(data_cfg.synthetic.uv_size))
    return {n: cached_split(data_cfg, n, assets=assets, verbose=verbose) for n in names}


class split_dataset:  # noqa: N801 - a small dataset class used like a function
    """Random-access view of a split for `dhjax.data.dataset.Pipeline`: item i is
    {"image" [S, S, 3] uint8, "five" [5, 2], "shape" [n_shape]} plus "lmk68" [68, 2] (the
    landmark encoder's targets) when `landmarks` is set."""

    def __init__(self, data: Mapping[str, np.ndarray], landmarks: bool = False):
        self.keys = ("image", "five", "shape") + (("lmk68",) if landmarks else ())
        for k in self.keys:
            if k not in data:
                raise KeyError(f"mica data lacks '{k}' (has {sorted(data)})")
        self.data = data

    def __len__(self):
        return len(self.data["image"])

    def __getitem__(self, i: int) -> dict:
        return {k: self.data[k][int(i)] for k in self.keys}


def eval_batch(data: Mapping[str, np.ndarray], devices: int = 1, chunk: int = 32, kind: str = "iresnet") -> dict:
    """{"crops" [N, C, C, 3] uint8 (the encoder kind's crops at the exact five points), "shape"
    [N, S]} of a split, N truncated to a multiple of the device count and of `chunk` (when N >=
    chunk)."""
    n = len(data["image"])
    step = int(np.lcm(int(devices), int(chunk))) if n >= chunk else int(devices)
    n = (n // step) * step
    if n == 0:
        raise ValueError(f"{len(data['image'])} evaluation images cannot fill a batch of {step}")
    return {"crops": crop_batch(data["image"][:n], data["five"][:n], kind), "shape": data["shape"][:n]}
