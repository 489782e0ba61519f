"""MICA: metric neutral head shape from one image, trained on synthetic image / shape pairs.

    python -m experiments.mica_train --config=configs/mica.py:tiny --workdir=runs/mica
    python -m experiments.mica_eval --workdir=runs/mica
    python -m experiments.mica_predict --images=DIR --workdir=runs/mica [--landmarks=DIR]
    python -m experiments.mica_train --config=configs/mica.py:paper --workdir=/ckpt/mica \
        --config.encoder.onnx_path=/weights/glint360k_r100.onnx

Variants:
  tiny   CPU run with the landmark encoder (encoder.kind "landmarks",
         `dhjax.capture.mica.landmark_net`): a heatmap U-Net of width 16 finds the 68 iBUG
         landmarks in a 96 px five-point crop, the mapping network (3 x 64 hidden units) reads
         the shape off their similarity-normalised positions; 300 training identities x 2
         expressions x 2 views at 160 px (+ 32 validation identities and 256 test identities, 2
         views each), 1000 steps of batch 16, AdamW lr 2e-3 (cosine decay, 25 warm-up steps) and
         weight decay 0.05, validation every 25 steps. After training the mapping is calibrated
         (`mica.calibrate_mapping`): refitted as a ridge regression on the landmarks the network
         finds in 900 other identities.
  tiny_iresnet
         the same data and optimiser with MICA's own encoder trained from scratch: IResNet
         (1,1,1,1), width 8, 32-d embedding, 400 steps of batch 32, 32 test identities.
  paper  the thesis setting: iresnet100 encoder (give insightface's Glint360K ONNX weights with
         --config.encoder.onnx_path; only the last 3 blocks train, BatchNorm statistics frozen;
         without weights the same architecture is trained from scratch), mapping 3 x 300 hidden
         units, AdamW lr 1e-5 and weight decay 2e-4, batch 8, 160k steps, model selection on the
         validation split every 1000 steps; 5000 synthetic training identities x 2 expressions x
         2 views at 192 px.

Data: generated once per data config and cached as npz files (`dhjax.capture.mica.cached_split`,
under $DHJAX_CACHE or ~/.cache/dhjax; data.cache_dir overrides). Train / validation / test
/ calibration identities are disjoint ranges of identity numbers of the synthetic generator.
The training batches are read by the Grain pipeline (`dhjax.data.grain_pipeline`; loader.workers,
loader.threads; loader.kind = "index" reads them in the loop's thread): the same batches with
every setting, and a run resumes with other loader settings.
"""

import ml_collections

from dhjax.capture import mica
from dhjax.data import grain_pipeline


def get_config(arg=None):
    c = mica.default_config()
    c.experiment = "mica"
    c.seed = 0
    c.batch_size = 8                      # ref impl: batch 8 (2 images per subject)
    c.loader = grain_pipeline.default_loader_config()   # how batches are read (never which)
    c.train = ml_collections.ConfigDict(dict(steps=160_000, log_every=100, checkpoint_every=5000,
                                             keep_checkpoints=3, eval_every=5000, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))
    # Final benchmark (experiments.mica_train's final metrics and experiments.mica_eval).
    c.eval = ml_collections.ConfigDict(dict(scan_noise_mm=0.2, scan_points=8000, seed=0))

    if arg in ("tiny", "tiny_iresnet"):
        # A small encoder for a 2-core CPU: width 8 and a 32-d embedding (not 512; the 512-d FC
        # layer is the slowest to train on CPU and memorises a small training set). The mapping
        # network keeps its 3 hidden layers, 64 units wide.
        c.encoder.update(layers=(1, 1, 1, 1), width=8, embedding=32)
        c.mapping.hidden_dim = 64
        d = c.data
        d.synthetic.uv_size = 128
        d.update(image_size=160, fov_y_deg=19.0, train_identities=(0, 300), val_identities=(500_000, 32),
                 test_identities=(1_000_000, 32), train_expressions=2, train_views=2,
                 eval_expressions=1, eval_views=2)
        # From scratch on a CPU budget: a larger learning rate than the thesis's 1e-5 (which
        # fine-tunes a pretrained encoder for 160k steps), decayed to 0 over the run, a stronger
        # weight decay against memorising the small training set, a short run and frequent
        # model selection.
        c.optim.update(lr=2e-3, weight_decay=0.05, warmup_steps=25, schedule="cosine")
        c.batch_size = 32
        c.select_every = 25
        c.train.update(steps=400, log_every=25, checkpoint_every=200, keep_checkpoints=2, eval_every=100)
        c.eval.scan_points = 4000
        if arg == "tiny":
            # The landmark encoder (dhjax.capture.mica.landmark_net): a heatmap landmark network
            # learns per-image targets and the mapping network reads the shape off its
            # landmarks. Smaller batches and more steps for the CPU time.
            c.encoder.update(kind="landmarks", heatmap_width=16)
            c.batch_size = 16
            c.train.update(steps=1000, log_every=50, checkpoint_every=500, eval_every=250)
            # After training, refit the mapping (one linear layer, ridge) on the landmarks the
            # network finds in 900 identities it never saw (mica.calibrate_mapping).
            c.calibration.enabled = True
            d.update(calib_identities=(250_000, 900), calib_expressions=1, calib_views=1)
            # 256 test identities, so that the per-identity comparison with the mean face can
            # resolve a small difference.
            d.test_identities = (1_000_000, 256)
    elif arg == "paper":
        pass
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use '', 'tiny', 'tiny_iresnet' or 'paper'")
    return c
