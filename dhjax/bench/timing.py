"""Wall-clock timing of a blocking call, and loading a method's config by `path:variant`, shared
by the benchmarks in `dhjax.bench`."""

import statistics
import time
from pathlib import Path

from dhjax.train import config as config_lib


def time_call(fn, repeats, warmup):
    """Median wall time (s) of fn() over `repeats` calls after `warmup` untimed ones (compilation
    belongs in the warm-up); fn must block until its result is ready."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_config(spec: str):
    """The ConfigDict of `spec` ("configs/<name>.py:<variant>"). A relative path that is not a file
    from the current folder is looked up in the source checkout this dhjax comes from, so a bench
    config naming "configs/insta.py:tiny" works from any folder of an editable install."""
    path, sep, variant = spec.partition(":")
    p = Path(path)
    if not p.is_file() and not p.is_absolute():
        repo = Path(__file__).resolve().parents[2] / path
        if repo.is_file():
            p = repo
    return config_lib.load_config(f"{p}{sep}{variant}")
