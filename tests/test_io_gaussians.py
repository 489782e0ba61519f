"""3DGS PLY export/import: round trip, the exact 3DGS property layout read back by an independent
PLY parser (trimesh), and clear errors for bad files."""

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
