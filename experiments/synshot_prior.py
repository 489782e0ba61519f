"""Trains the SynShot prior (VQ-VAE Gaussian head avatars) on synthetic multi-view heads.

    python -m experiments.synshot_prior --config=configs/synshot_prior.py:tiny --workdir=runs/synshot

Writes into the workdir: checkpoints/ (resumable), TensorBoard events and metrics.jsonl,
final_metrics.json (training metrics + held-out metrics + the mean-image baseline),
heldout_metrics.json, heldout_grid.png (held-out identities: ground truth above the render, for
several views and both expressions), avatar_heldout0.ply (the first held-out identity's
Gaussians in 3DGS layout, model space) and config.json.
"""

import json
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from dhjax import io as dio
from dhjax.synthesis import synshot
from dhjax.synthesis import synshot_data
from dhjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/synshot_prior.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created; resumed when it holds checkpoints)",
                               required=True)


def main(argv):
    del argv
    cfg, work = _CONFIG.value, _WORKDIR.value
    loop.init_distributed()
    loop.quiet_library_logs()
    lead = jax.process_index() == 0
    t0 = time.time()
    root = synshot_data.dataset_root(cfg)
    train_ds = synshot_data.open_split(root, "train", in_memory=cfg.data.in_memory)
    test_ds = synshot_data.open_split(root, "test", in_memory=cfg.data.in_memory)
    width, height = synshot_data.image_size(train_ds)
    assets = synshot.build_assets(cfg.model)
    if lead:
        print(f"data {root}: {len(train_ds)} training / {len(test_ds)} held-out images of {width}x{height}; "
              f"{assets.n_gaussians} Gaussians per avatar "
              f"({', '.join(f'{p.name} {p.count}' for p in assets.parts)}); devices: {jax.device_count()}",
              flush=True)
    lpips_fn = synshot_data.lpips_from_config(cfg.loss, log=print if lead else None)
    method = loop.Method(*synshot_data.prior_functions(cfg, assets, width, height, lpips_fn=lpips_fn))
    pipeline = synshot_data.pipeline(train_ds, cfg.batch_size, seed=cfg.seed)
    eval_batch = synshot_data.eval_batch(test_ds, int(cfg.eval.n_images), jax.device_count())
    result = loop.train(cfg, work, method, pipeline, eval_batch=eval_batch)
    if result.interrupted:
        return
    state = result.state
    predict = synshot_data.predictor(cfg, assets, width, height)
    metrics = synshot_data.heldout_metrics(predict, state, train_ds, test_ds, int(cfg.eval.batch_size),
                                           max_images=int(cfg.eval.max_test_images), devices=jax.device_count())
    if lead:
        final_path = os.path.join(work, "final_metrics.json")
        final = json.load(open(final_path)) if os.path.exists(final_path) else {}
        final.update({f"heldout/{k}": v for k, v in metrics.items()})
        with open(final_path, "w") as f:
            json.dump(final, f, indent=2, sort_keys=True)
        with open(os.path.join(work, "heldout_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        grid = synshot_data.heldout_grid(predict, state, test_ds, int(cfg.eval.grid_identities),
                                         tuple(cfg.eval.grid_views))
        dio.save_image(os.path.join(work, "heldout_grid.png"), grid)
        sample = synshot_data.stack([test_ds[0]])
        _, _, out = predict(state, sample)
        g = synshot.export_gaussians(out)
        dio.save_gaussians_ply(os.path.join(work, "avatar_heldout0.ply"), g["means"], g["quats"], g["scales"],
                               g["opacities"], g["sh"])
        print(synshot_data.format_metrics(metrics), flush=True)
        print(f"done in {time.time() - t0:.0f}s: {work}/heldout_grid.png, final_metrics.json", flush=True)


if __name__ == "__main__":
    app.run(main)
