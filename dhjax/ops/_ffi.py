"""Loading and registering dhjax's compiled XLA FFI kernels (the python side of `kernels/`).

Each op `<op>` is built (by `pip install .`, or in-tree by `bash kernels/build_inplace.sh`) into
`dhjax/_kernels/libdhjax_<op>.so` (CPU handlers) and, with `-DDHJAX_CUDA=ON`,
`libdhjax_<op>_cuda.so` (CUDA handlers). This module finds those libraries, checks that they
were built from the same kernel ABI as this Python code, and registers their handlers with
`jax.ffi.register_ffi_target`.

Search order for the library directory:
  1. `$DHJAX_KERNEL_DIR` when set;
  2. `_kernels/` next to the imported `dhjax` package (in-tree builds, regular installs);
  3. `dhjax/_kernels/` of the installed `dhjax` distribution. This covers running the tests of
     a source checkout (pytest imports `dhjax` from the tree) after `pip install .`, which put
     the compiled libraries into site-packages.

When a library is missing, the ops fall back to their pure-JAX references (`backend="auto"`)
or raise an error that says how to build it (an explicit `backend="cpu"`/`"cuda"`). Set
`DHJAX_REQUIRE_KERNELS=1` (CI does) to make the kernel tests fail instead of skip when the
libraries are missing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
from pathlib import Path

import jax

# Bumped whenever a handler's signature changes; every library exports dhjax_kernel_abi().
KERNEL_ABI = 1

BUILD_HINT = (
    "build the kernels with `pip install .` (CUDA: `pip install . -C cmake.define.DHJAX_CUDA=ON`) "
    "or in the source tree with `bash kernels/build_inplace.sh [-DDHJAX_CUDA=ON]`"
)


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("DHJAX_KERNEL_DIR")
    if env:
        dirs.append(Path(env))
    import dhjax

    dirs.extend(Path(p) / "_kernels" for p in dhjax.__path__)
    try:
        from importlib import metadata

        dist = metadata.distribution("dhjax")
        dirs.append(Path(dist.locate_file("dhjax/_kernels")))
    except Exception:  # not installed (source checkout only)
        pass
    return dirs


def library_path(op: str, platform: str = "cpu") -> Path | None:
    """Path of the compiled library of `op` for `platform` ("cpu" or "cuda"), or None."""
    name = f"libdhjax_{op}.so" if platform == "cpu" else f"libdhjax_{op}_cuda.so"
    for d in _candidate_dirs():
        p = d / name
        if p.is_file():
            return p
    return None


@dataclasses.dataclass(frozen=True)
class LibraryInfo:
    """What opening one kernel library found (see `inspect_library`)."""
    path: Path
    abi: int | None        # the ABI the library reports; None when it could not be read
    error: str | None      # why the library is unusable (fails to load, no ABI symbol, stale ABI)
    _lib: ctypes.CDLL | None = None

    def symbols(self, names) -> set[str]:
        """The subset of `names` the library exports."""
        if self._lib is None:
            return set()
        return {n for n in names if hasattr(self._lib, n)}


def inspect_library(path: str | os.PathLike) -> LibraryInfo:
    """Opens a kernel library and reads its ABI without registering anything or raising (for
    `python -m dhjax.doctor`); the loader below raises on the same problems."""
    path = Path(path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:  # e.g. a CUDA library on a machine without the CUDA runtime
        return LibraryInfo(path, None, f"fails to load: {err}")
    if not hasattr(lib, "dhjax_kernel_abi"):
        return LibraryInfo(path, None, "exports no dhjax_kernel_abi(): not a dhjax kernel library", lib)
    fn = lib.dhjax_kernel_abi
    fn.restype = ctypes.c_int
    abi = int(fn())
    if abi != KERNEL_ABI:
        return LibraryInfo(path, abi, f"stale: built for kernel ABI {abi}, this dhjax expects {KERNEL_ABI}", lib)
    return LibraryInfo(path, abi, None, lib)


@functools.cache
def _load(op: str, platform: str) -> ctypes.CDLL | None:
    path = library_path(op, platform)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))  # OSError when it cannot load (callers may catch it)
    info = inspect_library(path)
    if info.error:
        raise RuntimeError(f"{path}: {info.error}; rebuild it ({BUILD_HINT})")
    return lib


def load_built(op: str, platform: str = "cpu") -> ctypes.CDLL:
    """The kernel library of `op` for its plain C helpers (called through ctypes, outside XLA);
    RuntimeError naming the build command when it is not built."""
    lib = _load(op, platform)
    if lib is None:
        raise RuntimeError(f"the {platform} kernel of '{op}' is not built: {BUILD_HINT}")
    return lib


@functools.cache
def register(op: str, platform: str, targets: tuple[tuple[str, str], ...]) -> bool:
    """Register the handlers of `op` on `platform`; returns False when the library is missing.

    Args:
      op: kernel folder name, e.g. "splat".
      platform: "cpu" or "cuda".
      targets: ((ffi target name, exported C symbol), ...).
    """
    lib = _load(op, platform)
    if lib is None:
        return False
    xla_platform = "cpu" if platform == "cpu" else "CUDA"
    for target, symbol in targets:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform=xla_platform)
    return True


_C_SPACE = " \t\n\v\f\r"      # what C's atoi skips before a number


def kernel_env_problems(environ=None, op: str | None = None) -> list[str]:
    """What is wrong with the environment variables the CPU kernels read (empty when nothing):
    DHJAX_NUM_THREADS must be a positive integer (the thread count; at most 2^31 - 1) and, for
    the splat kernel (`op` "splat" or None: every op), DHJAX_SPLAT_LANES 4 or 8 (its lane width).
    An empty value counts as unset. The C++ side would ignore a bad value and use its default,
    so a typo would go unnoticed; `resolve_backend` raises on these instead."""
    env = os.environ if environ is None else environ
    problems = []
    threads = env.get("DHJAX_NUM_THREADS", "")
    if threads != "" and not (re.fullmatch(f"[{_C_SPACE}]*[0-9]+[{_C_SPACE}]*", threads)
                              and 0 < int(threads) <= 2 ** 31 - 1):
        problems.append(f"DHJAX_NUM_THREADS={threads!r}: the CPU kernels' thread count must be a positive "
                        "integer (unset it to use every core)")
    lanes = env.get("DHJAX_SPLAT_LANES", "")
    if op in (None, "splat") and lanes != "" and lanes.strip(_C_SPACE) not in ("4", "8"):
        problems.append(f"DHJAX_SPLAT_LANES={lanes!r}: the splat kernel's lane width must be 4 or 8 (8 runs "
                        "only where the CPU has AVX2; unset it for the default)")
    return problems


def resolve_backend(backend: str, op: str, targets_by_platform: dict[str, tuple[tuple[str, str], ...]]) -> str:
    """Map "auto" | "reference" | "cpu" | "cuda" to the implementation that will run.

    "auto" takes the kernel of JAX's default backend when its library is built, else the
    pure-JAX reference. An explicit kernel backend whose library is missing is an error.
    """
    if backend not in ("auto", "reference", "cpu", "cuda"):
        raise ValueError(f"backend must be 'auto', 'reference', 'cpu' or 'cuda', got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "auto":
        if jax.default_backend() not in ("cpu", "gpu"):
            return "reference"
        platform = "cuda" if jax.default_backend() == "gpu" else "cpu"
        # Register every built library: the target names are shared, so a computation placed on
        # the other platform (e.g. under jax.default_device(cpu) on a GPU host) lowers too.
        other = "cpu" if platform == "cuda" else "cuda"
        if other in targets_by_platform:
            try:
                register(op, other, targets_by_platform[other])
            except (OSError, RuntimeError):  # e.g. a CUDA library without a CUDA runtime here
                pass
        resolved = platform if register(op, platform, targets_by_platform[platform]) else "reference"
    elif not register(op, backend, targets_by_platform[backend]):
        raise RuntimeError(f"the {backend} kernel of '{op}' is not built: {BUILD_HINT}")
    else:
        resolved = backend
    # Only the CPU kernels read these variables (at every call). The check runs when a call is
    # traced, so a program compiled before a variable changed is not checked again.
    problems = kernel_env_problems(op=op) if resolved == "cpu" else []
    if problems:
        raise ValueError("; ".join(problems))
    return resolved


def require_kernels() -> bool:
    """True when the environment asks kernel tests to fail instead of skip (DHJAX_REQUIRE_KERNELS=1)."""
    return os.environ.get("DHJAX_REQUIRE_KERNELS", "") not in ("", "0")
