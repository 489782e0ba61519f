"""PCA: fit against scikit-learn's exact PCA (peers) for every method on tall and wide data,
reconstruction errors against the discarded variance, QR re-orthonormalisation, localised PCA,
and the errors on bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhjax.geometry import pca as P


def _low_rank(rng, n, d, rank=5, noise=1e-2):
    """[n, d] float64: rank-`rank` signal with well separated variances, small noise, an offset."""
    u = rng.standard_normal((n, rank))
    scales = 10.0 * 0.6 ** np.arange(rank)
    v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    return (u * scales) @ v.T + noise * rng.standard_normal((n, d)) + rng.standard_normal(d)


SHAPES = {"tall": (120, 16), "wide": (24, 300)}


@pytest.mark.peers
@pytest.mark.parametrize("shape", ["tall", "wide"])
@pytest.mark.parametrize("method", ["covariance", "gram", "randomized", "auto"])
def test_fit_matches_sklearn(shape, method):
    skd = pytest.importorskip("sklearn.decomposition")
    n, d = SHAPES[shape]
    x = _low_rank(np.random.default_rng(0), n, d)
    m = 8
    ours = P.fit(x, m, method=method)
    ref = skd.PCA(n_components=m, svd_solver="full").fit(x)
    # exact methods: all 8 components (3 beyond the signal); randomized: the 5 signal ones
    k = 5 if method == "randomized" else m
    np.testing.assert_allclose(ours.mean, ref.mean_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.components[:k], ref.components_[:k], atol=2e-5)
    np.testing.assert_allclose(ours.explained_variance[:k], ref.explained_variance_[:k],
                               rtol=1e-4 if method == "randomized" else 1e-5)
    np.testing.assert_allclose(ours.explained_variance_ratio[:k],
                               ref.explained_variance_ratio_[:k], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(ours.sigma, np.sqrt(ours.explained_variance), rtol=1e-6)
    assert ours.n_samples == n
    assert ours.components.dtype == jnp.float32 and ours.components.shape == (m, d)


def test_small_components_stay_orthonormal():
    """A spectrum over 12 decades: 'gram' and 'randomized' divide U^T Xc by tiny singular values."""
    rng = np.random.default_rng(11)
    u, _ = np.linalg.qr(rng.standard_normal((80, 40)))
    u -= u.mean(0)
    v, _ = np.linalg.qr(rng.standard_normal((500, 40)))
    x = (u * np.logspace(0, -12, 40)) @ v.T
    for mth in ("gram", "randomized"):
        c = np.asarray(P.fit(x, 40, method=mth).components, np.float64)
        np.testing.assert_allclose(c @ c.T, np.eye(40), atol=1e-6, err_msg=mth)


def test_methods_agree_and_sign_convention():
    x = _low_rank(np.random.default_rng(1), 30, 50)
    fits = {mth: P.fit(x, 6, method=mth) for mth in ("covariance", "gram", "randomized")}
    for mth in ("gram", "randomized"):
        np.testing.assert_allclose(fits[mth].components[:5], fits["covariance"].components[:5],
                                   atol=2e-5, err_msg=mth)
    c = np.asarray(fits["gram"].components)
    np.testing.assert_allclose(c @ c.T, np.eye(6), atol=1e-5)
    assert np.all(c[np.arange(6), np.argmax(np.abs(c), axis=1)] > 0)  # largest |entry| positive


@pytest.mark.parametrize("shape", ["tall", "wide"])
def test_reconstruction_error_is_discarded_variance(shape):
    n, d = SHAPES[shape]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, d)) * np.linspace(0.5, 3.0, d) + 1.0  # full rank
    full = P.fit(x, min(n - 1, d), method="gram" if shape == "wide" else "covariance")
    rec = P.reconstruct(full, P.project(full, x))
    np.testing.assert_allclose(rec, x, atol=2e-4)
    ev = np.asarray(full.explained_variance, np.float64)
    np.testing.assert_allclose(ev.sum(), x.var(axis=0, ddof=1).sum(), rtol=1e-5)
    for m in (1, 5, 10):
        pm = P.truncate(full, m)
        err = np.mean(np.sum((np.asarray(P.reconstruct(pm, P.project(pm, x))) - x) ** 2, -1))
        np.testing.assert_allclose(err, ev[m:].sum() * (n - 1) / n, rtol=1e-4)


def test_project_reconstruct_batched_and_jitted():
    x = _low_rank(np.random.default_rng(3), 40, 20)
    p = P.fit(x, 5)
    xb = jnp.asarray(x, jnp.float32).reshape(2, 20, 20)
    k = jax.jit(P.project)(p, xb)
    assert k.shape == (2, 20, 5)
    np.testing.assert_allclose(k.reshape(40, 5), P.project(p, x), atol=1e-4)
    rec = jax.jit(P.reconstruct)(p, k)
    assert rec.shape == (2, 20, 20)
    np.testing.assert_allclose(rec.reshape(40, 20), x, atol=0.05)  # noise 1e-2 left out
    # coefficients have zero mean and the fitted variances
    np.testing.assert_allclose(np.var(np.asarray(k).reshape(40, 5), 0, ddof=1),
                               p.explained_variance, rtol=1e-4)


def test_truncate_and_size_bytes():
    p = P.fit(_low_rank(np.random.default_rng(4), 30, 12), 6)
    t = P.truncate(p, 3)
    assert t.components.shape == (3, 12) and t.sigma.shape == (3,)
    np.testing.assert_array_equal(t.explained_variance_ratio, p.explained_variance_ratio[:3])
    assert P.size_bytes(t) == (12 + 36 + 3) * 4
    assert P.size_bytes(t, dtype_bytes=2) == (12 + 36 + 3) * 2
    with pytest.raises(ValueError, match=r"m=7 must be in \[1, 6\]"):
        P.truncate(p, 7)


@pytest.mark.parametrize("shape", [(10, 40), (40, 12)])      # wide, tall (both sides of 'randomized')
@pytest.mark.parametrize("method", ["gram", "randomized", "covariance"])
def test_rank_deficient_data_gives_an_orthonormal_basis(method, shape):
    """Beyond the rank, every method gives variance exactly 0 (not round-off) and unit vectors
    orthogonal to the rest."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1])) + 3.0  # rank 2 + a mean
    p = P.fit(x, 5, method=method)
    c = np.asarray(p.components)
    np.testing.assert_allclose(c @ c.T, np.eye(5), atol=1e-5)
    assert np.all(np.asarray(p.explained_variance)[:2] > 0.1)
    np.testing.assert_array_equal(np.asarray(p.explained_variance)[2:], 0.0)
    np.testing.assert_array_equal(np.asarray(p.sigma)[2:], 0.0)
    np.testing.assert_allclose(P.reconstruct(p, P.project(p, x)), x, atol=1e-4)


# --- orthonormalize ------------------------------------------------------------------------------


def _projector(b):
    b = np.asarray(b, np.float64)
    return b.T @ np.linalg.solve(b @ b.T, b)


def test_orthonormalize():
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.standard_normal((50, 6)))
    basis = jnp.asarray(q.T, jnp.float32)  # [6, 50] orthonormal rows, arbitrary signs
    f = jax.jit(P.orthonormalize)
    np.testing.assert_allclose(f(basis), basis, atol=1e-6)
    np.testing.assert_allclose(f(-basis), -basis, atol=1e-6)  # signs kept, not normalised
    perturbed = basis + 0.05 * jnp.asarray(rng.standard_normal((6, 50)), jnp.float32)
    out = np.asarray(f(perturbed), np.float64)
    np.testing.assert_allclose(out @ out.T, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(_projector(out), _projector(perturbed), atol=1e-5)
    np.testing.assert_allclose(out, basis, atol=0.2)  # close to the unperturbed basis
    wild = rng.standard_normal((4, 9)) * np.array([[1e3], [1.0], [1e-2], [5.0]])
    out = np.asarray(P.orthonormalize(wild))
    np.testing.assert_allclose(out @ out.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(_projector(out), _projector(wild), atol=1e-5)
    with pytest.raises(ValueError, match=r"M <= D, got shape \(9, 4\)"):
        P.orthonormalize(wild.T)


# --- localised PCA -------------------------------------------------------------------------------


def test_fit_local_one_group_equals_fit():
    x = _low_rank(np.random.default_rng(7), 25, 30).reshape(25, 10, 3)
    loc = P.fit_local(x, np.zeros(10, np.int32), 4)
    glob = P.fit(x.reshape(25, 30), 4)
    assert len(loc.pcas) == 1
    for a, b in zip(loc.pcas[0], glob):
        np.testing.assert_allclose(a, b, atol=1e-6)
    k = P.project_local(loc, x)
    assert k.shape == (25, 1, 4)
    np.testing.assert_allclose(k[:, 0], P.project(glob, x.reshape(25, 30)), atol=1e-5)
    np.testing.assert_allclose(P.reconstruct_local(loc, k),
                               np.asarray(P.reconstruct(glob, k[:, 0])).reshape(25, 10, 3),
                               atol=1e-5)


def test_fit_local_two_groups():
    rng = np.random.default_rng(8)
    n, g, a = 30, 12, 3
    groups = np.array([5, 2] * 6)  # interleaved labels; region 0 = label 2 (odd items)
    x = np.zeros((n, g, a))
    for lab in (2, 5):  # each region: rank 3 plus a mean, independent of the other
        idx = np.flatnonzero(groups == lab)
        x[:, idx] = (rng.standard_normal((n, 3)) @ rng.standard_normal((3, idx.size * a))
                     + rng.standard_normal(idx.size * a)).reshape(n, idx.size, a)
    loc = P.fit_local(x, groups, 3, method="gram")
    np.testing.assert_array_equal(loc.labels, [2, 5])
    np.testing.assert_array_equal(loc.items[0], np.arange(1, 12, 2))
    k = jax.jit(P.project_local)(loc, x)
    assert k.shape == (n, 2, 3)
    np.testing.assert_allclose(jax.jit(P.reconstruct_local)(loc, k), x, atol=1e-4)
    # each region's coefficients are its own PCA's
    odd = x[:, 1::2].reshape(n, -1)
    np.testing.assert_allclose(k[:, 0], P.project(P.fit(odd, 3, method="gram"), odd), atol=1e-4)
    # a global PCA with 3 components cannot reconstruct both regions
    glob = P.fit(x.reshape(n, -1), 3)
    flat = x.reshape(n, -1)
    assert np.abs(P.reconstruct(glob, P.project(glob, flat)) - flat).max() > 0.1
    assert P.size_bytes(loc) == 2 * (18 + 3 * 18 + 3) * 4


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs():
    x = _low_rank(np.random.default_rng(9), 10, 6)
    with pytest.raises(ValueError, match=r"2-D \[N, D\], got shape \(10, 2, 3\)"):
        P.fit(x.reshape(10, 2, 3), 2)
    with pytest.raises(ValueError, match=r"n_components=10 must be in \[1, min\(N - 1, D\)\] = "
                                         r"\[1, 6\] for x of shape \(N=10, D=6\)"):
        P.fit(x, 10)
    with pytest.raises(ValueError, match=r"n_components=0 must be in .* = \[1, 6\]"):
        P.fit(x, 0)
    with pytest.raises(ValueError, match=r"= \[1, 4\] for x of shape \(N=5, D=6\)"):
        P.fit(x[:5], 5, method="gram")
    bad = x.copy()
    bad[3, 2] = np.nan
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="2 non-finite values"):
        P.fit(bad, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        P.fit(x, 2, method="svd")
    p = P.fit(x, 3)
    with pytest.raises(ValueError, match=r"D=6 \(the PCA's dimension\), got shape \(4, 5\)"):
        P.project(p, np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"M=3 \(the PCA's components\), got shape \(4, 2\)"):
        P.reconstruct(p, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"exceeds min\(N - 1, G_r \* A\) = 2 for region label"):
        P.fit_local(x.reshape(10, 3, 2), np.array([0, 0, 1]), 4)
    with pytest.raises(ValueError, match=r"groups must be \[G\] int with G=3"):
        P.fit_local(x.reshape(10, 3, 2), np.array([0, 1]), 2)


def test_blockwise_fit_equals_whole(monkeypatch):
    """Large data is centred in float64 blocks (columns: gram, randomized; rows: covariance)."""
    x = _low_rank(np.random.default_rng(10), 40, 90).astype(np.float32)
    whole = {mth: P.fit(x, 6, method=mth) for mth in ("covariance", "gram", "randomized")}
    monkeypatch.setattr(P, "_WHOLE_ELEMENTS", 100)
    monkeypatch.setattr(P, "_BLOCK_ELEMENTS", 40 * 7)  # 7 columns or 3 rows per block
    for mth, ref in whole.items():
        blocked = P.fit(x, 6, method=mth)
        for a, b in zip(blocked, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=mth)
