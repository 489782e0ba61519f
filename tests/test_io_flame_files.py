"""Tests for dhjax.io.flame_files: restricted unpickling of official-layout FLAME files."""

import contextlib
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from dhjax.io import flame_files as ff

V, F = 12, 8


# ----------------------------------------------------------------------------------------------
# Helpers that write files in the official layouts
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_modules(classes):
    """Make classes importable under their (module, name) while pickling, then restore sys.modules."""
    saved = {}
    try:
        for cls in classes:
            parts = cls.__module__.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                is_leaf = i == len(parts)
                if name not in saved and (is_leaf or name not in sys.modules):
                    saved[name] = sys.modules.get(name)
                    sys.modules[name] = types.ModuleType(name)
            setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def make_class(module, name):
    cls = type(name, (object,), {})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


Ch = make_class("chumpy.ch", "Ch")
Select = make_class("chumpy.reordering", "Select")
Reshape = make_class("chumpy.reordering", "Reshape")
Transpose = make_class("chumpy.reordering", "transpose")
Add = make_class("chumpy.ch_ops", "add")
FakeCsc = make_class("scipy.sparse.csc", "csc_matrix")
CHUMPY_CLASSES = [Ch, Select, Reshape, Transpose, Add]


def ch(x):
    """A chumpy-like Ch: pickles as its __dict__ with the array under 'x' (as chumpy does)."""
    obj = Ch()
    obj.__dict__.update(x=x, _dirty_vars=set(), _itr=None, _depends_on_deps={}, _make_dense=False,
                        _make_sparse=False)
    return obj


def chumpy_op(cls, **state):
    obj = cls()
    obj.__dict__.update(state, _dirty_vars={"a"}, _itr=None)
    return obj


def fake_csc(dense):
    """A scipy-free stand-in with the state layout of scipy.sparse csc_matrix."""
    cols, rows = np.nonzero(dense.T)  # column-major traversal, rows sorted within a column
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=dense.shape[1]))]).astype(np.int32)
    obj = FakeCsc()
    obj.__dict__.update(data=dense[rows, cols], indices=rows.astype(np.int32), indptr=indptr,
                        _shape=dense.shape, maxprint=50, _has_sorted_indices=True)
    return obj


class Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickler that stores bytes as Python-2 'str' opcodes (SHORT_BINSTRING/BINSTRING).

    Together with fix_imports (``builtins`` -> ``__builtin__``) and the numpy.core module name this
    reproduces the byte layout of a pickle written by Python 2 (as the official FLAME files are).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle_bytes(obj, classes=()):
    import io

    with fake_modules(classes):
        buf = io.BytesIO()
        Py2StylePickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    # numpy 2 names its reconstruction module numpy._core; Python-2 era files say numpy.core.
    return data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def official_arrays(seed=0, k=400, n_verts=V):
    rng = np.random.default_rng(seed)
    j_reg = rng.uniform(size=(5, n_verts)) * (rng.uniform(size=(5, n_verts)) < 0.4)
    j_reg /= np.maximum(j_reg.sum(1, keepdims=True), 1e-9)
    weights = rng.uniform(size=(n_verts, 5))
    weights /= weights.sum(1, keepdims=True)
    return {
        "v_template": rng.normal(scale=0.1, size=(n_verts, 3)),
        "f": rng.integers(0, n_verts, size=(F, 3)).astype(np.uint32),
        "shapedirs": rng.normal(scale=1e-3, size=(n_verts, 3, k)),
        "posedirs": rng.normal(scale=1e-3, size=(n_verts, 3, 36)),
        "J_regressor": j_reg,
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
    }


def chumpy_model(arrays):
    """The official FLAME pickle mix: Ch objects, a sparse J_regressor and plain arrays."""
    model = dict(arrays)
    model["v_template"] = ch(arrays["v_template"])
    model["shapedirs"] = ch(arrays["shapedirs"])
    model["posedirs"] = ch(arrays["posedirs"])
    model["J_regressor"] = fake_csc(arrays["J_regressor"])
    model["bs_style"] = "lbs"
    model["bs_type"] = "lrotmin"
    model["J"] = chumpy_op(Add, a=ch(np.zeros((5, 3))), b=ch(np.ones((5, 3))))  # unused key
    return model


def assert_matches(loaded, arrays):
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        assert loaded[key].dtype == np.float32, key
        np.testing.assert_array_equal(loaded[key], arrays[key].astype(np.float32), err_msg=key)
    assert loaded["f"].dtype == np.int32
    np.testing.assert_array_equal(loaded["f"], arrays["f"].astype(np.int32))
    assert loaded["parents"].dtype == np.int32
    np.testing.assert_array_equal(loaded["parents"], [-1, 0, 1, 1, 1])


# ----------------------------------------------------------------------------------------------
# FLAME model
# ----------------------------------------------------------------------------------------------


def test_python2_chumpy_pickle_loads_without_chumpy(tmp_path):
    arrays = official_arrays()
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(py2_pickle_bytes(chumpy_model(arrays), CHUMPY_CLASSES + [FakeCsc]))
    data = path.read_bytes()
    assert b"chumpy.ch\nCh\n" in data and b"numpy.core.multiarray" in data and b"__builtin__\nset" in data
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules

    loaded = ff.load_flame_arrays(path)
    assert_matches(loaded, arrays)
    assert loaded["n_shape"] == 300
    assert set(loaded) == {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "parents", "n_shape"}


@pytest.mark.parametrize("protocol", [0, 1, 2, pickle.HIGHEST_PROTOCOL])
def test_chumpy_pickle_any_protocol(tmp_path, protocol):
    # Protocols 0/1 build objects through copyreg._reconstructor, 2+ through NEWOBJ.
    arrays = official_arrays(seed=9)
    with fake_modules(CHUMPY_CLASSES + [FakeCsc]):
        data = pickle.dumps(chumpy_model(arrays), protocol=protocol)
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    assert_matches(ff.load_flame_arrays(path), arrays)


def test_python3_pickle_of_plain_arrays(tmp_path):
    arrays = official_arrays(seed=1)
    path = tmp_path / "flame2023.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=pickle.HIGHEST_PROTOCOL))
    assert_matches(ff.load_flame_arrays(path), arrays)


def test_pickle_npz_round_trip(tmp_path):
    arrays = official_arrays(seed=2, k=150)
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(py2_pickle_bytes(chumpy_model(arrays), CHUMPY_CLASSES + [FakeCsc]))
    first = ff.load_flame_arrays(pkl, n_shape=120)
    assert first["n_shape"] == 120
    npz = tmp_path / "sub" / "flame.npz"
    assert ff.save_flame_npz(npz, first) == npz
    with np.load(npz) as raw:
        assert set(ff.FLAME_KEYS) <= set(raw.files)
        np.testing.assert_array_equal(raw["kintree_table"], [[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
        assert raw["J_regressor"].shape == (5, V)
    second = ff.load_flame_arrays(npz)
    assert second["n_shape"] == 120  # stored in the npz
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)
        assert np.asarray(second[key]).dtype == np.asarray(first[key]).dtype, key
    # An explicit argument wins over the stored value.
    assert ff.load_flame_arrays(npz, n_shape=7)["n_shape"] == 7


def test_official_layout_npz_and_default_n_shape(tmp_path):
    arrays = official_arrays(seed=3, k=150)
    path = tmp_path / "model.npz"
    np.savez(path, **arrays)
    # K = 150 is not the official 400: the split must be given, never guessed.
    with pytest.raises(ValueError, match=r"model.npz.*'shapedirs'.*K = 150.*flame.load\(\.\.\., file_n_shape=N\)"):
        ff.load_flame_arrays(path)
    loaded = ff.load_flame_arrays(path, n_shape=50)
    assert_matches(loaded, arrays)
    assert loaded["n_shape"] == 50
    with pytest.raises(ValueError, match=r"split 151 .*file_n_shape.* outside \[0, K = 150\].*shapedirs"):
        ff.load_flame_arrays(path, n_shape=151)


def test_kintree_table_with_permuted_joint_columns(tmp_path):
    arrays = official_arrays(seed=4)
    # Same tree, columns listed in a different order: parents are indexed by joint id (row 1).
    arrays["kintree_table"] = np.array([[1, 4294967295, 1, 0, 1], [2, 0, 4, 1, 3]])
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)
    np.testing.assert_array_equal(ff.load_flame_arrays(path)["parents"], [-1, 0, 1, 1, 1])


def test_chumpy_reordering_objects_are_evaluated(tmp_path):
    arrays = official_arrays(seed=5)
    model = dict(arrays)
    flat = arrays["shapedirs"].ravel()
    model["shapedirs"] = chumpy_op(Reshape, a=ch(flat), newshape=(V, 3, 400))
    model["weights"] = chumpy_op(Transpose, a=ch(arrays["weights"].T.copy()), axes=None)
    idxs = np.arange(arrays["v_template"].size)[::-1].copy()
    model["v_template"] = chumpy_op(Select, a=ch(arrays["v_template"].ravel()[::-1].copy()), idxs=idxs,
                                    preferred_shape=(V, 3))
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle_bytes(model, CHUMPY_CLASSES))
    assert_matches(ff.load_flame_arrays(path), arrays)


def test_chumpy_operation_without_x_gives_error_naming_key(tmp_path):
    model = official_arrays(seed=6)
    model["posedirs"] = chumpy_op(Add, a=ch(np.zeros((V, 3, 36))), b=ch(np.zeros((V, 3, 36))))
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle_bytes(model, CHUMPY_CLASSES))
    with pytest.raises(ValueError, match=r"m\.pkl.*'posedirs'.*chumpy\.ch_ops\.add.*'x'"):
        ff.load_flame_arrays(path)


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["csc_matrix", "csr_matrix", "csc_array"])
def test_real_scipy_sparse_regressor(tmp_path, kind):
    sparse = pytest.importorskip("scipy.sparse")
    arrays = official_arrays(seed=7)
    model = dict(arrays)
    model["J_regressor"] = getattr(sparse, kind)(arrays["J_regressor"])
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(model, protocol=2))
    assert b"scipy.sparse" in path.read_bytes()
    loaded = ff.load_flame_arrays(path)
    np.testing.assert_array_equal(loaded["J_regressor"], arrays["J_regressor"].astype(np.float32))
    # A real scipy object handed to the saver is densified too.
    ff.save_flame_npz(tmp_path / "m.npz", model)
    np.testing.assert_array_equal(ff.load_flame_arrays(tmp_path / "m.npz")["J_regressor"], loaded["J_regressor"])


def test_unsupported_sparse_format_is_refused(tmp_path):
    FakeLil = make_class("scipy.sparse._lil", "lil_matrix")
    model = official_arrays(seed=8)
    obj = FakeLil()
    obj.rows = [[0]]
    model["J_regressor"] = obj
    path = tmp_path / "m.pkl"
    path.write_bytes(py2_pickle_bytes(model, [FakeLil]))
    with pytest.raises(ValueError, match=r"m\.pkl.*scipy\.sparse\._lil\.lil_matrix"):
        ff.load_flame_arrays(path)


def _write(tmp_path, model, name="bad.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(model, protocol=2))
    return path


def test_missing_key(tmp_path):
    model = official_arrays()
    del model["weights"]
    with pytest.raises(ValueError, match=r"bad\.pkl.*missing key 'weights'"):
        ff.load_flame_arrays(_write(tmp_path, model))


def test_wrong_shape_names_key_expected_and_actual(tmp_path):
    model = official_arrays()
    model["weights"] = model["weights"][:, :4]
    with pytest.raises(ValueError, match=r"bad\.pkl.*'weights'.*\(12, 4\).*\(12, 5\)"):
        ff.load_flame_arrays(_write(tmp_path, model))
    model = official_arrays()
    model["posedirs"] = model["posedirs"][..., :27]
    with pytest.raises(ValueError, match=r"bad\.pkl.*'posedirs'.*\(12, 3, 27\).*\(12, 3, 36\)"):
        ff.load_flame_arrays(_write(tmp_path, model))


@pytest.mark.parametrize("key", ["shapedirs", "J_regressor", "weights"])
def test_inconsistent_vertex_count(tmp_path, key):
    model = official_arrays()
    model[key] = official_arrays(n_verts=V + 1)[key]
    with pytest.raises(ValueError, match=rf"bad\.pkl.*'{key}'.*13"):
        ff.load_flame_arrays(_write(tmp_path, model))


def test_face_index_out_of_range(tmp_path):
    model = official_arrays()
    model["f"][0, 0] = V
    with pytest.raises(ValueError, match=r"bad\.pkl.*'f'"):
        ff.load_flame_arrays(_write(tmp_path, model))


def test_bad_kintree_table(tmp_path):
    model = official_arrays()
    model["kintree_table"] = np.array([[4294967295, 0, 3, 1, 1], [0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"bad\.pkl.*'kintree_table'"):
        ff.load_flame_arrays(_write(tmp_path, model))


def test_not_a_pickle(tmp_path):
    path = tmp_path / "notes.pkl"
    path.write_text("this is not a pickle\n")
    with pytest.raises(ValueError, match=r"notes\.pkl.*not a readable pickle"):
        ff.load_flame_arrays(path)
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match=r"list\.pkl.*dictionary"):
        ff.load_flame_arrays(path)


def test_nonexistent_file(tmp_path):
    path = tmp_path / "nowhere" / "generic_model.pkl"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ff.load_flame_arrays(path)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    # GLOBAL os.system, MARK, STRING, TUPLE, REDUCE, STOP: plain pickle.load would run the command.
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR.")
    with pytest.raises(ValueError, match=r"evil\.pkl.*'os\.system'"):
        ff.load_flame_arrays(path)
    assert not sentinel.exists()
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(ValueError, match=r"evil\.pkl.*'builtins\.eval'"):
        ff.load_flame_arrays(path)


# ----------------------------------------------------------------------------------------------
# Landmark embeddings
# ----------------------------------------------------------------------------------------------


def _bary(rng, shape):
    b = rng.uniform(0.05, 1.0, size=shape + (3,))
    return b / b.sum(-1, keepdims=True)


def test_deca_landmark_embedding_npy(tmp_path):
    rng = np.random.default_rng(0)
    emb = {
        "static_lmk_faces_idx": rng.integers(0, 9976, 51),
        "static_lmk_bary_coords": _bary(rng, (51,)),
        "full_lmk_faces_idx": rng.integers(0, 9976, (1, 68)),
        "full_lmk_bary_coords": _bary(rng, (1, 68)),
        "dynamic_lmk_faces_idx": rng.integers(0, 9976, (79, 17)),
        "dynamic_lmk_bary_coords": _bary(rng, (79, 17)),
    }
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, emb, allow_pickle=True)
    out = ff.load_landmark_embedding(path, n_faces=9976)
    np.testing.assert_array_equal(out["faces_idx"], emb["full_lmk_faces_idx"][0])
    np.testing.assert_allclose(out["bary"], emb["full_lmk_bary_coords"][0], rtol=1e-6)
    np.testing.assert_array_equal(out["static_faces_idx"], emb["static_lmk_faces_idx"])
    assert out["dynamic_faces_idx"].shape == (79, 17) and out["dynamic_bary"].shape == (79, 17, 3)
    assert out["faces_idx"].dtype == np.int32 and out["bary"].dtype == np.float32
    with pytest.raises(ValueError, match=r"landmark_embedding\.npy.*'full_lmk_faces_idx'.*n_faces = 100"):
        ff.load_landmark_embedding(path, n_faces=100)

    # Only the static 51 present: used as the embedding.
    del emb["full_lmk_faces_idx"], emb["full_lmk_bary_coords"]
    np.save(path, emb, allow_pickle=True)
    out = ff.load_landmark_embedding(path)
    np.testing.assert_array_equal(out["faces_idx"], emb["static_lmk_faces_idx"])
    assert "static_faces_idx" not in out


def test_smplx_static_embedding_python2_pickle(tmp_path):
    rng = np.random.default_rng(1)
    emb = {"lmk_face_idx": rng.integers(0, 9976, 51).astype(np.uint32), "lmk_b_coords": _bary(rng, (51,))}
    path = tmp_path / "flame_static_embedding.pkl"
    path.write_bytes(py2_pickle_bytes(emb))
    out = ff.load_landmark_embedding(path, n_faces=9976)
    np.testing.assert_array_equal(out["faces_idx"], emb["lmk_face_idx"].astype(np.int32))
    np.testing.assert_allclose(out["bary"], emb["lmk_b_coords"], rtol=1e-6)
    assert "indices" not in out


def test_mediapipe_embedding_npz(tmp_path):
    rng = np.random.default_rng(2)
    emb = {
        "lmk_face_idx": rng.integers(0, 9976, 105),
        "lmk_b_coords": _bary(rng, (105,)),
        "landmark_indices": rng.permutation(468)[:105],
    }
    path = tmp_path / "mediapipe_landmark_embedding.npz"
    np.savez(path, **emb)
    out = ff.load_landmark_embedding(path)
    np.testing.assert_array_equal(out["indices"], emb["landmark_indices"])
    assert out["indices"].dtype == np.int32 and out["faces_idx"].shape == (105,)


def test_landmark_embedding_errors(tmp_path):
    rng = np.random.default_rng(3)
    good = {"lmk_face_idx": rng.integers(0, 100, 10), "lmk_b_coords": _bary(rng, (10,))}
    path = tmp_path / "emb.npz"

    bad = dict(good, lmk_b_coords=good["lmk_b_coords"] * 1.1)
    np.savez(path, **bad)
    with pytest.raises(ValueError, match=r"emb\.npz.*'lmk_b_coords'.*sum to 1"):
        ff.load_landmark_embedding(path)

    bad = dict(good)
    bad["lmk_b_coords"] = good["lmk_b_coords"].copy()
    bad["lmk_b_coords"][0, 0] = np.nan
    np.savez(path, **bad)
    with pytest.raises(ValueError, match=r"emb\.npz.*'lmk_b_coords'.*non-finite"):
        ff.load_landmark_embedding(path)

    np.savez(path, lmk_face_idx=good["lmk_face_idx"])
    with pytest.raises(ValueError, match=r"emb\.npz.*missing key 'lmk_b_coords'"):
        ff.load_landmark_embedding(path)

    np.savez(path, lmk_face_idx=good["lmk_face_idx"], lmk_b_coords=good["lmk_b_coords"][:9])
    with pytest.raises(ValueError, match=r"emb\.npz.*'lmk_b_coords'.*\(9, 3\)"):
        ff.load_landmark_embedding(path)

    np.savez(path, something=np.zeros(3))
    with pytest.raises(ValueError, match=r"emb\.npz.*unknown landmark embedding layout"):
        ff.load_landmark_embedding(path)

    with pytest.raises(FileNotFoundError, match="missing_emb"):
        ff.load_landmark_embedding(tmp_path / "missing_emb.npy")


def test_npy_with_malicious_object_is_refused(tmp_path):
    import os

    path = tmp_path / "evil.npy"
    np.save(path, np.array({"lmk_face_idx": os.system}, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"evil\.npy.*refusing.*system"):
        ff.load_landmark_embedding(path)


# ----------------------------------------------------------------------------------------------
# UV layout
# ----------------------------------------------------------------------------------------------


def test_uv_from_obj_all_corner_forms(tmp_path):
    text = "\n".join([
        "# head_template-like",
        "v 0 0 0", "v 1 0 0", "v 0 1 0", "v 1 1 0",
        "vt 0.0 0.0", "vt 1.0 0.0", "vt 0.0 1.0", "vt 1.0 1.0 0.0", "vt 0.25 0.75",
        "vn 0 0 1",
        "f 1/1 2/2 3/3",
        "f 2/5/1 4/4/1 3/3/1",
        "f 1/-5 2/-4 4/-2 3/-3",  # a quad with relative indices -> two triangles
    ])
    path = tmp_path / "head_template.obj"
    path.write_text(text)
    uv, faces = ff.load_flame_uv(path)
    assert uv.dtype == np.float32 and faces.dtype == np.int32
    np.testing.assert_array_equal(uv, [[0, 0], [1, 0], [0, 1], [1, 1], [0.25, 0.75]])
    np.testing.assert_array_equal(faces, [[0, 1, 2], [4, 3, 2], [0, 1, 3], [0, 3, 2]])


def test_uv_obj_without_texture_indices(tmp_path):
    path = tmp_path / "no_uv.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvn 0 0 1\nf 1//1 2//1 3//1\n")
    with pytest.raises(ValueError, match=r"no_uv\.obj:6.*vt"):
        ff.load_flame_uv(path)
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match=r"no_uv\.obj.*'vt'"):
        ff.load_flame_uv(path)
    path.write_text("vt 0 0\nvt 1 0\nf 1/1 2/2 3/3\n")
    with pytest.raises(ValueError, match=r"no_uv\.obj:3.*out of range"):
        ff.load_flame_uv(path)


def test_uv_from_texture_npz(tmp_path):
    rng = np.random.default_rng(4)
    vt = rng.uniform(size=(20, 2))
    ft = rng.integers(0, 20, size=(15, 3))
    path = tmp_path / "FLAME_texture.npz"
    np.savez(path, vt=vt, ft=ft, mean=np.zeros(3), tex_dir=np.zeros((3, 2)))
    uv, faces = ff.load_flame_uv(path)
    np.testing.assert_array_equal(uv, vt.astype(np.float32))
    np.testing.assert_array_equal(faces, ft)
    np.savez(path, vt=vt)
    with pytest.raises(ValueError, match=r"FLAME_texture\.npz.*missing key 'ft'"):
        ff.load_flame_uv(path)
    np.savez(path, vt=vt, ft=ft + 1)
    with pytest.raises(ValueError, match=r"FLAME_texture\.npz.*'ft'.*0-based"):
        ff.load_flame_uv(path)
    with pytest.raises(FileNotFoundError, match="absent.obj"):
        ff.load_flame_uv(tmp_path / "absent.obj")
