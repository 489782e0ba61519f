"""GEM: Gaussian eigen models of one head from a multi-view capture (Net -> PCA -> refinement ->
drivers).

    python -m experiments.gem --config=configs/gem.py:tiny --workdir=runs/gem
    python -m experiments.gem --config=configs/gem.py:paper --config.data.root=<multi-view dataset> --workdir=runs/gem
    python -m experiments.sweep --config=configs/gem.py:tiny_table --workdir=runs/gem_table
    python -m experiments.gem_drive --workdir=runs/gem --source=runs/track/dataset --out=runs/gem_drive

Variants:
  tiny        one synthetic subject, 72 expressions (the last 8 held out; 16 expression
              coefficients, jaw and eyes vary) x 16 cameras (12 on a frontal arc, 4 above;
              camera 5 held out) at 96 x 128, one light for all frames; 64^2 Gaussian maps (3,536 Gaussians), a 4-level StyleUNet of widths
              16..64, SH degree 1; Net 1500 steps of 1 frame x 4 views; M = 50 components;
              refinement 600 steps (QR every 200); fitting 40 steps per frame on 4 of the training cameras (CPU).
  tiny_table  `tiny` for the size table (thesis Table 4): sweep() over three map sizes, each
              run evaluating M in (10, 20, 50) (fewer steps).
  paper       the thesis: 256^2 maps (~60k Gaussians), SH degree 3, a 5-level StyleUNet of
              widths 32..128, 802 x 550 images from 16 cameras, M = 50, refinement 30k steps
              with QR every 1k. Point data.root at a multi-view dataset (one subject; every
              frame seen by the same cameras) or let it generate a 16-camera synthetic one.

Data: data.root = "" generates the synthetic subject once into the cache (`dhjax.data.cache`);
otherwise a `dhjax.data.dataset` folder (data.split, data.item select the subject).
"""

import ml_collections

from dhjax.data import synthetic
from dhjax.synthesis import gem

VARIANTS = ("", "tiny", "tiny_table", "paper")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "gem"
    c.seed = 0
    c.data = ml_collections.ConfigDict()
    c.data.root = ""                     # "" = generate the synthetic subject into the cache
    c.data.split = "train"
    c.data.item = -1                     # the subject's item number (-1: the first)
    c.data.cache_dir = ""
    c.data.max_frames = 0                # 0: every frame
    c.data.model_path = ""               # head model of the dataset's parameters ("" = the embedded default)
    c.data.test_views = (5,)             # held-out camera numbers (novel view)
    c.data.test_frames = 0.1             # held-out last frames (novel expression): a count or a fraction < 1
    c.data.identity = 0                  # synthetic: the subject's identity number
    c.data.synthetic = synthetic.default_config()
    c.data.synthetic.multiview.update(n_identities=1, n_expressions=400, width=550, height=802,
                                      n_frontal=12, n_upper=4, fixed_light=True, expression_dims=16)
    c.model = gem.default_model_config()
    c.loss = gem.default_loss_config()
    c.optim = gem.default_optim_config()
    c.batch = ml_collections.ConfigDict(dict(frames_per_step=1, views_per_step=4, random_background=True))
    c.train = ml_collections.ConfigDict(dict(steps=100_000, log_every=100, checkpoint_every=2000,
                                             keep_checkpoints=3, eval_every=5000, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))
    c.gem = ml_collections.ConfigDict(dict(
        n_components=50,                 # M
        pca_method="auto",               # dhjax.geometry.pca.fit method
        table_components=(10, 20, 50),   # evaluated in the size table (<= n_components)
        local_regions=True))             # also compare a localised PCA (per face region) at equal size
    c.refine = ml_collections.ConfigDict(dict(lr=1e-4, qr_every=1000, views_per_step=4))
    c.refine.train = ml_collections.ConfigDict(dict(steps=30_000, log_every=100, checkpoint_every=2000,
                                                    keep_checkpoints=2, eval_every=0, on_nonfinite="skip",
                                                    max_skipped_fraction=0.1))
    c.fit = ml_collections.ConfigDict(dict(steps=200, lr=0.05, prior_weight=1e-3,
                                           views=0))        # training cameras used to fit (0: all)
    c.regressor = ml_collections.ConfigDict(dict(
        drivers=("params", "landmarks"),  # features: tracked head-model parameters; 2D face landmarks
        kinds=("mlp", "linear"),         # 'mlp': the thesis's 3 x 256 MLP (regressor_<driver>.npz); 'linear':
                                         # ridge regression with a leave-one-out ridge (beyond the thesis;
                                         # regressor_<driver>_linear.npz), far better from few frames
        n_pca=50, steps=3000, lr=1e-3, weight_decay=1.0,
        neutral_frame=-1,                # training frame position of the neutral reference (-1: the
                                         # one with the smallest expression and jaw parameters)
        landmark_view=-1,                # camera number whose landmarks drive (-1: the most frontal)
        landmark_iris=True))             # the landmark driver also sees mediapipe's 10 iris points (468-477,
                                         # gaze; the 51 inner iBUG points alone carry none)
    c.eval = ml_collections.ConfigDict(dict(
        max_novel_view_frames=0,         # 0: every training frame from the held-out cameras
        fps_repeats=20,                  # timed renders per measurement
        video_fps=12.0,
        cross_frames=48,                 # cross-reenactment: frames of another synthetic identity
        lpips_path=""))                  # LPIPS weights (dhjax.nn.lpips npz): metrics, and losses (loss.lpips_weight)

    if arg in ("tiny", "tiny_table"):
        s = c.data.synthetic
        s.uv_size = 128
        s.multiview.update(n_expressions=72, width=96, height=128)
        c.data.test_frames = 8
        c.model.update(map_size=64, widths=(16, 32, 64, 64), style_dim=32, sh_degree=1)
        c.batch.update(views_per_step=4)
        c.train.update(steps=1500, log_every=50, checkpoint_every=500, keep_checkpoints=2, eval_every=500)
        c.refine.update(qr_every=200)
        c.refine.train.update(steps=600, log_every=50, checkpoint_every=300)
        c.fit.update(steps=40, views=4)
        c.regressor.update(steps=1500)
        c.eval.update(max_novel_view_frames=16, fps_repeats=10, cross_frames=24)
        if arg == "tiny_table":
            c.train.update(steps=1000, eval_every=0)
            c.refine.train.update(steps=200)
            c.regressor.update(drivers=("params",), steps=500)
            c.eval.update(cross_frames=0)
    elif arg == "paper":
        pass
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use one of {VARIANTS}")
    return c


def sweep(arg=None):
    """tiny_table: the thesis's Table 4 analogue over Gaussian map sizes (each run evaluates
    gem.table_components); otherwise the map sizes of the paper variant."""
    sizes = (32, 48, 64) if arg == "tiny_table" else (128, 256, 512)
    return [{"model.map_size": s} for s in sizes]
