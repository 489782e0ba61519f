"""Every training experiment logs ground truth next to its render to TensorBoard at its evaluation
points (the images convention of `dhjax.train.loop.Method` / `dhjax.train.logs.comparison_grid`).

Default suite: the grid itself (the harness's images at every evaluation step are tested with
the toy method in tests/test_train_loop.py). Slow, each a short in-process run that compiles
its model (about a minute of CPU for registration, MICA and the tracker on tiny settings, several
minutes for the others; the default suite already runs the same code paths, without these
checks, in the experiments' own run tests): registration, MICA, the tracker, SynShot prior and
inversion, GEM (Net and refinement), INSTA and D3GA on their tests' micro settings.
"""

from pathlib import Path

import numpy as np
import pytest

from dhjax.train import config as config_lib
from dhjax.train import logs

ROOT = Path(__file__).resolve().parents[1]


def _config(spec, **overrides):
    return config_lib.apply_overrides(config_lib.load_config(str(ROOT / "configs" / spec)), overrides)


def images(tb_dir) -> dict:
    """{tag: [(step, height, width)]} of the image events in a TensorBoard folder."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [(e.step, e.height, e.width) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def image_steps(tb_dir) -> dict:
    return {tag: [s for s, _, _ in events] for tag, events in images(tb_dir).items()}


def last_image(tb_dir, tag) -> np.ndarray:
    """The last image of `tag`, decoded: [H, W, 3] float in [0, 1]."""
    import io

    import imageio.v2 as imageio
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={"images": 0})
    acc.Reload()
    return imageio.imread(io.BytesIO(acc.Images(tag)[-1].encoded_image_string))[..., :3] / 255.0


def test_the_tensorboard_viewer_serves_a_runs_scalars_and_images(tmp_path):
    """`tensorboard --logdir runs` (README) starts and serves what MetricWriter wrote. Its static
    plugins only: open3d (peers extra) registers a dynamic one, which fails to load where
    open3d cannot. With tensorboard < 2.19 (the peers and landmarks extras) the viewer imports
    pkg_resources, which setuptools 82 removed: those extras pin setuptools < 82."""
    import json
    import time
    import urllib.request

    from tensorboard import default, program

    run = tmp_path / "runs" / "toy"
    writer = logs.MetricWriter(str(run), hparams=None)
    for step in (1, 2):
        writer.write_scalars(step, {"loss": 1.0 / step})
    writer.write_images(2, {"eval/heldout": np.zeros((1, 8, 12, 3), np.float32)})
    writer.close()
    tb = program.TensorBoard(plugins=default.get_static_plugins())
    tb.configure(argv=[None, "--logdir", str(tmp_path / "runs"), "--host", "localhost", "--port", "0",
                       "--load_fast", "false", "--reload_interval", "0.2"])
    url = tb.launch()

    def get(path):
        return json.loads(urllib.request.urlopen(url + path, timeout=10).read())

    deadline = time.time() + 30
    while time.time() < deadline and "toy/tb" not in get("data/runs"):
        time.sleep(0.2)
    assert get("data/runs") == ["toy/tb"]
    assert "loss" in get("data/plugin/scalars/tags")["toy/tb"]
    assert "eval/heldout" in get("data/plugin/images/tags")["toy/tb"]


def test_comparison_grid_places_ground_truth_render_and_extras():
    gt = np.zeros((3, 4, 5, 3), np.float32)
    render = np.ones((3, 4, 5), np.float32)                # grey: broadcast to RGB
    extra = np.full((3, 4, 5, 1), 255, np.uint8)           # uint8: scaled to [0, 1]
    grid = logs.comparison_grid(gt, render, extra, max_rows=2)
    g = logs.GRID_GAP
    assert grid.shape == (1, 2 * 4 + g, 3 * 5 + 2 * g, 3) and grid.dtype == np.float32
    assert np.all(grid[0, :4, :5] == 0.0) and np.all(grid[0, :4, 5 + g:10 + g] == 1.0)
    assert np.all(grid[0, 4 + g:, 2 * (5 + g):] == 1.0)
    assert np.all(grid[0, 4:4 + g] == logs.GRID_GAP_VALUE)
    with pytest.raises(ValueError, match="shape of the ground truth"):
        logs.comparison_grid(gt, np.ones((3, 4, 6, 3)))
    with pytest.raises(ValueError, match="ground_truth must be"):
        logs.comparison_grid(np.ones((4, 5, 3, 2)), np.ones((4, 5, 3, 2)))


@pytest.mark.slow
def test_registration_logs_scan_and_registered_head_at_each_evaluation(tmp_path):
    from dhjax.capture import registration_run

    cfg = _config("register_flame.py:tiny")
    cfg.registration.update(steps=4, rigid_steps=2, n_points=400, render_size=32, render_count=2)
    cfg.data.synthetic.update(n_scans=2, points_per_scan=400)
    cfg.train.update(eval_every=2, log_every=2)
    registration_run.run(cfg, str(tmp_path))
    got = images(tmp_path / "tb")
    g = logs.GRID_GAP
    assert got == {"eval/registration": [(2, 2 * 32 + g, 3 * 32 + 2 * g), (4, 2 * 32 + g, 3 * 32 + 2 * g)]}
    # The scan (splatted points, first column) lies where the registered head (second) is.
    grid = last_image(tmp_path / "tb", "eval/registration")
    for row in range(2):
        cells = [grid[row * (32 + g):row * (32 + g) + 32, c * (32 + g):c * (32 + g) + 32] for c in range(2)]
        scan, head = (cell.min(-1) < 0.97 for cell in cells)
        assert head.mean() > 0.1 and (scan & head).sum() / (scan | head).sum() > 0.6


@pytest.mark.slow
def test_mica_logs_true_and_predicted_meshes_at_each_evaluation(tmp_path, monkeypatch):
    from dhjax.capture import mica

    import test_capture_mica as tm

    tm._fake_splits(monkeypatch)
    monkeypatch.setattr(mica.run, "split_benchmark", lambda *a, **k: {})   # the benchmark is not under test
    cfg = tm.landmark_cfg()
    cfg.update(batch_size=4, select_every=2)
    cfg.train.update(steps=4, log_every=2, checkpoint_every=4, eval_every=2)
    cfg.eval.scan_points = 300
    cfg.calibration.enabled = False
    mica.run.train(cfg, tmp_path)
    got = images(tmp_path / "tb")
    assert list(got) == ["eval/meshes"] and [s for s, _, _ in got["eval/meshes"]] == [2, 4]
    _, h, w = got["eval/meshes"][0]
    rows = min(mica.train.RENDER_ROWS, 4)
    size = (h - (rows - 1) * logs.GRID_GAP) // rows
    assert w == 4 * size + 3 * logs.GRID_GAP      # true | predicted | error | input crop


@pytest.mark.slow
def test_tracker_logs_each_frame_with_its_render(tmp_path):
    """The synthetic tracker on one 3-frame sequence: per-frame errors, and frame | model colours
    | shading with landmarks at every frame (fewer than TB_FRAMES); a rerun replaces the log."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    from configs import track as track_cfg
    from dhjax.capture import track_run

    cfg = track_cfg.get_config("tiny")
    cfg.synthetic.update(sequences=(0,), n_frames=3, width=48, height=48, uv_size=32, compare=("mean",))
    cfg.tracker.pyramid = (0,)
    cfg.tracker.first.update(rigid_steps=5, landmark_steps=5, steps=(3,))
    cfg.tracker.frame.update(landmark_steps=2, steps=(2,))
    for _ in range(2):
        track_run.run(cfg, tmp_path, input="synthetic")
    g = logs.GRID_GAP
    assert images(tmp_path / "tb") == {"eval/tracked_frame": [(i, 48, 3 * 48 + 2 * g) for i in range(3)]}
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("track/landmark_error_px")] == [0, 1, 2]
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["synthetic.n_frames"].number_value == 3


# ----------------------------------------------------------------------------------------------
# Larger models (minutes each on a 2-core CPU).


def _grid_width_is(events, columns):
    """Every event's grid is `columns` square-ish cells wide: width = columns * w + gaps."""
    for _, h, w in events:
        cell = (w - (columns - 1) * logs.GRID_GAP) / columns
        assert cell == int(cell) and cell > 0, (h, w, columns)


@pytest.mark.slow
def test_synshot_prior_and_inversion_log_ground_truth_and_render(tmp_path):
    from dhjax.synthesis import synshot_run

    data = {"data.train_identities": (0, 2), "data.test_identities": (1_000_000, 1),
            "data.cache_dir": str(tmp_path / "cache")}
    prior = tmp_path / "prior"
    synshot_run.run_prior(_config("synshot_prior.py:tiny", **data, **{
        "train.steps": 3, "train.eval_every": 2, "train.log_every": 1, "eval.max_test_images": 2}), str(prior))
    got = images(prior / "tb")
    assert list(got) == ["eval/heldout"] and [s for s, _, _ in got["eval/heldout"]] == [2, 3]
    _grid_width_is(got["eval/heldout"], 2)
    out = tmp_path / "inv"
    summary = synshot_run.run_invert(_config("synshot_invert.py:tiny", **{
        "prior_workdir": str(prior), "stage1.steps_per_frame": 1, "stage2.steps_per_frame": 1,
        "data.max_heldout": 2}), str(out))
    s1, s2 = summary["stages"]["stage1"]["steps"], summary["stages"]["stage2"]["steps"]
    got = image_steps(out / "tb")
    assert got == {"eval/heldout": [0, s1, s1 + s2], "eval/heldout_scratch": [summary["stages"]["scratch"]["steps"]]}


@pytest.mark.slow
def test_gem_net_and_refinement_log_ground_truth_and_render(tmp_path):
    from dhjax.synthesis import gem, gem_data, gem_run
    from dhjax.train import app

    import test_synthesis_gem as tg

    cfg = tg._micro_config(tmp_path)
    cfg.refine.train.update(eval_every=2)
    run_ = app.start(tmp_path / "run", cfg)
    cap, model, _ = gem_run.open_capture(cfg, log=lambda *a: None)
    sp = gem_data.split(cap, tuple(cfg.data.test_views), cfg.data.test_frames)
    ctx = gem.make_context(model, cap.shape, cfg.model, cfg.loss, cfg.optim)
    net_params, _ = gem_run.train_net(cfg, run_, ctx, cap, sp, lambda *a: None)
    distilled, k_train, _, _ = gem_run.distil_stage(cfg, run_, ctx, net_params, cap, sp, lambda *a: None)
    gem_run.refine_stage(cfg, run_, ctx, distilled, k_train, cap, sp, lambda *a: None)
    for tb in (tmp_path / "run" / "tb", tmp_path / "run" / "refine" / "tb"):
        got = images(tb)
        assert list(got) == ["eval/novel_view"] and [s for s, _, _ in got["eval/novel_view"]] == [2, 4], tb
        _grid_width_is(got["eval/novel_view"], 2)


@pytest.mark.slow
def test_d3ga_logs_ground_truth_render_and_layers(tmp_path):
    from dhjax.synthesis import d3ga_run

    import test_synthesis_d3ga_run as td

    d3ga_run.run(td._cfg(tmp_path), str(tmp_path / "run"))      # steps 4, eval_every 2
    got = images(tmp_path / "run" / "tb")
    assert list(got) == ["eval/novel_view"] and [s for s, _, _ in got["eval/novel_view"]] == [2, 4]
    _grid_width_is(got["eval/novel_view"], 3)


@pytest.mark.slow
def test_insta_logs_ground_truth_render_and_depth(tmp_path):
    from dhjax.synthesis import insta_run

    import synthetic_common as sc
    import test_synthesis_insta as ti

    c = ti.insta_config.get_config("tiny")
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.synthetic = sc.tiny_config()
    c.data.synthetic.video.update(n_sequences=1, n_frames=6)
    c.data.holdout = 2
    c.model = ti._small_model_cfg()
    c.batch.update(rays_per_frame=128, samples_per_ray=64)
    c.eval.update(orbit_frames=3, mesh_resolution=24, mesh_threshold=1.0, chunk=2048, n_rays=256)
    c.train.update(steps=4, log_every=2, eval_every=2, checkpoint_every=4)
    insta_run.run(c, str(tmp_path / "run"))
    got = images(tmp_path / "run" / "tb")
    assert list(got) == ["eval/heldout"] and [s for s, _, _ in got["eval/heldout"]] == [2, 4]
    _grid_width_is(got["eval/heldout"], 3)
