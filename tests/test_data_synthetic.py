"""Synthetic data: determinism, ground truth that agrees with the model, part labels, rigs."""

import jax.numpy as jnp
import numpy as np
import pytest

import synthetic_common as common
from dhjax.data import hair as hair_lib
from dhjax.data import synthetic
from dhjax.models import flame
from dhjax.render import camera as camera_lib
from dhjax.render import raster, shading

L = synthetic.LABEL


def _camera(s):
    H, W = s["image"].shape[:2]
    return camera_lib.make_camera(s["K"], s["R"], s["t"], W, H)


def _model_depth(assets, s):
    """Depth of the base model's mesh from the sample's parameters, rasterised independently."""
    base = synthetic.base_model(assets)
    v = flame.forward(base, s["shape"][None], s["expression"][None], s["pose"][None],
                      s["translation"][None]).vertices
    cam = _camera(s)
    return v, raster.rasterize(v, base.faces, cam, capacity=synthetic.render_capacity(v[0], base.faces, cam))


# What each synthetic.GENERATOR_VERSION draws and renders for the test config
# (synthetic_common.fingerprint: image mean RGB, mask mean, depth under the mask, shape[:3],
# expression[:3], SH sum) and one identity's arrays (identity_fingerprint), each compared within
# its tolerances; recorded on a 2-core x86 CPU with jax 0.10.2.
PINNED = {
    1: {"multiview first": [0.371724, 0.394531, 0.269399, 0.390869, 0.953274, 0.065929, -0.301669, -0.912913,
                            -0.028401, 0.066045, -2.097299, 25.200403],
        "multiview last": [0.225795, 0.244883, 0.264145, 0.289551, 0.91443, -0.190458, 0.139343, 1.98221,
                           0.160124, -0.427027, 0.691419, 20.193394],
        "video last": [0.457868, 0.440848, 0.415195, 0.240723, 0.523696, -1.159538, 0.625521, 1.834479,
                       0.20421, 0.848658, -0.160692, 18.451107],
        # identity_fingerprint: albedo mean and std RGB, hair colour, iris, hair and beard thickness
        # (mm), neutral UV position (mm)
        "identity 5": [0.458691, 0.341261, 0.205372, 0.174931, 0.166485, 0.120099, 0.745223, 0.587145, 0.338738,
                       0.416728, 0.328996, 0.131598, 21.72687, 2.801747, -0.132508, -13.467844, 14.458593]},
}


def test_generator_output_is_pinned_to_its_version():
    """The dataset caches key on GENERATOR_VERSION, so a change of output without a raise would
    let a cache serve the old generator's data as the new one's."""
    g, v = common.multiview(), common.video()
    got = {"multiview first": common.fingerprint(g[0]), "multiview last": common.fingerprint(g[len(g) - 1]),
           "video last": common.fingerprint(v[len(v) - 1]),
           "identity 5": common.identity_fingerprint(g.identity(5))}     # number 5 has a beard
    common.check_pinned(got, PINNED, synthetic.GENERATOR_VERSION, "synthetic.GENERATOR_VERSION",
                        atol={"identity 5": common.IDENTITY_ATOL})


def test_same_seed_and_index_give_the_same_bytes():
    cfg = common.tiny_config()
    a = synthetic.MultiviewGenerator(cfg, common.tiny_assets())
    b = synthetic.MultiviewGenerator(cfg, common.tiny_assets())     # a fresh "host"
    for index in (5, 40):
        sa, sb = a[index], b[index]
        assert sorted(sa) == sorted(synthetic.SAMPLE_KEYS)
        for k in sa:
            assert sa[k].tobytes() == sb[k].tobytes(), k
    # Another seed gives another sample.
    cfg2 = common.tiny_config()
    cfg2.seed = 1
    other = synthetic.MultiviewGenerator(cfg2, common.tiny_assets())[5]
    assert not np.array_equal(other["image"], a[5]["image"])
    assert not np.array_equal(other["shape"], a[5]["shape"])


def test_order_of_access_does_not_matter_and_groups_match_single_views():
    g = common.multiview()
    group = g.render_group(1, 0, [0, 17])
    fresh = synthetic.MultiviewGenerator(common.tiny_config(), common.tiny_assets())
    single = fresh[g.n_cameras * 1 + 17]
    assert group[1]["view"] == 17 and group[1]["item"] == 1
    np.testing.assert_array_equal(group[1]["seg"], single["seg"])
    np.testing.assert_allclose(group[1]["image"], single["image"], atol=1e-5)
    np.testing.assert_allclose(group[1]["depth"], single["depth"], atol=1e-6)


def test_depth_and_labels_agree_with_the_mesh_of_the_parameters():
    g = common.multiview()
    assets = g.assets
    checked = 0
    for index in (0, 6, 20, 33, 62):
        s = g[index]
        _, frags = _model_depth(assets, s)
        depth_ref = np.asarray(frags.depth[0])
        # Masks agree with depth and labels.
        np.testing.assert_array_equal(s["mask"] > 0, s["depth"] > 0)
        np.testing.assert_array_equal(s["seg"] > 0, s["mask"] > 0)
        # Skin and eyes are the model's own surface: same depth as the independent render.
        own = np.isin(s["seg"], [L["face"], L["eyes"], L["neck"]])
        assert own.sum() > 50
        np.testing.assert_allclose(s["depth"][own], depth_ref[own], atol=2e-5)
        # Hair and mouth interior are never behind the visible model surface.
        extra = np.isin(s["seg"], [L["hair"], L["mouth"]]) & (depth_ref > 0)
        assert np.all(s["depth"][extra] <= depth_ref[extra] + 2e-5)
        # Unprojected depth lies on the posed mesh where the model is visible.
        ii, jj = np.nonzero(own)
        pts = camera_lib.unproject(_camera(s), np.stack([jj, ii], -1).astype(np.float32)[None],
                                   s["depth"][own][None])[0]
        fid = np.asarray(frags.face_id[0])[own]
        v, _ = _model_depth(assets, s)
        tri = np.asarray(v[0])[np.asarray(assets.model.faces)[fid]]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        plane = np.abs(np.einsum("nc,nc->n", np.asarray(pts) - tri[:, 0], n))
        assert plane.max() < 5e-5
        checked += 1
    assert checked == 5


def test_frontal_view_shows_face_hair_and_eyes_and_mouth_only_when_open():
    g = common.multiview()
    assets = g.assets
    ident = g.identity(0)
    cam = g.cameras[np.array([6])]                  # frontal arc, near the middle
    E = assets.model.num_expression
    closed = dict(expression=jnp.zeros(E), pose=jnp.zeros((5, 3)), translation=jnp.zeros(3),
                  **synthetic.sample_light(synthetic.key(0, synthetic.STREAM_LIGHT, 0)))
    opened = dict(closed, pose=closed["pose"].at[2, 0].set(0.3))
    seg_c = np.asarray(synthetic.render_views(assets, ident, closed, cam)["seg"][0])
    seg_o = np.asarray(synthetic.render_views(assets, ident, opened, cam)["seg"][0])
    assert (seg_c == L["mouth"]).sum() == 0
    assert (seg_o == L["mouth"]).sum() > 3
    for lab in ("face", "eyes", "neck"):
        assert (seg_c == L[lab]).sum() > 0, lab


def test_mouth_interior_is_inside_the_head():
    """Winding number of the closed head surface (neck capped by its centre) around the
    mouth-interior vertices: 1 inside."""
    assets = common.tiny_assets()
    base = synthetic.base_model(assets)
    v = np.asarray(base.v_template, np.float64)
    f = np.asarray(base.faces)
    eyes = np.asarray(base.regions["eyes"])
    f = f[~eyes[f].any(1)]
    # Cap the open neck: fan from the centroid of the boundary.
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    keyed = {tuple(e) for e in edges.tolist()}
    boundary = [e for e in edges.tolist() if (e[1], e[0]) not in keyed]
    cap = len(v)
    v = np.concatenate([v, v[np.unique(np.array(boundary))].mean(0, keepdims=True)])
    f = np.concatenate([f, np.array([[b, a, cap] for a, b in boundary])])
    pts = np.asarray(assets.model.v_template)[assets.n_vertices:]
    tri = v[f][None] - pts[:, None, None]
    a, b, c = tri[:, :, 0], tri[:, :, 1], tri[:, :, 2]
    la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
    num = np.einsum("pfc,pfc->pf", a, np.cross(b, c))
    den = la * lb * lc + np.einsum("pfc,pfc->pf", a, b) * lc + np.einsum("pfc,pfc->pf", b, c) * la + \
        np.einsum("pfc,pfc->pf", c, a) * lb
    winding = 2 * np.arctan2(num, den).sum(1) / (4 * np.pi)
    np.testing.assert_allclose(winding, 1.0, atol=1e-6)


def test_hair_shell_tapers_to_zero_and_stays_smooth():
    assets = common.tiny_assets()
    faces = np.asarray(assets.hair_faces)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    tmpl = np.asarray(assets.model.v_template)[np.asarray(assets.hair_vids)]
    edge_len = np.linalg.norm(tmpl[edges[:, 0]] - tmpl[edges[:, 1]], axis=1)
    styles = set()
    for n in range(12):
        ident = synthetic.sample_identity(assets, 3, n)
        t = np.asarray(ident["hair_thickness"])
        styles.add(int(ident["hair_style"]))
        assert t.min() >= 0 and t.max() < 0.06
        # Boundary of the superset (vertices outside every style's region) is at zero.
        hw = np.asarray(hair_lib.hair_weight(assets.hair_phi, assets.hair_theta, hair_lib.max_hair_style()))
        assert np.all(t[hw == 0] == 0)
        # No spikes: the shell rises no steeper than a 76-degree wall (slope 4) anywhere.
        dt = np.abs(t[edges[:, 0]] - t[edges[:, 1]])
        # (A shell that does not taper would jump by its full length, up to 3.6 cm, across one
        # ~7 mm edge: slope > 5.)
        assert np.all(dt <= 4.0 * edge_len), (n, (dt / edge_len).max())
        # Dead faces (all vertices at zero) are collapsed, so they cannot be drawn.
        live = np.asarray(ident["hair_faces"])
        dead = (t[faces] <= 1e-5).all(1)
        assert np.all(live[dead] == 0) and np.all(live[~dead] == faces[~dead])
    assert len(styles) >= 3


def test_uv_maps_agree_with_the_mesh_on_random_surface_points():
    g = common.multiview()
    assets = g.assets
    s = g[0]
    base = synthetic.base_model(assets)
    S = s["uv_position"].shape[0]
    assert s["uv_position"].shape == (S, S, 3) == s["uv_albedo"].shape == s["uv_expression_offset"].shape
    rng = np.random.default_rng(0)
    faces = np.asarray(base.faces)
    uv_faces, uv_coords = np.asarray(base.uv_faces), np.asarray(base.uv_coords)
    fid = rng.integers(0, len(faces), 4000)
    w = rng.dirichlet(np.ones(3), 4000).astype(np.float32)
    uv = np.einsum("nk,nkc->nc", w, uv_coords[uv_faces[fid]])
    neutral = flame.forward(base, s["shape"][None]).vertices[0]
    posed0 = flame.forward(base, s["shape"][None], s["expression"][None]).vertices[0]
    p_ref = np.einsum("nk,nkc->nc", w, np.asarray(neutral)[faces[fid]])
    off_ref = np.einsum("nk,nkc->nc", w, np.asarray(posed0 - neutral)[faces[fid]])
    # Keep points whose four bilinear texels are inside the layout.
    mask = np.asarray(assets.uv.mask)
    x = np.clip(uv[:, 0] * S - 0.5, 0, S - 1)
    y = np.clip((1 - uv[:, 1]) * S - 0.5, 0, S - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, S - 1), np.minimum(y0 + 1, S - 1)
    inside = mask[y0, x0] & mask[y0, x1] & mask[y1, x0] & mask[y1, x1]
    assert inside.mean() > 0.8
    p_map = np.asarray(shading.sample_texture(s["uv_position"], uv))
    off_map = np.asarray(shading.sample_texture(s["uv_expression_offset"], uv))
    err = np.linalg.norm(p_map - p_ref, axis=1)[inside]
    # A 64 x 64 map has texels of ~1 cm on the head: bilinear lookups agree to a few mm.
    assert np.median(err) < 1.5e-3 and np.percentile(err, 95) < 5e-3, (np.median(err), err.max())
    oerr = np.linalg.norm(off_map - off_ref, axis=1)[inside]
    assert np.percentile(oerr, 95) < 1e-3
    # Texels outside the layout hold zeros.
    assert np.all(s["uv_position"][~mask] == 0)


def test_lighting_varies_and_images_are_plausibly_exposed():
    g = common.multiview()
    shs = [np.asarray(g.frame(i, 0)["sh"]) for i in range(3)]
    assert not np.allclose(shs[0], shs[1])
    s = g[6]
    fg = s["mask"] > 0
    mean = s["image"][fg].mean()
    assert 0.08 < mean < 0.9
    assert (s["image"][fg] >= 1.0).mean() < 0.2       # not blown out


def test_video_is_smooth_with_constant_intrinsics_per_sequence():
    v = common.video()
    a, b = v[0], v[1]
    c = v[v.n_frames]                                 # sequence 1, frame 0
    np.testing.assert_array_equal(a["K"], b["K"])
    assert not np.allclose(a["K"], c["K"])            # focal length differs between sequences
    np.testing.assert_array_equal(a["shape"], b["shape"])
    assert not np.array_equal(a["shape"], c["shape"])
    # Consecutive frames: small changes of pose and camera.
    assert np.abs(a["pose"] - b["pose"]).max() < 0.1
    centre = lambda s: -s["R"].T @ s["t"]
    assert np.linalg.norm(centre(a) - centre(b)) < 0.02
    assert a["frame"] == 0 and b["frame"] == 1 and c["item"] != a["item"]
    seq = v.sequence(0)
    assert seq["motion"]["expression"].shape == (v.n_frames, 100)


def test_rig_has_frontal_and_upper_cameras_looking_at_the_head():
    g = common.multiview()
    cams = g.cameras
    assert cams.batch_shape == (28,)
    centres = np.asarray(camera_lib.camera_centre(cams))
    assert np.all(np.abs(centres[:14, 1]) < 0.2) and np.all(centres[14:, 1] > 0.3)
    uv, depth = camera_lib.project(cams, jnp.zeros((28, 1, 3)))
    assert np.all(np.asarray(depth) > 0)
    assert np.all(np.abs(np.asarray(uv)[:, 0] - 31.5) < 10)


def test_out_of_range_index_is_a_clear_error():
    with pytest.raises(IndexError, match="out of range"):
        common.multiview()[10 ** 6]


def test_model_without_regions_is_refused():
    m = flame.load()
    with pytest.raises(ValueError, match="region"):
        synthetic.build_assets(m.replace(regions=None), 32)


# ----------------------------------------------------------------------------------------------
# The identity sampler: size correlated with what an image shows (issue 23 item 1).

N_TRAITS = 2000


def _traits(sampler, n=N_TRAITS, seed=0, n_extra=0, beard_prob=0.45, shape_std=1.0):
    """identity_traits of identities 0..n-1 of `seed`, vmapped (no textures: seconds)."""
    import jax

    base = synthetic.key(seed, synthetic.STREAM_IDENTITY)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))
    out = jax.vmap(lambda k: synthetic.identity_traits(k, 300, n_extra, shape_std, beard_prob, sampler))(keys)
    return np.asarray(out["shape"], np.float64), np.asarray(out["beard"]["style"]) > 0, np.asarray(out["factor"])


def _z(n_tests, alpha=1e-3):
    """Two-sided normal quantile for a family of n_tests checks at overall level alpha (Bonferroni)."""
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / (2 * n_tests)))


def test_semantic_shape_component_names_follow_the_default_head():
    # The order of head_default._semantic_shape_fields (its comment lists it) and its peaks.
    from dhjax.models import head_default

    assert len(synthetic.SEMANTIC_SHAPE_COMPONENTS) == len(head_default.SHAPE_SEMANTIC_PEAKS) == 18
    c = synthetic.SEMANTIC_SHAPE_COMPONENTS
    assert (c[0], c[1], c[7], c[8], c[11], c[15]) == ("size", "width", "jaw_width", "chin", "brow_ridge",
                                                     "neck_thickness")


def test_correlated_sampler_correlates_size_with_visible_traits_as_designed():
    shape, _, factor = _traits("correlated")
    n = len(shape)
    corr = synthetic.identity_correlation()       # [19, 19] over (m, z_0 .. z_17)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    assert np.linalg.eigvalsh(corr).min() > 0
    names = synthetic.SEMANTIC_SHAPE_COMPONENTS
    want = corr[1, 1:]                            # corr(size, z_k): 0.60 x loading_k
    assert want[names.index("brow_ridge")] > 0.25 and want[names.index("neck_thickness")] > 0.25
    assert want[names.index("forehead")] < 0 and want[names.index("cheekbones")] < 0
    # Fisher z of a sample correlation: ~N(atanh(rho), 1 / (n - 3)); one family of 17 + 18 checks.
    tol = _z(35) / np.sqrt(n - 3)
    got = np.corrcoef(shape[:, :18].T)[0, 1:]
    dz = np.arctanh(got) - np.arctanh(want[1:])
    assert np.all(np.abs(dz) < tol), dict(zip(names[1:], np.round(got - want[1:], 3)))
    # Every designed non-zero correlation is larger than the tolerance, so its sign is tested too.
    nonzero = want[1:] != 0
    assert np.all(np.abs(np.arctanh(want[1:][nonzero])) > tol)
    assert np.all(np.sign(got[nonzero]) == np.sign(want[1:][nonzero]))
    # The returned factor is the m of the design.
    gm = np.array([np.corrcoef(factor, shape[:, k])[0, 1] for k in range(18)])
    assert np.all(np.abs(np.arctanh(gm) - np.arctanh(corr[0, 1:])) < tol), np.round(gm - corr[0, 1:], 3)
    # Independent: no correlation at all (same tolerance around 0).
    ind, _, f_ind = _traits("independent")
    assert np.all(np.abs(np.arctanh(np.corrcoef(ind[:, :18].T)[0, 1:])) < tol)
    assert np.all(np.isnan(f_ind))


def test_both_samplers_keep_every_shape_marginal_normal_with_shape_std():
    std = 0.7
    for sampler in synthetic.IDENTITY_SAMPLERS:
        shape, _, _ = _traits(sampler, shape_std=std)
        n, S = shape.shape
        z = _z(2 * S)
        # Means: N(0, std^2 / n); variances: s^2 / std^2 ~ 1 +- sqrt(2 / (n - 1)).
        assert np.all(np.abs(shape.mean(0)) < z * std / np.sqrt(n)), sampler
        assert np.all(np.abs(shape.var(0, ddof=1) / std ** 2 - 1) < z * np.sqrt(2 / (n - 1))), sampler
        # Normal, not just the right two moments: the size and brow-ridge components' quartiles.
        for k in (0, 11):
            q = np.quantile(shape[:, k] / std, [0.25, 0.75])
            # SE of a sample quartile of N(0, 1): sqrt(p (1 - p) / n) / pdf(0.674) = 0.0305 at n = 2000.
            np.testing.assert_allclose(q, [-0.6745, 0.6745], atol=_z(8) * np.sqrt(0.1875 / n) / 0.3178)


def test_beards_become_more_frequent_with_size_and_keep_their_overall_rate():
    from scipy.stats import norm

    p = 0.45
    shape, beard, factor = _traits("correlated", beard_prob=p)
    n = len(beard)
    z = _z(6)
    assert abs(beard.mean() - p) < z * np.sqrt(p * (1 - p) / n)
    # Designed point-biserial correlation of the beard indicator with size:
    # pdf(t) * rho_beard * loading_size / sqrt(p (1 - p)), t the probit threshold.
    rho = synthetic.BEARD_FACTOR_CORRELATION * synthetic.SEX_FACTOR_LOADINGS["size"]
    want = norm.pdf(norm.ppf(1 - p)) * rho / np.sqrt(p * (1 - p))
    got = np.corrcoef(beard, shape[:, 0])[0, 1]
    assert want > 0.3 and abs(got - want) < z / np.sqrt(n), (got, want)
    # Monotone: beard rate per size quartile rises (quartiles differ by > 10 binomial SEs).
    edges = np.quantile(shape[:, 0], [0.25, 0.5, 0.75])
    rate = np.array([beard[np.digitize(shape[:, 0], edges) == q].mean() for q in range(4)])
    assert np.all(np.diff(rate) > 0), rate
    # Given the factor, the rate follows the probit: e.g. m > 1 vs m < -1.
    assert beard[factor > 1].mean() > 0.8 and beard[factor < -1].mean() < 0.1
    # Independent: the beard ignores size.
    shape_i, beard_i, _ = _traits("independent", beard_prob=p)
    assert abs(beard_i.mean() - p) < z * np.sqrt(p * (1 - p) / n)
    assert abs(np.corrcoef(beard_i, shape_i[:, 0])[0, 1]) < z / np.sqrt(n)


def _old_identity(assets, seed, index, shape_std=1.0, beard_prob=0.45):
    """The identity sampler as it was before `identity_sampler` existed (commit 62b311b, its
    `_identity_jit` verbatim but for the shell faces): the reference "independent" must match."""
    import functools

    import jax

    from dhjax.data import textures

    @functools.partial(jax.jit, static_argnames=("shape_std", "beard_prob"))
    def old_jit(assets, k, shape_std, beard_prob):
        return _old_identity_body(textures, assets, k, shape_std, beard_prob)

    return old_jit(assets, synthetic.key(seed, synthetic.STREAM_IDENTITY, index), shape_std, beard_prob)


def _old_identity_body(textures, assets, k, shape_std, beard_prob):
    import jax

    ks = jax.random.split(k, 6)
    n_shape = assets.model.num_shape
    nh, nb = assets.hair_vids.shape[0], assets.beard_vids.shape[0]
    normal = jax.random.normal(ks[0], (n_shape + nh + nb,))
    shape = shape_std * normal[:n_shape]
    skin = textures.sample_skin(ks[1])
    hair = hair_lib.sample_hair(ks[2])
    beard = hair_lib.sample_beard(ks[3], hair, beard_prob)
    albedo = textures.albedo_texture(ks[4], assets.uv, skin, hair, beard)
    position = textures.position_map(assets.model, assets.uv, shape)
    ht = hair_lib.hair_thickness(assets.hair_phi, assets.hair_theta, hair)
    bt = hair_lib.beard_thickness(assets.beard_phi, assets.beard_theta, beard)
    hw = hair_lib.hair_weight(assets.hair_phi, assets.hair_theta, hair)
    grey = hair["grey"] * jax.random.uniform(ks[5], (nh, 1))
    hcol = hair["colour"] * (0.8 + 0.2 * hw[:, None]) * (1 + 0.12 * normal[n_shape:n_shape + nh, None])
    hcol = hcol * (1 - grey) + 0.62 * grey
    bcol = beard["colour"] * (1 + 0.12 * normal[n_shape + nh:, None])
    return dict(
        shape=shape.astype(jnp.float32), uv_albedo=albedo, uv_position=position,
        hair_thickness=ht, hair_colours=jnp.clip(hcol, 0, 1).astype(jnp.float32),
        beard_thickness=bt, beard_colours=jnp.clip(bcol, 0, 1).astype(jnp.float32),
        skin_tone=skin["tone"].astype(jnp.float32), hair_style=hair["style"],
        beard_style=beard["style"], hair_colour=hair["colour"], iris=skin["iris"])


def test_independent_sampler_reproduces_the_old_identities():
    import jax

    assets = common.tiny_assets()
    for seed, index in ((0, 0), (3, 7), (1, 1_000_002)):
        old = _old_identity(assets, seed, index, shape_std=0.8)
        new = synthetic.sample_identity(assets, seed, index, shape_std=0.8, sampler="independent")
        for k, v in old.items():
            np.testing.assert_allclose(np.asarray(new[k]), np.asarray(v), rtol=1e-6, atol=1e-7, err_msg=k)
        np.testing.assert_array_equal(new["shape"], old["shape"])
        np.testing.assert_array_equal(new["beard_style"], old["beard_style"])
        # ... and the old beard rule was the plain u < beard_prob on the beard key's uniforms.
        ks = jax.random.split(synthetic.key(seed, synthetic.STREAM_IDENTITY, index), 6)
        assert (int(old["beard_style"]) > 0) == bool(hair_lib.draws(ks[3], 8)[1] < 0.45)
        # The correlated default changes only the 18 semantic components (and the beard).
        cor = synthetic.sample_identity(assets, seed, index, shape_std=0.8)
        np.testing.assert_array_equal(cor["shape"][18:], old["shape"][18:])
        assert not np.allclose(cor["shape"][:18], old["shape"][:18])
        for k in ("skin_tone", "hair_style", "hair_colour", "iris", "hair_thickness"):
            np.testing.assert_array_equal(cor[k], new[k], err_msg=k)


def test_generators_use_the_configured_identity_sampler():
    cfg = common.tiny_config()
    assert cfg.identity_sampler == "correlated" == synthetic.DEFAULT_IDENTITY_SAMPLER
    assets = common.tiny_assets()
    g = common.multiview()
    want = synthetic.sample_identity(assets, cfg.seed, 2)["shape"]
    np.testing.assert_array_equal(g.identity(2)["shape"], want)
    cfg.identity_sampler = "independent"
    gi = synthetic.MultiviewGenerator(cfg, assets)
    np.testing.assert_array_equal(gi.identity(2)["shape"],
                                  synthetic.sample_identity(assets, cfg.seed, 2, sampler="independent")["shape"])
    vi = synthetic.VideoGenerator(cfg, assets)
    np.testing.assert_array_equal(vi.identity(2)["shape"], gi.identity(2)["shape"])


def test_a_config_written_before_the_sampler_existed_gets_the_old_identities():
    """An old run's config.json (SynShot prior, INSTA, GEM) has no identity_sampler: read back,
    it must regenerate the identities it was trained on, the independent draw, not the new default."""
    import json

    import ml_collections

    cfg = common.tiny_config()
    old = cfg.to_dict()
    del old["identity_sampler"]
    old = ml_collections.ConfigDict(json.loads(json.dumps(old)))     # as read from a config.json
    assert "identity_sampler" not in old
    assert synthetic.config_identity_sampler(old) == "independent" == synthetic.LEGACY_IDENTITY_SAMPLER
    assert synthetic.config_identity_sampler(cfg) == "correlated"
    synthetic.check_config(old)                                      # make_synthetic's check accepts it
    assets = common.tiny_assets()
    want = synthetic.sample_identity(assets, cfg.seed, 2, sampler="independent")["shape"]
    for gen in (synthetic.MultiviewGenerator(old, assets), synthetic.VideoGenerator(old, assets)):
        assert gen.identity_sampler == "independent"
        np.testing.assert_array_equal(gen.identity(2)["shape"], want)
    assert not np.array_equal(common.multiview().identity(2)["shape"], want)


def test_bad_identity_sampler_is_refused_with_the_options():
    assets = common.tiny_assets()
    with pytest.raises(ValueError, match=r"identity_sampler must be one of \('correlated', 'independent'\), "
                                         r"got 'sexed'"):
        synthetic.sample_identity(assets, 0, 0, sampler="sexed")
    cfg = common.tiny_config()
    cfg.identity_sampler = "gaussian"
    with pytest.raises(ValueError, match="correlated.*independent.*'gaussian'"):
        synthetic.MultiviewGenerator(cfg, assets)
    # The correlation structure refers to the default head's semantic components: another model
    # (here one with only 10 shape components) is refused with the way out named.
    small = assets.model.replace(num_shape=10)
    with pytest.raises(ValueError, match="identity_sampler='independent'"):
        synthetic.check_identity_sampler("correlated", small)
    assert synthetic.check_identity_sampler("independent", small) == "independent"
    with pytest.raises(ValueError, match="outside"):
        synthetic.identity_correlation(dict(size=1.2))
    # A one-factor matrix is positive definite for loadings in (-1, 1), but not numerically so
    # at the edge.
    with pytest.raises(ValueError, match="not positive definite"):
        synthetic.identity_correlation(dict(size=1 - 1e-12))
    with pytest.raises(ValueError, match="unknown components"):
        synthetic.identity_correlation(dict(skull_volume=0.5))


@pytest.mark.parametrize("field, value, match", [
    ("multiview.n_identities", -3, "multiview.n_identities must be an integer >= 1, got -3"),
    ("video.width", 0, "video.width must be an integer >= 1"),
    ("multiview.n_upper", -1, "multiview.n_upper must be an integer >= 0"),
    ("beard_prob", 1.5, r"beard_prob must be a probability in \[0, 1\]"),
    ("identity_sampler", "nope", "identity_sampler must be one of"),
])
def test_check_config_names_the_field(field, value, match):
    from dhjax.train import config as config_lib

    synthetic.check_config(synthetic.tiny_config())
    with pytest.raises(ValueError, match=match):
        synthetic.check_config(config_lib.apply_overrides(synthetic.tiny_config(), {field: value}))
