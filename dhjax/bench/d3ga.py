"""D3GA benchmark: frames/s of a posed render of an avatar (posing the cages, the per-part MLPs,
appearance, splatting) on the current device, and its parts (no timed assertions anywhere).

Setting: the default body at its mean shape in a shirt and trousers, parts built by
`d3ga_data.build_parts` with the given Gaussian counts and cage spacings, freshly initialised
parameters (the cost does not depend on the weights), a walking pose, one camera of the dome at
`width` x `height`. For each setting ("tiny": the tiny config's cages and 7.2k Gaussians with
MLPs of width 64 at 96 x 128; "paper": 2.5 cm / 2 cm cages, 48k Gaussians, width 128 at
667 x 1024): s/frame and frames/s of the full render, of the posing alone (cages, MLPs,
covariances) and of the splat alone.
"""

from __future__ import annotations

import ml_collections
import numpy as np

import jax
import jax.numpy as jnp

from dhjax.bench.timing import time_call
from dhjax.data import body_synthetic
from dhjax.models import body as body_lib
from dhjax.render import splat
from dhjax.synthesis import d3ga, d3ga_data

SETTINGS = {
    "tiny": dict(body_spacing=0.03, shell_radius=0.025, shell_spacing=0.021,
                 n_gaussians=dict(body=3000, face=600, upper=1800, lower=1800), hidden=64, width=96, height=128),
    "paper": dict(body_spacing=0.025, shell_radius=0.02, shell_spacing=0.015,
                  n_gaussians=dict(body=20000, face=4000, upper=12000, lower=12000), hidden=128, width=667,
                  height=1024),
}


def default_config() -> ml_collections.ConfigDict:
    """settings (names of SETTINGS), repeats, warmup, backend (splatting)."""
    return ml_collections.ConfigDict(dict(settings=("tiny", "paper"), repeats=5, warmup=2, backend="auto"))


def run(cfg, log=print) -> dict:
    """Times D3GA renders; returns {name: value}.

    cfg: d3ga (`default_config`). Keys per setting S: d3ga_<S>_gaussians, _tets, _parameters,
    _megabytes (the avatar's size, frame embeddings of one frame), _render_s, _render_fps,
    _pose_s, _splat_s.
    """
    c = cfg.d3ga
    model = body_lib.load()
    betas = np.zeros(model.num_shape, np.float32)
    limits = np.asarray(model.joint_limits)
    motion = body_synthetic.motion_sequence("walk", body_synthetic.key(0, body_synthetic.STREAM_MOTION, 0), 8, 30.0,
                                            limits)
    pose, trans = motion["pose"][4], motion["translation"][4]
    kp = body_lib.forward(model, jnp.asarray(betas)[None], None, jnp.asarray(pose)[None],
                          jnp.asarray(trans)[None]).keypoints[0]
    frame = {"pose": jnp.asarray(pose), "translation": jnp.asarray(trans), "keypoints": kp}
    results = {"device": str(jax.devices()[0])}
    for name in c.settings:
        if name not in SETTINGS:
            raise ValueError(f"d3ga.settings: unknown setting {name!r}; available: {tuple(SETTINGS)}")
        s = SETTINGS[name]
        pc = d3ga_data.default_parts_config()
        pc.update(body_spacing=s["body_spacing"], shell_radius=s["shell_radius"], shell_spacing=s["shell_spacing"],
                  n_gaussians=s["n_gaussians"])
        parts = d3ga_data.build_parts(model, betas, "shirt", "trousers", pc)
        mc = d3ga.default_model_config()
        mc.hidden = s["hidden"]
        ctx = d3ga.make_context(parts, d3ga_data.rest_joints(model, betas), model.parents, n_frames=1,
                                face_mean=np.zeros((51, 3)), face_std=np.ones((51, 3)), model_cfg=mc)
        params = d3ga.init_params(jax.random.PRNGKey(0), ctx)
        dome = body_synthetic.dome_cameras(6, s["width"], s["height"], radius=3.2, fov_y_deg=42.0,
                                           elevations_deg=(0.0, 30.0), target=(0.0, -0.05, 0.0))
        cam = dome[np.asarray([0])]
        bg = jnp.ones(3)
        render = jax.jit(lambda p, fr: d3ga.render(p, ctx, fr, cam, bg, backend=c.backend)["image"])
        pose_fn = jax.jit(lambda p, fr: d3ga.posed_avatar(p, ctx, fr)["covariances"])
        av = jax.jit(lambda p, fr: d3ga.posed_avatar(p, ctx, fr))(params, frame)
        N = av["means"].shape[0]
        col = jnp.full((1, N, 3), 0.5)
        splat_fn = jax.jit(lambda m, cv: splat.rasterize(m, jnp.zeros((N, 4)).at[:, 0].set(1.0), jnp.ones((N, 3)),
                                                         jnp.full((N,), 0.8), col, cam, covariances=cv,
                                                         backend=c.backend).image)
        t_render = time_call(lambda: jax.block_until_ready(render(params, frame)), c.repeats, c.warmup)
        t_pose = time_call(lambda: jax.block_until_ready(pose_fn(params, frame)), c.repeats, c.warmup)
        t_splat = time_call(lambda: jax.block_until_ready(splat_fn(av["means"], av["covariances"])), c.repeats,
                            c.warmup)
        tets = sum(int(p["stats"]["tets"]) for p in parts)
        key = f"d3ga_{name}"
        size = d3ga.size_table(params)
        results.update({f"{key}_parameters": size["parameters"], f"{key}_megabytes": size["megabytes"]})
        results.update({f"{key}_gaussians": N, f"{key}_tets": tets, f"{key}_render_s": t_render,
                        f"{key}_render_fps": 1.0 / t_render, f"{key}_pose_s": t_pose, f"{key}_splat_s": t_splat,
                        f"{key}_size": f"{s['width']}x{s['height']}"})
        log(f"d3ga {name}: {N} Gaussians, {tets} tets, {size['parameters']} parameters ({size['megabytes']:.1f} MB), "
            f"{s['width']}x{s['height']}: render {t_render * 1e3:.1f} ms "
            f"({1.0 / t_render:.1f} frames/s); posing {t_pose * 1e3:.1f} ms, splat {t_splat * 1e3:.1f} ms")
    return results
