"""Registers the head model to 3D scans through the shared harness.

    python -m experiments.register_flame --config=configs/register_flame.py:tiny --workdir=/tmp/reg

Writes into the workdir: params/<scan>.npz + .json (shape, expression, pose, rigid transform,
offsets), meshes/<scan>.obj (registered surfaces in the scan's frame), report.json and
report.md (per-scan distance from every scan point to the registered surface, mm; for
synthetic scans also the error against the ground-truth surface), plus the harness's
checkpoints, TensorBoard logs, metrics.jsonl and final_metrics.json.
"""

import glob
import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax import io as dio
from dhjax.capture import registration
from dhjax.models import flame
from dhjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/register_flame.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (resumes if it holds a run)", required=True)

MESH_SUFFIXES = (".obj", ".ply")


class FixedBatch:
    """Registration optimises all scans at every step: the batch is the same each time."""

    def __init__(self, batch):
        self.batch = batch

    def get_batch(self, step):
        del step
        return self.batch


def load_scans(cfg):
    """Returns (names, scans, ground truth or None). Unreadable scans are reported and skipped."""
    d = cfg.data
    if not d.scans_dir:
        model = flame.load(cfg.flame_path or None)
        scans, gt = registration.synthesize_scans(
            jax.random.PRNGKey(cfg.seed + 1), model, d.synthetic.n_scans,
            noise_mm=d.synthetic.noise_mm, points_per_scan=d.synthetic.points_per_scan)
        return [f"synthetic_{i:03d}" for i in range(len(scans))], scans, gt
    paths = sorted(p for p in glob.glob(os.path.join(d.scans_dir, "*"))
                   if p.lower().endswith(MESH_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"no .obj/.ply scans in '{d.scans_dir}'")
    names, scans = [], []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        lmk = None
        if d.landmarks_dir:
            found = [p for p in (os.path.join(d.landmarks_dir, stem + s) for s in (".txt", ".npz"))
                     if os.path.exists(p)]
            lmk = found[0] if found else None
        try:
            scans.append(registration.load_scan(path, unit_scale=d.unit_scale, landmarks_path=lmk))
            names.append(stem)
        except (ValueError, OSError) as err:
            print(f"skipping scan {path}: {err}", flush=True)
    if not scans:
        raise ValueError(f"none of the {len(paths)} scans in '{d.scans_dir}' could be read")
    return names, scans, None


def pad_to_devices(scans):
    """Repeats the last scan so the scan axis divides by the device count (dropped on output)."""
    n_dev = jax.device_count()
    extra = (-len(scans)) % n_dev
    return list(scans) + [scans[-1]] * extra


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    loop.quiet_library_logs()
    loop.init_distributed()
    model = flame.load(cfg.flame_path or None, landmarks=cfg.flame_landmarks or None)
    names, scans, gt = load_scans(cfg)
    print(f"{len(scans)} scans, model {model.name}, {jax.device_count()} devices", flush=True)
    batch = registration.pad_scans(pad_to_devices(scans), cfg.registration.n_points, seed=cfg.seed)
    method = registration.make_method(model, cfg)
    result = loop.train(cfg, workdir, method, FixedBatch(batch), eval_batch=batch)
    if jax.process_index() != 0:
        return
    S = len(scans)
    params = registration.export_parameters(result.state)
    verts = np.asarray(registration.registered_vertices(result.state, model))[:S]
    report = registration.residual_report(result.state, batch, model)
    rows = []
    for i, name in enumerate(names):
        dio.save_params(os.path.join(workdir, "params", name), {k: v[i] for k, v in params.items()},
                        meta={"scan": name, "model": model.name, "units": "metres"})
        dio.save_obj(os.path.join(workdir, "meshes", name + ".obj"), verts[i], np.asarray(model.faces))
        row = {"scan": name, **{k: float(report[k][i]) for k in ("median_mm", "mean_mm", "p90_mm", "max_mm")}}
        if gt is not None:
            # Ground-truth surface (face region) to the registered surface, and vertex-to-vertex
            # (which also counts sliding along the surface).
            face = np.asarray(model.regions["face"]) if model.regions else slice(None)
            d, _, _ = registration.point_to_surface_distances(
                np.asarray(gt["vertices"][i])[face], verts[i], np.asarray(model.faces))
            row["gt_surface_median_mm"] = float(np.median(np.asarray(d)) * 1000.0)
            err = np.linalg.norm(verts[i] - np.asarray(gt["vertices"][i]), axis=1) * 1000.0
            row["gt_vertex_median_mm"] = float(np.median(err))
        rows.append(row)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(rows, f, indent=2)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] if isinstance(r[k], str) else f"{r[k]:.3f}" for k in keys) + " |"
              for r in rows]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    summary = {"scan_median_mm": float(np.median([r["median_mm"] for r in rows]))}
    if gt is not None:
        summary["gt_surface_median_mm"] = float(np.median([r["gt_surface_median_mm"] for r in rows]))
        summary["gt_vertex_median_mm"] = float(np.median([r["gt_vertex_median_mm"] for r in rows]))
    final_path = os.path.join(workdir, "final_metrics.json")
    final = json.load(open(final_path)) if os.path.exists(final_path) else {}
    final.update(summary)
    with open(final_path, "w") as f:
        json.dump(final, f, indent=2, sort_keys=True)
    print(f"wrote params/, meshes/, report.md in {workdir}: {summary}", flush=True)


if __name__ == "__main__":
    app.run(main)
