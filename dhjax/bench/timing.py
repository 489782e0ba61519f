"""Wall-clock timing of a blocking call, shared by every benchmark in `dhjax.bench`."""

import statistics
import time


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
