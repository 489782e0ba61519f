"""Random heads of a FLAME-layout model, coloured by region and rendered from a camera rig.

This is the foundation's demo (`python -m experiments.sample_heads`): it shows the default
head model's shape, expression and pose spaces. The synthetic-data generator builds richer
appearance (textures, hair, lighting variety) on the same model.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dhjax import io as dio
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import shading

# Albedo (linear RGB) of the region colouring.
SKIN_TONES = np.array([[0.93, 0.75, 0.62], [0.80, 0.58, 0.44], [0.62, 0.42, 0.30],
                       [0.45, 0.30, 0.21], [0.30, 0.20, 0.14]], np.float32)
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.55, 0.40, 0.22],
                         [0.75, 0.62, 0.40], [0.45, 0.18, 0.08], [0.6, 0.6, 0.6]], np.float32)
IRIS_COLOURS = np.array([[0.25, 0.14, 0.07], [0.2, 0.35, 0.55], [0.3, 0.42, 0.25]], np.float32)


def region_colors(key, model: flame.FlameModel, batch: int):
    """Per-vertex albedo [B, V, 3] from region masks: skin, hair on the scalp, lips, eyes.

    Needs a model with `regions` (the embedded default has them). The eyeballs get a white
    sclera, a coloured iris and a dark pupil from the angle to the eye's front pole.
    """
    if model.regions is None:
        raise ValueError(f"model {model.name!r} has no region masks; pass vertex colours instead")
    k1, k2, k3, k4 = jax.random.split(key, 4)
    skin = jnp.asarray(SKIN_TONES)[jax.random.randint(k1, (batch,), 0, len(SKIN_TONES))]
    skin = skin * jax.random.uniform(k4, (batch, 1), minval=0.92, maxval=1.08)
    hair = jnp.asarray(HAIR_COLOURS)[jax.random.randint(k2, (batch,), 0, len(HAIR_COLOURS))]
    iris = jnp.asarray(IRIS_COLOURS)[jax.random.randint(k3, (batch,), 0, len(IRIS_COLOURS))]
    r = {k: jnp.asarray(v, jnp.float32)[None, :, None] for k, v in model.regions.items()}
    col = jnp.broadcast_to(skin[:, None], (batch, model.num_vertices, 3))
    col = col * (1 - r["scalp"]) + hair[:, None] * r["scalp"]
    col = col * (1 - r["lips"]) + (skin[:, None] * jnp.array([0.85, 0.55, 0.55])) * r["lips"]
    # Eyes: angle from the eyeball's front pole, using the rest template around each eye joint.
    joints = jnp.einsum("jv,vc->jc", model.j_regressor, model.v_template)
    eye_w = model.lbs_weights[:, 3:5]
    centre = eye_w @ joints[3:5] + (1 - eye_w.sum(1, keepdims=True)) * model.v_template
    d = model.v_template - centre
    cosang = d[:, 2] / jnp.maximum(jnp.linalg.norm(d, axis=1), 1e-9)
    eye_col = jnp.where(cosang[None, :, None] > 0.96, 0.03,
                        jnp.where(cosang[None, :, None] > 0.82, iris[:, None], 0.9))
    return col * (1 - r["eyes"]) + eye_col * r["eyes"]


def random_sh_lights(key, batch: int, ambient: float = 2.6, strength: float = 1.3):
    """Radiance SH [B, 9, 3]: ambient + a random frontal-ish key light, slightly tinted."""
    k1, k2 = jax.random.split(key)
    direction = jnp.array([0.0, 0.3, 1.0]) + 0.6 * jax.random.normal(k1, (batch, 3))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    tint = jax.random.uniform(k2, (batch, 1, 3), minval=0.9, maxval=1.1)
    sh = jnp.zeros((batch, 9, 3))
    sh = sh.at[:, 0].set(ambient)
    # Band-1 coefficients (y, z, x order of dhjax.render.shading.sh_basis) point the light.
    sh = sh.at[:, 1].set(strength * direction[:, 1:2]).at[:, 2].set(strength * direction[:, 2:3])
    sh = sh.at[:, 3].set(strength * direction[:, 0:1])
    return sh * tint


def sample_and_render(key, model: flame.FlameModel, num_heads: int, cameras: camera_lib.Camera,
                      *, shape_std=1.0, expression_std=1.0, jaw_open_max=0.35,
                      global_std=0.15, background=(1.0, 1.0, 1.0)):
    """Samples heads and renders each from every camera of a rig.

    Args:
      key: PRNG key; model: FlameModel with region masks; num_heads: B;
      cameras: Camera with batch shape [C].
    Returns:
      dict with params (shape/expression/pose), vertices [B, V, 3], colors [B, V, 3],
      images [B, C, H, W, 3] in [0, 1], masks [B, C, H, W, 1].
    """
    kp, kc, kl = jax.random.split(key, 3)
    params = flame.sample_parameters(kp, num_heads, n_shape=model.num_shape,
                                     n_expression=model.num_expression, shape_std=shape_std,
                                     expression_std=expression_std, jaw_open_max=jaw_open_max,
                                     global_std=global_std)
    out = flame.forward(model, params["shape"], params["expression"], params["pose"])
    colors = region_colors(kc, model, num_heads)
    sh = random_sh_lights(kl, num_heads)
    images, masks = [], []
    for c in range(cameras.batch_shape[0]):
        r = shading.render_mesh(out.vertices, model.faces, cameras[c], vertex_colors=colors,
                                sh_coeffs=sh, background=jnp.asarray(background, jnp.float32))
        images.append(jnp.clip(r["image"], 0.0, 1.0))
        masks.append(r["mask"])
    return dict(params=params, vertices=out.vertices, landmarks=out.landmarks, colors=colors,
                images=jnp.stack(images, 1), masks=jnp.stack(masks, 1))


def write(cfg, workdir, log=print) -> dict:
    """Samples cfg.num_heads heads, renders them from the rig of cfg and writes into workdir:
    grid.png (rows: heads, columns: views), meshes/head_XXX.obj (with UVs and vertex colours, when
    cfg.write_meshes), params/head_XXX.npz + .json (shape, expression, pose [5, 3] axis-angle) and
    summary.json. Returns the summary ({num_heads, num_views, grid, seconds}).

    cfg (configs/sample_heads.py): seed, num_heads, flame_path ("" = embedded default head),
    image_size (pixels), fov_y_deg, camera_distance (metres), view_azimuths_deg,
    view_elevation_deg, shape_std, expression_std, jaw_open_max and global_std (radians),
    write_meshes.
    """
    t0 = time.time()
    model = flame.load(cfg.flame_path or None)
    log(f"model: {model.name}  V={model.num_vertices} F={model.faces.shape[0]}")
    cams = camera_lib.rig_from_angles(cfg.view_azimuths_deg, cfg.view_elevation_deg,
                                      cfg.camera_distance, target=(0.0, -0.02, 0.0),
                                      fov_y_deg=cfg.fov_y_deg, width=cfg.image_size,
                                      height=cfg.image_size)
    res = sample_and_render(
        jax.random.PRNGKey(cfg.seed), model, cfg.num_heads, cams, shape_std=cfg.shape_std,
        expression_std=cfg.expression_std, jaw_open_max=cfg.jaw_open_max,
        global_std=cfg.global_std)
    images = np.asarray(res["images"])                      # [B, C, H, W, 3]
    B, C = images.shape[:2]
    grid = dio.image_grid(images.reshape((B * C,) + images.shape[2:]), ncols=C)
    grid_path = os.path.join(workdir, "grid.png")
    dio.save_image(grid_path, grid)
    log(f"rendered {B} heads x {C} views in {time.time() - t0:.1f}s -> {grid_path}")
    for b in range(B):
        stem = f"head_{b:03d}"
        if cfg.write_meshes:
            dio.save_obj(os.path.join(workdir, "meshes", stem + ".obj"),
                         np.asarray(res["vertices"][b]), np.asarray(model.faces),
                         uv_coords=None if model.uv_coords is None else np.asarray(model.uv_coords),
                         uv_faces=None if model.uv_faces is None else np.asarray(model.uv_faces),
                         vertex_colors=np.asarray(res["colors"][b]))
        dio.save_params(os.path.join(workdir, "params", stem),
                        {k: np.asarray(v[b]) for k, v in res["params"].items()},
                        meta={"model": model.name, "seed": cfg.seed, "index": b,
                              "pose": "axis-angle [5,3]: global, neck, jaw, left eye, right eye"})
    summary = {"num_heads": B, "num_views": C, "grid": "grid.png", "seconds": round(time.time() - t0, 2)}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"wrote meshes/ params/ summary.json in {workdir}")
    return summary
