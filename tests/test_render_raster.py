"""Tests of dhjax.render.raster (tiled rasterizer vs the brute-force oracle, gradients, UV).

Meshes are shared between tests (module fixtures) so that few distinct shapes get compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.render import camera as C
from dhjax.render.raster import (
    count_intersections,
    interpolate,
    rasterize,
    rasterize_reference,
    rasterize_uv,
    uv_map,
)

W, H = 48, 40


def _rig():
    # Camera 0 in front (+z, 10 degrees up), camera 1 behind (-z); 2 m from the origin.
    return C.orbit_rig(2, 2.0, target=(0.0, 0.0, 0.0), elevation_deg=10.0, fov_y_deg=40.0, width=W, height=H)


def _assert_same(frags, ref):
    np.testing.assert_array_equal(np.asarray(frags.face_id), np.asarray(ref.face_id))
    np.testing.assert_array_equal(np.asarray(frags.mask), np.asarray(ref.mask))
    np.testing.assert_allclose(frags.bary, ref.bary, atol=1e-5, rtol=0)
    np.testing.assert_allclose(frags.depth, ref.depth, atol=1e-5, rtol=1e-6)


@pytest.fixture(scope="module")
def soup():
    """Triangle soup: 50 small/medium triangles and 6 large ones (bigger than a tile, crossing
    the image border), overlapping everywhere; two slightly different meshes [2, 168, 3]."""
    rng = np.random.default_rng(0)
    n_small, n_large = 50, 6
    centres = rng.uniform(-0.6, 0.6, (n_small + n_large, 1, 3))
    scale = np.concatenate([rng.uniform(0.05, 0.3, n_small), rng.uniform(0.6, 1.5, n_large)])
    offsets = rng.normal(size=(n_small + n_large, 3, 3)) * scale[:, None, None]
    tris = (centres + offsets).reshape(-1, 3)
    verts = np.stack([tris, tris + rng.normal(scale=0.01, size=tris.shape)]).astype(np.float32)
    faces = np.arange(tris.shape[0], dtype=np.int32).reshape(-1, 3)
    cam = _rig()
    ref = rasterize_reference(verts, faces, cam, face_chunk=17)
    return verts, faces, cam, ref


@pytest.fixture(scope="module")
def pair():
    """Two ~1 m triangles, the second 0.8 m behind the first (partly hidden from camera 0)."""
    tri = np.array([[-0.5, -0.4, 0.1], [0.5, -0.3, -0.1], [0.05, 0.45, 0.05]], np.float32)
    tri2 = tri + np.array([0.0, 0.0, -0.8], np.float32)
    verts = np.concatenate([tri, tri2])[None].repeat(2, 0)
    verts[1] += np.array([0.05, -0.02, 0.0], np.float32)
    faces = np.array([[0, 1, 2], [3, 4, 5]], np.int32)
    return jnp.asarray(verts), faces, _rig()


@pytest.mark.parametrize("tile_size", [8, 5])
def test_matches_reference_random_soup(soup, tile_size):
    verts, faces, cam, ref = soup
    frags = rasterize(verts, faces, cam, tile_size=tile_size)
    assert frags.face_id.shape == (2, H, W) and frags.bary.shape == (2, H, W, 3)
    m = np.asarray(ref.mask)
    assert 0.3 < m.mean() < 0.99  # non-trivial coverage with background left
    assert len(np.unique(np.asarray(ref.face_id))) > 20  # many triangles visible, overlapping
    _assert_same(frags, ref)
    assert not np.any(frags.overflow)
    np.testing.assert_allclose(np.sum(np.asarray(frags.bary), -1)[m], 1.0, atol=1e-5)
    assert np.all(np.asarray(frags.face_id)[~m] == -1) and np.all(np.asarray(frags.depth)[~m] == 0)


def test_shared_camera_and_broadcast_batch(soup):
    verts, faces, cam, _ = soup
    single = rasterize(verts, faces, cam[1])  # one camera shared by both meshes
    _assert_same(single, rasterize_reference(verts, faces, cam[1], face_chunk=17))
    multi = rasterize(verts[:1], faces, cam)  # one mesh seen by both cameras
    assert multi.face_id.shape == (2, H, W)
    _assert_same(multi, rasterize_reference(verts[:1], faces, cam, face_chunk=17))


def test_capacity_eager_never_truncates_and_jit_reports_overflow(soup):
    verts, faces, cam, ref = soup
    counts = np.asarray(count_intersections(verts, faces, cam, tile_size=8))
    small = int(counts.max()) // 4
    assert small > 20
    eager = rasterize(verts, faces, cam, tile_size=8, capacity=small)
    assert not np.any(eager.overflow)
    _assert_same(eager, ref)

    jitted = jax.jit(lambda v: rasterize(v, faces, cam, tile_size=8, capacity=small))(verts)
    np.testing.assert_array_equal(np.asarray(jitted.overflow), counts > small)
    assert np.all(jitted.overflow)
    # The truncated images really miss triangles (the flag is not decorative).
    assert np.asarray(jitted.mask).sum() < np.asarray(ref.mask).sum()
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(lambda v: rasterize(v, faces, cam).face_id)(verts)


def test_matches_reference_closed_mesh_shared_edges_and_culling():
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    v = np.asarray(m.vertices, np.float32)
    verts = np.stack([v, v * np.array([1.3, 0.8, 1.0], np.float32)])
    faces = np.asarray(m.faces, np.int32)
    cam = _rig()
    results = {}
    for cull in (False, True):
        results[cull] = rasterize(verts, faces, cam, cull_backfaces=cull)
        _assert_same(results[cull], rasterize_reference(verts, faces, cam, cull_backfaces=cull))
    # A closed convex mesh looks the same with and without back-face culling, and every pixel
    # inside the silhouette is covered (no cracks along shared edges).
    np.testing.assert_array_equal(np.asarray(results[False].face_id), np.asarray(results[True].face_id))
    mask = np.asarray(results[False].mask)
    rows_filled = [np.all(r[np.argmax(r) : len(r) - np.argmax(r[::-1])]) for b in mask for r in b if r.any()]
    assert all(rows_filled)


def test_backface_orientation(pair):
    verts, faces, cam = pair
    centres = np.asarray(C.camera_centre(cam))
    v = np.asarray(verts)
    for b in range(2):
        p0, p1, p2 = v[b, faces[0]]
        front = np.dot(np.cross(p1 - p0, p2 - p0), centres[b] - p0) > 0
        assert front == (b == 0)  # camera 0 sees face 0 from its normal side, camera 1 from behind
    culled = np.asarray(rasterize(verts, faces, cam, cull_backfaces=True).face_id)
    assert (culled[0] == 0).any() and not (culled[1] == 0).any()
    flipped = np.asarray(rasterize(verts, faces[:, ::-1], cam, cull_backfaces=True).face_id)
    assert not (flipped[0] == 0).any() and (flipped[1] == 0).any()
    both = np.asarray(rasterize(verts, faces, cam).face_id)
    assert (both[0] == 0).any() and (both[1] == 0).any()


def test_perspective_correct_geometry(pair):
    """Interpolated world positions lie on the pixel rays, at the reported camera depth."""
    verts, faces, cam = pair
    frags = rasterize(verts, faces, cam)
    pos = interpolate(verts, faces, frags)  # [2, H, W, 3]
    m = np.asarray(frags.mask)
    assert m.mean() > 0.1
    jj, ii = np.meshgrid(np.arange(W), np.arange(H))
    for b in range(2):
        uv, z = C.project(cam[b], pos[b].reshape(-1, 3))
        mb = m[b].reshape(-1)
        np.testing.assert_allclose(np.asarray(uv)[mb, 0], jj.reshape(-1)[mb], atol=2e-3)
        np.testing.assert_allclose(np.asarray(uv)[mb, 1], ii.reshape(-1)[mb], atol=2e-3)
        np.testing.assert_allclose(np.asarray(z)[mb], np.asarray(frags.depth[b]).reshape(-1)[mb], atol=1e-5)


def test_interpolate_gradients_match_finite_differences(pair):
    verts, faces, cam = pair
    attrs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32))
    frags = rasterize(verts, faces, cam)
    # Only pixels deep inside the front face enter the loss, so small vertex moves never change
    # which face covers them (visibility is held fixed by design; finite differences must agree).
    front = np.array([0, 1])  # camera 0 looks at face 0's front, camera 1 at face 1's back
    fid = np.asarray(frags.face_id)
    deep = (fid == front[:, None, None]) & (np.asarray(frags.bary).min(-1) > 0.1)
    assert deep[0].sum() > 50 and deep[1].sum() > 50
    weights = np.random.default_rng(1).uniform(size=(2, H, W, 4)).astype(np.float32) * deep[..., None]
    weights = jnp.asarray(weights / deep.sum())
    cap = 2 * int(jnp.max(count_intersections(verts, faces, cam)))

    def loss_and_overflow(v, a):
        fr = rasterize(v, faces, cam, capacity=cap)
        return jnp.sum(weights * interpolate(a, faces, fr)), fr.overflow

    value_and_grad = jax.jit(jax.value_and_grad(loss_and_overflow, argnums=(0, 1), has_aux=True))

    def loss(v, a):  # one compiled program serves values and gradients
        return value_and_grad(v, a)[0][0]

    (_, overflow), (gv, ga) = value_and_grad(verts, attrs)
    assert not np.any(overflow)
    # Vertex positions: central differences with eps = 1e-3 m on ~1 m triangles seen from 2 m.
    # Truncation error ~ eps^2 |f'''| ~ 1e-6; float32 rounding of an O(1) loss ~ 1e-7 / eps =
    # 1e-4. Gradients are O(0.1-1), so an absolute bound of 2e-3 is safe yet meaningful.
    eps = 1e-3
    for b, i, k in [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 5, 0), (1, 3, 2), (1, 4, 1)]:
        dv = jnp.zeros_like(verts).at[b, i, k].set(eps)
        fd = (loss(verts + dv, attrs) - loss(verts - dv, attrs)) / (2 * eps)
        np.testing.assert_allclose(gv[b, i, k], fd, atol=2e-3, rtol=0)
    assert np.abs(np.asarray(gv[0, :3])).max() > 0.05 and np.abs(np.asarray(gv[1, 3:])).max() > 0.05
    # Faces that cover no loss pixel get no gradient.
    np.testing.assert_array_equal(np.asarray(gv[0, 3:]), 0.0)
    np.testing.assert_array_equal(np.asarray(gv[1, :3]), 0.0)
    # Attributes: the loss is linear in attrs, so central differences are exact up to rounding.
    for b, i, c in [(0, 0, 0), (1, 5, 3), (0, 1, 2)]:
        da = jnp.zeros_like(attrs).at[b, i, c].set(0.1)
        fd = (loss(verts, attrs + da) - loss(verts, attrs - da)) / 0.2
        np.testing.assert_allclose(ga[b, i, c], fd, atol=1e-5, rtol=0)
    # Shared [V, C] attributes broadcast over the batch.
    shared = interpolate(attrs[0], faces, frags)
    np.testing.assert_allclose(shared[1], interpolate(attrs[:1].repeat(2, 0), faces, frags)[1], atol=1e-6)


def test_finite_gradients_degenerate_and_camera_centre():
    cam = _rig()
    centre = np.asarray(C.camera_centre(cam))  # [2, 3]
    good = np.array([[-0.5, -0.4, 0.0], [0.5, -0.3, 0.0], [0.0, 0.5, 0.0]], np.float32)
    zero_area = np.array([[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.2, 0.2, 0.2]], np.float32)
    verts = np.stack([np.concatenate([good, zero_area, good[:2] * 0.5, c[None]]) for c in centre]).astype(np.float32)
    faces = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.int32)
    frags = rasterize(verts, faces, cam)
    ids = np.unique(np.asarray(frags.face_id))
    assert 0 in ids and 1 not in ids and 2 not in ids  # degenerate and camera-centre faces dropped
    _assert_same(frags, rasterize_reference(verts, faces, cam))

    def loss(v):
        fr = rasterize(v, faces, cam)  # eager entry point under grad (capacity found on the host)
        return jnp.sum(interpolate(v, faces, fr) ** 2) + jnp.sum(fr.depth)

    g = jax.grad(loss)(jnp.asarray(verts))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(g[:, :3])).max() > 0


def test_rasterize_uv_position_map_of_flat_mesh():
    # A flat 4 x 3 grid mesh in the plane z = 0.2 whose UVs are an affine map of (x, y); its
    # UV layout covers [0, 1]^2, so every texel is covered and the position map is analytic.
    nx, ny = 4, 3
    xs, ys = np.meshgrid(np.linspace(0, 1, nx + 1), np.linspace(0, 1, ny + 1))
    uv = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
    x0, y0, sx, sy = -0.3, 0.1, 0.6, 0.4
    pos = np.stack([x0 + sx * uv[:, 0], y0 + sy * uv[:, 1], np.full(len(uv), 0.2)], -1).astype(np.float32)
    faces = []
    for j in range(ny):
        for i in range(nx):
            a = j * (nx + 1) + i
            faces += [[a, a + 1, a + nx + 2], [a, a + nx + 2, a + nx + 1]]
    faces = np.asarray(faces, np.int32)
    Hm, Wm = 24, 32
    frags = rasterize_uv(uv, faces, Hm, Wm)
    assert frags.face_id.shape == (1, Hm, Wm)
    assert np.all(np.asarray(frags.mask))
    pmap = uv_map(pos, faces, frags)
    assert pmap.shape == (1, Hm, Wm, 3)
    jj, ii = np.meshgrid(np.arange(Wm), np.arange(Hm))
    u, v = (jj + 0.5) / Wm, 1.0 - (ii + 0.5) / Hm
    expected = np.stack([x0 + sx * u, y0 + sy * v, np.full_like(u, 0.2)], -1)
    np.testing.assert_allclose(pmap[0], expected, atol=1e-5)
    assert pmap[0, 0, 0, 1] > pmap[0, -1, 0, 1]  # row 0 is the top of the map (v near 1)
    # Batched attributes and a partial layout (only the left half of the UV square).
    half = uv * np.array([0.5, 1.0], np.float32)
    fh = rasterize_uv(half, faces, Hm, Wm)
    m = np.asarray(fh.mask[0])
    assert m[:, : Wm // 2].all() and not m[:, Wm // 2 :].any()
    batched = uv_map(np.stack([pos, 2 * pos]), faces, fh)
    assert batched.shape == (2, Hm, Wm, 3)
    np.testing.assert_allclose(batched[1], 2 * batched[0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(batched[:, ~m]), 0.0)


# ----------------------------------------------------------------------------------------------
# Independent oracle: a float64 numpy ray caster. It shares no code with the rasterizer (which
# projects vertices and tests pixel centres against screen-space edge functions in float32);
# here rays through the pixel centres are intersected with the 3D triangles (Moller-Trumbore).

RW, RH = 40, 32  # image size of the ray-caster comparison
BARY_AMBIGUOUS = 1e-4  # |smallest barycentric| below this: float32 coverage may go either way
DEPTH_AMBIGUOUS = 1e-6  # two surfaces this close in depth (metres): the z-test may go either way


def _ray_cast(verts, faces, K, R, t, width, height, cull_backfaces=False, front_is_ccw=True):
    """Nearest triangle hit by the ray through every pixel centre, in float64.

    Camera convention (OpenCV): x_cam = R x_world + t, and the centre of pixel (row i, column j)
    is image point (u, v) = (j, i), so its ray in camera space is K^-1 [j, i, 1]. That direction
    has z = 1, so the ray parameter of a hit is the hit's camera-space depth z.

    With cull_backfaces, triangles whose normal (p1 - p0) x (p2 - p0) points away from the camera
    centre are dropped (front_is_ccw=False drops the opposite set, to show the test's power).

    Returns face_id [H, W] (-1 where no hit), bary [H, W, 3] (weights of p0, p1, p2), depth
    [H, W] (0 where no hit), n_hits [H, W] and ambiguous [H, W] bool: pixels where float32
    rounding may legitimately change the answer, i.e. a candidate triangle in front of (or tied
    with) the nearest hit has its smallest barycentric within BARY_AMBIGUOUS of 0 (the pixel
    centre is on an edge; this includes near misses and the winner itself), or the two nearest
    hits are within DEPTH_AMBIGUOUS in depth.
    """
    K, R, t = (np.asarray(a, np.float64) for a in (K, R, t))
    xw = np.asarray(verts, np.float64)
    xc = xw @ R.T + t
    p0, p1, p2 = (xc[faces[:, k]] for k in range(3))  # [F, 3] camera space
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([jj.ravel(), ii.ravel(), np.ones(jj.size)], -1)  # [P, 3]
    d = np.linalg.solve(K, pix.T).T  # [P, 3] ray directions, z = 1
    e1, e2 = p1 - p0, p2 - p0
    pvec = np.cross(d[:, None, :], e2[None, :, :])  # [P, F, 3]
    det = np.einsum("fk,pfk->pf", e1, pvec)
    ok = np.abs(det) > 1e-15
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = -p0  # ray origin (camera centre = 0) minus p0
    b1 = np.einsum("fk,pfk->pf", s, pvec) * inv
    q = np.cross(s, e1)  # [F, 3]
    b2 = (d @ q.T) * inv
    depth = np.sum(e2 * q, -1)[None, :] * inv  # ray parameter = camera z
    bary = np.stack([1.0 - b1 - b2, b1, b2], -1)  # [P, F, 3]
    bmin = bary.min(-1)

    usable = ok & (depth > 0)
    if cull_backfaces:
        centre = -R.T @ t  # camera centre, world
        tri = xw[faces]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        facing = np.sum(normal * (centre - tri[:, 0]), -1) > 0
        usable &= (facing if front_is_ccw else ~facing)[None, :]
    hit = usable & (bmin >= 0)
    zhit = np.where(hit, depth, np.inf)
    order = np.argsort(zhit, axis=1, kind="stable")
    best = order[:, 0]
    rows = np.arange(len(pix))
    z0, z1 = zhit[rows, best], zhit[rows, order[:, 1]]
    found = np.isfinite(z0)
    edge = usable & (np.abs(bmin) <= BARY_AMBIGUOUS) & (depth <= z0[:, None] + DEPTH_AMBIGUOUS)
    tie = np.isfinite(z1) & (z1 - np.where(found, z0, 0.0) <= DEPTH_AMBIGUOUS)
    ambiguous = edge.any(1) | tie
    face_id = np.where(found, best, -1)
    out_bary = np.where(found[:, None], bary[rows, best], 0.0)
    out_depth = np.where(found, z0, 0.0)
    shape = (height, width)
    return (face_id.reshape(shape), out_bary.reshape(shape + (3,)), out_depth.reshape(shape),
            hit.sum(1).reshape(shape), ambiguous.reshape(shape))


@pytest.fixture(scope="module")
def ray_scenes():
    """Three random triangle soups [3, 144, 3] (40 small/medium + 8 large triangles each), each
    seen by its own camera (look_at from a random direction 1.6-2.0 m away, 40-50 degree fov).
    Every vertex is at least 0.3 m in front of its camera (the rasterizer has no near clipping)."""
    rng = np.random.default_rng(7)
    n_small, n_large, B = 40, 8, 3
    dirs = rng.normal(size=(B, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    targets = rng.uniform(-0.1, 0.1, (B, 3))
    eyes = targets + dirs * rng.uniform(1.6, 2.0, (B, 1))
    R, t = C.look_at(eyes.astype(np.float32), targets.astype(np.float32))
    cam = C.camera_from_fov(rng.uniform(40.0, 50.0, B).astype(np.float32), RW, RH, R, t)
    Rn, tn = np.asarray(cam.R, np.float64), np.asarray(cam.t, np.float64)
    verts = np.zeros((B, 3 * (n_small + n_large), 3), np.float32)
    for b in range(B):
        scales = np.concatenate([rng.uniform(0.05, 0.35, n_small), rng.uniform(0.6, 1.2, n_large)])
        for k, s in enumerate(scales):
            while True:  # redraw triangles that come closer than 0.3 m to the camera plane
                tri = targets[b] + rng.uniform(-0.35, 0.35, 3) + rng.normal(size=(3, 3)) * s
                if np.all((tri @ Rn[b].T + tn[b])[:, 2] > 0.3):
                    break
            verts[b, 3 * k : 3 * k + 3] = tri
    faces = np.arange(verts.shape[1], dtype=np.int32).reshape(-1, 3)
    return verts, faces, cam


@pytest.mark.parametrize("cull", [False, True])
def test_matches_float64_ray_caster(ray_scenes, cull):
    verts, faces, cam = ray_scenes
    frags = rasterize(verts, faces, cam, cull_backfaces=cull)
    fid = np.asarray(frags.face_id)
    K, R, t = (np.asarray(a) for a in (cam.K, cam.R, cam.t))
    n_pix = RW * RH
    for b in range(verts.shape[0]):
        ref_id, ref_bary, ref_depth, n_hits, amb = _ray_cast(verts[b], faces, K[b], R[b], t[b], RW, RH, cull)
        # The scene is a meaningful test: background left, many faces visible, overlap (pixels
        # whose ray crosses several triangles), and visible triangles that extend beyond the
        # image border. Culling removes roughly half of the triangles.
        covered = ref_id >= 0
        visible = np.unique(ref_id[covered])
        if cull:
            assert 0.2 < covered.mean() < 0.9 and len(visible) >= 15
        else:
            assert 0.5 < covered.mean() < 0.98 and len(visible) >= 20
            assert (n_hits >= 2).mean() > 0.2
        uv, _ = C.project(cam[b], verts[b])
        uv = np.asarray(uv)[faces[visible]].reshape(-1, 2)
        assert np.any((uv[:, 0] < -0.5) | (uv[:, 0] > RW - 0.5) | (uv[:, 1] < -0.5) | (uv[:, 1] > RH - 0.5))

        # Ambiguous pixels. Pixel centres within BARY_AMBIGUOUS (barycentric units) of an edge
        # fill a band of width 1e-4 * altitude, i.e. of area 2e-4 * (triangle area) per edge and
        # 6e-4 * area for all three, so about 6e-4 * sum(n_hits) ~ 0.3-1.5 pixels per image are
        # expected here; depth ties only occur within ~1e-4 px of the lines where triangles
        # intersect. A cap of 1% of the pixels (12) leaves room for chance, while a systematic
        # disagreement (wrong ray, pixel-centre offset, depth rule) affects far more pixels.
        assert amb.sum() <= 0.01 * n_pix, (amb.sum(), 6e-4 * n_hits.sum())
        good = ~amb
        mismatch = good & (fid[b] != ref_id)
        assert not mismatch.any(), f"image {b}: {mismatch.sum()} face-id mismatches at unambiguous pixels"
        both = good & covered
        np.testing.assert_allclose(np.asarray(frags.depth[b])[both], ref_depth[both], atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(frags.bary[b])[both], ref_bary[both], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asarray(frags.mask[b])[good], covered[good])

        if cull:
            # The culling convention matters for these scenes: the opposite convention
            # (treating clockwise faces as front-facing) disagrees with the rasterizer.
            wrong_id = _ray_cast(verts[b], faces, K[b], R[b], t[b], RW, RH, True, front_is_ccw=False)[0]
            assert (wrong_id != fid[b]).mean() > 0.3
            # ... and culling removes visible back faces compared with no culling.
            all_id = _ray_cast(verts[b], faces, K[b], R[b], t[b], RW, RH, False)[0]
            assert (all_id != ref_id).mean() > 0.2


def test_bad_inputs_raise(pair):
    verts, faces, cam = pair
    with pytest.raises(ValueError, match=r"vertices must have shape \[B, V, 3\]"):
        rasterize(verts[0], faces, cam)
    with pytest.raises(ValueError, match=r"faces must have shape \[F, 3\]"):
        rasterize(verts, faces[:, :2], cam)
    with pytest.raises(ValueError, match="faces indices"):
        rasterize(verts, faces + 100, cam)
    with pytest.raises(ValueError, match="camera batch"):
        rasterize(jnp.concatenate([verts, verts[:1]]), faces, cam)
    with pytest.raises(ValueError, match="uv_coords"):
        rasterize_uv(np.zeros((4, 3)), faces[:1] % 4, 8, 8)
    with pytest.raises(ValueError, match="attrs"):
        interpolate(jnp.zeros((6,)), faces, rasterize(verts, faces, cam))


# ----------------------------------------------------------------------------------------------
# Fill rule: no cracks and no double coverage on shared edges and vertices.


def _pixel_camera(n, size=64):
    """Cameras at the origin looking along +z with K = I, so a vertex (u, v, 1) projects to the
    pixel coordinates (u, v) exactly (division by 1)."""
    K = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
    R = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
    return C.make_camera(K, R, np.zeros((n, 3), np.float32), size, size)


def _edge_pairs(n, seed):
    """n pairs of triangles (A, B, C1) and (B, A, C2) sharing an edge AB drawn through an integer
    pixel centre P in a random direction (float32 endpoints: P lies on AB up to rounding)."""
    rng = np.random.default_rng(seed)
    P = rng.integers(12, 52, (n, 2)).astype(np.float64)
    d = rng.normal(size=(n, 2))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    nrm = np.stack([-d[:, 1], d[:, 0]], 1)
    A = P + rng.uniform(1, 8, (n, 1)) * d
    B = P - rng.uniform(1, 8, (n, 1)) * d
    C1 = P + rng.uniform(2, 8, (n, 1)) * nrm + rng.uniform(-3, 3, (n, 1)) * d
    C2 = P - rng.uniform(2, 8, (n, 1)) * nrm + rng.uniform(-3, 3, (n, 1)) * d
    verts = np.stack([A, B, C1, C2], 1)
    verts = np.concatenate([verts, np.ones((n, 4, 1))], 2).astype(np.float32)
    return verts, P.astype(np.int64)


def test_shared_edges_through_pixel_centres_cover_each_centre_exactly_once():
    """The crack of the former inclusive rule: a pixel centre on a shared edge was covered by
    neither triangle for ~1% of random edges (the two edge functions were evaluated with different
    rounding); now exactly one triangle covers it, whichever winding the pair has."""
    from dhjax.render.raster import _eval_pixels

    n = 4000
    verts, P = _edge_pairs(n, seed=0)
    px, py = jnp.asarray(P[:, 0], jnp.float32), jnp.asarray(P[:, 1], jnp.float32)
    one = jnp.ones((n,), jnp.float32)

    def covers(i, j, k):
        u, v = verts[:, :, 0], verts[:, :, 1]
        return np.asarray(_eval_pixels(px, py, (u[:, i], u[:, j], u[:, k]), (v[:, i], v[:, j], v[:, k]),
                                       (one, one, one))[0])

    for first, second in (((0, 1, 2), (1, 0, 3)), ((0, 1, 2), (0, 1, 3))):  # consistent, flipped winding
        c1, c2 = covers(*first), covers(*second)
        assert np.sum(c1 & c2) == 0, "a pixel centre covered by both triangles"
        assert np.sum(~c1 & ~c2) == 0, "a pixel centre covered by neither triangle (crack)"
    # End to end: every pair rendered into its own image; the pixel P is never left empty.
    faces = np.array([[0, 1, 2], [1, 0, 3]], np.int32)
    frags = rasterize(verts[:600], faces, _pixel_camera(600))
    mask = np.asarray(frags.mask)
    assert mask[np.arange(600), P[:600, 1], P[:600, 0]].all()


def test_top_left_rule_on_axis_aligned_squares():
    """A 4 x 4 pixel square from (0, 0) to (4, 4) split along either diagonal: the pixel centres
    of columns 0..3 and rows 0..3 are covered (left and top edges are in), column 4 and row 4
    are not (right and bottom edges are out), each by exactly one of the two triangles."""
    from dhjax.render.raster import _eval_pixels

    jj, ii = np.meshgrid(np.arange(-1, 7), np.arange(-1, 7))
    px, py = jnp.asarray(jj, jnp.float32), jnp.asarray(ii, jnp.float32)
    sq = {0: (0.0, 0.0), 1: (4.0, 0.0), 2: (4.0, 4.0), 3: (0.0, 4.0)}
    want = (jj >= 0) & (jj <= 3) & (ii >= 0) & (ii <= 3)
    for tris in (((0, 1, 2), (0, 2, 3)), ((0, 1, 3), (1, 2, 3)), ((2, 1, 0), (3, 2, 0))):
        count = np.zeros(jj.shape, int)
        for t in tris:
            u = tuple(jnp.float32(sq[k][0]) for k in t)
            v = tuple(jnp.float32(sq[k][1]) for k in t)
            count += np.asarray(_eval_pixels(px, py, u, v, (1.0, 1.0, 1.0))[0]).astype(int)
        np.testing.assert_array_equal(count, want.astype(int))


def test_fan_around_a_pixel_centre_covers_it_once():
    """Eight triangles around a vertex placed exactly on a pixel centre: that centre, and the
    centres on the eight spokes, are each covered by exactly one triangle."""
    from dhjax.render.raster import _eval_pixels

    c = np.array([10.0, 10.0])
    ring = c + 6.0 * np.array([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], float)
    jj, ii = np.meshgrid(np.arange(0, 21), np.arange(0, 21))
    px, py = jnp.asarray(jj, jnp.float32), jnp.asarray(ii, jnp.float32)
    count = np.zeros(jj.shape, int)
    for k in range(8):
        a, b = ring[k], ring[(k + 1) % 8]
        u = (jnp.float32(c[0]), jnp.float32(a[0]), jnp.float32(b[0]))
        v = (jnp.float32(c[1]), jnp.float32(a[1]), jnp.float32(b[1]))
        count += np.asarray(_eval_pixels(px, py, u, v, (1.0, 1.0, 1.0))[0]).astype(int)
    assert count[10, 10] == 1
    inner = (np.abs(jj - 10) < 6) & (np.abs(ii - 10) < 6)
    np.testing.assert_array_equal(count[inner], 1)
