"""Tests for dhjax.io.params: npz + json parameter sets."""

import json

import numpy as np
import pytest

from dhjax.io.params import load_params, params_paths, save_params


def sample_params():
    rng = np.random.default_rng(0)
    return {
        "shape": rng.normal(size=(300,)).astype(np.float32),
        "expr": rng.normal(size=(8, 100)).astype(np.float64),
        "frame_ids": np.arange(8, dtype=np.int64),
        "visible": np.array([True, False, True]),
        "focal": 1.25,
        "n_frames": 8,
        "file": np.zeros(2, np.float32),  # a key that np.savez(**kw) would reject
        "camera/K": np.eye(3, dtype=np.float32),
    }


@pytest.mark.parametrize("given", ["run/params", "run/params.npz", "run/params.json"])
def test_round_trip_and_json(tmp_path, given):
    params = sample_params()
    npz_path, json_path = save_params(tmp_path / given, params, meta={"units": "metres", "step": np.int64(3)})
    assert npz_path == tmp_path / "run" / "params.npz" and json_path == tmp_path / "run" / "params.json"
    for form in ("run/params", "run/params.npz", "run/params.json"):
        loaded = load_params(tmp_path / form, required=["shape", "expr"])
        assert set(loaded) == set(params)
        for key, value in params.items():
            expected = np.asarray(value)
            np.testing.assert_array_equal(loaded[key], expected, err_msg=key)
            assert loaded[key].dtype == expected.dtype and loaded[key].shape == expected.shape, key
    doc = json.loads(json_path.read_text())
    assert doc["arrays"]["expr"] == {"shape": [8, 100], "dtype": "float64"}
    assert doc["arrays"]["focal"]["value"] == 1.25 and doc["arrays"]["n_frames"]["value"] == 8
    assert "value" not in doc["arrays"]["shape"]
    assert doc["meta"] == {"units": "metres", "step": 3}


def test_params_paths():
    assert params_paths("a/b.c") == (params_paths("a/b.c.npz")[0], params_paths("a/b.c.json")[1])
    assert str(params_paths("a/b.c")[0]).endswith("b.c.npz")


def test_missing_required_keys_named(tmp_path):
    save_params(tmp_path / "p", {"shape": np.zeros(3)})
    with pytest.raises(ValueError, match=r"p\.npz.*missing required keys \['expr', 'jaw'\]"):
        load_params(tmp_path / "p", required=["shape", "expr", "jaw"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_named(tmp_path, bad):
    values = np.zeros(4, np.float32)
    values[2] = bad
    save_params(tmp_path / "p", {"ok": np.ones(2), "expr": values, "count": np.arange(3)})
    with pytest.raises(ValueError, match=r"p\.npz.*'expr'.*non-finite"):
        load_params(tmp_path / "p.json")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_params(tmp_path / "absent")
    with pytest.raises(ValueError, match="'obj'"):
        save_params(tmp_path / "p", {"obj": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="'nested'"):
        save_params(tmp_path / "p", {"nested": {"a": 1}})
    with pytest.raises(ValueError, match="meta"):
        save_params(tmp_path / "p", {"a": 1}, meta={"bad": object()})
    junk = tmp_path / "junk.npz"
    junk.write_text("not an npz")
    with pytest.raises(ValueError, match="junk.npz"):
        load_params(junk)
