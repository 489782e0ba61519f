"""The experiment entry points: their library functions in-process (tiny settings), and the
command line itself (flag parsing, exit codes) in subprocesses."""

import csv
import json
import signal
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from dhjax import io as dio
from dhjax.train import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def config(spec):
    return config_lib.load_config(os.path.join(ROOT, "configs", spec))


def test_sample_heads_writes_grid_meshes_and_params(tmp_path):
    from dhjax.data import head_samples
    from dhjax.train import app as run_app

    cfg = config("sample_heads.py:tiny")
    cfg.num_heads, cfg.image_size = 2, 48
    run = run_app.start(tmp_path, cfg)
    lines = []
    summary = head_samples.write(cfg, str(run.workdir), log=lines.append)
    assert any("rendered 2 heads x 3 views" in line for line in lines)
    assert summary["num_heads"] == 2 and summary["num_views"] == 3
    grid = dio.load_image(tmp_path / "grid.png")
    assert grid.shape[0] > 2 * 48 and grid.shape[1] > 3 * 48
    assert grid.std() > 0.05  # not a blank image
    verts, faces = dio.load_mesh(tmp_path / "meshes" / "head_001.obj")
    assert verts.shape == (5270, 3) and faces.shape == (10416, 3)
    params = dio.load_params(tmp_path / "params" / "head_001", required=("shape", "expression", "pose"))
    assert params["pose"].shape == (5, 3)
    assert json.loads((tmp_path / "config.json").read_text())["num_heads"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["grid"] == "grid.png"
    # The saved mesh is the forward pass of the saved parameters.
    from dhjax.models import flame
    m = flame.load()
    v = flame.forward(m, params["shape"][None], params["expression"][None], params["pose"][None]).vertices
    np.testing.assert_allclose(verts, np.asarray(v[0]), atol=1e-5)


def test_unknown_variant_is_a_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "experiments.sample_heads",
                           "--config=configs/sample_heads.py:huge", f"--workdir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown variant 'huge'" in proc.stderr


def test_bench_flame_writes_json(tmp_path):
    """A tiny bench run (not a timing check): the keys the issue asks for are there."""
    from dhjax.bench import suite

    cfg = config("bench.py:flame")
    cfg.repeats, cfg.warmup, cfg.raster_size = 1, 1, 64
    lines = []
    suite.run(cfg, tmp_path, log=lines.append)
    assert any("FLAME forward B= 64" in line for line in lines)
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["suite"] == "flame" and res["V"] == 5270 and res["F"] == 10416
    for key in ("flame_b1_dhjax_s", "flame_b64_dhjax_s", "raster_64_s", "raster_64_faces"):
        assert res[key] > 0, key
    assert 0.2 < res["raster_64_coverage"] < 1.0  # the head fills part of the frame
    try:
        import smplx  # noqa: F401
    except ImportError:
        return
    assert res["flame_b64_speedup_vs_smplx"] > 0


def test_bench_replaces_an_earlier_benchmark_but_not_a_run(tmp_path):
    """A benchmark has nothing to resume: rerun in its folder with other settings it replaces the
    earlier one; a folder holding another experiment's run is still refused."""
    quick = ["--config.warmup=0", "--config.batch_sizes=(1,)", "--config.raster_size=32"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for repeats in (1, 2):
        proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--config=configs/bench.py:flame", *quick,
                               f"--config.repeats={repeats}", f"--workdir={tmp_path / 'b'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / "b" / "config.json").read_text())["repeats"] == repeats
    assert "replacing the earlier benchmark (suite 'flame')" in proc.stdout
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"experiment": "insta", "seed": 0}))
    (run / "metrics.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--config=configs/bench.py:flame", *quick,
                           f"--workdir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "holds a run" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((run / "config.json").read_text()) == {"experiment": "insta", "seed": 0}


def test_either_benchmark_replaces_the_other_but_not_a_run(tmp_path):
    """`experiments.bench` and `experiments.bench_geometry` share one rule: an earlier benchmark
    of either kind (its config.json next to its results) is replaced; an experiment's run, or a
    benchmark config without results, is left alone."""
    from dhjax.bench import geometry, suite

    def folder(name, config, results):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        for r in results:
            (d / r).write_text("{}")
        return d

    said = []
    geo = geometry.default_config().to_dict()
    cases = [("bench", {"suite": "flame", "repeats": 1}, ["bench.json"], True, "suite 'flame'"),
             ("geometry", geo, ["bench_geometry.json"], True, "bench_geometry"),
             ("run", {"experiment": "insta", "suite": "x"}, ["bench.json"], False, None),
             ("no_results", {"suite": "flame"}, [], False, None),
             ("other", {"seed": 0}, ["bench_geometry.json"], False, None)]
    for name, config, results, replaced, kind in cases:
        d = folder(name, config, results)
        said.clear()
        assert suite.replace_earlier_benchmark(d, log=said.append) is replaced, name
        assert (d / "config.json").exists() is not replaced, name
        if replaced:
            assert said == [f"{d}: replacing the earlier benchmark ({kind}) in this folder"]
        else:
            assert said == [] and json.loads((d / "config.json").read_text()) == config
    assert suite.replace_earlier_benchmark(tmp_path / "missing") is False


def test_bench_unknown_suite_is_an_error(tmp_path):
    from dhjax.bench import suite

    with pytest.raises(ValueError, match="unknown bench suite 'nope'"):
        suite.run(types.SimpleNamespace(suite="nope"), tmp_path)
    assert not (tmp_path / "bench.json").exists()


def test_bench_geometry_agrees_with_its_references(tmp_path):
    """Tiny closest-point and hash-grid benchmarks: every implementation that ran agrees with the
    reference (the benchmark reports these differences next to its timings)."""
    from dhjax.bench import geometry

    cfg = geometry.default_config()
    geometry.set_n_points(cfg, 600)
    assert cfg.closest_point.n_points == cfg.hashgrid.n_points == 600
    cfg.repeats, cfg.closest_point.reference_points, cfg.closest_point.build_repeats = 1, 200, 2
    cfg.hashgrid.update(n_levels=4, log2_hashmap_size=12, finest_resolution=128)
    res = geometry.run(cfg, tmp_path, log=lambda *a: None)
    assert json.loads((tmp_path / "bench_geometry.json").read_text()) == json.loads(json.dumps(res))
    cp, hg = res["closest_point"], res["hashgrid"]
    assert cp["n_points"] == 600 and cp["reference_pts_per_s"] > 0 and cp["F"] == 10416
    assert hg["table_rows_per_level"] == 2 ** 12 and hg["hashgrid_reference_fwd_s"] > 0
    if "cpu_kernel_s" in cp:
        assert cp["cpu_vs_reference_max_abs_dist_m"] < 1e-6
    if "hashgrid_cpu_fwd_s" in hg:
        assert hg["hashgrid_cpu_vs_reference_max_abs"] < 1e-5
        assert hg["hashgrid_cpu_speedup_vs_reference"] > 0
    with pytest.raises(ValueError, match="unknown benchmark"):
        geometry.run_all(cfg, only=["nope"])


def test_bench_geometry_command_line_rejects_unknown_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_geometry", f"--workdir={tmp_path}",
                           "--only=closest_point,nope"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0 and "--only takes names from ['closest_point', 'hashgrid']" in proc.stderr
    assert not (tmp_path / "bench_geometry.json").exists()


def test_bench_peers_say_why_they_are_skipped(tmp_path, monkeypatch):
    """A peer that is not installed and one that is installed but fails to load (as open3d does
    without the system's libusb) are told apart, with the import error; working ones load."""
    from dhjax.bench.timing import import_peers

    (tmp_path / "peer_broken_lib.py").write_text(
        "raise ImportError('libusb-1.0.so.0: cannot open shared object file')\n")
    (tmp_path / "peer_missing_dep.py").write_text("import dhjax_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mods, why = import_peers("json", "os.path")
    assert why is None and [m.__name__ for m in mods] == ["json", os.path.__name__]
    assert import_peers("json", "dhjax_no_such_peer") == (
        None, "dhjax_no_such_peer not installed (pip install '.[peers]')")
    mods, why = import_peers("peer_broken_lib")
    assert mods is None and why.startswith("peer_broken_lib is installed but could not be imported")
    assert "libusb-1.0.so.0" in why
    mods, why = import_peers("peer_missing_dep")
    assert mods is None and "installed but could not be imported" in why and "dhjax_no_such_dependency" in why


def _write_bad_and_good_scans(folder):
    """One good scan (a registered-able head mesh), one with NaNs, one without faces."""
    import jax

    from dhjax.capture import registration
    from dhjax.models import flame

    m = flame.load()
    _, gt = registration.synthesize_scans(jax.random.PRNGKey(3), m, 1, noise_mm=0.2,
                                          points_per_scan=500)
    os.makedirs(folder, exist_ok=True)
    good = np.asarray(gt["vertices"][0])
    dio.save_obj(os.path.join(folder, "good.obj"), good, np.asarray(m.faces))
    os.makedirs(os.path.join(folder, "lmk"), exist_ok=True)
    np.savetxt(os.path.join(folder, "lmk", "good.txt"), np.asarray(gt["landmarks"][0]))
    bad = good.copy()
    bad[10] = np.nan
    dio.save_obj(os.path.join(folder, "nan.obj"), bad, np.asarray(m.faces))
    with open(os.path.join(folder, "nofaces.ply"), "w") as f:
        f.write("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                "property float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n")
    return gt


def test_register_flame_skips_bad_scans_and_writes_outputs(tmp_path):
    scans = tmp_path / "scans"
    _write_bad_and_good_scans(scans)
    out = run("experiments.register_flame", "--config=configs/register_flame.py:tiny",
              f"--config.data.scans_dir={scans}", f"--config.data.landmarks_dir={scans / 'lmk'}",
              "--config.registration.steps=80",
              "--config.registration.n_points=1000", f"--workdir={tmp_path / 'run'}")
    assert "skipping scan" in out and "nan.obj" in out and "nofaces.ply" in out
    assert "1 scans" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["scan"] for r in report] == ["good"]
    assert report[0]["median_mm"] < 2.0  # a short run (80 steps), but a real fit
    verts, faces = dio.load_mesh(tmp_path / "run" / "meshes" / "good.obj")
    assert verts.shape == (5270, 3)
    assert dio.load_params(tmp_path / "run" / "params" / "good", required=("shape", "translation"))


@pytest.mark.slow
def test_register_flame_interrupted_exits_143_without_outputs_and_refuses_another_config(tmp_path):
    """The defects of the reliability issue, as a user meets them on the command line: a
    SIGTERM leaves a checkpoint and no outputs (exit 143); rerunning with one changed override
    is refused, naming the field, with the run untouched; the same command resumes and ends."""
    work = tmp_path / "run"
    flags_ = ["--config=configs/register_flame.py:tiny", "--config.data.synthetic.n_scans=2",
              "--config.registration.n_points=800", "--config.registration.steps=100",
              "--config.train.log_every=5", "--config.train.checkpoint_every=50", f"--workdir={work}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.register_flame", *flags_], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ""
    for line in proc.stdout:  # the first progress line: training runs
        out += line
        if line.startswith("step "):
            proc.send_signal(signal.SIGTERM)
            break
    out += proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: checkpointed step" in out
    produced = sorted(p.name for p in work.iterdir())
    assert not {"params", "meshes", "report.json", "report.md", "final_metrics.json"} & set(produced), produced
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    bad = subprocess.run([sys.executable, "-m", "experiments.register_flame",
                          *[f if "n_scans" not in f else "--config.data.synthetic.n_scans=3" for f in flags_]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "data.synthetic.n_scans: 2 in the run, 3 now" in bad.stderr
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    out = run("experiments.register_flame", *flags_)
    assert "resumed from" in out and (work / "report.json").exists() and (work / "final_metrics.json").exists()


def test_sweep_dry_run_prints_every_variant(tmp_path):
    dry = run("experiments.sweep", "--config=configs/register_flame.py:tiny", f"--workdir={tmp_path}",
              "--dry_run", "--set=registration.steps=20")
    cmds = [line for line in dry.splitlines() if "experiments.register_flame" in line]
    assert len(cmds) == 4 and all("--config.registration.steps=20" in c for c in cmds)
    assert any("use_offsets=True" in c for c in cmds)
    assert not tmp_path.joinpath("results.md").exists()


@pytest.mark.parametrize("module,config,message", [
    ("experiments.insta", "configs/insta.py:tinny", "ValueError: unknown variant 'tinny'; use one of"),
    ("experiments.d3ga", "configs/nope.py:tiny", "[Errno 2] No such file or directory: 'configs/nope.py'"),
])
def test_a_config_file_that_cannot_load_is_one_error_line(tmp_path, module, config, message):
    proc = subprocess.run([sys.executable, "-m", module, f"--config={config}", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --config={config}: ") and message in last, last
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module,spec,override,field", [
    ("experiments.sample_heads", "sample_heads.py", "--config.nmber=3", "'nmber'"),
    ("experiments.d3ga", "d3ga.py:tiny", "--config.trian.steps=10", "'trian' (Did you mean \"train\""),
])
def test_a_mistyped_config_field_is_one_error_line(tmp_path, module, spec, override, field):
    """Every experiment parses its flags with app.parse_flags: ml_collections' KeyError on an
    override naming a missing field is one 'error:' line naming the flag, exit 2, nothing written."""
    proc = subprocess.run([sys.executable, "-m", module, f"--config=configs/{spec}", override,
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {override.split('=')[0]}: the config has no field "
                                                           f"{field}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize("module,spec,got,want", [
    ("experiments.gem", "insta.py:tiny", "'insta'", "'gem'"),
    ("experiments.insta", "gem.py:tiny", "'gem'", "'insta'"),
])
def test_another_methods_config_file_is_one_error_line(tmp_path, module, spec, got, want):
    proc = subprocess.run([sys.executable, "-m", module, f"--config=configs/{spec}", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: the config is for experiment {got}, not {want}")
    assert not (tmp_path / "w").exists()


def test_synshot_prior_on_a_missing_data_root_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.synshot_prior", "--config=configs/synshot_prior.py:tiny",
                           f"--config.data.root={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'w'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: data.root '{tmp_path / 'nowhere'}' is not a folder"


def test_every_experiment_with_a_config_flag_parses_with_app_parse_flags():
    for path in sorted((Path(ROOT) / "experiments").glob("*.py")):
        text = path.read_text()
        if "DEFINE_config_file" in text:
            assert "app.run(main, flags_parser=run_app.parse_flags)" in text, path.name


def test_sweep_command_line_rejects_unknown_fields(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", "--config=configs/register_flame.py:tiny",
                           f"--workdir={tmp_path}", "--dry_run", "--set=registration.nope=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "error: unknown config field 'registration.nope'" in proc.stderr
    assert '"' not in proc.stderr        # the message as written, not a KeyError's repr


def test_unknown_override_fields_name_the_closest_field():
    from dhjax.train import config as config_lib

    cfg = config_lib.load_config(os.path.join(ROOT, "configs/register_flame.py:tiny"))
    for key, want in [("registration.stpes", "unknown config field 'registration.stpes'; did you mean "
                                             "'registration.steps'?"),
                      ("registraton.steps", "unknown config field 'registraton.steps' (no 'registraton'; did you "
                                            "mean 'registration'?)"),
                      ("registration.steps.x", "unknown config field 'registration.steps.x' ('registration.steps' "
                                               "is a value, not a group)"),
                      ("zzzz", "unknown config field 'zzzz'")]:
        with pytest.raises(KeyError) as err:
            config_lib.apply_overrides(cfg, {key: 1})
        assert str(err.value) == want


def test_sweep_refuses_a_value_the_experiments_check_refuses_before_anything_runs(tmp_path):
    """A value the experiment's own config check refuses (here INSTA's eval.video_fps) fails the
    sweep in a dry run and before the first variant runs: one error line naming the variant."""
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", "--config=configs/insta.py:tiny",
                           f"--workdir={tmp_path / 'w'}", "--dry_run", "--set=eval.video_fps=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: variant 00_") and "eval.video_fps must be > 0, got 0" in last, last
    assert not (tmp_path / "w").exists()


def test_sweep_checks_cover_every_run_module_with_a_config_check():
    """experiments.sweep's CHECKS (read from its source: importing it would define its flags in
    this process) names every synthesis and capture run module with a check_config, each for an
    experiment."""
    import ast
    import importlib

    tree = ast.parse((Path(ROOT) / "experiments" / "sweep.py").read_text())
    checks = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "CHECKS")
    have = {f"dhjax.{pkg}.{p.stem}" for pkg in ("synthesis", "capture") for p in (Path(ROOT) / "dhjax" / pkg).glob("*.py")
            if "\ndef check_config(cfg)" in p.read_text()}
    assert have == set(checks.values())
    for name, module in checks.items():
        assert (Path(ROOT) / "experiments" / f"{name}.py").exists()
        assert callable(importlib.import_module(module).check_config)


def test_sweep_commands_and_tables(tmp_path):
    """The variants' command lines, then a sweep whose runner fakes the experiments (one fails):
    the table holds every variant, its overrides and the final metrics of those that succeeded."""
    from dhjax.train import sweep

    assert sweep.parse_sets(["a.b=1", "c=0.5", "d=True", "e=x"]) == {"a.b": 1, "c": 0.5, "d": True, "e": "x"}
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_sets(["a.b"])
    spec = os.path.join(ROOT, "configs", "register_flame.py:tiny")
    variants = sweep.commands(spec, str(tmp_path), {"registration.steps": 20})
    assert len(variants) == 4
    for i, v in enumerate(variants):
        assert v.command[:3] == [sys.executable, "-m", "experiments.register_flame"]
        assert f"--config={spec}" in v.command and "--config.registration.steps=20" in v.command
        assert v.command[-1] == f"--workdir={v.workdir}"
        assert os.path.dirname(v.workdir) == str(tmp_path)
        assert os.path.basename(v.workdir) == sweep.variant_name(i, v.overrides)
    insta = os.path.join(ROOT, "configs", "insta.py:tiny")     # its sweep starts with the config as it is
    base = sweep.commands(insta, str(tmp_path / "i"))[0]
    assert base.workdir == str(tmp_path / "i" / "00_baseline") and base.overrides == {}
    (tmp_path / "i" / "00_").mkdir(parents=True)   # a sweep started before the baseline had its name resumes in it
    assert sweep.commands(insta, str(tmp_path / "i"))[0].workdir == str(tmp_path / "i" / "00_")
    (tmp_path / "i" / "00_baseline").mkdir()
    assert sweep.commands(insta, str(tmp_path / "i"))[0].workdir == str(tmp_path / "i" / "00_baseline")
    with pytest.raises(KeyError, match="registration.nope"):
        sweep.commands(spec, str(tmp_path), {"registration.nope": 1})

    def fake_runner(cmd):
        work = cmd[-1].partition("=")[2]
        index = int(os.path.basename(work)[:2])
        if index == 1:
            return types.SimpleNamespace(returncode=3)
        os.makedirs(work)
        with open(os.path.join(work, "final_metrics.json"), "w") as f:
            json.dump({"scan_median_mm": 0.5 + index, "loss": 1.23456789}, f)
        return types.SimpleNamespace(returncode=0)

    lines = []
    rows = sweep.run_variants(variants, str(tmp_path), log=lines.append, runner=fake_runner)
    assert [r["status"] for r in rows] == ["ok", "failed (3)", "ok", "ok"]
    assert len(lines) == 5 and lines[0].startswith("[1/4] ") and lines[2] == f"  {os.path.basename(variants[1].workdir)}: failed (3)"
    table = (tmp_path / "results.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:2] == ["variant", "status"] and "scan_median_mm" in header
    overridden = list(dict.fromkeys(k for v in variants for k in v.overrides))
    assert overridden and header[2:2 + len(overridden)] == overridden       # the overrides, then the metrics
    assert header[2 + len(overridden):] == sorted(header[2 + len(overridden):])
    assert table[1] == "|" + "---|" * len(header) and len(table) == 6
    assert "| 1.2346 |" in table[2] and "| 2.5 |" in table[4]
    assert "| failed (3) |" in table[3]
    csv_rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["scan_median_mm"] for r in csv_rows] == ["0.5", "", "2.5", "3.5"]
    for v, r in zip(variants, rows):
        for k, value in v.overrides.items():
            assert r[k] == value


def test_sweep_over_seeds_runs_each_seed_and_tabulates_mean_spread_and_paired_differences(tmp_path):
    """run_seeds with a runner that fakes the experiments: each seed's sweep in seed_<s>/ with
    seed=s on every variant, then seeds.csv/.md with exact means, sample stds and paired
    differences to the first variant; a variant that failed on one seed counts the others."""
    from dhjax.train import sweep

    spec = os.path.join(ROOT, "configs", "register_flame.py:tiny")
    ran = []
    # metric m of variant i on seed s: 10 i + s^2 (so the std and differences are known exactly);
    # variant 2 fails on seed 1.
    def fake_runner(cmd):
        work = cmd[-1].partition("=")[2]
        seed = int([c for c in cmd if c.startswith("--config.seed=")][0].partition("=")[2])
        index = int(os.path.basename(work)[:2])
        assert os.path.basename(os.path.dirname(work)) == f"seed_{seed}"
        ran.append((seed, index))
        if (seed, index) == (1, 2):
            return types.SimpleNamespace(returncode=3)
        os.makedirs(work)
        flags = [c[len("--config."):] for c in cmd if c.startswith("--config.")]
        config_lib.save_config(config_lib.apply_overrides(config_lib.load_config(spec), sweep.parse_sets(flags)), work)
        with open(os.path.join(work, "final_metrics.json"), "w") as f:
            json.dump({"m": 10.0 * index + seed ** 2, "other/x": float(index == 1), "other/y": 1.0}, f)
        return types.SimpleNamespace(returncode=0)

    lines = []
    rows = sweep.run_seeds(spec, str(tmp_path), "0,1,3", {"registration.steps": 20}, log=lines.append,
                           runner=fake_runner)
    assert ran == [(s, i) for s in (0, 1, 3) for i in range(4)]     # one whole seed after another
    assert [r["seeds"] for r in rows] == ["3/3", "3/3", "2/3", "3/3"]
    seq = [0.0, 1.0, 9.0]
    mean, std = sum(seq) / 3, float(np.std(seq, ddof=1))
    assert rows[0]["m"] == pytest.approx(mean) and rows[0]["m:std"] == pytest.approx(std)
    assert rows[0]["m:min"] == 0.0 and rows[0]["m:max"] == 9.0 and rows[0]["m:n"] == 3 and "m:diff" not in rows[0]
    assert rows[1]["m"] == pytest.approx(10 + mean) and rows[1]["m:diff"] == pytest.approx(10.0)
    assert (rows[1]["m:above"], rows[1]["m:below"], rows[1]["m:paired"]) == (3, 0, 3)
    assert rows[2]["m:n"] == 2 and rows[2]["m"] == pytest.approx(20 + 4.5)      # seeds 0 and 3 only: 0 and 9
    assert rows[2]["m:std"] == pytest.approx(float(np.std([0.0, 9.0], ddof=1))) and rows[2]["m:paired"] == 2
    assert (rows[1]["other/x:above"], rows[3]["other/x:below"], rows[3]["other/y:diff"]) == (3, 0, 0.0)
    assert rows[3]["other/y:above"] == rows[3]["other/y:below"] == 0                # ties are neither
    csv_rows = list(csv.DictReader(open(tmp_path / "seeds.csv")))
    assert [float(r["m"]) for r in csv_rows] == pytest.approx([r["m"] for r in rows])
    md = (tmp_path / "seeds.md").read_text()
    assert "Seeds 0, 1, 3 (with results: 0, 1, 3)" in md
    assert f"| {mean:.4g} ± {std:.2g} |" in md and f"| {10 + mean:.4g} ± {std:.2g} (+10; up 3/3) |" in md
    assert (tmp_path / "seed_1" / "results.md").read_text().count("failed (3)") == 1
    # --metrics: exact names and prefixes; a name no variant has is said, not an error.
    sweep.write_seed_tables(str(tmp_path), (0, 1, 3), metrics=["other/", "nope"])
    md = (tmp_path / "seeds.md").read_text()
    header = md.splitlines()[4]
    assert "other/x" in header and "other/y" in header and "| m |" not in header
    assert "No finished variant has the metric(s) nope." in md
    # Called again: every seed keeps its finished variants and reruns only the failed one.
    ran.clear()
    sweep.run_seeds(spec, str(tmp_path), "0,1,3", {"registration.steps": 20}, log=lines.append, runner=fake_runner)
    assert ran == [(1, 2)]
    for bad, message in [("0,x", "comma-separated integers"), ("1,1", "no seed twice"), ("", "at least one")]:
        with pytest.raises(ValueError, match=message):
            sweep.run_seeds(spec, str(tmp_path / "b"), bad, runner=fake_runner)
    with pytest.raises(ValueError, match="--seeds alone"):
        sweep.run_seeds(spec, str(tmp_path / "b"), "0", {"seed": 4}, runner=fake_runner)
    with pytest.raises(ValueError, match="no top-level 'seed' field"):
        sweep.run_seeds(os.path.join(ROOT, "configs", "track.py"), str(tmp_path / "b"), "0", runner=fake_runner)
    assert not (tmp_path / "b").exists()


def test_sweep_command_line_over_seeds(tmp_path):
    dry = run("experiments.sweep", "--config=configs/register_flame.py:tiny", f"--workdir={tmp_path}",
              "--dry_run", "--seeds=2,5")
    cmds = [line for line in dry.splitlines() if "experiments.register_flame" in line]
    assert len(cmds) == 8 and sum("--config.seed=2 " in c for c in cmds) == 4
    assert all(f"--workdir={tmp_path}/seed_5/" in c for c in cmds[4:])
    assert not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "experiments.sweep", "--config=configs/register_flame.py:tiny",
                           f"--workdir={tmp_path}", "--dry_run", "--metrics=m"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "error: --metrics selects the columns of seeds.md" in proc.stderr


def test_sweep_refuses_bad_values_and_mismatched_folders_before_anything_runs(tmp_path):
    """--set values are Python literals; a value that does not fit its field, a bad train.*
    value, a workdir that is a file and variant folders holding runs with another config (the
    sweep called again with another --set) are errors before any variant runs; a --set of a
    field the variants set themselves is logged."""
    from dhjax.train import app
    from dhjax.train import config as config_lib
    from dhjax.train import sweep

    assert sweep.parse_sets(["a=(10,20)", "b=runs/synshot", "c=1e3", "d=nan", "e='x y'"]) == {
        "a": (10, 20), "b": "runs/synshot", "c": 1000.0, "d": "nan", "e": "x y"}
    spec = os.path.join(ROOT, "configs", "register_flame.py:tiny")
    with pytest.raises(ValueError, match=r"config field registration.steps: 1.5 does not fit its type \(int"):
        sweep.commands(spec, str(tmp_path), {"registration.steps": 1.5})
    insta = os.path.join(ROOT, "configs", "insta.py:tiny")
    with pytest.raises(ValueError, match="variant 00_baseline of .*train.steps must be an integer >= 1, got 0"):
        sweep.commands(insta, str(tmp_path), {"train.steps": 0})
    (tmp_path / "file").write_text("x")
    with pytest.raises(app.RunError, match="not a folder"):
        sweep.run(spec, str(tmp_path / "file"), {"registration.steps": 20}, log=lambda *a: None)
    lines = []
    sweep.run(spec, str(tmp_path / "s"), {"data.synthetic.noise_mm": 2.0}, dry_run=True, log=lines.append)
    assert lines[0].startswith("note: the sweep's variants set data.synthetic.noise_mm themselves"), lines[0]
    variants = sweep.commands(spec, str(tmp_path / "s"), {"registration.steps": 20})
    for v in variants[:2]:             # an earlier call with steps=20 ran two variants
        config_lib.save_config(v.config, v.workdir)
        open(os.path.join(v.workdir, "metrics.jsonl"), "w").write("{}\n")
    sweep.check_variant_workdirs(variants)                        # the same settings resume
    with pytest.raises(ValueError, match=r"(?s)2 of 4 variant folder\(s\) hold runs with another config.*"
                                         r"00_.*registration.steps: 20 in the run, 30 now"):
        sweep.run(spec, str(tmp_path / "s"), {"registration.steps": 30}, log=lambda *a: None)
    assert not (tmp_path / "s" / "results.csv").exists()


def test_sweep_reports_interrupted_variants_and_resumes_them(tmp_path):
    """Exit 143 (an experiment stopped by SIGTERM) or a signal is "interrupted", not ok or
    failed; the next call keeps the finished variants and runs the others again, and a finished
    variant whose config changed runs again too."""
    from dhjax.train import config as config_lib
    from dhjax.train import sweep

    spec = os.path.join(ROOT, "configs", "register_flame.py:tiny")
    variants = sweep.commands(spec, str(tmp_path), {"registration.steps": 20})
    by_dir = {v.workdir: v for v in variants}
    codes = {0: [0, 0, 0], 1: [143, 0], 2: [-15, 0], 3: [3, 0]}
    calls = []

    def fake_runner(cmd):
        work = cmd[-1].partition("=")[2]
        index = int(os.path.basename(work)[:2])
        calls.append(index)
        code = codes[index].pop(0)
        os.makedirs(work, exist_ok=True)
        config_lib.save_config(by_dir[work].config, work)
        if code == 0:
            with open(os.path.join(work, "final_metrics.json"), "w") as f:
                json.dump({"scan_median_mm": 0.5 + index}, f)
        return types.SimpleNamespace(returncode=code)

    lines = []
    rows = sweep.run_variants(variants, str(tmp_path), log=lines.append, runner=fake_runner)
    assert [r["status"] for r in rows] == ["ok", "interrupted", "interrupted", "failed (3)"]
    assert any(line.endswith("interrupted (resumes on the next call of the sweep)") for line in lines)
    assert "scan_median_mm" not in rows[1]
    calls.clear()
    rows = sweep.run_variants(variants, str(tmp_path), log=lines.append, runner=fake_runner)
    assert calls == [1, 2, 3]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [r["scan_median_mm"] for r in rows] == [0.5, 1.5, 2.5, 3.5]
    calls.clear()
    changed = sweep.commands(spec, str(tmp_path), {"registration.steps": 30})
    by_dir.update({v.workdir: v for v in changed})
    codes.update({1: [0], 2: [0], 3: [0]})
    sweep.run_variants(changed, str(tmp_path), log=lines.append, runner=fake_runner)
    assert calls == [0, 1, 2, 3]  # every config changed


def test_sweep_passes_sigterm_to_the_running_variant_and_stops(tmp_path):
    import threading

    from dhjax.train import sweep

    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
             "time.sleep(60)")
    variants = [sweep.Variant({"x": i}, str(tmp_path / f"v{i}"), [sys.executable, "-c", child]) for i in range(2)]
    timer = threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.time()
    try:
        with pytest.raises(SystemExit) as stop:
            sweep.run_variants(variants, str(tmp_path), log=lambda *a: None)
    finally:
        timer.cancel()   # a run_variants failing within 2 s must not SIGTERM a later test's worker
    assert stop.value.code == 143 and time.time() - t0 < 30
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["status"] for r in rows] == ["interrupted"]  # the second variant never started


def test_sweep_forwards_a_sigterm_that_arrives_while_the_variant_starts(monkeypatch):
    """The forwarder is in place before Popen: a SIGTERM during the start reaches the variant
    (before, it went to the previous handler and the variant ran on)."""
    from dhjax.train import sweep

    real_popen = subprocess.Popen

    def popen_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_popen(*args, **kwargs)

    missed = []

    def guard(*args):          # the handler the forwarder replaces and must put back
        missed.append(1)

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        monkeypatch.setattr(subprocess, "Popen", popen_after_a_sigterm)
        t0 = time.time()
        result = sweep.run_forwarding_sigterm([sys.executable, "-c", "import time; time.sleep(60)"])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not missed and result.sigterm and time.time() - t0 < 30 and restored is guard
    assert result.returncode == -signal.SIGTERM   # the variant was stopped by the forwarded signal

    # one that arrives before the start (just after the forwarder is installed) starts nothing
    real_signal, started = signal.signal, []

    def signal_then_sigterm(signum, handler):
        old = real_signal(signum, handler)
        if not started:
            started.append(0)
            os.kill(os.getpid(), signal.SIGTERM)
        return old

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        monkeypatch.setattr(signal, "signal", signal_then_sigterm)
        monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(1))
        result = sweep.run_forwarding_sigterm([sys.executable, "-c", "pass"])
        restored2 = signal.getsignal(signal.SIGTERM)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert not missed and started == [0] and result.sigterm and result.returncode == -signal.SIGTERM
    assert restored2 is guard


@pytest.mark.slow
def test_sweep_runs_every_variant_and_tabulates(tmp_path):
    """Four short registration runs (minutes on 2 cores: each variant compiles its own step)."""
    from dhjax.train import sweep

    lines = []
    rows = sweep.run(os.path.join(ROOT, "configs", "register_flame.py:tiny"), str(tmp_path),
                     {"registration.steps": 20, "data.synthetic.n_scans": 2, "registration.n_points": 800},
                     log=lines.append)
    table = (tmp_path / "results.md").read_text()
    assert table.count("| ok |") == 4, "\n".join(lines)[-3000:]
    assert [r["status"] for r in rows] == ["ok"] * 4
    csv_rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(csv_rows) == 4 and all(float(r["scan_median_mm"]) > 0 for r in csv_rows)
    assert "finite" not in csv_rows[0] and "skipped_steps" in csv_rows[0]
