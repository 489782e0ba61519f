"""Tests for dhjax.io.mesh: OBJ/PLY writing and order-preserving loading."""

import numpy as np
import pytest

from dhjax.io.flame_files import load_flame_uv
from dhjax.io.mesh import load_mesh, save_obj, save_ply


def random_mesh(seed=0, n_verts=30, n_faces=40):
    rng = np.random.default_rng(seed)
    vertices = rng.normal(scale=0.1, size=(n_verts, 3)).astype(np.float32)  # metres
    faces = np.stack([rng.choice(n_verts, 3, replace=False) for _ in range(n_faces)]).astype(np.int32)
    return vertices, faces


def seam_uv(faces, seed=0):
    """A UV layout with more texture coordinates than vertices (every corner its own vt)."""
    rng = np.random.default_rng(seed)
    uv = rng.uniform(size=(faces.size, 2)).astype(np.float32)
    uv_faces = np.arange(faces.size, dtype=np.int32).reshape(faces.shape)
    return uv, uv_faces


def test_obj_round_trip_keeps_order_and_values(tmp_path):
    vertices, faces = random_mesh()
    path = save_obj(tmp_path / "out" / "mesh.obj", vertices, faces)
    loaded_v, loaded_f = load_mesh(path)
    assert loaded_v.dtype == np.float32 and loaded_f.dtype == np.int32
    np.testing.assert_array_equal(loaded_v, vertices)  # 9 significant digits: exact for float32
    np.testing.assert_array_equal(loaded_f, faces)


def test_obj_with_uv_seams(tmp_path):
    vertices, faces = random_mesh(1)
    uv, uv_faces = seam_uv(faces)
    path = save_obj(tmp_path / "head.obj", vertices, faces, uv_coords=uv, uv_faces=uv_faces)
    text = path.read_text()
    assert text.count("\nvt ") == len(uv)
    # UV layout parsed back by the FLAME UV reader.
    uv2, uv_faces2 = load_flame_uv(path)
    np.testing.assert_array_equal(uv2, uv)
    np.testing.assert_array_equal(uv_faces2, uv_faces)
    # Geometry keeps V vertices in file order despite T > V texture coordinates.
    loaded_v, loaded_f = load_mesh(path)
    np.testing.assert_array_equal(loaded_v, vertices)
    np.testing.assert_array_equal(loaded_f, faces)


def test_trimesh_reads_obj_with_colors_and_normals(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    vertices, faces = random_mesh(2)
    colors = np.random.default_rng(2).uniform(size=vertices.shape)
    normals = np.tile([[0.0, 0.0, 1.0]], (len(vertices), 1))
    path = save_obj(tmp_path / "c.obj", vertices, faces, vertex_colors=colors, normals=normals)
    text = path.read_text()
    a, b, c = faces[0] + 1
    assert f"f {a}//{a} {b}//{b} {c}//{c}" in text
    mesh = trimesh.load(str(path), process=False, force="mesh", maintain_order=True)
    np.testing.assert_allclose(mesh.vertices, vertices, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(mesh.faces, faces)
    # trimesh stores colours as uint8: compare within half a quantisation step.
    np.testing.assert_allclose(mesh.visual.vertex_colors[:, :3] / 255.0, colors, atol=0.5 / 255 + 1e-6)


def test_obj_uv_and_normals_corner_form(tmp_path):
    vertices, faces = random_mesh(3, n_verts=5, n_faces=2)
    uv, uv_faces = seam_uv(faces)
    path = save_obj(tmp_path / "n.obj", vertices, faces, uv_coords=uv, uv_faces=uv_faces,
                    normals=np.ones_like(vertices))
    a, b, c = faces[1] + 1
    assert f"f {a}/4/{a} {b}/5/{b} {c}/6/{c}" in path.read_text()
    np.testing.assert_array_equal(load_flame_uv(path)[1], uv_faces)


def test_ply_round_trip_with_colors(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    vertices, faces = random_mesh(4)
    colors = np.random.default_rng(4).integers(0, 256, size=(len(vertices), 3)).astype(np.uint8)
    path = save_ply(tmp_path / "sub" / "m.ply", vertices, faces, vertex_colors=colors)
    loaded_v, loaded_f = load_mesh(path)
    np.testing.assert_array_equal(loaded_v, vertices)
    np.testing.assert_array_equal(loaded_f, faces)
    mesh = trimesh.load(str(path), process=False)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], colors)


def test_bad_inputs(tmp_path):
    vertices, faces = random_mesh(5)
    with pytest.raises(ValueError, match="faces holds indices"):
        save_obj(tmp_path / "x.obj", vertices, faces + len(vertices))
    with pytest.raises(ValueError, match="together"):
        save_obj(tmp_path / "x.obj", vertices, faces, uv_coords=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"vertices must have shape \[N, 3\]"):
        save_ply(tmp_path / "x.ply", vertices[:, :2], faces)
    with pytest.raises(FileNotFoundError, match="nothing.obj"):
        load_mesh(tmp_path / "nothing.obj")
    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"\x00\x01 not a mesh")
    with pytest.raises(ValueError, match="junk.ply"):
        load_mesh(junk)
