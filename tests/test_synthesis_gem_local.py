"""Localised GEM (dhjax.synthesis.gem_local): face regions of the default head, local PCA with one
region equal to the global GEM, the advantage of local PCA on region-local variation (measured
by `compare`), renders at k = 0, the exact size formula and input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import gem_common as gc

from dhjax.render import splat
from dhjax.synthesis import gem
from dhjax.synthesis import gem_local


@pytest.fixture(scope="module")
def ctx():
    return gc.small_context()


@pytest.fixture(scope="module")
def regions(ctx):
    return gem_local.region_assignment(ctx)





def _region_local_collected(ctx, labels, n, rank, rng, dirs=None):
    """Region-local variation: per region an independent latent of `rank` dimensions that moves
    only that region's Gaussians, with the same total variance in every region (no noise). The
    same `dirs` give held-out frames of the same model."""
    G = ctx.n_gaussians
    R = int(labels.max()) + 1
    base = gc.base_attributes(ctx)
    if dirs is None:
        dirs = {}
        for a in gem.ATTRIBUTES:
            d = rng.normal(size=(R, rank, G, gem.ATTRIBUTE_DIMS[a])) * 1e-3
            d *= (labels[None, None, :, None] == np.arange(R)[:, None, None, None])   # region r's only
            d /= np.sqrt(np.bincount(labels, minlength=R))[:, None, None, None]      # equal energy per region
            dirs[a] = d
    lat = rng.normal(size=(n, R, rank))
    out = {a: (np.asarray(base[a], np.float64)[None] + np.einsum("nrk,rkgd->ngd", lat, dirs[a])).astype(np.float32)
           for a in gem.ATTRIBUTES}
    return out, dirs


def test_region_labels_on_the_default_head(ctx, regions):
    G = ctx.n_gaussians
    labels, names, counts = regions
    R = len(names)
    assert labels.shape == (G,) and labels.dtype == np.int32
    assert labels.min() == 0 and labels.max() == R - 1          # every Gaussian labelled, no empty region
    assert R > 1 and names[-1] == gem_local.REST and len(set(names)) == R
    assert {"mouth", "eyes"} <= set(names)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=R))
    assert counts.min() >= 16 and counts.sum() == G
    np.testing.assert_array_equal(gem_local.region_labels(ctx), labels)
    # The mapping: a Gaussian of a named region has that region's score >= 0.5 at its texel.
    scores = gem_local.region_scores(ctx)
    for r, name in enumerate(names[:-1]):
        assert np.all(scores[name][labels == r] >= 0.5), name
    # the nose Gaussians are on the nose mask, the mouth's on the lips or the jaw's skin
    nose = np.asarray(ctx.fields.regions["nose"]).reshape(-1)[np.asarray(ctx.texel)]
    assert np.all(nose[labels == names.index("nose")] >= 0.5)
    # Merging: with a larger minimum every region still has it, small regions go to rest.
    big = gem_local.region_assignment(ctx, min_items=50)
    assert big.counts.min() >= 50 and len(big.names) < R and big.names[-1] == gem_local.REST
    assert big.counts[-1] > counts[-1]
    one = gem_local.region_assignment(ctx, min_items=G)         # nothing but rest is that big
    assert one.names == (gem_local.REST,) and np.all(one.labels == 0)


def test_one_region_is_the_global_gem(ctx):
    rng = np.random.default_rng(1)
    data = gc.random_collected(ctx, 10, rng)
    sh = jnp.asarray(rng.normal(size=(ctx.n_gaussians, 4, 3)) * 0.1, jnp.float32)
    gmodel, gk, _ = gem.distil(data, sh, 4, sh_degree=1)
    lmodel, lk = gem_local.distil_local(data, sh, 4, np.zeros(ctx.n_gaussians, np.int32), sh_degree=1)
    assert lmodel.n_regions == 1 and lmodel.n_components == 4 and lk["position"].shape == (10, 1, 4)
    for a in gem.ATTRIBUTES:
        p = lmodel.pca[a].pcas[0]
        np.testing.assert_array_equal(p.mean, gmodel.mean[a])
        np.testing.assert_array_equal(p.components, gmodel.basis[a])
        np.testing.assert_allclose(lk[a][:, 0], gk[a], rtol=0, atol=1e-7)
    for i in (0, 7):
        la = gem_local.local_attributes(lmodel, {a: lk[a][i] for a in gem.ATTRIBUTES})
        ga = gem.eigen_attributes(gmodel, {a: gk[a][i] for a in gem.ATTRIBUTES})
        for a in gem.ATTRIBUTES:
            np.testing.assert_allclose(la[a], ga[a], rtol=0, atol=1e-6)


def test_local_pca_captures_region_local_variation_that_global_pca_at_equal_size_cannot(ctx, regions):
    labels, names, _ = regions
    R, rank = len(names), 3
    rng = np.random.default_rng(2)
    train, dirs = _region_local_collected(ctx, labels, 24, rank, rng)
    test, _ = _region_local_collected(ctx, labels, 8, rank, rng, dirs)
    sh = jnp.zeros((ctx.n_gaussians, 4, 3), jnp.float32)
    # Equal size: local M = rank per region vs global M = rank; equal coefficients: local 1 vs
    # global M = R = 5 (the global data has rank R * rank = 15 > M either way).
    res = gem_local.compare(train, test, sh, labels, rank, names=names)
    res5 = gem_local.compare(train, test, sh, labels, R, names=names)
    print("\ncompare M=3:", res, "\ncompare M=5:", res5)
    assert res["local_equal_coefficients"] == {"skipped": f"M={rank} < R={R} regions: floor(M / R) = 0 "
                                                          f"components per region"}
    assert res["regions"] == {n: int(c) for n, c in zip(names, np.bincount(labels))}
    for a in gem.ATTRIBUTES:
        x = train[a].astype(np.float64)
        n, D = x.shape[0], x[0].size
        spread = float(np.sqrt(np.mean((x - x.mean(0)) ** 2)))       # RMSE of the mean alone
        # float32 data and reconstruction: a few ulps of the largest value count as exact.
        exact = 8 * np.finfo(np.float32).eps * float(np.abs(x).max())
        # The global PCA's training residual is the tail of the data's spectrum (15 directions).
        lam = np.linalg.svd(x.reshape(n, D) - x.reshape(n, D).mean(0), compute_uv=False) ** 2
        for r_, M in ((res, rank), (res5, R)):
            tail = float(np.sqrt(np.sum(lam[M:]) / (n * D)))
            assert r_["global"]["rmse_train"][a] == pytest.approx(tail, rel=1e-3)
        for split in ("rmse_train", "rmse_test"):
            assert res["local_equal_size"][split][a] <= exact, (a, split, res["local_equal_size"][split][a], exact)
            assert res5["local_equal_size"][split][a] <= exact
            # Equal energy in 15 directions: M = 3 (5) global components leave ~12/15 (10/15)
            # of the variance, i.e. ~0.9 (0.8) of the spread; sampling moves that a little.
            assert res["global"][split][a] > 0.5 * spread, (a, split, res["global"][split][a], spread)
            assert res5["global"][split][a] > 0.5 * spread, (a, split, res5["global"][split][a], spread)
            # one component per region where the rank is 3 leaves ~2/3 of the variance
            assert res5["local_equal_coefficients"][split][a] > 0.5 * spread
    g, ls, lc = res5["global"], res5["local_equal_size"], res5["local_equal_coefficients"]
    assert (g["n_components"], ls["n_components"], lc["n_components"]) == (5, 5, 1)
    assert (g["coefficients"], ls["coefficients"], lc["coefficients"]) == (4 * 5, 4 * R * 5, 4 * R * 1)
    G = ctx.n_gaussians
    assert ls["size_bytes"] == g["size_bytes"] + 4 * (4 * (R - 1) * 5 + G)


def test_local_render_at_zero_is_the_splatted_local_means(ctx, regions):
    rng = np.random.default_rng(3)
    labels = regions.labels
    data = gc.random_collected(ctx, 8, rng)
    sh = jnp.asarray(rng.normal(size=(ctx.n_gaussians, 4, 3)) * 0.1, jnp.float32)
    model, _ = gem_local.distil_local(data, sh, 3, labels, sh_degree=1)
    assert model.n_regions == len(regions.names)
    np.testing.assert_array_equal(gem_local.region_index(model), labels)
    cams = gc.cams()
    img = gem_local.render_local(model, gem_local.zero_coefficients(model), cams, backend="auto")
    mean = {a: np.zeros((ctx.n_gaussians, gem.ATTRIBUTE_DIMS[a]), np.float32) for a in gem.ATTRIBUTES}
    for a in gem.ATTRIBUTES:
        for idx, p in zip(model.pca[a].items, model.pca[a].pcas):
            mean[a][np.asarray(idx)] = np.asarray(p.mean).reshape(-1, gem.ATTRIBUTE_DIMS[a])
    q = mean["rotation"] / np.linalg.norm(mean["rotation"], axis=-1, keepdims=True)

    @jax.jit
    def splat_means(mean, q):
        return splat.rasterize(mean["position"], q, jnp.exp(mean["scale"]), jax.nn.sigmoid(mean["opacity"][:, 0]),
                               sh, cams, sh_degree=1, background=jnp.ones(3), backend="auto").image

    ref = splat_means(mean, q)
    np.testing.assert_allclose(img, ref, atol=1e-6)
    assert float(jnp.std(img)) > 0.01      # something is in view
    # Any k: each Gaussian is its region's mean + k[r] @ basis (numpy oracle, float64).
    k = {a: jnp.asarray(rng.normal(size=(model.n_regions, 3)) * 1e-3, jnp.float32) for a in gem.ATTRIBUTES}
    got = gem_local.local_attributes(model, k)
    for a in gem.ATTRIBUTES:
        want = np.zeros((ctx.n_gaussians, gem.ATTRIBUTE_DIMS[a]))
        for r, (idx, p) in enumerate(zip(model.pca[a].items, model.pca[a].pcas)):
            basis = np.asarray(p.components, np.float64)
            vals = np.asarray(p.mean, np.float64) + np.asarray(k[a][r], np.float64) @ basis
            want[np.asarray(idx)] = vals.reshape(-1, gem.ATTRIBUTE_DIMS[a])
        if a == "rotation":
            want /= np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(got[a], want, rtol=0, atol=1e-6)


def test_size_bytes_equal_size_formula(ctx, regions):
    rng = np.random.default_rng(4)
    data = gc.random_collected(ctx, 8, rng)
    sh = jnp.zeros((ctx.n_gaussians, 4, 3), jnp.float32)
    G, R = ctx.n_gaussians, len(regions.names)
    for M in (1, 4):
        gmodel, _, _ = gem.distil(data, sh, M, sh_degree=1)
        lmodel, _ = gem_local.distil_local(data, sh, M, regions.labels, sh_degree=1)
        # means + bases: the same floats; extra: (R - 1) M sigmas per attribute and G int32 labels
        assert gem_local.size_bytes(lmodel) == gem.size_bytes(gmodel) + 4 * (len(gem.ATTRIBUTES) * (R - 1) * M + G)
        floats = sum(G * d * (1 + M) + R * M for d in gem.ATTRIBUTE_DIMS.values()) + G * 4 * 3
        assert gem_local.size_bytes(lmodel) == 4 * (floats + G)
    assert gem_local.equal_size_components(10, 5) == (10, 2)
    assert gem_local.equal_size_components(11, 5) == (11, 2)
    assert gem_local.equal_size_components(3, 5) == (3, None)
    assert gem_local.coefficient_count(2, 5) == 40


def test_bad_inputs_raise_clear_errors(ctx, regions):
    rng = np.random.default_rng(5)
    G = ctx.n_gaussians
    data = gc.random_collected(ctx, 6, rng)
    sh = jnp.zeros((G, 4, 3), jnp.float32)
    labels = regions.labels
    model, k = gem_local.distil_local(data, sh, 2, labels, sh_degree=1)
    R = model.n_regions
    k0 = {a: k[a][0] for a in gem.ATTRIBUTES}
    with pytest.raises(ValueError, match=r"lack \['scale'\]"):
        gem_local.local_attributes(model, {a: v for a, v in k0.items() if a != "scale"})
    with pytest.raises(ValueError, match=rf"'position' must be \[\.\.\., R, M\] = \[\.\.\., {R}, 2\].*\({R}, 3\)"):
        gem_local.local_attributes(model, {**k0, "position": jnp.zeros((R, 3))})
    with pytest.raises(ValueError, match=r"'opacity' must be \[\.\.\., R, M\]"):
        gem_local.render_local(model, {**k0, "opacity": jnp.zeros((R + 1, 2))}, gc.cams(1))
    with pytest.raises(ValueError, match=r"renders one frame"):
        gem_local.render_local(model, k, gc.cams(1))
    with pytest.raises(ValueError, match=rf"labels must be \[G\] int with G={G}"):
        gem_local.distil_local(data, sh, 2, labels[:-1], sh_degree=1)
    with pytest.raises(ValueError, match=r"labels must be \[G\] int"):
        gem_local.distil_local(data, sh, 2, labels.astype(np.float32), sh_degree=1)
    with pytest.raises(ValueError, match=r"collected lacks attributes \['rotation'\]"):
        gem_local.distil_local({a: v for a, v in data.items() if a != "rotation"}, sh, 2, labels, sh_degree=1)
    with pytest.raises(ValueError, match=r"collected\['scale'\] has shape"):
        gem_local.distil_local({**data, "scale": data["scale"][:, :-1]}, sh, 2, labels, sh_degree=1)
    with pytest.raises(ValueError, match=r"n_components=6 must be an integer in \[1, N - 1\] = \[1, 5\]"):
        gem_local.distil_local(data, sh, 6, labels, sh_degree=1)
    tiny = labels.copy()
    tiny[:2] = R                                                   # a region of 2 Gaussians
    big = {a: np.concatenate([v] * 2) for a, v in data.items()}    # 12 frames allow M = 3
    with pytest.raises(ValueError, match=rf"n_components=3 exceeds the Gaussians of regions "
                                         rf"\(label, Gaussians\) \[\({R}, 2\)\]"):
        gem_local.distil_local(big, sh, 3, tiny, sh_degree=1)
    with pytest.raises(ValueError, match=r"sh must be \[G, K, 3\]"):
        gem_local.distil_local(data, sh[:-1], 2, labels, sh_degree=1)
    with pytest.raises(ValueError, match=r"K >= \(sh_degree \+ 1\)\^2 = 9, got shape"):
        gem_local.distil_local(data, sh, 2, labels, sh_degree=2)
    with pytest.raises(ValueError, match=r"collected_test has G="):
        gem_local.compare(data, {a: v[:, :-1] for a, v in data.items()}, sh, labels, 2)
    with pytest.raises(ValueError, match=r"names has 2 entries"):
        gem_local.compare(data, data, sh, labels, 2, names=("a", "b"))
    with pytest.raises(ValueError, match=r"K = \(d \+ 1\)\^2"):
        gem_local.compare(data, data, jnp.zeros((G, 5, 3)), labels, 2)
    with pytest.raises(ValueError, match=r"min_items=0 must be an integer in \[1, G="):
        gem_local.region_assignment(ctx, min_items=0)
    with pytest.raises(ValueError, match=r"min_items=.* must be an integer in \[1, G="):
        gem_local.region_assignment(ctx, min_items=G + 1)
    with pytest.raises(ValueError, match=r"threshold=0 must be in \(0, 1\]"):
        gem_local.region_assignment(ctx, threshold=0)
    with pytest.raises(ValueError, match=r"global_m=0 must be an integer >= 1"):
        gem_local.equal_size_components(0, 3)
    with pytest.raises(ValueError, match=r"n_regions=0 must be an integer >= 1"):
        gem_local.equal_size_components(3, 0)
