"""Triangle mesh files: OBJ writing (with UV seams), generic loading and PLY export.

OBJ text is written here directly so that UV coordinates can have their own index list (FLAME's
UV layout has seams: T > V texture coordinates, ``f v/vt`` corners). Reading and PLY writing go
through trimesh with ``process=False`` so the vertex order of the file is kept. Positions are in
metres.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dhjax.io._common import existing_file

__all__ = ["save_obj", "load_mesh", "save_ply"]


def _array(value, name: str, ndim_last: int | None, dtype) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2 or (ndim_last is not None and array.shape[1] != ndim_last):
        raise ValueError(f"{name} must have shape [N, {ndim_last}], got {array.shape}")
    return array.astype(dtype)


def _check_indices(faces: np.ndarray, count: int, name: str, target: str) -> None:
    if faces.size and (faces.min() < 0 or faces.max() >= count):
        raise ValueError(f"{name} holds indices outside [0, {count}) of {target}")


def _colors_to_float(colors: np.ndarray) -> np.ndarray:
    if colors.dtype == np.uint8:
        return colors.astype(np.float64) / 255.0
    return np.clip(colors.astype(np.float64), 0.0, 1.0)


def save_obj(
    path: str | os.PathLike,
    vertices,
    faces,
    *,
    uv_coords=None,
    uv_faces=None,
    vertex_colors=None,
    normals=None,
) -> Path:
    """Write a triangle mesh as Wavefront OBJ text.

    Args:
      path: output file; parent folders are created.
      vertices: [V, 3] positions, metres.
      faces: [F, 3] 0-based vertex indices (written 1-based).
      uv_coords: optional [T, 2] texture coordinates (``vt`` lines); needs ``uv_faces``.
      uv_faces: optional [F, 3] 0-based indices into uv_coords, one per face corner, so that a
        vertex can have several UVs along a seam (``f v/vt`` corners).
      vertex_colors: optional [V, 3] RGB, float in [0, 1] (clipped) or uint8; written as
        ``v x y z r g b`` (floats in [0, 1]), which trimesh and MeshLab read.
      normals: optional [V, 3] per-vertex normals (``vn`` lines, corner form ``v/vt/vn`` or
        ``v//vn`` with the normal index equal to the vertex index).

    Returns:
      the path written.
    """
    verts = _array(vertices, "vertices", 3, np.float64)
    tris = _array(faces, "faces", 3, np.int64)
    _check_indices(tris, len(verts), "faces", "vertices")
    if (uv_coords is None) != (uv_faces is None):
        raise ValueError("uv_coords and uv_faces must be given together")
    uv = uvf = None
    if uv_coords is not None:
        uv = _array(uv_coords, "uv_coords", 2, np.float64)
        uvf = _array(uv_faces, "uv_faces", 3, np.int64)
        if uvf.shape != tris.shape:
            raise ValueError(f"uv_faces must have the shape of faces {tris.shape}, got {uvf.shape}")
        _check_indices(uvf, len(uv), "uv_faces", "uv_coords")
    colors = None
    if vertex_colors is not None:
        colors = _colors_to_float(_array(vertex_colors, "vertex_colors", 3, np.asarray(vertex_colors).dtype))
        if len(colors) != len(verts):
            raise ValueError(f"vertex_colors must have shape [{len(verts)}, 3], got {colors.shape}")
    norms = None
    if normals is not None:
        norms = _array(normals, "normals", 3, np.float64)
        if len(norms) != len(verts):
            raise ValueError(f"normals must have shape [{len(verts)}, 3], got {norms.shape}")

    lines = ["# written by dhjax.io.mesh.save_obj"]
    if colors is None:
        lines += [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in verts]
    else:
        lines += [f"v {x:.9g} {y:.9g} {z:.9g} {r:.6g} {g:.6g} {b:.6g}"
                  for (x, y, z), (r, g, b) in zip(verts, colors)]
    if uv is not None:
        lines += [f"vt {u:.9g} {v:.9g}" for u, v in uv]
    if norms is not None:
        lines += [f"vn {x:.9g} {y:.9g} {z:.9g}" for x, y, z in norms]
    one = tris + 1
    if uv is None and norms is None:
        lines += [f"f {a} {b} {c}" for a, b, c in one]
    else:
        uv_one = uvf + 1 if uv is not None else None
        for i, corners in enumerate(one):
            parts = []
            for k, v_idx in enumerate(corners):
                t_idx = "" if uv_one is None else str(uv_one[i, k])
                parts.append(f"{v_idx}/{t_idx}/{v_idx}" if norms is not None else f"{v_idx}/{t_idx}")
            lines.append("f " + " ".join(parts))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (OBJ, PLY, STL, OFF, GLB, ... as trimesh supports) keeping vertex order.

    Loaded with ``process=False`` (no merging or reordering); for OBJ files with UV seams the
    geometric vertices are returned in file order (not split per UV). Polygons are triangulated by
    trimesh. Scenes with several meshes are concatenated.

    Args:
      path: mesh file.

    Returns:
      (vertices [V, 3] float32 in the file's units (metres for dhjax files), faces [F, 3] int32).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: trimesh cannot read the file, or it holds no triangles.
    """
    import trimesh

    path = existing_file(path)
    kwargs = {"maintain_order": True} if path.suffix.lower() == ".obj" else {}
    try:
        mesh = trimesh.load(str(path), process=False, force="mesh", **kwargs)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read mesh ({type(exc).__name__}: {exc})") from exc
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), np.float32)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), np.int32)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or not len(faces):
        raise ValueError(f"{path}: no triangle mesh found (vertices {vertices.shape}, faces {faces.shape})")
    return vertices, faces


def save_ply(path: str | os.PathLike, vertices, faces, vertex_colors=None) -> Path:
    """Write a triangle mesh as binary PLY through trimesh, keeping vertex order.

    Args:
      path: output file; parent folders are created.
      vertices: [V, 3] positions, metres.
      faces: [F, 3] 0-based vertex indices.
      vertex_colors: optional [V, 3] or [V, 4], float in [0, 1] (clipped, rounded to uint8) or uint8.

    Returns:
      the path written.
    """
    import trimesh

    verts = _array(vertices, "vertices", 3, np.float64)
    tris = _array(faces, "faces", 3, np.int64)
    _check_indices(tris, len(verts), "faces", "vertices")
    colors = None
    if vertex_colors is not None:
        raw = np.asarray(vertex_colors)
        if raw.ndim != 2 or raw.shape[1] not in (3, 4) or len(raw) != len(verts):
            raise ValueError(f"vertex_colors must have shape [{len(verts)}, 3 or 4], got {raw.shape}")
        colors = raw if raw.dtype == np.uint8 else np.round(_colors_to_float(raw) * 255.0).astype(np.uint8)
    mesh = trimesh.Trimesh(vertices=verts, faces=tris, vertex_colors=colors, process=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(str(path), file_type="ply")
    return path
