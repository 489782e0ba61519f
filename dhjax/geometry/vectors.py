"""Vector helpers shared by every floor: normalisation and norms that stay finite (and keep
finite gradients) at zero-length vectors, and brute-force nearest neighbours.

All functions are pure jnp, work on any leading shape and are jit/vmap/grad-safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TINY_SQ = 1e-24  # squared lengths at or below this count as zero-length


def safe_normalize(v, fallback=None, eps_sq: float = TINY_SQ):
    """Unit vectors v / |v| over the last axis, `fallback` where |v|^2 <= eps_sq.

    Args:
      v: [..., D] float. fallback: [..., D] (broadcastable) used for zero-length vectors
        (default zeros). eps_sq: squared length below which a vector counts as zero.
    Returns:
      [..., D] unit vectors (or fallback). The gradient is finite everywhere (zero where the
      fallback is taken).
    """
    n2 = jnp.sum(v * v, axis=-1, keepdims=True)
    ok = n2 > eps_sq
    unit = v / jnp.sqrt(jnp.where(ok, n2, 1.0))
    return jnp.where(ok, unit, jnp.zeros_like(v) if fallback is None else fallback)


def safe_norm(v, eps_sq: float = TINY_SQ):
    """|v| over the last axis, 0 where |v|^2 <= eps_sq, with finite gradients there.

    Args: v: [..., D]. Returns: [...].
    """
    n2 = jnp.sum(v * v, axis=-1)
    ok = n2 > eps_sq
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, n2, 1.0)), 0.0)


def knn_indices(queries, refs, k: int = 1, *, ref_valid=None, exclude_self: bool = False,
                chunk: int = 512):
    """Indices of the k nearest refs of every query (brute force, exact, chunked).

    Distances are |q - c|^2 - 2 (q - c).(r - c) + |r - c|^2 with c the valid refs' mean (centring
    keeps the expansion accurate far from the origin); the search runs in blocks of `chunk`
    queries, so memory is chunk x R. No gradient flows through the choice.

    Args:
      queries: [Q, 3] float. refs: [R, 3] float (metres, any consistent unit).
      k: neighbours per query (<= number of valid refs).
      ref_valid: optional [R] bool; invalid refs are never chosen.
      exclude_self: queries are the refs themselves (Q == R) and a point is not its own
        neighbour.
      chunk: queries per block.
    Returns:
      [Q, k] int32, nearest first.
    """
    queries = jax.lax.stop_gradient(jnp.asarray(queries))
    refs = jax.lax.stop_gradient(jnp.asarray(refs))
    R = refs.shape[0]
    if exclude_self and queries.shape[0] != R:
        raise ValueError(f"exclude_self needs queries == refs, got {queries.shape[0]} queries and {R} refs")
    valid = jnp.ones((R,), bool) if ref_valid is None else jnp.asarray(ref_valid, bool)
    centre = jnp.sum(jnp.where(valid[:, None], refs, 0.0), 0) / jnp.maximum(jnp.sum(valid), 1)
    r = refs - centre
    r2 = jnp.where(valid, jnp.sum(r * r, -1), jnp.inf)
    Q = queries.shape[0]
    n_chunks = -(-Q // chunk)
    pad = n_chunks * chunk - Q
    q = jnp.pad(queries - centre, ((0, pad), (0, 0))).reshape(n_chunks, chunk, 3)
    rows = jnp.pad(jnp.arange(Q), (0, pad), constant_values=-1).reshape(n_chunks, chunk)

    def block(args):
        qb, rb = args
        d2 = r2[None, :] - 2.0 * jnp.matmul(qb, r.T, precision="highest")
        if exclude_self:
            d2 = jnp.where(rb[:, None] == jnp.arange(R)[None], jnp.inf, d2)
        return jax.lax.top_k(-d2, k)[1].astype(jnp.int32)

    return jax.lax.map(block, (q, rows)).reshape(-1, k)[:Q]


def nearest_neighbour_distance(points, *, chunk: int = 1024):
    """Distance of every point to its nearest other point of the same set.

    Args:
      points: [N, 3]. Returns: [N], same unit (the neighbour is chosen without gradient; the
      distance is differentiable in both points).
    """
    idx = knn_indices(points, points, 1, exclude_self=True, chunk=chunk)[:, 0]
    return jnp.linalg.norm(points - points[idx], axis=-1)
