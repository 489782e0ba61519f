"""Input pipeline benchmark: images/s of the index pipeline (`dhjax.data.dataset.Pipeline`, read
in the consumer's thread) against the Grain pipeline (`dhjax.data.grain_pipeline.GrainPipeline`)
with 0 and 2 worker processes, in one run (no timed assertions anywhere).

Setting: SynShot's training split as SynShot reads it (`synshot_data.open_split` with
in_memory=False: every image, mask, part map, depth map and UV map decoded from the PNG/npz files
at every read; SynShot's default in_memory=True decodes each sample once and then only stacks),
from the cached synthetic dataset of `data.config` (configs/synshot_prior.py:tiny: 128 x 128
images, 480 training images) or from the folder `data.root`. Each point reads `warmup` batches
(untimed: worker start-up and first reads) and then, for each simulated step time t of
`step_s`, `steps` batches of `batch_size` images, spending t seconds after each batch outside
the GIL (time.sleep, as a training step running on an accelerator does). t = 0 is the pure input
throughput, where a prefetching pipeline cannot hide decoding behind computation; t > 0 shows
what it hides (the index pipeline decodes between steps, so its rate falls as t grows).
Reported per point: images/s at t = 0 (`data_<point>_images_per_s`) and at every other t
(`data_<point>_step<t in ms>ms_images_per_s`), seconds to the first batch (worker start-up),
the ratios to the index pipeline (`..._speedup_vs_index`); and whether every point read the
same batches (`data_batches_identical`, a CRC of every batch's arrays). The points are timed
round-robin `rounds` times and the median of each is reported, so that a change of the machine's
load during the run biases no point more than another.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import ml_collections
import numpy as np

from dhjax.data import dataset as ds
from dhjax.data import grain_pipeline as gp
from dhjax.bench.timing import load_config


def default_config() -> ml_collections.ConfigDict:
    """The settings of the data bench (configs/bench.py:data); see the module docstring.

    config: the SynShot config "path.py:variant" whose data is read (a relative path is looked up
      from the working folder, then from the repository); root: a dataset folder instead ("" = the
      config's cached synthetic data); cache_dir: its data.cache_dir ("" keeps the config's);
      split; batch_size; steps: timed batches per point and step time; warmup: untimed batches
      first; step_s: simulated training step times (seconds per batch, 0 = none); rounds:
      timings of each point (median reported); points: (name, loader, workers, threads) per
      point, loader "index" or "grain".
    """
    c = ml_collections.ConfigDict()
    c.config = "configs/synshot_prior.py:tiny"
    c.root = ""
    c.cache_dir = ""
    c.split = "train"
    c.batch_size = 8
    c.steps = 24
    c.warmup = 2
    c.step_s = (0.0, 0.1)
    c.rounds = 3
    c.seed = 0
    c.points = (("index", "index", 0, 1), ("grain_w0", "grain", 0, 1), ("grain_w0_t2", "grain", 0, 2),
                ("grain_w2", "grain", 2, 1))
    return c



def dataset_root(c) -> Path:
    """The folder the bench reads: `root`, or the cached synthetic data of `config`."""
    if c.root:
        return Path(c.root)
    from dhjax.synthesis import synshot_data

    cfg = load_config(c.config)
    if c.cache_dir:
        cfg.data.cache_dir = str(c.cache_dir)
    return synshot_data.dataset_root(cfg)


def _crc(batch) -> int:
    crc = 0
    for k in sorted(batch):
        crc = zlib.crc32(np.ascontiguousarray(batch[k]).reshape(-1).view(np.uint8), crc)
    return crc


def _pipeline(dataset, c, loader: str, workers: int, threads: int):
    if loader == "index":
        return ds.Pipeline(dataset, int(c.batch_size), seed=int(c.seed))
    if loader == "grain":
        return gp.GrainPipeline(dataset, int(c.batch_size), seed=int(c.seed), workers=int(workers),
                                threads=int(threads))
    raise ValueError(f"unknown loader {loader!r} in data.points; use 'index' or 'grain'")


def _key(name: str, t: float) -> str:
    return f"data_{name}" if t == 0 else f"data_{name}_step{round(1000 * t)}ms"


def time_point(dataset, c, loader: str, workers: int, threads: int) -> dict:
    """Reads warmup batches, then `steps` batches per step time of `c.step_s` (sleeping that long
    after each) with one pipeline; returns {"images_per_s": {t: rate}, "first_batch_s", "crcs"}."""
    pipe = _pipeline(dataset, c, loader, workers, threads)
    n, warm, times = int(c.steps), int(c.warmup), [float(t) for t in c.step_s]
    total = warm + n * len(times)
    t0 = time.perf_counter()
    crcs, rates = [], {}
    if loader == "index":
        batches = (pipe.get_batch(s) for s in range(total))
        close = lambda: None  # noqa: E731
    else:
        it = pipe.iterator(0, total, process_index=0, process_count=1)
        batches, close = it, it.close
    try:
        first = None
        for s, batch in enumerate(batches):
            if s == 0:
                first = time.perf_counter() - t0
            k, pos = divmod(s - warm, n)
            if s >= warm and pos == 0:
                t1 = time.perf_counter()
            crcs.append(_crc(batch))
            if s >= warm:
                if times[k] > 0:
                    time.sleep(times[k])
                if pos == n - 1:
                    rates[times[k]] = n * int(c.batch_size) / (time.perf_counter() - t1)
    finally:
        close()
    return {"images_per_s": rates, "first_batch_s": first, "crcs": crcs}


def run(cfg, log=print) -> dict:
    """Runs the data bench (`cfg.data`, module docstring); returns flat results."""
    from dhjax.synthesis import synshot_data

    c = cfg.data
    if int(c.steps) < 1 or int(c.warmup) < 1 or int(c.rounds) < 1:
        raise ValueError(f"data.steps, data.warmup and data.rounds must be >= 1, got {c.steps}, {c.warmup}, "
                         f"{c.rounds}")
    if not c.step_s or any(float(t) < 0 for t in c.step_s) or len(set(c.step_s)) != len(c.step_s):
        raise ValueError(f"data.step_s must be distinct step times >= 0, got {c.step_s}")
    root = dataset_root(c)
    dataset = synshot_data.open_split(root, c.split, in_memory=False)
    w, h = synshot_data.image_size(dataset)
    out = {"data_root": str(root), "data_images": len(dataset), "data_image_size": f"{w}x{h}",
           "data_batch_size": int(c.batch_size), "data_steps": int(c.steps)}
    log(f"data bench: {len(dataset)} images of {w}x{h} in {root}/{c.split}, batches of {c.batch_size}, "
        f"{c.steps} timed batches per point and step time")
    names = [p[0] for p in c.points]
    if len(set(names)) != len(names):
        raise ValueError(f"data.points has repeated names: {names}")
    crcs, timings = {}, {name: [] for name in names}
    for _ in range(int(c.rounds)):
        for name, loader, workers, threads in c.points:
            r = time_point(dataset, c, loader, workers, threads)
            crcs.setdefault(name, r["crcs"])
            if r["crcs"] != crcs[name]:
                crcs[name] = None          # two reads of one point differ: never identical
            timings[name].append(r)
    times = [float(t) for t in c.step_s]
    for t in times:
        log(f" step time {t * 1000:.0f} ms:" if t else " pure input (no step):")
        for name, loader, workers, threads in c.points:
            rates = [r["images_per_s"][t] for r in timings[name]]
            rate = float(np.median(rates))
            out[f"{_key(name, t)}_images_per_s"] = rate
            log(f"  {name:12s} ({loader}, {workers} workers, {threads} threads): {rate:7.1f} images/s (median of "
                f"{len(rates)}: " + ", ".join(f"{r:.0f}" for r in rates) + ")")
        if "index" in names:
            base = out[f"{_key('index', t)}_images_per_s"]
            for name in names:
                if name != "index":
                    out[f"{_key(name, t)}_speedup_vs_index"] = out[f"{_key(name, t)}_images_per_s"] / base
            log("  vs index: " + ", ".join(f"{n} {out[f'{_key(n, t)}_speedup_vs_index']:.2f}x"
                                           for n in names if n != "index"))
    for name in names:
        out[f"data_{name}_first_batch_s"] = float(np.median([r["first_batch_s"] for r in timings[name]]))
    log("  first batch after: " + ", ".join(f"{n} {out[f'data_{n}_first_batch_s']:.2f} s" for n in names))
    first = crcs[names[0]]
    out["data_batches_identical"] = first is not None and all(v == first for v in crcs.values())
    log(f"  same batches at every point: {out['data_batches_identical']}")
    return out
