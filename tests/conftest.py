"""Shared pytest setup: fast-compile XLA options, markers for peer-implementation and GPU tests;
notebook wall times."""

import importlib.util
import os
import subprocess
import sys

# Most of the suite's time on a CPU is XLA compiling small programs, not running them. LLVM at
# -O0 and XLA:CPU's classic (non-MLIR) fusion emitters compile them in about half the time
# (tests/test_synthesis_gem.py + test_capture_tracker.py + test_synthesis_d3ga.py: 403 s -> 224 s
# on 2 cores) and change nothing that is computed beyond float rounding. Set before JAX creates
# its CPU backend; subprocesses inherit them (harness_common.xla_flags keeps them when adding
# fake devices). DHJAX_TEST_XLA_DEFAULTS=1 keeps XLA's defaults (e.g. to time code in a test).
# CPU only: with a CUDA plugin installed (a GPU machine, `pytest -m gpu`) XLA's defaults stay, as
# the backend-optimisation level would also apply to the GPU compiler. XLA aborts on a flag it
# does not know, so a subprocess tries them first (about 2 s) and a jaxlib without one of them
# gets none.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


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
