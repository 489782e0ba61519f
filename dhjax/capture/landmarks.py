"""2D face landmarks of real photos: mediapipe face-mesh detection and landmark files.

MICA needs five points for its ArcFace crop and the face tracker needs 2D landmarks to fit to.
Both speak iBUG-68 (the 300-W order of `dhjax.io.landmark_schemes.LANDMARK68_NAMES`): every set
of points here is a `Landmarks` holding pixel positions together with the iBUG index of each
point, so a fitter can pick the matching embedding of the head model (`lmk_faces/lmk_bary` for
all 68, `mp_lmk_faces/mp_lmk_bary` for the 51 inner points).

    lm = landmarks.detect(image, name="me.jpg")       # mediapipe: 51 points (iBUG 17..67) + dense
    lm = landmarks.load("me.pts")                     # a file: 68, 51 or 468 points
    frames = landmarks.load("video_lmk.npy")          # [T, N, 2] -> one Landmarks per frame
    crop = align.arcface_crop(image, landmarks.five_points(lm))
    overlay = landmarks.draw(image, lm)

Sources and what they give:
  * mediapipe face mesh (`detect`, `from_mediapipe`, files of 468 or 478 points): the 468 mesh
    points stay in `dense`; the 51 points whose face-mesh index is in
    `landmark_schemes.MEDIAPIPE_INDICES` stand for iBUG points 17..67 (brows, nose, eyes, mouth).
    The face mesh has no counterpart of the 17 jaw-contour points, so none are produced.
  * iBUG-68 files (`from_ibug68`, files of 68 points): all 68.
  * files of 51 points: taken as iBUG 17..67 in that order (FLAME's "static" inner landmarks).

Pixel convention (as `dhjax.render.camera` and `dhjax.capture.align`): (x, y) with x along the
columns and y down the rows, the centre of the pixel in column j, row i at (j, i). Mediapipe's
normalised coordinates are relative to the image edges, so a normalised (u, v) lies at pixel
(u W - 0.5, v H - 0.5). iBUG `.pts` files are read as 1-based (the 300-W annotations' Matlab
convention, as menpo reads them): one is subtracted from every coordinate.

mediapipe is optional (`pip install 'dhjax[landmarks]'`, wheels for Python < 3.13) and imported
only by `detect`; everything else is numpy. Its face-mesh model ships inside the wheel, so
nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np

from dhjax.io._common import existing_file
from dhjax.io.landmark_schemes import (
    MEDIAPIPE_INDICES,
    MEDIAPIPE_TO_IBUG,
    N_IBUG,
    N_MEDIAPIPE,
    N_MEDIAPIPE_IRIS,
)

__all__ = [
    "Landmarks",
    "NoFaceError",
    "N_IBUG",
    "N_MEDIAPIPE",
    "detect",
    "from_ibug68",
    "from_mediapipe",
    "load",
    "five_points",
    "landmarks_for_image",
    "draw",
]

_ACCEPTED = ("68 (iBUG-68), 51 (iBUG points 17..67), 468 or 478 (mediapipe face mesh, pixels)")

# iBUG ids behind ArcFace's five points (as align.five_points_from_68).
_LEFT_EYE = tuple(range(36, 42))   # image-left eye (the subject's right)
_RIGHT_EYE = tuple(range(42, 48))
_NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = 30, 48, 54
_FIVE_IDS = _LEFT_EYE + _RIGHT_EYE + (_NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT)

_INSTALL = "pip install 'dhjax[landmarks]' (mediapipe; Python < 3.13)"
# How to do without detection, for the callers of `landmarks_for_image` / `detect`: the
# command-line flag of the experiments that detect, and the Python keyword. A caller with its own
# way of passing files (e.g. `track_run`) gives `detect` its own `file_hint`.
LANDMARK_FILE_HINT = (
    "give the landmarks as files instead: on the command line with --landmarks=... "
    "(python -m experiments.track: one file, [T, N, 2] for a video, or a folder of per-frame files "
    "named like the frames; python -m experiments.mica_predict: a folder of "
    "<image stem>.npy/.txt/.pts/.json), in Python with landmarks_for_image(..., landmarks_path=...) "
    "(any file dhjax.capture.landmarks.load reads)")


class NoFaceError(ValueError):
    """No face was found in an image; the message names the image."""


@dataclasses.dataclass(frozen=True, eq=False)
class Landmarks:
    """2D face landmarks of one image, each point labelled with its iBUG-68 index.

    Attributes:
      points: [K, 2] float32 pixels (x right, y down; the centre of pixel (row i, column j) is
        (j, i)). Read-only.
      ibug_ids: [K] int32, the iBUG-68 index (0..67, distinct) that each point stands for.
        Read-only.
      source: where the points come from: 'mediapipe' (detected), 'file', 'synthetic', ...
      dense: [468, 2] float32 pixels, the full mediapipe face mesh, when the points come from it
        (detected or read from a 468/478-point file); None otherwise. Read-only.
      iris: [10, 2] float32 pixels, mediapipe's iris points 468-477 (the subject's right iris
        centre and four contour points, then the left's), when the points come from a refined
        478-point mesh (`detect(..., iris=True)` or a 478-point file); None otherwise. Read-only.

    Arrays are validated and converted on construction; equality is identity (arrays inside).
    """

    points: np.ndarray
    ibug_ids: np.ndarray
    source: str
    dense: np.ndarray | None = None
    iris: np.ndarray | None = None

    def __post_init__(self):
        points = _finite_xy(self.points, "Landmarks.points")
        if points.shape[0] < 1:
            raise ValueError("Landmarks.points: expected at least one point, got none")
        ids = np.asarray(self.ibug_ids)
        if ids.shape != (points.shape[0],):
            raise ValueError(f"Landmarks.ibug_ids: expected shape [{points.shape[0]}] (one id per "
                             f"point), got {ids.shape}")
        if ids.dtype.kind not in "iu":
            ok = ids.dtype.kind == "f" and np.all(np.isfinite(ids)) and np.all(ids == np.round(ids))
            if not ok:
                raise ValueError(f"Landmarks.ibug_ids: expected integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if np.any((ids < 0) | (ids >= N_IBUG)):
            bad = ids[(ids < 0) | (ids >= N_IBUG)]
            raise ValueError(f"Landmarks.ibug_ids: iBUG indices run 0..67, got {bad.tolist()}")
        if len(np.unique(ids)) != len(ids):
            values, counts = np.unique(ids, return_counts=True)
            raise ValueError(f"Landmarks.ibug_ids: each iBUG index may appear once, repeated: "
                             f"{values[counts > 1].tolist()}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"Landmarks.source: expected a non-empty string, got {self.source!r}")
        dense = self.dense
        if dense is not None:
            dense = _finite_xy(dense, "Landmarks.dense")
            if dense.shape != (N_MEDIAPIPE, 2):
                raise ValueError(f"Landmarks.dense: expected shape [{N_MEDIAPIPE}, 2] (mediapipe "
                                 f"face mesh in pixels), got {dense.shape}")
            dense.setflags(write=False)
        iris = self.iris
        if iris is not None:
            iris = _finite_xy(iris, "Landmarks.iris")
            if iris.shape != (N_MEDIAPIPE_IRIS - N_MEDIAPIPE, 2):
                raise ValueError(f"Landmarks.iris: expected shape [{N_MEDIAPIPE_IRIS - N_MEDIAPIPE}, 2] "
                                 f"(mediapipe's iris points 468-477 in pixels), got {iris.shape}")
            iris.setflags(write=False)
        ids = ids.astype(np.int32)
        points.setflags(write=False)
        ids.setflags(write=False)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "ibug_ids", ids)
        object.__setattr__(self, "dense", dense)
        object.__setattr__(self, "iris", iris)

    def __len__(self) -> int:
        return int(self.points.shape[0])


def _finite_xy(x, name: str) -> np.ndarray:
    """Any array-like [K, 2] of real numbers -> a fresh float32 array; ValueError otherwise."""
    try:
        a = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array [K, 2] (x, y pixels) ({exc})") from exc
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name}: expected shape [K, 2] (x, y pixels), got {a.shape}")
    if not np.all(np.isfinite(a)):
        rows = np.unique(np.nonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name}: non-finite (NaN/inf) coordinates in point(s) "
                         f"{rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}")
    return a.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Construction from arrays.


def _xy_columns(points, counts: tuple[int, ...], name: str) -> np.ndarray:
    """[N, 2|3] -> float64 [N, 2] (a third column, depth or confidence, is dropped)."""
    try:
        a = np.array(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a numeric array [N, 2 or 3] ({exc})") from exc
    if a.ndim != 2 or a.shape[0] not in counts or a.shape[1] not in (2, 3):
        want = " or ".join(f"[{n}, 2|3]" for n in counts)
        raise ValueError(f"{name}: expected shape {want} (x, y[, z] pixels), got {a.shape}")
    return a[:, :2]


def from_ibug68(points68) -> Landmarks:
    """All 68 iBUG points.

    Args:
      points68: [68, 2] (or [68, 3], the third column dropped) float pixels in iBUG-68 order.

    Returns:
      Landmarks with ibug_ids 0..67, source 'file'.
    """
    xy = _xy_columns(points68, (N_IBUG,), "from_ibug68: points68")
    return Landmarks(xy, np.arange(N_IBUG, dtype=np.int32), "file")


def from_mediapipe(points468, *, source: str = "mediapipe") -> Landmarks:
    """The 51 iBUG-compatible points of a mediapipe face mesh, the mesh kept in `dense`.

    Point k is face-mesh point `MEDIAPIPE_INDICES[k]` and stands for iBUG point
    `MEDIAPIPE_TO_IBUG[k]` (17 + k: brows, nose, eyes, mouth; the face mesh has no jaw contour).

    Args:
      points468: [468, 2|3] float pixels (not mediapipe's normalised coordinates; see the module
        docstring); [478, 2|3] (refined mesh with iris points) is accepted and the iris points
        kept in `iris`. A third column (mediapipe's relative depth) is dropped.
      source: recorded in the result ('mediapipe' for detections, 'file' when read from disk).

    Returns:
      Landmarks with 51 points, ibug_ids 17..67, dense [468, 2], iris [10, 2] or None.
    """
    xy = _xy_columns(points468, (N_MEDIAPIPE, N_MEDIAPIPE_IRIS), "from_mediapipe: points468")
    dense = xy[:N_MEDIAPIPE]
    iris = xy[N_MEDIAPIPE:] if xy.shape[0] == N_MEDIAPIPE_IRIS else None
    return Landmarks(dense[MEDIAPIPE_INDICES], MEDIAPIPE_TO_IBUG.astype(np.int32), source,
                     dense=dense, iris=iris)


def _from_array(xy: np.ndarray, where: str) -> Landmarks:
    """[N, 2|3] from a file -> Landmarks by the point count N."""
    n = xy.shape[0]
    if xy.shape[1] not in (2, 3):
        raise ValueError(f"{where}: expected 2 (x y) or 3 (x y z) values per point, got "
                         f"{xy.shape[1]} (array shape {xy.shape})")
    if n not in (N_IBUG, len(MEDIAPIPE_TO_IBUG), N_MEDIAPIPE, N_MEDIAPIPE_IRIS):
        raise ValueError(f"{where}: found {n} landmarks; accepted counts are {_ACCEPTED}")
    if not np.all(np.isfinite(xy)):
        rows = np.unique(np.nonzero(~np.isfinite(xy))[0])
        raise ValueError(f"{where}: non-finite (NaN/inf) coordinates in point(s) "
                         f"{rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}")
    extent = np.ptp(xy[:, :2], axis=0).max()
    if extent <= 1.0:
        raise ValueError(f"{where}: all {n} points lie within {extent:.3g} pixels of each other; "
                         f"these look like normalised [0, 1] coordinates. dhjax expects pixels: "
                         f"x = u * width - 0.5, y = v * height - 0.5")
    if n == N_IBUG:
        return Landmarks(xy[:, :2], np.arange(N_IBUG, dtype=np.int32), "file")
    if n == len(MEDIAPIPE_TO_IBUG):
        return Landmarks(xy[:, :2], MEDIAPIPE_TO_IBUG.astype(np.int32), "file")
    return from_mediapipe(xy, source="file")


# ----------------------------------------------------------------------------------------------
# Files.


def _read_pts(path: Path) -> np.ndarray:
    """iBUG .pts: 'version: 1', 'n_points: N', '{', N rows 'x y', '}'; 1-based -> 0-based."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    try:
        start = lines.index("{")
        end = lines.index("}", start)
    except ValueError:
        raise ValueError(f"{path}: not an iBUG .pts file (expected the points between lines "
                         f"'{{' and '}}')") from None
    header = {}
    for line in lines[:start]:
        if ":" in line:
            key, value = line.split(":", 1)
            header[key.strip().lower()] = value.strip()
    rows = _parse_rows([line for line in lines[start + 1:end] if line], path, first_line=start + 2)
    if "n_points" in header:
        try:
            declared = int(header["n_points"])
        except ValueError:
            raise ValueError(f"{path}: bad header 'n_points: {header['n_points']}'") from None
        if declared != len(rows):
            raise ValueError(f"{path}: header says n_points: {declared} but {len(rows)} point "
                             f"rows follow")
    return rows - 1.0


def _parse_rows(lines, path: Path, first_line: int = 1) -> np.ndarray:
    """Rows of numbers (whitespace or commas, '#' comments) -> [N, C] float64, equal C."""
    rows, numbers = [], []
    for lineno, line in enumerate(lines, start=first_line):
        fields = line.split("#")[0].replace(",", " ").split()
        if not fields:
            continue
        try:
            numbers.append([float(v) for v in fields])
        except ValueError:
            raise ValueError(f"{path}: line {lineno} is not a row of numbers: "
                             f"{line.strip()!r}") from None
        rows.append(lineno)
    if not numbers:
        raise ValueError(f"{path}: no landmark rows found (expected N rows of 'x y')")
    width = len(numbers[0])
    for lineno, row in zip(rows, numbers):
        if len(row) != width:
            raise ValueError(f"{path}: line {lineno} has {len(row)} values, the first row has "
                             f"{width}; expected every row to be 'x y' (or 'x y z')")
    return np.asarray(numbers, dtype=np.float64)


def _read_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if "landmarks" in npz.files:
                data = npz["landmarks"]
            elif len(npz.files) == 1:
                data = npz[npz.files[0]]
            else:
                raise ValueError(f"{path}: no array 'landmarks' (arrays: {sorted(npz.files)})")
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            if "landmarks" not in data:
                raise ValueError(f"{path}: a JSON object needs the key 'landmarks' (keys: "
                                 f"{sorted(data)})")
            data = data["landmarks"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of [x, y] rows (or "
                             f"{{\"landmarks\": [...]}}), got {type(data).__name__}")
        data = _nulls_to_nan(data)  # a missing point (null) is then reported as non-finite
    elif suffix == ".pts":
        data = _read_pts(path)
    else:  # .txt, .csv, ...: rows of numbers
        data = _parse_rows(path.read_text(encoding="utf-8").splitlines(), path)
    try:
        array = np.array(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: landmarks are not a rectangular numeric array ({exc})") from None
    return array


def _nulls_to_nan(data):
    if isinstance(data, list):
        return [_nulls_to_nan(v) for v in data]
    return np.nan if data is None else data


def _check_inside(lm: Landmarks, image_size, where: str) -> None:
    """ValueError when points lie more than half the image size beyond its edges."""
    w, h = image_size
    pts = lm.points if lm.dense is None else np.concatenate([lm.points, lm.dense])
    lo = np.array([-0.5 * w, -0.5 * h])
    hi = np.array([1.5 * w, 1.5 * h])
    outside = np.any((pts < lo) | (pts > hi), axis=1)
    if np.any(outside):
        k = int(np.argmax(outside))
        raise ValueError(
            f"{where}: {int(outside.sum())} point(s) lie far outside the {w}x{h} image (e.g. "
            f"({pts[k, 0]:.1f}, {pts[k, 1]:.1f})); are the landmarks for another image size, or "
            f"are x and y swapped?")


def _image_size(image_size):
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image_size: expected (width, height), got {image_size!r}") from exc
    if w < 1 or h < 1:
        raise ValueError(f"image_size: expected positive (width, height), got {(w, h)}")
    return w, h


def load(path: str | os.PathLike, *, image_size=None) -> Landmarks | list[Landmarks]:
    """Reads 2D landmarks in pixels from a file.

    Formats (by suffix): `.npy`; `.npz` (array 'landmarks', or its only array); `.json` (a list,
    or an object with key 'landmarks'; null entries count as missing); iBUG `.pts` (1-based,
    see the module docstring); anything else is text: one point per row, 'x y' or 'x y z',
    separated by whitespace or commas, '#' starts a comment.

    The point count N decides the meaning: 68 = iBUG-68; 51 = iBUG points 17..67; 468 (or 478)
    = mediapipe face mesh in pixels (the 51 iBUG-compatible points plus `dense`). A third column
    is dropped. A [T, N, 2|3] array (`.npy`, `.npz`, `.json`) holds one set per video frame.

    Args:
      path: the landmark file.
      image_size: optional (width, height) of the image the landmarks belong to; points more than
        half the image size beyond its edges are then an error.

    Returns:
      Landmarks (source 'file') for an [N, 2|3] array, or a list of T Landmarks for [T, N, 2|3].

    Raises:
      FileNotFoundError: no such file (named).
      ValueError (naming the file): unreadable or empty; a point count other than 68/51/468/478
        (the message gives the count found); NaN/inf coordinates; coordinates that look
        normalised to [0, 1]; points far outside `image_size`.
    """
    path = existing_file(path)
    size = None if image_size is None else _image_size(image_size)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: landmark file is empty")
    try:
        array = _read_array(path)
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: cannot read landmarks ({exc})") from exc
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read landmarks ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # zip errors of a corrupt .npz and the like
        raise ValueError(f"{path}: cannot read landmarks ({type(exc).__name__}: {exc})") from exc

    if array.ndim == 2:
        sets = [(_from_array(array, str(path)), str(path))]
    elif array.ndim == 3:
        if array.shape[0] == 0:
            raise ValueError(f"{path}: landmark array {array.shape} holds no frames")
        sets = [(_from_array(frame, f"{path} (frame {t})"), f"{path} (frame {t})")
                for t, frame in enumerate(array)]
    else:
        raise ValueError(f"{path}: expected a landmark array [N, 2|3] or [T, N, 2|3] (one set per "
                         f"frame), got shape {array.shape}")
    if size is not None:
        for lm, where in sets:
            _check_inside(lm, size, where)
    result = [lm for lm, _ in sets]
    return result[0] if array.ndim == 2 else result


# ----------------------------------------------------------------------------------------------
# Detection.


def _rgb_uint8(image, name: str) -> np.ndarray:
    """[H, W], [H, W, 1|3|4] float in [0, 1] or integer in [0, 255] -> C-contiguous uint8 RGB."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an RGB image [H, W, 3] (grey [H, W, 1] and RGBA "
                         f"[H, W, 4] are accepted too), got shape {np.shape(image)}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{name}: image of size {a.shape[1]}x{a.shape[0]} is too small to hold "
                         f"a face")
    if a.dtype == np.uint8:
        pixels = a
    elif a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name}: image holds non-finite (NaN/inf) values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"{name}: float images must have values in [0, 1], got [{lo:.4g}, "
                             f"{hi:.4g}] (divide 0..255 values by 255)")
        pixels = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype.kind in "iu":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{name}: integer images must have values in 0..255, got "
                             f"[{a.min()}, {a.max()}] (convert 16-bit images to float in [0, 1])")
        pixels = a.astype(np.uint8)
    else:
        raise ValueError(f"{name}: expected a float image in [0, 1] or uint8, got dtype {a.dtype}")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _face_mesh_module(file_hint: str = LANDMARK_FILE_HINT):
    """mediapipe's legacy face-mesh solution, imported on first use (quietly)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import mediapipe as mp
    except ImportError as exc:
        raise ImportError(f"face detection needs mediapipe, which is not installed: "
                          f"{_INSTALL}, or {file_hint}") from exc
    try:
        return mp.solutions.face_mesh
    except AttributeError as exc:  # mediapipe builds without the legacy solutions
        raise ImportError(f"this mediapipe ({getattr(mp, '__version__', '?')}) has no "
                          f"solutions.face_mesh; dhjax is tested with mediapipe 0.10.14: "
                          f"{_INSTALL}, or {file_hint}") from exc


def detect(image, *, name: str = "image", min_confidence: float = 0.5,
           file_hint: str | None = None, iris: bool = False) -> Landmarks:
    """Finds one face and its landmarks with mediapipe's face mesh (offline, CPU).

    Args:
      image: [H, W, 3] RGB, float in [0, 1] or uint8 (grey [H, W(, 1)] and RGBA are accepted;
        alpha is ignored).
      name: how error messages name the image (e.g. its path).
      min_confidence: mediapipe's minimum face-detection confidence, in [0, 1].
      file_hint: how the caller's user gives landmark files instead, ending the messages of
        NoFaceError and ImportError after "or " (e.g. "give the landmarks as a file:
        --landmarks=..."); None = `LANDMARK_FILE_HINT` (the flags of experiments.track and
        experiments.mica_predict, and `landmarks_for_image`'s landmarks_path).
      iris: run mediapipe's refined mesh (refine_landmarks=True: refined eyes and lips, plus
        the ten iris points 468-477, kept in `iris`); False: the plain 468-point mesh.

    Returns:
      Landmarks with source 'mediapipe': 51 points, iBUG 17..67 (face-mesh points
      `MEDIAPIPE_INDICES`), dense [468, 2] and with iris=True iris [10, 2], all in pixels. With
      several faces in the image mediapipe picks one.

    Raises:
      NoFaceError: no face found (the message names the image).
      ValueError: wrong image shape or dtype, non-finite values, floats outside [0, 1].
      ImportError: mediapipe is missing (says how to install it, or to pass a landmark file).
    """
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise ValueError(f"min_confidence: expected a value in [0, 1], got {min_confidence!r}")
    hint = LANDMARK_FILE_HINT if file_hint is None else file_hint
    rgb = _rgb_uint8(image, name)
    h, w = rgb.shape[:2]
    face_mesh = _face_mesh_module(hint)
    with warnings.catch_warnings():
        # protobuf >= 4 warns on every call of the legacy solution API
        warnings.filterwarnings("ignore", message=r"SymbolDatabase\.GetPrototype\(\) is deprecated")
        with face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=bool(iris),
                                min_detection_confidence=float(min_confidence)) as mesh:
            result = mesh.process(rgb)
    faces = result.multi_face_landmarks
    if not faces:
        raise NoFaceError(
            f"{name}: no face found by mediapipe's face mesh (min_confidence={min_confidence}); "
            f"use a photo with a clearly visible, roughly frontal face, or {hint}")
    uv = np.array([(p.x, p.y) for p in faces[0].landmark], dtype=np.float64)
    n = N_MEDIAPIPE_IRIS if iris else N_MEDIAPIPE
    if uv.shape[0] < n:
        raise RuntimeError(f"{name}: mediapipe returned {uv.shape[0]} points with refine_landmarks="
                           f"{bool(iris)}, expected {n}")
    pixels = uv[:n] * np.array([w, h]) - 0.5
    return from_mediapipe(pixels, source="mediapipe")


def landmarks_for_image(image, *, path=None, landmarks_path=None) -> Landmarks:
    """The landmarks of one image: read from `landmarks_path` when given, else detected.

    Args:
      image: [H, W, C] image (float in [0, 1] or uint8); with `landmarks_path` only its size is
        used (to reject landmarks far outside it), and it may be None.
      path: the image's file, used to name it in error messages.
      landmarks_path: a landmark file for this image (see `load`); it must hold one set.

    Returns:
      Landmarks (source 'file' or 'mediapipe').
    """
    if landmarks_path is not None:
        size = None
        if image is not None:
            shape = np.shape(image)
            if len(shape) not in (2, 3):
                raise ValueError(f"{path or 'image'}: expected an image [H, W, C], got shape "
                                 f"{shape}")
            size = (shape[1], shape[0])
        lm = load(landmarks_path, image_size=size)
        if isinstance(lm, list):
            if len(lm) != 1:
                raise ValueError(f"{landmarks_path}: holds {len(lm)} landmark sets (one per video "
                                 f"frame); an image needs a file with one set [N, 2]")
            lm = lm[0]
        return lm
    if image is None:
        raise ValueError("landmarks_for_image: give an image to detect in, or landmarks_path")
    return detect(image, name=str(path) if path is not None else "image")


# ----------------------------------------------------------------------------------------------
# Uses.


def five_points(lm: Landmarks) -> np.ndarray:
    """ArcFace's five points (see `dhjax.capture.align`) from landmarks with iBUG ids.

    Image-left eye centre (mean of iBUG 36..41), image-right eye centre (42..47), nose tip (30),
    image-left mouth corner (48), image-right mouth corner (54): the same as
    `align.five_points_from_68` on the full 68.

    Args:
      lm: Landmarks holding at least iBUG points 30, 36..48 and 54 (all 68-point and
        mediapipe-derived landmarks do).

    Returns:
      [5, 2] float32 pixels in `align.ARCFACE_TEMPLATE` order.
    """
    if not isinstance(lm, Landmarks):
        raise TypeError(f"five_points: expected Landmarks, got {type(lm).__name__}")
    where = {int(i): k for k, i in enumerate(lm.ibug_ids)}
    missing = [i for i in _FIVE_IDS if i not in where]
    if missing:
        raise ValueError(f"five_points: the landmarks (source '{lm.source}', {len(lm)} points) "
                         f"lack iBUG point(s) {missing}; eye centres need 36..47, the nose tip 30 "
                         f"and the mouth corners 48 and 54")
    p = lm.points.astype(np.float64)

    def at(ids):
        return p[[where[i] for i in ids]]

    out = np.stack([at(_LEFT_EYE).mean(0), at(_RIGHT_EYE).mean(0), at([_NOSE_TIP])[0],
                    at([_MOUTH_LEFT])[0], at([_MOUTH_RIGHT])[0]])
    return out.astype(np.float32)


def draw(image, lm: Landmarks, *, color=(0.0, 1.0, 0.0), radius: float = 2) -> np.ndarray:
    """An overlay: a copy of the image with a filled dot on every landmark (numpy only).

    Args:
      image: [H, W, C] (C = 1, 3 or 4) or [H, W], float in [0, 1] or uint8; not modified.
      lm: the landmarks (their `points`; `dense` is not drawn).
      color: RGB in [0, 1].
      radius: dot radius in pixels (>= 0); every pixel whose centre lies within
        max(radius, 0.5) of a point is painted, so radius 0 marks the nearest pixel(s).

    Returns:
      [H, W, 3] float32 in [0, 1] ([H, W, 4] for RGBA input, dots opaque). Points outside the
      image are skipped.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"draw: expected an image [H, W, C] with C in (1, 3, 4), got shape "
                         f"{np.shape(image)}")
    if a.dtype == np.uint8:
        out = a.astype(np.float32) / 255.0
    elif a.dtype.kind == "f":
        out = a.astype(np.float32)  # a copy
    else:
        raise ValueError(f"draw: expected a float image in [0, 1] or uint8, got dtype {a.dtype}")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    color = np.asarray(color, dtype=np.float32)
    if color.shape != (3,) or not np.all((color >= 0) & (color <= 1)):
        raise ValueError(f"draw: color must be 3 values (R, G, B) in [0, 1], got {color.tolist()}")
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"draw: radius must be >= 0 pixels, got {radius!r}")
    if not isinstance(lm, Landmarks):
        raise TypeError(f"draw: expected Landmarks, got {type(lm).__name__}")
    h, w = out.shape[:2]
    r = max(float(radius), 0.5)
    for x, y in lm.points.astype(np.float64):
        j0, j1 = max(int(np.ceil(x - r)), 0), min(int(np.floor(x + r)), w - 1)
        i0, i1 = max(int(np.ceil(y - r)), 0), min(int(np.floor(y + r)), h - 1)
        if j0 > j1 or i0 > i1:
            continue
        ii, jj = np.mgrid[i0:i1 + 1, j0:j1 + 1]
        disc = (jj - x) ** 2 + (ii - y) ** 2 <= r * r
        block = out[i0:i1 + 1, j0:j1 + 1]
        block[disc, :3] = color
        if out.shape[2] == 4:
            block[disc, 3] = 1.0
    return out
