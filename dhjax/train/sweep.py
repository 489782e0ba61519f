"""Sweeps: every variant a config file's sweep() declares, run one after another as its own
experiment process, and one table of their final metrics.

    rows = sweep.run("configs/register_flame.py:tiny", "/tmp/sweep", {"registration.steps": 50})

Each variant runs `python -m experiments.<cfg.experiment> --config=<spec> --config.k=v ...
--workdir=<workdir>/<variant>`; `commands` gives those command lines without running anything
(for a cluster launcher). Results: <workdir>/results.csv and results.md, one row per variant
(variant, status, its overrides, then its final_metrics.json), rewritten after every variant so a
killed sweep keeps its table. A failing variant is reported in its row; the others go on.

Statuses: "ok" (exit 0), "interrupted" (the experiment stopped on SIGTERM after a checkpoint,
exit status `app.EXIT_INTERRUPTED`, or was ended by a signal), "failed (<status>)". Only "ok"
variants have metrics in the table. Calling the sweep again resumes it: a variant whose row in
the previous results.csv says "ok" and whose config.json still matches is kept as it is, every
other one runs again (the experiment resumes from its own checkpoints). A SIGTERM to the sweep
is passed on to the running variant; the sweep then writes its table and stops with status
`app.EXIT_INTERRUPTED`.

Seeds: `run_seeds` (experiments.sweep --seeds=0,1,2) runs the whole sweep once per seed into
<workdir>/seed_<s>/ (the override seed=s on every variant) and writes <workdir>/seeds.csv and
seeds.md: per variant and metric the mean and sample standard deviation over the seeds, and the
mean paired difference to the sweep's first variant with on how many seeds it is above it
(`seed_summary`), so a difference can be read against the spread between seeds.

TensorBoard's HParams dashboard (`tensorboard --logdir <workdir>`, HPARAMS tab) compares the
variants: the sweep writes the experiment summary at <workdir> (the overridden fields with the
values the variants give them, and the metrics final/<name> for every number in the variants'
final_metrics.json) and, into each variant's TensorBoard folder <workdir>/<variant>/tb, its
session (the variant's whole config as its run logged it, with the overrides; an end status
"ok" -> success, "failed" -> failure, none while interrupted) and its final metrics as scalars
final/<name> at its last step. Both are rewritten after every variant
(`logs.write_hparams_events`), like the tables.
"""

from __future__ import annotations

import ast
import csv
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Any, Callable, NamedTuple

from dhjax.train import app
from dhjax.train import config as config_lib
from dhjax.train import logs

FINAL_PREFIX = "final/"   # tag prefix of the final metrics the sweep writes for the HParams view


class Variant(NamedTuple):
    """One variant of a sweep: its overrides, workdir and command."""
    overrides: dict        # {dotted.field: value} of this variant (without the common ones)
    workdir: str           # <sweep workdir>/<variant name>
    command: list          # argv of the experiment process
    config: Any = None     # the resolved config the command runs (ConfigDict), when known


def variant_name(index: int, overrides: dict) -> str:
    """Folder name of a variant: "<index:02d>_<last key part>=<value>_..." (safe characters,
    at most 120 of them); a variant without overrides (the config as it is) is
    "<index:02d>_baseline"."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()] or ["baseline"]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{index:02d}_" + "_".join(parts))[:120]


def _variant_dir(workdir: str, index: int, overrides: dict) -> str:
    sub = os.path.join(workdir, variant_name(index, overrides))
    legacy = os.path.join(workdir, f"{index:02d}_")     # the baseline's name before "_baseline"
    return legacy if not overrides and os.path.isdir(legacy) and not os.path.isdir(sub) else sub


def parse_sets(sets) -> dict[str, Any]:
    """["a.b=1", "c=x", "d=(10,20)"] -> {"a.b": 1, "c": "x", "d": (10, 20)}: a value that reads as
    a Python literal (number, boolean, tuple, list, quoted string) is that literal, anything else
    a string."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
        out[key] = value
    return out


def commands(spec: str, workdir: str, common: dict | None = None,
             check_for: Callable[[str], Callable | None] | None = None) -> list[Variant]:
    """The variants of config file `spec` ("path.py[:variant]", which must define `experiment`
    and `sweep(arg)`), with `common` overrides applied to every one. An override of an unknown
    config field raises KeyError here, before anything runs, and a value that does not fit its
    field or the harness's train.* checks (`config.check_train_config`) ValueError naming the
    variant. check_for(experiment name) gives the experiment's config check or None (`check(cfg)` raises ValueError for a value that cannot
    run, as `insta_run.check_config` does): it runs on every resolved variant here, so that a bad
    value fails before the first variant runs, and in a dry run."""
    cfg = config_lib.load_config(spec)
    if "experiment" not in cfg:
        raise ValueError(f"{spec}: the config needs an 'experiment' field naming experiments.<name>")
    check = check_for(cfg.experiment) if check_for is not None else None
    out = []
    for i, overrides in enumerate(config_lib.load_sweep(spec)):
        resolved = config_lib.apply_overrides(cfg, {**(common or {}), **overrides})  # unknown fields fail here
        sub = _variant_dir(workdir, i, overrides)   # an earlier sweep's baseline folder is kept
        for test in (config_lib.check_train_config, check):
            try:
                if test is not None:
                    test(resolved)
            except ValueError as e:
                raise ValueError(f"variant {os.path.basename(sub)} of {spec}: {e}") from None
        cmd = [sys.executable, "-m", f"experiments.{cfg.experiment}", f"--config={spec}",
               *config_lib.override_flags({**(common or {}), **overrides}), f"--workdir={sub}"]
        out.append(Variant(overrides, sub, cmd, resolved))
    return out


def write_tables(rows: list[dict], workdir: str, first: tuple = ()) -> str:
    """Writes <workdir>/results.csv and results.md (columns: variant, status, the keys `first`
    (the overridden fields) in their order, then every other key (the metrics) in sorted order;
    floats as %.5g in the Markdown table); returns results.md's path."""
    front = ["variant", "status", *dict.fromkeys(first)]
    keys = front + sorted({k for r in rows for k in r} - set(front))
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    path = os.path.join(workdir, "results.md")
    with open(path, "w") as f:
        f.write(app.markdown_table(rows, keys, floatfmt=".5g"))
    return path


def status_of(returncode: int) -> str:
    """The table's status of an experiment's exit status (see the module docstring)."""
    if returncode == 0:
        return "ok"
    if returncode == app.EXIT_INTERRUPTED or returncode < 0:
        return "interrupted"
    return f"failed ({returncode})"


def previous_rows(workdir: str) -> dict[str, dict]:
    """{variant: row} of <workdir>/results.csv from an earlier call ({} when there is none)."""
    path = os.path.join(workdir, "results.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {r["variant"]: r for r in csv.DictReader(f) if r.get("variant")}


def finished(variant: Variant, previous: dict[str, dict]) -> bool:
    """Whether an earlier call ran `variant` to the end ("ok") with the same config."""
    row = previous.get(os.path.basename(variant.workdir))
    if not row or row.get("status") != "ok" or not os.path.isfile(os.path.join(variant.workdir, app.FINAL_METRICS)):
        return False
    if variant.config is None:
        return True
    try:
        return not config_lib.config_differences(app.read_config(variant.workdir), variant.config)
    except (FileNotFoundError, ValueError):
        return False


def final_scalars(metrics: dict) -> dict:
    """{final/<name>: float} of the numbers (and bools) in a final_metrics.json dict."""
    return {FINAL_PREFIX + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _last_step(variant: Variant) -> int:
    cfg = variant.config
    try:
        return int(cfg.train.steps)
    except (AttributeError, KeyError, TypeError, ValueError):
        return 0


def session_hparams(variant: Variant) -> dict:
    """The hyper-parameters of a variant's HParams session: every field of the config.json its
    run wrote (the session start the run logged itself holds the same), with the overrides on
    top; the overrides alone when the run wrote no config.json (it failed before starting)."""
    try:
        hparams = logs.config_hparams(variant.workdir) or {}
    except (OSError, ValueError):
        hparams = {}
    hparams.update({k: logs.hparam_value(v) for k, v in variant.overrides.items()})
    return hparams


def write_session(variant: Variant, status: str) -> str:
    """The variant's HParams session in <variant workdir>/tb (module docstring): its
    hyper-parameters (`session_hparams`), its end status and (when "ok") its final metrics as
    final/<name> scalars. Returns the file.

    The run's own event file holds a session start too, and TensorBoard keeps the first one it
    reads, in file-name order: `events.out.tfevents.<second>.<host>.<pid>...`, so when the run
    ended within the second its event file was opened, the sweep's file (the sweep's pid) could
    come first. Both starts hold the same fields, so the dashboard shows the whole config
    whichever is read first."""
    summaries = [(0, logs.session_start_summary(session_hparams(variant)))]
    if status == "ok":
        summaries.append((0, logs.session_end_summary("ok")))
        scalars = final_scalars(app.read_final_metrics(variant.workdir))
        if scalars:
            summaries.append((_last_step(variant), logs.scalars_summary(scalars)))
    elif status.startswith("failed"):
        summaries.append((0, logs.session_end_summary("failed")))
    return logs.write_hparams_events(os.path.join(variant.workdir, "tb"), summaries)


def write_experiment(variants: list[Variant], rows: list[dict], workdir: str) -> str:
    """The HParams experiment summary at `workdir`: the variants' overridden fields with their
    values, and final/<name> metrics for every number in the rows of "ok" variants."""
    hparams: dict = {}
    for v in variants:
        for k, value in v.overrides.items():
            hparams.setdefault(k, []).append(value)
    metrics: dict = {}
    for r in rows:
        if r.get("status") == "ok":
            metrics.update({t: t[len(FINAL_PREFIX):] for t in final_scalars(
                {k: v for k, v in r.items() if k not in ("variant", "status") and k not in hparams})})
    text = (f"{len(variants)} variants; metrics: the numbers of each variant's {app.FINAL_METRICS} "
            f"(tags {FINAL_PREFIX}<name>)")
    return logs.write_hparams_events(workdir, [(0, logs.experiment_summary(hparams, dict(sorted(metrics.items())),
                                                                            description=text))])


def run_forwarding_sigterm(command: list) -> subprocess.CompletedProcess:
    """Runs `command`; a SIGTERM to this process is passed on to it (so that it checkpoints and
    stops), and the result's `.sigterm` says one arrived (`run_variants` then stops the sweep
    once the command has ended). The forwarding is in place before the command starts: a
    SIGTERM that arrives while it is being started reaches it as soon as it runs, and one that
    arrives before does not start it (return code -SIGTERM)."""
    received, child = [], []

    def forward(signum, frame):
        received.append(signum)
        if child:
            child[0].send_signal(signal.SIGTERM)

    try:
        old = signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: no forwarding
        old = None
    try:
        if received:
            returncode = -signal.SIGTERM
        else:
            proc = subprocess.Popen(command)
            child.append(proc)
            if received:    # arrived while Popen ran, before the handler could see the process
                proc.send_signal(signal.SIGTERM)
            returncode = proc.wait()
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    result = subprocess.CompletedProcess(command, returncode)
    result.sigterm = bool(received)
    return result


def run_variants(variants: list[Variant], workdir: str, log: Callable = print,
                 runner: Callable = run_forwarding_sigterm) -> list[dict]:
    """Runs the variants one after another (runner(command) -> object with returncode),
    skipping those an earlier call finished (`finished`), and tabulates them (`write_tables`
    after each); returns the rows. Exits with status app.EXIT_INTERRUPTED (SystemExit) after a
    SIGTERM, once the running variant has stopped and its row is written. Writes the HParams
    experiment and sessions (module docstring) as it goes."""
    os.makedirs(workdir, exist_ok=True)
    previous = previous_rows(workdir)
    rows = []
    write_experiment(variants, [], workdir)
    for i, v in enumerate(variants):
        name = os.path.basename(v.workdir)
        row = {"variant": name}
        stopped = False
        if finished(v, previous):
            log(f"[{i + 1}/{len(variants)}] {name}: finished earlier, kept")
            row["status"] = "ok"
        else:
            log(f"[{i + 1}/{len(variants)}] {shlex.join(v.command)}")
            proc = runner(v.command)
            row["status"] = status_of(proc.returncode)
            stopped = bool(getattr(proc, "sigterm", False))
        row.update(v.overrides)
        if row["status"] == "ok":
            row.update(app.read_final_metrics(v.workdir))
        rows.append(row)
        # After every variant, with the earlier call's rows of the variants still to come: a
        # killed or stopped sweep keeps its whole table.
        later = [previous[os.path.basename(u.workdir)] for u in variants[i + 1:]
                 if os.path.basename(u.workdir) in previous]
        write_tables(rows + later, workdir, first=tuple(k for u in variants for k in u.overrides))
        write_session(v, row["status"])
        write_experiment(variants, rows, workdir)
        if row["status"] != "ok":
            log(f"  {name}: {row['status']}" + (" (resumes on the next call of the sweep)"
                                                 if row["status"] == "interrupted" else ""))
        if stopped:
            log(f"SIGTERM: stopped at variant {i + 1}/{len(variants)}; call the sweep again to resume")
            raise SystemExit(app.EXIT_INTERRUPTED)
    return rows


def check_variant_workdirs(variants: list[Variant]) -> None:
    """Raises ValueError, before anything runs, when a variant's folder holds a run with another
    config (e.g. the sweep called again with another --set): every such variant would be refused
    by its experiment, and the results table of the earlier call overwritten with failures."""
    refused = []
    for v in variants:
        if v.config is None:
            continue
        try:
            app.check_resume_config(v.workdir, v.config, allow_config_change=False, log=lambda *a: None)
        except app.RunError as err:
            refused.append(f"{os.path.basename(v.workdir)}: {str(err).splitlines()[0]}\n"
                           + "\n".join(line for line in str(err).splitlines()[1:] if line.startswith("  ")))
    if refused:
        raise ValueError(f"{len(refused)} of {len(variants)} variant folder(s) hold runs with another config, so "
                         "the sweep would only fail them (and overwrite the results table): use another --workdir "
                         "for these settings, or the earlier call's --set to resume it\n" + "\n".join(refused))


def run(spec: str, workdir: str, common: dict | None = None, *, dry_run: bool = False,
        log: Callable = print, check_for: Callable[[str], Callable | None] | None = None,
        runner: Callable = run_forwarding_sigterm) -> list[dict]:
    """The whole sweep: `commands` (with the experiment's config check, `check_for`), then (unless
    dry_run, which only logs the command lines and returns []) a check of the workdir and of the
    runs already in the variants' folders (`check_variant_workdirs`), `run_variants`, then logs
    the Markdown table. Returns the rows. A --set (`common`) field that a variant overrides
    itself is logged: the variant's value wins."""
    variants = commands(spec, workdir, common, check_for)
    for key in (common or {}):
        values = [v.overrides[key] for v in variants if key in v.overrides]
        if values:
            log(f"note: the sweep's variants set {key} themselves ({len(values)} of {len(variants)}: "
                f"{', '.join(map(repr, values))}); the --set value {common[key]!r} applies only to the others")
    if dry_run:
        for v in variants:
            log(shlex.join(v.command))
        return []
    app.check_workdir(workdir)
    check_variant_workdirs(variants)
    rows = run_variants(variants, workdir, log=log, runner=runner)
    path = os.path.join(workdir, "results.md")
    log(f"wrote {path}")
    with open(path) as f:
        log(f.read())
    return rows


# ----------------------------------------------------------------------------------------------
# Seeds: the same sweep once per seed, and one table of the spread over the seeds.

SEED_FIELD = "seed"          # the top-level config field a seeded sweep overrides


def seed_dir(workdir: str, seed: int) -> str:
    """<workdir>/seed_<seed>: the folder of one seed's sweep (a whole sweep: variant folders, results)."""
    return os.path.join(workdir, f"seed_{int(seed)}")


def parse_seeds(text) -> tuple[int, ...]:
    """"0,1,2" (or a list of such items) -> (0, 1, 2); ValueError for a non-integer, a repeated
    seed or none at all."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else [str(t) for t in text])]
    try:
        seeds = tuple(int(t) for t in items if t)
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least one seed and no seed twice, got {text!r}")
    return seeds


def run_seeds(spec: str, workdir: str, seeds, common: dict | None = None, *, metrics=None,
              dry_run: bool = False, log: Callable = print,
              check_for: Callable[[str], Callable | None] | None = None,
              runner: Callable = run_forwarding_sigterm) -> list[dict]:
    """The sweep of `spec` once per seed: `run` into `seed_dir(workdir, s)` with the common
    override seed=s on top of `common`, seeds one after another (a whole first table before the
    second seed starts), then `write_seed_tables`. The config needs a top-level `seed` field, and
    `common` must not set it (ValueError before anything runs). Calling it again resumes: each
    seed's sweep keeps its finished variants. A SIGTERM stops it as it stops `run`; the seed
    table is then written for the seeds finished so far. Returns the seed table's rows
    (`seed_summary`); [] for a dry run, which only logs the command lines."""
    seeds = parse_seeds(seeds)
    if SEED_FIELD in (common or {}):
        raise ValueError(f"--set={SEED_FIELD}=... and --seeds both set the seed: use --seeds alone")
    cfg = config_lib.load_config(spec)
    if SEED_FIELD not in cfg:
        raise ValueError(f"{spec}: the config has no top-level '{SEED_FIELD}' field, so --seeds cannot vary it")
    # Every seed's commands, config checks and variant folders before the first variant runs.
    planned = [commands(spec, seed_dir(workdir, s), {**(common or {}), SEED_FIELD: s}, check_for) for s in seeds]
    if not dry_run:
        app.check_workdir(workdir)
        for variants in planned:
            check_variant_workdirs(variants)
    try:
        for i, s in enumerate(seeds):
            log(f"== seed {s} ({i + 1}/{len(seeds)}) -> {seed_dir(workdir, s)}")
            run(spec, seed_dir(workdir, s), {**(common or {}), SEED_FIELD: s}, dry_run=dry_run, log=log,
                check_for=check_for, runner=runner)
    finally:
        if not dry_run:
            path = write_seed_tables(workdir, seeds, metrics=metrics)
            log(f"wrote {path}")
    if dry_run:
        return []
    per_seed = read_seed_rows(workdir, seeds)
    missing = missing_metrics(per_seed, metrics)
    if missing:
        log(f"note: no finished variant has the metric(s) {', '.join(missing)}; the variants' "
            f"results.csv list the metrics there are")
    with open(os.path.join(workdir, "seeds.md")) as f:
        log(f.read())
    return seed_summary(per_seed, metrics=metrics)


def read_seed_rows(workdir: str, seeds) -> dict[int, list[dict]]:
    """{seed: the rows of seed_dir(workdir, seed)/results.csv} for the seeds whose sweep wrote
    one, numbers as floats (csv holds text)."""
    out = {}
    for s in seeds:
        path = os.path.join(seed_dir(workdir, s), "results.csv")
        if not os.path.isfile(path):
            continue
        with open(path, newline="") as f:
            out[int(s)] = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return out


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _metric_names(rows: list[dict], metrics) -> list[str]:
    """The metric columns of results rows (numeric values of "ok" rows, not the overrides), or
    the `metrics` asked for, in their order (each an exact name or a prefix ending in '/' or '*')."""
    found = sorted({k for r in rows if r.get("status") == "ok" for k, v in r.items()
                    if k not in ("variant", "status") and isinstance(v, float)})
    if metrics is None:
        return found
    out = []
    for m in metrics:
        if m.endswith(("*", "/")):
            out += [k for k in found if k.startswith(m.rstrip("*")) and k not in out]
        elif m not in out:
            out.append(m)
    return out


def seed_summary(per_seed: dict[int, list[dict]], metrics=None) -> list[dict]:
    """One row per variant (in sweep order) over the seeds' results rows: per metric the mean,
    the sample standard deviation (n >= 2), min, max and n of the seeds where the variant
    finished ("ok") with that metric, and for every variant after the first (the sweep's first
    entry, its reference) the paired difference to the first on the seeds both have: its mean,
    and on how many of those seeds it is above / below. Keys: variant, seeds ("ok seeds/seeds"),
    and per metric <m>, <m>:std, <m>:min, <m>:max, <m>:n, <m>:diff, <m>:above, <m>:below,
    <m>:paired (absent where undefined; a metric asked for that no variant has gives no keys,
    `missing_metrics` names those)."""
    all_rows = [r for rows in per_seed.values() for r in rows]
    names = _metric_names(all_rows, metrics)
    order = list(dict.fromkeys(r["variant"] for rows in per_seed.values() for r in rows))
    by = {(s, r["variant"]): r for s, rows in per_seed.items() for r in rows}
    first = order[0] if order else None
    out = []
    for v in order:
        row = {"variant": v}
        ok = [s for s in per_seed if by.get((s, v), {}).get("status") == "ok"]
        row["seeds"] = f"{len(ok)}/{len(per_seed)}"
        for m in names:
            vals = [by[(s, v)][m] for s in ok if isinstance(by[(s, v)].get(m), float)]
            if not vals:
                continue
            n = len(vals)
            mean = sum(vals) / n
            row.update({m: mean, f"{m}:min": min(vals), f"{m}:max": max(vals), f"{m}:n": n})
            if n >= 2:
                row[f"{m}:std"] = (sum((x - mean) ** 2 for x in vals) / (n - 1)) ** 0.5
            if v != first:
                pairs = [(by[(s, v)][m], by[(s, first)][m]) for s in ok
                         if by.get((s, first), {}).get("status") == "ok" and isinstance(by[(s, v)].get(m), float)
                         and isinstance(by[(s, first)].get(m), float)]
                if pairs:
                    d = [a - b for a, b in pairs]
                    row.update({f"{m}:diff": sum(d) / len(d), f"{m}:above": sum(x > 0 for x in d),
                                f"{m}:below": sum(x < 0 for x in d), f"{m}:paired": len(d)})
        out.append(row)
    return out


def missing_metrics(per_seed: dict[int, list[dict]], metrics) -> list[str]:
    """The metrics asked for (exact names) that no finished variant of any seed has."""
    rows = [r for rs in per_seed.values() for r in rs]
    available = set(_metric_names(rows, None))
    return [m for m in _metric_names(rows, metrics) if m not in available]


def _seed_cell(row: dict, m: str) -> str:
    if m not in row:
        return ""
    text = f"{row[m]:.4g}"
    if f"{m}:std" in row:
        text += f" ± {row[f'{m}:std']:.2g}"
    if f"{m}:diff" in row:
        text += f" ({row[f'{m}:diff']:+.2g}; up {row[f'{m}:above']}/{row[f'{m}:paired']})"
    return text


def write_seed_tables(workdir: str, seeds, metrics=None) -> str:
    """Writes <workdir>/seeds.csv (every key of `seed_summary`) and seeds.md (one column per
    metric: "mean ± std (mean paired difference to the first variant; up k/n: above it on k of
    the n seeds both finished)"); returns seeds.md's path."""
    seeds = parse_seeds(seeds)
    per_seed = read_seed_rows(workdir, seeds)
    rows = seed_summary(per_seed, metrics=metrics)
    missing = missing_metrics(per_seed, metrics) if per_seed else []
    names = [m for m in _metric_names([r for rs in per_seed.values() for r in rs], metrics) if m not in missing]
    keys = ["variant", "seeds"] + [k for m in names for k in
                                   (m, *(f"{m}:{x}" for x in ("std", "min", "max", "n", "diff", "above", "below", "paired")))]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "seeds.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    path = os.path.join(workdir, "seeds.md")
    done = ", ".join(str(s) for s in seeds if s in per_seed) or "none yet"
    head = (f"Seeds {', '.join(map(str, seeds))} (with results: {done}). Each cell: mean ± sample std over the seeds "
            f"where the variant finished; after the first variant, (mean paired difference to the first variant; "
            f"up k/n: above it on k of the n seeds both finished).\n\n")
    if missing:
        head += f"No finished variant has the metric(s) {', '.join(missing)}.\n\n"
    table_rows = [{"variant": r["variant"], "seeds": r["seeds"], **{m: _seed_cell(r, m) for m in names}} for r in rows]
    with open(path, "w") as f:
        f.write(head + app.markdown_table(table_rows, ["variant", "seeds", *names]))
    return path
