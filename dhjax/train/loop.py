"""The shared training loop: data-parallel over a device mesh, checkpointed, logged.

A method is four pure functions (a `Method`):
  init(rng, batch) -> state                      # pytree: params, optimiser state, ...
  train_step(state, batch, rng) -> (state, metrics)   # metrics: {name: scalar}, must hold "loss"
  evaluate(state, batch) -> metrics              # optional
  render(state, batch) -> {name: images [N, H, W, 3] in [0, 1]}   # optional
A dataset gives batches by index, so the step number is the input pipeline's position and a
resumed run reads exactly the batches an uninterrupted one would:
  dataset.get_batch(step) -> pytree of numpy arrays with leading axis = global batch size

`train` shards every batch over all devices of all processes (NamedSharding over a 1-D
"data" mesh), replicates the state, jits the step with the state donated, folds the RNG with
the step, skips (and counts) steps whose loss, metrics or new state are not finite (or stops,
per config) so a NaN never reaches a checkpoint, saves every N steps, at the end and on
SIGTERM, resumes from the newest readable checkpoint, and writes TensorBoard + metrics.jsonl +
a progress line from process 0 only.

Config fields read (`cfg.train`): steps, log_every, checkpoint_every, keep_checkpoints,
eval_every (0 = only at the end), on_nonfinite ("skip" | "stop"); and `cfg.seed`.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dhjax.train import app
from dhjax.train import checkpoint as ckpt_lib
from dhjax.train import config as config_lib
from dhjax.train import logs


class Method(NamedTuple):
    init: Callable
    train_step: Callable
    evaluate: Callable | None = None
    render: Callable | None = None


class TrainResult(NamedTuple):
    state: Any
    metrics: dict          # last training metrics + final evaluation (host floats)
    steps_run: int         # steps executed by this call (0 when resumed at the end)
    interrupted: bool      # stopped by SIGTERM (a checkpoint was written)


def data_mesh():
    """1-D mesh over every device of every process, axis "data" (Auto axis type: XLA propagates
    shardings, so methods need no sharding annotations of their own)."""
    return jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch, mesh):
    """Global numpy batch -> global jax.Array sharded over "data"; each process contributes
    its own rows only (the leading axis must divide by the number of devices)."""
    sharding = NamedSharding(mesh, P("data"))
    n_dev, n_proc, pid = jax.device_count(), jax.process_count(), jax.process_index()

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_dev:
            raise ValueError(f"batch leading axis {x.shape[:1]} must be divisible by the "
                             f"{n_dev} devices (global batch size)")
        rows = x.shape[0] // n_proc
        return jax.make_array_from_process_local_data(sharding, x[pid * rows:(pid + 1) * rows])

    return jax.tree_util.tree_map(one, batch)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _host(metrics) -> dict:
    return {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}


class _Sigterm:
    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no graceful stop
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(cfg, workdir: str, method: Method, dataset, *, eval_batch=None) -> TrainResult:
    """Runs (or resumes) training. See the module docstring for the contract."""
    tc = cfg.train
    if tc.on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"train.on_nonfinite must be 'skip' or 'stop', got {tc.on_nonfinite!r}")
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if lead:
        config_lib.save_config(cfg, workdir)
    mesh = data_mesh()
    replicated = NamedSharding(mesh, P())
    base_rng = jax.random.PRNGKey(int(cfg.seed))

    state = jax.jit(method.init, out_shardings=replicated)(
        jax.random.fold_in(base_rng, -1 % (2 ** 31)), shard_batch(dataset.get_batch(0), mesh))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
    start, skipped = 0, 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        start, skipped = int(meta["next_step"]), int(meta["skipped"])
        if lead:
            print(f"resumed from {ckpt.directory} at step {start}", flush=True)

    def guarded(state, skipped, batch, rng):
        new_state, metrics = method.train_step(state, batch, rng)
        if "loss" not in metrics:
            raise ValueError("train_step must return metrics with a 'loss' entry")
        ok = _all_finite(new_state) & _all_finite(metrics)
        # A cond, not an elementwise select over the state: XLA:CPU fuses such a select into the
        # whole backward pass, which made compiling SynShot's step exhaust 24 GB of memory.
        state = jax.lax.cond(ok, lambda: new_state, lambda: state)
        return state, skipped + (~ok).astype(jnp.int32), dict(metrics, finite=ok.astype(jnp.float32))

    step_fn = jax.jit(guarded, donate_argnums=(0,), out_shardings=replicated)
    writer = logs.MetricWriter(workdir, enabled=lead)
    progress = logs.Progress(tc.steps, start, enabled=lead)
    skipped_dev = jnp.asarray(skipped, jnp.int32)
    metrics_host: dict = {}
    interrupted = False

    def save(next_step):
        ckpt.save(next_step, state, {"next_step": int(next_step), "skipped": int(skipped_dev)})

    def check_nonfinite(step):
        if tc.on_nonfinite == "stop" and int(skipped_dev) > 0:
            save(step)
            raise FloatingPointError(
                f"non-finite loss/gradients at or before step {step}; the last finite state is "
                f"checkpointed in {ckpt.directory} (set train.on_nonfinite='skip' to skip such steps)")

    with _Sigterm() as sigterm:
        step = start
        for step in range(start, tc.steps):
            batch = shard_batch(dataset.get_batch(step), mesh)
            state, skipped_dev, metrics = step_fn(state, skipped_dev, batch,
                                                  jax.random.fold_in(base_rng, step))
            done = step + 1
            if tc.on_nonfinite == "stop" and float(metrics["finite"]) < 1:
                check_nonfinite(done)
            if done % tc.log_every == 0 or done == tc.steps:
                metrics_host = _host(metrics)
                metrics_host["skipped_steps"] = float(skipped_dev)
                writer.write_scalars(done, metrics_host)
                progress.update(done, {"loss": metrics_host["loss"]})
            if tc.eval_every and done % tc.eval_every == 0 and method.evaluate and eval_batch is not None:
                writer.write_scalars(done, {f"eval/{k}": v for k, v in _host(
                    method.evaluate(state, shard_batch(eval_batch, mesh))).items()})
            if sigterm.received:
                save(done)
                interrupted = True
                if lead:
                    print(f"SIGTERM: checkpointed step {done}, stopping", flush=True)
                break
            if done % tc.checkpoint_every == 0 and done < tc.steps:
                save(done)
        steps_run = max(step + 1 - start, 0) if start < tc.steps else 0
    final = dict(metrics_host)
    if not interrupted:
        if start < tc.steps:
            save(tc.steps)
        if method.evaluate and eval_batch is not None:
            ev = _host(method.evaluate(state, shard_batch(eval_batch, mesh)))
            final.update({f"eval/{k}": v for k, v in ev.items()})
            writer.write_scalars(tc.steps, {f"eval/{k}": v for k, v in ev.items()})
        if method.render and eval_batch is not None:
            images = method.render(state, shard_batch(eval_batch, mesh))
            writer.write_images(tc.steps, {k: np.asarray(v) for k, v in images.items()})
        if lead:
            app.merge_final_metrics(workdir, final)
    writer.close()
    ckpt.close()
    return TrainResult(state=state, metrics=final, steps_run=steps_run, interrupted=interrupted)
