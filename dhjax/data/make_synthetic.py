"""Writes synthetic datasets to disk in the layout of `dhjax.data.dataset`, plus a contact sheet:
the multi-view identity set and the monocular videos of heads (`dhjax.data.synthetic`), or the
multi-view video of clothed bodies (`dhjax.data.body_synthetic`, a config with kind="bodies").

    summary = make_synthetic.write(cfg, "/tmp/syn")     # cfg: configs/make_synthetic.py[:bodies]
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from dhjax import io as dio
from dhjax.data import dataset as ds
from dhjax.data import synthetic


def contact_sheet_samples(cfg, multiview, video) -> list[dict]:
    """The samples of the contact sheet: cfg.sheet.n_identities identities x cfg.sheet.cameras
    (those the rig has), then cfg.sheet.video_frames evenly spaced frames of each of the first
    cfg.sheet.video_sequences videos."""
    sh = cfg.sheet
    samples = []
    for i in range(int(sh.n_identities)):
        samples += multiview.render_group(i, 0, [c for c in sh.cameras if c < multiview.n_cameras])
    for s in range(int(sh.video_sequences)):
        n = int(sh.video_frames)
        step = max(video.n_frames // n, 1)
        samples += [video[s * video.n_frames + t] for t in range(0, step * n, step)][:n]
    return samples


def _write_sheets(workdir, samples, ncols: int, name: str, labels_name: str) -> dict:
    """Writes the samples' images and part labels as two contact sheets; returns the summary entry."""
    dio.save_image(os.path.join(workdir, name), ds.contact_sheet(np.stack([s["image"] for s in samples]), ncols))
    dio.save_image(os.path.join(workdir, labels_name),
                   ds.contact_sheet(np.stack([ds.colorize_seg(s["seg"]) for s in samples]), ncols))
    return {"images": len(samples), "path": name}


def _finish(workdir, summary: dict, t0: float) -> dict:
    """Stamps the total time and writes summary.json."""
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def body_sheet_samples(cfg, gen) -> list[dict]:
    """The body contact sheet's samples: cfg.sheet.n_subjects subjects x cfg.sheet.frames
    frames, each from the cameras cfg.sheet.cameras (those the dome has)."""
    sh = cfg.sheet
    cams = [c for c in sh.cameras if c < gen.n_cameras]
    samples = []
    for s in range(min(int(sh.n_subjects), gen.n_items)):
        for t in sh.frames:
            if t < gen.n_frames:
                samples += gen.render_group(s, int(t), cams)
    return samples


def write_cages(cfg, gen, workdir, log=print) -> dict:
    """The rest cages of subject 0 (`dhjax.data.body_cages`): cages.png (the clothed body, then
    each cage cut open) and cages.json (per part: nodes, tets, volume, quality, build_s)."""
    from dhjax.data import body_cages

    subj = gen.subject(0)
    garments = dict(zip(("upper", "lower"), subj["garments"]))
    cc = cfg.cages
    cages = body_cages.build_cages(gen.arrays, garments, body_spacing=float(cc.body_spacing),
                                   shell_radius=float(cc.shell_radius), shell_spacing=float(cc.shell_spacing))
    stats = {name: c.stats for name, c in cages.items()}
    with open(os.path.join(workdir, "cages.json"), "w") as f:
        json.dump({"subject": gen.identity_number(0), "garments": [subj["upper"], subj["lower"]],
                   "config": cc.to_dict(), "parts": stats}, f, indent=2)
    dio.save_image(os.path.join(workdir, "cages.png"), body_cages.cage_picture(gen.arrays, cages, garments))
    for name, st in stats.items():
        log(f"cage {name}: {st['tets']} tets, {st['nodes']} nodes, {st['volume'] * 1000:.1f} litres, "
            f"min quality {st['min_quality']:.3f}, built in {st['build_s']:.2f}s")
    return stats


def write_bodies(cfg, workdir, log=print) -> dict:
    """Generates and writes <workdir>/bodies/ (clothed bodies in motion on a camera dome,
    `dhjax.data.body_synthetic`; with cfg.shard_count > 1 only whole subjects of shard
    cfg.shard_index), body_contact_sheet.png, body_contact_sheet_layers.png, summary.json and,
    when cfg.cages is set, the first subject's cages (`write_cages`).
    Returns the summary (as `write`'s, with "bodies" and images per second)."""
    from dhjax.data import body_synthetic

    t0 = time.time()
    gen = body_synthetic.BodyVideoGenerator(cfg)
    log(f"body model and dome ready in {time.time() - t0:.1f}s: {gen.n_items} subjects x {gen.n_frames} "
        f"frames x {gen.n_cameras} cameras at {cfg.dome.width}x{cfg.dome.height}")
    summary = {"seed": int(cfg.seed), "shard": [int(cfg.shard_index), int(cfg.shard_count)]}
    meta = {"generator": json.loads(cfg.to_json_best_effort()), "model": gen.model.name,
            "generator_version": body_synthetic.GENERATOR_VERSION}
    t1 = time.time()
    idx = ds.shard_indices(len(gen), int(cfg.shard_index), int(cfg.shard_count),
                           group=gen.n_frames * gen.n_cameras)
    ds.write_dataset(gen, os.path.join(workdir, "bodies"), "train", indices=idx, meta=meta,
                     shard=(int(cfg.shard_index), int(cfg.shard_count)) if cfg.shard_count > 1 else None)
    dt = time.time() - t1
    summary["bodies"] = {"images": len(idx), "seconds": round(dt, 1), "images_per_s": round(len(idx) / dt, 2),
                         "path": "bodies"}
    log(f"bodies: wrote {len(idx)} images in {dt:.1f}s ({len(idx) / dt:.2f} images/s) -> "
        f"{os.path.join(workdir, 'bodies')}")
    if int(cfg.shard_index) != 0:        # the sheet and the cages are the first shard's job
        return _finish(workdir, summary, t0)
    samples = body_sheet_samples(cfg, gen)
    ncols = len([c for c in cfg.sheet.cameras if c < gen.n_cameras])
    summary["contact_sheet"] = _write_sheets(workdir, samples, ncols, "body_contact_sheet.png",
                                             "body_contact_sheet_layers.png")
    if cfg.get("cages"):
        summary["cages"] = write_cages(cfg, gen, workdir, log)
    _finish(workdir, summary, t0)
    log(f"contact sheet of {len(samples)} samples -> {os.path.join(workdir, 'body_contact_sheet.png')} "
        f"(total {summary['seconds']}s)")
    return summary


def write(cfg, workdir, log=print) -> dict:
    """Generates and writes <workdir>/multiview/ and <workdir>/video/ (split "train"; when
    cfg.shard_count > 1 only the whole identities or sequences of shard cfg.shard_index),
    contact_sheet.png, contact_sheet_labels.png (the same samples' part labels) and summary.json.
    Returns the summary: seed, shard, per dataset {images, seconds, path}, contact_sheet, seconds.

    cfg: a generator config (`synthetic.default_config()` or `tiny_config()`) plus
    write_multiview, write_video, shard_index, shard_count and sheet (see configs/make_synthetic.py).
    """
    if cfg.get("kind") == "bodies":
        return write_bodies(cfg, workdir, log)
    t0 = time.time()
    assets = synthetic.build_assets(None, int(cfg.uv_size))
    multiview = synthetic.MultiviewGenerator(cfg, assets)
    video = synthetic.VideoGenerator(cfg, assets)
    log(f"assets ready in {time.time() - t0:.1f}s: {multiview.n_items} identities x "
        f"{multiview.n_frames} expressions x {multiview.n_cameras} cameras, {video.n_items} videos "
        f"x {video.n_frames} frames")
    summary = {"seed": int(cfg.seed), "shard": [int(cfg.shard_index), int(cfg.shard_count)]}
    meta = {"generator": json.loads(cfg.to_json_best_effort()), "model": assets.model.name,
            "generator_version": synthetic.GENERATOR_VERSION}
    for name, gen, on in (("multiview", multiview, cfg.write_multiview), ("video", video, cfg.write_video)):
        if not on or len(gen) == 0:
            continue
        t1 = time.time()
        # whole items per host: no two hosts write the same identity's or sequence's files
        idx = ds.shard_indices(len(gen), int(cfg.shard_index), int(cfg.shard_count),
                               group=gen.n_frames * gen.n_cameras)
        ds.write_dataset(gen, os.path.join(workdir, name), "train", indices=idx, meta=meta,
                         shard=(int(cfg.shard_index), int(cfg.shard_count)) if cfg.shard_count > 1 else None)
        dt = time.time() - t1
        summary[name] = {"images": len(idx), "seconds": round(dt, 1), "path": name}
        log(f"{name}: wrote {len(idx)} images in {dt:.1f}s ({len(idx) / dt:.1f} images/s) "
            f"-> {os.path.join(workdir, name)}")
    samples = contact_sheet_samples(cfg, multiview, video)
    summary["contact_sheet"] = _write_sheets(workdir, samples, len(cfg.sheet.cameras), "contact_sheet.png",
                                             "contact_sheet_labels.png")
    _finish(workdir, summary, t0)
    log(f"contact sheet of {len(samples)} samples -> {os.path.join(workdir, 'contact_sheet.png')} "
        f"(total {summary['seconds']}s)")
    return summary
