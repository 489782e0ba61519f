"""INSTA: an instant volumetric head avatar from one tracked monocular video.

    python -m experiments.insta --config=configs/insta.py:tiny --workdir=runs/insta
    python -m experiments.insta --config=configs/insta.py:tiny_tracked --workdir=runs/insta_tracked
    python -m experiments.insta --config=configs/insta.py:paper --config.data.root=<tracked video> --workdir=runs/insta
    python -m experiments.sweep --config=configs/insta.py:tiny_sweep --workdir=runs/insta_ablation
    # two shells: the avatar trains while experiments.track is still tracking the video
    python -m experiments.track --input=video.mp4 --workdir=runs/track
    python -m experiments.insta --config=configs/insta.py:tiny --config.online.live=True \
        --config.data.root=runs/track/dataset --workdir=runs/insta_live
    python -m experiments.insta_reenact --workdir=runs/insta --source=<tracked video> --out=runs/reenact

Variants:
  tiny          a synthetic 128^2 video of 60 frames (the last 12 held out) with its true tracking;
                12 hash levels x 2 features, T = 2^15; a 48^3 occupancy grid; marching step
                sqrt(3) * box / 192; 2 frames x 1024 rays per step, 1500 steps (CPU).
  tiny_tracked  `tiny`, but the video is tracked first by the metrical tracker
                (`dhjax.capture.track_run`) and INSTA trains on the tracker's parameters and
                cameras: the whole capture -> avatar chain on one command. (The plain tracker, not
                the thesis's INSTA variant, which measured worse here: see c.tracker below.)
  tiny_live     `tiny_tracked` in the live online mode: the tracker runs in a background thread
                and INSTA trains from frame 0 on, each frame joining as soon as it is tracked
                (online.live; online.json: held-out PSNR against seconds since tracking started).
  tiny_sweep    `tiny` with 400 steps, evaluated on 4 held-out frames, for the ablation sweep
                (sweep() lists the ablations).
  paper         the thesis: 16 levels x 2 features, T = 2^19, step sqrt(3)/1024 of the box, a
                128^3 grid, 32k steps of 4 frames x 1024 rays (instant-ngp trains with ~4k rays
                per batch), a buffer of 1700 frames redrawn every 1500 steps, the last 350 frames
                held out, 512^2 images. Point data.root at a tracked video (experiments.track's
                dataset/ folder) or let it generate a 1500-frame synthetic video.

Data: data.root = "" generates data.synthetic's video once into the cache (`dhjax.data.cache`);
otherwise a 'video' dataset folder (`dhjax.data.dataset` layout; data.item selects the sequence).
data.tracked = True first tracks the (synthetic) video and trains on the tracker's output.
online.frames_per_step > 0 lets the frames arrive over time on a schedule (online mode, reproducible);
online.live = True feeds them as they are tracked: with data.tracked from the tracker running
in a background thread, with data.root from a folder that `experiments.track` fills frame by frame.
"""

import ml_collections

from dhjax.capture import tracker
from dhjax.data import synthetic
from dhjax.synthesis import insta

VARIANTS = ("", "tiny", "tiny_tracked", "tiny_live", "tiny_sweep", "paper")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "insta"
    c.seed = 0
    c.backend = "auto"                   # kernels of every op (raymarch, BVH, hash grid)
    c.data = ml_collections.ConfigDict()
    c.data.root = ""                     # "" = generate data.synthetic's video into the cache
    c.data.split = "train"
    c.data.item = -1                     # sequence number in the dataset (-1: the first)
    c.data.cache_dir = ""
    c.data.max_frames = 0                # 0: every frame
    c.data.holdout = 350                 # last frames held out (a count, or a fraction < 1)
    c.data.depth_source = "mesh"         # 'mesh': rasterise the tracked mesh (thesis); 'dataset': its depth maps
    c.data.tracked = False               # synthetic only: track the video first, train on the tracker's output
    c.data.synthetic = synthetic.default_config()
    c.data.synthetic.uv_size = 256
    c.data.synthetic.video.update(n_sequences=1, n_frames=1500, width=512, height=512)
    # data.tracked: the plain tracker. The thesis tracks with its INSTA variant (eyelids, iris:
    # tracker.insta_variant; --config.tracker.eyelids=True --config.tracker.iris=True
    # --config.tracker.weights.eye_symmetry=0.1), which measured 1.15 dB lower held-out PSNR on
    # tiny_tracked (21.07 against 22.22 dB; README, INSTA section).
    c.tracker = tracker.default_config()
    c.model = insta.default_model_config()
    c.loss = insta.default_loss_config()
    c.optim = insta.default_optim_config()
    c.batch = ml_collections.ConfigDict(dict(
        frames_per_step=4, rays_per_frame=1024,
        samples_per_ray=64,              # sample capacity per step = frames x rays x this; rays that do not fit are
                                         # left out of the loss (counted: truncated_rays), so more rays than the
                                         # pruned grid needs = instant-ngp's adaptive ray count (README, sample budget)
        buffer_frames=1700, resample_every=1500,
        random_background=True))         # random background colour per training ray (instant-ngp)
    c.online = ml_collections.ConfigDict(dict(
        frames_per_step=0.0,             # > 0: frame i arrives at step i / this (scheduled online mode)
        live=False,                      # True: frames arrive as they are tracked (live online mode): with
                                         # data.tracked, by the tracker running in a background thread; with
                                         # data.root, as another process (experiments.track) fills the folder
        timeout_s=900.0,                 # live with data.root: the longest wait for meta.json or the next frame
        wait_for_new_run=False))         # live with data.root: do not read a folder a finished tracker run left;
                                         # wait for the next run to restart it
    c.eval = ml_collections.ConfigDict(dict(
        chunk=1 << 15,                   # rays per render call
        n_rays=4096,                     # rays of the periodic evaluation batch
        max_test_frames=0,               # 0: every held-out frame
        video_fps=25.0, orbit_frames=36, orbit_yaw_deg=90.0,
        mesh_resolution=128,             # marching-cubes grid of the canonical density
        mesh_threshold=10.0,             # density level of the OBJ surface (1/m)
        side_yaw_deg=60.0,               # side view of the depth-error figure
        train_frames=4,                  # training frames whose metrics (train_*) show the gap to the held-out ones
        lpips_path=""))                  # LPIPS weights (dhjax.nn.lpips npz): adds LPIPS to the metrics
    c.train = ml_collections.ConfigDict(dict(steps=32_000, log_every=100, checkpoint_every=2000,
                                             keep_checkpoints=3, eval_every=4000, on_nonfinite="skip",
                                             max_skipped_fraction=0.1))

    if arg in ("tiny", "tiny_tracked", "tiny_live", "tiny_sweep"):
        s = c.data.synthetic
        s.uv_size = 128
        s.video.update(n_frames=60, width=128, height=128)
        c.data.holdout = 12
        c.model.hash.update(n_levels=12, log2_hashmap_size=15, finest_resolution=512.0)
        c.model.occupancy.update(resolution=48, every=16)
        c.model.step_divisor = 192.0
        c.batch.update(frames_per_step=2, rays_per_frame=1024, samples_per_ray=48, buffer_frames=0)
        c.eval.update(n_rays=2048, orbit_frames=24, mesh_resolution=96)
        c.train.update(steps=1500, log_every=50, checkpoint_every=500, keep_checkpoints=2, eval_every=500)
        if arg in ("tiny_tracked", "tiny_live"):
            c.data.tracked = True
            c.online.live = arg == "tiny_live"
            if c.online.live:
                c.train.eval_every = 100         # online.json: the held-out PSNR every 100 steps
            c.tracker.first.update(landmark_steps=200, steps=(100, 100, 100))
            c.tracker.frame.update(landmark_steps=20, steps=(20, 20, 30))
        if arg == "tiny_sweep":
            c.train.update(steps=400, eval_every=0, checkpoint_every=400)
            c.eval.update(orbit_frames=0, mesh_resolution=0, max_test_frames=4)
    elif arg == "paper":
        pass
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r}; use one of {VARIANTS}")
    return c


def sweep(arg=None):
    """The thesis's INSTA ablations (section A.2, 5.2) and the two open readings of its
    canonicalisation: mouth colour weight 1 instead of 40; no depth term; global instead of
    mouth-local expression conditioning; no deformation field (per-frame latent codes in the
    rigid head frame, NeRFace-like); the nearest triangle weighted exp(-d) instead of 1; the
    scale lambda as the thesis's literal area ratio instead of the inverse length ratio (the
    default, chosen by this ablation); and, beyond the thesis, mip-NeRF 360's distortion loss on
    the ray weights (weight 0.1; README)."""
    return [
        {},
        {"loss.mouth_weight": 1.0},
        {"loss.depth_weight": 0.0},
        {"model.conditioning": "global"},
        {"model.deformation": "none"},
        {"model.nearest_beta": 1.0},
        {"model.scale": "area_ratio"},
        {"loss.distortion_weight": 0.1},
    ]
