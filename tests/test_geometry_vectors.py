"""dhjax.geometry.vectors against numpy and scipy's KD-tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree

from dhjax.geometry import vectors


def test_safe_normalize_and_norm():
    v = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1e-13, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(vectors.safe_normalize(v), [[0.6, 0.8, 0.0], [0, 0, 0], [0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(vectors.safe_normalize(v, fallback=jnp.array([0.0, 0.0, 1.0]))[1], [0, 0, 1])
    np.testing.assert_allclose(vectors.safe_norm(v), [5.0, 0.0, 0.0], atol=1e-7)
    g = jax.grad(lambda x: jnp.sum(vectors.safe_normalize(x)) + jnp.sum(vectors.safe_norm(x)))(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(g))


def test_knn_matches_kdtree_with_masks_and_offsets():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(500, 3)).astype(np.float32) + 50.0   # far from the origin: centring matters
    queries = rng.normal(size=(130, 3)).astype(np.float32) + 50.0
    valid = rng.random(500) > 0.3
    idx = np.asarray(vectors.knn_indices(queries, refs, 4, ref_valid=valid, chunk=64))
    sub = np.flatnonzero(valid)
    _, want = cKDTree(refs[sub]).query(queries, 4)
    np.testing.assert_array_equal(idx, sub[want])


def test_nearest_neighbour_distance_excludes_self():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 3)).astype(np.float32)
    d = np.asarray(jax.jit(vectors.nearest_neighbour_distance, static_argnames="chunk")(pts, chunk=128))
    want, _ = cKDTree(pts).query(pts, 2)
    np.testing.assert_allclose(d, want[:, 1], rtol=1e-5)
    with pytest.raises(ValueError, match="exclude_self needs queries == refs"):
        vectors.knn_indices(pts[:5], pts, 1, exclude_self=True)
