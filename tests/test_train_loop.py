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

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = os.path.join(HERE, "train_toy.py")


def env_with(devices=1, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def toy(workdir, *overrides, devices=1, check=True, **extra):
    proc = subprocess.run([sys.executable, TOY, str(workdir), *overrides], env=env_with(devices, **extra),
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def params(workdir):
    return np.load(os.path.join(workdir, "final_params.npy"))


def jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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
    toy(tmp_path / "seed1", "seed=1")
    assert jsonl(tmp_path / "seed1") != jsonl(reference)


def test_sigkill_after_first_checkpoint_then_resume_matches(reference, tmp_path):
    proc = subprocess.Popen([sys.executable, TOY, str(tmp_path)], env=env_with(1, TOY_SLEEP=0.05),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckdir = tmp_path / "checkpoints" / "20"
    deadline = time.time() + 120
    while not ckdir.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckdir.exists(), "no first checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final_params.npy").exists()  # really killed mid-run
    out = toy(tmp_path).stdout
    assert "resumed from" in out
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=0)


def test_sigterm_checkpoints_and_stops(reference, tmp_path):
    proc = subprocess.Popen([sys.executable, TOY, str(tmp_path)], env=env_with(1, TOY_SLEEP=0.05),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    jl = tmp_path / "metrics.jsonl"
    while not (jl.exists() and jl.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: checkpointed step" in out, out[-2000:]
    stopped_at = int(out.split("SIGTERM: checkpointed step ")[1].split(",")[0])
    assert 0 < stopped_at < 60
    toy(tmp_path)
    np.testing.assert_allclose(params(tmp_path), params(reference), atol=0)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    toy(tmp_path, "nan_step=5")
    final = json.load(open(tmp_path / "final_metrics.json"))
    assert final["skipped_steps"] == 1
    assert np.all(np.isfinite(params(tmp_path)))


def test_nonfinite_step_can_stop_the_run(tmp_path):
    proc = toy(tmp_path, "nan_step=5", "train.on_nonfinite='stop'", check=False)
    assert proc.returncode != 0
    assert "non-finite loss/gradients" in proc.stderr
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
