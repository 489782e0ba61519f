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


def _bake_before_issue_16(fields, faces, attrs):
    """The former `data.textures.bake`, verbatim: the reference the one baking must reproduce."""
    import jax.numpy as jnp

    attrs = jnp.asarray(attrs, jnp.float32)
    vids = jnp.asarray(faces)[jnp.maximum(fields.face_id, 0)]          # [S, S, 3]
    vals = attrs[..., vids, :]                                           # [..., S, S, 3, C]
    out = jnp.einsum("...hwkc,hwk->...hwc", vals, fields.bary, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(fields.mask[..., None], out, 0.0)


def test_one_uv_baking_reproduces_both_former_ones_on_the_default_head():
    """`textures.bake` and `render.raster.uv_map` are one implementation (`raster.bake_uv`): it
    gives the former `textures.bake` bit for bit, and the former `uv_map` (= `raster.interpolate`
    on UV fragments, another summation order) to float32 rounding."""
    from dhjax.models import flame
    from dhjax.render import raster

    model = flame.load()
    S = 64
    fields = textures.uv_fields(model, S)
    frags = raster.rasterize_uv(model.uv_coords, model.uv_faces, S, S)
    np.testing.assert_array_equal(np.asarray(frags.face_id[0]), np.asarray(fields.face_id))
    V = model.num_vertices
    rng = np.random.default_rng(0)
    cases = {"template": np.asarray(model.v_template), "lbs_weights": np.asarray(model.lbs_weights),
             "batched": rng.normal(size=(3, V, 4)).astype(np.float32)}
    for name, attrs in cases.items():
        old = np.asarray(_bake_before_issue_16(fields, model.faces, attrs))
        new = np.asarray(textures.bake(fields, model.faces, attrs))
        np.testing.assert_array_equal(new, old, err_msg=name)
        jitted = np.asarray(jax.jit(textures.bake)(fields, model.faces, attrs))
        np.testing.assert_array_equal(jitted, old, err_msg=name)
        via_frags = np.asarray(raster.uv_map(attrs, model.faces, frags))
        np.testing.assert_array_equal(via_frags, old if old.ndim == 4 else old[None], err_msg=name)
        former_uv_map = np.asarray(raster.interpolate(attrs, model.faces, frags))
        scale = np.abs(former_uv_map).max()
        np.testing.assert_allclose(via_frags, former_uv_map, rtol=0, atol=4e-7 * scale, err_msg=name)
        assert np.mean(np.asarray(fields.mask)) > 0.3 and np.abs(old).max() > 0
