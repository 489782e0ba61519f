"""Landmark schemes of other tools and files: the iBUG-68 order and mediapipe's face mesh.

Tables only (numpy, no behaviour), kept on the io floor because both the head model
(`dhjax.models.head_default`, which embeds points of both schemes) and the landmark code
(`dhjax.capture.landmarks`, which reads and detects them) refer to them.

* iBUG-68 (the 300-W order, as FLAME's landmark embedding): `N_IBUG` points named
  `LANDMARK68_NAMES` (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, lips 48-67).
* mediapipe face mesh: `N_MEDIAPIPE` points (`N_MEDIAPIPE_IRIS` with the ten iris points of
  ``refine_landmarks=True``). `MEDIAPIPE_INDICES[k]` is the face-mesh index of the point that lies
  where iBUG point `MEDIAPIPE_TO_IBUG[k]` lies (the correspondence of common 68 <-> 468
  conversions); the face mesh has no counterpart of the 17 jaw-contour points, so k covers the 51
  inner points 17..67 (FLAME's "static" landmarks).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "N_IBUG",
    "LANDMARK68_NAMES",
    "N_MEDIAPIPE",
    "N_MEDIAPIPE_IRIS",
    "MEDIAPIPE_TO_IBUG",
    "MEDIAPIPE_INDICES",
]

N_IBUG = 68
# The 68-point iBUG landmark order, as used by FLAME's landmark embedding.
LANDMARK68_NAMES = (
    [f"jaw_{i}" for i in range(17)]
    + [f"right_brow_{i}" for i in range(5)] + [f"left_brow_{i}" for i in range(5)]
    + [f"nose_bridge_{i}" for i in range(4)] + [f"nostril_{i}" for i in range(5)]
    + [f"right_eye_{i}" for i in range(6)] + [f"left_eye_{i}" for i in range(6)]
    + [f"outer_lip_{i}" for i in range(12)] + [f"inner_lip_{i}" for i in range(8)])

N_MEDIAPIPE = 468
N_MEDIAPIPE_IRIS = 478  # face mesh with refine_landmarks=True: the 468 plus 10 iris points

# Mediapipe face-mesh indices of the landmarks that coincide with iBUG-68 points, in the order of
# the iBUG index they stand for: MEDIAPIPE_INDICES[k] lies where iBUG point MEDIAPIPE_TO_IBUG[k]
# lies.
MEDIAPIPE_TO_IBUG = np.arange(17, 68)   # the 51 inner points (no jaw contour), as FLAME's static set
MEDIAPIPE_INDICES = np.array([
    # right brow 17-21, left brow 22-26
    46, 53, 52, 65, 55, 285, 295, 282, 283, 276,
    # nose bridge 27-30, nostrils 31-35
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    # right eye 36-41
    33, 160, 158, 133, 153, 144,
    # left eye 42-47
    362, 385, 387, 263, 373, 380,
    # outer lip 48-59
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    # inner lip 60-67
    78, 82, 13, 312, 308, 317, 14, 87,
], dtype=np.int32)
