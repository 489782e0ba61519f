"""Multi-process runs on one machine: two Python processes joined through `jax.distributed`
(DHJAX_COORDINATOR / DHJAX_NUM_PROCESSES / DHJAX_PROCESS_ID, one CPU device each, cross-process
collectives over gloo) stand in for several hosts.

  * the toy method of tests/train_toy.py: a SIGTERM to one process stops both at the same step
    with one checkpoint, and the rerun resumes and ends where one process with two devices ends;
  * SynShot's tiny prior through its command line (`python -m experiments.synshot_prior`, what a
    user or the SLURM script runs; slow): two processes end with the same state, bit for bit, as
    one process with two devices, also across a resume in two processes, and close to one device;
  * docs/slurm/synshot_prior.sbatch: its commands name existing experiments, flags, config variants
    and fields (the checks tests/test_configs.py applies to the README), it is valid bash, and it
    asks for what the harness needs (one task per GPU, SIGTERM before the limit, requeue).

Every process writes its output to a file (a full pipe would block it); when one fails or the
time runs out, all are killed and both logs are shown.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import harness_common
import test_configs

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "train_toy.py"
SBATCH = REPO / "docs" / "slurm" / "synshot_prior.sbatch"


# ----------------------------------------------------------------------------------------------
# Launching processes.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int = 1, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=harness_common.xla_flags(devices),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    for key in ("DHJAX_COORDINATOR", "DHJAX_NUM_PROCESSES", "DHJAX_PROCESS_ID", "SLURM_NTASKS"):
        env.pop(key, None)    # a single-process run must not try to join anything
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Procs:
    """Processes started together (each in its own session, output to <log>.<i>.log)."""

    def __init__(self, commands, envs, log: Path):
        self.logs = [Path(f"{log}.{i}.log") for i in range(len(commands))]
        self.procs = []
        for cmd, env, path in zip(commands, envs, self.logs):
            with open(path, "w") as out:
                self.procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def report(self, tail: int = 4000) -> str:
        return "\n".join(f"--- process {i} (exit {p.poll()}), last {tail} characters of {self.logs[i]}:\n"
                         f"{self.output(i)[-tail:]}" for i, p in enumerate(self.procs))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)    # the process and anything it started
                except ProcessLookupError:
                    pass
                p.wait()

    def wait(self, timeout: float, expect: int = 0) -> None:
        """Waits for all to exit with status `expect`; kills all and fails at the first other
        status or when `timeout` seconds have passed."""
        deadline = time.time() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                bad = [p for p in self.procs if p.poll() not in (None, expect)]
                if bad:
                    pytest.fail(f"a process exited with {bad[0].returncode}, expected {expect}\n{self.report()}")
                if time.time() > deadline:
                    pytest.fail(f"still running after {timeout:.0f}s (killed)\n{self.report()}")
                time.sleep(0.1)
            codes = [p.returncode for p in self.procs]
            assert codes == [expect] * len(codes), f"exit statuses {codes}, expected {expect}\n{self.report()}"
        finally:
            self.kill()


def launch(command, log: Path, *, processes: int = 1, devices: int = 1, **extra) -> Procs:
    """`command` once (`devices` CPU devices) or as `processes` processes of one distributed run
    (one device each, a free coordinator port on localhost)."""
    if processes == 1:
        return Procs([command], [process_env(devices, **extra)], log)
    port = free_port()
    envs = [process_env(1, DHJAX_COORDINATOR=f"127.0.0.1:{port}", DHJAX_NUM_PROCESSES=processes,
                        DHJAX_PROCESS_ID=i, **extra) for i in range(processes)]
    return Procs([command] * processes, envs, log)


def checkpoint_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def jsonl(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# When a process joins a distributed run.


@pytest.fixture
def no_join(monkeypatch):
    """app.init_distributed in this process, with jax.distributed.initialize replaced by a
    recorder (this test process must stay alone) and no launcher variables around."""
    import jax

    from dhjax.train import app

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    for key in ("DHJAX_COORDINATOR", "DHJAX_NUM_PROCESSES", "DHJAX_PROCESS_ID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    return app, calls


def test_init_distributed_joins_only_multi_process_launches(no_join, monkeypatch):
    app, calls = no_join
    app.init_distributed()                                       # nothing set: alone
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")              # python run in the batch shell
    app.init_distributed()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "1")               # the user's way out
    app.init_distributed()
    assert calls == []
    monkeypatch.delenv("DHJAX_NUM_PROCESSES")
    app.init_distributed()                                       # an srun step of 8 tasks
    assert calls == [((), {})]                                   # jax reads SLURM's variables
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("DHJAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("DHJAX_PROCESS_ID", "1")
    app.init_distributed()
    assert calls[-1] == ((), {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1})


def test_multi_process_launch_follows_init_distributeds_rule(no_join, monkeypatch):
    """The rule app.exit_on_user_error uses (before jax starts) to leave SIGTERM to jax's
    preemption service: the same launches as init_distributed joins."""
    app, _ = no_join
    assert not app.multi_process_launch()
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert not app.multi_process_launch()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    assert app.multi_process_launch()
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "1")
    assert not app.multi_process_launch()
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "2")
    assert app.multi_process_launch()
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "two")           # init_distributed names it
    assert not app.multi_process_launch()


def test_init_distributed_names_missing_variables(no_join, monkeypatch):
    app, calls = no_join
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "2")
    with pytest.raises(app.RunError, match="DHJAX_NUM_PROCESSES=2 needs DHJAX_COORDINATOR and DHJAX_PROCESS_ID"):
        app.init_distributed()
    monkeypatch.setenv("DHJAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("DHJAX_PROCESS_ID", "2")
    with pytest.raises(app.RunError, match=r"DHJAX_PROCESS_ID=2 must be below DHJAX_NUM_PROCESSES=2 \(ids 0..1\)"):
        app.init_distributed()
    monkeypatch.setenv("DHJAX_PROCESS_ID", "one")
    with pytest.raises(app.RunError, match="DHJAX_PROCESS_ID must be an integer >= 0, got 'one'"):
        app.init_distributed()
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "abc")
    with pytest.raises(app.RunError, match="DHJAX_NUM_PROCESSES must be an integer >= 1, got 'abc'"):
        app.init_distributed()
    assert calls == []


# ----------------------------------------------------------------------------------------------
# The toy method: SIGTERM to one of two processes, then resume.


def toy_command(workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(TOY), str(workdir), *overrides]


TOY_RUN = ("train.steps=150", "train.checkpoint_every=20", "train.log_every=10")


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_matches(tmp_path):
    """SLURM signals every task, but not at the same instant, and a process that stopped alone
    would wait in the checkpoint's barrier while the other waits for it in the next step's
    collective. The harness stops all processes at one step (jax's preemption sync service), so
    signalling only process 1 must give one checkpoint, exit status 143 in both and a rerun that
    ends with the state of an uninterrupted run (one process with two devices, bit for bit)."""
    ref = tmp_path / "reference"
    launch(toy_command(ref, *TOY_RUN), tmp_path / "reference", devices=2).wait(120)

    work = tmp_path / "two"
    run = launch(toy_command(work, *TOY_RUN), tmp_path / "interrupted", processes=2, TOY_SLEEP=0.1)
    try:
        deadline = time.time() + 120
        while 20 not in checkpoint_steps(work) and time.time() < deadline and all(
                p.poll() is None for p in run.procs):
            time.sleep(0.05)
        assert 20 in checkpoint_steps(work), f"no checkpoint 20 in time\n{run.report()}"
        run.procs[1].send_signal(signal.SIGTERM)
        run.wait(120, expect=143)
    finally:
        run.kill()
    steps = checkpoint_steps(work)
    stop = steps[-1]
    assert 20 < stop < 150 and stop % 20, (steps, run.report())    # the SIGTERM checkpoint
    assert f"SIGTERM: checkpointed step {stop}" in run.output(0), run.report()
    assert "SIGTERM: checkpointed" not in run.output(1)           # process 0 alone prints
    assert not (work / "final_params.npy").exists()

    again = launch(toy_command(work, *TOY_RUN), tmp_path / "resumed", processes=2)
    again.wait(120)
    assert f"resumed from {work / 'checkpoints'} at step {stop}" in again.output(0), again.report()
    np.testing.assert_array_equal(np.load(work / "final_params.npy"), np.load(ref / "final_params.npy"))
    rows = [r for r in jsonl(work) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(10, 151, 10))          # each step once
    assert rows == [r for r in jsonl(ref) if "loss" in r]


# ----------------------------------------------------------------------------------------------
# SynShot's tiny prior from its command line.


def synshot_command(workdir: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    """The tiny prior on 2 training identities (40 images) and 1 held-out identity, `steps` steps,
    a checkpoint every step; the held-out evaluation cut to 2 images and a one-image grid."""
    return [sys.executable, "-m", "experiments.synshot_prior", "--config=configs/synshot_prior.py:tiny",
            "--config.data.train_identities=(0, 2)", "--config.data.test_identities=(1000000, 1)",
            f"--config.data.cache_dir={cache}", f"--config.train.steps={steps}", "--config.train.checkpoint_every=1",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.eval.n_images=2",
            "--config.eval.max_test_images=2", "--config.eval.grid_identities=1", "--config.eval.grid_views=(0,)",
            f"--workdir={workdir}", *extra]


def template(workdir: Path, step: int):
    """The state of checkpoint `step` as ShapeDtypeStructs on this process's one device (from the
    checkpoint's metadata), whatever the device count of the run that wrote it."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        meta = ck.metadata(workdir / "checkpoints" / str(step) / "state")
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                                  is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def saved_state(workdir: Path, step: int) -> dict:
    """{array path: numpy array} of checkpoint `step`, restored through the harness's
    checkpointer, which checks every array's CRC-32 against the one saved with it."""
    import jax
    import orbax.checkpoint as ocp

    from dhjax.train import checkpoint as ckpt_lib

    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=("state", "meta"))
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template(workdir, step)), meta=ocp.args.JsonRestore()))
        ckpt_lib.verify_checksums(out["state"], dict(out["meta"]))
    finally:
        manager.close()
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(out["state"])}


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not np.array_equal(a[k], b[k], equal_nan=True)]


@pytest.mark.slow
def test_synshot_prior_in_two_processes_matches_one_process(tmp_path):
    """Slow: four runs of the prior's command line (one process on 1 and on 2 devices, two
    processes for one step, then resumed in two processes for the second), each starting up,
    compiling the training step and the evaluation and evaluating: 34 minutes on 2 CPU cores
    shared with four other jobs (load ~13), about 8 minutes per run.

    Two processes with one device each against one process with two devices: the same global
    batch, the same split of it over two devices, the same gradient all-reduce of two partial
    sums (over gloo between processes, in memory within one), so the same bits are expected and
    asserted, for the whole state (parameters, optimiser moments, VQ statistics) after step 1
    and, across the two-process resume, after step 2, and for every logged training metric.
    Against one device, XLA reduces the batch in another order, and Adam's first steps
    (update ~ lr * g / |g|) turn round-off sized gradient differences into updates of up to
    lr per step, so the parameters agree only within 2 steps x 2 x lr (sign flips of such
    elements), and most of them much closer (measured: largest difference 2.3e-4 = 0.23 lr,
    7 of 634,831 parameters beyond 0.1 lr, 99th percentile 2.6e-7)."""
    cache = tmp_path / "cache"
    one = tmp_path / "one_device"
    launch(synshot_command(one, cache, 2), tmp_path / "one_device", devices=1).wait(1500)   # generates the data
    two = tmp_path / "two_devices"
    launch(synshot_command(two, cache, 2), tmp_path / "two_devices", devices=2).wait(1500)

    work = tmp_path / "two_processes"
    first = launch(synshot_command(work, cache, 1), tmp_path / "two_processes", processes=2)
    first.wait(1500)
    assert "step 1/1" in first.output(0) and "held-out" in first.output(0), first.report()
    for line in ("step 1/1", "held-out", "done in"):                  # process 0 alone prints
        assert line not in first.output(1), first.report()
    assert checkpoint_steps(work) == [1]
    assert not differing(saved_state(work, 1), saved_state(two, 1)), "step 1 differs from two devices"

    resumed = launch(synshot_command(work, cache, 2, "--allow_config_change"), tmp_path / "resumed", processes=2)
    resumed.wait(1500)
    assert f"resumed from {work / 'checkpoints'} at step 1" in resumed.output(0), resumed.report()
    assert checkpoint_steps(work) == [1, 2]
    mp, ref = saved_state(work, 2), saved_state(two, 2)
    bad = differing(mp, ref)
    assert not bad, f"{len(bad)} of {len(mp)} arrays differ after the resume, first {bad[:3]}"
    rows = [r for r in jsonl(work) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and rows == [r for r in jsonl(two) if "loss" in r]
    final = json.loads((work / "final_metrics.json").read_text())
    assert final == json.loads((two / "final_metrics.json").read_text())
    assert len(list((work / "tb").glob("*tfevents*"))) >= 1

    # The run's own loader reads the two-process checkpoint (as synshot_invert does).
    from dhjax.train import app

    cfg, state, step = app.load_run(str(work), lambda c: template(work, 2),
                                    experiment="synshot_prior")
    assert step == 2 and cfg.train.steps == 2
    import jax

    loaded = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state)}
    assert not differing(loaded, mp)

    # One device: close, within what Adam's first steps allow (see the docstring).
    lr = float(cfg.optim.lr)
    single = saved_state(one, 2)
    params = [k for k in ref if k.startswith("['params']")]
    diffs = np.concatenate([np.abs(single[k] - ref[k]).ravel() for k in params])
    assert diffs.max() <= 2 * 2 * lr, diffs.max()
    assert np.mean(diffs > 0.1 * lr) < 1e-3, np.mean(diffs > 0.1 * lr)


# ----------------------------------------------------------------------------------------------
# The SLURM example.


def sbatch_options(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def script_defaults(text: str) -> dict[str, str]:
    """{NAME: default} of the script's `NAME=${NAME:-default}` lines (what a user may override
    from the environment)."""
    return dict(re.findall(r"^(?:export\s+)?(\w+)=\$\{\1:-([^}\s]*)\}", text, re.M))


def expand(command: str, values: dict[str, str]) -> str:
    """`command` with $NAME and ${NAME} of `values` replaced (the quotes around them stay)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), command)


def slurm_commands() -> list[str]:
    text = SBATCH.read_text()
    return [expand(c, script_defaults(text)) for c in test_configs.commands_in(text)]


def test_slurm_example_commands_are_real():
    commands = slurm_commands()
    assert any(c.startswith("python -m experiments.synshot_prior") for c in commands), commands
    problems = [p for c in commands for p in test_configs.check_command(c)]
    assert not problems, "\n".join(problems)
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_example_asks_for_what_the_harness_needs():
    text = SBATCH.read_text()
    opts = sbatch_options(text)
    # jax.distributed's SLURM detection gives each task the GPU of its SLURM_LOCALID: one task
    # per GPU, or the other GPUs of a node stay idle.
    assert opts["ntasks-per-node"] == opts["gpus-per-node"], opts
    assert int(opts["nodes"]) >= 2
    assert "requeue" in opts
    m = re.fullmatch(r"TERM@(\d+)", opts["signal"])            # to the tasks, not only the batch shell
    assert m and int(m.group(1)) >= 60, opts["signal"]
    assert "srun" in text and "scontrol requeue" in text and "143" in text
    assert '".[cuda]"' in text and "DHJAX_CUDA=ON" in text
    [command] = [c for c in slurm_commands() if c.startswith("python -m experiments.synshot_prior")]
    flags = dict(w[2:].partition("=")[::2] for w in shlex.split(command) if w.startswith("--"))
    assert flags["config"] == "configs/synshot_prior.py:paper" and flags["workdir"], flags
    # The data step renders the dataset of the config the training command runs.
    assert 'dataset_root(config.load_config(sys.argv[1]))' in text and "' \"$CONFIG\"" in text
