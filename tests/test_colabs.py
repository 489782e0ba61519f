"""The notebooks of colabs/ run top to bottom, carry no outputs, and are all listed in its README.

Each notebook is executed in a fresh Jupyter kernel (nbclient + ipykernel, the `test` extra)
with the repository root on PYTHONPATH and a temporary working directory, so whatever a
notebook writes lands outside the checkout. A cell that raises fails the test with the cell's
traceback. The notebooks are meant to take <= 3 minutes each on a 2-core CPU.
"""

from __future__ import annotations

import os
import re
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


def test_readme_lists_every_notebook():
    readme = (COLABS / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if p.stem not in readme]
    assert not missing, f"colabs/README.md does not list {missing}"
    for name in re.findall(r"colabs/(\w+)\.ipynb", readme):
        assert (COLABS / f"{name}.ipynb").exists(), f"colabs/README.md links {name}.ipynb, which does not exist"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path   # the kernel inherits it: the checkout's dhjax is imported
    try:
        NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
