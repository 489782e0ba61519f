"""dhjax.train.app: start-up, final metrics, Markdown tables, loading a finished run."""

import json
import re

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


def test_a_workdir_in_use_by_another_process_is_refused(tmp_path):
    """app.start takes the workdir's lock: a second process starting in it while the first runs
    is refused, naming the holder, and writes nothing; the lock goes when the holder ends (even
    killed), and the same process may start again (as tests do)."""
    import os
    import signal
    import subprocess
    import sys

    work = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, ml_collections\n"
        "from dhjax.train import app\n"
        f"run = app.start({str(work)!r}, ml_collections.ConfigDict(dict(experiment='toy', width=3)))\n"
        "print('started', flush=True)\n"
        "time.sleep(300)\n")], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "started"
        before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
        with pytest.raises(app.RunError, match=rf"in use by another running process \(pid {holder.pid} on "):
            app.start(work, _cfg())
        assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    first = app.start(work, _cfg())             # the killed holder's lock is gone
    again = app.start(work, _cfg())             # this process holds it already
    assert first.workdir == again.workdir and f"pid {os.getpid()} " in (work / app.LOCK_FILE).read_text()


def _started(workdir, cfg):
    """app.start plus an output, so that the folder holds a run (not only its config.json)."""
    app.start(workdir, cfg)
    (workdir / "metrics.jsonl").write_text("{}\n")


def test_start_refuses_another_config_before_writing_anything(tmp_path):
    _started(tmp_path, _cfg())
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
    with pytest.raises(app.RunError, match=r"width(.|\n)*allow_config_change accepts only train.steps, "):
        app.start(tmp_path, changed, allow_config_change=True)
    app.start(tmp_path, _cfg())  # the same config resumes
    # A field the run lacks (an option added to dhjax since): the flag accepts it, and says so.
    newer = _cfg()
    newer.extra = False
    with pytest.raises(app.RunError, match=r"allow_config_change accepts these \(fields absent in the run"):
        app.start(tmp_path, newer)
    logged = []
    assert app.check_resume_config(tmp_path, newer, allow_config_change=True, log=logged.append) == [
        ("extra", "(absent)", False)]
    assert "extra '(absent)' -> False" in logged[0]
    # ... but not a field the run had and the code has dropped.
    dropped = ml_collections.ConfigDict({k: v for k, v in _cfg().to_dict().items() if k != "width"})
    with pytest.raises(app.RunError, match=r"width: 3 in the run, '\(absent\)' now"):
        app.start(tmp_path, dropped, allow_config_change=True)


def test_an_experiment_declares_its_own_resumable_fields(tmp_path):
    """register_flame's train.steps refers to registration.steps: the harness lists that field for
    the experiment (app.EXPERIMENT_RESUMABLE_CHANGES, in the code: an older run's config.json and
    the command line cannot change the list), so --allow_config_change can extend such a run;
    other fields stay fixed, and other experiments do not get the field."""
    import importlib

    reg = importlib.import_module("configs.register_flame")
    cfg = reg.get_config("tiny")
    _started(tmp_path, cfg)
    longer = reg.get_config("tiny")
    longer.registration.steps = cfg.registration.steps + 100
    assert longer.train.steps == cfg.train.steps + 100           # the reference follows
    with pytest.raises(app.RunError, match="allow_config_change accepts these"):
        app.start(tmp_path, longer)
    logged = []
    diffs = app.check_resume_config(tmp_path, longer, allow_config_change=True, log=logged.append)
    assert sorted(d[0] for d in diffs) == ["registration.steps", "train.steps"]
    other = reg.get_config("tiny")
    other.registration.n_points += 1
    with pytest.raises(app.RunError, match="accepts only train.steps, .*registration.steps and fields"):
        app.start(tmp_path, other, allow_config_change=True)
    assert app.resumable_changes(_cfg("register_flame"))[-1] == "registration.steps"
    assert app.resumable_changes(_cfg("gem")) == app.RESUMABLE_CHANGES


def test_start_checks_train_fields_and_accepts_resumable_changes(tmp_path, capsys):
    cfg = _cfg()
    cfg.train = ml_collections.ConfigDict(dict(steps=10, log_every=5, checkpoint_every=5, keep_checkpoints=1,
                                               eval_every=0, on_nonfinite="skip"))
    _started(tmp_path, cfg)
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
    for seed in (-1, 1.5, True):      # numpy's generators (the data pipelines') take no negative seed
        odd = ml_collections.ConfigDict(more.to_dict())
        odd.seed = seed
        with pytest.raises(app.RunError, match=f"config field seed must be an integer >= 0, got {seed!r}"):
            app.start(tmp_path / "other", odd)
    assert not (tmp_path / "other").exists()
    for field, value, name in (("lr", float("nan"), "optim.lr"), ("milestones", (10, float("inf")), "optim.milestones[1]")):
        odd = ml_collections.ConfigDict(more.to_dict())     # any number in the config, not only train.*
        odd.optim = ml_collections.ConfigDict({field: value})
        with pytest.raises(app.RunError, match=rf"config field {re.escape(name)} must be a finite number, got"):
            app.start(tmp_path / "other", odd)
    assert not (tmp_path / "other").exists()


def test_a_start_that_wrote_nothing_else_is_replaced_and_another_experiment_is_named(tmp_path):
    """A start that failed before writing anything (config.json and empty folders only) does not
    lock its workdir; a run of another experiment is refused by name, not by a field list."""
    work = tmp_path / "run"
    app.start(work, _cfg())
    (work / "tb").mkdir()
    changed = _cfg()
    changed.width = 4
    logged = []
    assert app.check_resume_config(work, changed, log=logged.append) == []
    assert "holds only the config.json of a start that wrote nothing else" in logged[0] and "width" in logged[0]
    app.start(work, changed)
    assert json.loads((work / "config.json").read_text())["width"] == 4
    (work / "tb" / "events").write_text("x")          # now it holds a run: refused as before
    with pytest.raises(app.RunError, match="width: 4 in the run, 3 now"):
        app.start(work, _cfg())
    with pytest.raises(app.RunError, match="holds a run of experiment 'toy', not 'other': use another --workdir"):
        app.start(work, _cfg("other"))
    assert json.loads((work / "config.json").read_text())["width"] == 4
    # A folder whose config names no experiment (e.g. experiments.make_synthetic's) says so.
    nameless = tmp_path / "data"
    nameless.mkdir()
    (nameless / "config.json").write_text(json.dumps({"width": 3, "n_subjects": 2}))
    (nameless / "summary.json").write_text("{}")
    with pytest.raises(app.RunError, match="holds a run whose config.json names no experiment .*, not a 'toy' run"):
        app.start(nameless, _cfg())
    with pytest.raises(ValueError, match="is not the config of a 'toy' run: it names no experiment"):
        app.read_config(nameless, "toy")
    plain = ml_collections.ConfigDict(dict(width=4, n=1))           # a program whose config names no experiment
    with pytest.raises(app.RunError, match="holds a run of experiment 'toy', and this program's config is not one"):
        app.start(work, plain)


def test_read_config_fills_the_fields_an_older_run_lacks_and_keeps_the_rest(tmp_path):
    from dhjax.train import config as config_lib

    (tmp_path / "config.json").write_text(json.dumps(
        {"experiment": "toy", "width": 4, "model": {"depth": 2, "kind": "a"}, "data": 7}))
    defaults = {"width": 3, "model": ml_collections.ConfigDict(dict(depth=5, kind="b", mode="new",
                                                                   opt=dict(x=1))),
                "loss": {"w": 0.5}, "data": {"root": ""}}
    cfg = app.read_config(tmp_path, "toy", defaults=defaults)
    assert cfg.width == 4 and cfg.model.depth == 2 and cfg.model.kind == "a"       # the run's own values
    assert cfg.model.mode == "new" and cfg.model.opt.x == 1 and cfg.loss.w == 0.5   # what it lacked
    assert cfg.data == 7                               # a value where the defaults have a section stays
    assert app.read_config(tmp_path, "toy").to_dict() == json.loads((tmp_path / "config.json").read_text())
    old = app.read_config(tmp_path, "toy")
    assert config_lib.fill_missing(old, defaults) == ["loss", "model.mode", "model.opt"]
    assert config_lib.fill_missing(old, defaults) == []
    defaults["model"].opt.x = 2                          # the filled sections are copies of the defaults
    assert old.model.opt.x == 1


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

    def diverged():                   # loop.train's failure of a diverged run: one line, not a traceback
        raise FloatingPointError("10 of 10 steps were non-finite")

    with pytest.raises(SystemExit) as exc:
        app.exit_on_user_error(diverged, errors=(app.RunError,))
    assert exc.value.code == 2 and "error: 10 of 10 steps were non-finite" in capsys.readouterr().err


def test_exit_on_user_error_stops_on_sigterm_with_a_message(capsys):
    """A SIGTERM outside a training loop (e.g. between GEM's stages) stops with exit status 143
    and says that rerunning resumes, instead of ending the process silently; the handler that was
    in place before is back afterwards."""
    import os
    import signal
    import time

    before = signal.getsignal(signal.SIGTERM)
    after_kill = []

    def stage():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                       # the handler interrupts this
        after_kill.append(True)

    with pytest.raises(SystemExit) as exc:
        app.exit_on_user_error(stage)
    assert exc.value.code == app.EXIT_INTERRUPTED and not after_kill
    assert "SIGTERM: stopping outside a training loop" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before
    assert app.exit_on_user_error(lambda: 5) == 5 and signal.getsignal(signal.SIGTERM) is before


def test_parameter_overview_counts_parameters():
    text = app.parameter_overview({"dense": {"kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)}})
    assert "dense/kernel" in text and "Total: 16" in text
    assert jax.process_index() == 0


def test_sweep_writes_the_hparams_experiment_and_each_variants_session(tmp_path):
    """Two toy variants (tests/train_toy.py, a few seconds each) and one that fails: TensorBoard's
    HParams data names each variant's overridden fields with its values, its status and its
    final metrics, and the experiment at the sweep root lists the fields and the metrics."""
    import importlib.util
    import os
    import sys

    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    from dhjax.train import config as config_lib
    from dhjax.train import logs, sweep

    toy_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_toy.py")
    spec = importlib.util.spec_from_file_location("train_toy_config", toy_path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    variants = []
    for i, (lr, steps) in enumerate(((0.05, 20), (0.2, 30), (1.0, 20))):
        overrides = {"lr": lr, "train.steps": steps}
        work = str(tmp_path / sweep.variant_name(i, overrides))
        command = ([sys.executable, toy_path, work, f"lr={lr}", f"train.steps={steps}"] if i < 2 else
                   [sys.executable, "-c", "import sys; sys.exit(3)"])
        variants.append(sweep.Variant(overrides, work, command, config_lib.apply_overrides(toy.get_config(), overrides)))
    rows = sweep.run_variants(variants, str(tmp_path), log=lambda *a: None)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed (3)"]

    def hparams_data(folder):
        acc = event_accumulator.EventAccumulator(str(folder))
        acc.Reload()
        return acc, acc.PluginTagToContent("hparams")

    _, content = hparams_data(tmp_path)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    infos = {h.name: h for h in experiment.hparam_infos}
    assert set(infos) == {"lr", "train.steps"}
    assert infos["lr"].type == api_pb2.DATA_TYPE_FLOAT64
    assert [v.number_value for v in infos["lr"].domain_discrete.values] == [0.05, 0.2, 1.0]
    assert [v.number_value for v in infos["train.steps"].domain_discrete.values] == [20, 30]
    metric_tags = {m.name.tag: m.display_name for m in experiment.metric_infos}
    assert metric_tags["final/eval/mse"] == "eval/mse" and "final/loss" in metric_tags
    assert "final/lr" not in metric_tags

    for v, status in zip(variants, (api_pb2.STATUS_SUCCESS, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE)):
        acc, content = hparams_data(os.path.join(v.workdir, "tb"))
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        for k, value in v.overrides.items():
            assert start.hparams[k].number_value == value
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert end.status == status
        if status == api_pb2.STATUS_SUCCESS:
            final = app.read_final_metrics(v.workdir)
            assert "seed" in start.hparams      # the run itself logged its whole config first
            (event,) = acc.Scalars("final/eval/mse")
            assert event.step == v.overrides["train.steps"]
            assert event.value == pytest.approx(final["eval/mse"], rel=1e-6)
        else:
            assert "final/loss" not in acc.Tags()["scalars"]

    # A second call keeps the finished variants and replaces (does not add to) the HParams files.
    sweep.run_variants(variants, str(tmp_path), log=lambda *a: None)
    for folder in [tmp_path] + [os.path.join(v.workdir, "tb") for v in variants]:
        assert len([f for f in os.listdir(folder) if f.endswith(logs.HPARAMS_SUFFIX)]) == 1


def test_sweep_session_holds_the_whole_config_whichever_event_file_tensorboard_reads_first(tmp_path):
    """TensorBoard keeps the first session start it reads in a folder, in file-name order
    (`events.out.tfevents.<second>.<host>.<pid>`). A run that ends within the second its event file
    was opened leaves the order to the pids, and the sweep's file used to hold only the overrides
    (a flaky test: the variant's session lost its config). Here the run's file is named to sort
    after the sweep's and also before it: the session holds the whole config both times."""
    import os
    import shutil

    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    from dhjax.train import logs, sweep

    cfg = ml_collections.ConfigDict(dict(experiment="toy", seed=3, lr=0.2, model=dict(width=30)))
    work = tmp_path / "01_lr=0.2"
    app.start(work, cfg)
    writer = logs.MetricWriter(str(work))          # logs config.json's fields, as a run does
    writer.write_scalars(0, {"loss": 1.0})
    writer.close()
    (run_file,) = os.listdir(work / "tb")
    variant = sweep.Variant({"lr": 0.2}, str(work), ["true"], cfg)
    for name in ("events.out.tfevents.0000000001.a.1.0", "events.out.tfevents.9999999999.z.1.0"):
        current = [f for f in os.listdir(work / "tb") if not f.endswith(logs.HPARAMS_SUFFIX)]
        shutil.move(str(work / "tb" / current[0]), str(work / "tb" / name))
        sweep.write_session(variant, "ok")
        acc = event_accumulator.EventAccumulator(str(work / "tb"))
        acc.Reload()
        start = metadata.parse_session_start_info_plugin_data(
            acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG])
        assert {k: v.number_value for k, v in start.hparams.items() if k != "experiment"} == {
            "seed": 3.0, "lr": 0.2, "model.width": 30.0}
    assert run_file.startswith("events.out.tfevents.")
    # A variant that failed before its run wrote config.json: the overrides alone.
    assert sweep.session_hparams(sweep.Variant({"lr": 1.0}, str(tmp_path / "none"), ["true"])) == {"lr": 1.0}


def test_ticker_logs_progress_at_most_every_interval_and_at_the_end():
    """logs.Ticker: a line when `every_s` has passed since the last one and always at the end,
    with done/total, elapsed seconds and an ETA while unfinished."""
    from dhjax.train import logs

    now = [100.0]
    lines = []
    t = logs.Ticker("frames:", 5, lines.append, every_s=30.0, clock=lambda: now[0])
    for dt in (10.0, 25.0, 10.0, 10.0, 1.0):        # at 110, 135, 145, 155, 156 s
        now[0] += dt
        t.tick()
    assert lines == ["frames: 2/5 (35 s, ETA 52 s)", "frames: 5/5 (56 s)"]
    logs.Ticker("silent:", 1, None).tick()          # no log: nothing to do
