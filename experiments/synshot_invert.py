"""Few-shot SynShot inversion: personal Gaussian avatar from N images (see configs/synshot_invert.py).

    python -m experiments.synshot_invert --config=configs/synshot_invert.py:tiny \
        --config.prior_workdir=runs/synshot --workdir=runs/synshot_invert

Writes: metrics.json (held-out L1 / PSNR / SSIM of the prior's encoder-only reconstruction, after
stage 1, after stage 2 = the inverted avatar, and of the same network trained from scratch on the
same images), renders.png (held-out views and expressions: ground truth, prior, inverted,
scratch), inputs.png (the input images and the extracted texture), avatar.ply (3DGS file of the
subject's neutral avatar, model space), checkpoints/ (the tuned parameters and the pivot code).
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax import io as dio
from dhjax.data import dataset as ds
from dhjax.models import flame
from dhjax.synthesis import synshot, synshot_data
from dhjax.synthesis import synshot_invert as inv
from dhjax.train import checkpoint as ckpt_lib
from dhjax.train import config as config_lib
from dhjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/synshot_invert.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def load_prior_config(prior_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(prior_dir, "config.json")
    if not prior_dir or not os.path.exists(path):
        raise FileNotFoundError(f"prior_workdir '{prior_dir}' holds no config.json: point --config.prior_workdir "
                                f"at the workdir of experiments.synshot_prior")
    cfg = ml_collections.ConfigDict(json.load(open(path)))
    if cfg.get("experiment") != "synshot_prior":
        raise ValueError(f"{path} belongs to experiment {cfg.get('experiment')!r}, not a SynShot prior")
    return cfg


def subject_samples(dataset: ds.FolderDataset, item: int):
    idx = [i for i, e in enumerate(dataset.entries) if e[3] == item]
    if not idx:
        raise ValueError(f"split '{dataset.split_dir}' has no item {item} (it has "
                         f"{len({e[3] for e in dataset.entries})} items)")
    return [dataset[i] for i in idx]


def split_inputs(samples, frame_ordinal: int, views):
    frames = sorted({int(s["frame"]) for s in samples})
    if not 0 <= frame_ordinal < len(frames):
        raise ValueError(f"data.input_frame {frame_ordinal} out of range: the subject has {len(frames)} frames")
    f = frames[frame_ordinal]
    chosen = [s for s in samples if int(s["frame"]) == f and int(s["view"]) in set(int(v) for v in views)]
    if len(chosen) != len(views):
        have = sorted(int(s["view"]) for s in samples if int(s["frame"]) == f)
        raise ValueError(f"data.input_views {tuple(views)} not all present in frame {f} (views: {have})")
    rest = [s for s in samples if not (int(s["frame"]) == f and int(s["view"]) in set(int(v) for v in views))]
    return chosen, rest


def main(argv):
    del argv
    cfg, work = _CONFIG.value, _WORKDIR.value
    loop.quiet_library_logs()
    os.makedirs(work, exist_ok=True)
    config_lib.save_config(cfg, work)
    t0 = time.time()
    prior_cfg = load_prior_config(cfg.prior_workdir)
    root = cfg.data.root or str(synshot_data.dataset_root(prior_cfg))
    samples = subject_samples(ds.FolderDataset(root, cfg.data.split), int(cfg.data.item))
    inputs, heldout = split_inputs(samples, int(cfg.data.input_frame), tuple(cfg.data.input_views))
    inv.check_subject(inputs)
    if cfg.data.max_heldout:
        heldout = heldout[: int(cfg.data.max_heldout)]
    model = flame.load()
    mc = prior_cfg.model
    S = int(mc.map_size)
    h, w = inputs[0]["image"].shape[:2]
    maps = inv.subject_maps(inputs, model, S, skin_only=bool(cfg.data.skin_only_texture))
    batch_in = inv.subject_batch(inputs, maps)
    held_maps = dict(maps, uv_expression_offset=inv.expression_maps_for(heldout, model, S)) if heldout else None
    batch_held = inv.subject_batch(heldout, held_maps) if heldout else None
    n = len(inputs)
    print(f"subject item {cfg.data.item} of {root}/{cfg.data.split}: {n} input images, {len(heldout)} held out; "
          f"texture seen in {float((maps['texture_weight'] > 0).mean()) * 100:.0f}% of the UV square", flush=True)

    assets = synshot.build_assets(mc)
    net = synshot.make_net(mc)
    template = synshot.init_state(jax.random.PRNGKey(0), net, assets, mc, prior_cfg.optim, batch_in)
    prior_state, _, prior_step = ckpt_lib.load_latest(cfg.prior_workdir, template)
    print(f"prior: {cfg.prior_workdir} step {prior_step}", flush=True)

    extra = None
    if cfg.arcface_path:
        from dhjax.io import onnx_weights

        _, arc_vars = onnx_weights.load_iresnet_onnx(cfg.arcface_path)
        extra = inv.arcface_loss(jax.tree_util.tree_map(jnp.asarray, arc_vars), model,
                                 id_weight=cfg.arcface.id_weight, feat_weight=cfg.arcface.feat_weight)
        print(f"ArcFace identity/feature terms on ({cfg.arcface_path})", flush=True)
    else:
        print("ArcFace terms off: no arcface_path given (an insightface ArcFace ONNX file turns them on)", flush=True)

    common = dict(net=net, assets=assets, model_cfg=mc, width=w, height=h)
    predict = jax.jit(functools.partial(synshot.predict, backend=cfg.backend, **common))

    def evaluate(state, q_id=None, batch=batch_held):
        if batch is None:
            return {}, None
        mb = synshot_data.model_batch(batch)
        q = None if q_id is None else jnp.broadcast_to(q_id[:1], (mb["image"].shape[0],) + q_id.shape[1:])
        image, _, _ = predict(state, mb, q_id=q)
        target = batch["image"] * batch["mask"][..., None]
        m = synshot.image_metrics(image, target)
        return {k: float(v) for k, v in m.items()}, np.asarray(image)

    lpips_fn = synshot_data.lpips_from_config(cfg.loss)
    stage_kw = dict(lpips_fn=lpips_fn, assets=assets, model_cfg=mc, loss_cfg=cfg.loss, optim_cfg=cfg.optim, width=w, height=h,
                    ema_decay=cfg.ema_decay, backend=cfg.backend, extra_loss=extra, seed=int(cfg.seed))
    results, renders = {}, {}
    results["prior"], renders["prior"] = evaluate(prior_state)
    print(f"prior encoder-only on held-out views: {results['prior']}", flush=True)
    s1 = int(cfg.stage1.steps_per_frame) * n
    s2 = int(cfg.stage2.steps_per_frame) * n
    state, info1 = inv.run_stage(prior_state, batch_in, stage=1, steps=s1, net=net, warmup=int(cfg.stage1.warmup),
                                 patience=int(cfg.stage1.patience), **stage_kw)
    results["stage1"], renders["stage1"] = evaluate(state)
    print(f"after stage 1 ({info1['steps']} steps): {results['stage1']}", flush=True)
    q_id = inv.frozen_code(state, synshot_data.model_batch(batch_in), net=net, assets=assets, model_cfg=mc)
    state, info2 = inv.run_stage(state, batch_in, stage=2, steps=s2, net=net, warmup=int(cfg.stage2.warmup),
                                 patience=int(cfg.stage2.patience), q_id=q_id, **stage_kw)
    results["inverted"], renders["inverted"] = evaluate(state, q_id)
    print(f"after stage 2 ({info2['steps']} steps): {results['inverted']}", flush=True)
    info = {"stage1": info1, "stage2": info2}
    if cfg.baselines:
        scratch = synshot.init_state(jax.random.PRNGKey(int(cfg.seed) + 1), net, assets, mc, prior_cfg.optim, batch_in)
        scratch, info0 = inv.run_stage(scratch, batch_in, stage=0, steps=s1 + s2, net=net,
                                       warmup=s1 + s2, patience=s1 + s2, **stage_kw)
        results["scratch"], renders["scratch"] = evaluate(scratch)
        info["scratch"] = info0
        print(f"from scratch ({info0['steps']} steps, same images): {results['scratch']}", flush=True)

    summary = {"n_inputs": n, "n_heldout": len(heldout), "prior_step": prior_step, "heldout": results,
               "stages": info, "seconds": time.time() - t0}
    with open(os.path.join(work, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    ck = ckpt_lib.Checkpointer(work, keep=1)
    ck.save(0, {"state": state, "q_id": q_id[:1]}, {"prior_workdir": os.path.abspath(cfg.prior_workdir)})
    ck.close()
    # pictures: inputs + extracted texture; held-out rows GT / prior / inverted (/ scratch)
    tex = np.asarray(maps["uv_albedo"])
    tex_img = np.asarray(jax.image.resize(tex, (h, w, 3), "linear"))
    dio.save_image(os.path.join(work, "inputs.png"),
                   np.clip(np.concatenate([s["image"] for s in inputs] + [tex_img], axis=1), 0, 1))
    if batch_held is not None:
        k = min(8, len(heldout))
        rows = [np.concatenate(list(batch_held["image"][:k] * batch_held["mask"][:k, ..., None]), axis=1)]
        rows += [np.concatenate(list(renders[name][:k]), axis=1) for name in ("prior", "inverted", "scratch")
                 if renders.get(name) is not None]
        dio.save_image(os.path.join(work, "renders.png"), np.clip(np.concatenate(rows, axis=0), 0, 1))
    neutral = dict(synshot_data.model_batch(batch_in))
    neutral = {k: v[:1] for k, v in neutral.items()}
    neutral["uv_expression_offset"] = np.zeros_like(neutral["uv_expression_offset"])
    _, _, out = predict(state, neutral, q_id=q_id[:1])
    g = synshot.export_gaussians(out)
    dio.save_gaussians_ply(os.path.join(work, "avatar.ply"), g["means"], g["quats"], g["scales"], g["opacities"],
                           g["sh"])
    print(json.dumps(results, indent=1))
    print(f"done in {time.time() - t0:.0f}s: {work}/renders.png, metrics.json, avatar.ply", flush=True)


if __name__ == "__main__":
    app.run(main)
