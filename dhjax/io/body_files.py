"""Reader for the official SMPL-X body model file (``SMPLX_NEUTRAL.npz`` / ``SMPLX_*.pkl``).

The file is read with the restricted container reader of :mod:`dhjax.io.flame_files` (pickles,
Python-2 era ones included, through its allow-listed unpickler; chumpy objects and
``scipy.sparse`` ``J_regressor`` become plain arrays without chumpy or scipy). An ``.npz`` is read
member by member: the official SMPL-X npz holds pickled Python objects next to its arrays
(``part2num``, ``joint2num``), which ``np.load(allow_pickle=False)`` refuses; they are decoded
by the same restricted unpickler, and a member that cannot be decoded is an error only if a key
this reader needs is that member.

Official keys (V = 10475 vertices, F = 20908 faces for SMPL-X v1.1):
``v_template`` [V, 3], ``f`` [F, 3], ``shapedirs`` [V, 3, K], ``posedirs`` [V, 3, 486] (or the
flattened [3V, 486], which smplx accepts too), ``J_regressor`` [55, V] (dense or sparse),
``weights`` [V, 55], ``kintree_table`` [2, 55]; optional ``lmk_faces_idx`` [51],
``lmk_bary_coords`` [51, 3], ``vt`` [T, 2], ``ft`` [F, 3], ``hands_componentsl/r`` [45, 45],
``hands_meanl/r`` [45]. Only SMPL-X (55 joints) is read; SMPL and SMPL+H files (24 / 52 joints)
are refused by the shape checks.

Shape/expression split of ``shapedirs`` (smplx.SMPLX's rule): K >= 400 (v1.1: 300 shape then
100 expression) gives shape = components 0..299 and expression = 300..399; a legacy v1.0 file
with K < 300 (K = 20: 10 shape + 10 expression) gives shape = 0..9 and expression = 10..19.
For 300 <= K < 400 smplx's rule would let shape and expression overlap, so such a file needs
``n_shape=`` (as does any other split).

Plain numpy and the standard library only (this is the I/O floor). Lengths are in metres.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dhjax.io import flame_files as ff
from dhjax.io._common import existing_file

__all__ = [
    "SMPLX_KEYS",
    "N_JOINTS",
    "N_POSE_FEATURES",
    "SMPLX_PARENTS",
    "load_smplx_arrays",
    "smplx_arrays",
    "random_smplx_content",
]

#: Keys of the official SMPL-X model file that :func:`load_smplx_arrays` needs.
SMPLX_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")

#: SMPL-X's joints: pelvis, 21 body joints, jaw, 2 eyes, 2 x 15 finger joints.
N_JOINTS = 55

#: Pose-corrective features: the flattened (R_j - I) of joints 1..54.
N_POSE_FEATURES = 9 * (N_JOINTS - 1)

#: SMPL-X's kinematic tree (row 0 of the official kintree_table, root -1), in smplx's joint order.
SMPLX_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
                 20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
                 21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53)

#: Hand pose size per hand (15 joints x 3 axis-angle components) = size of the hand PCA space.
N_HAND_POSE = 45

# smplx.SMPLX's SHAPE_SPACE_DIM / EXPRESSION_SPACE_DIM and the legacy 10 + 10 layout.
_SHAPE_SPACE_DIM = 300
_EXPRESSION_SPACE_DIM = 100
_LEGACY_N_SHAPE = 10


class _Unreadable:
    """An npz member that could not be decoded; the error is raised only if the key is needed."""

    def __init__(self, error: Exception):
        self.error = error


def _read_content(path: str | os.PathLike) -> tuple[dict, str]:
    """The file's dict of values and its source name (npz member by member, else flame_files)."""
    path = Path(path)
    existing_file(path)
    with open(path, "rb") as fh:
        head = fh.read(len(ff._ZIP_MAGIC))
    if head != ff._ZIP_MAGIC:
        return ff._read_container(path)
    source = str(path)
    content: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            members = [(m, zf.read(m)) for m in zf.namelist() if m.endswith(".npy")]
    except Exception as exc:
        raise ValueError(f"{source}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    for member, data in members:
        key = member[: -len(".npy")]
        try:
            content[key] = ff._read_npy_object(data, f"{source}: key '{key}'")
        except ValueError as exc:  # includes refused pickle globals: nothing was called
            content[key] = _Unreadable(exc)
    return content, source


def _get(content: Mapping, key: str, source: str) -> np.ndarray:
    value = content.get(key)
    if isinstance(value, _Unreadable):
        raise value.error
    return ff._get(content, key, source)


def _with_shape(content, key, source, expected: str, check) -> np.ndarray:
    array = _get(content, key, source)
    if not check(array.shape):
        raise ff._shape_error(source, key, expected, array.shape)
    return array


def _parents_from_kintree(kintree: np.ndarray, source: str) -> np.ndarray:
    """Parents [55] from kintree_table [2, 55] (row 0 parents, row 1 joint ids; root -> -1).

    As smplx, the root's parent entry is ignored (files store 0 or 2^32 - 1 there)."""
    key = "kintree_table"
    if kintree.shape != (2, N_JOINTS):
        raise ff._shape_error(source, key, f"(2, {N_JOINTS})", kintree.shape)
    table = kintree.astype(np.int64)
    ids = table[1]
    if sorted(ids.tolist()) != list(range(N_JOINTS)):
        raise ValueError(f"{source}: key '{key}' row 1 must list joint ids 0..{N_JOINTS - 1}, got {ids.tolist()}")
    parents = np.empty(N_JOINTS, np.int64)
    parents[ids] = table[0]
    parents[0] = -1
    if not all(0 <= parents[j] < j for j in range(1, N_JOINTS)):
        raise ValueError(
            f"{source}: key '{key}' gives parents {parents.tolist()}; expected every joint but the root "
            f"(joint 0) to have a parent with a smaller index")
    return parents.astype(np.int32)


def _split_components(n_components: int, n_shape: int | None, source: str) -> tuple[slice, slice]:
    """(shape, expression) slices of shapedirs' last axis, by smplx.SMPLX's rule or n_shape."""
    if n_shape is not None:
        n_shape = int(n_shape)
        if not 0 <= n_shape <= n_components:
            raise ValueError(f"{source}: n_shape = {n_shape} is outside [0, K = {n_components}] for key 'shapedirs'")
        return slice(0, n_shape), slice(n_shape, n_components)
    if n_components >= _SHAPE_SPACE_DIM + _EXPRESSION_SPACE_DIM:
        return (slice(0, _SHAPE_SPACE_DIM),
                slice(_SHAPE_SPACE_DIM, _SHAPE_SPACE_DIM + _EXPRESSION_SPACE_DIM))
    if 2 * _LEGACY_N_SHAPE <= n_components < _SHAPE_SPACE_DIM:
        return slice(0, _LEGACY_N_SHAPE), slice(_LEGACY_N_SHAPE, 2 * _LEGACY_N_SHAPE)
    raise ValueError(
        f"{source}: key 'shapedirs' has K = {n_components} components: neither SMPL-X v1.1's 400 "
        f"(300 shape + 100 expression) nor the legacy layout (20 <= K < 300: 10 shape + 10 expression); "
        f"pass n_shape= (the number of shape components; the rest are expression)")


def _smplx_from_content(content: Mapping, source: str, n_shape: int | None) -> dict:
    v_template = _with_shape(content, "v_template", source, "(V, 3)", lambda s: len(s) == 2 and s[1] == 3)
    V = v_template.shape[0]
    faces = _with_shape(content, "f", source, "(F, 3)", lambda s: len(s) == 2 and s[1] == 3)
    shapedirs = _with_shape(content, "shapedirs", source, f"(V, 3, K) with V = {V} from v_template",
                            lambda s: len(s) == 3 and s[:2] == (V, 3))
    posedirs = _with_shape(
        content, "posedirs", source,
        f"(V, 3, {N_POSE_FEATURES}) = ({V}, 3, {N_POSE_FEATURES}) "
        f"or (3V, {N_POSE_FEATURES}) = ({3 * V}, {N_POSE_FEATURES})",
        lambda s: s in ((V, 3, N_POSE_FEATURES), (3 * V, N_POSE_FEATURES)))
    posedirs = posedirs.reshape(V, 3, N_POSE_FEATURES)   # [3V, P] rows are vertex-major, as smplx reads them
    j_regressor = _with_shape(content, "J_regressor", source, f"({N_JOINTS}, V) = ({N_JOINTS}, {V})",
                              lambda s: s == (N_JOINTS, V))
    weights = _with_shape(content, "weights", source, f"(V, {N_JOINTS}) = ({V}, {N_JOINTS})",
                          lambda s: s == (V, N_JOINTS))
    parents = _parents_from_kintree(_get(content, "kintree_table", source), source)

    n_faces = faces.shape[0]
    if faces.size and (not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= V):
        raise ValueError(f"{source}: key 'f' must hold integer vertex indices in [0, {V})")
    for key, array in (("v_template", v_template), ("shapedirs", shapedirs), ("posedirs", posedirs),
                       ("J_regressor", j_regressor), ("weights", weights)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{source}: key '{key}' contains non-finite values")
    shape_sl, expr_sl = _split_components(shapedirs.shape[2], n_shape, source)

    out = {
        "v_template": v_template.astype(np.float32),
        "faces": faces.astype(np.int32),
        "shapedirs": np.ascontiguousarray(shapedirs[..., shape_sl], np.float32),
        "exprdirs": np.ascontiguousarray(shapedirs[..., expr_sl], np.float32),
        "posedirs": posedirs.astype(np.float32),
        "j_regressor": j_regressor.astype(np.float32),
        "lbs_weights": weights.astype(np.float32),
        "parents": parents,
    }
    if "lmk_faces_idx" in content:
        for key in ("lmk_faces_idx", "lmk_bary_coords"):
            _get(content, key, source)   # raises a decoding error or the missing key, named
        lmk_faces, lmk_bary = ff._faces_and_bary(content, "lmk_faces_idx", "lmk_bary_coords", source, flat=True)
        ff._check_embedding(lmk_faces, lmk_bary, "lmk_faces_idx", "lmk_bary_coords", source, n_faces)
        out["lmk_faces"], out["lmk_bary"] = lmk_faces.astype(np.int32), lmk_bary.astype(np.float32)
    if "vt" in content or "ft" in content:
        uv = _with_shape(content, "vt", source, "(T, 2)", lambda s: len(s) == 2 and s[1] in (2, 3))[:, :2]
        uv_faces = _with_shape(content, "ft", source, f"(F, 3) = ({n_faces}, 3) to match 'f'",
                               lambda s: s == (n_faces, 3))
        if uv_faces.size and (uv_faces.min() < 0 or uv_faces.max() >= uv.shape[0]):
            raise ValueError(f"{source}: key 'ft' holds indices outside [0, {uv.shape[0]}) (expected 0-based)")
        out["uv_coords"], out["uv_faces"] = uv.astype(np.float32), uv_faces.astype(np.int32)
    for side in ("l", "r"):
        if f"hands_components{side}" in content:
            out[f"hands_components_{side}"] = _with_shape(
                content, f"hands_components{side}", source, f"({N_HAND_POSE}, {N_HAND_POSE})",
                lambda s: s == (N_HAND_POSE, N_HAND_POSE)).astype(np.float32)
        if f"hands_mean{side}" in content:
            out[f"hands_mean_{side}"] = _with_shape(
                content, f"hands_mean{side}", source, f"({N_HAND_POSE},)",
                lambda s: s == (N_HAND_POSE,)).astype(np.float32)
    return out


def load_smplx_arrays(path: str | os.PathLike, n_shape: int | None = None) -> dict[str, np.ndarray]:
    """Read an official SMPL-X model file (npz or pickle) into numpy, in dhjax's key names.

    Args:
      path: ``SMPLX_NEUTRAL.npz`` / ``SMPLX_MALE.pkl`` / ... (SMPL-X v1.0 or v1.1), or any npz or
        pickle with the official keys (module docstring).
      n_shape: how many of the K ``shapedirs`` components are shape (identity) components; the rest
        are expression. Default: smplx.SMPLX's rule (module docstring: 300 + 100 for K >= 400,
        10 + 10 for 20 <= K < 300).

    Returns:
      dict with
        ``v_template`` [V, 3] float32 metres; ``faces`` [F, 3] int32;
        ``shapedirs`` [V, 3, S] and ``exprdirs`` [V, 3, E] float32, metres per unit coefficient;
        ``posedirs`` [V, 3, 486] float32, metres per unit of the row-major flattened (R_j - I),
        j = 1..54; ``j_regressor`` [55, V] float32 (dense); ``lbs_weights`` [V, 55] float32;
        ``parents`` [55] int32 (root -1);
        when the file has them: ``lmk_faces`` [L] int32 + ``lmk_bary`` [L, 3] float32 (the 51
        static face landmarks), ``uv_coords`` [T, 2] + ``uv_faces`` [F, 3] (from ``vt``/``ft``),
        ``hands_components_l/r`` [45, 45] (rows are PCA components of the 15 x 3 axis-angle hand
        pose, radians) and ``hands_mean_l/r`` [45] radians.

    Raises:
      FileNotFoundError: ``path`` does not exist (the message names it).
      ValueError: not a pickle/npz, a refused pickle global, a missing key (named with the file),
        a key with the wrong shape (key, expected and actual shape), inconsistent V, face indices
        out of range, non-finite values, or a ``shapedirs`` split that cannot be inferred.
    """
    content, source = _read_content(path)
    return _smplx_from_content(content, source, n_shape)


def smplx_arrays(content: Mapping[str, Any], n_shape: int | None = None,
                 source: str = "smplx_arrays(content)") -> dict[str, np.ndarray]:
    """:func:`load_smplx_arrays` for a dict already in memory with the official keys (e.g. from
    :func:`random_smplx_content`); same checks, same returned keys; `source` names it in errors."""
    return _smplx_from_content(content, source, n_shape)


def random_smplx_content(seed: int = 0, n_vertices: int = 300, n_faces: int | None = None,
                         n_components: int = 400, *, n_landmarks: int = 51,
                         parents=None) -> dict[str, np.ndarray]:
    """Random arrays in the official SMPL-X file layout, for tests, benchmarks and peer checks.

    NOT a body: the vertices are noise. Skinning weights have four positive influences per
    vertex (sparse rows, as SMPL's), regressor rows are positive; both sum to 1; faces index real vertices, landmark barycentrics sum to 1, hand components are
    orthonormal. ``np.savez(path, **random_smplx_content())`` writes a file that both
    :func:`load_smplx_arrays` and ``smplx.SMPLX(path)`` read.

    Args:
      seed: numpy seed. n_vertices: V. n_faces: F (default 2V). n_components: K of shapedirs
        (400 = v1.1, 20 = legacy v1.0). n_landmarks: L of lmk_faces_idx. parents: [55] tree
        (default: SMPL-X's, SMPLX_PARENTS).

    Returns:
      dict with the official keys: v_template [V, 3], f [F, 3] int32, shapedirs [V, 3, K],
      posedirs [V, 3, 486], J_regressor [55, V], weights [V, 55], kintree_table [2, 55] int64,
      lmk_faces_idx [L] int64, lmk_bary_coords [L, 3], vt [V, 2], ft [F, 3], hands_componentsl/r
      [45, 45], hands_meanl/r [45]; float32 metres (radians for the hand entries).
    """
    rng = np.random.default_rng(seed)
    V = int(n_vertices)
    F = 2 * V if n_faces is None else int(n_faces)
    parents = SMPLX_PARENTS if parents is None else parents
    # Four influences per vertex, as SMPL's skinning weights (sparse rows).
    weights = np.zeros((V, N_JOINTS))
    for v in range(V):
        weights[v, rng.choice(N_JOINTS, 4, replace=False)] = rng.uniform(0.05, 1.0, 4)
    weights /= weights.sum(1, keepdims=True)
    j_reg = rng.uniform(size=(N_JOINTS, V)) * (rng.uniform(size=(N_JOINTS, V)) < 0.1)
    j_reg[:, 0] += 1e-3  # no empty row
    j_reg /= j_reg.sum(1, keepdims=True)
    hands = {}
    for side in ("l", "r"):
        q, _ = np.linalg.qr(rng.normal(size=(N_HAND_POSE, N_HAND_POSE)))
        hands[f"hands_components{side}"] = q.T.astype(np.float32)
        hands[f"hands_mean{side}"] = rng.normal(scale=0.2, size=N_HAND_POSE).astype(np.float32)
    f32 = lambda a: np.asarray(a, np.float32)
    return {
        "v_template": f32(rng.normal(scale=0.3, size=(V, 3))),
        "f": rng.integers(0, V, size=(F, 3)).astype(np.int32),
        "shapedirs": f32(rng.normal(scale=0.01, size=(V, 3, int(n_components)))),
        "posedirs": f32(rng.normal(scale=0.01, size=(V, 3, N_POSE_FEATURES))),
        "J_regressor": f32(j_reg),
        "weights": f32(weights),
        "kintree_table": np.stack([np.asarray(parents, np.int64) % (2**32), np.arange(N_JOINTS)]).astype(np.int64),
        "lmk_faces_idx": rng.integers(0, F, size=int(n_landmarks)).astype(np.int64),
        "lmk_bary_coords": f32(rng.dirichlet(np.ones(3), size=int(n_landmarks))),
        "vt": f32(rng.uniform(size=(V, 2))),
        "ft": rng.integers(0, V, size=(F, 3)).astype(np.int32),
        **hands,
    }
