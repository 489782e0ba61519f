"""Tracker benchmark: frames/s of sequential metrical face tracking (`dhjax.capture.tracker`) and
where a frame's time goes, against the tracker's reference path in the same run (no timed
assertions anywhere).

One synthetic handheld video (`track_run.synthetic_sequence`, sequence `sequence` of seed 0) of
`n_frames` frames of `size` x `size` pixels, noisy true landmarks, skin masks and the true focal
length, tracked with the tracker settings of `config` (configs/track.py's default variant: the
settings for real videos, 300 landmark + 3 x 150 photometric steps on the first frame, 30 +
30/30/40 on every later one) and `overrides`, from the true identity shape. Each setting is
tracked twice with one step cache: the first pass pays every compilation (`*_cold_s`), the
second is warm and gives the first frame's time and the later frames' time per frame
(`*_frame_s`, frames/s), split per stage ("rigid", "landmarks", "level <l>", "errors").

Settings timed in one run:
  track_*            the defaults: visibility on the device at each pyramid level's resolution
                     (`tracker.visibility_traced`), one compiled step for every stage;
  track_reference_*  (reference=True) the visibility of the tracker before 2026-12-05: numpy
                     visibility with a full-resolution z-buffer of 8-pixel tiles every
                     `visibility_every` steps (config visibility='host', zbuffer='full',
                     zbuffer_tile=8); it shares today's one compiled step per kind of stage,
                     so it is not the whole earlier tracker (README: that one's figures).
Both are scored against the ground truth (vertex median and aligned, mm) so that speed is not
bought with accuracy. The anchor, not measured here: the PyTorch metrical tracker takes about an
hour per 100 frames on a GPU (about 36 s a frame).
"""

from __future__ import annotations

import time

import ml_collections
import numpy as np

from dhjax.bench.timing import load_config
from dhjax.train import config as config_lib

ANCHOR_PYTORCH_GPU_S_PER_FRAME = 36.0
"""The PyTorch metrical tracker's pace on a GPU (about an hour per 100 frames), for context only."""


def default_config() -> ml_collections.ConfigDict:
    """config (the tracker's "path:variant"), overrides ((dotted key, value) pairs applied to its
    `tracker` settings, e.g. (("first.landmark_steps", 50),)), size (square image, pixels),
    n_frames (>= 2), sequence, uv_size (synthetic textures), reference (also time the
    reference path)."""
    return ml_collections.ConfigDict(dict(config="configs/track.py:", overrides=(), size=512, n_frames=4,
                                          sequence=0, uv_size=128, reference=True))


def _track(tcfg, model, frames, samples, truth_shape, label, log):
    """Two passes with one step cache: cold (compilation), warm (timed per stage)."""
    from dhjax.capture import tracker
    cache = {}
    t0 = time.perf_counter()
    tracker.track_sequence(tcfg, model, frames, shape_init=truth_shape, log=None, step_cache=cache)
    cold = time.perf_counter() - t0
    timings = {}
    t0 = time.perf_counter()
    res = tracker.track_sequence(tcfg, model, frames, shape_init=truth_shape, log=None, step_cache=cache,
                                 timings=timings)
    warm = time.perf_counter() - t0
    ev = tracker.evaluate_synthetic(res, samples, model)
    n = len(frames) - 1
    first = sum(v for k, v in timings.items() if k.startswith("first/"))
    later = sum(v for k, v in timings.items() if k.startswith("frame/")) / n
    out = {f"{label}_cold_s": cold, f"{label}_warm_s": warm, f"{label}_first_frame_s": first,
           f"{label}_frame_s": later, f"{label}_frames_per_s": 1.0 / later,
           f"{label}_vertex_median_mm": ev["vertex_median_mm"],
           f"{label}_vertex_aligned_median_mm": ev["vertex_aligned_median_mm"],
           f"{label}_landmark_error_px": ev["landmark_error_px"]}
    for k, v in sorted(timings.items()):
        kind, stage = k.split("/")
        out[f"{label}_{kind}_{stage.replace(' ', '')}_s"] = v if kind == "first" else v / n
    split = ", ".join(f"{k.split('/')[1]} {1e3 * v / n:.0f}" for k, v in sorted(timings.items())
                      if k.startswith("frame/"))
    log(f"  {label}: first pass {cold:.1f} s (compilation included), warm {warm:.1f} s; frame 0 {first:.2f} s; "
        f"later frames {later:.2f} s each ({1 / later:.2f} frames/s; ms: {split}); vertex median "
        f"{ev['vertex_median_mm']:.2f} mm, aligned {ev['vertex_aligned_median_mm']:.2f} mm")
    return out


def run(cfg, log=print) -> dict:
    """Runs the tracker bench (`cfg.track`, module docstring); returns flat results."""
    import jax

    from dhjax.capture import track_run
    c = cfg.track
    size, n_frames = int(c.size), int(c.n_frames)
    if size < 32 or n_frames < 2:
        raise ValueError(f"track.size must be >= 32 and track.n_frames >= 2, got {size}, {n_frames}")
    base = load_config(str(c.config))
    tcfg = config_lib.apply_overrides(base.tracker, {str(k): v for k, v in c.overrides})
    base.synthetic.update(sequences=(int(c.sequence),), n_frames=n_frames, width=size, height=size,
                          uv_size=int(c.uv_size))
    t0 = time.perf_counter()
    frames, samples, model = track_run.synthetic_sequence(base)
    tcfg.focal = float(samples[0]["K"][0, 0])          # a calibrated camera
    truth = np.asarray(samples[0]["shape"])
    out = {"track_config": str(c.config), "track_image": f"{size}x{size}", "track_frames": n_frames,
           "track_device": str(jax.devices()[0].platform), "track_data_s": time.perf_counter() - t0,
           "track_first_steps": int(tcfg.first.rigid_steps) + int(tcfg.first.landmark_steps) + sum(tcfg.first.steps),
           "track_frame_steps": int(tcfg.frame.landmark_steps) + sum(tcfg.frame.steps),
           "track_anchor_pytorch_gpu_s_per_frame": ANCHOR_PYTORCH_GPU_S_PER_FRAME}
    log(f"tracker {c.config}: {n_frames} synthetic frames of {size}x{size} (sequence {c.sequence}), "
        f"{out['track_first_steps']} steps on frame 0, {out['track_frame_steps']} per later frame; data "
        f"{out['track_data_s']:.1f} s")
    out.update(_track(tcfg, model, frames, samples, truth, "track", log))
    if bool(c.reference):
        ref = tcfg.copy_and_resolve_references()
        ref.visibility, ref.zbuffer, ref.zbuffer_tile = "host", "full", 8
        out.update(_track(ref, model, frames, samples, truth, "track_reference", log))
        out["track_speedup_vs_reference"] = out["track_reference_frame_s"] / out["track_frame_s"]
        out["track_cold_speedup_vs_reference"] = out["track_reference_cold_s"] / out["track_cold_s"]
        log(f"  later frames {out['track_speedup_vs_reference']:.2f}x faster than the reference, first pass "
            f"{out['track_cold_speedup_vs_reference']:.2f}x")
    log(f"  anchor (not measured): the PyTorch tracker, ~{ANCHOR_PYTORCH_GPU_S_PER_FRAME:.0f} s a frame on a GPU; "
        f"here {out['track_frame_s']:.2f} s a later frame on {out['track_device']}")
    return out
