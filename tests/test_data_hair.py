"""Hair and beard fields: tapered regions, the superset covers every style, beards avoid lips."""

import jax
import numpy as np

from dhjax.data import hair as hair_lib


def _grid():
    phi, theta = np.meshgrid(np.linspace(-np.pi, np.pi, 181), np.linspace(0.0, 1.0, 101))
    return phi.astype(np.float32), theta.astype(np.float32)


def test_every_style_lies_inside_the_superset_and_vanishes_at_its_edge():
    phi, theta = _grid()
    widest = np.asarray(hair_lib.hair_weight(phi, theta, hair_lib.max_hair_style()))
    widest_beard = np.asarray(hair_lib.beard_weight(phi, theta, hair_lib.max_beard_style()))
    styles, beards = set(), set()
    for k in jax.random.split(jax.random.PRNGKey(0), 40):
        h = hair_lib.sample_hair(k)
        b = hair_lib.sample_beard(jax.random.fold_in(k, 1), h)
        styles.add(int(h["style"]))
        beards.add(int(b["style"]))
        t = np.asarray(hair_lib.hair_thickness(phi, theta, h))
        assert np.all(t[widest == 0] == 0)
        assert t.max() <= 0.045
        bt = np.asarray(hair_lib.beard_thickness(phi, theta, b))
        assert np.all(bt[widest_beard == 0] == 0)
        if int(h["style"]) in (0, 1):                 # bald and buzz: no shell
            assert t.max() == 0
    assert len(styles) >= 5 and len(beards) >= 4


def test_hair_stays_off_the_face_and_beards_off_the_lips():
    # Eyes (theta ~0.43, |phi| ~0.23..0.51), nose tip (0.556, 0), lips (0.69, |phi| < 0.25).
    face_pts = np.array([[0.37, 0.43], [-0.37, 0.43], [0.0, 0.556], [0.0, 0.40]], np.float32)
    lips = np.array([[0.0, 0.69], [0.2, 0.69], [-0.2, 0.69]], np.float32)
    for k in jax.random.split(jax.random.PRNGKey(1), 30):
        h = hair_lib.sample_hair(k)
        assert np.all(np.asarray(hair_lib.hair_weight(face_pts[:, 0], face_pts[:, 1], h)) == 0)
        b = hair_lib.sample_beard(k, h, beard_prob=1.0)
        assert np.all(np.asarray(hair_lib.beard_weight(lips[:, 0], lips[:, 1], b)) == 0)


def test_head_angles_and_wrap():
    phi, theta = hair_lib.head_angles(np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]]), np.zeros(3))
    np.testing.assert_allclose(np.asarray(phi)[:2], [0, np.pi / 2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(theta), [0.5, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(hair_lib.wrap_angle(np.array([3 * np.pi / 2, -3 * np.pi / 2]))),
                               [-np.pi / 2, np.pi / 2], atol=1e-6)
