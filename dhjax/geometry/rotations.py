"""Rotation representations and conversions between them.

Conventions:
  * rotation matrices act on column vectors, ``x' = R @ x``;
  * quaternions are stored scalar first, ``(w, x, y, z)``, and are Hamilton quaternions;
  * axis-angle vectors are ``aa = theta * axis`` with ``theta`` in radians;
  * the 6D representation (Zhou et al., "On the Continuity of Rotation Representations in
    Neural Networks", CVPR 2019) stores the first two *columns* of the matrix, ``[c1, c2]``.

All functions are pure, accept arbitrary leading batch dimensions and are jit/vmap/grad
compatible. Functions whose natural formulas divide by an angle (Rodrigues, quaternion
logarithm) switch to a Taylor expansion for small angles and use the "double where" trick so
that neither the value nor the gradient contains NaN or Inf at the identity.
"""

from __future__ import annotations

import jax.numpy as jnp
from dhjax.geometry.vectors import safe_normalize

__all__ = [
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "quaternion_multiply",
    "axis_angle_to_quaternion",
    "quaternion_to_axis_angle",
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
]

# Below this squared argument sin(x)/x is evaluated with a Taylor polynomial in x^2 (x < 0.5).
# The truncation error of the degree-8 polynomial is below x^10 / 11! ~ 2.5e-11 there, far below
# float32 resolution, and the polynomial has no square root, so its gradient is exact at 0.
_SINC_TAYLOR_SQ = 0.25


def _check_trailing(x, name: str, trailing: tuple[int, ...]):
    """Convert ``x`` to a float array and check that its trailing dims equal ``trailing``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    k = len(trailing)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != trailing:
        expected = "[..., " + ", ".join(str(d) for d in trailing) + "]"
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(x.shape)}")
    return x


def _sinc_from_sq(x2):
    """sin(x)/x given ``x2 = x**2 >= 0``; smooth in x2 (Taylor near 0, exact elsewhere)."""
    small = x2 < _SINC_TAYLOR_SQ
    # Taylor branch: 1 - x^2/3! + x^4/5! - x^6/7! + x^8/9!   (Horner form in x2).
    taylor = 1.0 + x2 * (-1.0 / 6.0 + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 / 362880.0)))
    # Exact branch with a safe argument so the unused branch never produces NaN gradients.
    x = jnp.sqrt(jnp.where(small, 1.0, x2))
    exact = jnp.sin(x) / x
    return jnp.where(small, taylor, exact)


def _skew(v):
    """Cross-product matrix ``[v]_x`` of ``v: [..., 3]`` -> ``[..., 3, 3]``."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    o = jnp.zeros_like(x)
    return jnp.stack(
        [
            jnp.stack([o, -z, y], axis=-1),
            jnp.stack([z, o, -x], axis=-1),
            jnp.stack([-y, x, o], axis=-1),
        ],
        axis=-2,
    )


def axis_angle_to_matrix(aa):
    """Rodrigues' formula: axis-angle vector to rotation matrix.

    ``R = I + sin(t)/t K + (1 - cos t)/t^2 K^2`` with ``K = [aa]_x`` and ``t = |aa|``. The
    second coefficient is evaluated as ``0.5 * (sin(t/2) / (t/2))^2``, which avoids the
    cancellation in ``1 - cos t``; both coefficients are Taylor polynomials in ``t^2`` for small
    ``t``, so values and gradients are exact and finite at ``aa = 0`` (where ``dR/daa_i`` is the
    i-th skew-symmetric generator).

    Args:
      aa: [..., 3] float, axis * angle (radians).

    Returns:
      [..., 3, 3] rotation matrices.
    """
    aa = _check_trailing(aa, "aa", (3,))
    t2 = jnp.sum(aa * aa, axis=-1)
    a = _sinc_from_sq(t2)
    half_sinc = _sinc_from_sq(0.25 * t2)
    b = 0.5 * half_sinc * half_sinc
    k = _skew(aa)
    eye = jnp.eye(3, dtype=aa.dtype)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def axis_angle_to_quaternion(aa):
    """Axis-angle vector to unit quaternion ``(cos(t/2), sin(t/2) * axis)``.

    Smooth and finite (value and gradient) at ``aa = 0``. The result has ``w >= 0`` for angles
    up to pi; larger angles give ``w < 0`` (the same rotation as ``-q``).

    Args:
      aa: [..., 3] float, axis * angle (radians).

    Returns:
      [..., 4] unit quaternions (w, x, y, z).
    """
    aa = _check_trailing(aa, "aa", (3,))
    t2 = jnp.sum(aa * aa, axis=-1)
    h2 = 0.25 * t2  # (t/2)^2
    small = h2 < _SINC_TAYLOR_SQ
    # cos(t/2) as a polynomial in (t/2)^2 near zero, exact elsewhere.
    cos_taylor = 1.0 + h2 * (-0.5 + h2 * (1.0 / 24.0 + h2 * (-1.0 / 720.0 + h2 / 40320.0)))
    cos_exact = jnp.cos(jnp.sqrt(jnp.where(small, 1.0, h2)))
    w = jnp.where(small, cos_taylor, cos_exact)
    xyz = (0.5 * _sinc_from_sq(h2))[..., None] * aa
    return jnp.concatenate([w[..., None], xyz], axis=-1)


def quaternion_to_axis_angle(q):
    """Quaternion (any non-zero norm) to axis-angle vector with angle in [0, pi].

    ``q`` and ``-q`` give the same result (the sign is flipped so that ``w >= 0``). Uses
    ``angle = 2 atan2(|v|, w)``, which is accurate near 0 and near pi, and a Taylor expansion of
    ``2 atan(s/w) / s`` for small ``s = |v|`` so gradients are finite at the identity.

    Args:
      q: [..., 4] float quaternions (w, x, y, z); need not be normalised.

    Returns:
      [..., 3] axis-angle vectors.
    """
    q = _check_trailing(q, "q", (4,))
    sign = jnp.where(q[..., :1] < 0, -1.0, 1.0).astype(q.dtype)
    q = q * sign
    w = q[..., 0]
    v = q[..., 1:]
    s2 = jnp.sum(v * v, axis=-1)
    w2 = w * w
    # Small-angle branch: angle < ~0.02 rad.
    small = (s2 <= 1e-4 * w2) & (w2 > 0)
    w_safe = jnp.where(small, w, 1.0)
    x2 = s2 / (w_safe * w_safe)  # (s/w)^2
    # 2 atan(x)/s = (2/w) * atan(x)/x = (2/w) (1 - x^2/3 + x^4/5 - x^6/7)
    taylor = (2.0 / w_safe) * (1.0 + x2 * (-1.0 / 3.0 + x2 * (1.0 / 5.0 - x2 / 7.0)))
    # Zero quaternion (invalid input) is routed to s = 1 so the result is finite (zero).
    s = jnp.sqrt(jnp.where(small | (s2 <= 0), 1.0, s2))
    exact = 2.0 * jnp.arctan2(s, w) / s
    factor = jnp.where(small, taylor, exact)
    return factor[..., None] * v


def quaternion_to_matrix(q):
    """Quaternion (w, x, y, z) to rotation matrix; ``q`` is normalised internally.

    Uses ``s = 2 / |q|^2`` in the standard formula, which is equivalent to normalising first.
    A zero quaternion maps to the identity (finite values and gradients).

    Args:
      q: [..., 4] float quaternions (w, x, y, z), any non-zero norm.

    Returns:
      [..., 3, 3] rotation matrices.
    """
    q = _check_trailing(q, "q", (4,))
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    n2 = jnp.sum(q * q, axis=-1)
    ok = n2 > 1e-20
    s = jnp.where(ok, 2.0 / jnp.where(ok, n2, 1.0), 0.0)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = [
        [1.0 - s * (yy + zz), s * (xy - wz), s * (xz + wy)],
        [s * (xy + wz), 1.0 - s * (xx + zz), s * (yz - wx)],
        [s * (xz - wy), s * (yz + wx), 1.0 - s * (xx + yy)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_quaternion(R):
    """Rotation matrix to unit quaternion (w, x, y, z) with ``w >= 0``.

    Shepperd's method: of the four expressions ``4w^2 = 1 + tr R``, ``4x^2 = 1 + R00 - R11 - R22``
    etc. the largest (always >= 1 for a rotation) is used as the pivot, so the division is always
    well conditioned, including at angle pi. The result is renormalised (which also tolerates
    slightly non-orthonormal input) and its sign chosen so that ``w >= 0``; at exactly angle pi
    (``w = 0``) the sign is whatever the pivot gives.

    Args:
      R: [..., 3, 3] float rotation matrices.

    Returns:
      [..., 4] unit quaternions.
    """
    R = _check_trailing(R, "R", (3, 3))
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    m = jnp.stack(
        [
            1.0 + r00 + r11 + r22,
            1.0 + r00 - r11 - r22,
            1.0 - r00 + r11 - r22,
            1.0 - r00 - r11 + r22,
        ],
        axis=-1,
    )  # [..., 4] = 4 * (w^2, x^2, y^2, z^2)
    d21, d02, d10 = r21 - r12, r02 - r20, r10 - r01
    s01, s02, s12 = r01 + r10, r02 + r20, r12 + r21
    cand = jnp.stack(
        [
            jnp.stack([m[..., 0], d21, d02, d10], axis=-1),
            jnp.stack([d21, m[..., 1], s01, s02], axis=-1),
            jnp.stack([d02, s01, m[..., 2], s12], axis=-1),
            jnp.stack([d10, s02, s12, m[..., 3]], axis=-1),
        ],
        axis=-2,
    )  # [..., 4 (pivot), 4 (wxyz)]
    # Each candidate divided by 2 sqrt(pivot); clamp so the unused candidates stay finite.
    denom = 2.0 * jnp.sqrt(jnp.maximum(m, 0.1))
    cand = cand / denom[..., None]
    onehot = (jnp.arange(4) == jnp.argmax(m, axis=-1)[..., None]).astype(R.dtype)
    q = jnp.sum(cand * onehot[..., None], axis=-2)
    q = q / jnp.sqrt(jnp.maximum(jnp.sum(q * q, axis=-1, keepdims=True), 1e-20))
    sign = jnp.where(q[..., :1] < 0, -1.0, 1.0).astype(q.dtype)
    return q * sign


def matrix_to_axis_angle(R):
    """Rotation matrix to axis-angle vector with angle in [0, pi].

    Goes through :func:`matrix_to_quaternion` (pivoted, robust near pi) and
    :func:`quaternion_to_axis_angle` (atan2 based, Taylor near 0). At exactly angle pi the sign of
    the axis is ambiguous (``aa`` and ``-aa`` are the same rotation).

    Args:
      R: [..., 3, 3] float rotation matrices.

    Returns:
      [..., 3] axis-angle vectors.
    """
    R = _check_trailing(R, "R", (3, 3))
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def quaternion_multiply(q1, q2):
    """Hamilton product ``q1 * q2`` (the rotation ``q2`` followed by ``q1``).

    ``quaternion_to_matrix(quaternion_multiply(q1, q2)) == quaternion_to_matrix(q1) @
    quaternion_to_matrix(q2)``. Leading dimensions broadcast.

    Args:
      q1: [..., 4] float quaternions (w, x, y, z).
      q2: [..., 4] float quaternions (w, x, y, z).

    Returns:
      [..., 4] product quaternions (not renormalised).
    """
    q1 = _check_trailing(q1, "q1", (4,))
    q2 = _check_trailing(q2, "q2", (4,))
    w1, x1, y1, z1 = q1[..., 0], q1[..., 1], q1[..., 2], q1[..., 3]
    w2, x2, y2, z2 = q2[..., 0], q2[..., 1], q2[..., 2], q2[..., 3]
    return jnp.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        axis=-1,
    )


def rotation_6d_to_matrix(d6):
    """6D representation (first two columns) to rotation matrix by Gram-Schmidt.

    ``b1 = c1/|c1|``, ``b2 = normalize(c2 - <b1, c2> b1)``, ``b3 = b1 x b2``; the matrix has
    columns ``[b1, b2, b3]`` (Zhou et al. 2019). Inputs with ``c1 = 0`` or ``c2 || c1`` are
    degenerate; they give finite but non-orthonormal output.

    Args:
      d6: [..., 6] float, ``[c1 (3), c2 (3)]``.

    Returns:
      [..., 3, 3] rotation matrices.
    """
    d6 = _check_trailing(d6, "d6", (6,))
    c1, c2 = d6[..., :3], d6[..., 3:]
    b1 = safe_normalize(c1)
    b2 = safe_normalize(c2 - jnp.sum(b1 * c2, axis=-1, keepdims=True) * b1)
    b3 = jnp.cross(b1, b2)
    return jnp.stack([b1, b2, b3], axis=-1)


def matrix_to_rotation_6d(R):
    """Rotation matrix to 6D representation ``[R[:, 0], R[:, 1]]`` (first two columns).

    Inverse of :func:`rotation_6d_to_matrix` on rotation matrices.

    Args:
      R: [..., 3, 3] float rotation matrices.

    Returns:
      [..., 6] float.
    """
    R = _check_trailing(R, "R", (3, 3))
    return jnp.concatenate([R[..., :, 0], R[..., :, 1]], axis=-1)
