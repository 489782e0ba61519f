"""Least-squares similarity / rigid alignment of corresponding point sets (Umeyama 1991).

The rotation is the solution of the orthogonal Procrustes problem restricted to SO(3),
``R = argmax_{R in SO(3)} tr(R^T M)`` for the 3x3 cross-covariance ``M``, computed by SVD with the
reflection correction ``diag(1, 1, det(U V^T))``. Its derivative is supplied by a custom JVP that
differentiates the (unique) maximiser directly instead of the SVD factors: with ``P = R^T M``
(symmetric), ``dR = R Omega`` where the skew matrix ``Omega`` solves ``Omega P + P Omega =
R^T dM - dM^T R``. This stays finite when singular values of ``M`` repeat (for example a source
set with isotropic covariance), where the derivative of the SVD factors themselves is undefined;
it only degenerates when the optimal rotation itself is not unique (e.g. collinear points), where
the affected components are set to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["umeyama", "apply_similarity"]


def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _svd_rotation(M):
    """Primal part: SO(3) maximiser of tr(R^T M) plus the quantities the JVP needs."""
    U, sig, Vt = jnp.linalg.svd(M)
    d = jnp.sign(jnp.linalg.det(U) * jnp.linalg.det(Vt))
    d = jnp.where(d == 0, 1.0, d).astype(M.dtype)
    signs = jnp.concatenate([jnp.ones_like(sig[..., :2]), d[..., None]], axis=-1)
    R = (U * signs[..., None, :]) @ Vt
    return R, sig * signs, jnp.swapaxes(Vt, -1, -2)


@jax.custom_jvp
def _best_rotation(M):
    """``argmax_{R in SO(3)} tr(R^T M)`` for ``M: [..., 3, 3]`` -> ``[..., 3, 3]``."""
    return _svd_rotation(M)[0]


@_best_rotation.defjvp
def _best_rotation_jvp(primals, tangents):
    (M,), (dM,) = primals, tangents
    R, p, V = _svd_rotation(M)
    Rt = jnp.swapaxes(R, -1, -2)
    C = Rt @ dM
    C = C - jnp.swapaxes(C, -1, -2)  # skew: R^T dM - dM^T R
    Vt = jnp.swapaxes(V, -1, -2)
    Cv = Vt @ C @ V  # in the eigenbasis of P = V diag(p) V^T
    denom = p[..., :, None] + p[..., None, :]
    tol = 1e-7 * jnp.abs(p[..., :1, None]) + 1e-30
    ok = jnp.abs(denom) > tol
    omega_v = jnp.where(ok, Cv / jnp.where(ok, denom, 1.0), 0.0)
    omega = V @ omega_v @ Vt
    return R, R @ omega


def umeyama(src, dst, weights=None, with_scale: bool = True):
    """Weighted least-squares similarity (or rigid) transform from ``src`` to ``dst``.

    Minimises ``sum_i w_i ||dst_i - (s R src_i + t)||^2`` over ``s > 0`` (or ``s = 1`` when
    ``with_scale=False``, the Kabsch solution), ``R in SO(3)`` (reflections are excluded, so
    ``det R = +1`` always) and ``t``. Following Umeyama (1991), with normalised weights
    ``w_i / sum w``: ``mu_s, mu_d`` the weighted means, ``M = sum w (dst - mu_d)(src - mu_s)^T``,
    ``M = U D V^T``, ``S = diag(1, 1, det(U V^T))``, ``R = U S V^T``,
    ``s = tr(D S) / sum w |src - mu_s|^2`` and ``t = mu_d - s R mu_s``.

    Leading batch dimensions of ``src``, ``dst`` and ``weights`` broadcast against each other.
    Degenerate inputs stay finite: all-equal source points give ``s = 1``; all-zero weights are
    treated as tiny equal weights. Differentiable w.r.t. all array inputs (see module docstring).

    Args:
      src: [..., N, 3] float source points, metres.
      dst: [..., N, 3] float target points, metres.
      weights: [..., N] non-negative float weights, or None for uniform weights.
      with_scale: estimate a scale (True) or fix it to 1 (False).

    Returns:
      scale: [...] float, R: [..., 3, 3] float, t: [..., 3] float, such that
      ``dst ~= scale * src @ R^T + t``.
    """
    src = _as_float(src)
    dst = _as_float(dst)
    if src.ndim < 2 or src.shape[-1] != 3:
        raise ValueError(f"src: expected shape [..., N, 3], got {tuple(src.shape)}")
    if dst.ndim < 2 or dst.shape[-1] != 3:
        raise ValueError(f"dst: expected shape [..., N, 3], got {tuple(dst.shape)}")
    n = src.shape[-2]
    if dst.shape[-2] != n:
        raise ValueError(
            f"dst: expected shape [..., {n}, 3] (same N as src), got {tuple(dst.shape)}"
        )
    if weights is None:
        w = jnp.ones(src.shape[-2:-1], src.dtype)
    else:
        w = _as_float(weights)
        if w.ndim < 1 or w.shape[-1] != n:
            raise ValueError(
                f"weights: expected shape [..., {n}] (same N as src), got {tuple(w.shape)}"
            )
    try:
        batch = jnp.broadcast_shapes(src.shape[:-2], dst.shape[:-2], w.shape[:-1])
    except ValueError as e:
        raise ValueError(
            f"src, dst, weights: leading dims do not broadcast: {tuple(src.shape)}, "
            f"{tuple(dst.shape)}, {tuple(w.shape)}"
        ) from e
    dtype = jnp.result_type(src.dtype, dst.dtype, w.dtype)
    src = jnp.broadcast_to(src, batch + (n, 3)).astype(dtype)
    dst = jnp.broadcast_to(dst, batch + (n, 3)).astype(dtype)
    w = jnp.broadcast_to(w, batch + (n,)).astype(dtype)

    wsum = jnp.sum(w, axis=-1, keepdims=True)
    w = jnp.where(wsum > 0, w / jnp.where(wsum > 0, wsum, 1.0), 1.0 / n)  # [..., N]
    mu_s = jnp.sum(w[..., None] * src, axis=-2)  # [..., 3]
    mu_d = jnp.sum(w[..., None] * dst, axis=-2)
    xs = src - mu_s[..., None, :]
    xd = dst - mu_d[..., None, :]
    M = jnp.einsum("...n,...ni,...nj->...ij", w, xd, xs)  # [..., 3, 3]
    R = _best_rotation(M)
    if with_scale:
        var_s = jnp.sum(w * jnp.sum(xs * xs, axis=-1), axis=-1)
        ok = var_s > 1e-20
        # tr(D S) == tr(R^T M)
        scale = jnp.where(ok, jnp.sum(R * M, axis=(-2, -1)) / jnp.where(ok, var_s, 1.0), 1.0)
    else:
        scale = jnp.ones(batch, dtype)
    t = mu_d - scale[..., None] * jnp.einsum("...ij,...j->...i", R, mu_s)
    return scale, R, t


def apply_similarity(scale, R, t, points):
    """Apply ``x -> scale * R x + t`` to a set of points.

    Leading batch dimensions of all arguments broadcast against each other.

    Args:
      scale: [...] float (or a Python float).
      R: [..., 3, 3] float rotation (any 3x3 matrix works).
      t: [..., 3] float translation, metres.
      points: [..., N, 3] float points, metres.

    Returns:
      [..., N, 3] transformed points.
    """
    scale = _as_float(scale)
    R = _as_float(R)
    t = _as_float(t)
    points = _as_float(points)
    if R.ndim < 2 or R.shape[-2:] != (3, 3):
        raise ValueError(f"R: expected shape [..., 3, 3], got {tuple(R.shape)}")
    if t.ndim < 1 or t.shape[-1] != 3:
        raise ValueError(f"t: expected shape [..., 3], got {tuple(t.shape)}")
    if points.ndim < 2 or points.shape[-1] != 3:
        raise ValueError(f"points: expected shape [..., N, 3], got {tuple(points.shape)}")
    rotated = jnp.matmul(points, jnp.swapaxes(R, -1, -2))
    return scale[..., None, None] * rotated + t[..., None, :]
