"""Named parameter sets on disk: ``<stem>.npz`` with the arrays, ``<stem>.json`` for humans.

Used for FLAME parameters, cameras, lights and similar flat dictionaries of arrays that stages
hand to each other. The npz is the source of truth; the json lists every key with its shape and
dtype, shows scalars (0-d entries) inline and stores the caller's ``meta``. Loading needs only the
npz. Arrays are stored as given (units are those of the caller; dhjax uses metres).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["save_params", "load_params", "params_paths"]


def params_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The (npz, json) pair for ``path`` given as ``<stem>``, ``<stem>.npz`` or ``<stem>.json``."""
    path = Path(path)
    if path.suffix.lower() in (".npz", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".npz"), path.with_name(path.name + ".json")


def _json_value(value: Any, where: str) -> Any:
    """Make meta values and scalars JSON-friendly (numpy scalars/arrays, non-finite floats)."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist(), where)
    if isinstance(value, np.generic):
        return _json_value(value.item(), where)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf": keeps the file strict JSON
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"{where} of type {type(value).__name__} cannot be written to JSON")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_npz(fh, arrays: Mapping[str, np.ndarray]) -> None:
    """npz writer that accepts any key (np.savez(**kw) clashes with keys such as 'file')."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(key + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def save_params(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write a flat dict of arrays/scalars to ``<stem>.npz`` and a description to ``<stem>.json``.

    Args:
      path: ``<stem>``, ``<stem>.npz`` or ``<stem>.json``; parent folders are created.
      params: mapping from non-empty string keys to numeric/bool arrays of any shape (numpy, JAX,
        lists) or scalars (stored as 0-d arrays). Object arrays and nested mappings are refused.
      meta: optional JSON-serialisable mapping stored under ``"meta"`` in the json.

    The json holds ``{"format": "dhjax.params/1", "arrays": {key: {"shape": [...], "dtype": ...,
    "value": <only for 0-d entries>}}, "meta": {...}}``.

    Returns:
      (npz path, json path).

    Raises:
      ValueError: a key that is not a non-empty string, or a value that is not numeric/bool/str
        (the message names the key), or meta that is not JSON-serialisable.
    """
    npz_path, json_path = params_paths(path)
    arrays: dict[str, np.ndarray] = {}
    description: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"parameter keys must be non-empty strings, got {key!r}")
        if isinstance(value, Mapping):
            raise ValueError(f"parameter '{key}' is a nested mapping; flatten it (e.g. 'a/b' keys)")
        array = np.asarray(value)
        if array.dtype.hasobject or array.dtype.kind not in "biufcUS":
            raise ValueError(f"parameter '{key}' has unsupported dtype {array.dtype} (type {type(value).__name__})")
        arrays[key] = array
        entry: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        if array.ndim == 0:
            entry["value"] = _json_value(array.item() if array.dtype.kind != "c" else str(array.item()), key)
        description[key] = entry
    doc = {"format": "dhjax.params/1", "arrays": description}
    if meta is not None:
        doc["meta"] = _json_value(dict(meta), "meta")
    text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"

    npz_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(npz_path, lambda fh: _write_npz(fh, arrays))
    _atomic_write(json_path, lambda fh: fh.write(text.encode("utf-8")))
    return npz_path, json_path


def load_params(path: str | os.PathLike, required: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read a parameter set written by :func:`save_params`.

    Args:
      path: ``<stem>``, ``<stem>.npz`` or ``<stem>.json`` (only the npz is read).
      required: keys that must be present.

    Returns:
      dict key -> np.ndarray with the saved shape and dtype (scalars as 0-d arrays).

    Raises:
      FileNotFoundError: the npz does not exist (the message names it).
      ValueError: the npz is unreadable, required keys are missing (the message names the file and
        all missing keys), or a float/complex array holds NaN or inf (the message names the key).
    """
    npz_path, _ = params_paths(path)
    if not npz_path.exists():
        raise FileNotFoundError(f"no such file: '{npz_path}'")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            params = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise ValueError(f"{npz_path}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"{npz_path}: missing required keys {missing} (keys present: {sorted(params)})")
    for key, array in params.items():
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise ValueError(f"{npz_path}: key '{key}' holds non-finite values (NaN or inf)")
    return params
