"""Sampling new avatars from a trained SynShot prior: an autoregressive transformer over its codes.

    python -m experiments.synshot_sample --config=configs/synshot_sample.py:tiny \
        --config.prior_workdir=runs/synshot --workdir=runs/synshot_sample
    python -m experiments.sweep --config=configs/synshot_sample.py:tiny --set=prior_workdir=runs/synshot \
        --workdir=runs/synshot_sample_sweep

Inputs: a trained prior (prior_workdir: the workdir of experiments.synshot_prior, holding its
config.json and checkpoints; its model.use_vq must be True) and the prior's own dataset (its
data.root, or its cached synthetic data). The identity and expression codes of every training
(item, frame) are the transformer's training set, those of the prior's test split its held-out
set. encode_batch_size sets how many examples the prior encodes at once.

Variants:
  tiny    2 layers of width 64, 150 steps of batch 8 (about 2 minutes on 2 CPU cores on top
          of the tiny prior, whose 16 x 16 code grids give sequences of 512 codes; its 48
          training grids are overfitted by longer runs: the held-out NLL rises again).
  paper   8 layers of width 512, 8 heads, 200k steps of batch 64 (a GPU).

The default ('') is 4 layers of width 256. sample.temperature (> 0) divides the logits,
sample.top_k (>= 1) keeps only the most likely codes at every position (1: greedy);
sample.n avatars are drawn and rendered from the test split's cameras sample.views, below
sample.reconstructions decoded codes of held-out examples. sweep() varies sample.top_k and
sample.temperature (each variant trains its own transformer: a sweep of the sampling is a
sweep of whole runs).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "synshot_sample"
    c.seed = 0
    c.prior_workdir = ""
    c.backend = "auto"                    # splatting backend of the rendered samples
    c.encode_batch_size = 8
    c.transformer = ml_collections.ConfigDict(dict(layers=4, width=256, heads=8, mlp_ratio=4))
    c.optim = ml_collections.ConfigDict(dict(lr=3e-4, b1=0.9, b2=0.95, clip=1.0))
    c.batch_size = 32
    c.train = ml_collections.ConfigDict(dict(steps=20_000, log_every=100, checkpoint_every=2000,
                                             keep_checkpoints=2, eval_every=2000, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))
    c.sample = ml_collections.ConfigDict(dict(n=8, temperature=1.0, top_k=100, views=(0, 2, 5, 8),
                                              reconstructions=2))
    if arg in ("tiny",):
        c.transformer.update(layers=2, width=64, heads=4)
        c.optim.lr = 1e-3
        c.batch_size = 8
        c.train.update(steps=150, log_every=25, checkpoint_every=75, eval_every=50)
        c.sample.update(n=4, top_k=32)
    elif arg == "paper":
        c.transformer.update(layers=8, width=512, heads=8)
        c.optim.lr = 1e-4
        c.batch_size = 64
        c.train.update(steps=200_000, log_every=500, checkpoint_every=10_000, eval_every=10_000)
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '', 'tiny' or 'paper'")
    return c


def sweep(arg=None):
    """Sampling settings on the same trained transformer's config: greedy, a narrow and the
    default top-k, and a cooler temperature."""
    del arg
    return [
        {"sample.top_k": 1},
        {"sample.top_k": 8},
        {"sample.top_k": 32},
        {"sample.temperature": 0.7},
    ]
