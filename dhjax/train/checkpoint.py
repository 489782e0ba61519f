"""Checkpoints that survive kills: orbax CheckpointManager with atomic commits, keep-last-K,
resume from the newest readable checkpoint (a corrupt or partial one falls back to the previous
one with a warning).

A checkpoint holds the training state pytree and a small JSON of loop metadata (the next step,
which is also the input pipeline's position, since datasets are indexed by step; the count of
skipped non-finite steps).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves/restores (state, meta) under <workdir>/checkpoints.

    Args:
      workdir: run folder; keep: how many checkpoints to keep (the newest ones).
    """

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Atomically writes checkpoint `step` (orbax commits by renaming a finished folder)."""
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint into the structure/shardings of `target`.

        Returns (state, meta) or None when there is no checkpoint. Unreadable checkpoints are
        skipped with a warning (newest first).
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                return out["state"], dict(out["meta"])
            except Exception as err:  # noqa: BLE001 - any failure means: try the previous one
                # Move it aside (never delete: it may be inspected or repaired) so that the
                # resumed run can write this step again.
                aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
                if jax.process_index() == 0:
                    os.rename(os.path.join(self.directory, str(step)), aside)
                self.manager.reload()
                log.warning("checkpoint %d in %s is unreadable (%s: %s); moved to %s, trying the "
                            "previous one", step, self.directory, type(err).__name__, err, aside)
                print(f"warning: checkpoint {step} is unreadable ({type(err).__name__}); moved to "
                      f"{aside}; falling back to the previous one", flush=True)
        return None

    def close(self) -> None:
        self.manager.close()


def load_latest(workdir: str, target: Any) -> tuple[Any, dict, int]:
    """Read-only restore of the newest checkpoint of another run (e.g. a trained prior) into the
    structure of `target`; nothing is moved or written.

    Returns (state, meta, step). Raises FileNotFoundError when the run has no checkpoint and
    ValueError, naming the first differing entry, when the checkpoint does not fit `target`
    (a checkpoint of another model configuration).
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
        meta_only = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as err:  # noqa: BLE001 - orbax raises several types for a tree mismatch
            raise ValueError(f"checkpoint {step} in '{directory}' does not fit this model configuration "
                             f"(was it trained with another config?): {type(err).__name__}: "
                             f"{str(err)[:300]}") from err
        want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(target)}
        have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(out["state"])}
        wrong = sorted(k for k in want if have.get(k) != want[k])
        if wrong:
            raise ValueError(f"checkpoint {step} in '{directory}' does not fit this model configuration: "
                             f"{wrong[0]} has shape {have.get(wrong[0])}, the model needs {want[wrong[0]]} "
                             f"({len(wrong)} entries differ); was it trained with another config?")
        return out["state"], dict(meta_only["meta"]), int(step)
    finally:
        manager.close()
