"""UV-space maps: baking agrees with the layout, the procedural albedo has real variety."""

import jax
import numpy as np

import synthetic_common as common
from dhjax.data import synthetic, textures


def test_uv_fields_bake_the_template_into_the_layout():
    assets = common.tiny_assets()
    uv = assets.uv
    model = assets.model
    mask = np.asarray(uv.mask)
    assert 0.3 < mask.mean() < 1.0
    # Texel centres map back into their face's UV triangle with the stored barycentrics.
    S = uv.size
    ii, jj = np.nonzero(mask)
    centre = np.stack([(jj + 0.5) / S, 1 - (ii + 0.5) / S], -1)
    fid = np.asarray(uv.face_id)[ii, jj]
    tri = np.asarray(model.uv_coords)[np.asarray(model.uv_faces)[fid]]
    rebuilt = np.einsum("nk,nkc->nc", np.asarray(uv.bary)[ii, jj], tri)
    np.testing.assert_allclose(rebuilt, centre, atol=1e-5)
    # Eyeball texels lie on the eyeballs (12.2 mm from an eye joint), the face is in front.
    joints = np.asarray(model.j_regressor) @ np.asarray(model.v_template)
    pos = np.asarray(uv.position)
    eye = np.asarray(uv.eye_cos) > -0.99
    d = np.min(np.linalg.norm(pos[eye][:, None] - joints[None, 3:5], axis=-1), 1)
    np.testing.assert_allclose(d, 0.0122, atol=1e-3)
    face = np.asarray(uv.regions["face"]) > 0.99
    assert np.all(pos[face][:, 2] > 0)


def test_skin_tones_cover_light_to_dark_and_textures_differ():
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    skins = jax.vmap(textures.sample_skin)(keys)
    lum = np.asarray(skins["colour"]).mean(1)
    assert lum.min() < 0.25 and lum.max() > 0.7          # very dark to very light skin
    irises = {tuple(row) for row in np.round(np.asarray(skins["iris"]), 1)}
    assert len(irises) >= 4
    # Textures of two identities (albedo_texture inside the compiled identity sampler).
    assets = common.tiny_assets()
    uv = assets.uv
    t1 = np.asarray(synthetic.sample_identity(assets, 0, 0)["uv_albedo"])
    t2 = np.asarray(synthetic.sample_identity(assets, 0, 1)["uv_albedo"])
    assert t1.shape == (uv.size, uv.size, 3) and 0 <= t1.min() and t1.max() <= 1
    assert np.abs(t1 - t2).mean() > 0.01
    # Lips are redder than the cheeks, the pupil is dark, the sclera bright.
    lips = np.asarray(uv.regions["lips"]) > 0.9
    cheek = (np.asarray(uv.regions["face"]) > 0.99) & (np.abs(np.asarray(uv.phi) - 0.7) < 0.1) & (
        np.abs(np.asarray(uv.theta) - 0.55) < 0.04)
    ratio = lambda m: t1[m][:, 0].mean() / t1[m][:, 1].mean()
    assert ratio(lips) > ratio(cheek)
    c = np.asarray(uv.eye_cos)
    iris = t1[c > textures.IRIS_COS + 0.02].mean(1)
    sclera = t1[(c > -0.9) & (c < 0.5)].mean(1)
    assert len(iris) > 0 and iris.mean() < 0.5 < sclera.mean()


def test_position_and_expression_maps_are_linear_in_the_coefficients():
    assets = common.tiny_assets()
    model, uv = assets.model, assets.uv
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300).astype(np.float32), rng.normal(size=300).astype(np.float32)
    pa, pb = (np.asarray(textures.position_map(model, uv, x)) for x in (a, b))
    p0 = np.asarray(textures.position_map(model, uv, np.zeros(300, np.float32)))
    np.testing.assert_allclose(pa + pb - p0, np.asarray(textures.position_map(model, uv, a + b)), atol=2e-6)
    np.testing.assert_allclose(p0, np.asarray(uv.position), atol=1e-6)
    e = rng.normal(size=100).astype(np.float32)
    off = np.asarray(textures.expression_offset_map(model, uv, e))
    assert np.abs(off).max() > 1e-3 and np.all(off[~np.asarray(uv.mask)] == 0)
