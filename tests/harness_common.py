"""Shared pieces of the harness tests that train a toy in subprocesses (tests/train_toy.py and the
Grain toy of tests/test_data_grain.py): the environment with N fake devices, running a toy
script, reading its results, and the toy scripts' own argument parsing and result file."""

import json
import os
import subprocess
import sys

import numpy as np


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` fake CPU devices, keeping the test process's other
    XLA_FLAGS (conftest.py's fast-compile options, a user's own), so that it compiles as the test
    process does."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={int(devices)}"])


def env_with(devices=1, **extra):
    """os.environ with `devices` fake CPU devices and `extra` variables (values str()-ed)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_toy(script, workdir, *overrides, devices=1, check=True, timeout=400, **extra):
    """Run `python script WORKDIR key=value ...` to completion; with check, assert it exited 0."""
    proc = subprocess.run([sys.executable, script, str(workdir), *overrides], env=env_with(devices, **extra),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def params(workdir):
    """The final weights a toy run saved."""
    return np.load(os.path.join(workdir, "final_params.npy"))


def jsonl(workdir):
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def parse_overrides(argv):
    """A toy script's `key=value` arguments as config overrides (values are Python literals)."""
    overrides = {}
    for arg in argv:
        k, v = arg.split("=", 1)
        overrides[k] = eval(v)  # numbers or quoted strings
    return overrides


def save_result(workdir, res):
    """On process 0: the trained weights to WORKDIR/final_params.npy and a 'done STEPS
    train_seconds SECONDS' line."""
    import jax

    if jax.process_index() == 0:
        np.save(os.path.join(workdir, "final_params.npy"), np.asarray(res.state["params"]["w"]))
        print("done", res.steps_run, "train_seconds", res.train_seconds, flush=True)
