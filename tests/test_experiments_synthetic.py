"""Smoke tests of the synthetic-data entry points (slow: each compiles the generator anew)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dhjax import io as dio
from dhjax.data import dataset as ds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_make_synthetic_writes_datasets_and_contact_sheet(tmp_path):
    out = run("experiments.make_synthetic", "--config=configs/make_synthetic.py:tiny",
              "--config.uv_size=64", "--config.multiview.n_identities=2", "--config.multiview.width=48",
              "--config.multiview.height=48", "--config.video.n_frames=4", "--config.video.width=48",
              "--config.video.height=48", "--config.sheet.n_identities=2", f"--workdir={tmp_path}")
    assert "contact sheet of 24 samples" in out
    sheet = dio.load_image(tmp_path / "contact_sheet.png")
    assert sheet.shape[0] > 3 * 48 and sheet.std() > 0.05
    mv = ds.FolderDataset(tmp_path / "multiview", "train")
    assert len(mv) == 2 * 28
    assert len(ds.FolderDataset(tmp_path / "video", "train")) == 2 * 4
    assert json.loads((tmp_path / "summary.json").read_text())["multiview"]["images"] == 56
    s = mv[3]
    assert s["image"].shape == (48, 48, 3) and s["uv_position"].shape == (64, 64, 3)


@pytest.mark.slow
def test_bench_synthetic_reports_samples_per_second(tmp_path):
    run("experiments.bench", "--config=configs/bench.py:synthetic", "--config.synthetic.sizes=(32,)",
        "--config.synthetic.uv_size=32", "--config.synthetic.n_identities=1", "--config.synthetic.n_views=2",
        f"--workdir={tmp_path}")
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["synthetic_32_samples_per_s"] > 0 and res["synthetic_32_group_samples_per_s"] > 0
    assert np.isfinite(res["synthetic_32_samples_per_s"])
