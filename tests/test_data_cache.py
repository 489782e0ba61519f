"""The dataset cache's use tracking and pruning (`python -m dhjax.data.cache`)."""

import os
import time

import pytest

from dhjax.data import cache


def _entry(root, name, size, days_ago, folder=True):
    p = root / name
    if folder:
        p.mkdir()
        (p / "meta.json").write_bytes(b"x" * size)
    else:
        p.write_bytes(b"x" * size)
    t = time.time() - days_ago * 86400
    os.utime(p, (t, t))
    return p


def test_entries_prune_and_the_command(tmp_path, capsys):
    old = _entry(tmp_path, "synshot-000000000000", 3000, 40)
    mid = _entry(tmp_path, "albedo-111111111111.npz", 500, 10, folder=False)
    new = _entry(tmp_path, "gem-222222222222", 2000, 0.5)
    temp = _entry(tmp_path, ".gem-3.tmp.host.1.abc", 100, 90)      # a run's temp: not an entry
    other = _entry(tmp_path, "notes.txt", 10, 90, folder=False)      # not dhjax's: never listed or removed
    found = cache.entries(tmp_path)
    assert [e["path"] for e in found] == [old, mid, new]            # least recently used first
    assert [e["bytes"] for e in found] == [3000, 500, 2000]
    assert cache.entries(tmp_path / "missing") == []
    # A dry run lists without removing; then entries unused for >= 7 days go, the rest stays.
    assert [e["path"] for e in cache.prune(7, tmp_path, dry_run=True)] == [old, mid]
    assert old.exists() and mid.exists()
    assert [e["path"] for e in cache.prune(7, tmp_path)] == [old, mid]
    assert not old.exists() and not mid.exists() and new.exists() and temp.exists() and other.exists()
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            cache.prune(bad, tmp_path)
    # The command lists, and removes with --remove_unused_days.
    assert cache.main(["--cache_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 entry" in out and "gem-222222222222" in out and "last used 0.5 days ago" in out
    assert cache.main(["--cache_dir", str(tmp_path), "--remove_unused_days", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 entry" in out and "no cached data" in out and not new.exists()
    with pytest.raises(SystemExit):
        cache.main(["--cache_dir", str(tmp_path), "--remove_unused_days", "-3"])
    assert "--remove_unused_days: the number of days must be finite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cache.main(["--cache_dir", str(tmp_path), "--dry_run"])
    assert "give N" in capsys.readouterr().err
    assert other.exists()


def test_prune_keeps_an_entry_used_meanwhile_and_never_leaves_a_partial_one(tmp_path, monkeypatch):
    listed = _entry(tmp_path, "synshot-555555555555", 10, 40)
    stale_listing = cache.entries(tmp_path)
    os.utime(listed)                                                # a run starts with it now
    monkeypatch.setattr(cache, "entries", lambda cache_dir=None: stale_listing)
    assert cache.prune(7, tmp_path) == [] and listed.exists()
    monkeypatch.undo()
    # A delete that fails half-way: the entry is already renamed away (hidden, owned by this
    # process), so no run can take what is left for a complete dataset.
    broken = _entry(tmp_path, "gem-666666666666", 10, 40)

    def fail(path, *a, **k):
        raise OSError("disk went away")

    monkeypatch.setattr(cache.shutil, "rmtree", fail)
    with pytest.raises(OSError, match="disk went away"):
        cache.prune(7, tmp_path)
    assert not broken.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gem-666666666666.tmp.")]
    assert [e["path"] for e in cache.entries(tmp_path)] == [listed]


def test_a_cached_dataset_is_marked_used_when_reused(tmp_path):
    root = _entry(tmp_path, "synthetic-444444444444", 10, 30)
    written = []
    assert cache._build_once(root, written.append, verbose=False) == root
    assert written == []                                            # reused, not rewritten
    assert time.time() - root.stat().st_mtime < 60                  # and marked used now
    assert cache.prune(7, tmp_path) == []
