"""Benchmarks: each variant times dhjax against its reference/peers in one run.

    python -m experiments.bench --config=configs/bench.py:flame --workdir=/tmp/bench

Variants:
  flame  FLAME forward (B=1, B=64) vs smplx.lbs.lbs on the same arrays (torch, CPU), and the
         pure-JAX rasterizer on the default head (10.4k faces) at 512x512.
Results are printed and written to <workdir>/bench.json.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.suite = arg or "flame"
    c.repeats = 20          # timed calls per measurement (median reported)
    c.warmup = 3
    c.batch_sizes = (1, 64)
    c.raster_size = 512
    c.torch_threads = 0     # 0 = torch's default
    if c.suite not in ("flame",):
        raise ValueError(f"unknown bench variant {c.suite!r}; available: flame")
    return c
