"""Shared by the kernel test modules (not a test module itself)."""

import pytest

from dhjax.ops import _ffi


def need_kernel(available: bool, what: str, build: str = "bash kernels/build_inplace.sh") -> None:
    """Skip the calling test or fixture when `what` is not built, or fail when
    DHJAX_REQUIRE_KERNELS is set (CI builds the kernels, so there a missing one is a bug)."""
    if available:
        return
    msg = f"{what} is not built ({build})"
    if _ffi.require_kernels():
        pytest.fail(msg + " but DHJAX_REQUIRE_KERNELS is set")
    pytest.skip(msg)
