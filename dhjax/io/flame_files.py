"""Readers for the official FLAME files: model, landmark embeddings and UV layout.

The official FLAME model (``generic_model.pkl``, ``FLAME2020/*.pkl``, FLAME 2023) is a Python-2
era pickle. Several of its entries are ``chumpy`` objects and ``J_regressor`` is a
``scipy.sparse`` matrix. chumpy does not import on Python 3.11, and unpickling arbitrary files is
unsafe, so this module reads pickles through a restricted unpickler:

* classes from any ``chumpy*`` module become stand-ins that keep the pickled state and are turned
  into numpy arrays afterwards (a plain ``Ch`` keeps its array under ``'x'``; the reordering
  classes ``Reshape``, ``transpose``, ``Select`` and ``Concatenate`` are evaluated from their
  inputs);
* ``scipy.sparse`` CSC/CSR matrices and arrays become stand-ins that are densified from
  ``data``/``indices``/``indptr`` and the shape, without importing scipy;
* the numpy reconstruction helpers and a handful of harmless builtins are allowed;
* every other global (``os.system``, ``builtins.eval``, ...) is refused with a ``ValueError``
  naming ``module.name`` and the file, before anything is called.

Plain numpy and the standard library only (this is the I/O floor). Lengths are in metres, as in
the official FLAME files.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dhjax.io._common import existing_file

__all__ = [
    "FLAME_KEYS",
    "N_JOINTS",
    "load_flame_arrays",
    "save_flame_npz",
    "load_landmark_embedding",
    "load_flame_uv",
]

#: Keys of the official FLAME model file that :func:`load_flame_arrays` needs.
FLAME_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")

#: FLAME's joints: global, neck, jaw, left eye, right eye.
N_JOINTS = 5

# Pose correctives are driven by the flattened (R_j - I) of every joint except the root.
_N_POSE_FEATURES = 9 * (N_JOINTS - 1)

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"

# Any parent entry at or above this value is read as "no parent" (the official files store the
# root's parent as the unsigned 32-bit maximum).
_ROOT_SENTINEL_MIN = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class _RefusedGlobal(ValueError):
    """A pickle asked for a global outside the allow-list."""


def _merge_slot_state(state):
    """A (dict_state, slot_state) pair appears when a class has __slots__: merge it into one dict."""
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
        merged = dict(state[0] or {})
        merged.update(state[1] or {})
        return merged
    return state


class _PickledChumpy:
    """Stand-in for any chumpy class: records the pickled state for a later conversion."""

    _module = "chumpy"
    _name = "Ch"

    def __setstate__(self, state):
        state = _merge_slot_state(state)
        self._state = state if isinstance(state, dict) else {"x": state}

    @property
    def qualified_name(self) -> str:
        return f"{self._module}.{self._name}"

    def to_numpy(self, context: str, depth: int = 0) -> np.ndarray:
        state = getattr(self, "_state", {})
        name = self._name

        def term(key):
            if key not in state:
                raise ValueError(
                    f"{context}: chumpy object {self.qualified_name} has no {key!r} in its pickled "
                    f"state (state keys: {sorted(map(str, state))})"
                )
            return _to_numpy(state[key], context, depth + 1)

        if name == "Reshape":
            return term("a").reshape(state["newshape"])
        if name == "transpose":
            return np.transpose(term("a"), state.get("axes"))
        if name == "Select":
            picked = term("a").ravel()[np.asarray(state["idxs"]).ravel()]
            shape = state.get("preferred_shape")
            return picked.reshape(shape) if shape is not None else picked
        if name == "Concatenate" and "dterms" in state:
            return np.concatenate([term(k) for k in state["dterms"]], axis=state.get("axis", 0))
        if "x" in state:
            return term("x")
        if "r" in state:
            return term("r")
        # Deliberately no blind fallback to the input 'a': for an operation such as negative or
        # add it would silently give wrong numbers.
        raise ValueError(
            f"{context}: cannot evaluate chumpy object {self.qualified_name} without chumpy: its "
            f"pickled state has no 'x' (state keys: {sorted(map(str, state))}); convert the file "
            f"with chumpy installed (e.g. np.array(value)) and save it as .npz"
        )


class _PickledSparse:
    """Stand-in for scipy.sparse CSC/CSR matrices and arrays; densifies without scipy."""

    _module = "scipy.sparse"
    _name = "csc_matrix"
    _format = "csc"

    def __setstate__(self, state):
        state = _merge_slot_state(state)
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state for {self._module}.{self._name}")
        self._state = state

    def toarray(self, context: str = "sparse matrix") -> np.ndarray:
        """Dense copy of the matrix, [rows, cols]."""
        state = getattr(self, "_state", {})
        where = f"{context}: sparse {self._module}.{self._name}"
        missing = [k for k in ("data", "indices", "indptr") if k not in state]
        shape = state.get("_shape", state.get("shape"))
        if shape is None:
            missing.append("_shape")
        if missing:
            raise ValueError(f"{where} lacks {missing} in its pickled state")
        data = np.asarray(state["data"]).ravel()
        indices = np.asarray(state["indices"]).ravel().astype(np.int64)
        indptr = np.asarray(state["indptr"]).ravel().astype(np.int64)
        n_rows, n_cols = (int(s) for s in shape)
        n_major, n_minor = (n_cols, n_rows) if self._format == "csc" else (n_rows, n_cols)
        if indptr.shape != (n_major + 1,) or indptr[-1] != data.size or data.size != indices.size:
            raise ValueError(
                f"{where} is inconsistent: shape {(n_rows, n_cols)}, indptr length {indptr.size} "
                f"(expected {n_major + 1}), {indices.size} indices, {data.size} values"
            )
        if np.any(np.diff(indptr) < 0) or (indices.size and (indices.min() < 0 or indices.max() >= n_minor)):
            raise ValueError(f"{where} has indptr/indices out of range for shape {(n_rows, n_cols)}")
        dense = np.zeros((n_rows, n_cols), dtype=data.dtype if data.size else np.float64)
        major = np.repeat(np.arange(n_major), np.diff(indptr))
        rows, cols = (indices, major) if self._format == "csc" else (major, indices)
        np.add.at(dense, (rows, cols), data)  # duplicates add up, as in scipy
        return dense


def _numpy_module(*names: str):
    """First importable module among `names` (numpy 2 moved numpy.core to numpy._core)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {names} can be imported")


def _numpy_global(module_variants: tuple[str, ...], name: str):
    return lambda: getattr(_numpy_module(*module_variants), name)


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy", "bool_"): lambda: np.bool_,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("builtins", "list"): lambda: list,
    ("builtins", "dict"): lambda: dict,
    ("builtins", "tuple"): lambda: tuple,
    ("builtins", "object"): lambda: object,
    ("builtins", "slice"): lambda: slice,
    ("builtins", "complex"): lambda: complex,
    ("builtins", "int"): lambda: int,
    ("builtins", "float"): lambda: float,
    ("builtins", "bool"): lambda: bool,
    ("builtins", "str"): lambda: str,
    ("builtins", "bytes"): lambda: bytes,
    ("builtins", "bytearray"): lambda: bytearray,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    # Python-3 protocol-2 pickles carry bytes as _codecs.encode(text, 'latin1').
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    # Protocol 0/1 object creation: cls and base themselves come through this allow-list.
    ("copyreg", "_reconstructor"): lambda: __import__("copyreg")._reconstructor,
}
for _mod in _MULTIARRAY:
    for _name in ("_reconstruct", "scalar"):
        _ALLOWED_GLOBALS[(_mod, _name)] = _numpy_global(_MULTIARRAY, _name)
for _mod in _NUMERIC:
    _ALLOWED_GLOBALS[(_mod, "_frombuffer")] = _numpy_global(_NUMERIC, "_frombuffer")

# Module names written by Python 2 that Python 3 knows under another name.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, plain containers and chumpy/sparse stand-ins."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        key = (module, name)
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stand_in(key, _PickledChumpy, {})
        if module == "scipy.sparse" or module.startswith("scipy.sparse."):
            fmt = "csc" if name.startswith("csc_") else "csr" if name.startswith("csr_") else None
            if fmt is None or not name.endswith(("_matrix", "_array")):
                raise _RefusedGlobal(
                    f"{self._source}: refusing to unpickle '{module}.{name}': only CSC/CSR sparse "
                    f"matrices and arrays are supported without scipy"
                )
            return self._stand_in(key, _PickledSparse, {"_format": fmt})
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]()
        raise _RefusedGlobal(
            f"{self._source}: refusing to unpickle global '{module}.{name}' (not on the allow-list of "
            f"numpy/chumpy/scipy.sparse reconstruction helpers); the file is not a plain model file"
        )

    def _stand_in(self, key, base, extra):
        if key not in self._stand_ins:
            attrs = {"_module": key[0], "_name": key[1], **extra}
            self._stand_ins[key] = type(f"Pickled_{key[1]}", (base,), attrs)
        return self._stand_ins[key]


def _restricted_loads(data: bytes, source: str) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source).load()
    except _RefusedGlobal:
        raise
    except Exception as exc:  # corrupt or foreign bytes raise all kinds of errors
        raise ValueError(f"{source}: not a readable pickle/npz file ({type(exc).__name__}: {exc})") from exc


def _to_numpy(value: Any, context: str, depth: int = 0) -> np.ndarray:
    """Turn a loaded value (array, chumpy/sparse stand-in, list, scalar) into a numpy array."""
    if depth > 64:
        raise ValueError(f"{context}: chumpy objects nested too deeply")
    if isinstance(value, _PickledChumpy):
        return np.asarray(value.to_numpy(context, depth))
    if isinstance(value, _PickledSparse):
        return value.toarray(context)
    if hasattr(value, "toarray") and not isinstance(value, np.ndarray):  # a real scipy.sparse object
        return np.asarray(value.toarray())
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise ValueError(f"{context}: cannot convert {type(value).__name__} to an array ({exc})") from exc
    if array.dtype == object:
        raise ValueError(f"{context}: holds Python objects ({type(value).__name__}), not numbers")
    return array


# --------------------------------------------------------------------------------------------
# Containers: pickle, npz, npy
# --------------------------------------------------------------------------------------------


def _read_npy_object(data: bytes, source: str) -> Any:
    """Contents of an .npy file; object arrays (pickled dicts) go through the restricted unpickler."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as exc:
        raise ValueError(f"{source}: not a readable .npy file ({exc})") from exc
    if dtype.hasobject:
        array = _restricted_loads(data[stream.tell():], source)
    else:
        stream.seek(0)
        array = np.load(stream, allow_pickle=False)
    if isinstance(array, np.ndarray) and array.dtype == object and array.shape == ():
        return array.item()
    return array


def _read_container(path: str | os.PathLike) -> tuple[dict, str]:
    """Load an npz, object-npy or pickle file as a dict; returns (dict, source name)."""
    path = Path(path)
    source = str(path)
    existing_file(path)
    data = path.read_bytes()
    if data.startswith(_ZIP_MAGIC):
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                content = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise ValueError(f"{source}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    elif data.startswith(_NPY_MAGIC):
        content = _read_npy_object(data, source)
    else:
        content = _restricted_loads(data, source)
    if not isinstance(content, dict):
        raise ValueError(f"{source}: expected a dictionary of arrays, found {type(content).__name__}")
    return {str(k): v for k, v in content.items()}, source


def _get(content: Mapping, key: str, source: str) -> np.ndarray:
    if key not in content:
        raise ValueError(f"{source}: missing key '{key}' (keys present: {sorted(content)})")
    return _to_numpy(content[key], f"{source}: key '{key}'")


def _shape_error(source: str, key: str, expected: str, actual) -> ValueError:
    return ValueError(f"{source}: key '{key}' has shape {tuple(actual)}, expected {expected}")


# --------------------------------------------------------------------------------------------
# FLAME model
# --------------------------------------------------------------------------------------------


def _default_n_shape(n_components: int, source: str) -> int:
    """300 for the official K = 400 layout; any other K needs the split said explicitly."""
    if n_components == 400:
        return 300
    raise ValueError(
        f"{source}: key 'shapedirs' has K = {n_components} components, not the official 400 "
        f"(300 shape + 100 expression), and the file does not say how many are shape components; "
        f"pass the split: flame.load(..., file_n_shape=N), or n_shape=N to dhjax.io's load_flame_arrays")


def _parents_from_kintree(kintree: np.ndarray, source: str) -> np.ndarray:
    key = "kintree_table"
    if kintree.shape != (2, N_JOINTS):
        raise _shape_error(source, key, f"(2, {N_JOINTS})", kintree.shape)
    table = kintree.astype(np.int64)
    ids = table[1]
    if sorted(ids.tolist()) != list(range(N_JOINTS)):
        raise ValueError(f"{source}: key '{key}' row 1 must list joint ids 0..{N_JOINTS - 1}, got {ids.tolist()}")
    parents = np.empty(N_JOINTS, np.int64)
    for parent, joint in zip(table[0], ids):
        parents[joint] = -1 if (parent == -1 or parent >= _ROOT_SENTINEL_MIN) else parent
    return _check_parents(parents, source, key)


def _check_parents(parents: np.ndarray, source: str, key: str) -> np.ndarray:
    parents = np.asarray(parents).astype(np.int64).reshape(-1)
    if parents.shape != (N_JOINTS,):
        raise _shape_error(source, key, f"({N_JOINTS},)", parents.shape)
    ok = parents[0] == -1 and all(0 <= parents[j] < j for j in range(1, N_JOINTS))
    if not ok:
        raise ValueError(
            f"{source}: key '{key}' gives parents {parents.tolist()}; expected the root (joint 0) to "
            f"have parent -1 and every other joint a parent with a smaller index"
        )
    return parents.astype(np.int32)


def _flame_from_content(content: Mapping, source: str, n_shape: int | None) -> dict:
    """Validate and convert an official FLAME dict (or this module's own output) to numpy."""
    v_template = _get(content, "v_template", source)
    if v_template.ndim != 2 or v_template.shape[1] != 3:
        raise _shape_error(source, "v_template", "(V, 3)", v_template.shape)
    n_verts = v_template.shape[0]

    def with_shape(key, expected_desc, check):
        array = _get(content, key, source)
        if not check(array.shape):
            raise _shape_error(source, key, expected_desc, array.shape)
        return array

    faces = with_shape("f", "(F, 3)", lambda s: len(s) == 2 and s[1] == 3)
    shapedirs = with_shape(
        "shapedirs", f"(V, 3, K) with V = {n_verts} from v_template (or v_template has the wrong vertex count)",
        lambda s: len(s) == 3 and s[0] == n_verts and s[1] == 3,
    )
    posedirs = with_shape(
        "posedirs", f"(V, 3, {_N_POSE_FEATURES}) = ({n_verts}, 3, {_N_POSE_FEATURES})",
        lambda s: s == (n_verts, 3, _N_POSE_FEATURES),
    )
    j_regressor = with_shape(
        "J_regressor", f"({N_JOINTS}, V) = ({N_JOINTS}, {n_verts})", lambda s: s == (N_JOINTS, n_verts)
    )
    weights = with_shape("weights", f"(V, {N_JOINTS}) = ({n_verts}, {N_JOINTS})", lambda s: s == (n_verts, N_JOINTS))
    if "kintree_table" in content:
        parents = _parents_from_kintree(_get(content, "kintree_table", source), source)
    elif "parents" in content:
        parents = _check_parents(_get(content, "parents", source), source, "parents")
    else:
        raise ValueError(f"{source}: missing key 'kintree_table' (keys present: {sorted(content)})")

    if faces.size and (not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= n_verts):
        raise ValueError(f"{source}: key 'f' must hold integer vertex indices in [0, {n_verts})")
    for key, array in (("v_template", v_template), ("shapedirs", shapedirs), ("posedirs", posedirs),
                       ("J_regressor", j_regressor), ("weights", weights)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{source}: key '{key}' contains non-finite values")

    n_components = shapedirs.shape[2]
    if n_shape is None and "n_shape" in content:
        n_shape = int(_get(content, "n_shape", source))
    if n_shape is None:
        n_shape = _default_n_shape(n_components, source)
    n_shape = int(n_shape)
    if not 0 <= n_shape <= n_components:
        raise ValueError(f"{source}: the shape/expression split {n_shape} (flame.load's file_n_shape, "
                         f"load_flame_arrays' n_shape or the file's n_shape entry) is outside [0, K = {n_components}], "
                         f"K the components of key 'shapedirs'")

    return {
        "v_template": v_template.astype(np.float32),
        "f": faces.astype(np.int32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": posedirs.astype(np.float32),
        "J_regressor": j_regressor.astype(np.float32),
        "weights": weights.astype(np.float32),
        "parents": parents,
        "n_shape": n_shape,
    }


def load_flame_arrays(path: str | os.PathLike, n_shape: int | None = None) -> dict[str, Any]:
    """Read an official FLAME model file (pickle, with or without chumpy, or npz) into numpy.

    Args:
      path: ``generic_model.pkl`` / ``FLAME2020/*.pkl`` / FLAME 2023 pickle (Python-2 era pickles
        are read with ``encoding='latin1'`` through a restricted unpickler, see the module doc) or
        an ``.npz`` with the same keys (e.g. written by :func:`save_flame_npz`).
      n_shape: how many of the K blendshape components are identity (shape) components; the rest
        are expression. Default: the ``n_shape`` entry of an npz written by
        :func:`save_flame_npz` if present, else 300 when K = 400 (FLAME 2017/2020/2023: 300 shape
        + 100 expression); any other K without an ``n_shape`` entry is an error (a guessed split
        would silently turn expression into shape components).

    Returns:
      dict with
        ``v_template``: [V, 3] float32, metres (V = 5023 for FLAME);
        ``f``: [F, 3] int32 vertex indices of the triangles (F = 9976);
        ``shapedirs``: [V, 3, K] float32, metres per unit coefficient
        (``shapedirs[..., :n_shape]`` shape, ``shapedirs[..., n_shape:]`` expression);
        ``posedirs``: [V, 3, 36] float32, metres per unit of the flattened (R_j - I), j = 1..4;
        ``J_regressor``: [5, V] float32, dense;
        ``weights``: [V, 5] float32 skinning weights;
        ``parents``: [5] int32, parent joint of each joint, root = -1;
        ``n_shape``: int.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message names it).
      ValueError: not a pickle/npz, a refused pickle global, a missing key or a key with the wrong
        shape or inconsistent V; messages name the file and the key.
    """
    content, source = _read_container(path)
    return _flame_from_content(content, source, n_shape)


def save_flame_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> Path:
    """Write a FLAME model as npz with the official keys, e.g. to convert a pickle once.

    Args:
      path: output file; written exactly there (no suffix is added), parent folders are created.
      arrays: either the output of :func:`load_flame_arrays` or an official-layout dict
        (``v_template`` [V, 3] metres, ``f`` [F, 3], ``shapedirs`` [V, 3, K], ``posedirs``
        [V, 3, 36], ``J_regressor`` [5, V] dense or sparse, ``weights`` [V, 5], and
        ``kintree_table`` [2, 5] or ``parents`` [5]; optional ``n_shape``).

    Writes ``v_template``, ``f``, ``shapedirs``, ``posedirs``, ``J_regressor`` (dense [5, V]),
    ``weights``, ``kintree_table`` ([2, 5] int64: parents with root -1, joint ids 0..4) and
    ``n_shape``. :func:`load_flame_arrays` reads the file back to the same arrays.

    Returns:
      the path written.
    """
    path = Path(path)
    flame = _flame_from_content(dict(arrays), "save_flame_npz(arrays)", None)
    kintree = np.stack([flame["parents"].astype(np.int64), np.arange(N_JOINTS, dtype=np.int64)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(
            fh,
            v_template=flame["v_template"],
            f=flame["f"],
            shapedirs=flame["shapedirs"],
            posedirs=flame["posedirs"],
            J_regressor=flame["J_regressor"],
            weights=flame["weights"],
            kintree_table=kintree,
            n_shape=np.int64(flame["n_shape"]),
        )
    return path


# --------------------------------------------------------------------------------------------
# Landmark embeddings
# --------------------------------------------------------------------------------------------


def _faces_and_bary(content, face_key, bary_key, source, *, flat: bool):
    faces = _get(content, face_key, source)
    bary = _get(content, bary_key, source)
    if flat:
        # DECA stores the 68 full landmarks with a leading batch axis of 1.
        if faces.ndim == 2 and faces.shape[0] == 1:
            faces = faces[0]
        if bary.ndim == 3 and bary.shape[0] == 1:
            bary = bary[0]
        if faces.ndim != 1:
            raise _shape_error(source, face_key, "(L,)", faces.shape)
    if not np.issubdtype(faces.dtype, np.integer) and not (
        np.issubdtype(faces.dtype, np.floating) and np.all(faces == np.round(faces))
    ):
        raise ValueError(f"{source}: key '{face_key}' must hold integer face indices, got dtype {faces.dtype}")
    if bary.shape != faces.shape + (3,):
        raise _shape_error(source, bary_key, f"{faces.shape + (3,)} to match '{face_key}'", bary.shape)
    return faces.astype(np.int64), bary.astype(np.float64)


def _check_embedding(faces, bary, face_key, bary_key, source, n_faces):
    if faces.size and faces.min() < 0:
        raise ValueError(f"{source}: key '{face_key}' holds negative face indices")
    if n_faces is not None and faces.size and faces.max() >= n_faces:
        raise ValueError(f"{source}: key '{face_key}' holds face index {faces.max()} >= n_faces = {n_faces}")
    if not np.all(np.isfinite(bary)):
        raise ValueError(f"{source}: key '{bary_key}' holds non-finite barycentric coordinates")
    sums = bary.sum(-1)
    if sums.size and np.max(np.abs(sums - 1.0)) > 1e-3:
        worst = sums.flat[np.argmax(np.abs(sums - 1.0))]
        raise ValueError(
            f"{source}: key '{bary_key}' barycentric coordinates must sum to 1 (worst sum {worst:.6f})"
        )


def load_landmark_embedding(path: str | os.PathLike, n_faces: int | None = None) -> dict[str, np.ndarray]:
    """Read a FLAME landmark embedding (triangle index + barycentric coordinates per landmark).

    Supported layouts (recognised by their keys, whatever the file extension):
      * DECA/MICA ``landmark_embedding.npy`` (a pickled dict): ``full_lmk_faces_idx`` [1, 68] or
        [68] and ``full_lmk_bary_coords`` [1, 68, 3] or [68, 3] (preferred), else
        ``static_lmk_faces_idx`` [51] and ``static_lmk_bary_coords`` [51, 3]; plus the contour
        table ``dynamic_lmk_faces_idx`` [79, 17] / ``dynamic_lmk_bary_coords`` [79, 17, 3];
      * smplx ``flame_static_embedding.pkl`` (possibly a Python-2 pickle): ``lmk_face_idx`` [51]
        and ``lmk_b_coords`` [51, 3];
      * mediapipe ``mediapipe_landmark_embedding.npz``: ``lmk_face_idx`` [105],
        ``lmk_b_coords`` [105, 3] and ``landmark_indices`` [105] (mediapipe vertex ids).

    Args:
      path: the embedding file (.npy, .pkl or .npz).
      n_faces: number of mesh triangles (9976 for FLAME); when given, face indices are checked
        to lie in [0, n_faces).

    Returns:
      dict with ``faces_idx`` [L] int32 and ``bary`` [L, 3] float32 (unitless, each row sums to
      1); ``indices`` [L] int32 for the mediapipe layout; ``static_faces_idx`` [51] int32 and
      ``static_bary`` [51, 3] float32 when a DECA file has both; ``dynamic_faces_idx`` [B, 17]
      int32 and ``dynamic_bary`` [B, 17, 3] float32 when the file has the contour table.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unknown layout, missing key, wrong shape, non-finite barycentrics or ones not
        summing to 1, face indices out of range; messages name the file and the key.
    """
    content, source = _read_container(path)
    out: dict[str, np.ndarray] = {}
    if "full_lmk_faces_idx" in content or "static_lmk_faces_idx" in content:
        layouts = [("full_lmk_faces_idx", "full_lmk_bary_coords"), ("static_lmk_faces_idx", "static_lmk_bary_coords")]
        found = [(fk, bk) for fk, bk in layouts if fk in content]
        for i, (fk, bk) in enumerate(found):
            faces, bary = _faces_and_bary(content, fk, bk, source, flat=True)
            _check_embedding(faces, bary, fk, bk, source, n_faces)
            prefix = "" if i == 0 else "static_"
            out[prefix + "faces_idx"] = faces.astype(np.int32)
            out[prefix + "bary"] = bary.astype(np.float32)
        if "dynamic_lmk_faces_idx" in content:
            fk, bk = "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords"
            faces, bary = _faces_and_bary(content, fk, bk, source, flat=False)
            _check_embedding(faces, bary, fk, bk, source, n_faces)
            out["dynamic_faces_idx"] = faces.astype(np.int32)
            out["dynamic_bary"] = bary.astype(np.float32)
    elif "lmk_face_idx" in content:
        fk, bk = "lmk_face_idx", "lmk_b_coords"
        faces, bary = _faces_and_bary(content, fk, bk, source, flat=True)
        _check_embedding(faces, bary, fk, bk, source, n_faces)
        out["faces_idx"] = faces.astype(np.int32)
        out["bary"] = bary.astype(np.float32)
        if "landmark_indices" in content:
            indices = _get(content, "landmark_indices", source)
            if indices.ndim == 2 and indices.shape[0] == 1:
                indices = indices[0]
            if indices.shape != faces.shape:
                raise _shape_error(source, "landmark_indices", f"{faces.shape} to match 'lmk_face_idx'", indices.shape)
            if not np.issubdtype(indices.dtype, np.integer) or (indices.size and indices.min() < 0):
                raise ValueError(f"{source}: key 'landmark_indices' must hold non-negative integer vertex ids")
            out["indices"] = indices.astype(np.int32)
    else:
        raise ValueError(
            f"{source}: unknown landmark embedding layout: expected key 'full_lmk_faces_idx', "
            f"'static_lmk_faces_idx' or 'lmk_face_idx' (keys present: {sorted(content)})"
        )
    return out


# --------------------------------------------------------------------------------------------
# UV layout
# --------------------------------------------------------------------------------------------


def _obj_index(token: str, count: int, source: str, lineno: int, kind: str) -> int:
    try:
        idx = int(token)
    except ValueError as exc:
        raise ValueError(f"{source}:{lineno}: bad {kind} index {token!r} in a face") from exc
    idx = count + idx if idx < 0 else idx - 1  # negative = relative to the last defined element
    if not 0 <= idx < count:
        raise ValueError(f"{source}:{lineno}: {kind} index {token} out of range (only {count} defined so far)")
    return idx


def _parse_obj_uv(text: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    uvs: list[tuple[float, float]] = []
    faces: list[tuple[int, int, int]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "vt":
            if len(parts) < 3:
                raise ValueError(f"{source}:{lineno}: 'vt' line needs two coordinates")
            try:
                uvs.append((float(parts[1]), float(parts[2])))
            except ValueError as exc:
                raise ValueError(f"{source}:{lineno}: bad 'vt' line {line.strip()!r}") from exc
        elif parts[0] == "f":
            corners = parts[1:]
            if len(corners) < 3:
                raise ValueError(f"{source}:{lineno}: face with fewer than 3 corners")
            tex = []
            for corner in corners:
                fields = corner.split("/")
                if len(fields) < 2 or fields[1] == "":
                    raise ValueError(
                        f"{source}:{lineno}: face corner {corner!r} has no texture index ('vt'); "
                        f"expected v/vt or v/vt/vn"
                    )
                tex.append(_obj_index(fields[1], len(uvs), source, lineno, "vt"))
            # Polygons are split into a fan of triangles.
            faces.extend((tex[0], tex[i], tex[i + 1]) for i in range(1, len(tex) - 1))
    if not uvs:
        raise ValueError(f"{source}: key 'vt': no texture coordinates ('vt' lines) in the OBJ file")
    if not faces:
        raise ValueError(f"{source}: key 'f': no faces ('f' lines) in the OBJ file")
    return np.asarray(uvs, np.float32), np.asarray(faces, np.int32)


def load_flame_uv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read FLAME's UV layout from ``head_template.obj`` or ``FLAME_texture.npz``-style files.

    OBJ: ``vt u v`` lines give the UV coordinates and ``f`` lines in the forms ``v/vt`` or
    ``v/vt/vn`` give, per face corner, the 1-based (or negative, relative) texture index; polygons
    are split into triangle fans. A face without texture indices (``v`` or ``v//vn``) is an error.
    npz (``FLAME_texture.npz``, ``FLAME_albedo_from_BFM.npz``): keys ``vt`` [T, 2] and ``ft``
    [F, 3] with 0-based indices.

    Args:
      path: the OBJ or npz file.

    Returns:
      (uv_coords [T, 2] float32 in UV units (0..1), uv_faces [F, 3] int32, 0-based indices into
      uv_coords; face f of the mesh uses uv_coords[uv_faces[f]]).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: missing ``vt``/``ft``, wrong shapes or indices out of range, naming file and key.
    """
    path = Path(path)
    existing_file(path)
    source = str(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_NPY_MAGIC) or path.suffix.lower() != ".obj":
        content, source = _read_container(path)
        uv = _get(content, "vt", source)
        if uv.ndim != 2 or uv.shape[1] not in (2, 3):
            raise _shape_error(source, "vt", "(T, 2)", uv.shape)
        uv = uv[:, :2]
        faces = _get(content, "ft", source)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise _shape_error(source, "ft", "(F, 3)", faces.shape)
        if faces.size and (faces.min() < 0 or faces.max() >= uv.shape[0]):
            raise ValueError(f"{source}: key 'ft' holds indices outside [0, {uv.shape[0]}) (expected 0-based)")
        return uv.astype(np.float32), faces.astype(np.int32)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not a text OBJ file ({exc})") from exc
    return _parse_obj_uv(text, source)
