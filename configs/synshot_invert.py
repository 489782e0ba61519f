"""SynShot few-shot inversion: a personal avatar from N images of one subject.

    python -m experiments.synshot_invert --config=configs/synshot_invert.py:tiny \
        --config.prior_workdir=runs/synshot --workdir=runs/synshot_invert

Inputs: a trained prior (prior_workdir: the workdir of experiments.synshot_prior, holding its
config.json and checkpoints) and a subject folder in the `dhjax.data.dataset` layout (images,
masks, cameras.json, identity.npz + params.npz with the tracked head-model parameters; the
tracker writes this format). data.root = "" uses the prior's own held-out synthetic split.
data.item picks the subject (item ordinal in the split); data.input_views / data.input_frame
pick the N input images (default 3 cameras of the first frame); every other image of the
subject is held out for evaluation (novel views, and novel expressions when the subject has
several frames). data.input_frames (ordinals, e.g. (0, 20, 40)) takes the input_views of several
frames instead, each with its own tracked expression and pose: how a monocular video tracked by
experiments.track (its <workdir>/dataset, split "train", one camera) gives N input images:
--config.data.root=runs/track/dataset --config.data.split=train --config.data.input_views="(0,)"
--config.data.input_frames="(0,20,40)".

Stage 1 (the identity encoder) minimises stage1.loss: "full", the prior's loss, or
"photometric", the render terms only (no map, geometry or VQ terms; `synshot_invert.stage1_context`).

Variants: '' (paper-like: lr 1e-4, 10 steps per frame as in the thesis) and 'tiny' (CPU).
ArcFace terms need arcface_path (an insightface ArcFace ONNX file, e.g. w600k_r50.onnx); without
it they are off and the log says so.

sweep(): the thesis's inversion-loss variants (Table 2): with and without the ArcFace terms, with
and without LPIPS (weight 0.1 on renders and maps, our choice: the thesis gives none), and the
photometric-only stage-1 loss. The terms need weights that cannot ship, so give them to every
variant:

    python -m experiments.sweep --config=configs/synshot_invert.py:tiny --workdir=runs/inv_sweep \
        --set=prior_workdir=runs/synshot --set=arcface_path=w600k_r50.onnx --set=loss.lpips_path=lpips.npz

Without them the variants that differ only in those terms are the same run, and each run's log
says which terms were off.
"""

import ml_collections

from dhjax.synthesis import synshot


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "synshot_invert"
    c.seed = 0
    c.prior_workdir = ""
    c.data = ml_collections.ConfigDict(dict(root="", split="test", item=0, input_frame=0,
                                            input_frames=(),   # several frames' ordinals (replaces input_frame)
                                            input_views=(0, 2, 5), max_heldout=0, skin_only_texture=False))
    c.arcface_path = ""
    # The thesis writes L = L_color + L_arc + L_id (unit weights); 0.1 each is chosen here, a
    # deviation (untested at 1: no ArcFace weights ship); the terms are off without arcface_path.
    c.arcface = ml_collections.ConfigDict(dict(id_weight=0.1, feat_weight=0.1))
    c.loss = synshot.default_loss_config()
    # lr: the thesis gives none for the inversion; chosen here.
    c.optim = ml_collections.ConfigDict(dict(lr=1e-4, gamma=1.0, milestones=(), clip=1.0))
    c.stage1 = ml_collections.ConfigDict(dict(steps_per_frame=10, warmup=10, patience=10, loss="full"))
    c.stage2 = ml_collections.ConfigDict(dict(steps_per_frame=10, warmup=10, patience=10))
    c.ema_decay = 0.9
    c.baselines = True            # also run the from-scratch network on the same images
    c.backend = "auto"
    c.deterministic_kernels = False   # CUDA splat backward in a fixed order (CPU: always)
    if arg == "tiny":
        c.optim.lr = 3e-4
        c.stage1.update(steps_per_frame=40, warmup=30, patience=20)
        c.stage2.update(steps_per_frame=80, warmup=60, patience=30)
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '' or 'tiny'")
    return c


def sweep(arg=None):
    """Inversion-loss variants (module docstring): ArcFace and LPIPS on/off, stage-1 loss."""
    del arg
    no_arcface = {"arcface.id_weight": 0.0, "arcface.feat_weight": 0.0}
    return [
        {"loss.lpips": 0.1},
        {"loss.lpips": 0.1, **no_arcface},
        {"loss.lpips": 0.0},
        {"loss.lpips": 0.0, **no_arcface},
        {"loss.lpips": 0.1, "stage1.loss": "photometric"},
    ]
