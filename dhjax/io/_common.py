"""Small helpers shared by the I/O modules."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def read_npz(path: str | os.PathLike, keys=None, what: str = "") -> dict:
    """Every array of an .npz file (no pickles) as {name: numpy array}. A missing file is a
    FileNotFoundError and an unreadable one (truncated, not a zip, pickled objects) or one that
    lacks any of `keys` a ValueError, each naming the file (and `what` it should be, e.g. "a GEM
    eigenmodel")."""
    import zipfile

    import numpy as np

    path = Path(path)
    kind = f" ({what})" if what else ""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: '{path}'{kind}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise ValueError(f"'{path}' is unreadable{kind}: {type(err).__name__}: {err}") from None
    missing = [k for k in (keys or ()) if k not in data]
    if missing:
        raise ValueError(f"'{path}'{kind} lacks the arrays {missing}")
    return data


# ----------------------------------------------------------------------------------------------
# PLY headers.

# PLY scalar type names (both the original and the sized spellings) -> numpy type codes.
PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
PLY_FORMATS = ("ascii", "binary_little_endian", "binary_big_endian")


@dataclass(frozen=True)
class PlyProperty:
    """One property of a PLY element: `dtype` is its numpy type code ("f4", "u1", ...); for a
    list property `count_dtype` is the type code of the per-row length, else None."""

    name: str
    dtype: str
    count_dtype: str | None = None

    @property
    def is_list(self) -> bool:
        """Whether the property is a list (it has a count type)."""
        return self.count_dtype is not None


@dataclass(frozen=True)
class PlyElement:
    """One element of a PLY header: its name, row count and properties in file order."""
    name: str
    count: int
    properties: tuple[PlyProperty, ...]


@dataclass(frozen=True)
class PlyHeader:
    """A parsed PLY header: `format` is one of PLY_FORMATS, `data_offset` the byte offset of the
    data that follows the `end_header` line."""

    format: str
    version: str
    elements: tuple[PlyElement, ...]
    data_offset: int

    def element(self, name: str) -> PlyElement | None:
        """The element called `name`, or None."""
        return next((e for e in self.elements if e.name == name), None)


def parse_ply_header(path: str | os.PathLike, raw: bytes) -> PlyHeader:
    """Parses and checks the header of a PLY file whose bytes are `raw`.

    Every problem is a ValueError that starts with `path` and names it: no 'ply' first line, no
    `end_header` line, non-ASCII header text, a missing, repeated or unknown format, malformed
    `element`/`property` lines, a count that is negative or not an integer, an unknown property
    type, a property before any element, a property or element name given twice, unknown
    header keywords. Lines may end in LF or CRLF; `comment` and `obj_info` lines are skipped.
    """
    lines: list[tuple[int, str]] = []
    pos = 0
    end_found = False
    while not end_found:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            if not lines and raw.rstrip(b"\r") != b"ply":
                raise ValueError(f"{path}: not a PLY file (the first line is not 'ply')")
            raise ValueError(f"{path}: truncated PLY header: no 'end_header' line")
        line_bytes = raw[pos:nl].rstrip(b"\r")
        lineno = len(lines) + 1
        pos = nl + 1
        if lineno == 1:
            if line_bytes.strip() != b"ply":
                raise ValueError(f"{path}: not a PLY file (the first line is not 'ply')")
            lines.append((lineno, "ply"))
            continue
        try:
            text = line_bytes.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: header line {lineno} is not ASCII text (is the 'end_header' "
                             "line missing?)") from None
        end_found = text.strip() == "end_header"
        lines.append((lineno, text))

    fmt = version = None
    elements: list[PlyElement] = []
    current: tuple[str, int, list[PlyProperty]] | None = None

    def close_element():
        if current is not None:
            elements.append(PlyElement(current[0], current[1], tuple(current[2])))

    for lineno, text in lines[1:-1]:
        parts = text.split()
        where = f"{path}: header line {lineno}"
        quoted = repr(text.strip())
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        key = parts[0]
        if key == "format":
            if fmt is not None:
                raise ValueError(f"{where}: a second 'format' line {quoted}")
            if len(parts) != 3:
                raise ValueError(f"{where}: malformed format line {quoted}, expected "
                                 "'format <type> <version>'")
            if parts[1] not in PLY_FORMATS:
                raise ValueError(f"{where}: unknown PLY format {parts[1]!r} (expected one of "
                                 f"{', '.join(PLY_FORMATS)})")
            fmt, version = parts[1], parts[2]
        elif key == "element":
            if len(parts) != 3:
                raise ValueError(f"{where}: malformed element line {quoted}, expected "
                                 "'element <name> <count>'")
            name, count = parts[1], parts[2]
            if count.startswith("-") and count[1:].isdigit():
                raise ValueError(f"{where}: element {name!r} has a negative count ({count})")
            if not (count.isascii() and count.isdigit()):
                raise ValueError(f"{where}: the count {count!r} of element {name!r} is not a "
                                 "non-negative integer")
            if any(e.name == name for e in elements) or (current is not None and current[0] == name):
                raise ValueError(f"{where}: more than one {name!r} element")
            close_element()
            current = (name, int(count), [])
        elif key == "property":
            if current is None:
                raise ValueError(f"{where}: a property before any element ({quoted})")
            if len(parts) >= 2 and parts[1] == "list":
                if len(parts) != 5:
                    raise ValueError(f"{where}: malformed list property line {quoted}, expected "
                                     "'property list <count type> <item type> <name>'")
                types, name = parts[2:4], parts[4]
            else:
                if len(parts) != 3:
                    raise ValueError(f"{where}: malformed property line {quoted}, expected "
                                     "'property <type> <name>'")
                types, name = parts[1:2], parts[2]
            for t in types:
                if t not in PLY_TYPES:
                    raise ValueError(f"{where}: unknown PLY property type {t!r} (expected one of "
                                     f"{', '.join(PLY_TYPES)})")
            if any(p.name == name for p in current[2]):
                raise ValueError(f"{where}: duplicate property {name!r} in element {current[0]!r}")
            if len(types) == 2:
                current[2].append(PlyProperty(name, PLY_TYPES[types[1]], PLY_TYPES[types[0]]))
            else:
                current[2].append(PlyProperty(name, PLY_TYPES[types[0]]))
        else:
            raise ValueError(f"{where}: unknown header line {quoted} (expected format, "
                             "element, property, comment or obj_info)")
    close_element()
    if fmt is None:
        raise ValueError(f"{path}: the PLY header has no 'format' line")
    return PlyHeader(fmt, version, tuple(elements), pos)
