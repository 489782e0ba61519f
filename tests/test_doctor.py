"""`python -m dhjax.doctor`: the environment report, its fallback and stale-library warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dhjax import doctor
from dhjax.ops import _ffi

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reports_backend_devices_processes_and_kernels():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "dhjax.doctor"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "default backend: cpu" in text
    assert "device 0: cpu" in text
    assert "processes: 1 (this is process 0)" in text
    for op in doctor.KERNEL_MODULES:
        assert f"{op} -> " in text
    assert f"kernel ABI {_ffi.KERNEL_ABI}" in text


def test_built_kernels_are_used_by_auto():
    if _ffi.library_path("bvh", "cpu") is None:
        if _ffi.require_kernels():
            pytest.fail("DHJAX_REQUIRE_KERNELS=1 but the CPU kernels are not built")
        pytest.skip("CPU kernels not built")
    report = doctor.diagnose()
    for op in doctor.KERNEL_MODULES:
        cpu = next(s for s in report.kernels if s.op == op and s.platform == "cpu")
        assert cpu.usable and cpu.abi == _ffi.KERNEL_ABI, cpu.describe()
        assert report.auto[op] == "cpu"
    assert not [w for w in report.warnings if "falls back" in w]
    assert doctor.main(["--strict"]) == 0


def test_kernels_from_another_folder_get_a_note_not_a_warning(tmp_path, monkeypatch):
    """A source tree run with an installed copy's (or $DHJAX_KERNEL_DIR's) libraries works, but
    those were built from other sources: the report says where they come from and how to build
    this tree's, without failing --strict (CI runs the checkout's tests on its pip install)."""
    if _ffi.library_path("bvh", "cpu") is None:
        pytest.skip("CPU kernels not built")
    if os.path.dirname(os.path.realpath(_ffi.library_path("bvh", "cpu"))) == os.path.realpath(doctor._own_kernel_dir()):
        # built in the tree (bash kernels/build_inplace.sh): no note
        assert not [line for line in doctor.diagnose().lines if line.startswith("note: the kernels in")]
    for op in doctor.KERNEL_MODULES:
        shutil.copy(_ffi.library_path(op, "cpu"), tmp_path)
    monkeypatch.setenv("DHJAX_KERNEL_DIR", str(tmp_path))
    report = doctor.diagnose()
    note = [line for line in report.lines if line.startswith("note: the kernels in")]
    assert len(note) == 1 and str(tmp_path) in note[0] and "kernels/build_inplace.sh" in note[0], report.lines
    assert all(k.path.startswith(str(tmp_path)) for k in report.kernels if k.platform == "cpu")
    assert not report.warnings and doctor.main(["--strict"]) == 0


def test_missing_libraries_warn_of_the_reference_fallback(monkeypatch, capsys):
    monkeypatch.setattr(_ffi, "library_path", lambda op, platform="cpu": None)
    report = doctor.diagnose()
    assert report.auto == {op: "reference" for op in doctor.KERNEL_MODULES}
    for op in doctor.KERNEL_MODULES:
        assert any(w.startswith(f"{op}: backend='auto' falls back to the pure-JAX reference") for w in report.warnings)
    assert doctor.main([]) == 0
    assert doctor.main(["--strict"]) == 1
    assert "WARNING: bvh: backend='auto' falls back" in capsys.readouterr().out


def _compile_library(tmp_path: Path, body: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a test library")
    src = tmp_path / "lib.c"
    src.write_text(body)
    lib = tmp_path / "libfake.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib


def test_stale_library_is_reported_not_raised(tmp_path, monkeypatch):
    lib = _compile_library(tmp_path, f"int dhjax_kernel_abi(void) {{ return {_ffi.KERNEL_ABI + 41}; }}\n")
    real = _ffi.library_path
    monkeypatch.setattr(_ffi, "library_path",
                        lambda op, platform="cpu": lib if (op, platform) == ("bvh", "cpu") else real(op, platform))
    st = doctor.kernel_status("bvh", "cpu")
    assert not st.usable and st.abi == _ffi.KERNEL_ABI + 41 and "stale" in st.error
    report = doctor.diagnose()
    assert report.auto["bvh"] == "reference"
    assert any("bvh cpu library is unusable" in w and "stale" in w for w in report.warnings)


def test_library_without_handlers_lists_the_missing_symbols(tmp_path, monkeypatch):
    lib = _compile_library(tmp_path, f"int dhjax_kernel_abi(void) {{ return {_ffi.KERNEL_ABI}; }}\n")
    monkeypatch.setattr(_ffi, "library_path", lambda op, platform="cpu": lib if op == "splat" and platform == "cpu" else None)
    st = doctor.kernel_status("splat", "cpu")
    assert st.abi == _ffi.KERNEL_ABI and not st.usable
    assert set(st.symbols_missing) == {sym for _, sym in doctor.kernel_targets("splat")["cpu"]}


def test_inspect_library_names_an_unloadable_file(tmp_path):
    bad = tmp_path / "libdhjax_bvh.so"
    bad.write_bytes(b"not an ELF file")
    info = _ffi.inspect_library(bad)
    assert info.abi is None and info.error.startswith("fails to load")


def test_distributed_with_a_bad_environment_is_one_error_line(monkeypatch, capsys):
    from dhjax import doctor

    for key in ("DHJAX_COORDINATOR", "DHJAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DHJAX_NUM_PROCESSES", "2")
    assert doctor.main(["--distributed"]) == 2
    assert capsys.readouterr().err.startswith("error: DHJAX_NUM_PROCESSES=2 needs DHJAX_COORDINATOR")


def test_bad_kernel_environment_variables_are_named(monkeypatch):
    """DHJAX_NUM_THREADS and DHJAX_SPLAT_LANES with values the C++ side would silently ignore:
    the doctor warns (failing --strict) and a CPU kernel call raises a ValueError naming them;
    the pure-JAX reference, and kernels that do not read a variable, are unaffected."""
    problems = _ffi.kernel_env_problems
    assert problems({}) == [] and problems({"DHJAX_NUM_THREADS": "", "DHJAX_SPLAT_LANES": ""}) == []
    assert problems({"DHJAX_NUM_THREADS": " 3\n", "DHJAX_SPLAT_LANES": "4"}) == []
    assert problems({"DHJAX_NUM_THREADS": str(2 ** 31 - 1), "DHJAX_SPLAT_LANES": "8"}) == []
    # atoi would read 0, a negative number or nothing from these: the kernels would ignore them
    for bad in ("two", "0", "-1", "2.5", "2147483648", "4294967296", "\u00b2", "\u0663", "\x1c3"):
        (p,) = problems({"DHJAX_NUM_THREADS": bad})
        assert p.startswith(f"DHJAX_NUM_THREADS={bad!r}: ") and "positive integer" in p
    for bad in ("16", "avx2", "\u00a04"):
        (p,) = problems({"DHJAX_SPLAT_LANES": bad})
        assert p.startswith(f"DHJAX_SPLAT_LANES={bad!r}: ") and "4 or 8" in p
        assert problems({"DHJAX_SPLAT_LANES": bad}, op="bvh") == []       # read by the splat kernel only
    before = len(doctor.diagnose().warnings)
    monkeypatch.setenv("DHJAX_NUM_THREADS", "all")
    report = doctor.diagnose()
    assert len(report.warnings) == before + 1
    assert report.warnings[-1].startswith("DHJAX_NUM_THREADS='all': ")
    assert "CPU kernel threads: DHJAX_NUM_THREADS='all'" in report.text()
    assert doctor.main(["--strict"]) == 1
    assert _ffi.resolve_backend("reference", "bvh", {"cpu": ()}) == "reference"
    if _ffi.library_path("bvh", "cpu") is None:
        if _ffi.require_kernels():
            pytest.fail("DHJAX_REQUIRE_KERNELS=1 but the CPU kernels are not built")
        pytest.skip("CPU kernels not built")
    for backend in ("auto", "cpu"):
        with pytest.raises(ValueError, match="DHJAX_NUM_THREADS='all': the CPU kernels' thread count"):
            _ffi.resolve_backend(backend, "bvh", {"cpu": ()})
