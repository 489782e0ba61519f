"""The Grain input pipeline (`dhjax.data.grain_pipeline`): datasets as Grain data sources, the
same batches as the index pipeline, per-process rows, worker processes, the iterator state, and
the training harness reading it (4 devices = 1, 2 processes = 1, killed and resumed = not).

Run as a script, this file is the harness tests' toy (tests/train_toy.py's linear regression
read through a GrainPipeline): python tests/test_data_grain.py WORKDIR [key=value ...]; env
TOY_SLEEP=seconds per sample read, TOY_SAMPLES=dataset size (default 64).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from harness_common import env_with, jsonl, params, run_toy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


class Counting:
    """A cheap dataset (index -> arrays) to test the pipeline without files."""

    def __init__(self, n=23):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full((2, 2), i, np.float32), "i": np.int32(i)}

    def __repr__(self):
        return f"Counting({self.n})"


class Gappy(Counting):
    """Sample 5 lacks "x"; sample 7 is not a dict (unless only_missing)."""

    def __init__(self, n=23, only_missing=False):
        super().__init__(n)
        self.only_missing = only_missing

    def __getitem__(self, i):
        if i == 7 and not self.only_missing:
            return [i]
        s = super().__getitem__(i)
        if i == 5:
            del s["x"]
        return s


def _children(pid):
    out = subprocess.run(["ps", "-ww", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line for line in out.splitlines() if line.strip() and "ps --ppid" not in line}


def _workers_of(pid):
    return {p: a for p, a in _children(pid).items() if "spawn_main" in a}


def _gone(pids, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in
                 open(f"/proc/{p}/status").read().lower()]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _equal(a, b):
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Datasets as Grain data sources.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small dataset on disk in the folder format: 2 items x 2 frames x 3 views of 16 x 12
    random images with every map SynShot reads."""
    from dhjax.data import dataset as ds

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    w = ds.Writer(root, "train", kind="multiview")
    for item in range(2):
        shape = rng.normal(size=10).astype(np.float32)
        albedo = rng.uniform(size=(8, 8, 3)).astype(np.float32)
        uvpos = rng.normal(size=(8, 8, 3)).astype(np.float32)
        for frame in range(2):
            expr = rng.normal(size=6).astype(np.float32)
            offset = rng.normal(size=(8, 8, 3)).astype(np.float32)
            for view in range(3):
                w.add(dict(image=rng.uniform(size=(12, 16, 3)).astype(np.float32),
                           mask=(rng.uniform(size=(12, 16)) > 0.5).astype(np.float32),
                           K=np.array([[20, 0, 8], [0, 20, 6], [0, 0, 1]], np.float32),
                           R=np.eye(3, dtype=np.float32), t=np.array([0, 0, 1 + view], np.float32),
                           shape=shape, expression=expr, pose=np.zeros((5, 3), np.float32),
                           translation=np.zeros(3, np.float32), uv_albedo=albedo, uv_position=uvpos,
                           uv_expression_offset=offset, item=item, frame=frame, view=view))
    w.close()
    return root


def test_folder_and_selected_datasets_are_grain_sources(folder):
    import grain

    from dhjax.data import dataset as ds
    from dhjax.synthesis import synshot_data

    reader = ds.FolderDataset(folder, "train")
    selected = synshot_data.open_split(folder, "train", in_memory=False)
    for source in (reader, selected):
        assert isinstance(source, grain.sources.RandomAccessDataSource)
        mapped = grain.MapDataset.source(source)
        assert len(mapped) == len(source) == 12
        for i in (0, 5, 11):
            assert _equal(mapped[i], source[i])
    assert "FolderDataset(" in repr(reader) and "12 images" in repr(reader)


def test_folder_reads_from_many_threads_equal_serial_reads(folder):
    """Grain's decoding threads call the source concurrently (the camera cache is shared)."""
    from concurrent.futures import ThreadPoolExecutor

    from dhjax.data import dataset as ds

    reader = ds.FolderDataset(folder, "train")
    serial = [reader[i] for i in range(len(reader))]
    order = list(np.random.default_rng(1).permutation(len(reader))) * 6
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: (i, reader[i]), order))
    for i, s in got:
        assert _equal(s, serial[i])


# ----------------------------------------------------------------------------------------------
# Batches: the index pipeline's sampling contract, per-process rows.


def test_grain_batches_are_the_index_pipelines_batches(folder):
    from dhjax.data import dataset as ds
    from dhjax.data import grain_pipeline as gp

    for dataset, bs, kw in ((Counting(), 4, dict(seed=3)), (Counting(), 5, dict(shuffle=False)),
                            (Counting(), 3, dict(seed=1, indices=[1, 4, 9, 16, 20, 21, 22])),
                            (ds.FolderDataset(folder, "train"), 4, dict(seed=0))):
        old, new = ds.Pipeline(dataset, bs, **kw), gp.GrainPipeline(dataset, bs, **kw)
        assert new.steps_per_epoch == old.steps_per_epoch
        for step in range(3 * old.steps_per_epoch + 1):        # several epochs, each reshuffled
            assert _equal(new.get_batch(step), old.get_batch(step)), step
    # One epoch of __iter__ is epoch 0; shards are the index pipeline's.
    p = gp.GrainPipeline(Counting(), 4, seed=3)
    shard = p.shard(1, 2)
    assert type(shard) is gp.GrainPipeline
    np.testing.assert_array_equal(shard.indices, ds.Pipeline(Counting(), 4, seed=3).shard(1, 2).indices)
    assert _equal(shard.get_batch(4), ds.Pipeline(Counting(), 4, seed=3).shard(1, 2).get_batch(4))
    assert all(_equal(a, p.get_batch(s)) for s, a in enumerate(p))


def test_process_rows_make_up_the_global_batch():
    from dhjax.data import grain_pipeline as gp

    p = gp.GrainPipeline(Counting(), 8, seed=2)
    for n in (1, 2, 4, 8):
        for step in (0, 1, 5):
            rows = [p.local_batch(step, k, n) for k in range(n)]
            assert all(r["i"].shape == (8 // n,) for r in rows)
            glued = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
            assert _equal(glued, p.get_batch(step))
            # The iterator of process k reads the same rows.
            with p.iterator(step, step + 1, process_index=n - 1, process_count=n) as it:
                assert _equal(next(it), rows[-1])


def test_clear_errors():
    from dhjax.data import grain_pipeline as gp

    p = gp.GrainPipeline(Counting(), 6)
    with pytest.raises(ValueError, match="batch size 6 does not divide by 4 processes"):
        p.local_batch(0, 0, 4)
    with pytest.raises(ValueError, match="batch size 6 does not divide by 4 processes"):
        p.iterator(0, 3, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="need 0 <= process_index < process_count"):
        p.local_batch(0, 2, 2)
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        gp.GrainPipeline(Counting(), 2, workers=-1)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        gp.GrainPipeline(Counting(), 2, threads=0)
    with pytest.raises(ValueError, match="cannot fill a batch of 40"):
        gp.GrainPipeline(Counting(), 40)
    bad = gp.GrainPipeline(Gappy(), 23, shuffle=False, required_keys=("x", "i"))
    with pytest.raises(KeyError, match=r"sample 5 of Counting\(23\) lacks keys \['x'\]"):
        bad.get_batch(0)
    with pytest.raises(TypeError, match="sample 7 of Counting.* is a list, not a dict"):
        gp.GrainPipeline(Gappy(), 2, shuffle=False).get_batch(3)
    with pytest.raises(ValueError, match=r"step 2's batch \(samples \[4, 5\] of Counting\(23\)\) cannot be "
                                         r"stacked: sample 1 has keys \['x'\] that sample 0 has"):
        gp.GrainPipeline(Gappy(), 2, shuffle=False).get_batch(2)
    with pytest.raises(ValueError, match="config field loader.kind must be one of"):
        gp.make_pipeline(Counting(), 2, loader={"kind": "torch"})
    with pytest.raises(ValueError, match="config field loader.workers = 2 needs loader.kind = 'grain'"):
        gp.make_pipeline(Counting(), 2, loader={"kind": "index", "workers": 2})
    with pytest.raises(ValueError, match="config field loader.threads must be an integer >= 1"):
        gp.make_pipeline(Counting(), 2, loader={"threads": 0})
    assert type(gp.make_pipeline(Counting(), 2, loader={"kind": "index"})).__name__ == "Pipeline"
    assert gp.make_pipeline(Counting(), 2).workers == 0


# ----------------------------------------------------------------------------------------------
# The iterator: worker processes, state.


def test_workers_threads_and_resumed_states_read_the_same_batches(folder):
    """0 or 2 workers, 1 or 2 threads: the batches of steps 3..19 of get_batch; a state saved at
    step 7 (through JSON) continues on batch 7 with another worker count; the workers are gone
    after close; a sample error in a worker names the step."""
    from dhjax.data import dataset as ds
    from dhjax.data import grain_pipeline as gp

    reader = ds.FolderDataset(folder, "train")
    ref = gp.GrainPipeline(reader, 4, seed=5)
    want = [ref.get_batch(s) for s in range(3, 20)]
    for workers, threads in ((0, 1), (0, 2), (2, 1)):
        p = gp.GrainPipeline(reader, 4, seed=5, workers=workers, threads=threads)
        with p.iterator(3, 20, process_index=0, process_count=1) as it:
            got = []
            for batch in it:
                got.append(batch)
                if workers and len(got) == 1:
                    assert len(_workers_of(os.getpid())) == workers
                if len(got) == 4:
                    state = json.loads(json.dumps(it.get_state()))
        assert len(got) == len(want) and all(_equal(a, b) for a, b in zip(got, want))
        assert state["next_step"] == 7 and state["sampling"]["batch_size"] == 4
        assert _gone(list(_workers_of(os.getpid())))
        # Resume with the other worker count.
        q = gp.GrainPipeline(reader, 4, seed=5, workers=2 - workers, threads=1)
        it = q.iterator(0, 20, process_index=0, process_count=1)
        it.set_state(state)
        rest = list(it)
        it.close()
        assert len(rest) == 13 and all(_equal(a, b) for a, b in zip(rest, want[4:]))
    assert _gone(list(_workers_of(os.getpid())))
    # A worker's error reaches the training process.
    it = gp.GrainPipeline(Gappy(only_missing=True), 2, shuffle=False, workers=2, required_keys=("x",)).iterator(
        0, 6, process_index=0, process_count=1)
    next(it)
    with pytest.raises(RuntimeError, match=r"an input pipeline worker failed \(the next step was [12];(.|\n)*sample 5 "
                                           r"of Counting\(23\) lacks keys \['x'\]"):
        for _ in range(5):
            next(it)
    it.close()
    assert _gone(list(_workers_of(os.getpid())))


def test_a_state_of_other_batches_is_refused():
    from dhjax.data import grain_pipeline as gp

    it = gp.GrainPipeline(Counting(), 4, seed=3).iterator(0, 10, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    assert state == {"version": 1, "next_step": 1, "sampling": {"dataset_size": 23, "indices": 23, "batch_size": 4,
                                                                "seed": 3, "shuffle": True}}
    for other, what in ((gp.GrainPipeline(Counting(24), 4, seed=3), "dataset_size 23 then, 24 now"),
                        (gp.GrainPipeline(Counting(), 2, seed=3), "batch_size 4 then, 2 now"),
                        (gp.GrainPipeline(Counting(), 4, seed=4), "seed 3 then, 4 now"),
                        (gp.GrainPipeline(Counting(), 4, seed=3, indices=range(20)), "indices 23 then, '20:")):
        with pytest.raises(ValueError, match="saved input pipeline state is of other batches .*" + what):
            other.iterator(0, 10, process_index=0, process_count=1).set_state(state)
    it2 = gp.GrainPipeline(Counting(), 4, seed=3).iterator(0, 10, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not an input pipeline state"):
        it2.set_state({"step": 3})
    with pytest.raises(ValueError, match="next_step 11 is not in"):
        it2.set_state(dict(state, next_step=11))
    it2.set_state(dict(state, next_step=10))
    with pytest.raises(StopIteration):
        next(it2)


def test_loader_fields_never_block_a_resume(tmp_path):
    """Worker count, threads and loader kind change no batch: a run resumes with other values (or
    from a run made before the loader block existed) without --allow_config_change; other
    fields are still refused."""
    import ml_collections

    from dhjax.data import grain_pipeline as gp
    from dhjax.train import app
    from dhjax.train import config as config_lib

    base = ml_collections.ConfigDict(dict(seed=0, batch_size=8, train=dict(steps=10)))
    config_lib.save_config(base, str(tmp_path))               # a run from before the loader block
    (tmp_path / "metrics.jsonl").write_text("{}\n")           # ... that wrote something (else no run)
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.loader = gp.default_loader_config()
    logged = []
    diffs = app.check_resume_config(tmp_path, cfg, allow_config_change=False, log=logged.append)
    assert [d[0] for d in diffs] == ["loader.kind", "loader.threads", "loader.workers"]
    config_lib.save_config(cfg, str(tmp_path))
    changed = config_lib.apply_overrides(cfg, {"loader.workers": 4, "loader.threads": 2, "loader.kind": "index"})
    assert len(app.check_resume_config(tmp_path, changed, allow_config_change=False, log=logged.append)) == 3
    assert "config changes accepted on resume: loader.kind 'grain' -> 'index'" in logged[-1]
    with pytest.raises(app.RunError, match="batch_size: 8 in the run, 4 now"):
        app.check_resume_config(tmp_path, config_lib.apply_overrides(changed, {"batch_size": 4}),
                                allow_config_change=True, log=logged.append)


# ----------------------------------------------------------------------------------------------
# The training harness on the Grain pipeline (subprocesses: device counts, signals).


def toy(workdir, *overrides, devices=1, check=True, **extra):
    return run_toy(__file__, workdir, *overrides, devices=devices, check=check, **extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 1-device run on the Grain pipeline, no workers."""
    wd = tmp_path_factory.mktemp("grain_reference")
    toy(wd)
    return wd


def test_index_loader_and_four_devices_with_workers_match(reference, tmp_path):
    toy(tmp_path / "index", "loader.kind='index'")
    np.testing.assert_array_equal(params(tmp_path / "index"), params(reference))   # the same batches
    assert jsonl(tmp_path / "index") == jsonl(reference)
    toy(tmp_path / "four", "loader.workers=2", devices=4)
    np.testing.assert_allclose(params(tmp_path / "four"), params(reference), atol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in jsonl(tmp_path / "four") if "loss" in r],
                               [r["loss"] for r in jsonl(reference) if "loss" in r], rtol=1e-5)
    # The checkpoint's meta holds the iterator's state.
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(str(reference / "checkpoints"), item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    try:
        meta = manager.restore(60, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    assert meta["data_state"]["next_step"] == 60 == meta["next_step"]
    assert meta["data_state"]["sampling"] == {"dataset_size": 64, "indices": 64, "batch_size": 8, "seed": 0,
                                              "shuffle": True}


def test_sigkill_with_workers_then_resume_with_none_matches(reference, tmp_path):
    """Killed (SIGKILL) after checkpoint 20 while 2 workers prefetch; resumed with 0 workers (a
    loader change a resume accepts): the same parameters and metrics as the uninterrupted run, and
    the killed run's workers exit."""
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path), "loader.workers=2"],
                            env=env_with(1, TOY_SLEEP=0.02), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 200
    jl = tmp_path / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and not (jl.exists() and '"step": 30' in jl.read_text()):
        time.sleep(0.02)
    workers = _workers_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2, workers
    assert (tmp_path / "checkpoints" / "20").exists() and not (tmp_path / "checkpoints" / "40").exists()
    assert not (tmp_path / "final_params.npy").exists()
    assert _gone(list(workers)), "worker processes outlived the killed training process"
    out = toy(tmp_path).stdout
    assert "resumed from" in out and "at step 20" in out
    assert "config changes accepted on resume: loader.workers 2 -> 0" in out
    np.testing.assert_array_equal(params(tmp_path), params(reference))
    assert jsonl(tmp_path) == jsonl(reference)


def test_sigterm_with_workers_checkpoints_stops_and_resumes(reference, tmp_path):
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path), "loader.workers=2"],
                            env=env_with(1, TOY_SLEEP=0.02), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 200
    jl = tmp_path / "metrics.jsonl"
    while not (jl.exists() and jl.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    workers = _workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: checkpointed step" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]          # the workers ignored the signal and were shut down
    assert _gone(list(workers))
    assert not (tmp_path / "final_params.npy").exists()
    toy(tmp_path, "loader.workers=2")
    np.testing.assert_array_equal(params(tmp_path), params(reference))


def test_resume_over_a_changed_dataset_is_refused(reference, tmp_path):
    import shutil

    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    shutil.rmtree(wd / "checkpoints" / "60")
    (wd / "final_params.npy").unlink()
    proc = toy(wd, check=False, TOY_SAMPLES=72)
    assert proc.returncode != 0
    assert ("RunError: cannot resume: the saved input pipeline state is of other batches (dataset_size 64 then, "
            "72 now, indices 64 then, 72 now)" in proc.stderr), proc.stderr[-2000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_read_their_rows_and_match_one_device(reference, tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)],
                              env=env_with(2, DHJAX_COORDINATOR=f"localhost:{port}", DHJAX_NUM_PROCESSES=2,
                                           DHJAX_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "rows 4 of 8" in outs[1]                      # process 1 read half of each batch
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The toy (run as a script).


class ToySamples:
    """Sample i of a linear regression: x [DIM] ~ N(0, 1), y = x . w + noise (seeded by i)."""

    def __init__(self, n, dim):
        self.n, self.dim = n, dim
        self.w_true = np.linspace(-1.0, 1.0, dim).astype(np.float32)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
        rng = np.random.default_rng([7, int(i)])
        x = rng.normal(size=self.dim).astype(np.float32)
        y = np.float32(x @ self.w_true + 0.01 * rng.normal())
        return {"x": x, "y": y}

    def __repr__(self):
        return f"ToySamples({self.n})"


def main():
    sys.path.insert(0, HERE)
    import jax

    import train_toy
    from harness_common import parse_overrides, save_result
    from dhjax.data import grain_pipeline as gp
    from dhjax.train import app
    from dhjax.train import config as config_lib
    from dhjax.train import loop

    workdir = sys.argv[1]
    app.init_distributed()
    cfg = train_toy.get_config()
    cfg.loader = gp.default_loader_config()
    cfg = config_lib.apply_overrides(cfg, parse_overrides(sys.argv[2:]))
    data = gp.make_pipeline(ToySamples(int(os.environ.get("TOY_SAMPLES", "64")), train_toy.DIM), cfg.batch_size,
                            seed=cfg.seed, loader=cfg.loader, required_keys=("x", "y"))
    eval_batch = train_toy.Data(cfg).get_batch(10 ** 6)
    first = data.local_batch(0, jax.process_index(), jax.process_count()) if hasattr(data, "local_batch") else None
    if first is not None:
        print(f"process {jax.process_index()}: rows {len(first['x'])} of {cfg.batch_size}", flush=True)
    res = loop.train(cfg, workdir, train_toy.make_method(cfg), data, eval_batch=eval_batch)
    save_result(workdir, res)


if __name__ == "__main__":
    main()
