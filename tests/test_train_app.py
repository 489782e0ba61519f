"""dhjax.train.app: start-up, final metrics, Markdown tables, loading a finished run."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dhjax.train import app
from dhjax.train import checkpoint as ckpt_lib


def _cfg(experiment="toy"):
    cfg = ml_collections.ConfigDict()
    cfg.experiment = experiment
    cfg.width = 3
    return cfg


def test_start_writes_config_and_rejects_a_file(tmp_path):
    run = app.start(tmp_path / "run", _cfg())
    assert run.lead and run.workdir == tmp_path / "run"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == 3
    (tmp_path / "file").write_text("x")
    with pytest.raises(app.RunError, match="not a folder"):
        app.start(tmp_path / "file", _cfg())


def test_start_refuses_another_config_before_writing_anything(tmp_path):
    app.start(tmp_path, _cfg())
    changed = _cfg()
    changed.width = 4
    changed.extra = "new"
    with pytest.raises(app.RunError) as err:
        app.start(tmp_path, changed)
    assert "2 field(s) differ" in str(err.value)
    assert "extra: '(absent)' in the run, 'new' now" in str(err.value)
    assert "width: 3 in the run, 4 now" in str(err.value)
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 3
    # --allow_config_change covers only fields that cannot change a state's meaning.
    with pytest.raises(app.RunError, match="width"):
        app.start(tmp_path, changed, allow_config_change=True)
    app.start(tmp_path, _cfg())  # the same config resumes


def test_start_checks_train_fields_and_accepts_resumable_changes(tmp_path, capsys):
    cfg = _cfg()
    cfg.train = ml_collections.ConfigDict(dict(steps=10, log_every=5, checkpoint_every=5, keep_checkpoints=1,
                                               eval_every=0, on_nonfinite="skip"))
    app.start(tmp_path, cfg)
    more = ml_collections.ConfigDict(cfg.to_dict())
    more.train.steps = 20
    with pytest.raises(app.RunError, match="allow_config_change accepts these"):
        app.start(tmp_path, more)
    app.start(tmp_path, more, allow_config_change=True)
    assert "config changes accepted on resume: train.steps 10 -> 20" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 20
    bad = ml_collections.ConfigDict(more.to_dict())
    bad.train.log_every = 0
    with pytest.raises(app.RunError, match="config field train.log_every must be an integer >= 1, got 0"):
        app.start(tmp_path / "other", bad)
    assert not (tmp_path / "other").exists()


def test_merge_final_metrics_keeps_earlier_entries(tmp_path):
    assert app.read_final_metrics(tmp_path) == {}
    app.merge_final_metrics(tmp_path, {"loss": 1.0, "eval/psnr": 20.0})
    merged = app.merge_final_metrics(tmp_path, {"eval/psnr": np.float32(21.5), "n": np.int64(3)})
    assert merged == {"loss": 1.0, "eval/psnr": 21.5, "n": 3}
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == merged
    assert [p.name for p in tmp_path.iterdir()] == ["final_metrics.json"]  # no temp file left
    (tmp_path / "final_metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="final_metrics.json is not valid JSON"):
        app.read_final_metrics(tmp_path)


def test_markdown_table():
    rows = [{"scan": "a", "mm": 0.5}, {"scan": "b", "mm": float("nan"), "n": 2}]
    text = app.markdown_table(rows)
    assert text.splitlines() == ["| scan | mm | n |", "|---|---|---|", "| a | 0.500 |  |", "| b | nan | 2 |"]
    text = app.markdown_table(rows, ["mm", "scan"], headers=["error (mm)", "scan"], floatfmt=".1f", align="rl")
    assert text.splitlines()[:3] == ["| error (mm) | scan |", "|---:|---|", "| 0.5 | a |"]
    with pytest.raises(ValueError, match="1 headers for 2 columns"):
        app.markdown_table(rows, ["mm", "scan"], headers=["x"])


def test_load_run_reads_config_and_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        app.load_run(tmp_path, lambda cfg: None, experiment="toy")
    app.start(tmp_path, _cfg())
    template = lambda cfg: {"w": jnp.zeros((cfg.width,), jnp.float32)}
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        app.load_run(tmp_path, template, experiment="toy")
    ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
    ck.save(7, {"w": jnp.arange(3.0)}, {"next_step": 7})
    ck.close()
    cfg, state, step = app.load_run(tmp_path, template, experiment="toy")
    assert step == 7 and cfg.width == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(3.0))
    with pytest.raises(ValueError, match="belongs to experiment 'toy', not 'other'"):
        app.load_run(tmp_path, template, experiment="other")
    with pytest.raises(ValueError, match="does not fit"):
        app.load_run(tmp_path, lambda cfg: {"w": jnp.zeros((5,), jnp.float32)})


def test_exit_on_user_error(capsys):
    def bad():
        raise FileNotFoundError("no such run")

    with pytest.raises(SystemExit) as exc:
        app.exit_on_user_error(bad)
    assert exc.value.code == 2
    assert "error: no such run" in capsys.readouterr().err
    assert app.exit_on_user_error(lambda: 5) == 5


def test_parameter_overview_counts_parameters():
    text = app.parameter_overview({"dense": {"kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)}})
    assert "dense/kernel" in text and "Total: 16" in text
    assert jax.process_index() == 0
