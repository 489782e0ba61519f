"""Tests for dhjax.geometry.rotations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dhjax.geometry import rotations as _rot


class _Jitted:
    """The module's functions wrapped in jax.jit (one compile per shape keeps the tests fast)."""

    def __init__(self, module):
        self._module = module
        self._cache = {}

    def __getattr__(self, name):
        if name not in self._cache:
            self._cache[name] = jax.jit(getattr(self._module, name))
        return self._cache[name]


rot = _Jitted(_rot)


def _random_aa(rng, n, max_angle=np.pi * 0.999):
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    angle = rng.uniform(0.0, max_angle, size=(n, 1))
    return (axis * angle).astype(np.float32)


def _random_quat(rng, n):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return q.astype(np.float32)


def _generators():
    g = np.zeros((3, 3, 3), np.float32)  # g[i] = d/daa_i of [aa]_x
    g[0, 2, 1], g[0, 1, 2] = 1, -1
    g[1, 0, 2], g[1, 2, 0] = 1, -1
    g[2, 1, 0], g[2, 0, 1] = 1, -1
    return g


def _assert_rotation(R, atol=2e-6):
    R = np.asarray(R)
    eye = np.broadcast_to(np.eye(3), R.shape)
    np.testing.assert_allclose(np.swapaxes(R, -1, -2) @ R, eye, atol=atol)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=atol * 3)


def test_axis_angle_to_matrix_known_values():
    R = rot.axis_angle_to_matrix(jnp.array([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(R, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(rot.axis_angle_to_matrix(jnp.zeros(3)), np.eye(3), atol=0)
    # batch shape is preserved
    assert rot.axis_angle_to_matrix(jnp.zeros((2, 5, 3))).shape == (2, 5, 3, 3)


def test_axis_angle_matrix_round_trip_and_orthonormal():
    rng = np.random.default_rng(0)
    aa = np.concatenate(
        [_random_aa(rng, 64), _random_aa(rng, 16, 1e-3), np.zeros((1, 3), np.float32)]
    )
    R = rot.axis_angle_to_matrix(aa)
    _assert_rotation(R)
    np.testing.assert_allclose(rot.matrix_to_axis_angle(R), aa, atol=2e-5)


def test_axis_angle_small_angle_accuracy():
    # Against a float64 Rodrigues evaluation for tiny angles (where naive formulas cancel).
    rng = np.random.default_rng(1)
    aa = _random_aa(rng, 32, 0.6) * rng.uniform(1e-6, 1.0, size=(32, 1)).astype(np.float32)
    aa64 = aa.astype(np.float64)
    t = np.linalg.norm(aa64, axis=-1)[:, None, None]
    k = np.asarray(rot._skew(aa64.astype(np.float32))).astype(np.float64)
    ref = np.eye(3) + np.sin(t) / t * k + (1 - np.cos(t)) / t**2 * (k @ k)
    np.testing.assert_allclose(rot.axis_angle_to_matrix(aa), ref, atol=2e-7)


def test_near_pi_round_trip():
    rng = np.random.default_rng(2)
    axis = rng.normal(size=(32, 3))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    angle = np.pi - rng.uniform(1e-4, 1e-2, size=(32, 1))
    aa = (axis * angle).astype(np.float32)
    R = rot.axis_angle_to_matrix(aa)
    back = np.asarray(rot.matrix_to_axis_angle(R))
    np.testing.assert_allclose(back, aa, atol=1e-4)
    # exactly pi: either sign of the axis is correct
    aa_pi = np.array([0.0, np.pi, 0.0], np.float32)
    back = np.asarray(rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(aa_pi)))
    assert min(np.abs(back - aa_pi).max(), np.abs(back + aa_pi).max()) < 1e-5


def test_quaternion_round_trips():
    rng = np.random.default_rng(3)
    q = _random_quat(rng, 64)
    q = q * np.where(q[:, :1] < 0, -1, 1)  # canonical w >= 0
    R = rot.quaternion_to_matrix(q)
    _assert_rotation(R)
    np.testing.assert_allclose(rot.matrix_to_quaternion(R), q, atol=2e-6)
    # quaternion_to_matrix normalises its input
    np.testing.assert_allclose(rot.quaternion_to_matrix(3.0 * q), R, atol=1e-6)
    aa = rot.quaternion_to_axis_angle(q)
    np.testing.assert_allclose(rot.axis_angle_to_quaternion(aa), q, atol=2e-6)
    # -q is the same rotation
    np.testing.assert_allclose(rot.quaternion_to_axis_angle(-q), aa, atol=1e-6)
    assert np.all(np.asarray(rot.matrix_to_quaternion(R))[:, 0] >= 0)


def test_matrix_to_quaternion_all_pivots():
    # rotations by ~pi about each axis force each of the four pivot branches
    for aa in ([0.1, 0.0, 0.0], [3.1, 0.0, 0.0], [0.0, 3.1, 0.0], [0.0, 0.0, 3.1]):
        aa = np.array(aa, np.float32)
        q = rot.matrix_to_quaternion(rot.axis_angle_to_matrix(aa))
        np.testing.assert_allclose(q, rot.axis_angle_to_quaternion(aa), atol=1e-6)


def test_quaternion_multiply_matches_matrix_product():
    rng = np.random.default_rng(4)
    q1, q2 = _random_quat(rng, 16), _random_quat(rng, 16)
    prod = rot.quaternion_multiply(q1, q2)
    np.testing.assert_allclose(
        rot.quaternion_to_matrix(prod),
        rot.quaternion_to_matrix(q1) @ rot.quaternion_to_matrix(q2),
        atol=2e-6,
    )
    # broadcasting
    assert rot.quaternion_multiply(q1[:1], q2).shape == (16, 4)
    np.testing.assert_allclose(rot.quaternion_multiply(jnp.array([1.0, 0, 0, 0]), q2), q2)


def test_rotation_6d():
    rng = np.random.default_rng(5)
    R = np.asarray(rot.axis_angle_to_matrix(_random_aa(rng, 32)))
    d6 = rot.matrix_to_rotation_6d(R)
    assert d6.shape == (32, 6)
    np.testing.assert_allclose(d6[:, :3], R[:, :, 0])
    np.testing.assert_allclose(d6[:, 3:], R[:, :, 1])
    np.testing.assert_allclose(rot.rotation_6d_to_matrix(d6), R, atol=2e-6)
    # arbitrary 6D input -> a rotation whose first column is parallel to c1
    x = rng.normal(size=(32, 6)).astype(np.float32)
    Rx = np.asarray(rot.rotation_6d_to_matrix(x))
    _assert_rotation(Rx)
    c1 = x[:, :3] / np.linalg.norm(x[:, :3], axis=-1, keepdims=True)
    np.testing.assert_allclose(Rx[:, :, 0], c1, atol=1e-6)
    # second column lies in span(c1, c2)
    n = np.cross(x[:, :3], x[:, 3:])
    np.testing.assert_allclose(np.sum(Rx[:, :, 1] * n, -1), 0.0, atol=1e-5)


def test_grad_at_zero_is_generators():
    J = jax.jacfwd(rot.axis_angle_to_matrix)(jnp.zeros(3))  # [3, 3, 3(i)]
    np.testing.assert_allclose(np.moveaxis(np.asarray(J), -1, 0), _generators(), atol=0)
    Jr = jax.jacrev(rot.axis_angle_to_matrix)(jnp.zeros(3))
    np.testing.assert_allclose(np.moveaxis(np.asarray(Jr), -1, 0), _generators(), atol=0)


def test_gradients_finite_at_zero_and_near_pi():
    rng = np.random.default_rng(6)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    w = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)

    fns = {
        "aa->R": lambda a: jnp.sum(w * rot.axis_angle_to_matrix(a)),
        "aa->q": lambda a: jnp.sum(rot.axis_angle_to_quaternion(a)),
        "aa->R->aa": lambda a: jnp.sum(rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(a))),
        "aa->q->aa": lambda a: jnp.sum(
            rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(a))
        ),
    }
    points = np.stack(
        [np.zeros(3), 1e-8 * axis, 0.4999 * axis, 1.0001 * axis, (np.pi - 1e-3) * axis]
    ).astype(np.float32)
    for name, f in fns.items():
        g = np.asarray(jax.jit(jax.vmap(jax.grad(f)))(points))
        assert np.all(np.isfinite(g)), (name, g)
    # aa -> R -> aa is the identity map away from pi: its Jacobian is I, including at 0
    round_trip = lambda a: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(a))  # noqa: E731
    J = np.asarray(jax.jit(jax.vmap(jax.jacfwd(round_trip)))(points[:4]))
    np.testing.assert_allclose(J, np.broadcast_to(np.eye(3), J.shape), atol=2e-4)
    # near pi (but not at the sign flip) the round trip Jacobian is still I
    J = jax.jit(jax.jacfwd(round_trip))(jnp.asarray((np.pi - 1e-2) * axis, jnp.float32))
    np.testing.assert_allclose(J, np.eye(3), atol=5e-3)


def test_gradient_matches_finite_differences_across_taylor_threshold():
    # the Taylor/exact switch is at |aa| = 0.5 (sin(t)/t) and |aa| = 1 (half angle, t/2 = 0.5)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 3))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    for t in (0.3, 0.4999, 0.5001, 0.999, 1.001, 2.0):
        a0 = t * axis
        g = np.asarray(
            jax.grad(lambda a: jnp.sum(jnp.asarray(w, jnp.float32) * rot.axis_angle_to_matrix(a)))(
                jnp.asarray(a0, jnp.float32)
            )
        )
        # float64 reference via central differences of the closed form
        def f64(a):
            th = np.linalg.norm(a)
            k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
            R = np.eye(3) + np.sin(th) / th * k + (1 - np.cos(th)) / th**2 * k @ k
            return np.sum(w * R)

        h = 1e-6
        fd = np.array([(f64(a0 + h * e) - f64(a0 - h * e)) / (2 * h) for e in np.eye(3)])
        np.testing.assert_allclose(g, fd, atol=2e-5 * np.abs(w).sum())


def test_jit_and_vmap():
    rng = np.random.default_rng(8)
    aa = _random_aa(rng, 8)
    R = jax.jit(_rot.axis_angle_to_matrix)(aa)
    np.testing.assert_allclose(_rot.axis_angle_to_matrix(aa), R, atol=1e-7)  # eager path
    np.testing.assert_allclose(jax.vmap(_rot.axis_angle_to_matrix)(aa), R, atol=1e-7)
    np.testing.assert_allclose(jax.jit(rot.matrix_to_axis_angle)(R), aa, atol=2e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="aa"):
        rot.axis_angle_to_matrix(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="R"):
        rot.matrix_to_axis_angle(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="q"):
        rot.quaternion_to_matrix(jnp.zeros(3))
    with pytest.raises(ValueError, match="d6"):
        rot.rotation_6d_to_matrix(jnp.zeros(5))
    with pytest.raises(ValueError, match="q2"):
        rot.quaternion_multiply(jnp.zeros(4), jnp.zeros(3))


@pytest.mark.peers
def test_against_scipy():
    spt = pytest.importorskip("scipy.spatial.transform")
    Rotation = spt.Rotation
    rng = np.random.default_rng(9)
    aa = _random_aa(rng, 64)
    ref = Rotation.from_rotvec(aa.astype(np.float64))
    np.testing.assert_allclose(rot.axis_angle_to_matrix(aa), ref.as_matrix(), atol=1e-6)
    # scipy quaternions are scalar last (x, y, z, w)
    q_ref = np.roll(ref.as_quat(), 1, axis=-1)
    np.testing.assert_allclose(rot.axis_angle_to_quaternion(aa), q_ref, atol=1e-6)

    q = _random_quat(rng, 64)
    ref_q = Rotation.from_quat(np.roll(q.astype(np.float64), -1, axis=-1))
    np.testing.assert_allclose(rot.quaternion_to_matrix(q), ref_q.as_matrix(), atol=1e-6)
    np.testing.assert_allclose(rot.quaternion_to_axis_angle(q), ref_q.as_rotvec(), atol=1e-5)

    Rm = Rotation.random(64, random_state=10)
    mats = Rm.as_matrix().astype(np.float32)
    np.testing.assert_allclose(rot.matrix_to_axis_angle(mats), Rm.as_rotvec(), atol=2e-5)
    q_ref = np.roll(Rm.as_quat(), 1, axis=-1)
    q_ref *= np.where(q_ref[:, :1] < 0, -1, 1)
    np.testing.assert_allclose(rot.matrix_to_quaternion(mats), q_ref, atol=2e-6)


# --- property tests (hypothesis) ---------------------------------------------------------------
# Each example is a fixed-shape batch of _B float32 rows, so every jitted function compiles once
# for the whole module; examples are few and deadline-free (the first call includes compilation).
# Tolerances are float32 rounding: one ulp is 1.2e-7 for O(1) entries and 2.4e-7 for an angle
# near pi; 2e-6 is ~8-16 ulps (the largest errors seen over 2e5 random rows were ~5e-7).
_B = 8
_PROPERTY = settings(max_examples=30, deadline=None)
_ANGLE_MARGIN = 1e-3  # stay clear of angle pi, where aa and -aa are the same rotation


def _unit_rows(v, fallback):
    """Normalise rows of ``v`` (float64); rows too short to have a direction become ``fallback``."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > 1e-2, v / np.maximum(n, 1e-2), fallback)


_components = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)


@st.composite
def _axis_angles(draw, max_angle=np.pi - _ANGLE_MARGIN):
    """[_B, 3] float32 axis-angle vectors, angles in [0, max_angle] (both ends included)."""
    axis = _unit_rows(draw(hnp.arrays(np.float64, (_B, 3), elements=_components)), [1.0, 0, 0])
    angle = draw(
        hnp.arrays(np.float64, (_B, 1), elements=st.floats(0.0, max_angle, allow_subnormal=False))
    )
    return (axis * angle).astype(np.float32)


@st.composite
def _unit_quaternions(draw):
    """[_B, 4] float32 unit quaternions of either sign (w < 0 and w = 0 included)."""
    q = draw(hnp.arrays(np.float64, (_B, 4), elements=_components))
    return _unit_rows(q, [1.0, 0, 0, 0]).astype(np.float32)


def _close_up_to_sign(a, b, atol):
    """Row-wise ``a == b`` or ``a == -b`` (a quaternion and its negative are the same rotation)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.minimum(np.abs(a - b).max(-1), np.abs(a + b).max(-1))
    assert np.all(err <= atol), (err.max(), a[err.argmax()], b[err.argmax()])


@_PROPERTY
@given(aa=_axis_angles())
def test_property_axis_angle_matrix_round_trip(aa):
    R = rot.axis_angle_to_matrix(aa)
    _assert_rotation(R)
    np.testing.assert_allclose(rot.matrix_to_axis_angle(R), aa, atol=2e-6)
    # and through the quaternion (w >= 0 below pi, so no sign ambiguity either)
    q = rot.axis_angle_to_quaternion(aa)
    assert np.all(np.asarray(q)[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q, np.float64), axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(rot.quaternion_to_axis_angle(q), aa, atol=2e-6)
    np.testing.assert_allclose(rot.quaternion_to_matrix(q), R, atol=2e-6)


@_PROPERTY
@given(q=_unit_quaternions(), norm=st.floats(0.1, 10.0))
def test_property_quaternion_round_trips_up_to_sign(q, norm):
    R = rot.quaternion_to_matrix(q)
    _assert_rotation(R)
    # the matrix ignores the norm and the sign of the quaternion
    np.testing.assert_allclose(rot.quaternion_to_matrix(np.float32(-norm) * q), R, atol=2e-6)
    back = np.asarray(rot.matrix_to_quaternion(R))
    assert np.all(back[:, 0] >= 0)
    _close_up_to_sign(back, q, atol=2e-6)
    # q -> axis-angle -> q (the angle lands in [0, pi]) and scaled / negated q give the same vector
    aa = rot.quaternion_to_axis_angle(q)
    assert np.all(np.linalg.norm(np.asarray(aa, np.float64), axis=-1) <= np.pi + 1e-5)
    _close_up_to_sign(rot.axis_angle_to_quaternion(aa), q, atol=2e-6)
    aa_neg = np.asarray(rot.quaternion_to_axis_angle(np.float32(-norm) * q))
    # at w = 0 (angle pi) aa and -aa are equally valid; XLA on CPU flushes subnormal floats to
    # zero, so a w below the smallest normal float32 counts as 0 there as well
    w_abs = np.abs(q[:, 0]) * min(norm, 1.0)
    w_nonzero = w_abs >= 2 * np.finfo(np.float32).tiny
    np.testing.assert_allclose(aa_neg[w_nonzero], np.asarray(aa)[w_nonzero], atol=2e-6)
    _close_up_to_sign(aa_neg, aa, atol=2e-6)


@_PROPERTY
@given(aa=_axis_angles(max_angle=np.pi))
def test_property_rotation_6d_round_trip(aa):
    R = np.asarray(rot.axis_angle_to_matrix(aa))
    d6 = rot.matrix_to_rotation_6d(R)
    np.testing.assert_allclose(rot.rotation_6d_to_matrix(d6), R, atol=2e-6)


@_PROPERTY
@given(d6=hnp.arrays(np.float32, (_B, 6), elements=st.floats(-2.0, 2.0, width=32)))
def test_property_rotation_6d_projection(d6):
    # an arbitrary 6D vector maps to a rotation, which the 6D round trip then leaves unchanged;
    # only rows whose two columns are far from degenerate (zero or parallel) are checked
    c1, c2 = d6[:, :3].astype(np.float64), d6[:, 3:].astype(np.float64)
    sin_between = np.linalg.norm(np.cross(c1, c2), axis=-1) / np.maximum(
        np.linalg.norm(c1, axis=-1) * np.linalg.norm(c2, axis=-1), 1e-30
    )
    ok = (np.linalg.norm(c1, axis=-1) > 0.1) & (np.linalg.norm(c2, axis=-1) > 0.1)
    ok &= sin_between > 0.1
    R = np.asarray(rot.rotation_6d_to_matrix(d6))
    assert np.all(np.isfinite(R))
    _assert_rotation(R[ok], atol=1e-5)
    again = np.asarray(rot.rotation_6d_to_matrix(rot.matrix_to_rotation_6d(R)))
    np.testing.assert_allclose(again[ok], R[ok], atol=1e-5)
    # the first column keeps the direction of c1, the second lies on c2's side of it
    c1_unit = c1 / np.maximum(np.linalg.norm(c1, axis=-1, keepdims=True), 1e-30)
    np.testing.assert_allclose(R[ok][:, :, 0], c1_unit[ok], atol=1e-5)
    assert np.all(np.sum(R[:, :, 1] * c2, axis=-1)[ok] > 0)


@_PROPERTY
@given(q1=_unit_quaternions(), q2=_unit_quaternions())
def test_property_quaternion_multiply_composes_like_matrices(q1, q2):
    R1, R2 = np.asarray(rot.quaternion_to_matrix(q1)), np.asarray(rot.quaternion_to_matrix(q2))
    prod = rot.quaternion_multiply(q1, q2)
    # the Hamilton product of unit quaternions is a unit quaternion for R1 @ R2
    prod_norm = np.linalg.norm(np.asarray(prod, np.float64), axis=-1)
    np.testing.assert_allclose(prod_norm, 1.0, atol=1e-6)
    np.testing.assert_allclose(rot.quaternion_to_matrix(prod), R1 @ R2, atol=2e-6)
    _close_up_to_sign(rot.matrix_to_quaternion(R1 @ R2), prod, atol=5e-6)
    # the conjugate is the inverse
    conj = q1 * np.array([1, -1, -1, -1], np.float32)
    _close_up_to_sign(rot.quaternion_multiply(q1, conj), np.tile([1.0, 0, 0, 0], (_B, 1)), 1e-6)


@_PROPERTY
@given(aa1=_axis_angles(), aa2=_axis_angles())
def test_property_axis_angle_composition(aa1, aa2):
    # composing through quaternions and through matrices agree, and so do the axis-angle vectors
    # of the composition (up to sign, which is ambiguous when the composed angle is pi)
    q = rot.quaternion_multiply(
        rot.axis_angle_to_quaternion(aa1), rot.axis_angle_to_quaternion(aa2)
    )
    R = np.asarray(rot.axis_angle_to_matrix(aa1)) @ np.asarray(rot.axis_angle_to_matrix(aa2))
    np.testing.assert_allclose(rot.quaternion_to_matrix(q), R, atol=3e-6)
    _close_up_to_sign(rot.matrix_to_quaternion(R), q, atol=5e-6)
    _close_up_to_sign(rot.matrix_to_axis_angle(R), rot.quaternion_to_axis_angle(q), atol=5e-6)
