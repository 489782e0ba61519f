"""Wall-clock timing of a blocking call, loading a method's config by `path:variant` and importing
the peers a benchmark compares against, shared by the benchmarks in `dhjax.bench`."""

import importlib
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


def import_peers(*modules: str):
    """(modules, None) when every named module imports, else (None, why) with why saying which one
    failed and how: not installed (the `peers` extra names them) or installed but failing to load
    (e.g. open3d without the system's libusb), with the error. Benchmarks skip that peer's timings."""
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name is not None and name.split(".")[0] == e.name.split(".")[0]:
                return None, f"{name} not installed (pip install '.[peers]')"
            return None, f"{name} is installed but could not be imported ({e})"
        except (ImportError, OSError) as e:
            return None, f"{name} is installed but could not be imported ({type(e).__name__}: {e})"
    return loaded, None


def import_smplx(torch_threads: int, log):
    """(torch, smplx.lbs), the peer of the head- and body-model benches, with torch limited to
    `torch_threads` threads (0: torch's default); (None, None) after logging why when either
    cannot be imported (`import_peers`)."""
    peers, why = import_peers("torch", "smplx.lbs")
    if why:
        log(f"{why}: peer timings skipped")
        return None, None
    torch, smplx_lbs = peers
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return torch, smplx_lbs
