"""kernels/gpu_check.sh, the prepared GPU run, cannot rot unnoticed on machines without a GPU:
it parses, and without a GPU it stops at once with exit 2 and says why (both modes)."""

import os
import subprocess
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "kernels" / "gpu_check.sh"


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the script would run for minutes")
@pytest.mark.parametrize("mode", ["check", "goals"])
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path, mode):
    # A copy in an empty tree: the script works from its parent's parent (no carried wheels, and
    # its scratch folder runs/gpu_check_work lands in tmp_path, not in the checkout).
    (tmp_path / "kernels").mkdir()
    script = tmp_path / "kernels" / SCRIPT.name
    script.write_text(SCRIPT.read_text())
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ON_CPU"}
    env["GPU_CHECK_MODE"] = mode
    proc = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "no CUDA GPU is visible to JAX" in summary and "Nothing was run" in summary
    assert "python" in (tmp_path / "out" / "env.txt").read_text()
    assert not (tmp_path / "out" / "build.log").exists()
