"""A whole registration run: scans from `cfg.data`, the method trained by the shared harness, and
the per-scan outputs (the library side of `experiments.register_flame`).

    result = registration_run.run(cfg, workdir)      # cfg: configs/register_flame.py

Writes into the workdir: params/<scan>.npz + .json (shape, expression, pose, rigid transform,
offsets), meshes/<scan>.obj (registered surfaces in the scan's frame), report.json and
report.md (per scan: distance from every scan point to the registered surface in mm, median /
mean / p90 / max; for synthetic scans also the median distance from the ground-truth face
region to the registered surface and the median vertex-to-vertex error), the harness's
checkpoints, TensorBoard logs and metrics.jsonl, and final_metrics.json (the harness's metrics
plus the medians over scans: scan_median_mm, and for synthetic scans gt_surface_median_mm and
gt_vertex_median_mm).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import numpy as np

from dhjax import io as dio
from dhjax.capture import registration, registration_scans, registration_surface
from dhjax.models import flame
from dhjax.train import app, loop

__all__ = ["FixedBatch", "pad_to_devices", "scan_rows", "summarize", "RunResult", "run"]

REPORT_KEYS = ("median_mm", "mean_mm", "p90_mm", "max_mm")


class FixedBatch:
    """The harness's dataset for registration: all scans at every step, so every step gets the
    same batch."""

    def __init__(self, batch):
        self.batch = batch

    def get_batch(self, step):
        """The same batch at every step."""
        del step
        return self.batch


def pad_to_devices(scans: list) -> list:
    """Repeats the last scan so the scan axis divides by the device count (the repeats are
    dropped from the outputs)."""
    n_dev = jax.device_count()
    extra = (-len(scans)) % n_dev
    return list(scans) + [scans[-1]] * extra


def scan_rows(names, report: dict, verts: np.ndarray, model: flame.FlameModel, gt=None) -> list[dict]:
    """One report row per scan.

    Args:
      names: [S] scan names. report: `residual_report` output (arrays of at least S rows).
      verts: [S, V, 3] registered vertices, metres. model: the FlameModel fitted.
      gt: `synthesize_scans` ground truth (vertices [S, V, 3] metres) or None.
    Returns:
      [{'scan', 'median_mm', 'mean_mm', 'p90_mm', 'max_mm'} plus, with gt,
      'gt_surface_median_mm' (ground-truth face region -> registered surface) and
      'gt_vertex_median_mm' (vertex to vertex, which also counts sliding along the surface)].
    """
    rows = []
    faces = np.asarray(model.faces)
    face = np.asarray(model.regions["face"]) if model.regions else slice(None)
    for i, name in enumerate(names):
        row = {"scan": name, **{k: float(report[k][i]) for k in REPORT_KEYS}}
        if gt is not None:
            gt_verts = np.asarray(gt["vertices"][i])
            d, _, _ = registration_surface.point_to_surface_distances(gt_verts[face], verts[i], faces)
            row["gt_surface_median_mm"] = float(np.median(np.asarray(d)) * registration_surface.MM)
            err = np.linalg.norm(verts[i] - gt_verts, axis=1) * registration_surface.MM
            row["gt_vertex_median_mm"] = float(np.median(err))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Medians over scans of the rows' median_mm (as scan_median_mm) and, when present,
    gt_surface_median_mm and gt_vertex_median_mm."""
    out = {"scan_median_mm": float(np.median([r["median_mm"] for r in rows]))}
    for key in ("gt_surface_median_mm", "gt_vertex_median_mm"):
        if rows and key in rows[0]:
            out[key] = float(np.median([r[key] for r in rows]))
    return out


class RunResult(NamedTuple):
    """What `run` returns: the harness's result, the per-scan rows and their summary."""
    train: loop.TrainResult   # the harness's result (final state, metrics)
    rows: list                # `scan_rows` (empty on processes other than the lead)
    summary: dict             # `summarize` (empty on processes other than the lead)


def check_config(cfg) -> None:
    """Raises ValueError naming the field for a setting that cannot work, before anything is
    written (also what experiments.sweep checks on every variant): the synthetic scans'
    settings when data.scans_dir is empty (`registration_scans.check_synthetic`)."""
    if not cfg.data.scans_dir:
        registration_scans.check_synthetic(cfg.data)


def run(cfg, workdir: str) -> RunResult:
    """Registers the head model to the scans of `cfg.data` and writes the outputs listed in the
    module docstring.

    Args:
      cfg: a `configs/register_flame.py` config (flame_path, flame_landmarks, seed, data,
        registration, train). workdir: output folder (a run in it is resumed).
    Raises:
      FileNotFoundError / ValueError: no readable scans, bad config (see `load_scans`,
      `registration.make_static`).
    """
    app.check_experiment(cfg, "register_flame")
    check_config(cfg)
    r = app.start(workdir, cfg)
    model = flame.load(cfg.flame_path or None, landmarks=cfg.flame_landmarks or None)
    names, scans, gt = registration_scans.load_scans(cfg.data, model, seed=cfg.seed)
    r.log(f"{len(scans)} scans, model {model.name}, {jax.device_count()} devices")
    batch = registration_scans.pad_scans(pad_to_devices(scans), cfg.registration.n_points, seed=cfg.seed)
    method = registration.make_method(model, cfg)
    shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0), batch)
    r.log(app.parameter_overview(shapes["params"]))
    result = loop.train(cfg, workdir, method, FixedBatch(batch), eval_batch=batch)
    if not r.lead:
        return RunResult(result, [], {})
    S = len(scans)
    params = registration_surface.export_parameters(result.state)
    verts = np.asarray(registration_surface.registered_vertices(result.state, model))[:S]
    report = registration_surface.residual_report(result.state, batch, model)
    rows = scan_rows(names, report, verts, model, gt)
    for i, name in enumerate(names):
        dio.save_params(r.path("params", name), {k: v[i] for k, v in params.items()},
                        meta={"scan": name, "model": model.name, "units": "metres"})
        dio.save_obj(r.path("meshes", name + ".obj"), verts[i], np.asarray(model.faces))
    r.path("report.json").write_text(json.dumps(rows, indent=2))
    table = app.markdown_table(rows)
    r.path("report.md").write_text(table)
    r.log(table, end="")
    summary = summarize(rows)
    app.merge_final_metrics(workdir, summary)
    r.log(f"summary: {summary}")
    r.done("params/", "meshes/", "report.json", "report.md", "final_metrics.json")
    return RunResult(result, rows, summary)
