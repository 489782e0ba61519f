"""Shared pytest setup: markers for GPU tests; notebook wall times.

The suite runs one test file per worker (`pytest -n auto --maxprocesses=4 --dist loadfile`, as
.ci/run does): a file's module fixtures are built once, in one process."""

import jax
import pytest


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
