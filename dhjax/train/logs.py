"""Metric writing: TensorBoard event files, a metrics.jsonl, and a progress line.

TensorBoard files are written with the `tensorboard` package's own event writer and protos,
which do not import TensorFlow (clu.metric_writers would pull TensorFlow, ~500 MB, into every
install only to write event files). Only process 0 writes.

Images (`comparison_grid`): every experiment logs ground truth next to its render as one grid
image per tag, rows = examples, columns = ground truth | render | optional diagnostics (depth,
layers, error colours, the input), each column [H, W] with a 2-pixel grey gap between cells.

HParams (TensorBoard's HParams dashboard): a run's hyper-parameters are a session-start summary
in its TensorBoard folder (`MetricWriter.write_hparams`; a `MetricWriter` writes the run's
config.json there by itself), a finished run gets a session-end summary, and a sweep writes the
experiment summary (the hyper-parameters it varies and the metrics to compare) at its root
(`write_hparams_events`, used by `dhjax.train.sweep`). The summaries are built here from the
hparams plugin's protos (`tensorboard.plugins.hparams.summary` imports TensorFlow; its protos
and `metadata` do not).
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from typing import Mapping

import numpy as np

from dhjax.train import config as config_lib

GRID_GAP = 2                # pixels between the cells of a comparison grid
GRID_GAP_VALUE = 0.5        # their grey
HPARAMS_SUFFIX = ".hparams"  # file name suffix of the event files `write_hparams_events` owns
CONFIG_HPARAMS = "config.json"


def _host_array(x) -> np.ndarray:
    """A numpy copy of x; a jax.Array spread over several processes is gathered first (a
    collective: every process must call it, as every process calls a method's render)."""
    if hasattr(x, "is_fully_addressable") and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _as_rgb_float(x, what: str) -> np.ndarray:
    """[N, H, W], [N, H, W, 1] or [N, H, W, 3] floats in [0, 1] or uint8 -> [N, H, W, 3] float32."""
    a = _host_array(x)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"comparison_grid: {what} must be [N, H, W], [N, H, W, 1] or [N, H, W, 3], "
                         f"got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)


def comparison_grid(ground_truth, render, *extras, max_rows: int | None = None) -> np.ndarray:
    """The images convention of every experiment: ground truth next to the render.

    Args:
      ground_truth, render: [N, H, W(, C)] in [0, 1] (or uint8), C = 1 or 3; numpy or jax arrays.
      extras: more columns of the same shape (diagnostics: depth, layers, error colours, the
        network's input), drawn right of the render in the order given.
      max_rows: at most this many examples (rows), the first ones; None: all N.
    Returns:
      [1, R*H + (R-1)*GRID_GAP, K*W + (K-1)*GRID_GAP, 3] float32 in [0, 1], R rows (examples),
      K = 2 + len(extras) columns, grey gaps between the cells: one image, ready for
      `MetricWriter.write_images` under one tag.
    Raises:
      ValueError: shapes that differ between the columns or are not images.
    """
    cols = [_as_rgb_float(ground_truth, "ground_truth"), _as_rgb_float(render, "render")]
    cols += [_as_rgb_float(e, f"extra column {i}") for i, e in enumerate(extras)]
    if any(c.shape != cols[0].shape for c in cols):
        raise ValueError("comparison_grid: every column must have the shape of the ground truth; got "
                         + ", ".join(str(c.shape[:3]) for c in cols))
    n, h, w, _ = cols[0].shape
    rows = n if max_rows is None else min(n, int(max_rows))
    if rows < 1:
        raise ValueError("comparison_grid: no examples to show")
    g = GRID_GAP
    out = np.full((rows * h + (rows - 1) * g, len(cols) * w + (len(cols) - 1) * g, 3), GRID_GAP_VALUE,
                  np.float32)
    for r in range(rows):
        for c, col in enumerate(cols):
            out[r * (h + g):r * (h + g) + h, c * (w + g):c * (w + g) + w] = col[r]
    return out[None]


# ----------------------------------------------------------------------------------------------
# HParams summaries (TensorBoard's hparams plugin), without TensorFlow.


def hparam_value(value):
    """A hyper-parameter value as the HParams plugin stores it: bool, float (ints, floats) or
    str (anything else: lists and tuples as their JSON text, None as "None")."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "None"
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def flatten_hparams(config) -> dict:
    """{dotted field: `hparam_value`} of a config (ConfigDict, nested dicts, or config.json's
    dict); every leaf field, lists and tuples as one string."""
    return {k: hparam_value(v) for k, v in config_lib._flatten(config_lib.config_dict(config)).items()}


def config_hparams(workdir: str) -> dict | None:
    """`flatten_hparams` of <workdir>/config.json (what a run logs as its hyper-parameters), None
    when there is no such file. Raises OSError / ValueError for an unreadable one."""
    path = os.path.join(workdir, CONFIG_HPARAMS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return flatten_hparams(json.load(f))


def _hparams_summary(tag: str, data):
    """A Summary holding the hparams plugin data `data` (HParamsPluginData) under `tag`, as
    `tensorboard.plugins.hparams.summary._summary` builds it (that module imports TensorFlow)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)])


def session_start_summary(hparams: Mapping, *, group_name: str = "", start_time: float | None = None):
    """The session-start summary of one run: {name: value} (values through `hparam_value`)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(group_name=group_name,
                                            start_time_secs=time.time() if start_time is None else start_time)
    for name, value in hparams.items():
        v = hparam_value(value)
        if isinstance(v, bool):
            info.hparams[str(name)].bool_value = v
        elif isinstance(v, float):
            info.hparams[str(name)].number_value = v
        else:
            info.hparams[str(name)].string_value = v
    return _hparams_summary(metadata.SESSION_START_INFO_TAG,
                            plugin_data_pb2.HParamsPluginData(session_start_info=info))


SESSION_STATUS = {"ok": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "running": "STATUS_RUNNING",
                  "unknown": "STATUS_UNKNOWN"}


def session_end_summary(status: str, *, end_time: float | None = None):
    """The session-end summary of a run that ended: status "ok" | "failed" | "running" | "unknown"
    (the plugin's Status; it has no "interrupted")."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    if status not in SESSION_STATUS:
        raise ValueError(f"session status must be one of {sorted(SESSION_STATUS)}, got {status!r}")
    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(SESSION_STATUS[status]),
                                          end_time_secs=time.time() if end_time is None else end_time)
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info))


def experiment_summary(hparams: Mapping[str, list], metrics: Mapping[str, str], *, description: str = ""):
    """The experiment summary (what the HParams dashboard shows as columns).

    Args:
      hparams: {name: the values the runs take}: each becomes an HParamInfo with that discrete
        domain, typed bool / float64 / string when all its values are (else every value as a string).
      metrics: {scalar tag in the sessions' runs: display name}.
      description: Markdown shown above the table.
    """
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos = []
    for name, values in hparams.items():
        vs = [hparam_value(v) for v in values]
        kinds = {type(v) for v in vs}
        if len(kinds) > 1:
            vs = [str(v) for v in vs]
        kind = type(vs[0]) if vs else str
        dtype = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64}.get(kind, api_pb2.DATA_TYPE_STRING)
        domain = struct_pb2.ListValue()
        domain.extend(list(dict.fromkeys(vs)))
        infos.append(api_pb2.HParamInfo(name=str(name), type=dtype, domain_discrete=domain))
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=str(tag)), display_name=str(display))
                    for tag, display in metrics.items()]
    experiment = api_pb2.Experiment(description=description, time_created_secs=time.time(),
                                    hparam_infos=infos, metric_infos=metric_infos)
    return _hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def scalars_summary(scalars: Mapping[str, float]):
    """A Summary of simple scalar values {tag: float}."""
    from tensorboard.compat.proto import summary_pb2

    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=str(k), simple_value=float(v))
                                      for k, v in scalars.items()])


def write_hparams_events(directory: str, summaries) -> str:
    """Writes [(step, Summary)] into one event file of `directory` named *.hparams, after
    deleting the *.hparams event files written there before, so that calling it again replaces
    what it wrote (TensorBoard keeps the first metadata it reads for a tag, so appending would not
    update an experiment or a session status). Other event files in the folder are left alone.
    Returns the new file's path."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if "tfevents" in name and name.endswith(HPARAMS_SUFFIX):
            os.remove(os.path.join(directory, name))
    writer = EventFileWriter(directory, filename_suffix=HPARAMS_SUFFIX)
    try:
        for step, summary in summaries:
            writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    finally:
        writer.close()
    written = [f for f in os.listdir(directory) if "tfevents" in f and f.endswith(HPARAMS_SUFFIX)]
    return os.path.join(directory, max(written))


def _png_bytes(image: np.ndarray) -> bytes:
    import imageio.v2 as imageio

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    imageio.imwrite(buf, img, format="png")
    return buf.getvalue()


def truncate_jsonl(path: str, last_step: int) -> int:
    """Drops the rows of a metrics.jsonl whose step is after `last_step` (and a torn last line
    of a killed writer); the file is replaced atomically. Returns the number of rows dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    dropped = len(lines) - len(kept)
    if dropped:
        config_lib.write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricWriter:
    """Writes scalars/images to TensorBoard (<workdir>/tb) and scalars to metrics.jsonl.

    Args:
      workdir: run folder. enabled: False on processes other than 0 (writes nothing).
      resume_step: the step a resumed run continues after. Rows a killed run wrote for later
        steps (after its last checkpoint) are removed from metrics.jsonl, and TensorBoard is
        told to drop its events from step resume_step + 1 on (a SessionLog START event, which
        TensorBoard's loader honours), so each step appears once. -1 drops everything an
        earlier writer wrote (for runs that write their whole log again when rerun).
      hparams: the run's hyper-parameters for the HParams dashboard (`write_hparams`):
        CONFIG_HPARAMS ("config.json", the default) = every field of <workdir>/config.json when
        the file exists (the harness and `dhjax.train.app.start` write it before), a mapping =
        these, None = none.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None,
                 hparams: Mapping | str | None = CONFIG_HPARAMS):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(workdir, exist_ok=True)
        jsonl = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            truncate_jsonl(jsonl, resume_step)
        self._tb = EventFileWriter(os.path.join(workdir, "tb"))
        if resume_step is not None:
            from tensorboard.compat.proto import event_pb2

            self._tb.add_event(event_pb2.Event(
                wall_time=time.time(), step=int(resume_step) + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._jsonl = open(jsonl, "a")
        if isinstance(hparams, str):
            if hparams != CONFIG_HPARAMS:
                raise ValueError(f"hparams must be a mapping, None or {CONFIG_HPARAMS!r}, got {hparams!r}")
            hparams = config_hparams(workdir)
        if hparams:
            self.write_hparams(hparams)

    def write_hparams(self, hparams: Mapping, *, group_name: str = "") -> None:
        """The run's session-start summary for TensorBoard's HParams dashboard, at step 0:
        {name: value} (bool, number, string; anything else as text, `hparam_value`). A run
        has one: TensorBoard keeps the first it reads for the run's folder."""
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2

        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                           summary=session_start_summary(hparams, group_name=group_name)))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """scalars: {name: float}; non-finite values are written as strings in the jsonl."""
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = {k: float(v) for k, v in scalars.items()}
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        row = {"step": int(step)}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: {name: [H, W, 3] or [N, H, W, 3] in [0, 1] (or uint8)}; N images become name/i."""
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        vals = []
        for name, img in images.items():
            img = np.asarray(img)
            stack = img[None] if img.ndim == 3 else img
            for i, one in enumerate(stack):
                tag = name if len(stack) == 1 else f"{name}/{i}"
                h, w = one.shape[:2]
                vals.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
                    height=h, width=w, colorspace=one.shape[2] if one.ndim == 3 else 1,
                    encoded_image_string=_png_bytes(one))))
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=vals)))
        self._tb.flush()

    def flush(self) -> None:
        """Flushes TensorBoard and metrics.jsonl (no-op when disabled)."""
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Closes TensorBoard and metrics.jsonl (no-op when disabled)."""
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False


class Progress:
    """A progress line with steps/s and ETA: `step 120/1000 (12%) | 35.2 steps/s | ETA 0:00:25`."""

    def __init__(self, total_steps: int, start_step: int = 0, stream=None, enabled: bool = True):
        self.total, self.start = int(total_steps), int(start_step)
        self.t0 = time.time()
        self.stream = stream or sys.stdout
        self.enabled = enabled

    def line(self, step: int, scalars: Mapping[str, float] | None = None) -> str:
        """The progress line at `step`, with `scalars` appended."""
        done = max(step - self.start, 0)
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = done / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        text = (f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%) | "
                f"{rate:.2f} steps/s | ETA {eta_s}")
        for k, v in (scalars or {}).items():
            text += f" | {k} {float(v):.4g}"
        return text

    def update(self, step: int, scalars: Mapping[str, float] | None = None) -> None:
        """Prints the progress line (when enabled)."""
        if self.enabled:
            print(self.line(step, scalars), file=self.stream, flush=True)


class Ticker:
    """Progress of a host loop that has no training progress line (held-out renders, per-frame
    fits): `log(f"{what} {done}/{total} ({elapsed} s, ETA {eta} s)")` at most every `every_s`
    seconds and once at the end, so a long evaluation (e.g. 350 held-out frames of a paper run
    on a slow device) shows it is moving. `tick()` after each item."""

    def __init__(self, what: str, total: int, log, every_s: float = 30.0, clock=time.time):
        self.what, self.total, self.log, self.every_s = str(what), int(total), log, float(every_s)
        self.clock = clock
        self.done = 0
        self.t0 = self.last = clock()

    def tick(self, n: int = 1) -> None:
        """Counts n more items done; logs when `every_s` has passed since the last line, or at the end."""
        self.done += int(n)
        now = self.clock()
        if self.log is None or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
        self.log(f"{self.what} {self.done}/{self.total} ({elapsed:.0f} s"
                 + (f", ETA {eta:.0f} s)" if self.done < self.total else ")"))
