"""The synthetic-data entry points' library functions, in-process (slow: each compiles the
generator anew)."""

import json
import os

import numpy as np
import pytest

from dhjax import io as dio
from dhjax.data import dataset as ds
from dhjax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(spec):
    return config_lib.load_config(os.path.join(ROOT, "configs", spec))


@pytest.mark.slow
def test_make_synthetic_writes_datasets_and_contact_sheet(tmp_path):
    from dhjax.data import make_synthetic

    cfg = config("make_synthetic.py:tiny")
    cfg.uv_size = 64
    cfg.multiview.update(n_identities=2, width=48, height=48)
    cfg.video.update(n_frames=4, width=48, height=48)
    cfg.sheet.n_identities = 2
    lines = []
    summary = make_synthetic.write(cfg, str(tmp_path), log=lines.append)
    assert "contact sheet of 24 samples" in lines[-1]
    sheet = dio.load_image(tmp_path / "contact_sheet.png")
    assert sheet.shape[0] > 3 * 48 and sheet.std() > 0.05
    assert dio.load_image(tmp_path / "contact_sheet_labels.png").shape == sheet.shape
    mv = ds.FolderDataset(tmp_path / "multiview", "train")
    assert len(mv) == 2 * 28
    assert len(ds.FolderDataset(tmp_path / "video", "train")) == 2 * 4
    from dhjax.data import synthetic
    for name in ("multiview", "video"):      # which generator wrote it (synthetic.GENERATOR_VERSION)
        assert json.loads((tmp_path / name / "meta.json").read_text())["generator_version"] == \
            synthetic.GENERATOR_VERSION
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["multiview"]["images"] == 56 and summary["contact_sheet"]["images"] == 24
    s = mv[3]
    assert s["image"].shape == (48, 48, 3) and s["uv_position"].shape == (64, 64, 3)


@pytest.mark.slow
def test_bench_synthetic_reports_samples_per_second(tmp_path):
    from dhjax.bench import suite

    cfg = config("bench.py:synthetic")
    cfg.synthetic.update(sizes=(32,), uv_size=32, n_identities=1, n_views=2)
    suite.run(cfg, tmp_path, log=lambda *a: None)
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["suite"] == "synthetic" and res["synthetic_uv_size"] == 32
    assert res["synthetic_32_samples_per_s"] > 0 and res["synthetic_32_group_samples_per_s"] > 0
    assert np.isfinite(res["synthetic_32_samples_per_s"])


@pytest.mark.parametrize("flags_, message", [
    (["--config.shard_index=5", "--config.shard_count=2"], "0 <= shard_index < shard_count, got 5 / 2"),
    (["--config.multiview.n_identities=-3"], "multiview.n_identities must be an integer >= 1, got -3"),
])
def test_make_synthetic_checks_its_config_before_any_work(tmp_path, flags_, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "experiments.make_synthetic", "--config=configs/make_synthetic.py:tiny",
                           *flags_, f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config field") and message in last, last
    assert not (tmp_path / "w").exists()
