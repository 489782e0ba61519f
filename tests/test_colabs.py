"""The notebooks of colabs/ run top to bottom, carry no outputs, and are all listed in its README.

Each notebook is executed in a fresh Jupyter kernel (nbclient + ipykernel, the `test` extra)
with the repository root on PYTHONPATH and a temporary working directory, so whatever a
notebook writes lands outside the checkout; two kernels run at a time (DHJAX_NOTEBOOK_WORKERS).
A cell that raises fails the test with the cell's traceback. The notebooks are meant to take
<= 3 minutes each on a 2-core CPU.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} carry outputs or execution counts; clear "
                       f"them before committing (jupyter nbconvert --clear-output --inplace {path.name})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_opens_with_an_install_cell(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "pip" in code[0].source and "find_spec(\"dhjax\")" in code[0].source, (
        f"{path.name}: the first code cell must install dhjax when it is not importable")


def test_install_cell_finds_configs_next_to_an_installed_dhjax(tmp_path):
    """With dhjax importable but not the checkout's configs/ (dhjax installed, the notebook
    opened from a checkout's colabs/), the install cell puts the checkout on sys.path instead of
    cloning; run in a subprocess with a stand-in dhjax package and a DHJAX_REPO that cannot be
    cloned, so any clone or pip install fails the test."""
    import nbformat

    stub = tmp_path / "site" / "dhjax"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    probe = tmp_path / "probe.py"
    for path in NOTEBOOKS:
        cell = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"][0].source
        probe.write_text(cell + "\nimport configs, experiments\nprint(os.path.dirname(configs.__file__))\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONPATH=str(tmp_path / "site"), DHJAX_REPO=str(tmp_path / "no-such-repo"))
        run = subprocess.run([sys.executable, str(probe)], cwd=COLABS, env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, f"{path.name}: {run.stderr[-1500:]}"
        assert Path(run.stdout.strip().splitlines()[-1]) == ROOT / "configs", (path.name, run.stdout)
        assert not (COLABS / "dhjax-src").exists()


def test_readme_lists_every_notebook():
    readme = (COLABS / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if p.stem not in readme]
    assert not missing, f"colabs/README.md does not list {missing}"
    for name in re.findall(r"colabs/(\w+)\.ipynb", readme):
        assert (COLABS / f"{name}.ipynb").exists(), f"colabs/README.md links {name}.ipynb, which does not exist"


# A notebook's kernel spends much of its time compiling on one thread, so two kernels at a time
# finish the seven notebooks sooner on a 2-core CI machine than one after another.
WORKERS = max(1, int(os.environ.get("DHJAX_NOTEBOOK_WORKERS", "2")))

_RUNNER = r"""
import sys
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
path, workdir, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
nb = nbformat.read(path, as_version=4)
try:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
except CellExecutionError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
"""


def _execute(path: Path, workdir: Path, procs: list | None = None) -> tuple[int, str, float]:
    """Runs a notebook in a fresh kernel (in a subprocess, with the checkout on PYTHONPATH);
    returns (exit code, the failing cell's traceback or the runner's errors, seconds). The
    subprocess is appended to `procs` (so a teardown can kill it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, str(path), str(workdir), str(CELL_TIMEOUT_S)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if procs is not None:
        procs.append(proc)
    try:
        _, err = proc.communicate(timeout=CELL_TIMEOUT_S * 4)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return proc.returncode, (err or "")[-6000:], time.perf_counter() - t0


@pytest.fixture(scope="module")
def executions(request, tmp_path_factory):
    """The selected notebooks submitted at once to WORKERS concurrent kernels, in the tests'
    order; at teardown whatever still runs is killed (with its kernel)."""
    wanted = [p for p in NOTEBOOKS if any(item.name == f"test_notebook_runs_top_to_bottom[{p.stem}]"
                                          for item in request.session.items)]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
    procs: list = []
    futures = {p: pool.submit(_execute, p, tmp_path_factory.mktemp(p.stem), procs) for p in wanted}
    yield futures
    for f in futures.values():
        f.cancel()
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    pool.shutdown(wait=True)


def test_a_failing_cell_fails_with_its_traceback(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('cell two broke')")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    code, err, _ = _execute(path, tmp_path)
    assert code == 3 and "ValueError" in err and "cell two broke" in err, (code, err)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, executions, record_property):
    code, err, seconds = executions[path].result()
    record_property("notebook_seconds", seconds)     # printed at the end of the run (conftest.py)
    assert code == 0, f"{path.name} failed (exit {code}):\n{err}"
