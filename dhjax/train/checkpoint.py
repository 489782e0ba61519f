"""Checkpoints that survive kills and bad bytes: orbax CheckpointManager with atomic commits,
keep-last-K, a checksum per array, and resume from the newest readable checkpoint.

A checkpoint holds the training state pytree and a small JSON of loop metadata (the next step,
which is also the input pipeline's position, since datasets are indexed by step; the count of
skipped non-finite steps) plus a CRC-32 of every array's bytes, computed when saving and
checked when restoring.

Restoring tells two failures apart:
  - unreadable (missing or truncated files, flipped bytes caught by a checksum, any read
    error): the checkpoint is moved aside to `<step>.unreadable-<time>` (never deleted) and the
    previous one is tried, with a two-line warning;
  - written for another state layout (array shapes or count differ from the model's):
    `CheckpointMismatch` is raised and nothing is moved, since the files are fine and the
    config or code is what changed.
Checkpoints written before checksums existed restore without the check.
"""

from __future__ import annotations

import collections
import os
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKSUMS = "checksums"     # meta key of the {array path: crc32 hex} table


class CheckpointMismatch(ValueError):
    """A readable checkpoint whose arrays do not fit the state it is restored into."""


class CorruptCheckpoint(IOError):
    """A checkpoint whose restored bytes differ from the checksums written with it."""


def _host_array(leaf) -> np.ndarray | None:
    """The full value of a state leaf on this host (None for an array sharded across hosts,
    whose bytes no single process holds)."""
    if isinstance(leaf, jax.Array):
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return None
    return np.asarray(leaf)


def checksums(state: Any) -> dict[str, str | None]:
    """{jax keystr of each leaf: CRC-32 (8 hex digits) of its dtype, shape and bytes}."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        arr = _host_array(leaf)
        if arr is None:
            out[jax.tree_util.keystr(path)] = None
            continue
        arr = np.ascontiguousarray(arr)
        crc = zlib.crc32(f"{arr.dtype.str}{arr.shape}".encode())
        crc = zlib.crc32(arr.reshape(-1).view(np.uint8), crc)
        out[jax.tree_util.keystr(path)] = f"{crc:08x}"
    return out


def verify_checksums(state: Any, meta: dict) -> None:
    """Raises CorruptCheckpoint when a restored array's bytes differ from the checksum saved
    with it (meta without checksums, from older checkpoints, passes)."""
    expected = meta.get(CHECKSUMS)
    if not expected:
        return
    got = checksums(state)
    bad = [k for k, v in expected.items() if v is not None and got.get(k) not in (None, v)]
    if bad:
        raise CorruptCheckpoint(f"{len(bad)} array(s) fail their checksum, first {bad[0]}")


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def layout_mismatch(stored_tree: Any, target: Any) -> str | None:
    """None when the stored arrays (orbax metadata leaves with shape and dtype) have the same
    count and (shape, dtype) multiset as `target`'s leaves; otherwise what differs, naming
    arrays where the names agree."""
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    stored = {}
    for i, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(stored_tree, is_leaf=is_meta)):
        stored[str(getattr(leaf, "name", None) or _dotted(path) or i)] = (tuple(leaf.shape), _dtype_name(leaf.dtype))
    wanted = {_dotted(p): (tuple(np.shape(x)), _dtype_name(x.dtype))
              for p, x in jax.tree_util.tree_leaves_with_path(target)}
    if collections.Counter(stored.values()) == collections.Counter(wanted.values()):
        return None
    named = [k for k in wanted if k in stored and stored[k] != wanted[k]]
    if named:
        k = named[0]
        return (f"{k} has shape {stored[k][0]} {stored[k][1]} in the checkpoint, the model needs "
                f"{wanted[k][0]} {wanted[k][1]} ({len(named)} array(s) differ)")
    return f"it holds {len(stored)} arrays of other shapes than the model's {len(wanted)}"


class Checkpointer:
    """Saves/restores (state, meta) under <workdir>/checkpoints.

    Args:
      workdir: run folder; keep: how many checkpoints to keep (the newest ones), >= 1.
    """

    def __init__(self, workdir: str, keep: int = 3):
        if int(keep) < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Atomically writes checkpoint `step` (orbax commits by renaming a finished folder),
        with a checksum of every array in its meta."""
        meta = dict(meta, **{CHECKSUMS: checksums(state)})
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """The steps of the checkpoints on disk, ascending (re-read from disk)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def _check_layout(self, step: int, target: Any) -> None:
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore below decides
            return
        if stored is None:
            return
        problem = layout_mismatch(getattr(stored, "tree", stored), target)
        if problem:
            raise CheckpointMismatch(
                f"checkpoint {step} in {self.directory} was written for another state layout: {problem}. "
                f"The files are intact and were left in place; was the run started with another config "
                f"or dhjax version? Use another workdir for a new run.")

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint into the structure/shardings of `target`.

        Returns (state, meta) or None when there is no checkpoint. Unreadable checkpoints
        (read errors, checksum mismatches) are moved aside with a short warning and the previous
        one is tried (newest first); a checkpoint of another state layout raises
        CheckpointMismatch.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.steps()):
            self._check_layout(step, target)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                meta = dict(out["meta"])
                verify_checksums(out["state"], meta)
                meta.pop(CHECKSUMS, None)
                return out["state"], meta
            except Exception as err:  # noqa: BLE001 - any failure means: try the previous one
                # Move it aside (never delete: it may be inspected or repaired) so that the
                # resumed run can write this step again.
                aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
                if jax.process_index() == 0:
                    os.rename(os.path.join(self.directory, str(step)), aside)
                self.manager.reload()
                reason = (str(err).strip().splitlines() or [""])[0][:160]
                print(f"warning: checkpoint {step} is unreadable ({type(err).__name__}: {reason})\n"
                      f"  moved to {aside}; falling back to the previous one", flush=True)
        return None

    def close(self) -> None:
        """Closes the checkpoint manager."""
        self.manager.close()


def load_latest(workdir: str, target: Any) -> tuple[Any, dict, int]:
    """Read-only restore of the newest checkpoint of another run (e.g. a trained prior) into the
    structure of `target`; nothing is moved or written.

    Returns (state, meta, step). Raises FileNotFoundError when the run has no checkpoint,
    ValueError (CheckpointMismatch), naming the first differing entry, when the checkpoint does
    not fit `target` (a checkpoint of another model configuration), and CorruptCheckpoint when
    its bytes fail their checksums.
    """
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints folder in '{workdir}'")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=("state", "meta"))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"'{directory}' holds no checkpoint")
        step = steps[-1]
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as err:  # noqa: BLE001 - orbax raises several types for a tree mismatch
            raise CheckpointMismatch(f"checkpoint {step} in '{directory}' does not fit this model configuration "
                                     f"(was it trained with another config?): {type(err).__name__}: "
                                     f"{str(err)[:300]}") from err
        want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(target)}
        have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(out["state"])}
        wrong = sorted(k for k in want if have.get(k) != want[k])
        if wrong:
            raise CheckpointMismatch(f"checkpoint {step} in '{directory}' does not fit this model configuration: "
                                     f"{wrong[0]} has shape {have.get(wrong[0])}, the model needs {want[wrong[0]]} "
                                     f"({len(wrong)} entries differ); was it trained with another config?")
        try:
            verify_checksums(out["state"], meta)
        except CorruptCheckpoint as err:
            raise CorruptCheckpoint(f"checkpoint {step} in '{directory}' is corrupt: {err}") from err
        meta.pop(CHECKSUMS, None)
        return out["state"], meta, int(step)
    finally:
        manager.close()
