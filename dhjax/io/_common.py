"""Small helpers shared by the I/O modules."""

from __future__ import annotations

import os
from pathlib import Path


def existing_file(path: str | os.PathLike) -> Path:
    """Returns `path` as a Path; FileNotFoundError naming it when it does not exist, ValueError
    when it is a directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: '{path}'")
    if path.is_dir():
        raise ValueError(f"'{path}' is a directory, expected a file")
    return path
