"""Synthetic digital-human data: a multi-view identity dataset, monocular videos, a contact sheet.

    python -m experiments.make_synthetic --config=configs/make_synthetic.py:tiny --workdir=/tmp/syn
    python -m experiments.make_synthetic --config=configs/make_synthetic.py --workdir=/data/syn \
        --config.multiview.n_identities=1000 --config.shard_index=3 --config.shard_count=8

Writes <workdir>/multiview/ (SynShot rig: identities x expressions x 28 cameras, 768 x 512 by
default) and <workdir>/video/ (monocular handheld sequences) in the layout of
`dhjax.data.dataset` (images, masks, part labels, 16-bit depth, cameras.json, params.npz, UV
maps), plus contact_sheet.png (7 identities x 8 rig cameras from both rings, and 8 video frames)
and contact_sheet_labels.png (the same samples' part labels), summary.json and config.json.
With shard_count > 1 only this process's contiguous block of images is written (any host can
generate any shard: everything is a pure function of seed and index).

Variants: '' (default sizes) and 'tiny' (128 x 128 images, 128 x 128 UV maps, 8 identities x 1
expression x 28 cameras, 2 videos of 16 frames; a few minutes on a laptop CPU).
"""

import ml_collections

from dhjax.data import synthetic


def get_config(arg=None):
    if arg == "tiny":
        c = synthetic.tiny_config()
    elif arg in (None, ""):
        c = synthetic.default_config()
    else:
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    c.write_multiview = True
    c.write_video = True
    c.shard_index = 0
    c.shard_count = 1
    c.sheet = ml_collections.ConfigDict(dict(
        n_identities=7, cameras=(0, 3, 6, 9, 13, 15, 20, 25), video_sequences=2, video_frames=4))
    return c
