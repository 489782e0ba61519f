"""Sweeps: every variant a config file's sweep() declares, run one after another as its own
experiment process, and one table of their final metrics.

    rows = sweep.run("configs/register_flame.py:tiny", "/tmp/sweep", {"registration.steps": 50})

Each variant runs `python -m experiments.<cfg.experiment> --config=<spec> --config.k=v ...
--workdir=<workdir>/<variant>`; `commands` gives those command lines without running anything
(for a cluster launcher). Results: <workdir>/results.csv and results.md, one row per variant
(variant, status, its overrides, then its final_metrics.json), rewritten after every variant so a
killed sweep keeps its table. A failing variant is reported in its row; the others go on.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Callable, NamedTuple

from dhjax.train import app
from dhjax.train import config as config_lib


class Variant(NamedTuple):
    overrides: dict        # {dotted.field: value} of this variant (without the common ones)
    workdir: str           # <sweep workdir>/<variant name>
    command: list          # argv of the experiment process


def variant_name(index: int, overrides: dict) -> str:
    """Folder name of a variant: "<index:02d>_<last key part>=<value>_..." (safe characters,
    at most 120 of them)."""
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{index:02d}_" + "_".join(parts))[:120]


def parse_sets(sets) -> dict[str, Any]:
    """["a.b=1", "c=x"] -> {"a.b": 1, "c": "x"} (numbers and booleans parsed, else strings)."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        else:
            value = {"True": True, "False": False}.get(value, value)
        out[key] = value
    return out


def commands(spec: str, workdir: str, common: dict | None = None) -> list[Variant]:
    """The variants of config file `spec` ("path.py[:variant]", which must define `experiment`
    and `sweep(arg)`), with `common` overrides applied to every one. An override of an unknown
    config field raises KeyError here, before anything runs."""
    cfg = config_lib.load_config(spec)
    if "experiment" not in cfg:
        raise ValueError(f"{spec}: the config needs an 'experiment' field naming experiments.<name>")
    out = []
    for i, overrides in enumerate(config_lib.load_sweep(spec)):
        config_lib.apply_overrides(cfg, {**(common or {}), **overrides})  # unknown fields fail here
        sub = os.path.join(workdir, variant_name(i, overrides))
        cmd = [sys.executable, "-m", f"experiments.{cfg.experiment}", f"--config={spec}",
               *config_lib.override_flags({**(common or {}), **overrides}), f"--workdir={sub}"]
        out.append(Variant(overrides, sub, cmd))
    return out


def write_tables(rows: list[dict], workdir: str) -> str:
    """Writes <workdir>/results.csv and results.md (columns: variant, status, then every other
    key in sorted order; floats as %.5g in the Markdown table); returns results.md's path."""
    keys = sorted({k for r in rows for k in r})
    front = ["variant", "status"]
    keys = front + [k for k in keys if k not in front]
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    path = os.path.join(workdir, "results.md")
    with open(path, "w") as f:
        f.write(app.markdown_table(rows, keys, floatfmt=".5g"))
    return path


def run_variants(variants: list[Variant], workdir: str, log: Callable = print,
                 runner: Callable = subprocess.run) -> list[dict]:
    """Runs the variants one after another (runner(command) -> object with returncode) and
    tabulates them (`write_tables` after each); returns the rows."""
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for i, v in enumerate(variants):
        log(f"[{i + 1}/{len(variants)}] {shlex.join(v.command)}")
        proc = runner(v.command)
        ok = proc.returncode == 0
        row = {"variant": os.path.basename(v.workdir), "status": "ok" if ok else f"failed ({proc.returncode})"}
        row.update(v.overrides)
        if ok:
            row.update(app.read_final_metrics(v.workdir))
        rows.append(row)
        write_tables(rows, workdir)  # after every variant: a killed sweep keeps its table
    return rows


def run(spec: str, workdir: str, common: dict | None = None, *, dry_run: bool = False,
        log: Callable = print) -> list[dict]:
    """The whole sweep: `commands`, then (unless dry_run, which only logs the command lines and
    returns []) `run_variants`, then logs the Markdown table. Returns the rows."""
    variants = commands(spec, workdir, common)
    if dry_run:
        for v in variants:
            log(shlex.join(v.command))
        return []
    rows = run_variants(variants, workdir, log=log)
    path = os.path.join(workdir, "results.md")
    log(f"wrote {path}")
    with open(path) as f:
        log(f.read())
    return rows
