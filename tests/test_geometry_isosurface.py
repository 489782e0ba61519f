"""Tetrahedral lattice and marching tetrahedra (dhjax.geometry.isosurface)."""

import numpy as np
import pytest

from dhjax.geometry import isosurface as iso


def _edge_use(faces):
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return counts


def _signed_volume(v, f):
    p = v[f]
    return np.einsum("ij,ij->i", p[:, 0], np.cross(p[:, 1], p[:, 2])).sum() / 6.0


def test_cube_tets_fill_the_box_positively():
    shape = (4, 3, 5)
    nodes = iso.lattice_nodes(shape, (0.1, -0.2, 0.3), 0.5)
    tets = iso.cube_tets(iso.all_cells(shape), shape)
    p = nodes[tets]
    vol = np.einsum("ij,ij->i", p[:, 1] - p[:, 0], np.cross(p[:, 2] - p[:, 0], p[:, 3] - p[:, 0])) / 6
    assert (vol > 0).all()
    np.testing.assert_allclose(vol.sum(), 3 * 2 * 4 * 0.5 ** 3, rtol=1e-12)
    # conforming: every interior triangle is shared by exactly two tetrahedra, boundary ones by one
    tris = np.sort(np.concatenate([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]],
                                   tets[:, [1, 2, 3]]]), axis=1)
    _, counts = np.unique(tris, axis=0, return_counts=True)
    assert set(counts) == {1, 2}
    n_boundary = (counts == 1).sum()
    assert n_boundary == 2 * 2 * (3 * 2 + 3 * 4 + 2 * 4)   # two triangles per boundary square


@pytest.mark.parametrize("spacing", [0.1, 0.05])
def test_sphere_is_watertight_outward_and_accurate(spacing):
    r = 0.7
    v, f = iso.extract_surface(lambda p: np.linalg.norm(p, axis=1) - r, [-r] * 3, [r] * 3, spacing)
    assert (_edge_use(f) == 2).all()                   # closed 2-manifold
    assert f.max() == v.shape[0] - 1 and np.unique(f).size == v.shape[0]
    # Linear interpolation of |p| - r along a lattice edge (length <= sqrt(3) h) lands inside
    # the sphere by at most the sagitta of that chord, L^2 / (8 r).
    d = np.linalg.norm(v, axis=1) - r
    assert d.max() <= 1e-12 and d.min() >= -(3 * spacing ** 2) / (8 * r)
    vol = _signed_volume(v, f)
    # Piecewise-linear interpolation of a convex surface lies inside it; the error is O(h^2).
    exact = 4 / 3 * np.pi * r ** 3
    assert 0 < exact - vol < 3.0 * (spacing / r) ** 2 * exact
    # Euler characteristic of a sphere
    n_edges = f.shape[0] * 3 // 2
    assert v.shape[0] - n_edges + f.shape[0] == 2


def test_torus_genus_one_and_open_box_rejected():
    R, r = 0.5, 0.2
    def torus(p):
        q = np.linalg.norm(p[:, [0, 2]], axis=1) - R
        return np.hypot(q, p[:, 1]) - r
    v, f = iso.extract_surface(torus, [-0.7, -0.2, -0.7], [0.7, 0.2, 0.7], 0.04)
    assert (_edge_use(f) == 2).all()
    assert v.shape[0] - f.shape[0] * 3 // 2 + f.shape[0] == 0
    np.testing.assert_allclose(_signed_volume(v, f), 2 * np.pi ** 2 * R * r ** 2, rtol=0.03)
    with pytest.raises(ValueError, match="box boundary"):
        iso.extract_surface(lambda p: p[:, 0], [-1] * 3, [1] * 3, 0.5, )
    with pytest.raises(ValueError, match="non-finite"):
        iso.marching_tetrahedra(np.array([np.nan, 1, 1, 1.0]), np.eye(4, 3), np.array([[0, 1, 2, 3]]))
