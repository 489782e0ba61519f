"""Generates synthetic head datasets and a contact sheet (see configs/make_synthetic.py).

    python -m experiments.make_synthetic --config=configs/make_synthetic.py:tiny --workdir=/tmp/syn
"""

import json
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dhjax import io as dio
from dhjax.data import dataset as ds
from dhjax.data import synthetic

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/make_synthetic.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (created)", required=True)


def contact_sheet_samples(cfg, multiview, video):
    """The samples of the contact sheet: identities x rig cameras, then video frames."""
    sh = cfg.sheet
    samples = []
    for i in range(int(sh.n_identities)):
        samples += multiview.render_group(i, 0, [c for c in sh.cameras if c < multiview.n_cameras])
    for s in range(int(sh.video_sequences)):
        n = int(sh.video_frames)
        step = max(video.n_frames // n, 1)
        samples += [video[s * video.n_frames + t] for t in range(0, step * n, step)][:n]
    return samples


def main(argv):
    del argv
    cfg = _CONFIG.value
    work = _WORKDIR.value
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    t0 = time.time()
    assets = synthetic.build_assets(None, int(cfg.uv_size))
    multiview = synthetic.MultiviewGenerator(cfg, assets)
    video = synthetic.VideoGenerator(cfg, assets)
    print(f"assets ready in {time.time() - t0:.1f}s: {multiview.n_items} identities x "
          f"{multiview.n_frames} expressions x {multiview.n_cameras} cameras, {video.n_items} videos "
          f"x {video.n_frames} frames", flush=True)
    summary = {"seed": int(cfg.seed), "shard": [int(cfg.shard_index), int(cfg.shard_count)]}
    meta = {"generator": json.loads(cfg.to_json_best_effort()), "model": assets.model.name}
    for name, gen, on in (("multiview", multiview, cfg.write_multiview), ("video", video, cfg.write_video)):
        if not on or len(gen) == 0:
            continue
        t1 = time.time()
        # whole items per host: no two hosts write the same identity's or sequence's files
        idx = ds.shard_indices(len(gen), int(cfg.shard_index), int(cfg.shard_count),
                               group=gen.n_frames * gen.n_cameras)
        ds.write_dataset(gen, os.path.join(work, name), "train", indices=idx, meta=meta,
                         shard=(int(cfg.shard_index), int(cfg.shard_count)) if cfg.shard_count > 1 else None)
        dt = time.time() - t1
        summary[name] = {"images": len(idx), "seconds": round(dt, 1), "path": name}
        print(f"{name}: wrote {len(idx)} images in {dt:.1f}s ({len(idx) / dt:.1f} images/s) "
              f"-> {os.path.join(work, name)}", flush=True)
    samples = contact_sheet_samples(cfg, multiview, video)
    ncols = len(cfg.sheet.cameras)
    images = np.stack([s["image"] for s in samples])
    dio.save_image(os.path.join(work, "contact_sheet.png"), ds.contact_sheet(images, ncols))
    labels = np.stack([ds.colorize_seg(s["seg"]) for s in samples])
    dio.save_image(os.path.join(work, "contact_sheet_labels.png"), ds.contact_sheet(labels, ncols))
    summary["contact_sheet"] = {"images": len(samples), "path": "contact_sheet.png"}
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"contact sheet of {len(samples)} samples -> {os.path.join(work, 'contact_sheet.png')} "
          f"(total {summary['seconds']}s)", flush=True)


if __name__ == "__main__":
    app.run(main)
