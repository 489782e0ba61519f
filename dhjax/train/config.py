"""Config files with variants and sweeps (ml_collections), shared by every experiment.

A config file `configs/<exp>.py` defines `get_config(arg=None)`; `arg` picks a variant (e.g.
`tiny`). It may define `sweep(arg=None)` returning a list of override dicts
({"optim.lr": 1e-3, ...}) that `dhjax.train.sweep` (`python -m experiments.sweep`) runs one by one.

    cfg = load_config("configs/register_flame.py:tiny")
    cfg = apply_overrides(cfg, {"registration.lr": 1e-3})
"""

from __future__ import annotations

import copy
import importlib.util
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


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Returns a copy of cfg with {"a.b.c": value} overrides; an unknown field is an error."""
    cfg = copy.deepcopy(cfg)  # keeps FieldReferences (e.g. train.steps tied to another field)
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"unknown config field '{key}' (no '{p}')")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config field '{key}'")
        node[parts[-1]] = value
    return cfg


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config to <workdir>/config.json and returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return path


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    """Command-line flags (--config.a.b=value) for a dict of overrides."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]
