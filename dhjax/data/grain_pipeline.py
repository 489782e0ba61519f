"""The input pipeline on Grain: step-indexed batches from a random-access dataset, with per-process
rows for multi-host runs, decoding in worker processes, and an iterator state for checkpoints.

Any dataset of `dhjax.data.dataset` (`FolderDataset`, the synthetic generators, SynShot's
`SelectedDataset`, MICA's `split_dataset`) is a Grain random-access data source: `len()` and
`ds[i]` -> sample dict (thread-safe, deterministic, picklable). `GrainPipeline` builds on it:

    grain.MapDataset.source(dataset)           the samples, by dataset index
      -> StepBatches (a grain.MapDataset)      element s = this process's rows of step s's batch
      -> [start:stop].to_iter_dataset(ReadOptions(threads, prefetch))   decoding threads
      -> .mp_prefetch(workers)                 worker processes (0: none)

Sampling contract: the same as `dhjax.data.dataset.Pipeline` (its subclass): the global batch of
step s holds the dataset indices `batch_indices(s)`, a permutation of the indices per epoch drawn
from (seed, epoch), cut into batches of B (the epoch's remainder dropped). So the batches are a
pure function of the step, and bit-identical to `Pipeline`'s for the same (dataset, B, seed):
switching the loader or the number of workers or threads changes no result.

Per-process sharding: process p of n reads rows [p B / n, (p + 1) B / n) of every global batch
(what `dhjax.train.loop.shard_batch` keeps of a global batch), so a run on 2 processes x 2
devices sees the same global batches as one on 1 device. (Grain's own `ShardOptions` would
instead give each process a disjoint part of the dataset, whose batches depend on the process
count.) B must divide by n.

Workers: `mp_prefetch` spreads the steps over `workers` processes round-robin (worker w decodes
steps w, w + workers, ...) and returns them in step order, so every worker count gives the same
batches. Workers ignore SIGINT/SIGTERM (the training process handles them and shuts the workers
down) and exit when the training process dies, even by SIGKILL. `BatchIterator.close` (also on
exceptions, as a context manager) stops them.

Iterator state: `BatchIterator.get_state()` is a small JSON dict, {"next_step", "sampling"}: the
element index of the Grain iterator is the step, so the next step is its whole position, the
same for every process and every worker count. (Grain's own multi-process state lists per-worker
positions, so it cannot be restored with another worker count, and its restore re-decodes up to
a few seconds of batches per worker.) "sampling" records the dataset size, batch size, seed and
shuffling, so restoring a state over another dataset (e.g. files added to data.root between the
runs) raises instead of silently reading other batches. `dhjax.train.loop.train` saves it in the
checkpoint's meta and restores it on resume.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

import grain

from dhjax.data import dataset as ds

STATE_VERSION = 1
_OPEN: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()   # iterators with running readers


@atexit.register
def _close_open_iterators() -> None:
    """Stops the workers of iterators still open at exit, while the modules their shutdown needs
    are still there."""
    for it in list(_OPEN):
        it.close()


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Runs in each Grain worker process before it reads: leaves SIGINT/SIGTERM to the training
    process (which checkpoints and shuts the workers down) and exits when that process dies."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch():
            parent.join()     # returns when the parent exits (its sentinel closes), however it died
            os._exit(0)

        threading.Thread(target=watch, daemon=True, name="dhjax-parent-watch").start()


class StepBatches(grain.MapDataset):
    """A Grain MapDataset whose element s is process `process_index`'s rows of the global batch of
    step s (`pipeline.batch_indices(s)`): {key: [B / process_count, ...]} stacked by
    `dataset.stack_samples`.

    Args:
      parent: grain.MapDataset.source(pipeline.dataset) (element i = sample i of the dataset).
      pipeline: the sampling (a `dhjax.data.dataset.Pipeline`).
      process_index, process_count: which rows; B must divide by process_count.
      steps: number of elements (steps 0 .. steps - 1).
      required_keys: keys every sample must hold (KeyError naming the sample otherwise).
    """

    def __init__(self, parent: grain.MapDataset, pipeline: ds.Pipeline, process_index: int = 0,
                 process_count: int = 1, *, steps: int, required_keys: Sequence[str] = ()):
        super().__init__(parent)
        ds.check_processes(pipeline.batch_size, process_index, process_count)
        self._pipeline = pipeline
        self._rows = pipeline.batch_size // process_count
        self._first = process_index * self._rows
        self._steps = int(steps)
        self._required = tuple(required_keys)

    def __len__(self) -> int:
        return self._steps

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        step = int(step)
        if not 0 <= step < self._steps:
            raise IndexError(f"step {step} out of range [0, {self._steps})")
        idx = self._pipeline.batch_indices(step)[self._first:self._first + self._rows]
        samples = []
        for i in idx:
            s = self._parent[int(i)]
            if not isinstance(s, Mapping):
                raise TypeError(f"sample {int(i)} of {self._pipeline.dataset!r} is a {type(s).__name__}, "
                                f"not a dict of arrays")
            missing = [k for k in self._required if k not in s]
            if missing:
                raise KeyError(f"sample {int(i)} of {self._pipeline.dataset!r} lacks keys {missing} "
                               f"(has {sorted(s)})")
            samples.append(s)
        try:
            return ds.stack_samples(samples)
        except ValueError as err:
            raise ValueError(f"step {step}'s batch (samples {[int(i) for i in idx]} of {self._pipeline.dataset!r}) "
                             f"cannot be stacked: {err}") from err

    def __str__(self) -> str:
        return (f"StepBatches(batch_size={self._pipeline.batch_size}, rows={self._first}:"
                f"{self._first + self._rows}, seed={self._pipeline.seed}, shuffle={self._pipeline.shuffle})")


def _jax_process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


class GrainPipeline(ds.Pipeline):
    """`dhjax.data.dataset.Pipeline`'s batches (the same sampling contract, bit-identical
    batches) read through Grain, with worker processes and an iterator for the training loop.

    `get_batch(step)` (global batch) and `local_batch(step, p, n)` (process p's rows) read one
    step in this process; `iterator(start, stop)` reads steps start .. stop - 1 of this
    process's rows with `threads` decoding threads and `workers` worker processes, prefetching
    `prefetch` batches (per worker with workers). `dhjax.train.loop.train` uses the iterator
    (see the module docstring for its state).

    Args:
      dataset: random-access dataset (len(), [i] -> sample dict), picklable when workers > 0.
      batch_size: global batch size B; seed, shuffle, indices: as `Pipeline`.
      workers: worker processes decoding batches (0: decode in this process).
      threads: decoding threads per process (each decodes whole batches), >= 1.
      prefetch: batches decoded ahead (0: none; with workers: per worker, at least 1).
      required_keys: keys every sample must hold (checked as samples are read).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 indices: Sequence[int] | None = None, workers: int = 0, threads: int = 1, prefetch: int = 2,
                 required_keys: Sequence[str] = ()):
        super().__init__(dataset, batch_size, seed=seed, shuffle=shuffle, indices=indices)
        for name, value, low in (("workers", workers, 0), ("threads", threads, 1), ("prefetch", prefetch, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.workers, self.threads, self.prefetch = int(workers), int(threads), int(prefetch)
        self.required_keys = tuple(required_keys)
        self._source = grain.MapDataset.source(dataset)
        self._batches: dict = {}

    def batches(self, process_index: int = 0, process_count: int = 1) -> StepBatches:
        """The Grain MapDataset of process `process_index`'s rows, one element per step (steps
        0 .. 2^62 - 1: the pipeline repeats its epochs)."""
        key = (int(process_index), int(process_count))
        if key not in self._batches:
            self._batches[key] = StepBatches(self._source, self, *key, steps=2 ** 62,
                                             required_keys=self.required_keys)
        return self._batches[key]

    def get_batch(self, step: int) -> dict:
        """Global batch of `step`: dict of numpy arrays with leading axis B."""
        return self.batches()[int(step)]

    def local_batch(self, step: int, process_index: int, process_count: int) -> dict:
        """Rows [p B / n, (p + 1) B / n) of `get_batch(step)` (B must divide by n)."""
        return self.batches(process_index, process_count)[int(step)]

    def shard(self, process_index: int, process_count: int) -> "GrainPipeline":
        """The pipeline over this process's contiguous block of the indices (`Pipeline.shard`)."""
        block = ds.shard_indices(len(self.indices), process_index, process_count)
        return GrainPipeline(self.dataset, self.batch_size, seed=self.seed, shuffle=self.shuffle,
                             indices=self.indices[block], workers=self.workers, threads=self.threads,
                             prefetch=self.prefetch, required_keys=self.required_keys)

    def sampling(self) -> dict:
        """What decides the batches: {"dataset_size", "indices", "batch_size", "seed", "shuffle"}
        (indices: the count used, and a CRC of them when they are not all of the dataset)."""
        import zlib

        n = len(self.dataset)
        whole = len(self.indices) == n and np.array_equal(self.indices, np.arange(n))
        return {"dataset_size": int(n), "indices": int(len(self.indices)) if whole else
                f"{len(self.indices)}:{zlib.crc32(np.ascontiguousarray(self.indices).tobytes()):08x}",
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle}

    def iterator(self, start: int = 0, stop: int | None = None, *, process_index: int | None = None,
                 process_count: int | None = None) -> "BatchIterator":
        """Iterator over this process's rows of steps start .. stop - 1 (stop None: one epoch
        from start). process_index/process_count default to jax's."""
        if process_index is None or process_count is None:
            p, n = _jax_process()
            process_index = p if process_index is None else process_index
            process_count = n if process_count is None else process_count
        stop = int(start) + self.steps_per_epoch if stop is None else int(stop)
        return BatchIterator(self, int(start), stop, int(process_index), int(process_count))

    def __iter__(self):
        """Batches of one epoch (epoch 0), read with the pipeline's threads and workers."""
        with self.iterator(0, self.steps_per_epoch, process_index=0, process_count=1) as it:
            yield from it

    def __repr__(self) -> str:
        return (f"GrainPipeline({self.dataset!r}, batch_size={self.batch_size}, seed={self.seed}, "
                f"workers={self.workers}, threads={self.threads})")


class BatchIterator:
    """Process-local batches of steps [start, stop) from a GrainPipeline, in step order.

    `next(it)` -> {key: [B / process_count, ...]}; `get_state()` / `set_state(state)`: the
    position as a JSON dict {"version", "next_step", "sampling"} (module docstring); `close()`
    stops the worker processes (also done by `with`, and at garbage collection). Raises
    StopIteration at `stop`. A failure in a worker (a bad file, say) raises RuntimeError
    carrying the worker's error (which names the sample).
    """

    def __init__(self, pipeline: GrainPipeline, start: int, stop: int, process_index: int, process_count: int):
        ds.check_processes(pipeline.batch_size, process_index, process_count)
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start {start}, stop {stop}")
        self.pipeline, self.stop = pipeline, int(stop)
        self.process_index, self.process_count = process_index, process_count
        self.next_step = int(start)
        self._it = None
        self._shared_memory = False

    # Grain iterator over [next_step, stop), created at the first next() (starting workers
    # takes seconds, and a set_state before it would waste them).
    def _open(self):
        p = self.pipeline
        part = p.batches(self.process_index, self.process_count)[self.next_step:self.stop]
        it_ds = part.to_iter_dataset(grain.ReadOptions(num_threads=p.threads, prefetch_buffer_size=p.prefetch))
        self._shared_memory = False
        if p.workers > 0:
            # Batches come back through the workers' queues (pickled), not in shared memory
            # blocks: those of batches prefetched but never read when the iterator closes early
            # (SIGTERM, an exception) would be left to the resource tracker, with a warning.
            options = getattr(grain.experimental, "DatasetOptions", None)
            with_options = getattr(grain.experimental, "WithOptionsIterDataset", None)
            if options is not None and with_options is not None:
                it_ds = with_options(it_ds, options(min_shm_size=2 ** 62))
            else:
                self._shared_memory = True
            it_ds = it_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
                num_workers=p.workers, per_worker_buffer_size=max(1, p.prefetch)), worker_init_fn=_worker_init)
        return iter(it_ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.next_step >= self.stop:
            raise StopIteration
        if self._it is None:
            self._it = self._open()
            _OPEN.add(self)
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(f"the Grain iterator ended at step {self.next_step}, before {self.stop}") from None
        except Exception as err:
            if self.pipeline.workers == 0:
                raise
            self.close()
            raise RuntimeError(f"an input pipeline worker failed (the next step was {self.next_step}; the worker may "
                               f"have been reading a later one): {err}") from err
        if self._shared_memory:
            # Shared memory blocks are unlinked when their arrays are freed: copy into plain
            # arrays so that no block outlives this call.
            batch = {k: np.array(v, copy=True) for k, v in batch.items()}
        self.next_step += 1
        return batch

    def get_state(self) -> dict:
        """{"version", "next_step", "sampling"}: JSON, the same on every process."""
        return {"version": STATE_VERSION, "next_step": self.next_step, "sampling": self.pipeline.sampling()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_state()` dict: the next batch is that of state["next_step"].
        Raises ValueError for a state of another sampling (dataset size, batch size, seed,
        shuffling) or a malformed one."""
        if not isinstance(state, Mapping) or "next_step" not in state or "sampling" not in state:
            raise ValueError(f"not an input pipeline state (expected {{'next_step', 'sampling'}}): {state!r}")
        if state.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"input pipeline state version {state.get('version')!r}, this dhjax reads "
                             f"{STATE_VERSION}")
        mine = self.pipeline.sampling()
        theirs = dict(state["sampling"])
        if theirs != mine:
            diff = ", ".join(f"{k} {theirs.get(k)!r} then, {mine.get(k)!r} now" for k in sorted(set(mine) | set(theirs))
                             if theirs.get(k) != mine.get(k))
            raise ValueError(f"the saved input pipeline state is of other batches ({diff}); resuming would not "
                             f"continue on the batches of the interrupted run (has the dataset changed?)")
        step = state["next_step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= self.stop:
            raise ValueError(f"input pipeline state's next_step {step!r} is not in [0, {self.stop}]")
        self.close()
        self.next_step = int(step)

    def close(self) -> None:
        """Stops the decoding threads and worker processes (idempotent)."""
        it, self._it = self._it, None
        if it is None:
            return
        _OPEN.discard(self)
        close = getattr(it, "close", None)       # grain >= 0.2.12 iterators
        if callable(close):
            close()
        # grain 0.2.11: the multi-process iterator stops its pool when its generator is closed,
        # and the thread prefetcher's threads end with their executor.
        gen = getattr(it, "_iterator", None)
        if gen is not None and hasattr(gen, "close"):
            gen.close()
        executor = getattr(it, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        del it

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


LOADER_KINDS = ("grain", "index")


def default_loader_config() -> ml_collections.ConfigDict:
    """How a method reads its training batches (the `loader` block of configs/synshot_prior.py
    and configs/mica.py). None of these fields changes the batches, so a run resumes with other
    values (`dhjax.train.app.INPUT_PIPELINE_FIELDS`).

    kind ("grain"): "grain" (`GrainPipeline`) or "index" (`dhjax.data.dataset.Pipeline`, read
      in the training loop's thread, nothing ahead);
    workers (0): worker processes decoding batches (kind "grain");
    threads (1): decoding threads per process (kind "grain"), each reading whole batches ahead
      of the training step.
    """
    return ml_collections.ConfigDict(dict(kind="grain", workers=0, threads=1))


def check_loader_config(loader=None) -> ml_collections.ConfigDict:
    """The `loader` config block (None: `default_loader_config()`) with its defaults filled in,
    checked without reading any data: raises ValueError naming the field for an unknown kind, a
    count that is not an integer >= its bound (workers >= 0, threads >= 1), or workers with the
    index pipeline. Methods call it before their run starts."""
    c = ml_collections.ConfigDict({**default_loader_config().to_dict(), **dict(loader or {})})
    if c.kind not in LOADER_KINDS:
        raise ValueError(f"config field loader.kind must be one of {LOADER_KINDS}, got {c.kind!r}")
    for name, low in (("workers", 0), ("threads", 1)):
        value = c[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"config field loader.{name} must be an integer >= {low}, got {value!r}")
    if c.kind == "index" and c.workers:
        raise ValueError(f"config field loader.workers = {c.workers} needs loader.kind = 'grain' (the index "
                         f"pipeline has no workers)")
    return c


def make_pipeline(dataset, batch_size: int, *, seed: int = 0, loader=None, required_keys: Sequence[str] = ()):
    """The pipeline a method's `loader` config block asks for (None: `default_loader_config()`):
    a `GrainPipeline` or a `dhjax.data.dataset.Pipeline`; both give the same batches. Raises
    ValueError naming the field for an unknown kind or a bad count (`check_loader_config`)."""
    c = check_loader_config(loader)
    if c.kind == "grain":
        try:
            return GrainPipeline(dataset, batch_size, seed=seed, workers=c.workers, threads=c.threads,
                                 required_keys=required_keys)
        except ValueError as err:
            if str(err).startswith(("workers", "threads")):
                raise ValueError(f"config field loader.{err}") from err
            raise
    return ds.Pipeline(dataset, batch_size, seed=seed)


__all__ = ["GrainPipeline", "StepBatches", "BatchIterator", "default_loader_config", "check_loader_config", "make_pipeline", "STATE_VERSION"]
