"""Synthetic datasets generated once and cached on disk, keyed by their generator config.

Experiments that train on synthetic data (SynShot's prior, MICA) call `cached_multiview` with a
generator config (INSTA's monocular videos: `cached_video`; D3GA's clothed bodies:
`cached_bodies`); the first call renders the dataset (`dhjax.data.dataset.write_dataset`) into
`<cache>/<name>-<hash>/` (atomically: a temporary folder renamed when complete), later calls and
every run of a sweep reuse it. Everything is a pure function of the config, so deleting the
cache only costs time. The cache folder is $DHJAX_CACHE, else ~/.cache/dhjax. The key holds the
generator's version (`synthetic.GENERATOR_VERSION`, `body_synthetic.GENERATOR_VERSION`) beside
the config, so a generator whose output changed renders a new dataset instead of reusing one of
the old generator's. Entries that are no longer used (an older version's, a config run once)
stay until deleted: every use marks its entry (`touch`), and `python -m dhjax.data.cache`
lists the entries with their size and last use and removes those unused for a given number of
days (`entries`, `prune`).

Temporary folders and files are hidden and carry their owner in the name,
`.<name>.tmp.<host>.<pid>.<random>[<suffix>]` (`make_temp_dir`, `make_temp_file`), so a run that
was killed before its rename (SIGKILL, out of memory, a lost node) can be cleaned up by the next:
`clean_stale_temps` removes those of this host whose process is gone, and those of other hosts
(a shared cache folder) untouched for `FOREIGN_TEMP_AGE_S`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
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


# A temp entry of another host (whose processes cannot be checked from here) is stale when
# nothing in it has changed for this long; so is one in the unowned naming of earlier versions.
FOREIGN_TEMP_AGE_S = 2 * 24 * 3600.0
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+(\.[A-Za-z0-9]+)?$")
# Temp folders of `cached_multiview` before owners were recorded: `.<name>-<hash>-<8 random>`.
_LEGACY_DIR_RE = re.compile(r"^\..+-[0-9a-f]{12}-[a-z0-9_]{8}$")


def host_tag() -> str:
    """This host's name as it appears in temp names (characters other than [A-Za-z0-9-] -> '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp.{host_tag()}.{os.getpid()}."


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new hidden temp folder in `parent` named after `name` and its owner (host, pid)."""
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(name), dir=parent))


def make_temp_file(parent: str | os.PathLike, name: str, suffix: str = "") -> Path:
    """A new empty hidden temp file in `parent` named after `name` and its owner (host, pid);
    `suffix` (e.g. ".npz", which np.savez would otherwise append) ends the name."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=suffix, dir=parent)
    os.close(fd)
    return Path(tmp)


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (another user's counts; unknown -> True)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) is not a probe there; never treat a process as gone
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to someone else
        return True
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of `path` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
                except OSError:
                    pass
    return newest


def clean_stale_temps(parent: str | os.PathLike, *, legacy: re.Pattern | None = _LEGACY_DIR_RE,
                      foreign_age_s: float = FOREIGN_TEMP_AGE_S) -> list[Path]:
    """Removes the temp entries that killed runs left in `parent` (not recursive).

    An entry named by `make_temp_dir`/`make_temp_file` is removed when it belongs to this host
    and its process is gone, or belongs to another host and nothing in it changed for
    `foreign_age_s` seconds; an entry matching `legacy` (unowned names) on the age alone.
    Everything else is left alone. Returns the removed paths ([] when `parent` does not exist).
    """
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, now, removed = host_tag(), time.time(), []
    for path in entries:
        m = _TEMP_RE.match(path.name)
        try:
            if m is not None and m["host"] == host:
                stale = not pid_alive(int(m["pid"]))
            elif m is not None or (legacy is not None and legacy.match(path.name)):
                stale = now - _last_change(path) > foreign_age_s
            else:
                continue
            if not stale:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(path)
    return removed


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
           "splits": {k: list(v) for k, v in splits.items()}, "format": ds.FORMAT,
           "generator_version": synthetic.GENERATOR_VERSION}
    root = cache_root(cache_dir) / f"{name}-{config_hash(key)}"

    def write(tmp):
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
            ds.write_dataset(gen, tmp, split, meta={"generator": json.loads(cfg.to_json_best_effort()),
                                                    "generator_version": synthetic.GENERATOR_VERSION})
            if verbose:
                print(f"  {split}: {len(gen)} images in {time.time() - t0:.0f}s", flush=True)

    return _build_once(root, write, verbose)


def cached_video(config, *, name: str = "video", cache_dir=None, verbose: bool = True) -> Path:
    """Renders (once) the monocular synthetic videos of a generator config and returns the root.

    Args:
      config: `synthetic.default_config()`-like generator config; its `video` block sets the
        sequences (n_sequences from first_identity), frames, image size and camera motion.
      name: folder name prefix; cache_dir: see `cache_root`.
    Returns:
      Path of a dataset root of kind 'video' with one split 'train' holding every sequence
      (`dhjax.data.dataset.FolderDataset(root, "train")`, items = sequences).
    """
    key = {"generator": config.to_dict() if hasattr(config, "to_dict") else dict(config), "kind": "video",
           "format": ds.FORMAT, "generator_version": synthetic.GENERATOR_VERSION}
    root = cache_root(cache_dir) / f"{name}-{config_hash(key)}"

    def write(tmp):
        gen = synthetic.VideoGenerator(config, synthetic.build_assets(None, int(config.uv_size)))
        t0 = time.time()
        if verbose:
            print(f"generating synthetic video: {gen.n_items} sequence(s) x {gen.n_frames} frames -> {root}",
                  flush=True)
        meta = {"generator": json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
                else dict(config), "generator_version": synthetic.GENERATOR_VERSION}
        ds.write_dataset(gen, tmp, "train", meta=meta)
        if verbose:
            print(f"  {len(gen)} frames in {time.time() - t0:.0f}s", flush=True)

    return _build_once(root, write, verbose)


def cached_bodies(config, *, name: str = "bodies", cache_dir=None, verbose: bool = True) -> Path:
    """Renders (once) the clothed-body videos of a body generator config and returns the root.

    Args:
      config: `body_synthetic.default_config()`-like config (subjects, frames, camera dome,
        image size); name: folder name prefix; cache_dir: see `cache_root`.
    Returns:
      Path of a body dataset root (kind 'multiview-video', layer labels, poses [55, 3],
      keypoints) with one split 'train' holding every subject
      (`dhjax.data.dataset.FolderDataset(root, "train")`, items = subjects; D3GA reads one with
      `dhjax.synthesis.d3ga_data.load_capture`).
    """
    from dhjax.data import body_synthetic

    key = {"generator": config.to_dict() if hasattr(config, "to_dict") else dict(config), "kind": "bodies",
           "format": ds.FORMAT, "generator_version": body_synthetic.GENERATOR_VERSION}
    root = cache_root(cache_dir) / f"{name}-{config_hash(key)}"

    def write(tmp):
        gen = body_synthetic.BodyVideoGenerator(config)
        t0 = time.time()
        if verbose:
            print(f"generating synthetic bodies: {gen.n_items} subject(s) x {gen.n_frames} frames x "
                  f"{gen.n_cameras} cameras -> {root}", flush=True)
        meta = {"generator": json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
                else dict(config), "model": gen.model.name, "generator_version": body_synthetic.GENERATOR_VERSION}
        ds.write_dataset(gen, tmp, "train", meta=meta)
        if verbose:
            print(f"  {len(gen)} images in {time.time() - t0:.0f}s", flush=True)

    return _build_once(root, write, verbose)


def _build_once(root: Path, write, verbose: bool) -> Path:
    """Runs write(tmp) into a temporary folder renamed to `root` when complete (module docstring);
    returns root at once when it exists (marking it used, `touch`)."""
    for stale in clean_stale_temps(root.parent):
        if verbose:
            print(f"removed the temp data of an interrupted run: {stale}", flush=True)
    if (root / "meta.json").exists():
        touch(root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root.parent, root.name)
    try:
        write(tmp)
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


# ----------------------------------------------------------------------------------------------
# Use tracking and pruning.


ENTRY_RE = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{12}(\.npz)?$")
"""Names of the cache's entries: <name>-<12 hex digits of the key hash>, a folder or an .npz file
(`cached_multiview` & co., MICA's mica-<hash>/, the tracker's albedo-<hash>.npz). `entries` and
`prune` consider nothing else, so a cache folder set by mistake to one holding other files (e.g.
~/.cache) loses none of them."""


def touch(path: str | os.PathLike) -> None:
    """Marks the cache entry `path` (a dataset folder, MICA's split folder, an albedo model file)
    as used now: its modification time, which `entries` reports and `prune` keys on. A run marks
    the entries it reads when it starts (not while it trains). A read-only cache stays usable
    (the mark is skipped)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _stat(path: Path) -> os.stat_result:
    """The entry's own status, through a symbolic link (touch follows links too)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return path.lstat()          # a dangling link: FileNotFoundError again when gone


def _size(path: Path) -> int:
    if not path.is_dir():
        return _stat(path).st_size
    total = 0
    for dirpath, _, filenames in os.walk(path, followlinks=False):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def entries(cache_dir=None) -> list[dict]:
    """The cache's entries (names matching ENTRY_RE), least recently used first: [{"path": Path,
    "bytes": int, "last_used": seconds since the epoch}]. Hidden temp entries of runs in progress
    or killed are not listed (`clean_stale_temps` handles those). [] when the cache folder does
    not exist; PermissionError (naming the folder) when it cannot be read."""
    root = cache_root(cache_dir)
    try:
        paths = [p for p in root.iterdir() if ENTRY_RE.match(p.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError as exc:
        raise PermissionError(f"cannot list the cache folder {root}: {exc}") from exc
    out = []
    for p in paths:
        try:
            out.append({"path": p, "bytes": _size(p), "last_used": _stat(p).st_mtime})
        except FileNotFoundError:   # removed meanwhile
            continue
    return sorted(out, key=lambda e: (e["last_used"], e["path"].name))


def _remove(path: Path) -> None:
    """Removes a cache entry all or nothing: renamed first to a hidden temp name of this process
    (one step), then deleted; a delete that stops half-way leaves only that hidden name, which
    `clean_stale_temps` removes later, never an entry a run would take for complete."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    gone = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))
    os.rename(path, gone / "entry")
    shutil.rmtree(gone)


def prune(unused_days: float, cache_dir=None, *, dry_run: bool = False) -> list[dict]:
    """Removes the entries (`entries`) not used for at least `unused_days` days and returns them
    (only lists them with dry_run). An entry marked used after it was listed is kept. Everything
    in the cache is regenerated on its next use, so pruning costs time only (0 days removes
    everything, including what a running job read at its start). Raises ValueError for a
    negative or non-finite `unused_days`."""
    days = float(unused_days)
    if not math.isfinite(days) or days < 0:
        raise ValueError(f"the number of days must be finite and >= 0, got {unused_days!r}")
    cutoff = time.time() - days * 86400.0
    old = [e for e in entries(cache_dir) if e["last_used"] <= cutoff]
    if dry_run:
        return old
    removed = []
    for e in old:
        try:
            if _stat(e["path"]).st_mtime > cutoff:       # a run started using it meanwhile
                continue
            _remove(e["path"])
        except FileNotFoundError:
            continue
        removed.append(e)
    return removed


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def main(argv=None) -> int:
    """`python -m dhjax.data.cache [--cache_dir=DIR] [--remove_unused_days=N [--dry_run]]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dhjax.data.cache",
                                     description="List dhjax's cached datasets (size, last use) and remove "
                                                 "those unused for some days.")
    parser.add_argument("--cache_dir", default="", help="the cache folder (default: $DHJAX_CACHE, else "
                                                        "~/.cache/dhjax)")
    parser.add_argument("--remove_unused_days", type=float, default=None,
                        help="remove the entries not used (no run started with them) for at least this many days")
    parser.add_argument("--dry_run", action="store_true", help="with --remove_unused_days: only list them")
    args = parser.parse_args(argv)
    if args.dry_run and args.remove_unused_days is None:
        parser.error("--dry_run lists what --remove_unused_days=N would remove: give N")
    root = cache_root(args.cache_dir or None)
    try:
        if args.remove_unused_days is not None:
            try:
                removed = prune(args.remove_unused_days, args.cache_dir or None, dry_run=args.dry_run)
            except ValueError as exc:
                parser.error(f"--remove_unused_days: {exc}")
            if not args.dry_run:
                for stale in clean_stale_temps(root):
                    print(f"removed the temp data of an interrupted run: {stale}")
            verb = "would remove" if args.dry_run else "removed"
            for e in removed:
                print(f"{verb} {e['path']} ({_fmt_bytes(e['bytes'])})")
            print(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} unused for "
                  f">= {args.remove_unused_days:g} days, {_fmt_bytes(sum(e['bytes'] for e in removed))}")
        found = entries(args.cache_dir or None)
    except PermissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not found:
        print(f"{root}: no cached data")
        return 0
    now = time.time()
    print(f"{root}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}, "
          f"{_fmt_bytes(sum(e['bytes'] for e in found))} (least recently used first)")
    for e in found:
        print(f"  {e['path'].name:40s} {_fmt_bytes(e['bytes']):>10s}   last used {(now - e['last_used']) / 86400:.1f} days ago")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
