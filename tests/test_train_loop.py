"""The shared harness: sharding invariance, determinism, kill/resume, non-finite guard,
corrupt checkpoints, multi-process, logs. Runs the toy method of tests/train_toy.py in
subprocesses (device counts and signals need their own processes)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from harness_common import env_with, jsonl, params, run_toy

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = os.path.join(HERE, "train_toy.py")


def toy(workdir, *overrides, devices=1, check=True, **extra):
    return run_toy(TOY, workdir, *overrides, devices=devices, check=check, timeout=300, **extra)


def train_rows(workdir):
    return [r for r in jsonl(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 1-device run that the other tests compare against."""
    wd = tmp_path_factory.mktemp("reference")
    toy(wd)
    return wd


def test_four_devices_match_one_device(reference, tmp_path):
    toy(tmp_path, devices=4)
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=1e-6)
    a, b = train_rows(reference), train_rows(tmp_path)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)


def test_same_seed_same_metrics_and_other_seed_differs(reference, tmp_path):
    toy(tmp_path / "again")
    assert jsonl(tmp_path / "again") == jsonl(reference)
    # The guard's per-step flag stays internal; the skip count is what the run reports.
    final = json.loads((reference / "final_metrics.json").read_text())
    assert "finite" not in final and final["skipped_steps"] == 0
    assert all("finite" not in r for r in jsonl(reference))
    toy(tmp_path / "seed1", "seed=1")
    assert jsonl(tmp_path / "seed1") != jsonl(reference)


def test_sigkill_after_first_checkpoint_then_resume_matches(reference, tmp_path):
    proc = subprocess.Popen([sys.executable, TOY, str(tmp_path)], env=env_with(1, TOY_SLEEP=0.05),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Killed after the row of step 30 reached metrics.jsonl: checkpoint 20 exists, 40 does not,
    # so the resumed run redoes steps 21-30 and must not log them twice.
    deadline = time.time() + 120
    jl = tmp_path / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and not (
            jl.exists() and '"step": 30' in jl.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "checkpoints" / "20").exists() and not (tmp_path / "checkpoints" / "40").exists()
    assert not (tmp_path / "final_params.npy").exists()  # really killed mid-run
    out = toy(tmp_path).stdout
    assert "resumed from" in out and "at step 20" in out
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=0)
    assert jsonl(tmp_path) == jsonl(reference)  # each step once, the same values
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT (Ctrl-C)")])
def test_sigterm_checkpoints_stops_without_final_outputs_and_resumes(reference, tmp_path, sig, name):
    """SIGTERM, and a first Ctrl-C in a single process, checkpoint the step boundary and stop."""
    proc = subprocess.Popen([sys.executable, TOY, str(tmp_path)], env=env_with(1, TOY_SLEEP=0.05),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    jl = tmp_path / "metrics.jsonl"
    while not (jl.exists() and jl.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    from dhjax.train import app

    assert proc.returncode == app.EXIT_INTERRUPTED == 143, out[-2000:]
    assert f"{name}: checkpointed step" in out and "rerun the same command to resume" in out, out[-2000:]
    assert "KeyboardInterrupt" not in out, out[-2000:]
    stopped_at = int(out.split(f"{name}: checkpointed step ")[1].split(",")[0])
    assert 0 < stopped_at < 60
    # Nothing final from the half-trained state.
    assert not (tmp_path / "final_params.npy").exists()
    assert not (tmp_path / "final_metrics.json").exists()
    # The stop's checkpoint holds the training time so far; the resumed run adds its own to it,
    # and a rerun at the end reports the same total (the final checkpoint's).
    meta = json.loads((tmp_path / "checkpoints" / str(stopped_at) / "meta" / "metadata").read_text())
    first = meta["train_seconds"]
    assert first >= 0.05 * stopped_at, meta      # TOY_SLEEP per batch
    t0 = time.time()
    out = toy(tmp_path).stdout
    second_call = time.time() - t0
    total = float(out.split("train_seconds ")[1].split()[0])
    assert first < total < first + second_call, (first, total, second_call)
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=0)
    again = toy(tmp_path).stdout
    assert "done 0 " in again and float(again.split("train_seconds ")[1].split()[0]) == total


def test_sigterm_after_training_stops_with_a_message(tmp_path):
    """Outside the loop (whose handler checkpoints at a step boundary) the experiments' handler
    (app.exit_on_user_error) is back in place: a SIGTERM after training stops the program with
    its message and status 143, not silently and not never."""
    proc = toy(tmp_path, check=False, TOY_TERM_AFTER=1)
    from dhjax.train import app

    assert proc.returncode == app.EXIT_INTERRUPTED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SIGTERM: stopping outside a training loop" in proc.stdout
    assert "still running" not in proc.stdout and (tmp_path / "final_params.npy").exists()


@pytest.mark.parametrize("where", ["TOY_TERM_AT_SAVE", "TOY_TERM_IN_EVAL"])
def test_sigterm_during_the_final_checkpoint_or_evaluation_loses_nothing(reference, tmp_path, where):
    """A SIGTERM after the last step is held until the final checkpoint and evaluation are written
    (the experiments' handler would have raised inside orbax's save, losing the final checkpoint,
    or inside the evaluation, whose rows a rerun resumed at the end does not log); then the run
    stops with status 143 and a rerun goes on from the end."""
    proc = toy(tmp_path, check=False, **{where: 60 if where == "TOY_TERM_AT_SAVE" else 1})
    from dhjax.train import app

    out = proc.stdout
    assert proc.returncode == app.EXIT_INTERRUPTED, out[-2000:] + proc.stderr[-2000:]
    assert "SIGTERM: training finished, its final checkpoint (step 60) and evaluation are written" in out, out
    assert "outside a training loop" not in out and "done " not in out      # the caller's work did not run
    assert (tmp_path / "checkpoints" / "60").exists()
    assert not any(p.name.endswith(".orbax-checkpoint-tmp") or "tmp" in p.name
                   for p in (tmp_path / "checkpoints").iterdir()), list((tmp_path / "checkpoints").iterdir())
    assert jsonl(tmp_path) == jsonl(reference)       # the final evaluation's row included
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["eval/mse"] == json.loads((reference / "final_metrics.json").read_text())["eval/mse"]
    again = toy(tmp_path).stdout
    assert "resumed from" in again and "at step 60" in again and "done 0 " in again
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=0)
    assert jsonl(tmp_path) == jsonl(reference)       # the rerun logged nothing twice


def test_resume_with_another_config_is_refused_and_keeps_the_run(reference, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    proc = toy(wd, "lr=0.01", "train.log_every=5", check=False)
    assert proc.returncode != 0
    assert "holds a run with another config (2 field(s) differ)" in proc.stderr, proc.stderr[-2000:]
    assert "lr: 0.05 in the run, 0.01 now" in proc.stderr
    assert "train.log_every: 10 in the run, 5 now" in proc.stderr
    after = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    assert after == before  # nothing moved aside, rewritten or appended
    # The flag accepts the fields that cannot change the state, and only those.
    proc = toy(wd, "lr=0.01", check=False, TOY_ALLOW=1)
    assert proc.returncode != 0 and "lr: 0.05 in the run, 0.01 now" in proc.stderr
    out = toy(wd, "train.steps=80", "train.log_every=5", TOY_ALLOW=1).stdout
    assert "config changes accepted on resume: train.log_every 10 -> 5, train.steps 60 -> 80" in out
    assert "resumed from" in out and "at step 60" in out
    assert json.load(open(wd / "config.json"))["train"]["steps"] == 80
    assert [r["step"] for r in train_rows(wd)][-5:] == [60, 65, 70, 75, 80]


@pytest.mark.parametrize("override, field", [
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.log_every=0", "train.log_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("train.steps=-3", "train.steps"),
    ("train.on_nonfinite='ignore'", "train.on_nonfinite"),
    ("train.max_skipped_fraction=1.5", "train.max_skipped_fraction")])
def test_bad_train_config_is_refused_before_any_work(tmp_path, override, field):
    proc = toy(tmp_path, override, check=False)
    assert proc.returncode != 0 and f"config field {field} must be" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    assert "step 1" not in proc.stdout


def test_unusable_workdir_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    proc = toy(afile, check=False)
    assert proc.returncode != 0 and f"workdir '{afile}' exists and is not a folder" in proc.stderr
    proc = toy(afile / "run", check=False)
    assert proc.returncode != 0 and f"workdir '{afile / 'run'}' is not writable" in proc.stderr


def test_nonfinite_step_is_skipped_counted_and_reported(tmp_path):
    proc = toy(tmp_path, "nan_step=5")
    final = json.load(open(tmp_path / "final_metrics.json"))
    assert final["skipped_steps"] == 1
    assert np.all(np.isfinite(params(tmp_path)))
    assert "warning: 1 of 10 steps skipped so far as non-finite (first at step 5)" in proc.stdout


def test_too_many_skipped_steps_fail_the_run(tmp_path):
    proc = toy(tmp_path, "nan_from=0", check=False)
    assert proc.returncode != 0
    assert "warning: 10 of 10 steps skipped so far as non-finite (first at step 0)" in proc.stdout
    assert "more than train.max_skipped_fraction=0.1 allows" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "final_metrics.json").exists() and not (tmp_path / "final_params.npy").exists()
    # A run whose skips stay under the fraction passes: 5 of 60 steps at a fraction of 0.1.
    toy(tmp_path / "ok", "nan_from=55")


def test_nonfinite_step_can_stop_the_run(tmp_path):
    proc = toy(tmp_path, "nan_step=5", "train.on_nonfinite='stop'", check=False)
    assert proc.returncode != 0
    assert "non-finite loss/gradients at step 5" in proc.stderr
    # The checkpoint it left holds the last finite state.
    from dhjax.train import checkpoint

    assert checkpoint.Checkpointer(str(tmp_path)).steps() == [6]


def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    latest = wd / "checkpoints" / "60"
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    (wd / "final_params.npy").unlink()
    out = toy(wd).stdout
    assert "checkpoint 60 is unreadable" in out and "resumed from" in out
    assert any(p.startswith("60.unreadable") for p in os.listdir(wd / "checkpoints"))
    np.testing.assert_allclose(params(wd), params(reference), atol=0)


def test_flipped_bytes_in_a_checkpoint_fail_its_checksum_and_fall_back(tmp_path, capsys):
    import jax.numpy as jnp

    from dhjax.train import checkpoint

    # Random values do not compress, so orbax stores them raw, where flipped bytes decode as
    # wrong numbers without any error from the storage layer.
    w = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(1, {"w": jnp.asarray(w - 1)}, {"next_step": 1})
    ck.save(2, {"w": jnp.asarray(w)}, {"next_step": 2})
    data = max((p for p in (tmp_path / "checkpoints" / "2").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = data.read_bytes()
    i = len(raw) // 2
    data.write_bytes(raw[:i] + bytes(x ^ 0xFF for x in raw[i:i + 8]) + raw[i + 8:])
    state, meta = ck.restore_latest({"w": jnp.zeros(5000)})
    np.testing.assert_array_equal(state["w"], w - 1)  # the previous, intact checkpoint
    assert meta == {"next_step": 1}
    out = capsys.readouterr().out
    assert "warning: checkpoint 2 is unreadable (CorruptCheckpoint: 1 array(s) fail their checksum" in out
    assert len(out.strip().splitlines()) == 2, out
    assert ck.steps() == [1] and any(p.startswith("2.unreadable") for p in os.listdir(ck.directory))
    ck.close()
    # The read-only loader refuses it too.
    shutil.move(os.path.join(ck.directory, next(p for p in os.listdir(ck.directory) if "unreadable" in p)),
                os.path.join(ck.directory, "3"))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="checkpoint 3 .* is corrupt"):
        checkpoint.load_latest(str(tmp_path), {"w": jnp.zeros(5000)})


def test_checkpoint_of_another_layout_is_a_mismatch_not_unreadable(tmp_path):
    import jax.numpy as jnp

    from dhjax.train import checkpoint

    ck = checkpoint.Checkpointer(str(tmp_path))
    ck.save(5, {"w": jnp.ones((4,)), "b": jnp.zeros(())}, {"next_step": 5})
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"w has shape \(4,\) float32 in the checkpoint, "
                                                            r"the model needs \(6,\) float32"):
        ck.restore_latest({"w": jnp.ones((6,)), "b": jnp.zeros(())})
    assert ck.steps() == [5] and os.listdir(ck.directory) == ["5"]  # left in place
    state, meta = ck.restore_latest({"w": jnp.zeros((4,)), "b": jnp.ones(())})
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert meta == {"next_step": 5}
    ck.close()


def test_logs_tensorboard_jsonl_config(reference):
    rows = train_rows(reference)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in jsonl(reference) if "eval/mse" in r] == [60]
    assert rows[-1]["loss"] < rows[0]["loss"]
    cfg = json.load(open(reference / "config.json"))
    assert cfg["train"]["steps"] == 60
    events = [f for f in os.listdir(reference / "tb") if "tfevents" in f]
    assert events
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(reference / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and "eval/mse" in acc.Tags()["scalars"]
    assert "weights" in acc.Tags()["images"]
    final = json.load(open(reference / "final_metrics.json"))
    assert final["eval/mse"] < 0.01


def test_images_at_every_evaluation_step_and_once_at_the_end(tmp_path):
    """eval_every=20 of 60 steps: the method's images (and evaluation scalars) at steps 20, 40
    and 60, each once; a rerun that resumes at the end logs none again. TensorBoard also holds
    the run's config as its HParams session."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    out = toy(tmp_path, "train.eval_every=20").stdout
    assert out.count("evaluation at step ") == 2 and "evaluation at step 20: mse " in out, out[-2000:]
    toy(tmp_path, "train.eval_every=20")      # resumed at its end
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("weights")] == [20, 40, 60]
    assert [e.step for e in acc.Scalars("eval/mse")] == [20, 40, 60]
    assert [r["step"] for r in jsonl(tmp_path) if "eval/mse" in r] == [20, 40, 60]
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["train.eval_every"].number_value == 20 and start.hparams["lr"].number_value == 0.05


def test_the_train_step_compiles_once_per_run(tmp_path):
    """The skip counters enter the first step placed as the step returns them (replicated); an
    uncommitted first input made jit compile the whole step a second time at step 2 (a minute
    of SynShot's tiny prior on a CPU)."""
    proc = toy(tmp_path, "train.steps=3", "train.log_every=1", devices=2, JAX_LOG_COMPILES=1)
    log = proc.stdout + proc.stderr
    assert log.count("Finished XLA compilation of jit(guarded)") == 1, log[-3000:]


def test_unknown_config_field_is_an_error(tmp_path):
    proc = toy(tmp_path, "train.stepz=3", check=False)
    assert proc.returncode != 0 and "unknown config field 'train.stepz'" in proc.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost(reference, tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, TOY, str(tmp_path)],
                              env=env_with(2, DHJAX_COORDINATOR=f"localhost:{port}",
                                           DHJAX_NUM_PROCESSES=2, DHJAX_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    # 2 processes x 2 devices = 4 devices: same result as one device.
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=1e-6)


def _synshot_state(workdir, step):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        tree = ck.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_synshot_prior_is_reproducible_and_a_sigkilled_run_resumes_bit_identical(tmp_path):
    """SynShot's tiny prior with the default kernel thread count: two runs end with the same
    bits, and so does one SIGKILLed after its first checkpoint and resumed (the C++ splat
    backward reduces its per-thread gradients in a fixed order)."""
    env = env_with(1, PYTHONPATH=os.path.dirname(HERE))
    env.pop("DHJAX_NUM_THREADS", None)
    flags_ = ["--config=configs/synshot_prior.py:tiny", "--config.data.train_identities=(0, 2)",
              "--config.data.test_identities=(1000000, 1)", f"--config.data.cache_dir={tmp_path / 'cache'}",
              "--config.train.steps=6", "--config.train.checkpoint_every=3", "--config.train.log_every=1",
              "--config.train.eval_every=0", "--config.eval.max_test_images=2"]

    def command(work):
        return [sys.executable, "-m", "experiments.synshot_prior", *flags_, f"--workdir={work}"]

    def finish(work):
        proc = subprocess.run(command(work), cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    finish(tmp_path / "a")
    finish(tmp_path / "b")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=os.path.dirname(HERE), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while not (killed / "checkpoints" / "3").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "3").exists() and not (killed / "checkpoints" / "6").exists()
    assert "resumed from" in finish(killed)
    a = _synshot_state(tmp_path / "a", 6)
    for other in ("b", "killed"):
        b = _synshot_state(tmp_path / other, 6)
        assert a.keys() == b.keys()
        differ = [k for k in a if not np.array_equal(a[k], b[k], equal_nan=True)]
        assert not differ, f"{other}: {len(differ)} of {len(a)} arrays differ, first {differ[:3]}"
        assert jsonl(tmp_path / other) == jsonl(tmp_path / "a")
