"""Runs every variant declared by a config file's sweep() and tabulates their final metrics.

    python -m experiments.sweep --config=configs/register_flame.py:tiny --workdir=/tmp/sweep
    python -m experiments.sweep --config=configs/register_flame.py:tiny --workdir=/tmp/sweep --dry_run

Each variant runs `python -m experiments.<cfg.experiment> --config=<spec> --config.k=v ...` in
its own subfolder; --dry_run prints those commands (for a cluster launcher) and runs nothing.
Results: <workdir>/results.csv and results.md (one row per variant: overrides + final metrics
from the variant's final_metrics.json). Variants that fail are reported, the others go on.
"""

import csv
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags

from dhjax.train import config as config_lib

_CONFIG = flags.DEFINE_string("config", None, "config file with sweep(): path.py[:variant]", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep folder (one subfolder per variant)", required=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands instead of running them")
_SET = flags.DEFINE_multi_string("set", [], "override for every variant, e.g. --set=registration.steps=50")


def variant_name(index: int, overrides: dict) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{index:02d}_" + "_".join(parts))[:120]


def parse_sets(sets):
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


def commands(spec: str, workdir: str, common: dict | None = None):
    cfg = config_lib.load_config(spec)
    if "experiment" not in cfg:
        raise ValueError(f"{spec}: the config needs an 'experiment' field naming experiments.<name>")
    out = []
    for i, overrides in enumerate(config_lib.load_sweep(spec)):
        config_lib.apply_overrides(cfg, {**(common or {}), **overrides})  # unknown fields fail here
        sub = os.path.join(workdir, variant_name(i, overrides))
        cmd = [sys.executable, "-m", f"experiments.{cfg.experiment}", f"--config={spec}",
               *config_lib.override_flags({**(common or {}), **overrides}), f"--workdir={sub}"]
        out.append((overrides, sub, cmd))
    return out


def write_tables(rows, workdir):
    keys = sorted({k for r in rows for k in r})
    front = ["variant", "status"]
    keys = front + [k for k in keys if k not in front]
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    del argv
    runs = commands(_CONFIG.value, _WORKDIR.value, parse_sets(_SET.value))
    if _DRY_RUN.value:
        for _, _, cmd in runs:
            print(shlex.join(cmd))
        return
    os.makedirs(_WORKDIR.value, exist_ok=True)
    rows = []
    for i, (overrides, sub, cmd) in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] {shlex.join(cmd)}", flush=True)
        proc = subprocess.run(cmd)
        row = {"variant": os.path.basename(sub), "status": "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"}
        row.update({k: v for k, v in overrides.items()})
        metrics_path = os.path.join(sub, "final_metrics.json")
        if proc.returncode == 0 and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                row.update(json.load(f))
        rows.append(row)
        write_tables(rows, _WORKDIR.value)  # after every variant: a killed sweep keeps its table
    print(f"wrote {os.path.join(_WORKDIR.value, 'results.md')}")
    with open(os.path.join(_WORKDIR.value, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main)
