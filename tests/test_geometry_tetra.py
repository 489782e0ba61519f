"""Tetrahedral cages for D3GA (dhjax.geometry.tetra)."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import isosurface as iso
from dhjax.geometry import tetra
from dhjax.ops import closest_point


# ----------------------------------------------------------------------------------------------
# Shapes.


def _sphere_field(r):
    return lambda p: np.linalg.norm(p, axis=1) - r


def _torus_field(R, r):
    def f(p):
        q = np.linalg.norm(p[:, [0, 2]], axis=1) - R
        return np.hypot(q, p[:, 1]) - r
    return f


def _uv_hemisphere(R, n_lat, n_lon):
    """Open hemisphere z >= 0 of radius R (rim: the circle of radius R at z = 0), outward faces."""
    th = np.linspace(0, np.pi / 2, n_lat + 1)[1:]                      # polar angle of each ring
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    ring = np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    ring[-n_lon:, 2] = 0.0                                             # the rim exactly at z = 0
    v = R * np.concatenate([[[0, 0, 1.0]], ring])
    idx = lambda i, j: 1 + i * n_lon + j % n_lon
    faces = [(0, idx(0, j), idx(0, j + 1)) for j in range(n_lon)]
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j + 1), idx(i + 1, j)
            faces += [(a, d, c), (a, c, b)]
    return v, np.asarray(faces)


def _capsule_body(spacing=0.015):
    """A 1.7 m union of capsules (torso, neck, head, legs, arms, feet), extracted at `spacing`."""
    caps = [((0, 0, 0.95), (0, 0, 1.35), 0.14), ((0, 0, 1.45), (0, 0, 1.50), 0.06),
            ((0, 0, 1.58), (0, 0, 1.62), 0.10),
            ((-0.1, 0, 0.9), (-0.11, 0, 0.08), 0.065), ((0.1, 0, 0.9), (0.11, 0, 0.08), 0.065),
            ((-0.19, 0, 1.38), (-0.25, 0, 0.85), 0.045), ((0.19, 0, 1.38), (0.25, 0, 0.85), 0.045),
            ((-0.11, 0.05, 0.04), (-0.11, -0.12, 0.04), 0.04), ((0.11, 0.05, 0.04), (0.11, -0.12, 0.04), 0.04)]

    def field(p):
        out = np.full(p.shape[0], np.inf)
        for a, b, r in caps:
            a, b = np.asarray(a, float), np.asarray(b, float)
            t = np.clip((p - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
            out = np.minimum(out, np.linalg.norm(p - (a + t[:, None] * (b - a)), axis=1) - r)
        return out

    return iso.extract_surface(field, [-0.35, -0.2, -0.05], [0.35, 0.2, 1.75], spacing)


def _open_torso(R=0.16, H=0.6, n_theta=64, n_z=41):
    """A torso-sized open tube (elliptic cross-section 0.32 x 0.22 m, 0.6 m tall): a shirt."""
    th = np.linspace(0, 2 * np.pi, n_theta, endpoint=False)
    z = np.linspace(0.9, 0.9 + H, n_z)
    T, Z = np.meshgrid(th, z, indexing="ij")
    v = np.stack([R * np.cos(T), 0.7 * R * np.sin(T), Z], -1).reshape(-1, 3)
    i, j = np.arange(n_theta)[:, None], np.arange(n_z - 1)[None]
    a, b = i * n_z + j, ((i + 1) % n_theta) * n_z + j
    f = np.concatenate([np.stack([a, b, b + 1], -1).reshape(-1, 3), np.stack([a, b + 1, a + 1], -1).reshape(-1, 3)])
    return v, f


def _enclosed_volume(v, f):
    p = v[f]
    return np.einsum("ij,ij->i", p[:, 0], np.cross(p[:, 1], p[:, 2])).sum() / 6.0


def _sample_faces(rng, v, f, n):
    b = rng.dirichlet(np.ones(3), n)
    return (b[:, :, None] * v[f[rng.integers(0, f.shape[0], n)]]).sum(1)


def _check_valid(mesh):
    """Positive volumes, the quality rule, conformity, closed outward boundary; returns volume."""
    nodes, tets = mesh.nodes, mesh.tets
    assert tets.dtype == np.int32 and nodes.dtype == np.float64
    vol = tetra.tet_volumes(nodes, tets)
    assert (vol > 0).all() and not tetra.inverted_tets(nodes, tets).any()
    assert tetra.tet_quality(nodes, tets).min() >= tetra.MIN_QUALITY
    assert np.unique(tets).size == nodes.shape[0]                       # no unused nodes
    # conforming: every triangle in one (boundary) or two tetrahedra, never more
    tris = np.sort(np.concatenate([tets[:, list(f)] for f in tetra._TET_FACES]), axis=1)
    _, counts = np.unique(tris, axis=0, return_counts=True)
    assert set(counts) <= {1, 2}
    faces = tetra.surface_triangles(tets)
    # closed, consistently oriented boundary: every directed edge has its reverse (2-manifold
    # but for pinches where two parts of the region touch: then an edge is used 4 times)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    n = nodes.shape[0]
    np.testing.assert_array_equal(np.sort(e[:, 0] * n + e[:, 1]), np.sort(e[:, 1] * n + e[:, 0]))
    _, ecount = np.unique(np.sort(e, axis=1), axis=0, return_counts=True)
    assert (ecount % 2 == 0).all() and (ecount == 2).mean() > 0.999
    # divergence theorem: the tetrahedra fill exactly the volume their boundary encloses
    np.testing.assert_allclose(vol.sum(), _enclosed_volume(nodes, faces), rtol=1e-12)
    return vol.sum()


# ----------------------------------------------------------------------------------------------
# Cage construction.


@pytest.mark.parametrize("h", [0.06, 0.03])
def test_sphere_cage_volume_is_second_order(h):
    r = 0.3
    mesh = tetra.cage_from_field(_sphere_field(r), [-r] * 3, [r] * 3, h)
    vol = _check_valid(mesh)
    # Boundary vertices are cut points of lattice edges (length <= sqrt(3) h) or nodes warped
    # onto them: inside the sphere by at most the sagitta of such a chord, 3 h^2 / (8 r).
    bn = np.linalg.norm(mesh.nodes[np.unique(tetra.surface_triangles(mesh.tets))], axis=1) - r
    assert bn.max() <= 1e-12 and bn.min() >= -3 * h ** 2 / (8 * r)
    # The cage is a union of tetrahedra with corners in the ball, so it lies inside it; its
    # boundary lies within about that sagitta of the sphere, so the deficit is at most the area
    # times the depth: 4 pi r^2 3 h^2 / (8 r) = 1.125 (h / r)^2 of the volume (measured: 0.53).
    exact = 4 / 3 * np.pi * r ** 3
    assert 0 < exact - vol < 1.125 * (h / r) ** 2 * exact
    assert (exact - vol) / exact / (h / r) ** 2 == pytest.approx(0.53, abs=0.05)
    # O(1) lattice cubes: the index lists a bounded number of candidates per cube
    idx = mesh.index
    assert np.diff(idx.cell_start).max() <= 64
    st = tetra.cage_stats(mesh, 1.0)
    assert st["tets"] == mesh.tets.shape[0] and st["volume"] == pytest.approx(vol)
    assert st["median_quality"] == pytest.approx(0.657, abs=0.01) and st["build_s"] == 1.0


def test_torus_field_cage_matches_analytic_volume():
    R, r, h = 0.5, 0.2, 0.04
    mesh = tetra.cage_from_field(_torus_field(R, r), [-0.7, -0.2, -0.7], [0.7, 0.2, 0.7], h)
    vol = _check_valid(mesh)
    # The field is |.| - r around a circle: the boundary sags inside the tube by <= 3 h^2/(8 r),
    # over the torus area 4 pi^2 R r.
    exact = 2 * np.pi ** 2 * R * r ** 2
    assert 0 < exact - vol < 4 * np.pi ** 2 * R * r * 3 * h ** 2 / (8 * r)
    # genus one boundary: V - E + F = 0
    f = tetra.surface_triangles(mesh.tets)
    assert np.unique(f).size - f.shape[0] * 3 // 2 + f.shape[0] == 0


@pytest.mark.parametrize("alpha", [tetra.ALPHA_MIN, 0.25, tetra.ALPHA_MAX])
def test_random_blob_fields_keep_the_quality_rule(alpha):
    rng = np.random.default_rng(int(alpha * 100))
    for _ in range(3):
        c = rng.uniform(-0.5, 0.5, (6, 3))
        s = rng.uniform(0.1, 0.3, 6)
        fn = lambda p: 0.5 - np.exp(-((p[:, None] - c) ** 2).sum(-1) / s ** 2).sum(1)
        try:
            mesh = tetra.cage_from_field(fn, [-1] * 3, [1] * 3, rng.uniform(0.05, 0.1), alpha=alpha)
        except ValueError as e:                                        # nothing inside
            assert "nowhere negative" in str(e)
            continue
        _check_valid(mesh)


@pytest.mark.peers
def test_solid_cage_of_a_mesh_sign_distance_and_volume():
    igl = pytest.importorskip("igl")
    R, r = 0.5, 0.2
    v, f = iso.extract_surface(_torus_field(R, r), [-0.7, -0.2, -0.7], [0.7, 0.2, 0.7], 0.05)
    h = 0.045
    shape, origin = iso.grid_for_box(v.min(0) - 0.01, v.max(0) + 0.01, h)
    origin = origin + np.array([0.0013, -0.0021, 0.0007])              # generic lattice placement
    nodes = iso.lattice_nodes(shape, origin, h)
    w = tetra.lattice_winding_numbers(v, f, shape, origin, h)
    assert set(np.unique(w)) <= {0, 1}
    wn = igl.winding_number(v, f, nodes)
    np.testing.assert_array_equal(w, (wn > 0.5).astype(int))
    # distances: band-limited default and BVH backend vs igl's exact signed distance
    sd = igl.signed_distance(nodes, v, f)[0]
    band = 2 * h
    d0 = tetra.lattice_distances(v, f, shape, origin, h, band)
    d1 = tetra.lattice_distances(v, f, shape, origin, h, band, closest_point=closest_point)
    near = np.abs(sd) < band
    np.testing.assert_allclose(d0[near], np.abs(sd[near]), atol=2e-6)
    np.testing.assert_allclose(d1[near], np.abs(sd[near]), atol=2e-6)
    assert (d0[~near] >= band - 2e-6).all() and (d1[~near] >= band - 2e-6).all()
    np.testing.assert_array_equal(np.sign(sd[np.abs(sd) > 1e-6]), np.where(w != 0, -1, 1)[np.abs(sd) > 1e-6])
    # the cage of the mesh: the same cage from either distance backend
    m0 = tetra.solid_cage(v, f, h)
    m1 = tetra.solid_cage(v, f, h, closest_point=closest_point)
    vol = _check_valid(m0)
    assert m0.tets.shape == m1.tets.shape
    np.testing.assert_allclose(m0.nodes, m1.nodes, atol=1e-6)
    # vs the mesh's own enclosed volume: the sagitta bound of the tube, as for the field torus
    mesh_vol = _enclosed_volume(v, f)
    assert abs(mesh_vol - vol) < 4 * np.pi ** 2 * R * r * 3 * h ** 2 / (8 * r)


@pytest.mark.peers
def test_winding_numbers_exact_on_columns_through_edges_and_vertices():
    """An axis-aligned box whose edges and corners lie on lattice columns: every column through
    a triangle edge or vertex must count once (a ray-parity count would double or miss them)."""
    trimesh = pytest.importorskip("trimesh")
    h = 0.05
    box = trimesh.creation.box([0.3, 0.2, 0.4])                         # multiples of h
    v, f = np.asarray(box.vertices), np.asarray(box.faces)
    shape, origin = iso.grid_for_box(v.min(0), v.max(0), h)
    nodes = iso.lattice_nodes(shape, origin, h)
    w = tetra.lattice_winding_numbers(v, f, shape, origin, h)
    half = np.array([0.15, 0.1, 0.2])
    strict_in = np.all(np.abs(nodes) < half - 1e-9, axis=1)
    strict_out = np.any(np.abs(nodes) > half + 1e-9, axis=1)
    assert (w[strict_in] == 1).all() and (w[strict_out] == 0).all()
    # a column grazing a vertical wall counts either way for the nodes on the wall, never 2 / -1
    assert set(np.unique(w)) <= {0, 1}
    # inward-oriented faces: the count flips sign (nodes on the surface may count either way)
    wi = tetra.lattice_winding_numbers(v, f[:, ::-1], shape, origin, h)
    off = strict_in | strict_out
    np.testing.assert_array_equal(wi[off], -w[off])
    mesh = tetra.solid_cage(v, f, h)
    vol = _check_valid(mesh)
    # planar faces are exact; only the 12 edges are chamfered (by less than a lattice cell)
    assert 0 <= 0.3 * 0.2 * 0.4 - vol < 0.5 * h ** 2 * 4 * (0.3 + 0.2 + 0.4)
    igl = pytest.importorskip("igl")
    inner = mesh.nodes[np.unique(tetra.surface_triangles(mesh.tets))] * 0.999
    assert (igl.winding_number(v, f, inner) > 0.5).all()                # the cage lies in the box


def test_solid_cage_margin_holds_the_surface():
    r, h = 0.25, 0.05
    v, f = iso.extract_surface(_sphere_field(r), [-r] * 3, [r] * 3, 0.02)
    plain = tetra.solid_cage(v, f, h)
    _, _, inside = tetra.locate_points(plain, v)
    assert not inside.all()                       # the PL boundary cuts inside a convex surface
    # the documented margin 3 (1/2 + alpha)^2 h^2 / (2 r): the whole surface lies inside
    grown = tetra.solid_cage(v, f, h, margin=3 * (0.5 + tetra.ALPHA) ** 2 * h ** 2 / (2 * r))
    _, _, inside = tetra.locate_points(grown, v)
    assert inside.all()
    assert tetra.cage_stats(grown)["volume"] > tetra.cage_stats(plain)["volume"]


@pytest.mark.parametrize("h", [0.015, 0.025])
def test_shell_cage_of_an_open_hemisphere(h):
    R, r = 0.25, 0.03
    v, f = _uv_hemisphere(R, 24, 96)
    mesh = tetra.shell_cage(v, f, r, h)
    vol = _check_valid(mesh)
    # Points within r of the hemisphere: the half spherical shell R - r..R + r plus half a solid
    # torus (tube r) around the rim: 4 pi R^2 r + 4/3 pi r^3 + pi^2 R r^2 (= 2 r area + rim).
    exact = 4 * np.pi * R ** 2 * r + 4 / 3 * np.pi * r ** 3 + np.pi ** 2 * R * r ** 2
    # The boundary's sag (<= 3 h^2 / (8 rho)) over the outer sphere (rho = R + r), the inner one
    # (rho = R - r, where the cage grows instead) and the rim tube (rho = r, area 2 pi^2 R r):
    bound = 3 * h ** 2 / 8 * (2 * np.pi * (R + r) + 2 * np.pi * (R - r) + 2 * np.pi ** 2 * R)
    assert abs(vol - exact) < bound
    # every surface point is inside some tetrahedron: vertices and random face points
    rng = np.random.default_rng(0)
    pts = np.concatenate([v, _sample_faces(rng, v, f, 20000)])
    tid, bary, inside = tetra.locate_points(mesh, pts)
    assert inside.all()
    np.testing.assert_allclose(np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, tid, bary)), pts, atol=1e-5)


def test_shell_alpha_follows_the_containment_bound():
    assert tetra.shell_alpha(0.02, 0.01) == tetra.ALPHA
    a = tetra.shell_alpha(0.02, 0.016)
    assert tetra.ALPHA_MIN <= a < tetra.ALPHA
    assert math.sqrt(3) * 0.016 * (0.5 + a) + 0.1 * 0.016 <= 0.02 + 1e-12
    with pytest.raises(ValueError, match="too large for a shell"):
        tetra.shell_alpha(0.02, 0.018)


# ----------------------------------------------------------------------------------------------
# Deformation gradients and the Neo-Hookean energy.


def _small_cage():
    return tetra.cage_from_field(_sphere_field(0.2), [-0.2] * 3, [0.2] * 3, 0.08)


def test_deformation_gradients_identity_and_affine():
    mesh = _small_cage()
    rest = jnp.asarray(mesh.nodes, jnp.float32)
    M = mesh.tets.shape[0]
    J = tetra.deformation_gradients(rest, rest, mesh.tets)
    assert J.shape == (M, 3, 3)
    np.testing.assert_allclose(np.asarray(J), np.broadcast_to(np.eye(3), (M, 3, 3)), atol=2e-5)
    rng = np.random.default_rng(0)
    A = np.eye(3) + 0.3 * rng.normal(size=(2, 3, 3))
    t = rng.normal(size=(2, 1, 3))
    posed = np.einsum("bij,nj->bni", A, mesh.nodes) + t                 # [2, N, 3]
    rest_inv = tetra.rest_inverse(mesh.nodes, mesh.tets)                # numpy float64 [M, 3, 3]
    J = jax.jit(tetra.deformation_gradients, static_argnums=())(rest, jnp.asarray(posed, jnp.float32),
                                                               mesh.tets, rest_inv)
    assert J.shape == (2, M, 3, 3)
    np.testing.assert_allclose(np.asarray(J), np.broadcast_to(A[:, None], (2, M, 3, 3)), atol=1e-4)
    # the edge matrices map by A too, and volumes scale by det A
    np.testing.assert_allclose(np.asarray(tetra.tet_volumes(posed, mesh.tets)),
                               np.linalg.det(A)[:, None] * tetra.tet_volumes(mesh.nodes, mesh.tets),
                               rtol=1e-10)


def test_neo_hookean_energy_values_and_gradients():
    lam, mu = 2.0, 0.5
    J = jnp.stack([jnp.eye(3), jnp.diag(jnp.array([2.0, 1.0, 1.0])),
                   jnp.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])])
    # by hand: (det - 1)^2 lam / 2 + (|J|_F^2 - 3) mu / 2 for each, then the mean
    e = [0.0, lam / 2 * 1 + mu / 2 * 3, lam / 2 * 0.25 + mu / 2 * (1 + 0.09 + 1 + 0.25 - 3)]
    assert float(tetra.neo_hookean_energy(J, lam, mu)) == pytest.approx(np.mean(e), rel=1e-6)
    assert float(tetra.neo_hookean_energy(J, lam, mu, weights=jnp.array([0.0, 1.0, 0.0]))) == pytest.approx(e[1])
    R = jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0] * np.sign(
        np.linalg.det(np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0])), jnp.float32)
    assert abs(float(tetra.neo_hookean_energy(R[None], lam, mu))) < 1e-5      # rotations cost 0
    # through the cage: zero at rest, positive and differentiable when posed
    mesh = _small_cage()
    rest = jnp.asarray(mesh.nodes, jnp.float32)
    rest_inv = tetra.rest_inverse(rest, mesh.tets)

    def energy(posed):
        return tetra.neo_hookean_energy(tetra.deformation_gradients(None, posed, mesh.tets, rest_inv), lam, mu)

    assert abs(float(energy(rest))) < 1e-6
    # as the paper writes it, J = I is not stationary (dE/dJ = mu I); the stable form is
    gJ = jax.grad(lambda J: tetra.neo_hookean_energy(J, lam, mu))(jnp.eye(3)[None])
    np.testing.assert_allclose(np.asarray(gJ[0]), mu * np.eye(3), atol=1e-6)
    gJ = jax.grad(lambda J: tetra.neo_hookean_energy(J, lam, mu, stable=True))(jnp.eye(3)[None])
    np.testing.assert_allclose(np.asarray(gJ[0]), 0, atol=1e-6)
    assert float(tetra.neo_hookean_energy(jnp.eye(3)[None], lam, mu, stable=True)) == pytest.approx(0, abs=1e-6)
    assert float(tetra.neo_hookean_energy(J[1:2], lam, mu, stable=True)) == pytest.approx(
        lam / 2 * (1 - mu / lam) ** 2 + mu / 2 * 3 - mu ** 2 / (2 * lam))
    posed = rest + 0.01 * jax.random.normal(jax.random.PRNGKey(0), rest.shape)
    val, g = jax.jit(jax.value_and_grad(energy))(posed)
    assert float(val) > 0 and np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    # directional finite difference, in float64
    with jax.enable_x64(True):
        rest_inv64 = tetra.rest_inverse(mesh.nodes, mesh.tets)
        e64 = lambda x: tetra.neo_hookean_energy(
            tetra.deformation_gradients(None, x, mesh.tets, rest_inv64), lam, mu)
        p64 = jnp.asarray(np.asarray(posed), jnp.float64)
        d = jnp.asarray(np.random.default_rng(2).normal(size=rest.shape))
        eps = 1e-6
        fd = (float(e64(p64 + eps * d)) - float(e64(p64 - eps * d))) / (2 * eps)
        g64 = jax.grad(e64)(p64)
        assert float(jnp.sum(g64 * d)) == pytest.approx(fd, rel=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g64), rtol=1e-2, atol=1e-3 * np.abs(np.asarray(g64)).max())


def test_interpolate_batched_and_differentiable():
    mesh = _small_cage()
    rng = np.random.default_rng(0)
    tid = rng.integers(0, mesh.tets.shape[0], 50)
    bary = rng.dirichlet(np.ones(4), 50)
    x = np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, tid, bary))
    ref = np.einsum("pk,pkd->pd", bary, mesh.nodes[mesh.tets[tid]])
    np.testing.assert_allclose(x, ref, atol=1e-6)
    batched = jnp.stack([jnp.asarray(mesh.nodes), 2 * jnp.asarray(mesh.nodes)])
    xb = tetra.interpolate(batched, mesh.tets, tid, bary)
    assert xb.shape == (2, 50, 3)
    np.testing.assert_allclose(np.asarray(xb[1]), 2 * ref, atol=1e-5)
    g = jax.grad(lambda b: jnp.sum(tetra.interpolate(batched, mesh.tets, tid, b)))(jnp.asarray(bary, jnp.float32))
    assert g.shape == (50, 4) and np.isfinite(np.asarray(g)).all()


# ----------------------------------------------------------------------------------------------
# Point location, skinning, boundary.


@pytest.mark.peers
def test_locate_points_matches_brute_force_and_winding_oracle():
    igl = pytest.importorskip("igl")
    R, r = 0.3, 0.12
    mesh = tetra.cage_from_field(_torus_field(R, r), [-0.45, -0.15, -0.45], [0.45, 0.15, 0.45], 0.05)
    rng = np.random.default_rng(0)
    pts = rng.uniform([-0.5, -0.2, -0.5], [0.5, 0.2, 0.5], (1500, 3))
    tid, bary, inside = tetra.locate_points(mesh, pts)
    rt, rb, rin = tetra.locate_points_reference(mesh.nodes, mesh.tets, pts)
    # independent inside test: winding number of the cage's boundary surface
    faces = tetra.surface_triangles(mesh.tets)
    wn = igl.winding_number(mesh.nodes, faces, pts)
    clear = np.abs(wn - 0.5) < 0.45                                     # not on the boundary
    assert 0.2 < inside.mean() < 0.8
    np.testing.assert_array_equal(inside[clear], wn[clear] > 0.5)
    np.testing.assert_array_equal(inside[clear], rin[clear])
    # same positions: the point itself inside, its nearest cage point outside
    x = np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, tid, bary))
    xr = np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, rt, rb))
    np.testing.assert_allclose(x[inside], pts[inside], atol=1e-6)       # float32 interpolate
    np.testing.assert_allclose(x, xr, atol=2e-5)
    assert (bary >= -1e-9).all() and np.allclose(bary.sum(1), 1)
    # outside points: the clamped position is the nearest point of the boundary surface
    cp = closest_point(mesh.nodes.astype(np.float32), faces.astype(np.int32), pts[~inside].astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(pts[~inside] - x[~inside], axis=1),
                               np.sqrt(np.asarray(cp.sq_dist)), atol=2e-5)
    # the same through the BVH backend, and through an index built without the lattice
    t2, b2, in2 = tetra.locate_points(mesh, pts, closest_point=closest_point)
    np.testing.assert_array_equal(in2, inside)
    np.testing.assert_allclose(np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, t2, b2)), x, atol=2e-5)
    t3, b3, in3 = tetra.locate_points(tetra.TetMesh(mesh.nodes, mesh.tets), pts)
    np.testing.assert_array_equal(in3, inside)
    np.testing.assert_allclose(np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, t3, b3)), x, atol=2e-5)


@pytest.mark.peers
def test_locate_points_agrees_with_delaunay_find_simplex():
    """A cage of a cube region is convex: its points' containing tetrahedra must hold them in
    both our mesh and scipy's Delaunay tetrahedralisation of the same nodes (same hull)."""
    spatial = pytest.importorskip("scipy.spatial")
    mesh = tetra.cage_from_field(lambda p: np.abs(p).max(1) - 0.2, [-0.2] * 3, [0.2] * 3, 0.07)
    rng = np.random.default_rng(0)
    pts = rng.uniform(-0.3, 0.3, (4000, 3))
    _, _, inside = tetra.locate_points(mesh, pts)
    d = spatial.Delaunay(mesh.nodes)
    np.testing.assert_array_equal(inside, d.find_simplex(pts) >= 0)


def test_locate_points_at_scale():
    """200k points in a 60k-tet cage: all found, at the right place. (Its speed is measured by the
    printout, not asserted: timings are for benchmarks.)"""
    v, f = _open_torso()
    mesh = tetra.shell_cage(v, f, 0.02, 0.015, closest_point=closest_point)
    rng = np.random.default_rng(0)
    P = 200_000
    corners = mesh.nodes[mesh.tets[rng.integers(0, mesh.tets.shape[0], P)]]
    pts = (rng.dirichlet(np.ones(4), P)[:, :, None] * corners).sum(1)
    t0 = time.perf_counter()
    tid, bary, inside = tetra.locate_points(mesh, pts)
    dt = time.perf_counter() - t0
    print(f"\nlocate_points: {P} points in {mesh.tets.shape[0]} tets: {dt:.2f} s")
    assert inside.all()
    np.testing.assert_allclose(np.asarray(tetra.interpolate(mesh.nodes, mesh.tets, tid, bary)), pts, atol=1e-5)


@pytest.mark.peers
def test_skin_nodes_takes_the_nearest_template_vertex():
    spatial = pytest.importorskip("scipy.spatial")
    rng = np.random.default_rng(0)
    verts = rng.normal(size=(3000, 3)) * 0.3
    weights = rng.dirichlet(np.ones(5), 3000)
    nodes = rng.normal(size=(2000, 3)) * 0.35
    w, idx = tetra.skin_nodes(nodes, verts, weights, return_index=True)
    d, ref = spatial.cKDTree(verts).query(nodes)
    np.testing.assert_allclose(np.linalg.norm(nodes - verts[idx], axis=1), d, atol=1e-6)
    np.testing.assert_array_equal(w, weights[idx])
    assert w.shape == (2000, 5)
    with pytest.raises(ValueError, match="lbs_weights"):
        tetra.skin_nodes(nodes, verts, weights[:10])


def test_surface_triangles_of_one_and_two_tets():
    nodes = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1.0]])
    tets = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])
    assert (tetra.tet_volumes(nodes, tets) > 0).all()
    f, owner, opp = tetra.surface_triangles(tets, return_owner=True)
    assert f.shape == (6, 3)                                            # the shared face is gone
    assert not any(set(x) == {1, 2, 3} for x in f.tolist())
    assert _enclosed_volume(nodes, f) == pytest.approx(tetra.tet_volumes(nodes, tets).sum())
    np.testing.assert_array_equal(np.sort(tets[owner, opp]), np.sort(
        [np.setdiff1d(tets[o], x)[0] for o, x in zip(owner, f)]))


# ----------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_value_errors():
    v, f = _uv_hemisphere(0.2, 6, 12)
    sv, sf = iso.extract_surface(_sphere_field(0.2), [-0.2] * 3, [0.2] * 3, 0.05)
    with pytest.raises(ValueError, match="spacing must be positive"):
        tetra.solid_cage(sv, sf, 0.0)
    with pytest.raises(ValueError, match="spacing must be positive"):
        tetra.cage_from_field(_sphere_field(0.2), [-0.2] * 3, [0.2] * 3, -0.1)
    with pytest.raises(ValueError, match="smaller than the shell radius"):
        tetra.shell_cage(v, f, 0.02, 0.02)
    with pytest.raises(ValueError, match="radius must be positive"):
        tetra.shell_cage(v, f, 0.0, 0.01)
    bad = sv.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        tetra.solid_cage(bad, sf, 0.05)
    with pytest.raises(ValueError, match=r"vertices must be \[V, 3\]"):
        tetra.solid_cage(sv[:, :2], sf, 0.05)
    with pytest.raises(ValueError, match=r"faces must be \[F, 3\]"):
        tetra.shell_cage(v, f[:, :2], 0.03, 0.01)
    with pytest.raises(ValueError, match="faces index vertices"):
        tetra.solid_cage(sv, sf + sv.shape[0], 0.05)
    with pytest.raises(ValueError, match="closed, consistently oriented"):
        tetra.solid_cage(v, f, 0.05)                                     # an open surface
    with pytest.raises(ValueError, match="box boundary"):
        tetra.cage_from_field(lambda p: p[:, 0], [-1] * 3, [1] * 3, 0.5)
    with pytest.raises(ValueError, match="nowhere negative"):
        tetra.cage_from_field(lambda p: np.ones(len(p)), [-1] * 3, [1] * 3, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        tetra.cage_from_field(_sphere_field(0.2), [-0.2] * 3, [0.2] * 3, 0.1, alpha=0.0)
    mesh = _small_cage()
    with pytest.raises(ValueError, match=r"points must be \[P, 3\]"):
        tetra.locate_points(mesh, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        tetra.locate_points(mesh, np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match=r"tets must be \[M, 4\]"):
        tetra.tet_volumes(mesh.nodes, mesh.tets[:, :3])
    with pytest.raises(ValueError, match=r"J must be \[..., M, 3, 3\]"):
        tetra.neo_hookean_energy(jnp.eye(3))


# ----------------------------------------------------------------------------------------------
# Human-sized builds (the figures the D3GA lead asked for; printed with -s).


def test_body_and_torso_shell_build_times():
    v, f = _capsule_body(0.015)
    assert v[:, 2].max() - v[:, 2].min() == pytest.approx(1.72, abs=0.02)
    body_vol = _enclosed_volume(v, f)
    lines = [f"\ntest body: {v.shape[0]} vertices, {f.shape[0]} faces, {body_vol * 1e3:.1f} L"]
    for h in (0.03, 0.025, 0.02):
        t0 = time.perf_counter()
        mesh = tetra.solid_cage(v, f, h, closest_point=closest_point)
        st = tetra.cage_stats(mesh, time.perf_counter() - t0)
        vol = _check_valid(mesh)
        assert st["build_s"] < 20
        # thin limbs (4.5 cm arms): the boundary sags up to 3 h^2 / (8 * 0.045) inside
        assert 0 < body_vol - vol < 0.06 * body_vol
        lines.append(f"solid body h={h * 100:.1f} cm: {st['tets']} tets, {st['nodes']} nodes, "
                     f"{st['build_s']:.2f} s (BVH distances), min/median quality "
                     f"{st['min_quality']:.3f}/{st['median_quality']:.3f}, {vol * 1e3:.1f} L")
    t0 = time.perf_counter()
    tetra.solid_cage(v, f, 0.025)
    lines.append(f"solid body h=2.5 cm, in-floor distances: {time.perf_counter() - t0:.2f} s")
    tv, tf = _open_torso()
    for h in (0.015, 0.01):
        t0 = time.perf_counter()
        mesh = tetra.shell_cage(tv, tf, 0.02, h, closest_point=closest_point)
        st = tetra.cage_stats(mesh, time.perf_counter() - t0)
        _check_valid(mesh)
        lines.append(f"2 cm shell of a torso tube (area {_open_area(tv, tf):.2f} m^2) h={h * 100:.1f} cm: "
                     f"{st['tets']} tets, {st['nodes']} nodes, {st['build_s']:.2f} s, min quality "
                     f"{st['min_quality']:.3f}, {st['volume'] * 1e3:.2f} L")
    print("\n".join(lines))


def _open_area(v, f):
    p = v[f]
    return 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1).sum()
