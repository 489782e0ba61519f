"""Random heads of the embedded default model, rendered from a camera rig.

    python -m experiments.sample_heads --config=configs/sample_heads.py --workdir=/tmp/heads
    python -m experiments.sample_heads --config=configs/sample_heads.py:tiny --workdir=/tmp/heads
    python -m experiments.sample_heads --config=configs/sample_heads.py \
        --config.flame_path=/path/to/generic_model.pkl --workdir=/tmp/heads   # needs regions: default only

Writes grid.png (rows: heads, columns: views), meshes/head_XXX.obj (with UVs),
params/head_XXX.npz + .json, and config.json into the workdir.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_heads = 6
    c.flame_path = ""            # "" = embedded default head (the only one with region colours)
    c.image_size = 256
    c.fov_y_deg = 20.0
    c.camera_distance = 0.95     # metres from the head centre
    c.view_azimuths_deg = (-50.0, -20.0, 0.0, 30.0, 70.0)
    c.view_elevation_deg = 5.0
    c.shape_std = 1.0
    c.expression_std = 0.7
    c.jaw_open_max = 0.3         # radians
    c.global_std = 0.12          # radians, per axis
    c.write_meshes = True
    if arg == "tiny":
        c.num_heads = 3
        c.image_size = 96
        c.view_azimuths_deg = (-30.0, 0.0, 45.0)
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    return c
