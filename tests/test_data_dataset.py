"""Datasets: disk round trip, clear errors on bad input, shards, the input pipeline."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import synthetic_common as common
from dhjax import io as dio
from dhjax.data import dataset as ds
from dhjax.data import synthetic


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    g = common.multiview()
    indices = [0, 1, 2, 30, 31]                   # two identities, several views
    ds.write_dataset(g, root, "train", indices=indices, meta={"note": "test"})
    return root, indices


def test_written_dataset_reads_back_as_the_generated_samples(written):
    root, indices = written
    g = common.multiview()
    reader = ds.FolderDataset(root, "train")
    assert len(reader) == len(indices)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["format"] == ds.FORMAT and meta["labels"] == list(ds.PART_LABELS)
    assert meta["splits"]["train"]["images"] == len(indices) and meta["note"] == "test"
    for j, i in enumerate(indices):
        r, s = reader[j], g[i]
        assert sorted(r) == sorted(s)
        for k in ("K", "R", "t", "shape", "expression", "pose", "translation", "sh",
                  "uv_position", "uv_expression_offset", "seg", "mask", "item", "frame", "view",
                  "hair_style", "beard_style", "skin_tone"):
            np.testing.assert_array_equal(r[k], s[k], err_msg=k)
        # 8-bit images and 0.1 mm depth steps.
        np.testing.assert_allclose(r["image"], s["image"], atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(r["uv_albedo"], s["uv_albedo"], atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(r["depth"], s["depth"], atol=0.5 / ds.DEPTH_SCALE + 1e-7)


def test_real_data_with_only_the_required_files_loads(tmp_path):
    """The tracker's layout: images, masks, cameras, FLAME parameters; no labels/depth/UV."""
    frame = tmp_path / "clip" / "seq_a" / "000017"
    frame.mkdir(parents=True)
    dio.save_params(tmp_path / "clip" / "seq_a" / "identity", {"shape": np.zeros(300, np.float32)})
    dio.save_params(frame / "params", {"expression": np.zeros(50, np.float32),
                                      "pose": np.zeros((5, 3), np.float32)})
    img = np.random.default_rng(0).uniform(size=(24, 32, 3)).astype(np.float32)
    dio.save_image(frame / "front.png", img)
    dio.save_image(frame / "front_mask.png", np.ones((24, 32)) > 0)
    K = [[40.0, 0, 15.5], [0, 40.0, 11.5], [0, 0, 1]]
    (frame / "cameras.json").write_text(json.dumps(
        {"front": {"K": K, "R": np.eye(3).tolist(), "t": [0, 0, 1.0], "width": 32, "height": 24}}))
    reader = ds.FolderDataset(tmp_path, "clip")
    s = reader[0]
    assert set(ds.REQUIRED_KEYS) <= set(s)
    assert "depth" not in s and "seg" not in s
    assert s["frame"] == 17 and s["view"] == 0 and s["item"] == 0
    np.testing.assert_array_equal(s["translation"], np.zeros(3))
    np.testing.assert_allclose(s["image"], img, atol=0.5 / 255 + 1e-6)
    batch = ds.Pipeline(reader, 1, shuffle=False).get_batch(0)
    assert batch["image"].shape == (1, 24, 32, 3) and batch["expression"].shape == (1, 50)


def _copy(root, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_bad_input_gives_errors_naming_the_problem(written, tmp_path):
    root, _ = written
    bad = _copy(root, tmp_path)
    frame = bad / "train" / "item_0000000" / "frame_0000"
    os.remove(frame / "cam_01_mask.png")
    reader = ds.FolderDataset(bad, "train")
    with pytest.raises(FileNotFoundError, match="cam_01_mask.png"):
        reader[1]
    # Missing key in the parameters.
    p = dio.load_params(frame / "params")
    del p["pose"]
    dio.save_params(frame / "params", p)
    with pytest.raises(ValueError, match="pose"):
        ds.FolderDataset(bad, "train")[0]
    # Wrong shape of a camera.
    cams = json.loads((frame / "cameras.json").read_text())
    cams["cam_00"]["K"] = [[1.0, 0.0], [0.0, 1.0]]
    (frame / "cameras.json").write_text(json.dumps(cams))
    with pytest.raises(ValueError, match=r"'K' must have shape \(3, 3\)"):
        ds.FolderDataset(bad, "train")[0]
    # Missing cameras.json, missing split.
    os.remove(frame / "cameras.json")
    with pytest.raises(FileNotFoundError, match="cameras.json"):
        ds.FolderDataset(bad, "train")
    with pytest.raises(FileNotFoundError, match="no split folder"):
        ds.FolderDataset(bad, "test")
    with pytest.raises(FileNotFoundError, match="no dataset folder '.*nowhere'$"):
        ds.FolderDataset(bad.parent / "nowhere", "train")


def test_shards_are_disjoint_and_complete():
    for n in (0, 1, 7, 28, 101):
        for count in (1, 2, 3, 8):
            parts = [ds.shard_indices(n, p, count) for p in range(count)]
            joined = np.concatenate(parts)
            np.testing.assert_array_equal(np.sort(joined), np.arange(n))
            assert len(np.unique(joined)) == n
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        ds.shard_indices(10, 3, 3)


def test_grouped_shards_keep_items_whole():
    for n, group in ((28 * 3 * 5, 28 * 3), (100, 7), (5, 10)):
        for count in (1, 2, 3, 8):
            parts = [ds.shard_indices(n, p, count, group=group) for p in range(count)]
            joined = np.concatenate(parts)
            np.testing.assert_array_equal(joined, np.arange(n))  # disjoint, complete, in order
            for part in parts:
                if len(part):
                    assert part[0] % group == 0, "a shard must start at an item boundary"
                    assert part[-1] + 1 == n or (part[-1] + 1) % group == 0


def test_sharded_writers_record_every_shard(tmp_path):
    metas = []
    for shard in range(3):
        w = ds.Writer(tmp_path, "train", kind="multiview", shard=(shard, 3))
        w.count = shard + 1  # what close() records; adding real samples is covered elsewhere
        metas.append(w.close())
    meta = json.loads(metas[-1].read_text())
    entry = meta["splits"]["train"]
    assert entry["images"] == 1 + 2 + 3 and sorted(entry["shards"]) == ["0/3", "1/3", "2/3"]


class _Counting:
    """A cheap dataset (index -> arrays) to test the pipeline without rendering."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"x": np.full((2, 2), i, np.float32), "i": np.int32(i)}


def test_pipeline_batches_are_deterministic_and_cover_each_epoch():
    p = ds.Pipeline(_Counting(), 4, seed=3)
    assert p.steps_per_epoch == 5
    a, b = p.get_batch(7), ds.Pipeline(_Counting(), 4, seed=3).get_batch(7)
    np.testing.assert_array_equal(a["x"], b["x"])
    epoch0 = np.concatenate([p.get_batch(s)["i"] for s in range(5)])
    assert len(np.unique(epoch0)) == 20 and epoch0.max() < 23
    assert not np.array_equal(epoch0, np.concatenate([p.get_batch(s)["i"] for s in range(5, 10)]))
    # Process-local rows are exactly the rows of the global batch that process feeds.
    for step in (0, 6):
        rows = [p.local_batch(step, k, 2)["i"] for k in range(2)]
        np.testing.assert_array_equal(np.concatenate(rows), p.get_batch(step)["i"])
    with pytest.raises(ValueError, match=r"need 0 <= process_index < process_count, got 5, 2"):
        p.local_batch(0, 5, 2)
    # Shards of the pipeline partition its indices.
    shards = [p.shard(k, 3) for k in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate([s.indices for s in shards])), np.arange(23))
    with pytest.raises(ValueError, match="keys"):
        ds.stack_samples([{"x": np.zeros(1)}, {"y": np.zeros(1)}])


def test_pipeline_over_the_generator_feeds_the_train_loop(tmp_path):
    """Two steps of dhjax.train.loop on generated batches (fit the mean foreground colour)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from dhjax.train import loop

    pipe = ds.Pipeline(common.multiview(), 2, seed=0)

    def init(rng, batch):
        return {"c": jnp.zeros(3)}

    def train_step(state, batch, rng):
        m = batch["mask"][..., None]
        target = jnp.sum(batch["image"] * m, (0, 1, 2)) / jnp.maximum(jnp.sum(m), 1.0)
        loss = jnp.sum((state["c"] - target) ** 2)
        return {"c": state["c"] + 0.5 * (target - state["c"])}, {"loss": loss}

    cfg = ml_collections.ConfigDict(dict(seed=0, train=dict(
        steps=2, log_every=1, checkpoint_every=100, keep_checkpoints=1, eval_every=0,
        on_nonfinite="skip")))
    res = loop.train(cfg, str(tmp_path), loop.Method(init, train_step), pipe)
    assert res.steps_run == 2 and np.isfinite(res.metrics["loss"])
    assert jax.device_get(res.state["c"]).max() > 0.02


# ----------------------------------------------------------------------------------------------
# The on-disk cache of generated datasets (dhjax.data.cache).


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _make_temp(parent, name, *, host=None, pid=None, age_s=0.0, file=False):
    """A temp entry named as `cache.make_temp_dir` names them, with a chosen owner and age."""
    from dhjax.data import cache

    host = cache.host_tag() if host is None else host
    path = parent / f".{name}.tmp.{host}.{os.getpid() if pid is None else pid}.abc123_x"
    if file:
        path = path.with_name(path.name + ".npz")
        path.write_bytes(b"partial")
        stamp = [path]
    else:
        (path / "train" / "images").mkdir(parents=True)
        (path / "train" / "images" / "0.png").write_bytes(b"partial")
        stamp = [path / "train" / "images" / "0.png", path / "train" / "images", path / "train", path]
    when = time.time() - age_s
    for p in stamp:
        os.utime(p, (when, when))
    return path


def test_temp_names_carry_the_owner_and_stale_ones_are_cleaned(tmp_path):
    from dhjax.data import cache

    tmp = cache.make_temp_dir(tmp_path, "synthetic-0123456789ab")
    assert tmp.parent == tmp_path and tmp.name.startswith(".synthetic-0123456789ab.tmp.")
    assert f".{cache.host_tag()}.{os.getpid()}." in tmp.name
    f = cache.make_temp_file(tmp_path, "train", suffix=".npz")
    assert f.is_file() and f.name.endswith(".npz") and f".{os.getpid()}." in f.name
    day = 24 * 3600
    dead = _make_temp(tmp_path, "a", pid=_dead_pid())
    dead_file = _make_temp(tmp_path, "b", pid=_dead_pid(), file=True)
    live = _make_temp(tmp_path, "c")                                  # os.getpid(): alive
    far_old = _make_temp(tmp_path, "d", host="other-host", pid=_dead_pid(), age_s=30 * day)
    far_new = _make_temp(tmp_path, "e", host="other-host", pid=_dead_pid(), age_s=60)
    unrelated = tmp_path / ".hidden-but-not-ours"
    unrelated.mkdir()
    removed = cache.clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, dead_file, far_old])
    for p in (dead, dead_file, far_old):
        assert not p.exists()
    for p in (tmp, f, live, far_new, unrelated):
        assert p.exists()
    assert cache.clean_stale_temps(tmp_path / "missing") == []


def test_cached_multiview_cleans_temp_folders_of_killed_runs(tmp_path, monkeypatch):
    """A generation killed (SIGKILL) before its rename leaves a hidden temp folder; the next run
    removes it when its process is gone, and keeps the one of a live process."""
    from dhjax.data import cache

    assets = common.tiny_assets()  # built once per process; the cache would build its own
    monkeypatch.setattr(cache.synthetic, "build_assets", lambda model, uv_size: assets)
    cfg = common.tiny_config(n_frontal=1, n_upper=0)
    cfg.multiview.n_expressions = 1
    root_dir = tmp_path / "cache"
    root_dir.mkdir()
    name = "synthetic-0123456789ab"
    stale = _make_temp(root_dir, name, pid=_dead_pid())
    live = _make_temp(root_dir, name)
    foreign = _make_temp(root_dir, name, host="other-host", pid=1, age_s=60)
    legacy_old = root_dir / f".{name}-k2j4h5g6"     # the unowned names of earlier versions
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 30 * 24 * 3600,) * 2)
    root = cache.cached_multiview(cfg, {"train": (0, 1)}, cache_dir=root_dir, verbose=False)
    assert (root / "meta.json").exists() and len(ds.FolderDataset(root, "train")) == 1
    assert json.loads((root / "meta.json").read_text())["generator_version"] == synthetic.GENERATOR_VERSION
    assert not stale.exists() and not legacy_old.exists()
    assert live.exists() and foreign.exists()
    # No temp folder of this run is left behind, and a cached root is reused (and still cleans).
    ours = [p for p in root_dir.iterdir() if p.name.startswith(".") and f".{os.getpid()}." in p.name]
    assert ours == [live]
    stale2 = _make_temp(root_dir, name, pid=_dead_pid())
    assert cache.cached_multiview(cfg, {"train": (0, 1)}, cache_dir=root_dir, verbose=False) == root
    assert not stale2.exists()


def test_dataset_caches_key_on_the_generator_version(tmp_path, monkeypatch):
    """A cached dataset is never one an older generator rendered: the roots of cached_multiview,
    cached_video, cached_bodies and MICA's splits change with the generator's version."""
    from dhjax.capture.mica import config as mica_config
    from dhjax.capture.mica import data as mica_data
    from dhjax.data import body_synthetic, cache

    monkeypatch.setattr(cache, "_build_once", lambda root, write, verbose: root)   # keys only
    cfg, bodies = common.tiny_config(), body_synthetic.tiny_config()
    mica_cfg = mica_config.default_data_config()

    def roots():
        return (cache.cached_multiview(cfg, {"train": (0, 1)}, cache_dir=tmp_path),
                cache.cached_video(cfg, cache_dir=tmp_path),
                cache.cached_bodies(bodies, cache_dir=tmp_path),
                mica_data.cache_path(mica_cfg, "train"))

    before = roots()
    assert before == roots()                            # stable for an unchanged generator
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    head = roots()
    assert all(a != b for a, b in zip(before[:2] + before[3:], head[:2] + head[3:]))
    assert head[2] == before[2]                         # the body generator did not change
    monkeypatch.setattr(body_synthetic, "GENERATOR_VERSION", body_synthetic.GENERATOR_VERSION + 1)
    assert roots()[2] != before[2]
