"""File import/export (the I/O floor): FLAME model files, meshes, images/videos, parameter sets.

Plain numpy and file handling only; nothing here imports dhjax.models, dhjax.render or other
higher floors. Lengths are in metres.
"""

from dhjax.io._common import existing_file, read_npz
from dhjax.io.flame_files import (
    FLAME_KEYS,
    N_JOINTS,
    load_flame_arrays,
    load_flame_uv,
    load_landmark_embedding,
    save_flame_npz,
)
from dhjax.io.gaussians import load_gaussians_ply, save_gaussians_ply
from dhjax.io.image import IMAGE_SUFFIXES, check_fps, image_grid, load_image, load_video, save_image, save_video
from dhjax.io.mesh import load_mesh, save_obj, save_ply
from dhjax.io.params import load_params, params_paths, save_params

__all__ = [
    "existing_file",
    "read_npz",
    "save_gaussians_ply",
    "load_gaussians_ply",
    "FLAME_KEYS",
    "N_JOINTS",
    "load_flame_arrays",
    "save_flame_npz",
    "load_landmark_embedding",
    "load_flame_uv",
    "save_obj",
    "load_mesh",
    "save_ply",
    "save_image",
    "load_image",
    "save_video",
    "check_fps",
    "load_video",
    "image_grid",
    "IMAGE_SUFFIXES",
    "save_params",
    "load_params",
    "params_paths",
]
