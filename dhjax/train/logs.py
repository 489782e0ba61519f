"""Metric writing: TensorBoard event files, a metrics.jsonl, and a progress line.

TensorBoard files are written with the `tensorboard` package's own event writer and protos,
which do not import TensorFlow (clu.metric_writers would pull TensorFlow, ~500 MB, into every
install only to write event files). Only process 0 writes.
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
        TensorBoard's loader honours), so each step appears once.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
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
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
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
        if self.enabled:
            print(self.line(step, scalars), file=self.stream, flush=True)
