"""Regular tetrahedral lattices and marching tetrahedra, in numpy (build-time geometry).

A box of grid nodes is cut into cubes and every cube into the six tetrahedra of its
Freudenthal (Kuhn) split: tetrahedron `p` of a cube runs 000 -> e_a -> e_a + e_b -> 111 for the
axis permutation (a, b, c) = `_PERMS[p]`. Neighbouring cubes then split their shared square
along the same diagonal, so the tetrahedra form a conforming mesh (every interior triangle is
shared by exactly two tetrahedra) with no ambiguous cases.

`marching_tetrahedra` extracts the zero level of a scalar field sampled on that lattice
(negative inside). Because the lattice conforms, the surface is watertight and 2-manifold
(every edge in exactly two triangles) wherever the zero level stays inside the box; values
within `snap` of zero are pushed off it first so no triangle degenerates to a point.

Used for the procedural body (`dhjax.models.body_default`) and the tetrahedral cages
(`dhjax.geometry.tetra`). Units follow the inputs (metres in dhjax).
"""

from __future__ import annotations

import itertools

import numpy as np

# Axis permutations of the six tetrahedra of a cube (Freudenthal split).
_PERMS = tuple(itertools.permutations(range(3)))


def lattice_nodes(shape, origin, spacing) -> np.ndarray:
    """Positions of the nodes of a regular grid.

    Args:
      shape: (nx, ny, nz) nodes per axis; origin: [3] position of node (0, 0, 0);
      spacing: scalar or [3] distance between neighbouring nodes.
    Returns:
      [nx * ny * nz, 3] float64, node (i, j, k) at row (i * ny + j) * nz + k.
    """
    nx, ny, nz = (int(s) for s in shape)
    h = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    g = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), -1)
    return np.asarray(origin, np.float64) + g.reshape(-1, 3) * h


def cube_tets(cells, shape) -> np.ndarray:
    """The six tetrahedra of each of the given cubes, positively oriented.

    Args:
      cells: [C, 3] int cube indices (i, j, k), each < shape - 1; shape: grid nodes per axis.
    Returns:
      [C * 6, 4] int64 node indices (row-major numbering of `lattice_nodes`); tetrahedron
      6 c + p is the p-th tetrahedron of cells[c]. Every tetrahedron has positive signed volume
      det[x1 - x0, x2 - x0, x3 - x0] > 0.
    """
    cells = np.asarray(cells, np.int64).reshape(-1, 3)
    nx, ny, nz = (int(s) for s in shape)
    stride = np.array([ny * nz, nz, 1], np.int64)
    base = cells @ stride                                                     # [C]
    out = np.empty((cells.shape[0], 6, 4), np.int64)
    for p, perm in enumerate(_PERMS):
        corner = np.zeros(3, np.int64)
        path = [0]
        for axis in perm:
            corner = corner.copy()
            corner[axis] = 1
            path.append(int(corner @ stride))
        # Parity of the permutation sets the orientation; swap two nodes of the odd ones.
        odd = sum(1 for i in range(3) for j in range(i + 1, 3) if perm[i] > perm[j]) % 2
        if odd:
            path[1], path[2] = path[2], path[1]
        out[:, p] = base[:, None] + np.asarray(path, np.int64)
    return out.reshape(-1, 4)


def all_cells(shape) -> np.ndarray:
    """[C, 3] indices of every cube of a grid with `shape` nodes per axis."""
    nx, ny, nz = (int(s) for s in shape)
    g = np.stack(np.meshgrid(np.arange(nx - 1), np.arange(ny - 1), np.arange(nz - 1), indexing="ij"), -1)
    return g.reshape(-1, 3)


def grid_for_box(lo, hi, spacing, pad: int = 2):
    """A grid covering the box [lo, hi] with `pad` extra nodes on every side.

    Returns (shape (nx, ny, nz), origin [3]) for `lattice_nodes`.
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if np.any(hi < lo) or not np.isfinite(lo).all() or not np.isfinite(hi).all():
        raise ValueError(f"bad box lo={lo} hi={hi}")
    if not spacing > 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    n = np.ceil((hi - lo) / spacing).astype(int) + 1 + 2 * pad
    return tuple(int(x) for x in n), lo - pad * spacing


# For a tetrahedron with inside-mask bits (bit i = node i inside), the surface triangles as
# triples of tetrahedron edges (edge e joins _EDGES[e]); orientation is fixed afterwards.
_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _edge_id(a, b):
    return _EDGES.index((min(a, b), max(a, b)))


def _case_table():
    table = []
    for mask in range(16):
        inside = [i for i in range(4) if mask >> i & 1]
        outside = [i for i in range(4) if not mask >> i & 1]
        if len(inside) in (0, 4):
            table.append(())
        elif len(inside) in (1, 3):
            lone = inside[0] if len(inside) == 1 else outside[0]
            others = [i for i in range(4) if i != lone]
            table.append(((_edge_id(lone, others[0]), _edge_id(lone, others[1]), _edge_id(lone, others[2])),))
        else:
            (a, b), (c, d) = inside, outside
            # Quad a-c, a-d, b-d, b-c (a cycle around the cut), split into two triangles.
            q = (_edge_id(a, c), _edge_id(a, d), _edge_id(b, d), _edge_id(b, c))
            table.append(((q[0], q[1], q[2]), (q[0], q[2], q[3])))
    return table


_CASES = _case_table()


def marching_tetrahedra(values, nodes, tets, snap: float = 1e-3):
    """The zero level set of a field on a tetrahedral mesh, as a triangle mesh.

    Args:
      values: [N] field at the nodes, negative inside; nodes: [N, 3] positions; tets: [M, 4]
        node indices of a conforming tetrahedral mesh (e.g. `cube_tets`).
      snap: values with |value| < snap * (the median change of the field along a tetrahedron
        edge) are pushed to +that amount (outside), so no surface vertex sits on a node; 0 keeps
        the values (then none may be exactly 0).
    Returns:
      (vertices [V, 3] float64, faces [F, 3] int64) with faces oriented outwards (normals
      pointing to increasing values), and `edge_nodes` [V, 2]: the lattice edge each vertex
      lies on. Empty arrays when the field does not change sign.
    """
    values = np.asarray(values, np.float64).copy()
    nodes = np.asarray(nodes, np.float64)
    tets = np.asarray(tets, np.int64)
    if values.shape != (nodes.shape[0],):
        raise ValueError(f"values must be [{nodes.shape[0]}], got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("values hold non-finite entries")
    scale = np.median(np.abs(np.diff(values[tets[:, :2]], axis=1))) if tets.size else 1.0
    eps = snap * max(float(scale), 1e-12)
    small = np.abs(values) < eps
    values[small] = eps
    if not snap and (values == 0).any():
        raise ValueError("values hold exact zeros; pass snap > 0")
    tv = values[tets]                                                         # [M, 4]
    inside = tv < 0
    mask = (inside * (1 << np.arange(4))).sum(1)
    active = (mask != 0) & (mask != 15)
    tets, tv, mask = tets[active], tv[active], mask[active]
    tri_tet, tri_edges = [], []
    for m in range(1, 15):
        sel = np.nonzero(mask == m)[0]
        for tri in _CASES[m]:
            tri_tet.append(sel)
            tri_edges.append(np.broadcast_to(np.asarray(tri), (sel.size, 3)))
    if not tri_tet:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64), np.zeros((0, 2), np.int64)
    tri_tet = np.concatenate(tri_tet)
    tri_edges = np.concatenate(tri_edges)                                     # [T, 3] edge ids
    e = np.asarray(_EDGES)
    ea = tets[tri_tet[:, None], e[tri_edges, 0]]                              # [T, 3] node a
    eb = tets[tri_tet[:, None], e[tri_edges, 1]]
    lo, hi = np.minimum(ea, eb), np.maximum(ea, eb)
    keys = lo * nodes.shape[0] + hi
    uniq, inv = np.unique(keys.ravel(), return_inverse=True)
    edge_nodes = np.stack([uniq // nodes.shape[0], uniq % nodes.shape[0]], 1)
    va, vb = values[edge_nodes[:, 0]], values[edge_nodes[:, 1]]
    s = va / (va - vb)
    verts = nodes[edge_nodes[:, 0]] + s[:, None] * (nodes[edge_nodes[:, 1]] - nodes[edge_nodes[:, 0]])
    faces = inv.reshape(-1, 3)
    # Orient outwards: along the direction from the tetrahedron's inside nodes to its outside ones.
    tp = nodes[tets[tri_tet]]                                                 # [T, 4, 3]
    ins = inside[active][tri_tet][..., None]
    d = (tp * ~ins).sum(1) / np.maximum((~ins).sum(1), 1) - (tp * ins).sum(1) / np.maximum(ins.sum(1), 1)
    p = verts[faces]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    flip = (n * d).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]
    return verts, faces, edge_nodes


def field_on_grid(fn, shape, origin, spacing, chunk: int = 1 << 18) -> np.ndarray:
    """fn([N, 3] positions) -> [N] evaluated on every node of a grid, in chunks."""
    pts = lattice_nodes(shape, origin, spacing)
    out = np.empty(pts.shape[0], np.float64)
    for i in range(0, pts.shape[0], chunk):
        out[i:i + chunk] = fn(pts[i:i + chunk])
    return out


def crossing_cells(values, shape) -> np.ndarray:
    """[C, 3] indices of the cubes whose eight corner values change sign (negative inside)."""
    nx, ny, nz = (int(s) for s in shape)
    v = np.asarray(values).reshape(nx, ny, nz)
    corners = [v[i:nx - 1 + i, j:ny - 1 + j, k:nz - 1 + k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    lo = np.minimum.reduce(corners)
    hi = np.maximum.reduce(corners)
    return np.argwhere((lo < 0) & (hi >= 0))


def extract_surface(fn, lo, hi, spacing, snap: float = 1e-3):
    """The zero level of a field fn([N, 3]) -> [N] (negative inside) within the box [lo, hi].

    Only the cubes that straddle the level are split, so a fine grid stays cheap. Values within
    snap * spacing of zero are pushed to +snap * spacing first (a distance-like field moves
    its level by at most that).
    Returns (vertices [V, 3], faces [F, 3]) float64 / int64, watertight when the level set is
    closed inside the box.
    """
    shape, origin = grid_for_box(lo, hi, spacing)
    values = field_on_grid(fn, shape, origin, spacing)
    # Snap before choosing the cubes: a tiny negative corner pushed outside can make a cube of
    # otherwise inside corners straddle the level (marching_tetrahedra then snaps nothing more).
    eps = snap * spacing
    values = np.where(np.abs(values) < eps, eps, values)
    if values.reshape(shape)[[0, -1]].min() < 0 or values.reshape(shape)[:, [0, -1]].min() < 0 \
            or values.reshape(shape)[:, :, [0, -1]].min() < 0:
        raise ValueError("the field is negative on the box boundary: the surface would be open")
    cells = crossing_cells(values, shape)
    tets = cube_tets(cells, shape)
    used, local = np.unique(tets, return_inverse=True)
    nodes = lattice_nodes(shape, origin, spacing)[used]
    verts, faces, _ = marching_tetrahedra(values[used], nodes, local.reshape(-1, 4), snap=0.0)
    return verts, faces
