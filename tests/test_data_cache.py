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
    found = cache.entries(tmp_path)
    assert [e["path"] for e in found] == [old, mid, new]            # least recently used first
    assert [e["bytes"] for e in found] == [3000, 500, 2000]
    assert cache.entries(tmp_path / "missing") == []
    # A dry run lists without removing; then entries unused for >= 7 days go, the rest stays.
    assert [e["path"] for e in cache.prune(7, tmp_path, dry_run=True)] == [old, mid]
    assert old.exists() and mid.exists()
    assert [e["path"] for e in cache.prune(7, tmp_path)] == [old, mid]
    assert not old.exists() and not mid.exists() and new.exists() and temp.exists()
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="unused_days"):
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
    assert "unused_days must be" in capsys.readouterr().err


def test_a_cached_dataset_is_marked_used_when_reused(tmp_path):
    root = _entry(tmp_path, "synthetic-444444444444", 10, 30)
    written = []
    assert cache._build_once(root, written.append, verbose=False) == root
    assert written == []                                            # reused, not rewritten
    assert time.time() - root.stat().st_mtime < 60                  # and marked used now
    assert cache.prune(7, tmp_path) == []
