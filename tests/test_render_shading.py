"""Tests of dhjax.render.shading (SH basis and irradiance, texture sampling, render_mesh)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.models import flame
from dhjax.render import camera as C
from dhjax.render.raster import rasterize_uv, uv_map
from dhjax.render.shading import SH_BAND_FACTORS, render_mesh, sample_texture, sh_basis, sh_irradiance

C0, C1, C2, C3, C4 = 0.282095, 0.488603, 1.092548, 0.315392, 0.546274


def _unit(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_sh_basis_explicit_directions():
    z = np.asarray(sh_basis(jnp.array([0.0, 0.0, 1.0])))
    np.testing.assert_allclose(z, [C0, 0, C1, 0, 0, 0, 2 * C3, 0, 0], atol=1e-7)
    x = np.asarray(sh_basis(jnp.array([1.0, 0.0, 0.0])))
    np.testing.assert_allclose(x, [C0, 0, 0, C1, 0, 0, -C3, 0, C4], atol=1e-7)
    y = np.asarray(sh_basis(jnp.array([0.0, 1.0, 0.0])))
    np.testing.assert_allclose(y, [C0, C1, 0, 0, 0, 0, -C3, 0, -C4], atol=1e-7)
    s = 1 / np.sqrt(2.0)
    xy = np.asarray(sh_basis(jnp.array([s, s, 0.0])))
    np.testing.assert_allclose(xy[[4, 8]], [C2 / 2, 0.0], atol=1e-7)
    assert sh_basis(jnp.zeros((2, 5, 3))).shape == (2, 5, 9)


@pytest.mark.peers
def test_sh_basis_matches_scipy():
    special = pytest.importorskip("scipy.special")
    n = _unit(64).astype(np.float64)
    theta = np.arccos(np.clip(n[:, 2], -1, 1))  # polar angle from +z
    phi = np.arctan2(n[:, 1], n[:, 0])  # azimuth from +x

    def complex_y(l, m):
        if hasattr(special, "sph_harm_y"):
            return special.sph_harm_y(l, m, theta, phi)
        return special.sph_harm(m, l, phi, theta)  # older scipy: (m, l, azimuth, polar)

    cols = []
    for l in range(3):
        for m in range(-l, l + 1):
            y = complex_y(l, abs(m))  # includes the Condon-Shortley phase
            if m < 0:
                cols.append(np.sqrt(2) * (-1) ** m * y.imag)
            elif m == 0:
                cols.append(y.real)
            else:
                cols.append(np.sqrt(2) * (-1) ** m * y.real)
    expected = np.stack(cols, -1)
    np.testing.assert_allclose(sh_basis(n.astype(np.float32)), expected, atol=3e-6)


def test_constant_light_gives_constant_irradiance():
    L = np.array([0.2, 0.5, 0.9], np.float32)
    sh = np.zeros((9, 3), np.float32)
    sh[0] = L / C0
    out = sh_irradiance(_unit(100), sh)
    np.testing.assert_allclose(out, np.broadcast_to(L, (100, 3)), rtol=1e-5)


def test_linear_light_exact_lobe():
    # Radiance L(w) = a + b (w . d) (bands 0 and 1 only): E(n) / pi = a + (2/3) b (n . d).
    d = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    a, b = 0.7, 0.6
    sh = np.zeros((9, 3), np.float32)
    sh[0] = a / C0
    sh[1], sh[2], sh[3] = b * d[1] / C1, b * d[2] / C1, b * d[0] / C1
    n = _unit(200, seed=1)
    expected = a + (2.0 / 3.0) * b * (n @ d)
    out = np.asarray(sh_irradiance(n, sh))
    np.testing.assert_allclose(out, np.repeat(expected[:, None], 3, 1), atol=2e-6)
    # Brightest facing the light, darkest facing away, a cosine profile in between.
    assert np.argmax(out[:, 0]) == np.argmax(n @ d) and np.argmin(out[:, 0]) == np.argmin(n @ d)


def test_irradiance_band_factors_by_quadrature():
    """E(n)/pi = (1/pi) int L(w) max(n.w, 0) dw for a random band-limited (l <= 2) radiance.

    The hemisphere around n is integrated with Gauss-Legendre in cos(theta) and a uniform rule in
    phi, both exact for the low-degree polynomial integrand, so the quadrature is exact up to
    float64 rounding and the band factors are checked independently of the formula."""
    rng = np.random.default_rng(3)
    sh = rng.normal(size=(9, 3)).astype(np.float32)
    normals = _unit(6, seed=4)
    mu, wmu = np.polynomial.legendre.leggauss(12)
    mu, wmu = 0.5 * (mu + 1), 0.5 * wmu  # [0, 1]
    nphi = 16
    phi = 2 * np.pi * np.arange(nphi) / nphi
    for n in normals.astype(np.float64):
        t1 = np.cross(n, [0.3, 0.4, 0.5])
        t1 /= np.linalg.norm(t1)
        t2 = np.cross(n, t1)
        st = np.sqrt(1 - mu**2)
        w = (st[:, None, None] * (np.cos(phi)[None, :, None] * t1 + np.sin(phi)[None, :, None] * t2)
             + mu[:, None, None] * n)  # [12, nphi, 3]
        radiance = np.asarray(sh_basis(w.astype(np.float32)), np.float64) @ sh.astype(np.float64)
        weight = (wmu * mu)[:, None] * (2 * np.pi / nphi)
        e_over_pi = np.einsum("ij,ijc->c", weight, radiance) / np.pi
        np.testing.assert_allclose(sh_irradiance(n.astype(np.float32), sh), e_over_pi, atol=2e-5)
    assert SH_BAND_FACTORS[0] == 1.0


def test_sample_texture_texel_centres_and_border_clamp():
    tex = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    Ht, Wt = 4, 5
    ii, jj = np.meshgrid(np.arange(Ht), np.arange(Wt), indexing="ij")
    uv = np.stack([(jj + 0.5) / Wt, 1 - (ii + 0.5) / Ht], -1)
    np.testing.assert_allclose(sample_texture(tex, uv), tex, atol=1e-5)
    # Outside the texture: the edge texels (clamp to edge).
    out = sample_texture(tex, np.array([[-0.5, 2.0], [1.5, -1.0], [0.5 / Wt, 1.2]], np.float32))
    np.testing.assert_allclose(out, [tex[0, 0], tex[-1, -1], tex[0, 0]], atol=1e-5)
    # Half way between two horizontal neighbours.
    mid = sample_texture(tex, np.array([1.0 / Wt, 1 - 0.5 / Ht], np.float32))
    np.testing.assert_allclose(mid, 0.5 * (tex[0, 0] + tex[0, 1]), atol=1e-5)


@pytest.mark.peers
def test_sample_texture_matches_scipy_interior():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    Ht, Wt = 9, 13
    tex = rng.normal(size=(Ht, Wt, 3)).astype(np.float32)
    uv = rng.uniform([0.5 / Wt, 0.5 / Ht], [1 - 0.5 / Wt, 1 - 0.5 / Ht], size=(200, 2)).astype(np.float32)
    rows = (1 - uv[:, 1]) * Ht - 0.5
    cols = uv[:, 0] * Wt - 0.5
    expected = np.stack([ndimage.map_coordinates(tex[..., c], [rows, cols], order=1) for c in range(3)], -1)
    np.testing.assert_allclose(sample_texture(tex, uv), expected, atol=1e-5)


def test_sample_texture_gradients():
    rng = np.random.default_rng(1)
    tex = jnp.asarray(rng.normal(size=(6, 7, 2)).astype(np.float32))
    uv = jnp.array([[0.31, 0.62], [0.55, 0.27]], jnp.float32)  # interior, off texel-centre lines
    g_tex = jax.grad(lambda t: jnp.sum(sample_texture(t, uv)))(tex)
    np.testing.assert_allclose(jnp.sum(g_tex), 2 * 2, atol=1e-5)  # bilinear weights sum to 1
    assert int(jnp.sum(g_tex[..., 0] > 0)) == 8  # 4 texels per sample
    f = lambda q: jnp.sum(sample_texture(tex, q) * jnp.array([1.0, -2.0]))
    g_uv = jax.grad(f)(uv)
    eps = 1e-3
    for i in range(2):
        for k in range(2):
            d = jnp.zeros_like(uv).at[i, k].set(eps)
            fd = (f(uv + d) - f(uv - d)) / (2 * eps)
            np.testing.assert_allclose(g_uv[i, k], fd, rtol=1e-2, atol=1e-2)
    assert np.all(np.isfinite(np.asarray(g_uv)))


@pytest.fixture(scope="module")
def sphere_scene():
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    verts = np.asarray(m.vertices, np.float32)[None]
    faces = np.asarray(m.faces, np.int32)
    d = 1.5
    R, t = C.look_at(jnp.array([0.0, 0.0, d]), jnp.zeros(3))
    cam = C.camera_from_fov(30.0, 64, 64, R, t)
    sh = np.zeros((9, 3), np.float32)
    sh[0] = 0.5 / C0
    sh[2] = 0.5 / C1  # light from +z, towards the camera
    return verts, faces, cam, sh, d


def test_render_sphere_lit_from_front(sphere_scene):
    verts, faces, cam, sh, d = sphere_scene
    out = render_mesh(verts, faces, cam, sh_coeffs=sh, background=jnp.array([0.1, 0.2, 0.3]))
    img, mask = np.asarray(out["image"][0]), np.asarray(out["mask"][0, ..., 0]) > 0
    assert out["image"].shape == (1, 64, 64, 3) and out["mask"].shape == (1, 64, 64, 1)
    # Radiance 0.5 + 0.5 z: white Lambertian shading is 0.5 + (1/3) n_z, 0.833 at the centre.
    np.testing.assert_allclose(img[31:33, 31:33], 0.5 + 1 / 3, atol=5e-3)
    interior = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    rim = mask & ~interior
    assert img[rim].mean() < img[31:33, 31:33].mean() - 0.15
    np.testing.assert_allclose(img[~mask], np.broadcast_to([0.1, 0.2, 0.3], img[~mask].shape))
    n = np.asarray(out["normals"][0])
    np.testing.assert_allclose(n[31:33, 31:33], np.broadcast_to([0, 0, 1], (2, 2, 3)), atol=0.05)
    np.testing.assert_allclose(np.linalg.norm(n[mask], axis=-1), 1.0, atol=1e-5)

    # Mask area. The mesh lies between its inscribed sphere (radius r_in = smallest distance of
    # a face plane from the centre) and the circumscribed one (r = 0.3); a sphere of radius s
    # at distance d on the optical axis projects to a disc of radius f s / sqrt(d^2 - s^2).
    # Pixel centres inside a disc of radius rho number between pi (rho - sqrt(2)/2)^2 and
    # pi (rho + sqrt(2)/2)^2 (each counted pixel square lies within sqrt(2)/2 of the disc).
    v = verts[0].astype(np.float64)
    tri = v[faces]
    nrm = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    r_in = np.min(np.abs(np.sum(nrm / np.linalg.norm(nrm, axis=1, keepdims=True) * tri[:, 0], 1)))
    f = float(cam.K[1, 1])
    rho_in = f * r_in / np.sqrt(d * d - r_in**2)
    rho_out = f * 0.3 / np.sqrt(d * d - 0.09)
    h = np.sqrt(2) / 2
    assert np.pi * (rho_in - h) ** 2 <= mask.sum() <= np.pi * (rho_out + h) ** 2
    # Depth at the centre is the distance to the front of the sphere.
    np.testing.assert_allclose(out["depth"][0, 31:33, 31:33], d - 0.3, atol=3e-3)


def test_render_albedo_sources_and_gradients(sphere_scene):
    verts, faces, cam, sh, _ = sphere_scene
    V = verts.shape[1]
    colours = np.tile(np.array([0.2, 0.4, 0.8], np.float32), (V, 1))
    unlit = render_mesh(verts, faces, cam, vertex_colors=colours)
    m = np.asarray(unlit["mask"][0, ..., 0]) > 0
    np.testing.assert_allclose(np.asarray(unlit["image"][0])[m], np.broadcast_to(colours[0], (m.sum(), 3)), atol=1e-6)
    # Texture path: a constant texture with spherical-projection UVs gives the same image.
    v = verts[0]
    uv = np.stack([0.5 + 0.5 * np.arctan2(v[:, 0], v[:, 2]) / np.pi, 0.5 + np.arcsin(v[:, 1] / 0.3) / np.pi], -1)
    tex = np.tile(colours[0], (8, 16, 1)).astype(np.float32)
    textured = render_mesh(verts, faces, cam, uv_coords=uv.astype(np.float32), uv_faces=faces,
                           albedo_texture=tex, sh_coeffs=sh)
    lit = render_mesh(verts, faces, cam, vertex_colors=colours, sh_coeffs=sh)
    np.testing.assert_allclose(textured["image"], lit["image"], atol=1e-5)

    # Gradients: the image is linear in SH and albedo.
    def loss(s, col):
        return jnp.sum(render_mesh(verts, faces, cam, vertex_colors=col, sh_coeffs=s)["image"])

    g_sh, g_col = jax.grad(loss, argnums=(0, 1))(jnp.asarray(sh), jnp.asarray(colours))
    normals = lit["normals"][0][m]
    basis = np.asarray(sh_basis(normals)) * np.asarray(SH_BAND_FACTORS)
    expected = np.einsum("pk,c->kc", basis, colours[0])
    np.testing.assert_allclose(g_sh, expected, rtol=1e-4, atol=1e-3)
    assert np.all(np.isfinite(np.asarray(g_col))) and float(jnp.sum(g_col)) > 0

    def loss_v(vv):
        return jnp.sum(render_mesh(vv, faces, cam, vertex_colors=colours, sh_coeffs=sh)["image"])

    g_v = jax.grad(loss_v)(jnp.asarray(verts))
    assert np.all(np.isfinite(np.asarray(g_v))) and np.abs(np.asarray(g_v)).max() > 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="normals"):
        sh_basis(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="sh_coeffs"):
        sh_irradiance(jnp.zeros((4, 3)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="texture"):
        sample_texture(jnp.zeros((4, 4)), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="uv must"):
        sample_texture(jnp.zeros((4, 4, 3)), jnp.zeros((2, 3)))


def test_render_baked_texture_matches_vertex_colours():
    """Bake smooth per-vertex colours of the default head into a texture through its UV layout,
    then render the head from the front with the vertex colours and with the texture."""
    m = flame.load()
    verts = np.asarray(m.v_template, np.float32)
    faces, uv, uv_faces = np.asarray(m.faces), np.asarray(m.uv_coords), np.asarray(m.uv_faces)
    k = 40.0  # rad/m: colours change by O(1) over ~8 cm, yet are smooth at the ~6 mm edge scale
    colours = (0.5 + 0.5 * np.sin(k * verts.astype(np.float64) + np.array([0.0, 2.0, 4.0]))).astype(np.float32)

    # 256^2 texels: a skin UV triangle is ~3 texels across, so sampling errors are small but
    # not zero; a 96 x 96 front view keeps ~4000 interior pixels and the test at ~10 s.
    T = 256
    uv_frags = rasterize_uv(uv, uv_faces, T, T)
    texture = np.asarray(uv_map(colours, faces, uv_frags)[0])  # [T, T, 3], 0 outside the layout
    assert 0.7 < np.asarray(uv_frags.mask).mean() < 0.95

    R, t = C.look_at(jnp.array([0.0, -0.05, 0.7]), jnp.array([0.0, -0.05, 0.0]))
    cam = C.camera_from_fov(22.0, 96, 96, R, t)
    by_vertex = render_mesh(verts[None], faces, cam, vertex_colors=colours)
    kw = dict(uv_coords=uv, uv_faces=uv_faces)
    by_texture = render_mesh(verts[None], faces, cam, albedo_texture=texture, **kw)
    flipped = render_mesh(verts[None], faces, cam, albedo_texture=texture[::-1].copy(), **kw)

    # Covered pixels whose 3 x 3 neighbourhood is covered too (away from the silhouette).
    mask = np.asarray(by_vertex["mask"][0, ..., 0]) > 0
    pad = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for di in range(3):
        for dj in range(3):
            inner &= pad[di : di + mask.shape[0], dj : dj + mask.shape[1]]
    assert inner.sum() > 3000
    ref = np.asarray(by_vertex["image"][0])[inner]
    diff = np.abs(np.asarray(by_texture["image"][0])[inner] - ref)
    diff_flipped = np.abs(np.asarray(flipped["image"][0])[inner] - ref)

    # Expected size of the difference. Both renders evaluate the same function g, the colour
    # that is linear in UV on every UV triangle: perspective-correct barycentrics interpolate
    # colours and UVs alike, and rasterize_uv's barycentrics are linear in UV, so texel centres
    # hold g exactly. Bilinear sampling reproduces linear functions exactly, so the texture
    # render differs from g only by float32 rounding (~1e-6) and where the cell of 2 x 2 texel
    # centres around the sample point p crosses UV edges, at which g's gradient jumps (g is
    # continuous, so the jump is normal to the edge). Bounds, with h = 1 / T the texel size:
    # * one edge crossing with gradient jump a: in 1D, linear interpolation over [0, h] of a
    #   kink of size a has error <= a h / 4; with the median per-edge, per-channel jump a_med
    #   (from the mesh, ~0.28 per UV unit) and at most ~2 crossings per cell, the median error
    #   is below a_med h / 2 (~5e-4);
    # * in general, g(c) = g(p) + G_p . (c - p) + r(c) at the texel centres c (G_p: the UV
    #   gradient of p's triangle), |r(c)| <= |c - p| J with J the spread of the UV gradients of
    #   the triangles in the cell, |c - p| <= sqrt(2) h and the weights sum to 1, so
    #   |error| <= sqrt(2) h J. A cell is smaller than the UV triangles, so it lies in the star
    #   of one UV vertex and J is taken per UV vertex: the median star gives a bound for
    #   typical samples (~0.013, used for the 99th percentile), the largest one a bound for all
    #   (~0.12).
    # A texel-centre convention off by half a texel (or nearest-texel sampling) instead moves
    # samples by ~h / 2, an error of order |G| h / 4 (|G| ~ 3.7 per UV unit; measured median
    # ~2.4e-3), which the median bound rejects.
    P = uv[uv_faces].astype(np.float64)
    col = colours[faces].astype(np.float64)
    G = np.linalg.solve(np.stack([P[:, 1] - P[:, 0], P[:, 2] - P[:, 0]], 1),
                        np.stack([col[:, 1] - col[:, 0], col[:, 2] - col[:, 0]], 1))  # [F, 2, 3]
    # Per-edge jumps: UV edges shared by exactly two faces.
    edges = np.sort(uv_faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 3, 2), axis=-1).reshape(-1, 2)
    key = edges[:, 0].astype(np.int64) * len(uv) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    twin = np.nonzero(key[order][1:] == key[order][:-1])[0]
    fa, fb = order[twin] // 3, order[twin + 1] // 3
    a_med = np.median(np.linalg.norm(G[fa] - G[fb], axis=1))
    # Per-vertex gradient spread over the faces that share the UV vertex.
    g_lo = np.full((len(uv), 2, 3), np.inf)
    g_hi = np.full((len(uv), 2, 3), -np.inf)
    for c in range(3):
        np.minimum.at(g_lo, uv_faces[:, c], G)
        np.maximum.at(g_hi, uv_faces[:, c], G)
    used = np.isfinite(g_lo[:, 0, 0])
    spread = np.linalg.norm(g_hi[used] - g_lo[used], axis=1).max(-1)
    h = 1.0 / T
    median_bound = a_med * h / 2
    typical, worst = np.sqrt(2) * h * np.median(spread), np.sqrt(2) * h * spread.max()
    assert median_bound < 1e-3  # the bound itself is tiny
    assert np.median(diff) < median_bound, (np.median(diff), median_bound)
    assert np.percentile(diff, 99) < typical, (np.percentile(diff, 99), typical)
    assert diff.max() < worst, (diff.max(), worst)
    # A texture flipped upside down (v -> 1 - v) samples unrelated colours: the test can fail.
    assert np.median(diff_flipped) > 0.05, np.median(diff_flipped)
