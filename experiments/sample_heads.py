"""Samples random heads of the default model and renders them (the foundation's demo).

    python -m experiments.sample_heads --config=configs/sample_heads.py --workdir=/tmp/heads
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax import io as dio
from dhjax.data import head_samples
from dhjax.models import flame
from dhjax.render import camera as camera_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sample_heads.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def main(argv):
    del argv
    cfg = _CONFIG.value
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    t0 = time.time()
    model = flame.load(cfg.flame_path or None)
    print(f"model: {model.name}  V={model.num_vertices} F={model.faces.shape[0]}", flush=True)
    cams = camera_lib.rig_from_angles(cfg.view_azimuths_deg, cfg.view_elevation_deg,
                                      cfg.camera_distance, target=(0.0, -0.02, 0.0),
                                      fov_y_deg=cfg.fov_y_deg, width=cfg.image_size,
                                      height=cfg.image_size)
    res = head_samples.sample_and_render(
        jax.random.PRNGKey(cfg.seed), model, cfg.num_heads, cams, shape_std=cfg.shape_std,
        expression_std=cfg.expression_std, jaw_open_max=cfg.jaw_open_max,
        global_std=cfg.global_std)
    images = np.asarray(res["images"])                      # [B, C, H, W, 3]
    B, C = images.shape[:2]
    grid = dio.image_grid(images.reshape((B * C,) + images.shape[2:]), ncols=C)
    grid_path = os.path.join(_WORKDIR.value, "grid.png")
    dio.save_image(grid_path, grid)
    print(f"rendered {B} heads x {C} views in {time.time() - t0:.1f}s -> {grid_path}", flush=True)
    for b in range(B):
        stem = f"head_{b:03d}"
        if cfg.write_meshes:
            dio.save_obj(os.path.join(_WORKDIR.value, "meshes", stem + ".obj"),
                         np.asarray(res["vertices"][b]), np.asarray(model.faces),
                         uv_coords=None if model.uv_coords is None else np.asarray(model.uv_coords),
                         uv_faces=None if model.uv_faces is None else np.asarray(model.uv_faces),
                         vertex_colors=np.asarray(res["colors"][b]))
        dio.save_params(os.path.join(_WORKDIR.value, "params", stem),
                        {k: np.asarray(v[b]) for k, v in res["params"].items()},
                        meta={"model": model.name, "seed": cfg.seed, "index": b,
                              "pose": "axis-angle [5,3]: global, neck, jaw, left eye, right eye"})
    with open(os.path.join(_WORKDIR.value, "summary.json"), "w") as f:
        json.dump({"num_heads": B, "num_views": C, "grid": "grid.png",
                   "seconds": round(time.time() - t0, 2)}, f, indent=2)
    print(f"wrote meshes/ params/ summary.json in {_WORKDIR.value}", flush=True)


if __name__ == "__main__":
    app.run(main)
