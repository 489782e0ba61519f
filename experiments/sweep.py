"""Runs every variant declared by a config file's sweep() and tabulates their final metrics.

    python -m experiments.sweep --config=configs/register_flame.py:tiny --workdir=/tmp/sweep
    python -m experiments.sweep --config=configs/register_flame.py:tiny --workdir=/tmp/sweep --dry_run
    python -m experiments.sweep --config=configs/register_flame.py:tiny --workdir=/tmp/sweep3 --seeds=0,1,2

Each variant runs `python -m experiments.<cfg.experiment> --config=<spec> --config.k=v ...` in
its own subfolder; --dry_run prints those commands (for a cluster launcher) and runs nothing.
Results: <workdir>/results.csv and results.md (`dhjax.train.sweep`). A wrong config file or
override is an error (exit status 2) before anything runs, and so is a value that the
experiment's own config check refuses in any variant (INSTA, GEM, D3GA, synshot_sample,
register_flame: `CHECKS`), and a variant folder that holds a run with another config (the sweep
called again with another --set). Exit status 1 when a variant failed. Rerunning the same command resumes the sweep: finished variants are kept, interrupted or failed ones run again (resuming from their
checkpoints); a SIGTERM stops the running variant at a checkpoint and the sweep with status 143.
With --seeds=0,1,2 the whole sweep runs once per seed into <workdir>/seed_<s>/ (the config's
`seed` field set on every variant), and <workdir>/seeds.md / seeds.csv give every metric's mean
and spread over the seeds and each variant's paired difference to the first variant (--metrics
restricts that table to some metrics: exact names, or prefixes ending in '/' or '*').
"""

import importlib
import sys

from absl import app, flags

from dhjax.train import app as run_app
from dhjax.train import sweep

_CONFIG = flags.DEFINE_string("config", None, "config file with sweep(): path.py[:variant]", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep folder (one subfolder per variant)", required=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the commands instead of running them")
_SET = flags.DEFINE_multi_string("set", [], "override for every variant, e.g. --set=registration.steps=50")
_SEEDS = flags.DEFINE_string("seeds", "", "run the whole sweep once per seed, e.g. 0,1,2, into <workdir>/seed_<s> "
                             "and tabulate mean and spread over them (<workdir>/seeds.md)")
_METRICS = flags.DEFINE_list("metrics", None, "with --seeds: the metrics of seeds.md (exact names, or prefixes "
                             "ending in '/' or '*'); default all")

# The experiments whose run module checks its config values before any work: their checks run on
# every variant before the sweep starts (imported only for the experiment the sweep runs).
CHECKS = {"insta": "dhjax.synthesis.insta_run", "d3ga": "dhjax.synthesis.d3ga_run", "gem": "dhjax.synthesis.gem_run",
          "synshot_sample": "dhjax.synthesis.synshot_sample", "register_flame": "dhjax.capture.registration_run"}


def check_for(experiment: str):
    """The config check of `experiment`'s run module (None when it has none)."""
    module = CHECKS.get(experiment)
    return None if module is None else importlib.import_module(module).check_config


def main(argv):
    del argv
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if _METRICS.value and not _SEEDS.value:
        print("error: --metrics selects the columns of seeds.md, which only --seeds writes", file=sys.stderr)
        sys.exit(2)
    if _SEEDS.value:
        run_app.exit_on_user_error(
            lambda: sweep.run_seeds(_CONFIG.value, _WORKDIR.value, _SEEDS.value, sweep.parse_sets(_SET.value),
                                    metrics=_METRICS.value, dry_run=_DRY_RUN.value, log=log, check_for=check_for),
            errors=(FileNotFoundError, ValueError, KeyError))
        rows = [dict(r, variant=f"seed_{s}/{r['variant']}")
                for s, rs in sweep.read_seed_rows(_WORKDIR.value, sweep.parse_seeds(_SEEDS.value)).items() for r in rs
                if not _DRY_RUN.value]
    else:
        rows = run_app.exit_on_user_error(
            lambda: sweep.run(_CONFIG.value, _WORKDIR.value, sweep.parse_sets(_SET.value), dry_run=_DRY_RUN.value,
                              log=log, check_for=check_for),
            errors=(FileNotFoundError, ValueError, KeyError))
    failed = [r["variant"] for r in rows if str(r.get("status", "")).startswith("failed")]
    if failed:
        print(f"error: {len(failed)} of {len(rows)} variant(s) failed: {', '.join(failed)} (their logs are above; "
              "calling the sweep again reruns them)", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=run_app.parse_flags)
