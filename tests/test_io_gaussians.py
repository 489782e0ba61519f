"""3DGS PLY export/import: round trip, the exact 3DGS property layout read back by independent PLY
parsers (trimesh, and plyfile, the reader of the original 3DGS code and of much splat tooling),
files written with plyfile the way 3DGS writes them read back, and clear errors for bad files."""

import numpy as np
import pytest

from dhjax.io import gaussians


def random_splats(n=40, m=16, seed=0):
    rng = np.random.default_rng(seed)
    return dict(means=rng.normal(size=(n, 3)).astype(np.float32),
                quats=rng.normal(size=(n, 4)).astype(np.float32),
                scales=np.exp(rng.normal(-4, 1, (n, 3))).astype(np.float32),
                opacities=rng.uniform(0.01, 0.99, n).astype(np.float32),
                sh=rng.normal(size=(n, m, 3)).astype(np.float32))


@pytest.mark.parametrize("m", [1, 4, 16])
def test_round_trip(tmp_path, m):
    g = random_splats(m=m)
    p = gaussians.save_gaussians_ply(tmp_path / "a" / "splats.ply", **g)
    back = gaussians.load_gaussians_ply(p)
    assert back["sh_degree"] == int(np.sqrt(m)) - 1
    for k in ("means", "quats", "sh"):
        np.testing.assert_array_equal(back[k], g[k])
    np.testing.assert_allclose(back["scales"], g["scales"], rtol=1e-5)
    np.testing.assert_allclose(back["opacities"], g["opacities"], rtol=1e-5, atol=1e-6)


def test_layout_matches_3dgs(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    g = random_splats(n=10, m=16)
    p = gaussians.save_gaussians_ply(tmp_path / "s.ply", **g)
    text = p.read_bytes().split(b"end_header")[0].decode()
    props = [l.split()[2] for l in text.splitlines() if l.startswith("property")]
    assert props[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert props[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert props[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    raw = trimesh.load(p, process=False).metadata["_ply_raw"]["vertex"]["data"]
    np.testing.assert_allclose(raw["f_rest_0"], g["sh"][:, 1, 0])     # channel-major: R band 1..15 first
    np.testing.assert_allclose(raw["f_rest_15"], g["sh"][:, 1, 1])
    np.testing.assert_allclose(raw["f_rest_44"], g["sh"][:, 15, 2])
    np.testing.assert_allclose(raw["opacity"], np.log(g["opacities"] / (1 - g["opacities"])), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(raw["scale_2"], np.log(g["scales"][:, 2]), rtol=1e-6)
    np.testing.assert_allclose(raw["rot_0"], g["quats"][:, 0])


def _load_like_3dgs(path, max_sh_degree):
    """The attribute reading of 3DGS's GaussianModel.load_ply, restated with plyfile + numpy:
    activated values (sigmoid opacity, exp scales) and SH [N, M, 3]."""
    plyfile = pytest.importorskip("plyfile")
    el = plyfile.PlyData.read(str(path)).elements[0]
    xyz = np.stack([np.asarray(el[k]) for k in ("x", "y", "z")], axis=1)
    dc = np.stack([np.asarray(el[f"f_dc_{i}"]) for i in range(3)], axis=1)[:, None, :]
    rest_names = sorted((p.name for p in el.properties if p.name.startswith("f_rest_")),
                        key=lambda n: int(n.split("_")[-1]))
    assert len(rest_names) == 3 * (max_sh_degree + 1) ** 2 - 3
    rest = np.stack([np.asarray(el[n]) for n in rest_names], axis=1) if rest_names else np.zeros((len(xyz), 0))
    rest = rest.reshape(len(xyz), 3, (max_sh_degree + 1) ** 2 - 1).transpose(0, 2, 1)
    scales = np.stack([np.asarray(el[f"scale_{i}"]) for i in range(3)], axis=1)
    rots = np.stack([np.asarray(el[f"rot_{i}"]) for i in range(4)], axis=1)
    return dict(means=xyz, sh=np.concatenate([dc, rest], axis=1), scales=np.exp(scales), quats=rots,
                opacities=1 / (1 + np.exp(-np.asarray(el["opacity"], np.float64))))


@pytest.mark.parametrize("m", [1, 16])
def test_plyfile_reads_what_we_write_as_3dgs_does(tmp_path, m):
    g = random_splats(n=25, m=m)
    p = gaussians.save_gaussians_ply(tmp_path / "s.ply", **g)
    got = _load_like_3dgs(p, int(np.sqrt(m)) - 1)
    for k in ("means", "quats", "sh"):
        np.testing.assert_array_equal(got[k], g[k])
    np.testing.assert_allclose(got["scales"], g["scales"], rtol=1e-5)
    np.testing.assert_allclose(got["opacities"], g["opacities"], rtol=1e-5, atol=1e-6)


def test_we_read_what_plyfile_writes_as_3dgs_does(tmp_path):
    """A file written the way 3DGS's GaussianModel.save_ply writes it (plyfile, one float32 vertex
    element: xyz, normals, f_dc, f_rest channel-major, opacity logit, log scales, quaternion)."""
    plyfile = pytest.importorskip("plyfile")
    g = random_splats(n=30, m=9)
    n = 30
    rest = g["sh"][:, 1:, :].transpose(0, 2, 1).reshape(n, -1)
    attrs = np.concatenate([g["means"], np.zeros((n, 3), np.float32), g["sh"][:, 0, :], rest,
                            np.log(g["opacities"] / (1 - g["opacities"]))[:, None], np.log(g["scales"]),
                            g["quats"]], axis=1)
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
             + [f"f_rest_{i}" for i in range(rest.shape[1])]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    rec = np.empty(n, dtype=[(k, "f4") for k in names])
    rec[:] = list(map(tuple, attrs.astype(np.float32)))
    path = tmp_path / "from_plyfile.ply"
    plyfile.PlyData([plyfile.PlyElement.describe(rec, "vertex")]).write(str(path))
    back = gaussians.load_gaussians_ply(path)
    assert back["sh_degree"] == 2
    for k in ("means", "quats", "sh"):
        np.testing.assert_array_equal(back[k], g[k])
    np.testing.assert_allclose(back["scales"], g["scales"], rtol=1e-5)
    np.testing.assert_allclose(back["opacities"], g["opacities"], rtol=1e-5, atol=1e-6)


def test_colors_as_degree_zero(tmp_path):
    g = random_splats(m=1)
    rgb = np.random.default_rng(1).uniform(0, 1, (40, 3)).astype(np.float32)
    p = gaussians.save_gaussians_ply(tmp_path / "c.ply", g["means"], g["quats"], g["scales"], g["opacities"], colors=rgb)
    back = gaussians.load_gaussians_ply(p)
    np.testing.assert_allclose(back["sh"][:, 0] * gaussians.SH_C0 + 0.5, rgb, atol=1e-6)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        gaussians.load_gaussians_ply(tmp_path / "missing.ply")
    (tmp_path / "junk.ply").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a PLY"):
        gaussians.load_gaussians_ply(tmp_path / "junk.ply")
    g = random_splats(m=1)
    p = gaussians.save_gaussians_ply(tmp_path / "t.ply", **g)
    data = p.read_bytes()
    (tmp_path / "trunc.ply").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        gaussians.load_gaussians_ply(tmp_path / "trunc.ply")
    (tmp_path / "noop.ply").write_bytes(data.replace(b"property float opacity\n", b"property float opaque\n"))
    with pytest.raises(ValueError, match="opacity"):
        gaussians.load_gaussians_ply(tmp_path / "noop.ply")
    with pytest.raises(ValueError, match="non-finite"):
        gaussians.save_gaussians_ply(tmp_path / "nan.ply", **dict(g, means=np.full((40, 3), np.nan, np.float32)))
    with pytest.raises(ValueError, match="SH coefficient count"):
        gaussians.save_gaussians_ply(tmp_path / "sh.ply", **dict(g, sh=np.zeros((40, 5, 3), np.float32)))


def _with_header(tmp_path, name, data, old, new):
    """A copy of the PLY `data` with `old` replaced by `new` in its header."""
    head, sep, body = data.partition(b"end_header\n")
    assert old in head
    path = tmp_path / name
    path.write_bytes(head.replace(old, new, 1) + sep + body)
    return path


@pytest.mark.parametrize("old, new, problem", [
    (b"element vertex 40", b"element vertex -5", r"negative.*-5"),
    (b"element vertex 40", b"element vertex abc", r"'abc'.*integer"),
    (b"element vertex 40", b"element vertex 4.0", r"'4\.0'.*integer"),
    (b"element vertex 40", b"element vertex", r"element line"),
    (b"element vertex 40", b"element vertex 40 7", r"element line"),
    (b"property float y\n", b"property float x\n", r"duplicate property 'x'"),
    (b"property float y\n", b"property float\n", r"property line"),
    (b"property float y\n", b"property flot y\n", r"property type 'flot'"),
    (b"format binary_little_endian 1.0", b"format binary_middle_endian 1.0", r"format 'binary_middle_endian'"),
    (b"format binary_little_endian 1.0", b"format ascii 1.0", r"format 'ascii'.*not supported"),
    (b"format binary_little_endian 1.0\n", b"", r"no 'format' line"),
    (b"format binary_little_endian 1.0", b"format", r"format line"),
    (b"element vertex 40\n", b"element vertex 40\nelement vertex 40\n", r"more than one 'vertex' element"),
    (b"element vertex 40\n", b"property float w\nelement vertex 40\n", r"before any element"),
    (b"element vertex 40\n", b"frobnicate 3\nelement vertex 40\n", r"unknown header line 'frobnicate 3'"),
    (b"element vertex 40\n", b"element face 2\nproperty list uchar int vertex_indices\nelement vertex 40\n",
     r"element before 'vertex'"),
    (b"property float x\n", b"property list uchar float x\n", r"list"),
    (b"property float opacity\n", b"property float opaque\n", r"missing 3DGS properties \['opacity'\]"),
    (b"element vertex 40", b"element vertex 41", r"truncated"),
    (b"element vertex 40", b"element vertex 99999999999", r"truncated"),
])
def test_bad_headers_raise_value_error_naming_file_and_problem(tmp_path, old, new, problem):
    data = gaussians.save_gaussians_ply(tmp_path / "good.ply", **random_splats(m=1)).read_bytes()
    path = _with_header(tmp_path, "bad.ply", data, old, new)
    with pytest.raises(ValueError, match=problem) as info:
        gaussians.load_gaussians_ply(path)
    assert str(path) in str(info.value)


def test_bad_magic_and_missing_end_header_name_the_file(tmp_path):
    data = gaussians.save_gaussians_ply(tmp_path / "good.ply", **random_splats(m=1)).read_bytes()
    for name, content, problem in (("magic.ply", b"plyx" + data[3:], "not a PLY"),
                                   ("empty.ply", b"", "not a PLY"),
                                   ("noend.ply", data.replace(b"end_header", b"end_headr"), "end_header"),
                                   ("cut.ply", data[:40], "end_header"),
                                   ("bin.ply", b"ply\n\xff\xfe\x00garbage\n", "not ASCII")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=problem) as info:
            gaussians.load_gaussians_ply(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_header_variants_that_are_valid_load(tmp_path):
    """Comments (even one mentioning end_header), CRLF header lines, big endian, elements after the
    vertices and zero vertices all load."""
    g = random_splats(n=5, m=4)
    data = gaussians.save_gaussians_ply(tmp_path / "good.ply", **g).read_bytes()
    want = gaussians.load_gaussians_ply(tmp_path / "good.ply")
    p = _with_header(tmp_path, "comment.ply", data, b"ply\n", b"ply\ncomment written before end_header\n")
    np.testing.assert_array_equal(gaussians.load_gaussians_ply(p)["means"], want["means"])
    head, sep, body = data.partition(b"end_header\n")
    (tmp_path / "crlf.ply").write_bytes(head.replace(b"\n", b"\r\n") + b"end_header\r\n" + body)
    np.testing.assert_array_equal(gaussians.load_gaussians_ply(tmp_path / "crlf.ply")["sh"], want["sh"])
    big = np.frombuffer(body, "<f4").astype(">f4").tobytes()
    (tmp_path / "big.ply").write_bytes(head.replace(b"binary_little_endian", b"binary_big_endian") + sep + big)
    np.testing.assert_array_equal(gaussians.load_gaussians_ply(tmp_path / "big.ply")["quats"], want["quats"])
    p = _with_header(tmp_path, "after.ply", data, b"property float rot_3\n",
                     b"property float rot_3\nelement face 0\nproperty list uchar int vertex_indices\n")
    np.testing.assert_array_equal(gaussians.load_gaussians_ply(p)["scales"], want["scales"])
    empty = gaussians.save_gaussians_ply(tmp_path / "empty.ply", **random_splats(n=0, m=4))
    back = gaussians.load_gaussians_ply(empty)
    assert back["means"].shape == (0, 3) and back["sh"].shape == (0, 4, 3) and back["sh_degree"] == 1


def test_bad_sh_property_sets_name_the_file(tmp_path):
    data = gaussians.save_gaussians_ply(tmp_path / "good.ply", **random_splats(m=4)).read_bytes()
    cases = (
        (b"property float f_rest_8\n", b"property float extra\n", "not a multiple of 3"),
        (b"property float f_rest_6\nproperty float f_rest_7\nproperty float f_rest_8\n",
         b"property float a\nproperty float b\nproperty float c\n", "SH coefficient count"),
        (b"property float f_rest_4\n", b"property float f_rest_44\n", r"gaps.*f_rest_44"),
    )
    for k, (old, new, problem) in enumerate(cases):
        path = _with_header(tmp_path, f"sh{k}.ply", data, old, new)
        with pytest.raises(ValueError, match=problem) as info:
            gaussians.load_gaussians_ply(path)
        assert str(path) in str(info.value)
