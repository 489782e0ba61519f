"""The shared training loop: data-parallel over a device mesh, checkpointed, logged.

A method is four pure functions (a `Method`):
  init(rng, batch) -> state                      # pytree: params, optimiser state, ...
  train_step(state, batch, rng) -> (state, metrics)   # metrics: {name: scalar}, must hold "loss"
  evaluate(state, batch) -> metrics              # optional
  render(state, batch) -> {name: images [N, H, W, 3] in [0, 1]}   # optional
render's convention (every experiment follows it): ground truth next to the render, one grid
per tag, `{"eval/<what>": logs.comparison_grid(ground_truth, render, *diagnostics)}`, rows =
a few examples of the eval batch (or a fixed held-out view), columns = ground truth | render |
optional diagnostics (depth, layers, error colours, the input). The harness calls it on the
eval batch at every evaluation step (`train.eval_every`) and once at the end, and writes the
images to TensorBoard (`logs.MetricWriter.write_images`, tag = the key); it is not jitted here.
A dataset gives batches by index, so the step number is the input pipeline's position and a
resumed run reads exactly the batches an uninterrupted one would:
  dataset.get_batch(step) -> pytree of numpy arrays with leading axis = global batch size
A dataset may also offer an iterator of this process's rows (`dhjax.data.grain_pipeline.
GrainPipeline`: decoding threads and worker processes, prefetching), which the loop then reads
the training batches from:
  dataset.iterator(start, stop, process_index=, process_count=) -> it; next(it) -> this
    process's rows [p B / n, (p + 1) B / n) of step's global batch; it.get_state() -> JSON dict,
    it.set_state(dict), it.close()
Its state is saved in every checkpoint's meta ("data_state") and restored on resume (a state of
other batches, e.g. a changed dataset, is refused); the iterator is closed (its workers stopped)
when training ends, fails or is interrupted. get_batch(0) still gives the batch `init` sees.

`train` shards every batch over all devices of all processes (NamedSharding over a 1-D
"data" mesh), replicates the state, jits the step with the state donated and folds the RNG
with the step. What it guarantees:
  - config: the harness's fields are checked before anything runs, and a workdir holding a run
    of another config is refused (`dhjax.train.app.check_resume_config`);
  - resume: checkpoints every `checkpoint_every` steps and at the end (checksummed; an
    unreadable one falls back to the previous); a rerun resumes from the newest readable one
    and, with the same config, ends with the same state as an uninterrupted run, bit for bit
    on the same machine and software; metrics.jsonl and TensorBoard drop the rows a killed run
    wrote after its last checkpoint;
  - interruption: on SIGTERM (and, in a single process, on a first Ctrl-C) it checkpoints the
    next step boundary and raises `app.Interrupted` (exit status 143), so the caller writes no
    final outputs; one that arrives after the last step is held until the final checkpoint and
    evaluation are written, then raises `app.Interrupted` too (a rerun resumes at the end and
    goes on with the caller's work); with several
    processes, a SIGTERM to any of them stops all at the same step boundary (jax's preemption
    sync service, which jax.distributed.initialize starts);
  - non-finite steps: a step whose loss, metrics or new state is not finite is skipped (the
    state is kept) and counted, so a NaN never reaches a checkpoint; each log line reports new
    skips (count and first skipped step); more than `max_skipped_fraction` of `steps` skipped
    fails the run with FloatingPointError (after checkpointing the last finite state), as does
    any skip with on_nonfinite="stop";
  - logs: TensorBoard + metrics.jsonl + a progress line from process 0 only; TensorBoard also
    gets the run's config as its HParams session (`logs.MetricWriter`);
  - timing: `TrainResult.train_seconds`, the wall time of training summed over the calls that
    made the final state (kept in each checkpoint's meta, so a resumed or rerun run reports its
    whole training time, not its last session's).

Config fields read (`cfg.train`): steps, log_every, checkpoint_every, keep_checkpoints,
eval_every (0 = only at the end), on_nonfinite ("skip" | "stop"), max_skipped_fraction
(default 0.1); and `cfg.seed`.
"""

from __future__ import annotations

import math
import signal
import time
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
    """A method as the harness drives it: init(key, batch) -> state; train_step(state, batch, key) ->
    (state, metrics); optional evaluate(state, batch) -> metrics and render(state, batch) -> images."""
    init: Callable
    train_step: Callable
    evaluate: Callable | None = None
    render: Callable | None = None


class TrainResult(NamedTuple):
    """What `train` returns."""
    state: Any
    metrics: dict          # last training metrics + final evaluation (host floats)
    steps_run: int         # steps executed by this call (0 when resumed at the end)
    # Wall seconds of training over all the calls that made the final state: each call's time
    # in `train` up to its last checkpoint, carried across resumes in the checkpoints (steps
    # redone after a kill count once). NaN when the run resumed from a checkpoint written before
    # dhjax recorded it.
    train_seconds: float = float("nan")


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


def shard_local_batch(local, mesh):
    """This process's rows of a global batch (`dataset.iterator`'s batches: [B / process_count,
    ...]) -> global jax.Array sharded over "data", the same array `shard_batch` makes of the
    whole batch."""
    sharding = NamedSharding(mesh, P("data"))
    n_dev, n_proc = jax.device_count(), jax.process_count()

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0 or (x.shape[0] * n_proc) % n_dev:
            raise ValueError(f"process-local batch of {x.shape[:1]} rows x {n_proc} processes must be divisible "
                             f"by the {n_dev} devices (global batch size)")
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n_proc,) + x.shape[1:])

    return jax.tree_util.tree_map(one, local)


def _open_data_iterator(dataset, start: int, stop: int, saved_state):
    """The dataset's iterator at `start` (None for datasets without one), restored from the
    checkpoint's data state when there is one."""
    if not callable(getattr(dataset, "iterator", None)):
        return None
    it = dataset.iterator(start, stop, process_index=jax.process_index(), process_count=jax.process_count())
    if saved_state is not None:
        try:
            it.set_state(saved_state)
        except ValueError as err:
            it.close()
            raise app.RunError(f"cannot resume: {err}") from err
        if int(it.next_step) != int(start):
            it.close()
            raise app.RunError(f"the checkpoint's input pipeline state is at step {it.next_step} but its meta at "
                             f"step {start}; the checkpoint is inconsistent")
    return it


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _replicated_int(value: int, sharding) -> jax.Array:
    """An int32 scalar on every device of `sharding` (every process passes the same value)."""
    return jax.make_array_from_callback((), sharding, lambda _: np.asarray(value, np.int32))


def _host(metrics) -> dict:
    return {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}


def _preemption_service():
    """jax's preemption sync service when this is a multi-process run that has one (set up by
    jax.distributed.initialize unless jax_enable_preemption_service is off), else None."""
    if jax.process_count() <= 1:
        return None
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None)


class _Sigterm:
    """When to stop for a SIGTERM: `stop(done)` after each step.

    One process: a handler of its own notes the signal and the next step boundary stops. Several
    processes must stop at the same step, since one that stopped alone would wait in the
    checkpoint's barrier while the others wait for it in the next step's collectives (a signal
    reaches the processes at slightly different steps). There jax's preemption sync service
    decides: it catches SIGTERM in any process (its handler is left in place) and all processes
    agree on the first step that none of them has passed (`reached_preemption_sync_point`).

    One process also treats SIGINT (Ctrl-C) so: the first one checkpoints at the next step
    boundary and stops as SIGTERM does; a second one, while that step finishes, interrupts at
    once (KeyboardInterrupt, the previous handler). Several processes leave SIGINT alone.
    """

    def __init__(self):
        self.received = False
        self.finishing = False       # past the last step: writing the final checkpoint and evaluation
        self.name = "SIGTERM"
        self._old = None
        self._old_int = None
        self._int_installed = False
        self._service = _preemption_service()

    def __enter__(self):
        if self._service is not None:
            return self
        if jax.process_count() > 1 and jax.process_index() == 0:
            print("warning: jax's preemption service is off (jax_enable_preemption_service): a SIGTERM may stop "
                  "the processes at different steps and leave them waiting for each other", flush=True)
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
            # An ignored SIGINT (a background job's) stays ignored.
            if jax.process_count() == 1 and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._old_int = signal.signal(signal.SIGINT, self._handle_int)
                self._int_installed = True
        except ValueError:  # not the main thread: no handler, no graceful stop
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def _handle_int(self, signum, frame):
        if self.received:       # a second Ctrl-C: stop now, as Python would
            old = self._old_int if callable(self._old_int) else signal.default_int_handler
            return old(signum, frame)
        self.received, self.name = True, "SIGINT (Ctrl-C)"
        if self.finishing:
            print("\nCtrl-C: stopping once the final checkpoint and evaluation are written (Ctrl-C again stops "
                  "at once, possibly losing the final checkpoint)", flush=True)
        else:
            print("\nCtrl-C: checkpointing at the end of this step, then stopping (Ctrl-C again stops at once, "
                  "losing the steps since the last checkpoint)", flush=True)

    def stop(self, done: int) -> bool:
        """Whether to checkpoint step `done` and stop (called after every step, in order)."""
        if self._service is not None:
            self.received = bool(self._service.reached_sync_point(int(done)))
        return self.received

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        if self._int_installed:
            signal.signal(signal.SIGINT, self._old_int if self._old_int is not None else signal.default_int_handler)


def _eval_summary(ev: dict, most: int = 6) -> str:
    """A console line of evaluation metrics: psnr, loss and mse first, then the others by name."""
    first = [k for k in ("psnr", "loss", "mse") if k in ev]
    keys = (first + sorted(k for k in ev if k not in first))[:most]
    return ", ".join(f"{k} {ev[k]:.4g}" for k in keys) + (", ..." if len(ev) > most else "")


def _skip_report(skipped: int, first: int, done: int) -> str:
    return (f"warning: {skipped} of {done} steps skipped so far as non-finite (first at step {first}); "
            f"set train.on_nonfinite='stop' to stop at the first one")


def train(cfg, workdir: str, method: Method, dataset, *, eval_batch=None,
          allow_config_change: bool | None = None) -> TrainResult:
    """Runs (or resumes) training. See the module docstring for the contract.

    Raises app.RunError (bad config, another run's workdir, a checkpoint whose input pipeline
    state is of other batches, e.g. of a changed dataset), app.Interrupted (SIGTERM; a
    checkpoint was written), FloatingPointError (non-finite steps, per the config),
    checkpoint.CheckpointMismatch (a checkpoint of another state layout).
    """
    entered = time.time()
    try:
        config_lib.check_train_config(cfg)
    except ValueError as err:
        raise app.RunError(str(err)) from err
    tc = cfg.train
    max_skipped = float(tc.get("max_skipped_fraction", config_lib.TRAIN_DEFAULTS["max_skipped_fraction"]))
    lead = jax.process_index() == 0
    if lead:
        app.check_workdir(workdir)
    app.check_resume_config(workdir, cfg, allow_config_change, log=print if lead else (lambda *a: None))
    if lead:
        config_lib.save_config(cfg, workdir)
    mesh = data_mesh()
    replicated = NamedSharding(mesh, P())
    base_rng = jax.random.PRNGKey(int(cfg.seed))

    state = jax.jit(method.init, out_shardings=replicated)(
        jax.random.fold_in(base_rng, -1 % (2 ** 31)), shard_batch(dataset.get_batch(0), mesh))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
    start, skipped, first_skipped = 0, 0, -1
    earlier_seconds = 0.0          # training seconds of the calls before this one (the checkpoint's)
    restored = ckpt.restore_latest(state)
    data_state = None
    if restored is not None:
        state, meta = restored
        start, skipped = int(meta["next_step"]), int(meta["skipped"])
        first_skipped = int(meta.get("first_skipped", -1))
        earlier_seconds = float(meta.get("train_seconds", float("nan")))
        data_state = meta.get("data_state")
        if lead:
            print(f"resumed from {ckpt.directory} at step {start}", flush=True)
    try:
        data_iter = _open_data_iterator(dataset, start, max(start, tc.steps), data_state)
    except BaseException:
        ckpt.close()
        raise

    def guarded(state, counts, batch, rng, step):
        new_state, metrics = method.train_step(state, batch, rng)
        if "loss" not in metrics:
            raise ValueError("train_step must return metrics with a 'loss' entry")
        ok = _all_finite(new_state) & _all_finite(metrics)
        # A cond, not an elementwise select over the state: XLA:CPU fuses such a select into the
        # whole backward pass, which made compiling SynShot's step exhaust 24 GB of memory.
        state = jax.lax.cond(ok, lambda: new_state, lambda: state)
        n, first = counts
        counts = (n + (~ok).astype(jnp.int32), jnp.where(~ok & (first < 0), step, first))
        return state, counts, dict(metrics, finite=ok.astype(jnp.float32))

    step_fn = jax.jit(guarded, donate_argnums=(0,), out_shardings=replicated)
    writer = logs.MetricWriter(workdir, enabled=lead, resume_step=start if restored is not None else None)
    progress = logs.Progress(tc.steps, start, enabled=lead)
    # Placed like the step's outputs (replicated): uncommitted inputs on the first call and
    # replicated ones from the second on made jit compile the whole step twice.
    counts = (_replicated_int(skipped, replicated), _replicated_int(first_skipped, replicated))
    metrics_host: dict = {}
    reported = skipped

    def seconds_so_far():      # a call that runs no step (resumed at the end) adds nothing
        return earlier_seconds + (time.time() - entered) if start < tc.steps else earlier_seconds

    def save(next_step, seconds=None):
        meta = {"next_step": int(next_step), "skipped": int(counts[0]), "first_skipped": int(counts[1])}
        seconds = seconds_so_far() if seconds is None else seconds
        if math.isfinite(seconds):
            meta["train_seconds"] = seconds
        if data_iter is not None:
            meta["data_state"] = data_iter.get_state()
        ckpt.save(next_step, state, meta)

    def check_skips(done):
        """Reports new skips; fails the run when they exceed what the config allows."""
        nonlocal reported
        n, first = int(counts[0]), int(counts[1])
        if n > reported and lead:
            print(_skip_report(n, first, done), flush=True)
        reported = n
        if tc.on_nonfinite == "stop" and n > 0:
            save(done)
            raise FloatingPointError(
                f"non-finite loss/gradients at step {first}; the last finite state is "
                f"checkpointed in {ckpt.directory} (set train.on_nonfinite='skip' to skip such steps: "
                f"--allow_config_change accepts it on resume)")
        if n > max_skipped * tc.steps:
            save(done)
            raise FloatingPointError(
                f"{n} of the run's {tc.steps} steps were non-finite and skipped (first at step {first}), "
                f"more than train.max_skipped_fraction={max_skipped:g} allows; the last finite state is "
                f"checkpointed in {ckpt.directory}. The same command resumes and fails again: lower the learning "
                f"rate or check the inputs (in a new --workdir), or raise train.max_skipped_fraction "
                f"(--allow_config_change accepts it on resume)")

    def evaluate_and_log(done):
        """Evaluation metrics and the method's images (ground truth next to render) at one step."""
        if method.evaluate:
            ev = _host(method.evaluate(state, shard_batch(eval_batch, mesh)))
            writer.write_scalars(done, {f"eval/{k}": v for k, v in ev.items()})
            if lead and ev:
                print(f"evaluation at step {done}: {_eval_summary(ev)}", flush=True)
        if method.render:  # every process renders (a jitted global computation); process 0 writes
            images = method.render(state, shard_batch(eval_batch, mesh))
            writer.write_images(done, {k: np.asarray(v) for k, v in images.items()})

    try:
        with _Sigterm() as sigterm:
            step = start
            for step in range(start, tc.steps):
                if data_iter is not None:
                    batch = shard_local_batch(next(data_iter), mesh)
                else:
                    batch = shard_batch(dataset.get_batch(step), mesh)
                state, counts, metrics = step_fn(state, counts, batch, jax.random.fold_in(base_rng, step),
                                                 jnp.asarray(step, jnp.int32))
                done = step + 1
                if tc.on_nonfinite == "stop" and float(metrics["finite"]) < 1:
                    check_skips(done)
                if done % tc.log_every == 0 or done == tc.steps:
                    metrics_host = _host(metrics)
                    # The guard's per-step flag is internal: skipped_steps is what logs and
                    # final_metrics.json (and so the sweep's table) report.
                    metrics_host.pop("finite", None)
                    metrics_host["skipped_steps"] = float(counts[0])
                    writer.write_scalars(done, metrics_host)
                    progress.update(done, {"loss": metrics_host["loss"]})
                    check_skips(done)
                if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps and eval_batch is not None:
                    evaluate_and_log(done)
                if sigterm.stop(done):
                    save(done)
                    if lead:
                        print(f"{sigterm.name}: checkpointed step {done}, stopping without final outputs; rerun the "
                              f"same command to resume (exit status {app.EXIT_INTERRUPTED})", flush=True)
                    raise app.Interrupted(done, ckpt.directory)
                if done % tc.checkpoint_every == 0 and done < tc.steps:
                    save(done)
            steps_run = max(step + 1 - start, 0) if start < tc.steps else 0
            # The handler stays through the final checkpoint and evaluation: a SIGTERM there is
            # held until they are written (an exception inside orbax's save would lose the final
            # checkpoint, and a rerun resumed at the end would not log the final evaluation).
            sigterm.finishing = True
            final = dict(metrics_host)
            train_seconds = seconds_so_far()     # resumed at the end: the time the checkpoint recorded
            if start < tc.steps:
                save(tc.steps, train_seconds)
            check_skips(tc.steps)
            final.setdefault("skipped_steps", float(counts[0]))
            # A run resumed at its end (all steps done before) evaluates again for its caller but
            # logs nothing: those rows are already in metrics.jsonl and TensorBoard.
            log_final = start < tc.steps
            if method.evaluate and eval_batch is not None:
                ev = _host(method.evaluate(state, shard_batch(eval_batch, mesh)))
                final.update({f"eval/{k}": v for k, v in ev.items()})
                if log_final:
                    writer.write_scalars(tc.steps, {f"eval/{k}": v for k, v in ev.items()})
            if method.render and eval_batch is not None and log_final:
                images = method.render(state, shard_batch(eval_batch, mesh))
                writer.write_images(tc.steps, {k: np.asarray(v) for k, v in images.items()})
            if lead:
                app.merge_final_metrics(workdir, final)
            if sigterm.received:      # it came after the last step's check: everything is written
                if lead:
                    print(f"{sigterm.name}: training finished, its final checkpoint (step {tc.steps}) and "
                          f"evaluation are written; stopping before the rest of the program; rerun the same "
                          f"command to go on (exit status {app.EXIT_INTERRUPTED})", flush=True)
                raise app.Interrupted(tc.steps, ckpt.directory)
    finally:
        if data_iter is not None:
            data_iter.close()
        writer.close()
        ckpt.close()
    return TrainResult(state=state, metrics=final, steps_run=steps_run, train_seconds=train_seconds)
