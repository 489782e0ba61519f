"""`python -m dhjax.doctor`: what this environment runs dhjax on, and what would fall back.

Prints, in this order:
  - versions: dhjax (and where it is imported from), Python, jax, jaxlib, the installed JAX
    plugins (e.g. jax-cuda13-plugin);
  - JAX: the default backend, every device (platform, kind), process index and count, local
    device count;
  - kernels: for each compiled XLA FFI op (bvh, hashgrid, raymarch, splat) and platform (cpu,
    cuda), the library's path and kernel ABI, or why it is unusable (missing, stale ABI, fails
    to load), and which implementation `backend="auto"` runs for the default backend; a note
    when usable libraries come from elsewhere than the imported package's `_kernels/` (an
    installed copy or $DHJAX_KERNEL_DIR, built from other sources than the tree being run);
  - warnings: an op that would fall back to its pure-JAX reference on the default backend (it
    works, but slower), a stale library, a GPU visible to the driver but not to JAX.

The exit status is 0, or 1 with `--strict` when there is any warning (for CI and job scripts
that must not run on a fallback). `--distributed` first calls `dhjax.train.app.init_distributed`
(the multi-host set-up the experiments use), so the process count is the job's.

This module inspects libraries without registering them: `dhjax.ops._ffi.inspect_library` opens a
library and reads its ABI without the cached loader, so a stale library is reported, not raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import platform as _platform
import shutil
import sys
from importlib import metadata
from typing import Sequence

import jax

import dhjax
from dhjax.ops import _ffi

# op name -> module whose `_TARGETS` maps platform -> ((ffi target, C symbol), ...)
KERNEL_MODULES = {
    "bvh": "dhjax.ops.bvh",
    "hashgrid": "dhjax.ops.hashgrid",
    "raymarch": "dhjax.ops.raymarch",
    "splat": "dhjax.ops.splat",
}
PLATFORMS = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """One kernel library as `diagnose` found it: usable when it is built (`path`), `error` is
    None and no symbol is missing."""
    op: str
    platform: str                 # "cpu" | "cuda"
    path: str | None              # library path, None when missing
    abi: int | None               # ABI the library reports, None when it could not be read
    error: str | None             # why the library is unusable, None when usable
    symbols_missing: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Built, loadable, of this ABI and with every handler symbol."""
        return self.path is not None and self.error is None and not self.symbols_missing

    def describe(self) -> str:
        """One line for the report: 'not built', the path and ABI, or why it is unusable."""
        if self.path is None:
            return "not built"
        if self.error:
            return f"{self.path}: {self.error}"
        if self.symbols_missing:
            return f"{self.path}: ABI {self.abi}, missing symbols {', '.join(self.symbols_missing)}"
        return f"{self.path} (ABI {self.abi})"


@dataclasses.dataclass
class Report:
    """`diagnose`'s findings: the lines it prints, the warnings (what `--strict` fails on), each
    kernel library's status and what backend="auto" runs for each op."""
    lines: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    kernels: list[KernelStatus] = dataclasses.field(default_factory=list)
    auto: dict[str, str] = dataclasses.field(default_factory=dict)   # op -> implementation of "auto"

    def text(self) -> str:
        """The printed report: the lines, then the warnings."""
        out = list(self.lines)
        out.append("")
        if self.warnings:
            out.extend(f"WARNING: {w}" for w in self.warnings)
        else:
            out.append("no warnings: every op runs its compiled kernel on the default backend")
        return "\n".join(out)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def jax_plugins() -> list[str]:
    """Installed distributions that plug a backend into jaxlib: ['jax-cuda13-plugin 0.x', ...]."""
    found = []
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("jax-cuda") or name.startswith("jax_cuda") or name.startswith("jax-rocm"):
            found.append(f"{name} {dist.version}")
    return sorted(set(found))


def kernel_targets(op: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """platform -> ((ffi target, exported C symbol), ...) of one op, as its module registers them."""
    return importlib.import_module(KERNEL_MODULES[op])._TARGETS


def kernel_status(op: str, platform: str) -> KernelStatus:
    """What `op`'s library for `platform` is: missing, stale, unloadable, or usable (with its ABI)."""
    path = _ffi.library_path(op, platform)
    if path is None:
        return KernelStatus(op, platform, None, None, None)
    info = _ffi.inspect_library(path)
    if info.error:
        return KernelStatus(op, platform, str(path), info.abi, info.error)
    symbols = [sym for _, sym in kernel_targets(op).get(platform, ())]
    missing = tuple(s for s in symbols if s not in info.symbols(symbols))
    return KernelStatus(op, platform, str(path), info.abi, None, missing)


def _gpu_visible_to_driver() -> bool:
    return shutil.which("nvidia-smi") is not None


def diagnose(distributed: bool = False) -> Report:
    """Collects the report (see the module docstring); prints nothing."""
    if distributed:
        from dhjax.train import app

        app.init_distributed()
    r = Report()
    r.lines.append(f"dhjax {dhjax.__version__} from {os.path.dirname(os.path.abspath(dhjax.__file__))}")
    r.lines.append(f"python {_platform.python_version()} ({sys.executable})")
    r.lines.append(f"jax {jax.__version__}, jaxlib {_version('jaxlib') or '?'}")
    plugins = jax_plugins()
    r.lines.append(f"jax plugins: {', '.join(plugins) if plugins else 'none'}")
    r.lines.append("")
    backend = jax.default_backend()
    r.lines.append(f"default backend: {backend}")
    for d in jax.devices():
        r.lines.append(f"  device {d.id}: {d.platform} ({d.device_kind}), process {d.process_index}")
    r.lines.append(f"processes: {jax.process_count()} (this is process {jax.process_index()}), "
                   f"local devices: {jax.local_device_count()}")
    if backend == "cpu" and _gpu_visible_to_driver():
        r.warnings.append("nvidia-smi finds a GPU but JAX runs on the CPU: install jaxlib's CUDA plugin "
                          "(pip install \".[cuda]\") and check that JAX_PLATFORMS does not exclude cuda")
    r.lines.append("")
    r.lines.append(f"kernels (this dhjax expects kernel ABI {_ffi.KERNEL_ABI}):")
    kernel_platform = {"cpu": "cpu", "gpu": "cuda"}.get(backend)
    for op in KERNEL_MODULES:
        for plat in PLATFORMS:
            st = kernel_status(op, plat)
            r.kernels.append(st)
            r.lines.append(f"  {op:9s} {plat:4s}  {st.describe()}")
            if st.path is not None and not st.usable:
                r.warnings.append(f"{op} {plat} library is unusable ({st.describe()}); rebuild: {_ffi.BUILD_HINT}")
        if kernel_platform is None:
            r.auto[op] = "reference"
            r.warnings.append(f"{op}: no compiled kernel exists for the '{backend}' backend; it runs the "
                              f"pure-JAX reference")
            continue
        own = next(s for s in r.kernels if s.op == op and s.platform == kernel_platform)
        r.auto[op] = kernel_platform if own.usable else "reference"
        if not own.usable:
            r.warnings.append(f"{op}: backend='auto' falls back to the pure-JAX reference on {backend} "
                              f"(the {kernel_platform} kernel is {own.describe()}); {_ffi.BUILD_HINT}")
    r.lines.append("backend='auto' runs: " + ", ".join(f"{op} -> {impl}" for op, impl in r.auto.items()))
    threads = os.environ.get("DHJAX_NUM_THREADS")
    lanes = os.environ.get("DHJAX_SPLAT_LANES")
    r.lines.append(f"CPU kernel threads: {'DHJAX_NUM_THREADS=' + repr(threads) if threads is not None else 'every core'} "
                   f"({os.cpu_count()} here); splat lanes: "
                   f"{'DHJAX_SPLAT_LANES=' + repr(lanes) if lanes is not None else 'default (8 with AVX2, else 4)'}")
    r.warnings.extend(f"{p}; a CPU kernel call traced while it is set raises a ValueError" for p in _ffi.kernel_env_problems())
    elsewhere = _kernels_elsewhere(r.kernels)
    if elsewhere:
        r.lines.append(f"note: the kernels in {', '.join(elsewhere)} are not this dhjax's own "
                       f"({_own_kernel_dir()}): they were built from the sources of that installation "
                       f"(or $DHJAX_KERNEL_DIR), so after changing or updating this tree rebuild them here with "
                       f"`bash kernels/build_inplace.sh` (or reinstall)")
    return r


def _own_kernel_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(dhjax.__file__)), "_kernels")


def _kernels_elsewhere(kernels: Sequence[KernelStatus]) -> list[str]:
    """The folders, other than the imported dhjax package's `_kernels/`, that usable libraries
    come from (e.g. a source checkout whose dhjax is imported from the tree while its kernels
    come from an earlier `pip install .`): a note, not a warning, since that is how the tests of
    a checkout run after `pip install .`."""
    own = os.path.realpath(_own_kernel_dir())
    dirs = {os.path.dirname(os.path.realpath(k.path)) for k in kernels if k.path is not None and k.usable}
    return sorted(d for d in dirs if d != own)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the report; exit status 2 on a bad --distributed setup, 1 with
    --strict when there is a warning, else 0."""
    parser = argparse.ArgumentParser(prog="python -m dhjax.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when there is any warning")
    parser.add_argument("--distributed", action="store_true",
                        help="initialise jax.distributed first (as the experiments do) to see the job's processes")
    args = parser.parse_args(argv)
    try:
        report = diagnose(distributed=args.distributed)
    except ValueError as err:           # --distributed: app.RunError naming a missing or bad DHJAX_* variable
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(report.text(), flush=True)
    return 1 if (args.strict and report.warnings) else 0


if __name__ == "__main__":
    sys.exit(main())
