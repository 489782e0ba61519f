"""The run helper every experiment and method `run(cfg, workdir)` shares.

    run = app.start(workdir, cfg)            # distributed init, quiet logs, config.json, lead process
    run.log("data ready")                    # prints on the lead process only
    app.merge_final_metrics(workdir, {...})  # one final_metrics.json per run, merged, atomic
    print(app.markdown_table(rows))          # every Markdown table of dhjax
    cfg, state, step = app.load_run(workdir, template_fn, experiment="synshot_prior")

Files of a run folder (the same for every experiment): `config.json` (the resolved config),
`checkpoints/` (orbax; `dhjax.train.checkpoint`), `metrics.jsonl` and `tb/` (`dhjax.train.logs`),
`final_metrics.json` (flat {name: number}: the harness's last training and evaluation metrics,
then whatever the method adds after training).

Guarantees `start` gives every run, before any data is generated or anything compiles:
  - the harness's config fields are valid (`config.check_train_config`, messages name the field);
  - the workdir is a writable folder;
  - a workdir that already holds a run (its config.json) is only resumed with the same config:
    any differing field is refused with a `RunError` listing them, except that
    `--allow_config_change` (or `allow_config_change=True`) accepts changes of the fields in
    `RESUMABLE_CHANGES` (step counts, logging/checkpoint intervals and the non-finite-step
    policy) and in the experiment's own such fields (`EXPERIMENT_RESUMABLE_CHANGES`, e.g. a step
    count that train.steps refers to; note that a schedule derived from train.steps, such as
    MICA's cosine decay, changes from the resume point);
    changes of `INPUT_PIPELINE_FIELDS` (how the batches are read: loader kind, worker processes,
    threads) are accepted without it, since they change no batch.
An interrupted run (SIGTERM: the harness checkpoints and stops) raises `Interrupted`, a
SystemExit with status `EXIT_INTERRUPTED` (143, as a process ended by SIGTERM reports), so no
final outputs are written and the command exits non-zero; rerunning it resumes.
"""

from __future__ import annotations

import fcntl
import json
import math
import socket
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
from absl import flags

from dhjax.train import checkpoint as ckpt_lib
from dhjax.train import config as config_lib

FINAL_METRICS = "final_metrics.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"          # held (POSIX record lock) by the process running in a workdir
EXIT_INTERRUPTED = 143     # the exit status of an interrupted run (128 + SIGTERM)

# Config fields whose change cannot alter a checkpointed state's meaning: how long to train and
# how often to log, evaluate and checkpoint. `--allow_config_change` accepts changes to these on
# resume; any other difference is refused.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.eval_every", "train.on_nonfinite", "train.max_skipped_fraction")

# Per experiment, more fields that, like train.steps, only say how long to train (here in the
# code, not in a config, so that neither a command line nor an older run's config.json changes
# them): register_flame's train.steps refers to registration.steps, its optimiser's schedule
# length, which therefore changes from the resume point when a run is extended.
EXPERIMENT_RESUMABLE_CHANGES = {"register_flame": ("registration.steps",)}

# Config fields that choose how the training batches are read, never which: the input pipeline
# gives the same batches for any of their values (`dhjax.data.grain_pipeline`), so a resume
# accepts their changes without --allow_config_change (and says so).
INPUT_PIPELINE_FIELDS = ("loader.kind", "loader.workers", "loader.threads")

_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "resume a run whose config.json differs from the given config only in the fields of "
    "dhjax.train.app.RESUMABLE_CHANGES (step counts, logging and checkpoint intervals, the non-finite-step policy), in "
    "the experiment's own in dhjax.train.app.EXPERIMENT_RESUMABLE_CHANGES, and in "
    "fields its config.json lacks (options added to dhjax after the run started)")


class RunError(ValueError):
    """A run that cannot start as asked: a config that differs from the workdir's run, a bad
    config value, an unusable workdir. The message says what and how to proceed."""


class Interrupted(SystemExit):
    """Training stopped by SIGTERM after writing a checkpoint. A SystemExit with status
    `EXIT_INTERRUPTED`, so that nothing after training runs (no final outputs from a
    half-trained state) unless a caller catches it on purpose.

    Attributes: step (the checkpointed step), directory (the checkpoints folder).
    """

    def __init__(self, step: int, directory: str):
        super().__init__(EXIT_INTERRUPTED)
        self.step, self.directory = int(step), str(directory)

    def __str__(self) -> str:
        return (f"interrupted: checkpointed step {self.step} in {self.directory}; rerun the same "
                f"command to resume (exit status {EXIT_INTERRUPTED})")


def quiet_library_logs() -> None:
    """Turns absl INFO logging (orbax prints several lines per checkpoint) down to warnings, so
    the progress line stays readable."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def init_distributed() -> None:
    """Joins a multi-process run when launched as one (`jax.distributed.initialize`).

    Explicit: DHJAX_COORDINATOR (host:port of process 0), DHJAX_NUM_PROCESSES and
    DHJAX_PROCESS_ID (0 .. n-1) in every process; DHJAX_NUM_PROCESSES=1 runs alone even under
    SLURM. Otherwise a SLURM step of several tasks (srun; SLURM_STEP_NUM_TASKS, or SLURM_NTASKS,
    > 1), whose coordinator, process count and id jax reads from SLURM's variables (each task
    then takes the GPU numbered SLURM_LOCALID on its node: one task per GPU;
    docs/slurm/synshot_prior.sbatch). On CPUs the processes exchange gradients over gloo. Calling
    it twice in one process is harmless. Raises RunError when DHJAX_NUM_PROCESSES > 1 comes
    without the other two variables.
    """
    n = _env_int("DHJAX_NUM_PROCESSES", os.environ.get("DHJAX_NUM_PROCESSES") or "1", 1)
    if not multi_process_launch():
        return
    if jax.distributed.is_initialized():
        return
    # Cross-process collectives on CPU need gloo (jax 0.10's default, set in case another
    # version defaults to none). GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if n > 1:
        missing = [k for k in ("DHJAX_COORDINATOR", "DHJAX_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise RunError(f"DHJAX_NUM_PROCESSES={n} needs {' and '.join(missing)} too (the coordinator's "
                           f"host:port, and this process's id 0..{n - 1})")
        pid = _env_int("DHJAX_PROCESS_ID", os.environ["DHJAX_PROCESS_ID"], 0)
        if pid >= n:
            raise RunError(f"DHJAX_PROCESS_ID={pid} must be below DHJAX_NUM_PROCESSES={n} (ids 0..{n - 1})")
        jax.distributed.initialize(coordinator_address=os.environ["DHJAX_COORDINATOR"],
                                   num_processes=n, process_id=pid)
    else:
        jax.distributed.initialize()


def multi_process_launch() -> bool:
    """Whether this process was launched as one of several (`init_distributed`'s rule, from the
    environment alone: DHJAX_NUM_PROCESSES > 1, or without it a SLURM step of several tasks).
    Values that are not integers read as one process here; `init_distributed` reports them."""
    def count(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            return 1

    explicit = os.environ.get("DHJAX_NUM_PROCESSES")
    if explicit is not None:
        return count(explicit) > 1
    # srun sets SLURM_STEP_NUM_TASKS to its step's task count; SLURM_NTASKS, the fallback, may
    # be the whole allocation's.
    return count(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1


def _env_int(name: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise RunError(f"{name} must be an integer >= {low}, got {text!r}")
    return value


class Run:
    """A started run: its folder, whether this is the lead process (process 0, the only one that
    writes files and prints), and its start time.

    Attributes: workdir (Path), lead (bool), t0 (time.time() at start).
    """

    def __init__(self, workdir: str | os.PathLike, lead: bool, t0: float, lock=None):
        self.workdir, self.lead, self.t0 = Path(workdir), bool(lead), float(t0)
        self._lock = lock        # the open LOCK_FILE (`lock_workdir`), held while this object lives

    def log(self, *args, **kwargs) -> None:
        """print() on the lead process, flushed; nothing elsewhere."""
        if self.lead:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def path(self, *parts: str) -> Path:
        """A path inside the run's workdir."""
        return self.workdir.joinpath(*parts)

    def elapsed(self) -> float:
        """Seconds since `start`."""
        return time.time() - self.t0

    def done(self, *outputs: str) -> None:
        """The closing line every experiment prints: elapsed time and what it wrote."""
        what = ", ".join(outputs) if outputs else str(self.workdir)
        self.log(f"done in {self.elapsed():.0f}s: {what}")


def _allow_flag() -> bool:
    return bool(_ALLOW_CONFIG_CHANGE.value) if flags.FLAGS.is_parsed() else False


def check_experiment(cfg, name: str) -> None:
    """Raises RunError unless cfg.experiment is `name`: another method's config file (e.g.
    configs/insta.py given to experiments.gem) would otherwise fail on its first missing field,
    or on a value that suits the other method."""
    got = cfg.get("experiment") if hasattr(cfg, "get") else None
    if got != name:
        what = f"is for experiment {got!r}" if got else "names no experiment"
        raise RunError(f"the config {what}, not {name!r}: give {name}'s own config file "
                       f"(configs/{name}.py or a file based on it)")


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Creates `workdir` when needed and checks that it is a writable folder; raises RunError
    naming it otherwise. Returns it as a Path."""
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise RunError(f"workdir '{work}' exists and is not a folder")
    try:
        work.mkdir(parents=True, exist_ok=True)
        probe = work / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"workdir '{work}' is not writable ({type(err).__name__}: {err.strerror or err})") from err
    return work


def lock_workdir(work: Path, log: Callable = print):
    """Takes the workdir's lock (a POSIX record lock on <work>/.lock, which the system releases
    when the process ends, however it ends) and returns the open file that holds it; raises
    RunError naming the holder when another process has it (two runs in one folder would
    interleave their checkpoints and metrics). The same process may take it again (a test that
    starts twice). On a filesystem without locks the run goes on unlocked, with a log line."""
    f = open(work / LOCK_FILE, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        f.seek(0)
        holder = f.read().strip() or "its pid is not recorded"
        f.close()
        raise RunError(f"'{work}' is in use by another running process ({holder}): wait for it to end (or stop "
                       "it), or use another --workdir") from None
    except OSError as err:
        log(f"note: cannot lock '{work / LOCK_FILE}' ({err.strerror or err}); nothing stops a second process "
            "from running in this workdir at the same time")
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _holds_only_config(work: Path) -> bool:
    """Whether a workdir holds nothing but CONFIG_FILE (and LOCK_FILE) and empty folders."""
    for p in work.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            continue
        if p.parent == work and p.name in (CONFIG_FILE, LOCK_FILE):
            continue
        return False
    return True


def check_resume_config(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict,
                        allow_config_change: bool | None = None, log: Callable = print) -> list:
    """Compares the config.json of a run already in `workdir` with `cfg`.

    Returns the accepted differences [(field, old, new)] ([] for a new or identical run).
    Raises RunError listing the differing fields when they differ, unless allow_config_change
    (default: the --allow_config_change flag) is set and every difference is in
    `resumable_changes(cfg)` or a field the run's config.json lacks (an option added to dhjax after
    the run started: resuming with the flag takes its value now, normally its default, which
    keeps the earlier behaviour); differences in `INPUT_PIPELINE_FIELDS` are always accepted. An
    unreadable config.json is an error too (the run cannot be checked). A config.json of another
    experiment is refused by name. A workdir that holds nothing but its config.json (and empty
    folders: a start that failed before writing anything, e.g. on a mistyped data path) is no
    run: the new config replaces it, with a log line.
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path} is unreadable ({err}); cannot check that this config matches the run "
                       f"in '{workdir}' (move the folder away or use another --workdir)") from err
    diffs = config_lib.config_differences(old, cfg)
    if not diffs:
        return []
    if _holds_only_config(Path(workdir)):
        log(f"'{workdir}' holds only the config.json of a start that wrote nothing else; the new config "
            f"replaces it (it differed in: {', '.join(k for k, _, _ in diffs[:8])}{', ...' if len(diffs) > 8 else ''})")
        return []
    runs = dict((k, (a, b)) for k, a, b in diffs).get("experiment")
    if runs is not None and config_lib.MISSING not in runs:
        raise RunError(f"'{workdir}' holds a run of experiment {runs[0]!r}, not {runs[1]!r}: use another --workdir")
    if runs is not None and runs[1] == config_lib.MISSING:      # e.g. sample_heads or a benchmark in a run's folder
        raise RunError(f"'{workdir}' holds a run of experiment {runs[0]!r}, and this program's config is not one: "
                       "use another --workdir")
    allow = _allow_flag() if allow_config_change is None else bool(allow_config_change)
    resumable = resumable_changes(cfg)

    def flag_accepts(d):
        return d[0] in resumable or (d[1] == config_lib.MISSING and d[2] != config_lib.MISSING)

    blocked = [d for d in diffs if d[0] not in INPUT_PIPELINE_FIELDS and not (allow and flag_accepts(d))]
    if blocked:
        shown = "\n".join(f"  {k}: {a!r} in the run, {b!r} now" for k, a, b in blocked[:20])
        more = f"\n  ... and {len(blocked) - 20} more" if len(blocked) > 20 else ""
        hint = ("" if allow or not all(flag_accepts(d) for d in blocked) else
                "; --allow_config_change accepts these" + (
                    " (fields absent in the run are options added to dhjax after it started)"
                    if any(d[1] == config_lib.MISSING for d in blocked) else ""))
        what = ("a run whose config.json names no experiment (e.g. experiments.make_synthetic's output), not a "
                f"{runs[1]!r} run, and with another config" if runs is not None and runs[0] == config_lib.MISSING
                and runs[1] != config_lib.MISSING else "a run with another config")
        if allow:                        # every blocked field is one the flag cannot accept
            hint = (f"; --allow_config_change accepts only {', '.join(resumable)} and fields the run's "
                    "config lacks")
        raise RunError(f"'{workdir}' holds {what} ({len(blocked)} field(s) differ):\n"
                       f"{shown}{more}\nuse another --workdir for a new run, or the run's own config to "
                       f"resume it{hint}")
    log("config changes accepted on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs))
    return diffs


def resumable_changes(cfg) -> tuple[str, ...]:
    """The fields whose change `--allow_config_change` accepts on resume: `RESUMABLE_CHANGES`
    plus those `EXPERIMENT_RESUMABLE_CHANGES` lists for the config's experiment."""
    experiment = cfg.get("experiment") if cfg is not None else None
    return RESUMABLE_CHANGES + EXPERIMENT_RESUMABLE_CHANGES.get(experiment, ())


def start(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None, *,
          allow_config_change: bool | None = None) -> Run:
    """Start-up of every experiment: joins a multi-process run, turns library logs down, and,
    before any work: checks the harness's config fields (`config.check_train_config`), that the
    workdir is (or can be created as) a writable folder, and that a run already in it has the
    same config (`check_resume_config`; allow_config_change defaults to the
    --allow_config_change flag). Then the lead process takes the workdir's lock (`lock_workdir`:
    refused while another process runs there; held until the returned Run is dropped or the
    process ends) and writes the resolved config to <workdir>/config.json. Raises RunError (a
    ValueError) naming the problem."""
    init_distributed()
    quiet_library_logs()
    lead = jax.process_index() == 0
    if cfg is not None:
        try:
            config_lib.check_train_config(cfg)
        except ValueError as err:
            raise RunError(str(err)) from err
    work = check_workdir(workdir) if lead else Path(workdir)
    if cfg is not None:
        check_resume_config(work, cfg, allow_config_change, log=print if lead else (lambda *a: None))
    lock = lock_workdir(work) if lead else None
    if cfg is not None and lead:
        config_lib.save_config(cfg, str(work))
    return Run(work, lead, time.time(), lock)


def read_final_metrics(workdir: str | os.PathLike) -> dict:
    """<workdir>/final_metrics.json as a dict ({} when there is none)."""
    path = Path(workdir) / FINAL_METRICS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def merge_final_metrics(workdir: str | os.PathLike, metrics: Mapping[str, Any]) -> dict:
    """Merges {name: value} into <workdir>/final_metrics.json (new values win; the file is
    replaced atomically) and returns the merged dict. Values must be JSON numbers, strings or
    bools (numpy scalars are converted)."""
    merged = read_final_metrics(workdir)
    for k, v in metrics.items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        merged[str(k)] = v
    Path(workdir).mkdir(parents=True, exist_ok=True)
    config_lib.write_text_atomic(Path(workdir) / FINAL_METRICS, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def _cell(value: Any, floatfmt: str) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0
                                    and "float" in str(value.dtype)):
        v = float(value)
        return format(v, floatfmt) if math.isfinite(v) else str(v)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, *,
                   headers: Sequence[str] | None = None, floatfmt: str = ".3f",
                   align: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (dicts), one column per key, ending with a newline.

    Args:
      rows: the table's rows; a missing key gives an empty cell.
      keys: columns in order (default: the keys of all rows, in first-seen order).
      headers: column titles (default: the keys).
      floatfmt: format spec of float cells (e.g. ".3f", ".5g"); ints and strings print as they are.
      align: per column "l" or "r" (default: all left, `|---|`).
    """
    if keys is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        keys = list(seen)
    keys = list(keys)
    headers = list(headers) if headers is not None else keys
    if len(headers) != len(keys):
        raise ValueError(f"{len(headers)} headers for {len(keys)} columns")
    rule = ["---:" if a == "r" else "---" for a in (align or ["l"] * len(keys))]
    if len(rule) != len(keys):
        raise ValueError(f"{len(rule)} alignments for {len(keys)} columns")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k), floatfmt) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def read_config(workdir: str | os.PathLike, experiment: str | None = None,
                defaults: ml_collections.ConfigDict | Mapping | None = None) -> ml_collections.ConfigDict:
    """The resolved config of a run (<workdir>/config.json).

    defaults: a config (e.g. {"model": <the method's default_model_config()>}) whose fields fill
    those the run's config.json lacks, at any depth (`config.fill_missing`): a run trained before
    an option was added to dhjax ran with the option's default, so reading it back with the
    default keeps its behaviour. Fields the run has are kept as they are.
    Raises FileNotFoundError (naming the file) when there is none, ValueError when it is not JSON
    or, with `experiment` given, when it belongs to another experiment (config field
    `experiment`).
    """
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        hint = f"; train it first with python -m experiments.{experiment}" if experiment else ""
        raise FileNotFoundError(f"'{workdir}' holds no {CONFIG_FILE}: it is not the folder of a run{hint}")
    try:
        cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if experiment is not None and cfg.get("experiment") != experiment:
        if cfg.get("experiment") is None:
            raise ValueError(f"{path} is not the config of a {experiment!r} run: it names no experiment (a folder "
                             f"of e.g. experiments.make_synthetic); train it with python -m experiments.{experiment}")
        raise ValueError(f"{path} belongs to experiment {cfg.get('experiment')!r}, not {experiment!r}")
    if defaults is not None:
        config_lib.fill_missing(cfg, defaults)
    return cfg


def load_run(workdir: str | os.PathLike, template: Callable[[ml_collections.ConfigDict], Any], *,
             experiment: str | None = None) -> tuple[ml_collections.ConfigDict, Any, int]:
    """Read-only loading of a finished (or checkpointed) run: its config and newest checkpoint.

    Args:
      workdir: the run's folder.
      template: cfg -> a state pytree of the run's structure (arrays or ShapeDtypeStructs are
        fine; only shapes and dtypes are used).
      experiment: when given, the run's config must belong to this experiment.
    Returns:
      (cfg, state, step). Raises FileNotFoundError when there is no config or no checkpoint and
      ValueError when the checkpoint does not fit the config; the messages name the folder.
    Library logs are turned down as `start` does (orbax logs every restore at INFO).
    """
    quiet_library_logs()
    cfg = read_config(workdir, experiment)
    try:
        state, _, step = ckpt_lib.load_latest(str(workdir), template(cfg))
    except FileNotFoundError as err:
        hint = f"; train it first with python -m experiments.{experiment}" if experiment else ""
        raise FileNotFoundError(f"run '{workdir}' has no checkpoint ({err}){hint}") from err
    return cfg, state, step


def exit_on_user_error(fn: Callable[[], Any], errors: Iterable[type] = (FileNotFoundError, ValueError)) -> Any:
    """Calls fn(); one of `errors`, or a FloatingPointError (a run that diverged: `loop.train`'s
    message says what was checkpointed and how to go on), becomes 'error: <message>' on stderr
    and exit status 2 (for command-line programs whose user gave a wrong folder, file or value).

    While fn runs in a single-process run, a SIGTERM that arrives outside a training loop (which
    checkpoints and stops at a step boundary on its own; the sweep forwards it to the running
    variant) stops the program with a message and exit status `EXIT_INTERRUPTED` instead of
    silently: e.g. between GEM's stages, or while an experiment evaluates. What a rerun resumes
    from (checkpoints, stage files such as GEM's distilled.npz) is written atomically, so the
    same command resumes. The previous handler is restored when fn returns."""
    with _SigtermStops():
        try:
            return fn()
        except (*tuple(errors), FloatingPointError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


class _SigtermStops:
    """SIGTERM -> a message and SystemExit(EXIT_INTERRUPTED), for the duration of the context.
    Training loops put their own handler in place while they run (`loop._Sigterm`) and restore
    this one after. Single-process runs only: a multi-process launch (`multi_process_launch`)
    leaves SIGTERM to jax's preemption service, which stops all processes at one step of the
    next training loop. Not installed off the main thread (Python allows handlers only there)."""

    def __enter__(self):
        self._old = None
        if multi_process_launch():
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:
            pass
        return self

    @staticmethod
    def _handle(signum, frame):
        msg = (f"SIGTERM: stopping outside a training loop (no step to checkpoint); finished stages and "
               f"checkpoints are kept, rerun the same command to resume (exit status {EXIT_INTERRUPTED})")
        try:       # the signal may have interrupted a print: then write past the buffer
            print(msg, flush=True)
        except RuntimeError:
            os.write(2, (msg + "\n").encode())
        raise SystemExit(EXIT_INTERRUPTED)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _config_file_error(argv: list[str], err: BaseException) -> None:
    """A --config file that cannot be loaded (missing, or its get_config raised: e.g. an unknown
    variant) as one 'error:' line with the cause's last line, and exit status 2."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    given = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "?")
    cause = next((s for s in reversed(lines) if s.startswith("[Errno")), lines[-1] if lines else str(err))
    print(f"error: --config={given}: {cause}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """The flags parser of the experiments (`absl.app.run(main, flags_parser=parse_flags)`):
    absl's, plus two kinds of config error as one 'error:' line and exit status 2 instead of a
    traceback: a config file that cannot be loaded (missing, an unknown variant, an error in its
    get_config) and an override that names a field the config lacks (ml_collections raises
    AttributeError or KeyError while parsing; the line names the flag, with ml_collections'
    suggestion)."""
    from absl import app as absl_app

    try:
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as err:
            if isinstance(err, flags.IllegalFlagValueError) and str(err).startswith("flag --config=") \
                    and ("config file" in str(err) or "Traceback" in str(err)):
                _config_file_error(argv, err)
            return absl_app.parse_flags_with_usage(argv)      # absl's message, usage hint and exit status
        if "config" in flags.FLAGS:
            try:                                          # a file that failed to load gives an object
                value = flags.FLAGS["config"].value           # that raises on first use
                if value is not None and not isinstance(value, str):     # (experiments.sweep: a path)
                    value.keys()
            except OSError as err:
                _config_file_error(argv, err)
        return rest
    except (AttributeError, KeyError) as err:
        inner = err.args[0] if err.args else err
        while isinstance(inner, BaseException) and inner.args:      # AttributeError(KeyError(text))
            inner = inner.args[0]
        lines = str(inner).splitlines() or [""]
        key = lines[0].strip("'\"")
        names = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config")]
        named = [n for n in names if key and key in n.split(".")[1:]]
        what = f"{named[0]}: " if named else ""
        hint = f" ({' '.join(x.strip() for x in lines[1:])})" if len(lines) > 1 else ""
        print(f"error: {what}the config has no field {key!r}{hint}", file=sys.stderr, flush=True)
        sys.exit(2)


def parameter_overview(params: Any, title: str = "parameters") -> str:
    """A table of every parameter array (name, shape, dtype, size) with the total count and
    size, from `clu.parameter_overview` (which needs no TensorFlow)."""
    from clu import parameter_overview as po

    return f"{title}:\n" + po.get_parameter_overview(jax.device_get(params), include_stats=False)

