"""Linear albedo model: the synthetic PCA against scikit-learn's (peer), held-out reconstruction,
`texture` values and gradients (finite differences and a float64 reference), `fit_texture`
against a float64 ridge solve, resampling, and the importers on small fake files in the FLAME
layouts (BFM-style MU/PC in both shapes, FLAME_texture-style mean/tex_dir in BGR 0..255) with
their conversions, the npz round trip and the errors on bad files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.data import albedo_synthetic as ALS
from dhjax.models import albedo as AL

SIZE = 16        # texture size A of the synthetic tests
UV = 64          # UV size of the synthetic assets (box filter 4 x 4)
N_TRAIN, K = 24, 12


@pytest.fixture(scope="module")
def assets():
    from dhjax.data import synthetic
    return synthetic.build_assets(uv_size=UV)


@pytest.fixture(scope="module")
def synthetic_model(assets):
    lines = []
    model = ALS.build_synthetic(N_TRAIN, K, SIZE, assets=assets, log=lines.append)
    return model, lines


def _random_model(rng, A=8, K=5):
    """An AlbedoModel with orthonormal components (QR) and decreasing sigma, float64 copies."""
    q, _ = np.linalg.qr(rng.standard_normal((A * A * 3, K)))
    basis = q.T.reshape(K, A, A, 3)
    sigma = 0.5 * 0.6 ** np.arange(K)
    mean = rng.uniform(0.2, 0.8, (A, A, 3))
    return AL.AlbedoModel(mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
                          sigma=jnp.asarray(sigma, jnp.float32), name="random"), mean, basis, sigma


# ----------------------------------------------------------------------------------------------
# Synthetic PCA.


def test_synthetic_albedos_are_box_filtered_identities_of_the_training_seed(assets):
    from dhjax.data import synthetic
    x = ALS.synthetic_albedos([0, 3], SIZE, assets=assets)
    assert x.shape == (2, SIZE, SIZE, 3) and x.dtype == np.float32
    f = UV // SIZE
    for n, i in enumerate([0, 3]):
        full = np.asarray(synthetic.sample_identity(assets, ALS.SYNTHETIC_SEED_BASE, i)["uv_albedo"], np.float64)
        ref = full.reshape(SIZE, f, SIZE, f, 3).mean(axis=(1, 3))
        np.testing.assert_allclose(x[n], ref, atol=1e-6)
    # the training seed is not the tracker benchmark's (seed 0): different identities
    bench = np.asarray(synthetic.sample_identity(assets, 0, 0)["uv_albedo"])
    assert np.abs(AL.resample(bench, SIZE) - x[0]).max() > 1e-2


@pytest.mark.peers
def test_synthetic_pca_matches_sklearn(assets, synthetic_model):
    skd = pytest.importorskip("sklearn.decomposition")
    model, _ = synthetic_model
    x = ALS.synthetic_albedos(range(N_TRAIN), SIZE, assets=assets).reshape(N_TRAIN, -1).astype(np.float64)
    ref = skd.PCA(n_components=K, svd_solver="full").fit(x)
    assert model.mean.shape == (SIZE, SIZE, 3) and model.basis.shape == (K, SIZE, SIZE, 3)
    np.testing.assert_allclose(np.asarray(model.mean).reshape(-1), ref.mean_, atol=1e-6)
    ours = np.asarray(model.basis, np.float64).reshape(K, -1)
    signs = np.sign(np.sum(ours * ref.components_, axis=1))
    assert np.all(signs != 0)
    np.testing.assert_allclose(ours * signs[:, None], ref.components_, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.sigma, np.float64) ** 2, ref.explained_variance_, rtol=1e-5)


def test_build_synthetic_logs_progress_and_checks_arguments(synthetic_model):
    model, lines = synthetic_model
    assert any("identity" in s and str(ALS.SYNTHETIC_SEED_BASE) in s for s in lines)
    assert any("PCA" in s for s in lines)
    assert str(ALS.SYNTHETIC_SEED_BASE) in model.name
    with pytest.raises(ValueError, match="n_components"):
        ALS.build_synthetic(4, 4, 8, log=None)
    with pytest.raises(ValueError, match="seed"):
        ALS.synthetic_albedos([0], 8, seed=-1)


def test_heldout_reconstruction_improves_with_more_components(assets, synthetic_model):
    model, _ = synthetic_model
    held = ALS.synthetic_albedos(range(N_TRAIN, N_TRAIN + 6), SIZE, assets=assets)
    ks = (0, 1, 2, 4, 8, K)
    errs = []
    for k in ks:
        e = [np.sqrt(np.mean((np.asarray(AL.texture(model, AL.fit_texture(model, h, k, ridge=1e-6))) - h) ** 2))
             for h in held]
        errs.append(float(np.mean(e)))
    assert all(b < a for a, b in zip(errs, errs[1:])), dict(zip(ks, errs))
    # measured: RMS 0.20 with the mean alone, 0.024 with 12 components
    assert errs[-1] < 0.25 * errs[0], dict(zip(ks, errs))


# ----------------------------------------------------------------------------------------------
# texture / fit_texture.


def test_texture_values():
    model, mean, basis, sigma = _random_model(np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(AL.texture(model, jnp.zeros(3))), np.asarray(model.mean))
    np.testing.assert_array_equal(np.asarray(AL.texture(model, jnp.zeros(0))), np.asarray(model.mean))
    c = np.array([1.5, -0.5, 2.0])
    ref = mean + np.einsum("k,kijc->ijc", c * sigma[:3], basis[:3])
    np.testing.assert_allclose(np.asarray(AL.texture(model, c)), ref, atol=1e-6)
    batch = np.stack([c, -c])
    out = jax.jit(AL.texture)(model, batch)
    assert out.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(out[1]), mean - (ref - mean), atol=1e-6)
    with pytest.raises(ValueError, match="only K = 5"):
        AL.texture(model, np.zeros(6))


def test_texture_gradient_matches_finite_differences():
    model, mean, basis, sigma = _random_model(np.random.default_rng(1), A=8, K=4)
    target = np.random.default_rng(2).uniform(0, 1, (8, 8, 3))

    def loss(c):  # a robust (Charbonnier) photometric-style loss, not quadratic in c
        return jnp.sum(jnp.sqrt(0.01 + (AL.texture(model, c) - target) ** 2))

    c0 = np.array([0.3, -0.7, 1.1, 0.2])
    g = np.asarray(jax.grad(loss)(jnp.asarray(c0, jnp.float32)), np.float64)
    assert np.all(np.isfinite(g))
    # float64 analytic gradient of the same loss
    r = mean + np.einsum("k,kijc->ijc", c0 * sigma, basis) - target
    g64 = np.einsum("ijc,kijc->k", r / np.sqrt(0.01 + r ** 2), basis) * sigma
    np.testing.assert_allclose(g, g64, rtol=1e-4, atol=1e-5)
    # central finite differences of the float32 function itself
    eps = 1e-2
    fd = np.array([(float(loss(jnp.asarray(c0 + eps * e, jnp.float32)))
                    - float(loss(jnp.asarray(c0 - eps * e, jnp.float32)))) / (2 * eps) for e in np.eye(4)])
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)


def test_fit_texture_recovers_coefficients_and_matches_ridge_solve():
    rng = np.random.default_rng(3)
    model, mean, basis, sigma = _random_model(rng)
    c_true = np.array([1.0, -2.0, 0.5, 0.0, 1.5])
    target = np.asarray(AL.texture(model, c_true))
    np.testing.assert_allclose(np.asarray(AL.fit_texture(model, target, 5, ridge=1e-8)), c_true, atol=1e-3)
    # weights: texels of weight 0 hold garbage and must not matter
    w = (rng.uniform(size=(8, 8)) > 0.4).astype(np.float32)
    garbage = np.where(w[..., None] > 0, target, 5.0)
    np.testing.assert_allclose(np.asarray(AL.fit_texture(model, garbage, 5, weights=w, ridge=1e-8)), c_true,
                               atol=1e-3)
    # against a float64 solve of the same ridge problem (noisy target, 3 components, [A, A, 3] weights)
    noisy = target + 0.05 * rng.standard_normal(target.shape)
    w3 = rng.uniform(0, 2, (8, 8, 3))
    ridge = 0.02
    cols = (basis[:3] * sigma[:3, None, None, None]).reshape(3, -1)
    wf = w3.reshape(-1)
    ref = np.linalg.solve((cols * wf) @ cols.T + ridge * np.eye(3), (cols * wf) @ (noisy - mean).reshape(-1))
    got = jax.jit(AL.fit_texture, static_argnums=2)(model, noisy, 3, w3, ridge)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)
    assert AL.fit_texture(model, target, 0).shape == (0,)
    with pytest.raises(ValueError, match="target"):
        AL.fit_texture(model, target[:4], 2)
    with pytest.raises(ValueError, match="weights"):
        AL.fit_texture(model, target, 2, weights=np.ones((4, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        AL.fit_texture(model, target, 2, weights=-np.ones((8, 8)))
    with pytest.raises(ValueError, match="n_components"):
        AL.fit_texture(model, target, 6)


# ----------------------------------------------------------------------------------------------
# Resampling.


def test_resample_box_filter_and_bilinear_upsampling():
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(12, 12, 3, 2))
    np.testing.assert_allclose(AL.resample(x, 4), x.reshape(4, 3, 4, 3, 3, 2).mean(axis=(1, 3)), atol=1e-12)
    # non-integer factor: area weights, so the overall mean is kept
    np.testing.assert_allclose(AL.resample(x, 5).mean(axis=(0, 1)), x.mean(axis=(0, 1)), atol=1e-12)
    # enlarging: a function linear in u (columns) and v (rows) stays exact away from the clamped border
    j = (np.arange(6) + 0.5) / 6
    ramp = np.stack(np.broadcast_arrays(j[None, :], 1 - j[:, None]), -1)  # (u, v) at texel centres
    up = AL.resample(ramp, 12)
    jj = (np.arange(12) + 0.5) / 12
    ref = np.stack(np.broadcast_arrays(jj[None, :], 1 - jj[:, None]), -1)
    np.testing.assert_allclose(up[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Files.


def _truth(rng, H=8, K=3):
    """RGB mean [H, H, 3] in (0.1, 0.9) and per-std components [K, H, H, 3]."""
    return rng.uniform(0.1, 0.9, (H, H, 3)), 0.05 * rng.standard_normal((K, H, H, 3))


def _assert_model(model, mean_rgb, comps, atol=1e-6):
    np.testing.assert_allclose(np.asarray(model.mean), mean_rgb, atol=atol)
    per_std = np.asarray(model.basis, np.float64) * np.asarray(model.sigma, np.float64)[:, None, None, None]
    np.testing.assert_allclose(per_std, comps, atol=atol)
    norms = np.linalg.norm(np.asarray(model.basis, np.float64).reshape(model.n_components, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)


def test_load_bfm_flat_layout(tmp_path):
    """BFM_to_FLAME col_to_tex.py: MU [H*W*3], PC [H*W*3, K], BGR, 0..1, std folded in."""
    mean_rgb, comps = _truth(np.random.default_rng(5))
    path = tmp_path / "FLAME_albedo_from_BFM.npz"
    np.savez(path, MU=mean_rgb[..., ::-1].reshape(-1),
             PC=np.moveaxis(comps[..., ::-1], 0, -1).reshape(-1, 3))
    model = AL.load(path)
    assert model.size == 8 and model.n_components == 3 and "bfm" in model.name
    _assert_model(model, mean_rgb, comps)
    c = np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(np.asarray(AL.texture(model, c)), mean_rgb + np.einsum("k,kijc->ijc", c, comps),
                               atol=1e-6)
    # a pure blue texel stored BGR (1, 0, 0) reads as RGB (0, 0, 1)
    mu = mean_rgb[..., ::-1].copy()
    mu[2, 5] = (1.0, 0.0, 0.0)
    np.savez(path, MU=mu.reshape(-1), PC=np.zeros((8 * 8 * 3, 1)))
    np.testing.assert_allclose(np.asarray(AL.load(path).mean)[2, 5], [0.0, 0.0, 1.0])


def test_load_bfm_image_layout_with_extra_keys_truncation_and_resize(tmp_path):
    """AlbedoMM's FLAME npz: MU [H, W, 3], PC [H, W, 3, K], plus specMU/specPC/vt/ft (ignored)."""
    mean_rgb, comps = _truth(np.random.default_rng(6), K=4)
    path = tmp_path / "albedoModel2020_FLAME_albedoPart.npz"
    np.savez(path, MU=mean_rgb[..., ::-1], PC=np.moveaxis(comps[..., ::-1], 0, -1),
             specMU=np.full((8, 8, 3), 0.3), specPC=np.zeros((8, 8, 3, 4)),
             vt=np.zeros((5, 2)), ft=np.zeros((2, 3), np.int64))
    _assert_model(AL.load(path), mean_rgb, comps)
    m2 = AL.load(path, n_components=2, size=4)
    box = lambda x: x.reshape(x.shape[:-3] + (4, 2, 4, 2, 3)).mean(axis=(-4, -2))  # noqa: E731
    assert m2.size == 4 and m2.n_components == 2
    _assert_model(m2, box(mean_rgb), box(comps[:2]))


def test_load_flame_texture_layout(tmp_path):
    """FLAME_texture.npz (TF_FLAME): mean [H, W, 3], tex_dir [H, W, 3, K], BGR, 0..255."""
    mean_rgb, comps = _truth(np.random.default_rng(7))
    mean_bgr = 255.0 * mean_rgb[..., ::-1]
    mean_bgr[0, 0] = (255.0, 0.0, 51.0)  # B = 255, G = 0, R = 51
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, mean=mean_bgr, tex_dir=255.0 * np.moveaxis(comps[..., ::-1], 0, -1),
             vt=np.zeros((5, 2)), ft=np.zeros((2, 3), np.int64))
    model = AL.load(path)
    assert "flame_texture" in model.name
    expected = mean_rgb.copy()
    expected[0, 0] = (0.2, 0.0, 1.0)
    _assert_model(model, expected, comps)


def test_save_load_round_trip(tmp_path):
    model, mean, basis, sigma = _random_model(np.random.default_rng(8), A=8, K=5)
    path = tmp_path / "albedo_model"  # no suffix: written exactly there
    assert AL.save(path, model) == path and path.exists()
    back = AL.load(path)
    assert back.name == "random"
    for a, b in ((back.mean, model.mean), (back.basis, model.basis), (back.sigma, model.sigma)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m3 = AL.load(path, n_components=3)
    np.testing.assert_array_equal(np.asarray(m3.basis), np.asarray(model.basis)[:3])
    small = AL.load(path, size=4)
    per_std = np.asarray(model.basis, np.float64) * sigma[:, None, None, None]
    _assert_model(small, AL.resample(np.asarray(model.mean, np.float64), 4),
                  np.moveaxis(AL.resample(np.moveaxis(per_std, 0, -1), 4), -1, 0), atol=1e-6)


def test_load_errors(tmp_path):
    mean_rgb, comps = _truth(np.random.default_rng(9))
    good_pc = np.moveaxis(comps[..., ::-1], 0, -1)

    missing = tmp_path / "nowhere" / "FLAME_albedo_from_BFM.npz"
    with pytest.raises(FileNotFoundError, match="FLAME_albedo_from_BFM.npz"):
        AL.load(missing)

    p = tmp_path / "keys.npz"
    np.savez(p, MU=mean_rgb, specMU=mean_rgb)
    with pytest.raises(ValueError, match=r"missing keys.*'PC'.*found keys \['MU', 'specMU'\]"):
        AL.load(p)
    with pytest.raises(ValueError, match=r"missing keys \['mean', 'tex_dir'\] of layout 'flame_texture'"):
        AL.load(p, layout="flame_texture")

    p = tmp_path / "shape.npz"
    np.savez(p, MU=mean_rgb, PC=good_pc[:4])
    with pytest.raises(ValueError, match=r"key 'PC' has shape \(4, 8, 3, 3\)"):
        AL.load(p)
    np.savez(p, MU=mean_rgb.reshape(-1)[:-3], PC=good_pc)
    with pytest.raises(ValueError, match="key 'MU' has shape"):
        AL.load(p)

    p = tmp_path / "nan.npz"
    bad = mean_rgb.copy()
    bad[1, 1, 0] = np.nan
    np.savez(p, MU=bad, PC=good_pc)
    with pytest.raises(ValueError, match="key 'MU' holds 1 non-finite"):
        AL.load(p)
    pc_bad = good_pc.copy()
    pc_bad[0, 0, 0, 2] = np.inf
    np.savez(p, MU=mean_rgb, PC=pc_bad)
    with pytest.raises(ValueError, match="key 'PC' holds 1 non-finite"):
        AL.load(p)
    np.savez(p, MU=mean_rgb, PC=pc_bad)
    AL.load(p, n_components=2)  # the broken component is not used

    p = tmp_path / "range.npz"
    np.savez(p, MU=255.0 * mean_rgb, PC=good_pc)  # 0..255 values under the 0..1 'bfm' keys
    with pytest.raises(ValueError, match="stores 0..1 values"):
        AL.load(p)
    np.savez(p, mean=mean_rgb, tex_dir=good_pc)  # 0..1 values under the 0..255 FLAME_texture keys
    with pytest.raises(ValueError, match="stores 0..255 values"):
        AL.load(p)

    p = tmp_path / "ok.npz"
    np.savez(p, MU=mean_rgb, PC=good_pc)
    with pytest.raises(ValueError, match=r"n_components=4 must be in \[1, 3\]"):
        AL.load(p, n_components=4)
    p = tmp_path / "not_npz.npz"
    p.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a readable npz"):
        AL.load(p)
    np.savez(tmp_path / "rect.npz", MU=np.full((8, 4, 3), 0.5), PC=np.zeros((8, 4, 3, 2)))
    with pytest.raises(ValueError, match="not square; pass size="):
        AL.load(tmp_path / "rect.npz")
    assert AL.load(tmp_path / "rect.npz", size=4).mean.shape == (4, 4, 3)
