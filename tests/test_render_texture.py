"""Tests of dhjax.render.texture (multi-view texture extraction into a UV layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.models import flame
from dhjax.render import camera as C
from dhjax.geometry.mesh import vertex_normals
from dhjax.render.raster import interpolate, rasterize, rasterize_uv, uv_map
from dhjax.render.texture import extract_texture

IMG = 64  # image edge, pixels
TEX = 64  # texture edge, texels


def _smooth_texture(size):
    """A low-frequency RGB texture (bilinear resampling of it is nearly exact)."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    u = (j + 0.5) / size
    v = 1.0 - (i + 0.5) / size
    tex = np.stack(
        [0.3 + 0.5 * u, 0.25 + 0.6 * v, 0.5 + 0.3 * np.sin(2 * np.pi * u) * np.cos(np.pi * v)], -1
    )
    return tex.astype(np.float32)


def _sample_bilinear(tex, uv):
    """Numpy reference of a clamp-to-edge bilinear lookup (texel centres as in rasterize_uv)."""
    Ht, Wt, _ = tex.shape
    x = np.clip(uv[..., 0] * Wt - 0.5, 0, Wt - 1)
    y = np.clip((1 - uv[..., 1]) * Ht - 0.5, 0, Ht - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, Wt - 1), np.minimum(y0 + 1, Ht - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


@pytest.fixture(scope="module")
def head_scene():
    """The default head rendered unlit (image = albedo) from 3 frontal views, and its extraction."""
    model = flame.load()
    tex = _smooth_texture(TEX)
    cams = C.rig_from_angles(
        [-35.0, 0.0, 35.0], [5.0, 0.0, 5.0], 0.6, target=(0.0, -0.03, 0.0), fov_y_deg=30.0, width=IMG, height=IMG
    )
    verts = jnp.broadcast_to(model.v_template, (3,) + model.v_template.shape)
    # Unlit render (image = albedo, i.e. uniform irradiance 1). The eager rasteriser call shares
    # its compiled code with the one inside extract_texture.
    frags = rasterize(verts, model.faces, cams)
    pix_uv = np.asarray(interpolate(model.uv_coords, model.uv_faces, frags))
    masks = np.asarray(frags.mask, np.float32)
    images = _sample_bilinear(tex, pix_uv) * masks[..., None]
    texture, weight = extract_texture(
        images, masks, cams, verts, model.faces, model.uv_coords, model.uv_faces, TEX
    )
    uvf = rasterize_uv(model.uv_coords, model.uv_faces, TEX, TEX)
    pos = np.asarray(uv_map(model.v_template, model.faces, uvf))[0]
    return dict(model=model, tex=tex, cams=cams, verts=verts, images=images, masks=masks,
                texture=np.asarray(texture), weight=np.asarray(weight), pos=pos,
                layout=np.asarray(uvf.mask[0]))


def test_recovers_known_texture(head_scene):
    s = head_scene
    assert s["texture"].shape == (TEX, TEX, 3) and s["texture"].dtype == np.float32
    assert s["weight"].shape == (TEX, TEX) and s["weight"].dtype == np.float32
    assert np.all(np.isfinite(s["texture"])) and np.all(s["weight"] >= 0) and np.all(s["weight"] <= 3)
    well = s["weight"] > 0.5
    assert well.sum() > 1000  # the face and the sides of the head
    err = np.abs(s["texture"] - s["tex"]).max(-1)[well]
    assert np.median(err) < 0.005
    assert np.mean(err < 0.05) > 0.98  # the rest: eyeball/eyelid intersections, silhouettes
    # Texels outside the UV layout are never seen.
    assert np.all(s["weight"][~s["layout"]] == 0)


def test_list_of_cameras_and_shared_vertices_match(head_scene):
    s = head_scene
    cams = [s["cams"][i] for i in range(3)]
    m = s["model"]
    texture, weight = extract_texture(
        s["images"], s["masks"], cams, m.v_template, m.faces, m.uv_coords, m.uv_faces, TEX
    )
    np.testing.assert_allclose(np.asarray(weight), s["weight"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(texture), s["texture"], atol=1e-6)


def test_back_of_head_unseen_and_filled(head_scene):
    s = head_scene
    m = s["model"]
    uvf = rasterize_uv(m.uv_coords, m.uv_faces, TEX, TEX)
    nrm = np.array(uv_map(vertex_normals(m.v_template, m.faces), m.faces, uvf))[0]
    nrm /= np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
    back = s["layout"] & (nrm[..., 2] < -0.7) & (s["pos"][..., 2] < -0.03)
    assert back.sum() > 100
    assert np.all(s["weight"][back] == 0)
    # One named texel: the middle of the back of the head (UV seam at u = 0 / 1, mid height).
    i, j = int(0.4 * TEX), 0
    assert s["layout"][i, j] and s["pos"][i, j, 2] < -0.05 and s["weight"][i, j] == 0
    # fill="mean": unseen texels hold the weighted mean colour of the seen ones.
    w = s["weight"]
    mean = (w[..., None] * s["texture"]).sum((0, 1)) / w.sum()
    np.testing.assert_allclose(s["texture"][w == 0], np.broadcast_to(mean, ((w == 0).sum(), 3)), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Occlusion: a small card in front of a large one.


def _quad(x0, x1, y0, y1, z, u0, u1):
    verts = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], np.float32)
    uv = np.array([[u0, 0.02], [u1, 0.02], [u1, 0.98], [u0, 0.98]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], np.int32)  # counter-clockwise seen from +z
    return verts, uv, faces


@pytest.fixture(scope="module")
def card_scene():
    """Back card (z = 0, 20 cm, red, left half of the UV map) behind a front card (z = 5 cm,
    8 cm, green, right half); a frontal camera and one at 40 degrees azimuth, 0.5 m away."""
    vb, uvb, fb = _quad(-0.1, 0.1, -0.1, 0.1, 0.0, 0.02, 0.48)
    # The front card is off-centre so that its diagonal edge does not pass exactly through
    # pixel centres (the rasteriser can leave such pixels uncovered by both triangles).
    cx, cy = 0.003, -0.002
    vf, uvf, ff = _quad(cx - 0.04, cx + 0.04, cy - 0.04, cy + 0.04, 0.05, 0.52, 0.98)
    verts = np.concatenate([vb, vf])
    uv = np.concatenate([uvb, uvf])
    faces = np.concatenate([fb, ff + 4])
    cams = C.rig_from_angles([0.0, 40.0], [0.0, 0.0], 0.5, fov_y_deg=30.0, width=IMG, height=IMG)
    frags = rasterize(np.broadcast_to(verts, (2,) + verts.shape), faces, cams)
    fid = np.asarray(frags.face_id)
    colours = np.array([[0, 0, 0], [0.8, 0.2, 0.2], [0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.8, 0.2]], np.float32)
    images = colours[fid + 1]  # each card has one colour (background black)
    masks = (fid >= 0).astype(np.float32)
    layout = rasterize_uv(uv, faces, TEX, TEX)
    pos = np.asarray(uv_map(verts, faces, layout))[0]
    on_back = np.asarray(layout.mask[0]) & (pos[..., 2] < 0.01)
    on_front = np.asarray(layout.mask[0]) & (pos[..., 2] > 0.04)
    # Distance from the front card's axis (max norm). Seen from the front camera, the card hides
    # ext < 0.0445 on the back card (0.04 * 0.5 / 0.45).
    ext = np.maximum(np.abs(pos[..., 0] - cx), np.abs(pos[..., 1] - cy))
    return dict(verts=verts, uv=uv, faces=faces, cams=cams, images=images, masks=masks,
                pos=pos, shadow=on_back & (ext < 0.036), rim=on_back & (ext > 0.056) & (ext < 0.09),
                front=on_front & (ext < 0.035))


def _extract(s, views, **kw):
    """Extract from the given views of the card scene; the other view is switched off through
    its mask (all calls keep N = 2, so they share one compilation)."""
    on = np.isin(np.arange(2), views).astype(np.float32)
    masks = s["masks"] * on[:, None, None]
    tex, w = extract_texture(s["images"], masks, s["cams"], s["verts"], s["faces"], s["uv"], s["faces"], TEX, **kw)
    return np.asarray(tex), np.asarray(w)


def test_occluded_texels_get_no_contribution(card_scene):
    s = card_scene
    assert s["shadow"].sum() > 50 and s["rim"].sum() > 50 and s["front"].sum() > 50
    red, green = np.array([0.8, 0.2, 0.2]), np.array([0.2, 0.8, 0.2])
    tex0, w0 = _extract(s, [0])
    # Frontal view: the back card behind the front card is hidden, its rim is seen (red), the
    # front card is seen (green).
    assert np.all(w0[s["shadow"]] == 0)
    assert np.all(w0[s["rim"]] > 0.5) and np.all(w0[s["front"]] > 0.5)
    np.testing.assert_allclose(tex0[s["rim"]], np.broadcast_to(red, (s["rim"].sum(), 3)), atol=1e-4)
    np.testing.assert_allclose(tex0[s["front"]], np.broadcast_to(green, (s["front"].sum(), 3)), atol=1e-4)
    # Without the depth test (huge tolerance) the hidden texels would take the front card's green.
    tex_nz, w_nz = _extract(s, [0], depth_tol=1.0)
    assert np.all(w_nz[s["shadow"]] > 0.5)
    assert np.median(np.abs(tex_nz[s["shadow"]] - green).max(-1)) < 1e-3
    # Two views: weights add up, and the hidden texels take only the oblique view's colour.
    tex1, w1 = _extract(s, [1])
    tex01, w01 = _extract(s, [0, 1])
    np.testing.assert_allclose(w01, w0 + w1, atol=1e-6)
    part = s["shadow"] & (w1 > 0.5)  # hidden from the front, visible at 40 degrees
    assert part.sum() > 20
    np.testing.assert_allclose(tex01[part], tex1[part], atol=1e-6)
    np.testing.assert_allclose(tex01[part], np.broadcast_to(red, (part.sum(), 3)), atol=1e-4)


def test_fill_none_and_min_cos(card_scene):
    s = card_scene
    tex, w = _extract(s, [1], fill="none")
    assert np.all(tex[w == 0] == 0) and np.any(w > 0)
    # The oblique camera sees the cards at angles of 34 to 46 degrees (cos <= 0.83).
    _, w_hi = _extract(s, [1], min_cos=0.9)
    assert np.all(w_hi == 0)


# ----------------------------------------------------------------------------------------------
# Errors.


def test_errors(card_scene):
    s = card_scene
    imgs, msks, cams, v, f, uv = s["images"], s["masks"], s["cams"], s["verts"], s["faces"], s["uv"]
    v2 = np.broadcast_to(v, (2,) + v.shape)
    call = lambda **kw: extract_texture(
        kw.get("images", imgs), kw.get("masks", msks), kw.get("cameras", cams), kw.get("vertices", v2),
        f, uv, f, TEX, **kw.get("opts", {}),
    )
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        call(images=imgs[..., 0])
    with pytest.raises(ValueError, match="2 images, 1 masks, 2 cameras, 2 vertices"):
        call(masks=msks[:1])
    with pytest.raises(ValueError, match="2 images, 2 masks, 1 cameras, 2 vertices"):
        call(cameras=cams[:1])
    with pytest.raises(ValueError, match="2 images, 2 masks, 2 cameras, 3 vertices"):
        call(vertices=np.broadcast_to(v, (3,) + v.shape))
    with pytest.raises(ValueError, match="2 images, 2 masks, 3 cameras"):
        call(cameras=[cams[0], cams[1], cams[0]])
    bad = np.array(v2)
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"finite.*\[1\]"):
        call(vertices=bad)
    with pytest.raises(ValueError, match="camera image size"):
        call(cameras=C.rig_from_angles([0.0, 40.0], [0.0, 0.0], 0.5, width=32, height=IMG))
    with pytest.raises(ValueError, match="fill"):
        call(opts=dict(fill="zeros"))
    with pytest.raises(ValueError, match="min_cos"):
        call(opts=dict(min_cos=1.5))
    with pytest.raises(ValueError, match="uv_faces"):
        extract_texture(imgs, msks, cams, v2, f, uv, f[:1], TEX)
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda im: extract_texture(im, msks, cams, v2, f, uv, f, TEX)[0])(imgs)
