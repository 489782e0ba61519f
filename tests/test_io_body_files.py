"""Tests for dhjax.io.body_files: official-layout SMPL-X files (npz with pickled members, pickles
with chumpy objects and a sparse regressor), the shapedirs split, and errors naming the key."""

import os
import pickle

import numpy as np
import pytest

from dhjax.io import body_files as bf
from test_io_flame_files import CHUMPY_CLASSES, FakeCsc, ch, fake_csc, py2_pickle_bytes

V = 40


def content(seed=0, k=400, n_vertices=V):
    return bf.random_smplx_content(seed, n_vertices=n_vertices, n_components=k)


def write_npz(tmp_path, model, name="SMPLX_NEUTRAL.npz"):
    path = tmp_path / name
    np.savez(path, **model)
    return path


def write_pkl(tmp_path, model, name="bad.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(model, protocol=2))
    return path


def assert_loaded(loaded, raw, n_shape, n_expr_end):
    np.testing.assert_array_equal(loaded["v_template"], raw["v_template"])
    np.testing.assert_array_equal(loaded["faces"], raw["f"])
    np.testing.assert_array_equal(loaded["shapedirs"], raw["shapedirs"][..., :n_shape])
    np.testing.assert_array_equal(loaded["exprdirs"], raw["shapedirs"][..., n_shape:n_expr_end])
    np.testing.assert_array_equal(loaded["posedirs"], raw["posedirs"])
    np.testing.assert_allclose(loaded["j_regressor"], raw["J_regressor"], rtol=1e-7)
    np.testing.assert_array_equal(loaded["lbs_weights"], raw["weights"])
    np.testing.assert_array_equal(loaded["parents"], bf.SMPLX_PARENTS)
    for key in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights"):
        assert loaded[key].dtype == np.float32, key
    assert loaded["faces"].dtype == np.int32 and loaded["parents"].dtype == np.int32


class Evil:
    """Pickles as a call of os.system: the restricted unpickler must refuse it, never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_official_npz_with_pickled_members(tmp_path):
    raw = content()
    # The official SMPLX_*.npz carries pickled dicts next to its arrays; np.load(allow_pickle=False)
    # refuses those, the reader decodes them with the restricted unpickler and ignores them.
    marker = tmp_path / "pwned"
    extra = dict(part2num=np.array({"head": 0, "body": 1}, dtype=object),
                 joint2num=np.array({"pelvis": 0}, dtype=object), allow_pickle=np.array(True),
                 evil=np.array([Evil(marker)], dtype=object))
    path = write_npz(tmp_path, dict(raw, **extra))
    loaded = bf.load_smplx_arrays(path)
    assert not marker.exists()
    assert_loaded(loaded, raw, 300, 400)
    assert loaded["shapedirs"].shape == (V, 3, 300) and loaded["exprdirs"].shape == (V, 3, 100)
    np.testing.assert_array_equal(loaded["lmk_faces"], raw["lmk_faces_idx"])
    np.testing.assert_array_equal(loaded["lmk_bary"], raw["lmk_bary_coords"])
    np.testing.assert_array_equal(loaded["uv_coords"], raw["vt"])
    np.testing.assert_array_equal(loaded["uv_faces"], raw["ft"])
    for side in "lr":
        np.testing.assert_array_equal(loaded[f"hands_components_{side}"], raw[f"hands_components{side}"])
        np.testing.assert_array_equal(loaded[f"hands_mean_{side}"], raw[f"hands_mean{side}"])
    # A needed key holding a refused global is an error naming it, and nothing is run.
    path = write_npz(tmp_path, dict(raw, weights=np.array([Evil(marker)], dtype=object)), "evil.npz")
    with pytest.raises(ValueError, match=r"evil\.npz.*'weights'.*refusing to unpickle global 'posix\.system'"):
        bf.load_smplx_arrays(path)
    assert not marker.exists()


def test_compressed_npz_and_optional_keys_absent(tmp_path):
    raw = content(1)
    minimal = {k: raw[k] for k in bf.SMPLX_KEYS}
    path = tmp_path / "m.npz"
    np.savez_compressed(path, **minimal)
    loaded = bf.load_smplx_arrays(path)
    assert set(loaded) == {"v_template", "faces", "shapedirs", "exprdirs", "posedirs", "j_regressor",
                           "lbs_weights", "parents"}
    assert_loaded(loaded, raw, 300, 400)


def test_legacy_layout_and_explicit_split(tmp_path):
    raw = content(2, k=20)
    loaded = bf.load_smplx_arrays(write_npz(tmp_path, raw))
    assert_loaded(loaded, raw, 10, 20)
    raw = content(3, k=150)
    path = write_npz(tmp_path, raw, "odd.npz")
    assert_loaded(bf.load_smplx_arrays(path), raw, 10, 20)   # smplx's rule for K < 300: 10 + 10
    raw = content(4, k=350)
    path = write_npz(tmp_path, raw, "odd.npz")
    with pytest.raises(ValueError, match=r"odd\.npz.*'shapedirs'.*K = 350.*n_shape="):
        bf.load_smplx_arrays(path)
    assert_loaded(bf.load_smplx_arrays(path, n_shape=250), raw, 250, 350)
    with pytest.raises(ValueError, match=r"n_shape = 351.*shapedirs"):
        bf.load_smplx_arrays(path, n_shape=351)
    with pytest.raises(ValueError, match=r"'shapedirs'.*K = 12"):
        bf.load_smplx_arrays(write_npz(tmp_path, content(5, k=12), "small.npz"))


def test_flattened_posedirs_as_smplx_reads_them(tmp_path):
    raw = content(6)
    path = write_npz(tmp_path, dict(raw, posedirs=raw["posedirs"].reshape(3 * V, 486)))
    np.testing.assert_array_equal(bf.load_smplx_arrays(path)["posedirs"], raw["posedirs"])


def test_python2_chumpy_pickle_with_sparse_regressor(tmp_path):
    raw = content(7)
    model = dict(raw, v_template=ch(raw["v_template"]), shapedirs=ch(raw["shapedirs"]),
                 posedirs=ch(raw["posedirs"]), J_regressor=fake_csc(raw["J_regressor"]), bs_style="lbs")
    path = tmp_path / "SMPLX_NEUTRAL.pkl"
    path.write_bytes(py2_pickle_bytes(model, CHUMPY_CLASSES + [FakeCsc]))
    assert b"chumpy.ch\nCh\n" in path.read_bytes()
    assert_loaded(bf.load_smplx_arrays(path), raw, 300, 400)


def test_missing_file_and_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        bf.load_smplx_arrays(tmp_path / "nope.npz")
    for key in ("weights", "kintree_table", "lmk_bary_coords"):
        model = content()
        del model[key]
        with pytest.raises(ValueError, match=rf"bad\.pkl.*missing key '{key}'"):
            bf.load_smplx_arrays(write_pkl(tmp_path, model))
    model = content()
    del model["f"]
    with pytest.raises(ValueError, match=r"SMPLX_NEUTRAL\.npz.*missing key 'f'"):
        bf.load_smplx_arrays(write_npz(tmp_path, model))


@pytest.mark.parametrize("key, value, expected", [
    ("posedirs", lambda m: m["posedirs"][..., :207], r"\(40, 3, 207\).*\(40, 3, 486\)"),
    ("J_regressor", lambda m: m["J_regressor"][:24], r"\(24, 40\).*\(55, 40\)"),
    ("weights", lambda m: m["weights"][:, :52], r"\(40, 52\).*\(40, 55\)"),
    ("shapedirs", lambda m: m["shapedirs"][:39], r"\(39, 3, 400\).*\(V, 3, K\) with V = 40"),
    ("kintree_table", lambda m: m["kintree_table"][:, :24], r"\(2, 24\).*\(2, 55\)"),
    ("hands_componentsl", lambda m: m["hands_componentsl"][:6], r"\(6, 45\).*\(45, 45\)"),
    ("hands_meanr", lambda m: m["hands_meanr"][:6], r"\(6,\).*\(45,\)"),
    ("ft", lambda m: m["ft"][:5], r"\(5, 3\).*\(80, 3\)"),
    ("lmk_bary_coords", lambda m: m["lmk_bary_coords"][:, :2], r"\(51, 2\)"),
])
def test_wrong_shape_names_key_expected_and_actual(tmp_path, key, value, expected):
    model = content()
    model[key] = value(model)
    with pytest.raises(ValueError, match=rf"bad\.pkl.*'{key}'.*{expected}"):
        bf.load_smplx_arrays(write_pkl(tmp_path, model))


def test_bad_values(tmp_path):
    model = content()
    model["f"] = model["f"].copy()
    model["f"][0, 0] = V
    with pytest.raises(ValueError, match=r"'f' must hold integer vertex indices in \[0, 40\)"):
        bf.load_smplx_arrays(write_pkl(tmp_path, model))
    model = content()
    model["kintree_table"] = model["kintree_table"].copy()
    model["kintree_table"][0, 5] = 7
    with pytest.raises(ValueError, match=r"'kintree_table' gives parents"):
        bf.load_smplx_arrays(write_pkl(tmp_path, model))
    model = content()
    model["posedirs"] = model["posedirs"].copy()
    model["posedirs"][3, 1, 2] = np.inf
    with pytest.raises(ValueError, match=r"'posedirs' contains non-finite values"):
        bf.load_smplx_arrays(write_pkl(tmp_path, model))
    model = content()
    model["lmk_faces_idx"] = model["lmk_faces_idx"] + 1000
    with pytest.raises(ValueError, match=r"'lmk_faces_idx' holds face index"):
        bf.load_smplx_arrays(write_pkl(tmp_path, model))
    model = content()
    model["ft"] = model["ft"] + 1000
    with pytest.raises(ValueError, match=r"'ft' holds indices outside"):
        bf.load_smplx_arrays(write_pkl(tmp_path, model))
