"""Shared pytest setup: markers for peer-implementation and GPU tests."""

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
