"""SynShot prior: a VQ-VAE of Gaussian head avatars trained on synthetic multi-view heads.

    python -m experiments.synshot_prior --config=configs/synshot_prior.py:tiny --workdir=runs/synshot
    python -m experiments.synshot_prior --config=configs/synshot_prior.py:paper --workdir=/ckpt/synshot
    python -m experiments.sweep --config=configs/synshot_prior.py:tiny_sweep --workdir=runs/synshot_ablation

Variants:
  tiny        64^2 maps, 128^2 images, ~5k Gaussians, 24 synthetic training identities x 2
              expressions x 10 cameras (+ 4 held-out identities), 1000 steps of batch 4 (CPU).
  tiny_sweep  `tiny` with 150 steps and 40 held-out test images, for the ablation sweep (sweep()
              lists the ablations).
  paper       the thesis setting: 512^2 maps, F = 128, batch 16 over all devices, Adam 1.3e-5 with
              a multi-step schedule (gamma 0.66), 500k steps, 768 x 512 images of the 28-camera
              rig. Point data.root at a generated dataset (experiments.make_synthetic) or let the
              first run generate data.synthetic into the cache ($DHJAX_CACHE or ~/.cache/dhjax).

Data: data.root = "" generates the synthetic dataset once and caches it (`dhjax.data.cache`);
otherwise a folder in the `dhjax.data.dataset` layout with 'train' and 'test' splits whose
samples carry uv_albedo, uv_position and uv_expression_offset maps. The training batches are read
by the Grain pipeline (`dhjax.data.grain_pipeline`): loader.workers worker processes decode them
(0: decoding threads of the training process, loader.threads of them, ahead of the step);
loader.kind = "index" reads them in the loop's thread instead. Every setting gives the same
batches, and a run resumes with other loader settings.
"""

import ml_collections

from dhjax.data import grain_pipeline
from dhjax.data import synthetic
from dhjax.synthesis import synshot


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "synshot_prior"
    c.seed = 0
    c.data = ml_collections.ConfigDict()
    c.data.root = ""                      # "" = generate data.synthetic into the cache
    c.data.cache_dir = ""
    c.data.in_memory = True               # keep decoded samples in RAM (small datasets)
    c.data.synthetic = synthetic.default_config()
    c.data.train_identities = (0, 2000)   # (first identity number, count)
    c.data.test_identities = (1_000_000_000, 50)
    c.loader = grain_pipeline.default_loader_config()   # how batches are read (never which)
    c.model = synshot.default_model_config()
    c.loss = synshot.default_loss_config()
    c.optim = ml_collections.ConfigDict(dict(lr=1.3e-5, gamma=0.66, milestones=(100_000, 200_000, 300_000, 400_000),
                                             clip=0.0))
    c.batch_size = 16
    c.backend = "auto"                    # splatting backend (dhjax.ops.splat)
    c.deterministic_kernels = False       # CUDA splat backward in a fixed order (CPU: always)
    c.eval = ml_collections.ConfigDict(dict(n_images=8, grid_identities=4, grid_views=(0, 3, 6), batch_size=8,
                                            max_test_images=0))
    c.train = ml_collections.ConfigDict(dict(steps=500_000, log_every=100, checkpoint_every=5000,
                                             keep_checkpoints=3, eval_every=10_000, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))

    if arg in ("tiny", "tiny_sweep"):
        s = c.data.synthetic
        s.uv_size = 64
        s.multiview.update(n_expressions=2, width=128, height=128, n_frontal=6, n_upper=4)
        c.data.train_identities = (0, 24)
        c.data.test_identities = (1_000_000, 4)
        c.model.update(map_size=64, channels=(16, 32, 64), latent_dim=16, num_codes=256, feat_dim=32,
                       part_density=(64, 48), regressor_width=16, nn_mode="grid")
        c.optim.update(lr=1e-3, milestones=(700, 900), clip=1.0)
        c.batch_size = 4
        c.eval.update(n_images=8, grid_identities=4, grid_views=(0, 2, 5, 8), batch_size=8)
        c.train.update(steps=1000, log_every=50, checkpoint_every=500, keep_checkpoints=2, eval_every=500)
        if arg == "tiny_sweep":
            c.optim.update(milestones=(120, 140))
            c.train.update(steps=150, eval_every=0, checkpoint_every=150)
            c.eval.max_test_images = 40
    elif arg == "paper":
        c.data.synthetic.uv_size = 512
        c.model.update(map_size=512, feat_dim=128, part_density=(512, 384))
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '', 'tiny', 'tiny_sweep' or 'paper'")
    return c


def sweep(arg=None):
    """The thesis's VQ-VAE ablations (Table 1): F in {32, 64, 128}, w/o VQ, single layer
    (no face/hair parts), no sampling (direct maps), texture up-sampling (D_feat at half
    resolution, bilinearly up-sampled by the part sampling), and the 256 x 256 row: the whole
    avatar at half the variant's resolution (decoded maps and part sampling densities halved,
    e.g. 512 -> 256 in `paper`, 64 -> 32 in `tiny_sweep`; the data's maps are box-filtered to
    it)."""
    base = get_config(arg)
    half = {"model.map_size": int(base.model.map_size) // 2,
            "model.part_density": tuple(int(d) // 2 for d in base.model.part_density)}
    return [
        {"model.feat_dim": 32},
        {"model.feat_dim": 64},
        {"model.feat_dim": 128},
        {"model.use_vq": False},
        {"model.parts": ("face",), "model.part_density": (64,)},
        {"model.sampling": False},
        {"model.feat_drop_levels": 1},
        half,
    ]
