"""Principal component analysis: the linear eigenbases GEM distils per-frame Gaussian attributes
into.

A `PCA` holds a mean [D], orthonormal components [M, D] (rows, like scikit-learn's
``components_``), the sample variance of each coefficient (n - 1 denominator, as scikit-learn)
and its square root `sigma`. `project` / `reconstruct` map data [..., D] <-> coefficients
[..., M] (pure jnp, any leading shape, jit/vmap/grad); `orthonormalize` re-orthonormalises a basis
by QR (pure jnp, for a jitted refinement step); `fit_local` fits one PCA per region of items
(localised PCA) with `project_local` / `reconstruct_local`.

Precision. `fit` runs once, on the host, so it computes in float64 with numpy: the mean, the
D x D covariance ('covariance'), the N x N Gram matrix of the centred data ('gram') or the
randomised range finder ('randomized') are all float64, and the results are stored as float32
jnp arrays. Squaring the data (covariance and Gram alike) halves the significant digits of the
small components; in float64 that still leaves ~8 digits for a component with 1e-8 of the
largest variance, against none in float32, and it costs no global state (no ``jax_enable_x64``).
Components computed as U^T Xc / s ('gram', wide 'randomized') are re-orthonormalised in
float64 (Cholesky QR, in order, so the leading components are untouched to float error): without
it, components of variance < ~1e-7 of the largest lose orthogonality (errors ~eps lam_max / lam).
Components whose singular value is below sqrt(eps) * 10 of the largest (variance numerically zero:
x has rank < M) get variance 0 with every method; their vectors complete the others to an
orthonormal set (seeded random unit vectors for 'gram' and 'randomized', eigenvectors of the
covariance's null space for 'covariance').
The data is never copied whole to float64 when it is large: the centred float64 copy is made in
blocks of columns (or rows) of at most `_BLOCK_ELEMENTS` entries, so fitting GEM's
[1000, 3 x 60k] float32 frames needs ~the input plus one block.

Sign convention (scikit-learn >= 1.5 ``PCA(svd_solver='full')``, i.e. ``svd_flip(U, Vt,
u_based_decision=False)``): each component row is flipped so that its entry of largest absolute
value (the first such entry on ties) is positive. All methods apply it, so their components can be
compared with scikit-learn's directly.

Methods of `fit`:
  'covariance': eigendecomposition of the D x D covariance (for small D).
  'gram': eigendecomposition of the N x N Gram matrix Xc Xc^T of the centred data, components
    = U^T Xc / s (for small N and large D: GEM's case, N ~ 100-1000 frames, D ~ 180k).
  'randomized': randomised SVD (Halko, Martinsson & Tropp 2011, Alg. 4.3/4.4: a Gaussian test
    matrix of k = M + `n_oversamples` columns, `n_iter` power iterations, then an exact
    eigendecomposition of the small k x k projected Gram matrix). The range basis lives on the
    smaller side of the data ([min(N, D), k]) and is QR-normalised once per iteration, i.e. after
    each application of Xc Xc^T (or Xc^T Xc), which in float64 still resolves components down to
    ~1e-7 of the largest singular value. Approximate; exact when the data has rank <= k.
    Each iteration is two passes over the data, so for GEM's N ~ 200 'gram' (one pass) is faster;
    'randomized' pays off when N and D are both large.
  'auto': 'covariance' when D <= N, else 'gram'; 'randomized' instead when min(N, D) > 4096 and
    M < min(N, D) / 10 (eigendecomposing a > 4096^2 matrix costs more than a few data passes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    "PCA", "LocalPCA", "fit", "project", "reconstruct", "truncate", "orthonormalize",
    "fit_local", "project_local", "reconstruct_local", "size_bytes",
]

METHODS = ("auto", "covariance", "gram", "randomized")
_BLOCK_ELEMENTS = 1 << 24  # float64 entries per block of centred data (128 MiB)
_WHOLE_ELEMENTS = 1 << 26  # data up to this size is centred into one float64 copy (512 MiB)
_AUTO_RANDOMIZED_MIN = 4096


class PCA(NamedTuple):
    """A fitted PCA (a pytree; all arrays float32).

    Fields:
      mean: [D] the data mean.
      components: [M, D] orthonormal rows, by decreasing variance.
      explained_variance: [M] sample variance of each coefficient (n - 1 denominator).
      explained_variance_ratio: [M] explained_variance / total variance of the data.
      sigma: [M] sqrt(explained_variance), the standard deviation of each coefficient.
      n_samples: int, N, the number of rows the PCA was fitted on.
    """

    mean: jnp.ndarray
    components: jnp.ndarray
    explained_variance: jnp.ndarray
    explained_variance_ratio: jnp.ndarray
    sigma: jnp.ndarray
    n_samples: int


class LocalPCA(NamedTuple):
    """Localised PCA: one `PCA` per region of items (a pytree).

    Fields:
      labels: [R] int, the sorted distinct region labels; region r has label labels[r].
      items: tuple of R [G_r] int32 arrays, the item indices of each region (ascending).
      pcas: tuple of R `PCA`, region r's PCA over its items' values flattened item-major,
        D_r = G_r * A, each with the same number M of components.
    """

    labels: np.ndarray
    items: tuple
    pcas: tuple


# ----------------------------------------------------------------------------------------------
# Host-side float64 helpers for fit.


class _Centred:
    """Blocks of the centred data x - mean in float64, without a whole float64 copy if large."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n, self.d = x.shape
        self.mean = x.mean(axis=0, dtype=np.float64)
        self.whole = None
        if x.size <= _WHOLE_ELEMENTS:
            self.whole = x.astype(np.float64) - self.mean

    def col_blocks(self):
        """Yields (slice, [N, c] float64 centred block) over the columns."""
        if self.whole is not None:
            yield slice(0, self.d), self.whole
            return
        c = max(1, _BLOCK_ELEMENTS // self.n)
        for j in range(0, self.d, c):
            s = slice(j, min(j + c, self.d))
            yield s, self.x[:, s].astype(np.float64) - self.mean[s]

    def row_blocks(self):
        """Yields [r, D] float64 centred blocks over the rows."""
        if self.whole is not None:
            yield self.whole
            return
        r = max(1, _BLOCK_ELEMENTS // self.d)
        for i in range(0, self.n, r):
            yield self.x[i:i + r].astype(np.float64) - self.mean

    def total_sq(self) -> float:
        return float(sum(np.sum(b * b) for _, b in self.col_blocks()))

    def left(self, m):
        """Xc @ m for m [D, k] -> [N, k]."""
        out = np.zeros((self.n, m.shape[1]))
        for s, b in self.col_blocks():
            out += b @ m[s]
        return out

    def right(self, q):
        """q^T @ Xc for q [N, k] -> [k, D]."""
        out = np.empty((q.shape[1], self.d))
        for s, b in self.col_blocks():
            out[:, s] = q.T @ b
        return out


def _svd_flip_rows(v):
    """Flips each row of v [M, D] so that its entry of largest |value| is positive."""
    idx = np.argmax(np.abs(v), axis=1)
    signs = np.sign(v[np.arange(v.shape[0]), idx])
    signs[signs == 0] = 1.0
    return v * signs[:, None]


def _cholesky_qr_rows(v):
    """Orthonormalises the rows of v [k, D] in order (row i from rows 0..i), by Cholesky QR.

    For rows that are already nearly orthonormal (as here), one pass leaves errors of ~eps.
    """
    if v.shape[0] == 0:
        return v
    chol = np.linalg.cholesky(v @ v.T)
    return np.linalg.solve(chol, v)


def _orthonormal_rows(v, ok, rng):
    """Rows of v [M, D] made exactly orthonormal: the rows where ok are orthonormalised in order
    (a float64 clean-up: those of small variance come out of U^T Xc / s with errors of
    ~eps lam_max / lam), the others (variance numerically zero) replaced by random unit vectors
    orthogonal to all the rest."""
    v = v.copy()
    good = _cholesky_qr_rows(v[ok])
    v[ok] = good
    bad = np.flatnonzero(~ok)
    if bad.size:
        fill = rng.standard_normal((bad.size, v.shape[1]))
        for _ in range(2):  # project out the good rows twice (re-orthogonalisation)
            fill -= (fill @ good.T) @ good
        v[bad] = _cholesky_qr_rows(fill)
    return v


def _rank_tol(lam):
    """Singular values at or below this count as zero: sqrt(eps) of the largest one.

    Eigenvalues of a float64 Gram matrix are accurate to ~eps * lam_max, so singular values
    below ~sqrt(eps * lam_max) are noise, and dividing by them would not give a unit vector.
    """
    return np.sqrt(max(lam[0], 0.0) * np.finfo(np.float64).eps) * 10.0


def _fit_covariance(c: _Centred, m: int):
    cov = np.zeros((c.d, c.d))
    for b in c.row_blocks():
        cov += b.T @ b
    lam, vec = _top_eigh(cov, m)
    return lam, vec.T


def _fit_gram(c: _Centred, m: int, rng):
    gram = np.zeros((c.n, c.n))
    for _, b in c.col_blocks():
        gram += b @ b.T
    lam, u = _top_eigh(gram, m)
    s = np.sqrt(lam)
    ok = s > _rank_tol(lam)
    v = c.right(u) / np.where(ok, s, 1.0)[:, None]
    lam = np.where(ok, lam, 0.0)
    return lam, _orthonormal_rows(v, ok, rng)


def _top_eigh(sym, m):
    """The m largest eigenvalues (clipped at 0) and their eigenvectors (columns) of sym."""
    lam, u = np.linalg.eigh(sym)
    return np.maximum(lam[::-1][:m], 0.0), u[:, ::-1][:, :m]


def _fit_randomized(c: _Centred, m: int, rng, n_iter: int, n_oversamples: int):
    """Randomised SVD with the range found on the smaller side of Xc (Q: [min(N, D), k])."""
    k = min(m + n_oversamples, c.n, c.d)
    qr = lambda a: np.linalg.qr(a)[0]  # noqa: E731
    if c.n <= c.d:  # range of Xc (N side): Q <- qr(Xc Xc^T Q)
        q = qr(c.left(rng.standard_normal((c.d, k))))
        for _ in range(n_iter):
            q = qr(c.left(c.right(q).T))
        b = c.right(q)  # [k, D] = Q^T Xc, Xc ~ Q b
        lam, u = _top_eigh(b @ b.T, m)
        s = np.sqrt(lam)
        ok = s > _rank_tol(lam)
        v = (u.T @ b) / np.where(ok, s, 1.0)[:, None]
        return np.where(ok, lam, 0.0), _orthonormal_rows(v, ok, rng)
    # range of Xc^T (D side): P <- qr(Xc^T Xc P)
    p = qr(c.right(rng.standard_normal((c.n, k))).T)
    for _ in range(n_iter):
        p = qr(c.right(c.left(p)).T)
    b = c.left(p).T  # [k, N] = P^T Xc^T, Xc^T ~ P b
    lam, u = _top_eigh(b @ b.T, m)
    return lam, (p @ u).T


def _check_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be 2-D [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"{name}: x of shape {x.shape} has {bad} non-finite values (NaN or inf)")
    return x


def fit(x, n_components: int, *, method: str = "auto", seed: int = 0, n_iter: int = 7,
        n_oversamples: int = 10) -> PCA:
    """Fits a PCA with `n_components` components to the rows of x (host, float64).

    Args:
      x: [N, D] float (any units; N samples, e.g. frames, of D values each), N >= 2, finite.
      n_components: M, 1 <= M <= min(N - 1, D).
      method: 'auto' | 'covariance' | 'gram' | 'randomized' (see the module docstring).
      seed: seeds the randomised test matrix ('randomized') and the completion of the basis
        when the data has rank < M ('gram').
      n_iter: power iterations of 'randomized'.
      n_oversamples: extra columns of the randomised range finder.
    Returns:
      `PCA` with mean [D], components [M, D], explained_variance / _ratio / sigma [M] (float32,
      the units of x and their squares) and n_samples = N. Components are sign-normalised (entry
      of largest |value| positive, scikit-learn's convention). Components with zero variance (x of
      rank < M; singular value < 10 sqrt(eps) of the largest) get variance 0 (every method) and
      unit vectors orthogonal to the others (seeded random ones for 'gram' and 'randomized').
    Raises:
      ValueError: x not 2-D, non-finite x, M out of range, unknown method.
    """
    x = _check_2d(x, "fit")
    n, d = x.shape
    m = int(n_components)
    if n < 2:
        raise ValueError(f"fit: needs at least 2 samples (rows), got x of shape {x.shape}")
    if not 1 <= m <= min(n - 1, d):
        raise ValueError(
            f"fit: n_components={m} must be in [1, min(N - 1, D)] = [1, {min(n - 1, d)}] for x of "
            f"shape (N={n}, D={d})")
    if method not in METHODS:
        raise ValueError(f"fit: method must be one of {METHODS}, got {method!r}")
    if int(n_iter) < 0 or int(n_oversamples) < 0:
        raise ValueError(f"fit: n_iter={n_iter} and n_oversamples={n_oversamples} must be >= 0")
    if method == "auto":
        small = min(n, d)
        if small > _AUTO_RANDOMIZED_MIN and m < small / 10:
            method = "randomized"
        else:
            method = "covariance" if d <= n else "gram"

    rng = np.random.default_rng(seed)
    c = _Centred(x)
    if method == "covariance":
        lam, v = _fit_covariance(c, m)
    elif method == "gram":
        lam, v = _fit_gram(c, m, rng)
    else:
        lam, v = _fit_randomized(c, m, rng, int(n_iter), int(n_oversamples))
    # Every method: variances of numerically zero singular values are 0, not their round-off.
    lam = np.where(np.sqrt(lam) > _rank_tol(lam), lam, 0.0) if lam.size else lam
    v = _svd_flip_rows(v)
    ev = lam / (n - 1)
    total = c.total_sq() / (n - 1)
    ratio = ev / total if total > 0 else np.zeros_like(ev)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return PCA(mean=f32(c.mean), components=f32(v), explained_variance=f32(ev),
               explained_variance_ratio=f32(ratio), sigma=f32(np.sqrt(ev)), n_samples=n)


# ----------------------------------------------------------------------------------------------
# Pure jnp maps.


def project(pca: PCA, x):
    """Coefficients k = (x - mean) @ components^T.

    Args: pca: `PCA` with M components of dimension D. x: [..., D] float.
    Returns: [..., M] coefficients (units of x).
    """
    x = jnp.asarray(x)
    d = pca.components.shape[-1]
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(f"project: x must be [..., D] with D={d} (the PCA's dimension), got shape "
                         f"{x.shape}")
    return (x - pca.mean) @ pca.components.T


def reconstruct(pca: PCA, k):
    """Data from coefficients: mean + k @ components.

    Args: pca: `PCA` with M components of dimension D. k: [..., M] float coefficients.
    Returns: [..., D].
    """
    k = jnp.asarray(k)
    m = pca.components.shape[0]
    if k.ndim < 1 or k.shape[-1] != m:
        raise ValueError(f"reconstruct: k must be [..., M] with M={m} (the PCA's components), got "
                         f"shape {k.shape}")
    return pca.mean + k @ pca.components


def truncate(pca: PCA, m: int) -> PCA:
    """The PCA restricted to its first m components (ratios stay relative to the total variance).

    Args: pca: `PCA` with M components. m: 1 <= m <= M.
    Returns: `PCA` with components [m, D] and [m] variances.
    """
    big_m = pca.components.shape[0]
    if not 1 <= int(m) <= big_m:
        raise ValueError(f"truncate: m={m} must be in [1, {big_m}] (the PCA's components)")
    m = int(m)
    return pca._replace(components=pca.components[:m],
                        explained_variance=pca.explained_variance[:m],
                        explained_variance_ratio=pca.explained_variance_ratio[:m],
                        sigma=pca.sigma[:m])


def orthonormalize(components):
    """Re-orthonormalises a basis of rows by QR, keeping its span and, where possible, its vectors.

    QR of components^T = Q R; each column of Q is multiplied by sign(diag R) (0 counts as +1), so
    an orthonormal input comes back unchanged (up to float error) and row i of the output is the
    Gram-Schmidt orthonormalisation of rows 0..i. Pure jnp, jit-safe.

    Args: components: [M, D] float, M <= D, rows linearly independent.
    Returns: [M, D] orthonormal rows spanning the same subspace.
    """
    b = jnp.asarray(components)
    if b.ndim != 2 or b.shape[0] > b.shape[1]:
        raise ValueError(f"orthonormalize: components must be [M, D] with M <= D, got shape "
                         f"{b.shape}")
    q, r = jnp.linalg.qr(b.T)
    s = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
    return (q * s).T


# ----------------------------------------------------------------------------------------------
# Localised PCA.


def fit_local(x, groups, n_components: int, *, method: str = "auto", seed: int = 0) -> LocalPCA:
    """One PCA per region of items: region r's PCA is fitted on x[:, items_r, :] flattened.

    Args:
      x: [N, G, A] float (N frames, G items such as Gaussians, A values per item).
      groups: [G] int region label of each item (any integers; R = number of distinct labels).
      n_components: M, the same for every region; 1 <= M <= min(N - 1, G_r * A) for each r.
      method, seed: as in `fit`, for every region.
    Returns:
      `LocalPCA` (labels [R], items R x [G_r], pcas R x `PCA` of dimension G_r * A).
    """
    x = np.asarray(x)
    groups = np.asarray(groups)
    if x.ndim != 3:
        raise ValueError(f"fit_local: x must be 3-D [N, G, A], got shape {x.shape}")
    if groups.shape != (x.shape[1],) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"fit_local: groups must be [G] int with G={x.shape[1]} (x's items), got "
                         f"shape {groups.shape} dtype {groups.dtype}")
    n, _, a = x.shape
    labels = np.unique(groups)
    items, pcas = [], []
    for lab in labels:
        idx = np.flatnonzero(groups == lab).astype(np.int32)
        d = idx.size * a
        if int(n_components) > min(n - 1, d):
            raise ValueError(
                f"fit_local: n_components={n_components} exceeds min(N - 1, G_r * A) = "
                f"{min(n - 1, d)} for region label {lab} ({idx.size} items of {a} values, N={n})")
        items.append(idx)
        pcas.append(fit(x[:, idx, :].reshape(n, d), n_components, method=method, seed=seed))
    return LocalPCA(labels=labels, items=tuple(items), pcas=tuple(pcas))


def _item_size(lpca: LocalPCA) -> int:
    return lpca.pcas[0].components.shape[-1] // lpca.items[0].shape[0]


def project_local(lpca: LocalPCA, x):
    """Per-region coefficients of items' values.

    Args: lpca: `LocalPCA` of R regions, M components. x: [..., G, A] float.
    Returns: [..., R, M] coefficients, region r in row r (label lpca.labels[r]).
    """
    x = jnp.asarray(x)
    g = sum(i.shape[0] for i in lpca.items)
    a = _item_size(lpca)
    if x.ndim < 2 or x.shape[-2:] != (g, a):
        raise ValueError(f"project_local: x must be [..., G, A] = [..., {g}, {a}], got shape "
                         f"{x.shape}")
    lead = x.shape[:-2]
    ks = [project(p, jnp.take(x, idx, axis=-2).reshape(*lead, idx.shape[0] * a))
          for idx, p in zip(lpca.items, lpca.pcas)]
    return jnp.stack(ks, axis=-2)


def reconstruct_local(lpca: LocalPCA, k):
    """Items' values from per-region coefficients.

    Args: lpca: `LocalPCA` of R regions, M components, G items of A values. k: [..., R, M].
    Returns: [..., G, A].
    """
    k = jnp.asarray(k)
    r, m = len(lpca.pcas), lpca.pcas[0].components.shape[0]
    if k.ndim < 2 or k.shape[-2:] != (r, m):
        raise ValueError(f"reconstruct_local: k must be [..., R, M] = [..., {r}, {m}], got shape "
                         f"{k.shape}")
    g = sum(i.shape[0] for i in lpca.items)
    a = _item_size(lpca)
    lead = k.shape[:-2]
    out = jnp.zeros((*lead, g, a), dtype=lpca.pcas[0].mean.dtype)
    for j, (idx, p) in enumerate(zip(lpca.items, lpca.pcas)):
        vals = reconstruct(p, k[..., j, :]).reshape(*lead, idx.shape[0], a)
        out = out.at[..., idx, :].set(vals)
    return out


def size_bytes(pca, dtype_bytes: int = 4) -> int:
    """Storage of mean + components + sigma: (D + M D + M) * dtype_bytes bytes.

    Args: pca: `PCA`, or `LocalPCA` (summed over its regions). dtype_bytes: bytes per value.
    Returns: int bytes.
    """
    if isinstance(pca, LocalPCA):
        return sum(size_bytes(p, dtype_bytes) for p in pca.pcas)
    m, d = pca.components.shape
    return int((d + m * d + m) * dtype_bytes)
