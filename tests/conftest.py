"""Shared pytest setup: fast-compile XLA options, markers for GPU tests; notebook wall times.

The suite runs one test file per worker (`pytest -n auto --maxprocesses=4 --dist loadfile`, as
.ci/run does): a file's module fixtures are built once, in one process."""

import importlib.util
import os
import subprocess
import sys

# Most of the suite's time on a CPU is XLA compiling small programs. LLVM at -O0 compiles them
# with less work: on CI's 2 cores with two xdist workers the suite took 27.9 min (51 CPU-minutes)
# with it and 34.7 min (65 CPU-minutes) without (December 2026; in one process the wall times
# were level, 43.9 against 42.4 min). Every test passes with it. XLA:CPU's classic fusion
# emitters (--xla_cpu_use_fusion_emitters=false) would save more but round differently from the
# default emitters: 11 tests that compare two programs at 1e-6 failed with them. Set before JAX
# creates its CPU backend; subprocesses inherit it (harness_common.xla_flags keeps it when adding
# fake devices). DHJAX_TEST_XLA_DEFAULTS=1 keeps XLA's defaults. CPU only: with a CUDA plugin
# installed (`pytest -m gpu` on a GPU machine) XLA's defaults stay, as the optimisation level
# would also apply to the GPU compiler. XLA aborts on a flag it does not know, so a subprocess
# tries the flag first (about 2 s) and a jaxlib without it gets XLA's defaults.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",)


def _fast_compile_flags_apply() -> bool:
    if os.environ.get("DHJAX_TEST_XLA_DEFAULTS", "") == "1":
        return False
    if any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return False
    probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"],
                           env=dict(os.environ, XLA_FLAGS=" ".join(FAST_COMPILE_FLAGS), JAX_PLATFORMS="cpu"),
                           capture_output=True, timeout=120)
    return probe.returncode == 0


if _fast_compile_flags_apply():
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([_flags] + [f for f in FAST_COMPILE_FLAGS
                                                  if f.split("=")[0] not in _flags]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


def pytest_sessionstart(session):
    """The tests must import this checkout's dhjax. An editable install of another checkout
    (`pip install -e`, whose import hook runs before sys.path) would silently test that one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.find_spec("dhjax")
    origin = os.path.abspath(spec.origin) if spec and spec.origin else None
    if origin is None or os.path.commonpath([origin, root]) != root:
        pytest.exit(f"`import dhjax` gives {origin}, not this checkout ({root}): an install of another checkout "
                    "shadows it (an editable one takes over `import dhjax` everywhere); run `pip install -e .` "
                    "here or `pip uninstall dhjax`", returncode=4)


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if _backend_ok() else False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def _backend_ok():
    try:
        jax.devices()
        return True
    except RuntimeError:
        return False


def pytest_terminal_summary(terminalreporter):
    """One line per executed notebook with its own wall time (tests/test_colabs.py records it as
    the user property `notebook_seconds`; the test's duration also counts waiting for a kernel)."""
    rows = [(r.nodeid, dict(r.user_properties)["notebook_seconds"])
            for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
            if r.when == "call" and "notebook_seconds" in dict(getattr(r, "user_properties", []))]
    if rows:
        terminalreporter.write_sep("-", "notebook wall times")
        for nodeid, seconds in rows:
            terminalreporter.write_line(f"{seconds:6.0f} s  {nodeid}")
