"""Synthetic datasets generated once and cached on disk, keyed by their generator config.

Experiments that train on synthetic data (SynShot's prior, MICA) call `cached_multiview` with a
generator config; the first call renders the dataset (`dhjax.data.dataset.write_dataset`) into
`<cache>/<name>-<hash>/` (atomically: a temporary folder renamed when complete), later calls and
every run of a sweep reuse it. Everything is a pure function of the config, so deleting the
cache only costs time. The cache folder is $DHJAX_CACHE, else ~/.cache/dhjax.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from dhjax.data import dataset as ds
from dhjax.data import synthetic


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir` if given, else $DHJAX_CACHE, else ~/.cache/dhjax."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("DHJAX_CACHE", Path.home() / ".cache" / "dhjax"))


def config_hash(config) -> str:
    """Short stable hash of a ConfigDict / mapping (its sorted JSON)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_multiview(config, splits: dict, *, name: str = "synthetic", cache_dir=None,
                     verbose: bool = True) -> Path:
    """Renders (once) a multi-view synthetic dataset with the given splits and returns its root.

    Args:
      config: `synthetic.default_config()`-like generator config (its `multiview` block sets
        cameras and image size; n_identities / first_identity are taken from `splits`).
      splits: {split name: (first_identity, n_identities)}, e.g. {"train": (0, 24),
        "test": (100000, 4)} (disjoint identity numbers give disjoint identities).
      name: folder name prefix; cache_dir: see `cache_root`.
    Returns:
      Path of the dataset root (readable with `dhjax.data.dataset.FolderDataset(root, split)`).
    """
    key = {"generator": config.to_dict() if hasattr(config, "to_dict") else dict(config),
           "splits": {k: list(v) for k, v in splits.items()}, "format": ds.FORMAT}
    root = cache_root(cache_dir) / f"{name}-{config_hash(key)}"
    if (root / "meta.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        assets = synthetic.build_assets(None, int(config.uv_size))
        for split, (first, count) in splits.items():
            cfg = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
            cfg.multiview.first_identity = int(first)
            cfg.multiview.n_identities = int(count)
            gen = synthetic.MultiviewGenerator(cfg, assets)
            t0 = time.time()
            if verbose:
                print(f"generating synthetic split '{split}': {len(gen)} images "
                      f"({count} identities x {gen.n_frames} expressions x {gen.n_cameras} cameras) -> {root}",
                      flush=True)
            ds.write_dataset(gen, tmp, split, meta={"generator": json.loads(cfg.to_json_best_effort())})
            if verbose:
                print(f"  {split}: {len(gen)} images in {time.time() - t0:.0f}s", flush=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "meta.json").exists():   # nobody else finished it first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
