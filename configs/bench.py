"""Benchmarks: each variant times dhjax against its reference/peers in one run.

    python -m experiments.bench --config=configs/bench.py:flame --workdir=/tmp/bench

Variants:
  flame  FLAME forward (B=1, B=64) vs smplx.lbs.lbs on the same arrays (torch, CPU), and the
         pure-JAX rasterizer on the default head (10.4k faces) at 512x512.
  synthetic  synthetic-data generation (dhjax.data.synthetic) in samples/s at 128x128 and
         512x512: new identities (texture, hair, shape) rendered from the SynShot rig, one image
         per call as the input pipeline reads them, and whole rig groups in one batched render.
  splat  3D Gaussian splatting (dhjax.render.splat) forward and forward+backward: 60k Gaussians on
         the default head at 512x512 and 550x802 (GEM), 250k at 1024x667 (D3GA), for the CPU kernel
         and the pure-JAX reference in the same run (splat_cpu_speedup_vs_reference), the CUDA
         kernel on a GPU, and gsplat on the same GPU when it can be built there.
  geometry  closest points (BVH kernel vs the brute-force reference, libigl, open3d/Embree) for
         1M points around the default head, and hash-grid encoding (kernel vs reference) for 1M
         points, 16 levels x 2 features, T = 2^19 (dhjax.bench.geometry).
  insta  INSTA (dhjax.synthesis.insta) on configs/insta.py:tiny built from an 8-frame synthetic
         video: train_step with the kernels (Context.backend='auto') and the pure-JAX reference in
         steps/s and rays/s (the reference on fewer rays), the parts of a step, and the render
         time of a 512x512 frame (dhjax.bench.insta; sizes under insta.*, e.g.
         --config.insta.config=configs/insta.py:paper); about 6 min on 2 CPU cores.
  gem    GEM (dhjax.synthesis.gem): frames/s of the Net against the eigenmodel (mean + k B, no
         network) for Gaussian maps of 64^2, 128^2, 256^2 and M = 10, 20, 50 components, one
         550x802 camera, the same splatting backend, and the splat alone with and without its
         backward (dhjax.bench.gem; sizes under gem.*).
  body   SMPL-X-layout body forward (B=1, 16, 64) of the embedded default body vs smplx.lbs.lbs on
         the same arrays (torch, CPU), with the largest vertex difference (dhjax.bench.body;
         --config.body.model=random times a random official-layout model of --config.body.vertices
         vertices instead, e.g. 10475 as SMPL-X).
  d3ga   D3GA (dhjax.synthesis.d3ga): frames/s of a posed render of an avatar (cages, MLPs,
         appearance, splat) and its parts, at the tiny setting (7.2k Gaussians, 96x128) and the
         paper's (48k Gaussians, 667x1024) (dhjax.bench.d3ga; settings under d3ga.*).
  data   input pipeline (dhjax.bench.data): images/s of the index pipeline against the Grain
         pipeline with 0 workers (1 and 2 decoding threads) and 2 worker processes, reading
         SynShot's training split of configs/synshot_prior.py:tiny (480 images of 128x128, every
         map decoded at each read) in batches of 8, as fast as possible and with a simulated
         100 ms training step after each batch (what prefetching hides); the points timed
         round-robin, 3 rounds, medians (settings under data.*, e.g. --config.data.root=DIR for
         another dataset).
  synshot  SynShot's prior step on configs/synshot_prior.py:tiny's data (the main job): the first
         train_step call (compilation) and its median, the parts of a step as forward+backward
         (network, its convolutions, splatting, SSIM's window against the depthwise convolution it
         replaced) and the minutes of the config's steps (dhjax.bench.synshot; settings under
         synshot.*, e.g. --config.synshot.config=configs/synshot_prior.py:paper).
  track  the metrical face tracker (dhjax.capture.tracker): frames/s of sequential tracking of a
         synthetic 512x512 video with configs/track.py's settings for real videos, the first
         frame and compilation, the split of a frame per stage, against the tracker's reference
         path (host visibility, full-resolution z-buffer) in the same run, both scored against
         the ground truth (dhjax.bench.track; settings under track.*, e.g. --config.track.n_frames=8).
Results are printed and written to <workdir>/bench.json.
"""

import ml_collections

from dhjax.bench import body as body_bench
from dhjax.bench import data as data_bench
from dhjax.bench import d3ga as d3ga_bench
from dhjax.bench import gem as gem_bench
from dhjax.bench import geometry
from dhjax.bench import insta as insta_bench
from dhjax.bench import synshot as synshot_bench
from dhjax.bench import track as track_bench


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.suite = arg or "flame"
    c.repeats = 20          # timed calls per measurement (median reported)
    c.warmup = 3
    c.batch_sizes = (1, 64)
    c.raster_size = 512
    c.torch_threads = 0     # 0 = torch's default
    if c.suite == "synthetic":
        c.synthetic = ml_collections.ConfigDict(dict(
            sizes=(128, 512),     # square images, pixels
            uv_size=256,          # UV maps (albedo, position, expression offsets)
            n_identities=2,       # timed identities (fresh ones: their textures/hair are generated)
            n_views=8,            # views per identity, spread over both rings of the rig
        ))
    if c.suite == "splat":
        c.splat = ml_collections.ConfigDict(dict(
            cases=((60_000, 512, 512), (60_000, 550, 802), (250_000, 1024, 667)),  # (N, width, height)
            repeats=5,              # timed calls of each kernel (median)
            reference_repeats=1,    # the pure-JAX reference is slow: one timed call after the warm-up
            reference_max_n=250_000,  # larger scenes skip the reference
        ))
    if c.suite == "geometry":
        c.geometry = geometry.default_config()
    if c.suite == "insta":
        c.insta = insta_bench.default_config()
    if c.suite == "gem":
        c.gem = gem_bench.default_config()
    if c.suite == "body":
        c.batch_sizes = (1, 16, 64)
        c.body = body_bench.default_config()
    if c.suite == "d3ga":
        c.d3ga = d3ga_bench.default_config()
    if c.suite == "data":
        c.data = data_bench.default_config()
    if c.suite == "synshot":
        c.synshot = synshot_bench.default_config()
    if c.suite == "track":
        c.track = track_bench.default_config()
    if c.suite not in ("flame", "synthetic", "splat", "geometry", "insta", "gem", "body", "d3ga", "data", "synshot",
                       "track"):
        raise ValueError(f"unknown bench variant {c.suite!r}; available: flame, synthetic, splat, geometry, insta, gem, "
                         f"body, d3ga, data, synshot, track")
    return c
