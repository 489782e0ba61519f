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
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections

from dhjax.train import checkpoint as ckpt_lib
from dhjax.train import config as config_lib

FINAL_METRICS = "final_metrics.json"
CONFIG_FILE = "config.json"


def quiet_library_logs() -> None:
    """Turns absl INFO logging (orbax prints several lines per checkpoint) down to warnings, so
    the progress line stays readable."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def init_distributed() -> None:
    """Joins a multi-process run when launched as one.

    Explicit: DHJAX_COORDINATOR (host:port), DHJAX_NUM_PROCESSES, DHJAX_PROCESS_ID. Otherwise a
    cluster environment that jax.distributed recognises (e.g. SLURM with several tasks). Calling
    it twice in one process is harmless.
    """
    n = int(os.environ.get("DHJAX_NUM_PROCESSES", "1"))
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if n <= 1 and not slurm:
        return
    if jax.distributed.is_initialized():
        return
    # Cross-process collectives on CPU need gloo (GPUs use NCCL regardless of this flag).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if n > 1:
        jax.distributed.initialize(coordinator_address=os.environ["DHJAX_COORDINATOR"],
                                   num_processes=n, process_id=int(os.environ["DHJAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


class Run:
    """A started run: its folder, whether this is the lead process (process 0, the only one that
    writes files and prints), and its start time.

    Attributes: workdir (Path), lead (bool), t0 (time.time() at start).
    """

    def __init__(self, workdir: str | os.PathLike, lead: bool, t0: float):
        self.workdir, self.lead, self.t0 = Path(workdir), bool(lead), float(t0)

    def log(self, *args, **kwargs) -> None:
        """print() on the lead process, flushed; nothing elsewhere."""
        if self.lead:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def path(self, *parts: str) -> Path:
        return self.workdir.joinpath(*parts)

    def elapsed(self) -> float:
        """Seconds since `start`."""
        return time.time() - self.t0

    def done(self, *outputs: str) -> None:
        """The closing line every experiment prints: elapsed time and what it wrote."""
        what = ", ".join(outputs) if outputs else str(self.workdir)
        self.log(f"done in {self.elapsed():.0f}s: {what}")


def start(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None) -> Run:
    """Start-up of every experiment: joins a multi-process run, turns library logs down, creates
    the workdir and (lead process, when cfg is given) writes the resolved config to
    <workdir>/config.json. Raises NotADirectoryError when workdir exists and is not a folder."""
    init_distributed()
    quiet_library_logs()
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise NotADirectoryError(f"workdir '{work}' exists and is not a folder")
    lead = jax.process_index() == 0
    if lead:
        work.mkdir(parents=True, exist_ok=True)
        if cfg is not None:
            config_lib.save_config(cfg, str(work))
    return Run(work, lead, time.time())


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
    _write_json_atomic(Path(workdir) / FINAL_METRICS, merged)
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


def read_config(workdir: str | os.PathLike, experiment: str | None = None) -> ml_collections.ConfigDict:
    """The resolved config of a run (<workdir>/config.json).

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
        raise ValueError(f"{path} belongs to experiment {cfg.get('experiment')!r}, not {experiment!r}")
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
    """
    cfg = read_config(workdir, experiment)
    try:
        state, _, step = ckpt_lib.load_latest(str(workdir), template(cfg))
    except FileNotFoundError as err:
        hint = f"; train it first with python -m experiments.{experiment}" if experiment else ""
        raise FileNotFoundError(f"run '{workdir}' has no checkpoint ({err}){hint}") from err
    return cfg, state, step


def exit_on_user_error(fn: Callable[[], Any], errors: Iterable[type] = (FileNotFoundError, ValueError)) -> Any:
    """Calls fn(); one of `errors` becomes 'error: <message>' on stderr and exit status 2 (for
    command-line programs whose user gave a wrong folder or file)."""
    try:
        return fn()
    except tuple(errors) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def parameter_overview(params: Any, title: str = "parameters") -> str:
    """A table of every parameter array (name, shape, size, mean, std) with the total count and
    size, from `clu.parameter_overview` (which needs no TensorFlow)."""
    from clu import parameter_overview as po

    return f"{title}:\n" + po.get_parameter_overview(jax.device_get(params), include_stats=False)

