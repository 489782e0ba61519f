"""Registers the head model (shape, expression, pose, optional offsets) to 3D scans.

    python -m experiments.register_flame --config=configs/register_flame.py:tiny --workdir=/tmp/reg
    python -m experiments.register_flame --config=configs/register_flame.py \
        --config.data.scans_dir=/path/to/scans --config.data.unit_scale=0.001 --workdir=/tmp/reg
    python -m experiments.sweep --config=configs/register_flame.py:tiny --workdir=/tmp/reg_sweep

Variants: "" (your scans in data.scans_dir, or synthetic ones when it is empty), "tiny"
(4 synthetic scans from the default head with 0.3 mm noise and known ground truth; minutes on
a 2-core CPU). Scans: OBJ/PLY meshes; landmarks (optional) in data.landmarks_dir as
<scan stem>.txt (68 rows x y z) or .npz (key 'landmarks'), in the scan's units.
"""

import ml_collections

from dhjax.capture import registration


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "register_flame"
    c.seed = 0
    c.flame_path = ""                 # "" = embedded default head
    c.flame_landmarks = ""            # landmark embedding for an official FLAME file
    c.data = ml_collections.ConfigDict()
    c.data.scans_dir = ""             # "" = synthesise scans (c.data.synthetic)
    c.data.landmarks_dir = ""
    c.data.unit_scale = 1.0           # scan units -> metres (0.001 for millimetre scans)
    c.data.synthetic = ml_collections.ConfigDict(dict(n_scans=8, noise_mm=0.3, points_per_scan=6000))
    c.registration = registration.default_config()
    c.train = ml_collections.ConfigDict(dict(
        log_every=25, checkpoint_every=100, keep_checkpoints=2, eval_every=0, on_nonfinite="skip",
        max_skipped_fraction=0.1))
    c.train.steps = c.registration.get_ref("steps")   # one number: the optimiser schedule uses it
    # --allow_config_change may extend a run through registration.steps (train.steps follows it;
    # dhjax.train.app.EXPERIMENT_RESUMABLE_CHANGES); the schedule then changes from the resume point.
    if arg == "tiny":
        c.data.synthetic.n_scans = 4
        c.data.synthetic.points_per_scan = 3000
        c.registration.n_points = 3000
        c.train.checkpoint_every = 100
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    return c


def sweep(arg=None):
    """Ablation: with/without per-vertex offsets, two noise levels."""
    return [{"registration.use_offsets": o, "data.synthetic.noise_mm": n}
            for o in (False, True) for n in (0.3, 1.0)]
