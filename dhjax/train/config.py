"""Config files with variants and sweeps (ml_collections), shared by every experiment.

A config file `configs/<exp>.py` defines `get_config(arg=None)`; `arg` picks a variant (e.g.
`tiny`). It may define `sweep(arg=None)` returning a list of override dicts
({"optim.lr": 1e-3, ...}) that `dhjax.train.sweep` (`python -m experiments.sweep`) runs one by one.

    cfg = load_config("configs/register_flame.py:tiny")
    cfg = apply_overrides(cfg, {"registration.lr": 1e-3})
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import os
from typing import Any, Mapping

import ml_collections


def _split_spec(spec: str) -> tuple[str, str | None]:
    path, _, arg = str(spec).partition(":")
    return path, (arg or None)


def load_config_module(spec: str):
    """Imports a config file given as "path/to/config.py[:variant]". Returns (module, arg)."""
    path, arg = _split_spec(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: '{path}'")
    name = "dhjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file '{path}' has no get_config(arg=None)")
    return module, arg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads "path.py[:variant]" into a ConfigDict (as --config=... would)."""
    module, arg = load_config_module(spec)
    return module.get_config(arg)


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """The sweep declared in a config file: a list of {dotted.field: value} overrides."""
    module, arg = load_config_module(spec)
    if not hasattr(module, "sweep"):
        raise ValueError(f"config file '{_split_spec(spec)[0]}' declares no sweep(arg=None)")
    try:
        overrides = module.sweep(arg)
    except TypeError:
        overrides = module.sweep()
    return [dict(o) for o in overrides]


class UnknownFieldError(KeyError):
    """An override that names a field the config lacks. A KeyError (callers that catch those
    still do) whose message prints as written, without the quotes KeyError adds."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _did_you_mean(node, name: str, prefix: str) -> str:
    """'; did you mean 'prefix.close'?' for the field of node closest to name, or ''."""
    close = difflib.get_close_matches(name, [str(k) for k in node.keys()], n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Returns a copy of cfg with {"a.b.c": value} overrides; an unknown field is an
    UnknownFieldError (a KeyError; the message suggests the closest field), a value the
    field's type does not take (ml_collections' type-safe fields) a ValueError."""
    cfg = copy.deepcopy(cfg)  # keeps FieldReferences (e.g. train.steps tied to another field)
    for key, value in overrides.items():
        node, parts = cfg, key.split(".")
        for i, p in enumerate(parts):      # down to the group that holds the last part
            if not hasattr(node, "keys"):
                raise UnknownFieldError(f"unknown config field '{key}' ('{'.'.join(parts[:i])}' is a value, not a group)")
            if p not in node:
                hint = _did_you_mean(node, p, "".join(q + "." for q in parts[:i]))
                last = i == len(parts) - 1
                raise UnknownFieldError(f"unknown config field '{key}'" + (hint if last else f" (no '{'.'.join(parts[:i + 1])}'{hint})"))
            if i < len(parts) - 1:
                node = node[p]
        try:
            node[parts[-1]] = value
        except TypeError as err:        # ml_collections: "Could not override field 'x' (reference). ..."
            raise ValueError(f"config field {key}: {value!r} does not fit its type "
                             f"({type(node[parts[-1]]).__name__}, now {node[parts[-1]]!r})") from err
    return cfg


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a hidden temp file in the same folder and a rename, so a
    reader (another process, a resumed run) sees the old file or the new one, never half."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:      # an error or a stop (SIGTERM: SystemExit) leaves no temp file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config to <workdir>/config.json (atomically: other processes of a
    multi-process run read it at start) and returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    write_text_atomic(path, cfg.to_json_best_effort(indent=2, sort_keys=True))
    return path


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    """Command-line flags (--config.a.b=value) for a dict of overrides."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


# The fields of `cfg.train` that `dhjax.train.loop.train` reads, with their checks. A bad value
# is reported before any data is generated or anything compiles.
TRAIN_DEFAULTS = {"max_skipped_fraction": 0.1}


def check_integer(cfg, field: str, low: int, hint: str = "") -> None:
    """Raises ValueError naming the dotted `field` of cfg (e.g. "train.steps") unless it is an
    integer (not a bool) >= low; a missing field reads as None. `hint` follows the bound in the
    message (e.g. " (0: off)")."""
    value = cfg
    for key in field.split("."):
        value = value.get(key) if value is not None else None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config field {field} must be an integer >= {low}{hint}, got {value!r}")


def check_finite(cfg: ml_collections.ConfigDict | Mapping) -> None:
    """Raises ValueError naming the first field (dotted, with [i] for an element of a tuple)
    whose value is a NaN or infinite float."""
    def walk(value, name):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config field {name} must be a finite number, got {value!r}")
        if isinstance(value, (ml_collections.ConfigDict, Mapping)):
            for k in value.keys():
                walk(value[k], f"{name}.{k}" if name else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}[{i}]")
    walk(cfg, "")


def check_train_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the field, when a number anywhere in the config is NaN or
    infinite (no method takes one: a NaN learning rate would only show as skipped steps, and
    config.json could not even compare it with itself on resume), or when `cfg.train` (the
    harness's fields: steps, log_every, checkpoint_every, keep_checkpoints, eval_every,
    on_nonfinite, max_skipped_fraction) or `cfg.seed` cannot run. A config without `train`
    checks only the numbers."""
    check_finite(cfg)
    if "train" not in cfg:
        return
    tc = cfg.train
    missing = [k for k in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "on_nonfinite")
               if k not in tc]
    if missing:
        raise ValueError(f"config field train.{missing[0]} is missing (the training harness needs "
                         f"train.{', train.'.join(missing)})")
    for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        check_integer(cfg, f"train.{name}", 1)
    if "eval_every" in tc:
        check_integer(cfg, "train.eval_every", 0)
    if tc.on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"config field train.on_nonfinite must be 'skip' or 'stop', got {tc.on_nonfinite!r}")
    frac = tc.get("max_skipped_fraction", TRAIN_DEFAULTS["max_skipped_fraction"])
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= float(frac) <= 1.0:
        raise ValueError(f"config field train.max_skipped_fraction must be a number in [0, 1], got {frac!r}")
    if "seed" in cfg:     # numpy's generators (the data pipelines') take no negative seed
        check_integer(cfg, "seed", 0)


def fill_missing(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict | Mapping,
                 prefix: str = "") -> list[str]:
    """Adds to `cfg`, in place, every field of `defaults` that it lacks, at any depth (a section
    both have is filled field by field); fields `cfg` has are never changed, whatever their value.
    Returns the dotted names of the fields added, sorted.

    For reading back a run's config.json: an option added to dhjax after the run was trained
    took its default there, so filling it with the default keeps the run's behaviour."""
    sections = (Mapping, ml_collections.ConfigDict)
    added = []
    for key, value in defaults.items():
        if key not in cfg:
            cfg[key] = copy.deepcopy(value)
            added.append(prefix + key)
        elif isinstance(value, sections) and isinstance(cfg[key], sections):
            added += fill_missing(cfg[key], value, f"{prefix}{key}.")
    return sorted(added)


def config_dict(cfg: ml_collections.ConfigDict | Mapping) -> dict:
    """The config as plain JSON values (what config.json holds), for comparisons."""
    if isinstance(cfg, ml_collections.ConfigDict):
        return json.loads(cfg.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(cfg, sort_keys=True, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


MISSING = "(absent)"


def config_differences(old: Mapping, new: Mapping) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] where two configs (ConfigDicts or the dicts of
    config.json files) differ, sorted by field; a field only one of them has shows "(absent)"
    on the other side."""
    a, b = _flatten(config_dict(old)), _flatten(config_dict(new))
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
            if a.get(k, MISSING) != b.get(k, MISSING)]
