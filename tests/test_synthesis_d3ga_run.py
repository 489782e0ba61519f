"""D3GA end to end (dhjax.synthesis.d3ga_run): a micro run on a tiny synthetic clothed body
writes every output, resumes, and the driving command renders a new motion."""

import json

import numpy as np
import pytest

from configs import d3ga as d3ga_config
from dhjax.synthesis import d3ga_run


def _cfg(tmp_path, **over):
    c = d3ga_config.get_config("tiny")
    c.data.cache_dir = str(tmp_path / "cache")
    s = c.data.synthetic
    s.update(n_frames=6)
    s.dome.update(n_cameras=3, width=48, height=64, elevations_deg=(0.0,))
    c.data.test_views = (2,)
    c.data.test_frames = 2
    c.parts.update(n_gaussians=dict(body=400, face=100, upper=300, lower=300))
    c.model.update(hidden=16)
    c.train.update(steps=4, log_every=2, checkpoint_every=2, eval_every=2)
    c.eval.update(novel_view_frames=2, video_fps=4.0)
    c.update(over)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d3ga")
    cfg = _cfg(tmp)
    metrics = d3ga_run.run(cfg, str(tmp / "run"))
    return tmp, cfg, metrics


def test_run_writes_every_output(trained):
    tmp, cfg, metrics = trained
    run = tmp / "run"
    for name in ("config.json", "parts.json", "metrics.json", "final_metrics.json", "tables.md", "heldout.png",
                 "novel_pose.mp4", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert len(list((run / "ply").glob("frame_*.ply"))) == 2          # one per held-out frame
    m = json.loads((run / "metrics.json").read_text())
    for split in ("novel_view", "novel_pose", "training_views"):
        assert set(m[split]) == {"psnr", "ssim", "l1", "layers_l1"} and np.isfinite(m[split]["psnr"])
    assert set(m["parts"]) == {"body", "face", "upper", "lower"}
    assert m["size"]["parameters"] > 0 and m["size"]["megabytes"] == pytest.approx(m["size"]["parameters"] * 4 / 2 ** 20)
    final = json.loads((run / "final_metrics.json").read_text())
    assert "novel_view/psnr" in final and "parameters" in final
    # The PLY is a valid 3DGS file of the posed avatar.
    from dhjax.io import load_gaussians_ply

    g = load_gaussians_ply(sorted((run / "ply").glob("*.ply"))[0])
    assert g["means"].shape == (1100, 3) and np.isfinite(g["means"]).all()


# slow (~70 s): colabs/07_d3ga (tests/test_colabs.py, default suite) trains and drives through
# d3ga_run; this test adds the resume of a finished run and the drive command's outputs.
@pytest.mark.slow
def test_rerun_resumes_and_drive(trained):
    tmp, cfg, metrics = trained
    again = d3ga_run.run(cfg, str(tmp / "run"))       # finished: no step runs, same evaluation
    assert again["novel_view"]["psnr"] == pytest.approx(metrics["novel_view"]["psnr"], abs=1e-4)
    assert metrics["train_seconds"] > 0 and again["train_seconds"] == metrics["train_seconds"]  # the run's, kept
    # A run trained before model.bary_domain existed (its config.json lacks it) still drives.
    saved = json.loads((tmp / "run" / "config.json").read_text())
    del saved["model"]["bary_domain"]
    (tmp / "run" / "config.json").write_text(json.dumps(saved))
    path = d3ga_run.drive(str(tmp / "run"), str(tmp / "drive"), motion="arms", n_frames=3, camera=0,
                          log=lambda *a: None)
    assert path.is_file()
    with pytest.raises(ValueError, match="motion"):
        d3ga_run.drive(str(tmp / "run"), str(tmp / "drive"), motion="dance", n_frames=3, log=lambda *a: None)
    with pytest.raises(ValueError, match="camera"):
        d3ga_run.drive(str(tmp / "run"), str(tmp / "drive"), camera=17, n_frames=3, log=lambda *a: None)
    with pytest.raises(FileNotFoundError):
        d3ga_run.drive(str(tmp / "nothing"), str(tmp / "drive"), n_frames=3, log=lambda *a: None)


def test_bad_test_views(trained):
    tmp, cfg, _ = trained
    bad = cfg.copy_and_resolve_references()
    bad.data.test_views = (9,)
    with pytest.raises(ValueError, match="test_views"):
        d3ga_run.run(bad, str(tmp / "bad"))


def test_bad_settings_fail_before_the_capture_loads(trained, monkeypatch):
    """Config choices, missing LPIPS weights, the drive's motion and length, and a run without a
    checkpoint are refused before open_capture (which renders or loads the capture and builds cages: minutes)."""
    tmp, cfg, _ = trained

    def no_capture(*a, **k):
        raise AssertionError("the capture was loaded before the check")

    monkeypatch.setattr(d3ga_run, "open_capture", no_capture)
    for field, value in (("model.geometry", "tetz"), ("model.bary_domain", "convex"), ("parts.layers", "dual")):
        bad = cfg.copy_and_resolve_references()
        section, key = field.split(".")
        bad[section][key] = value
        with pytest.raises(ValueError, match=f"config field {field} must be .*, got '{value}'"):
            d3ga_run.run(bad, str(tmp / "bad_choice"))
    bad = cfg.copy_and_resolve_references()
    bad.eval.lpips_path = str(tmp / "nope.npz")
    with pytest.raises(FileNotFoundError, match="config field eval.lpips_path: .*nope.npz"):
        d3ga_run.run(bad, str(tmp / "bad_choice"))
    assert not (tmp / "bad_choice").exists()
    run = str(tmp / "run")
    with pytest.raises(ValueError, match="frames to drive must be an integer >= 1, got 0"):
        d3ga_run.drive(run, str(tmp / "d0"), n_frames=0, log=lambda *a: None)
    with pytest.raises(ValueError, match="motion must be one of"):
        d3ga_run.drive(run, str(tmp / "d0"), motion="dance", log=lambda *a: None)
    untrained = tmp / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text((tmp / "run" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no checkpoint; train it first"):
        d3ga_run.drive(str(untrained), str(tmp / "d0"), log=lambda *a: None)
