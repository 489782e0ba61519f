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

Variants: '' (default sizes), 'tiny' (128 x 128 images, 128 x 128 UV maps, 8 identities x 1
expression x 28 cameras, 2 videos of 16 frames; a few minutes on a laptop CPU), 'bodies' (16
subjects x 300 frames x a 200-camera dome at 667 x 1024) and 'bodies_tiny' (4 subjects x 24
frames x 6 cameras at 96 x 128).

The bodies variants (`dhjax.data.body_synthetic`, D3GA's data) write <workdir>/bodies/,
body_contact_sheet.png (subjects x two frames x a few cameras) and
body_contact_sheet_layers.png (body / upper / lower garment labels), and the first subject's
tetrahedral cages (cages.png, cages.json: tets per part and build time):

    python -m experiments.make_synthetic --config=configs/make_synthetic.py:bodies_tiny --workdir=/tmp/bodies
"""

import ml_collections

from dhjax.data import synthetic


def get_config(arg=None):
    if arg in ("bodies", "bodies_tiny"):
        from dhjax.data import body_synthetic

        c = body_synthetic.tiny_config() if arg == "bodies_tiny" else body_synthetic.default_config()
        c.shard_index = 0
        c.shard_count = 1
        c.sheet = ml_collections.ConfigDict(dict(
            n_subjects=4, frames=(0, c.n_frames // 2), cameras=(0, 2, 4) if arg == "bodies_tiny" else
            (0, 25, 50, 75, 100, 125)))
        # The first subject's rest cages (D3GA's layers; dhjax.data.body_cages), metres.
        c.cages = ml_collections.ConfigDict(dict(body_spacing=0.025, shell_radius=0.02, shell_spacing=0.015))
        return c
    if arg == "tiny":
        c = synthetic.tiny_config()
    elif arg in (None, ""):
        c = synthetic.default_config()
    else:
        raise ValueError(f"unknown variant {arg!r}; use '', 'tiny', 'bodies' or 'bodies_tiny'")
    c.write_multiview = True
    c.write_video = True
    c.shard_index = 0
    c.shard_count = 1
    c.sheet = ml_collections.ConfigDict(dict(
        n_identities=7, cameras=(0, 3, 6, 9, 13, 15, 20, 25), video_sequences=2, video_frames=4))
    return c
