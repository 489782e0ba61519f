"""Metric face reconstruction benchmark (dhjax.capture.metric): ICP alignment of a predicted mesh
to a scan checked against scipy and against transforms known by construction, scan-to-mesh
distances against libigl and a dense KD-tree, the reported numbers against numpy, and clear
errors for bad inputs."""

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from dhjax.capture import metric
from dhjax.models import flame
from dhjax.ops import closest_point

N_SCAN = 2000
NOISE = 1e-4  # metres, isotropic Gaussian noise on the scan points
R_TRUE = Rotation.from_euler("xyz", [20.0, -35.0, 10.0], degrees=True).as_matrix()
T_TRUE = np.array([0.05, -0.02, 0.3])


@pytest.fixture(scope="module")
def head():
    """The embedded head's neutral mesh, its 68 landmarks, and surface samples on it."""
    model = flame.load()
    out = flame.forward(model)
    verts = np.asarray(out.vertices[0], np.float64)
    faces = np.asarray(model.faces)
    lmk = np.asarray(flame.embed_landmarks(out.vertices, model.faces, model.lmk_faces,
                                           model.lmk_bary)[0], np.float64)
    rng = np.random.default_rng(0)
    face_idx = rng.integers(0, faces.shape[0], N_SCAN)
    bary = rng.dirichlet(np.ones(3), N_SCAN)
    samples = np.einsum("nk,nkc->nc", bary, verts[faces[face_idx]])
    return verts, faces, lmk, samples, face_idx


def _scan(head, scale, noise=NOISE, lmk_noise=2e-3, seed=1):
    """Samples of the head moved by x -> scale R x + t, plus noise; landmarks with 2 mm noise."""
    verts, faces, lmk, samples, _ = head
    rng = np.random.default_rng(seed)
    pts = scale * samples @ R_TRUE.T + T_TRUE + rng.normal(0.0, noise, samples.shape)
    slmk = scale * lmk @ R_TRUE.T + T_TRUE + rng.normal(0.0, lmk_noise, lmk.shape)
    return pts, slmk


def _angle_deg(R):
    return np.degrees((Rotation.from_matrix(R) * Rotation.from_matrix(R_TRUE).inv()).magnitude())


def _moved(verts, res):
    return res.scale * verts @ res.R.T + res.t


# ----------------------------------------------------------------------------------------------
# Alignment.


def test_rigid_recovers_the_transform(head):
    verts, faces, lmk, _, _ = head
    pts, slmk = _scan(head, 1.0)
    init = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=0)
    res = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=200,
                               tol=1e-10)
    assert init.iterations == 0 and 0 < res.iterations <= 200
    assert res.scale == 1.0
    np.testing.assert_allclose(res.R @ res.R.T, np.eye(3), atol=1e-5)
    assert np.linalg.det(res.R) == pytest.approx(1.0, abs=1e-5)
    # The 2 mm landmark noise leaves ~0.1 deg; ICP on 2000 points with 0.1 mm noise is far better.
    assert _angle_deg(init.R) > 0.05
    assert _angle_deg(res.R) < 0.02
    assert np.linalg.norm(res.t - T_TRUE) < 2e-5
    # Scan-to-mesh distance of isotropic noise is |normal component|: mean sigma * sqrt(2/pi).
    assert res.errors.shape == (N_SCAN,)
    assert np.mean(res.errors) == pytest.approx(NOISE * np.sqrt(2 / np.pi), rel=0.1)
    assert np.mean(res.errors) < np.mean(init.errors)
    # The reported errors are the scan-to-mesh distances of the returned transform.
    direct = metric.scan_to_mesh_errors(pts, _moved(verts, res), faces)
    np.testing.assert_allclose(res.errors, direct, atol=1e-6)
    # With the default tolerance it stops early but still well inside the landmark error.
    default = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False)
    assert default.iterations < 50 and _angle_deg(default.R) < 0.05


def test_transform_solve_matches_scipy(head):
    """One ICP iteration re-solves the transform from the surface correspondences as scipy does."""
    verts, faces, lmk, _, _ = head
    pts, slmk = _scan(head, 1.08)  # scaled: the errors spread over 0..15 mm, trimming bites
    init = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=0)
    s0, R0, t0 = init.scale, init.R, init.t
    moved = s0 * verts @ R0.T + t0
    cp = closest_point(np.float32(moved), faces, np.float32(pts))
    tri = verts[faces[np.asarray(cp.face)]]
    src = np.einsum("nk,nkc->nc", np.asarray(cp.bary, np.float64), tri)
    dist = np.sqrt(np.asarray(cp.sq_dist, np.float64))
    trim = float(np.median(dist))
    for with_scale in (False, True):
        for trim_m in (np.inf, trim):
            err, mean, s, R, t, n_used = (np.asarray(a, np.float64) for a in metric._icp_step(
                np.float32(verts), np.int32(faces), np.float32(pts), np.ones(len(pts), bool),
                np.float32(s0), np.float32(R0), np.float32(t0), np.float32(trim_m),
                with_scale=with_scale))
            np.testing.assert_allclose(err, dist, atol=1e-6)
            assert float(mean) == pytest.approx(dist.mean(), rel=1e-5)
            keep = dist <= trim_m
            assert int(n_used) == keep.sum()
            a, b = src[keep], pts[keep]
            ac, bc = a - a.mean(0), b - b.mean(0)
            rot, _ = Rotation.align_vectors(bc, ac)  # rotation taking src directions to scan ones
            np.testing.assert_allclose(R, rot.as_matrix(), atol=2e-5)
            proc, _ = orthogonal_procrustes(ac, bc)  # ac @ proc ~ bc
            np.testing.assert_allclose(R, proc.T, atol=2e-5)
            s_ref = np.sum(bc * (ac @ R.T)) / np.sum(ac * ac) if with_scale else 1.0
            assert float(s) == pytest.approx(s_ref, rel=1e-5)
            np.testing.assert_allclose(t, b.mean(0) - s_ref * R @ a.mean(0), atol=5e-6)
            # Padding rows (valid=False), however far away, change nothing.
            padded = np.concatenate([pts, np.full((48, 3), 5.0)])
            valid = np.arange(len(padded)) < len(pts)
            out = metric._icp_step(np.float32(verts), np.int32(faces), np.float32(padded), valid,
                                   np.float32(s0), np.float32(R0), np.float32(t0),
                                   np.float32(trim_m), with_scale=with_scale)
            for got, want in zip(out[1:5], (mean, s, R, t)):
                np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


def test_similarity_recovers_scale_rigid_keeps_scale_error(head):
    verts, faces, lmk, samples, face_idx = head
    scale = 1.05
    pts, slmk = _scan(head, scale)
    sim = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=True, iterations=200,
                               tol=1e-10)
    rig = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=200,
                               tol=1e-10)
    assert sim.scale == pytest.approx(scale, abs=2e-4)
    assert _angle_deg(sim.R) < 0.02
    assert np.linalg.norm(sim.t - T_TRUE) < 5e-5
    assert np.mean(sim.errors) == pytest.approx(NOISE * np.sqrt(2 / np.pi), rel=0.1)
    assert rig.scale == 1.0

    # Expected residual of the metric protocol: to first order the scaled surface lies
    # (scale - 1) x.n off the original along its normal n; the best rigid motion removes what a
    # small rotation w and translation v can, i.e. the point-to-plane least-squares residual of
    # (scale - 1) x.n + (x cross n).w + n.v over the samples.
    tri = verts[faces[face_idx]]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    A = np.concatenate([np.cross(samples, n), n], axis=1)
    rhs = -(scale - 1.0) * np.einsum("ni,ni->n", samples, n)
    sol, *_ = np.linalg.lstsq(A, rhs, rcond=None)
    expected_rms = np.sqrt(np.mean((rhs - A @ sol) ** 2) + NOISE**2)
    rig_rms = np.sqrt(np.mean(rig.errors**2))
    assert rig_rms == pytest.approx(expected_rms, rel=0.1)
    # Never worse than the rigid fit of the true correspondences, (scale - 1) * rms radius.
    c = samples - samples.mean(0)
    assert rig_rms < abs(scale - 1) * np.sqrt(np.mean(np.sum(c * c, 1))) + 2 * NOISE
    assert np.mean(rig.errors) > 20 * np.mean(sim.errors)


def test_trimming_ignores_clutter(head):
    """Scan clutter in front of the face biases plain ICP; trimming far pairs removes the bias."""
    verts, faces, lmk, samples, _ = head
    centre = verts.mean(0)
    front = np.argsort(samples[:, 2])[-200:]
    clutter = centre + 1.3 * (samples[front] - centre)  # 5..40 mm in front of the face
    assert metric.scan_to_mesh_errors(clutter, verts, faces).min() > 0.005
    rng = np.random.default_rng(3)
    pts = np.concatenate([samples, clutter]) @ R_TRUE.T + T_TRUE
    pts += rng.normal(0.0, NOISE, pts.shape)
    slmk = lmk @ R_TRUE.T + T_TRUE + rng.normal(0.0, 2e-3, lmk.shape)
    plain = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=100,
                                 tol=1e-9)
    trimmed = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=100,
                                   tol=1e-9, trim_m=0.004)
    assert _angle_deg(plain.R) > 0.15 and np.linalg.norm(plain.t - T_TRUE) > 1e-3
    assert _angle_deg(trimmed.R) < 0.05
    assert np.linalg.norm(trimmed.t - T_TRUE) < 5e-5
    # Errors cover every scan point, trimmed ones included.
    assert trimmed.errors.shape == (pts.shape[0],)
    assert np.median(trimmed.errors[N_SCAN:]) > 0.01


def test_accepts_jax_arrays(head):
    import jax.numpy as jnp

    verts, faces, lmk, _, _ = head
    pts, slmk = _scan(head, 1.0)
    a = metric.align_to_scan(verts, faces, lmk, pts, slmk, with_scale=False, iterations=3)
    b = metric.align_to_scan(jnp.asarray(verts, jnp.float32), jnp.asarray(faces), jnp.asarray(lmk),
                             jnp.asarray(pts, jnp.float32), jnp.asarray(slmk), with_scale=False,
                             iterations=3)
    np.testing.assert_allclose(a.R, b.R, atol=1e-5)
    np.testing.assert_allclose(a.errors, b.errors, atol=1e-6)
    assert isinstance(b.errors, np.ndarray) and isinstance(b.scale, float)


# ----------------------------------------------------------------------------------------------
# Scan-to-mesh distances.


def _queries(head, seed=5):
    verts, _, _, samples, _ = head
    rng = np.random.default_rng(seed)
    lo, hi = verts.min(0) - 0.03, verts.max(0) + 0.03
    return np.concatenate([rng.uniform(lo, hi, (1500, 3)), samples[:500]])


@pytest.mark.peers
def test_scan_to_mesh_errors_match_libigl(head):
    igl = pytest.importorskip("igl")
    verts, faces, _, _, _ = head
    q = _queries(head)
    d = metric.scan_to_mesh_errors(q, verts, faces)
    sq, _, _ = igl.point_mesh_squared_distance(q, verts, faces.astype(np.int64))
    np.testing.assert_allclose(d, np.sqrt(sq), atol=1e-6)


def test_scan_to_mesh_errors_against_dense_kdtree(head):
    verts, faces, _, samples, _ = head
    q = _queries(head)
    d = metric.scan_to_mesh_errors(q, verts, faces)
    assert d.shape == (q.shape[0],) and d.dtype == np.float64
    assert np.all(d[-500:] < 1e-6)  # the surface samples themselves
    rng = np.random.default_rng(6)
    n = 300_000
    dense = np.einsum("nk,nkc->nc", rng.dirichlet(np.ones(3), n),
                      verts[faces[rng.integers(0, faces.shape[0], n)]])
    d_kd, _ = cKDTree(np.concatenate([dense, verts])).query(q)
    # Surface samples can only be farther than the exact closest point ...
    assert np.all(d <= d_kd + 1e-6)
    # ... and, the vertices being among them, by at most the longest edge; on average far less.
    longest = np.linalg.norm(verts[faces[:, [1, 2, 0]]] - verts[faces], axis=-1).max()
    assert np.all(d_kd - d <= longest)
    assert np.mean(d_kd - d) < 2e-4


# ----------------------------------------------------------------------------------------------
# Reporting.


def test_summarise_matches_numpy():
    rng = np.random.default_rng(7)
    a, b = rng.gamma(2.0, 5e-4, 300), rng.gamma(2.0, 8e-4, 500)
    s = metric.summarise([a, b])
    both = np.concatenate([a, b]) * 1000
    assert s["median_mm"] == pytest.approx(np.median(both), rel=1e-12)
    assert s["mean_mm"] == pytest.approx(np.mean(both), rel=1e-12)
    assert s["std_mm"] == pytest.approx(np.std(both), rel=1e-12)
    assert (s["n_points"], s["n_scans"]) == (800, 2)
    one = metric.summarise(a)
    assert one["median_mm"] == pytest.approx(np.median(a) * 1000, rel=1e-12)
    assert (one["n_points"], one["n_scans"]) == (300, 1)


def test_evaluate_two_scans(head):
    verts, faces, lmk, _, _ = head
    scans, preds = [], []
    for i, scale in enumerate((1.0, 1.05)):
        pts, slmk = _scan(head, scale, seed=10 + i)
        scans.append({"points": pts, "landmarks": slmk})
        preds.append({"vertices": verts, "faces": faces, "landmarks": lmk})
    out = metric.evaluate(preds, scans, with_scale=False)
    assert out["summary"] == metric.summarise(out["errors"])
    assert out["summary"]["n_scans"] == 2 and out["summary"]["n_points"] == 2 * N_SCAN
    for e, per, scan in zip(out["errors"], out["per_scan"], scans):
        direct = metric.align_to_scan(verts, faces, lmk, scan["points"], scan["landmarks"],
                                      with_scale=False)
        np.testing.assert_allclose(e, direct.errors, atol=1e-9)
        assert per["median_mm"] == pytest.approx(np.median(e) * 1000)
        assert per["mean_mm"] == pytest.approx(np.mean(e) * 1000)
        assert per["std_mm"] == pytest.approx(np.std(e) * 1000)
    # Metric protocol: the 5 % too small prediction costs millimetres, the right one does not.
    assert out["per_scan"][0]["mean_mm"] < 0.15 < 1.0 < out["per_scan"][1]["mean_mm"]
    sim = metric.evaluate(preds, scans, with_scale=True)
    assert sim["per_scan"][1]["mean_mm"] < 0.15


def test_results_table_contains_rows():
    rows = {
        "MICA (metric)": {"median_mm": 1.234, "mean_mm": 1.5678, "std_mm": 1.25, "n_points": 9},
        "DECA (NoW)": {"median_mm": 1.09, "mean_mm": 1.38, "std_mm": 1.18},
        "plain": {"median_mm": 2.0, "mean_mm": 3.0, "std_mm": 4.0},
    }
    table = metric.results_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 5
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "method", "protocol", "median (mm)", "mean (mm)", "std (mm)"]
    assert set(lines[1]) <= set("|-: ")
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "MICA", "metric", "1.234", "1.568", "1.250"]
    assert [c.strip() for c in lines[3].strip("|").split("|")][:2] == ["DECA", "NoW"]
    assert [c.strip() for c in lines[4].strip("|").split("|")][:2] == ["plain", "-"]


def test_plot_writes_readable_png(tmp_path):
    import imageio.v3 as iio

    rng = np.random.default_rng(8)
    curves = {"good": rng.gamma(2.0, 5e-4, 1000), "bad (two scans)": [rng.gamma(2.0, 2e-3, 500),
                                                                     rng.gamma(2.0, 2e-3, 300)]}
    path = metric.plot_cumulative_errors(tmp_path / "sub" / "cum.png", curves, max_mm=8.0,
                                         title="cumulative error")
    assert path == tmp_path / "sub" / "cum.png" and path.is_file()
    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 10  # not a blank canvas


# ----------------------------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_name_the_argument(head):
    verts, faces, lmk, samples, _ = head
    pts, slmk = samples[:50], lmk
    ok = dict(pred_vertices=verts, pred_faces=faces, pred_landmarks=lmk, scan_points=pts,
              scan_landmarks=slmk)

    def call(**kw):
        return metric.align_to_scan(**{**ok, **kw}, with_scale=False, iterations=1)

    with pytest.raises(ValueError, match=r"scan_points: expected shape \[N, 3\]"):
        call(scan_points=pts[:, :2])
    with pytest.raises(ValueError, match=r"pred_vertices: expected shape \[N, 3\]"):
        call(pred_vertices=verts[None])
    bad = verts.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="pred_vertices: 1 non-finite"):
        call(pred_vertices=bad)
    bad = pts.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="scan_points: 1 non-finite"):
        call(scan_points=bad)
    bad = slmk.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="scan_landmarks: 3 non-finite"):
        call(scan_landmarks=bad)
    with pytest.raises(ValueError, match="landmark counts differ"):
        call(scan_landmarks=slmk[:60])
    with pytest.raises(ValueError, match="pred_landmarks: the 5 landmarks are collinear"):
        call(pred_landmarks=np.outer(np.arange(5.0), [1.0, 2.0, 3.0]), scan_landmarks=slmk[:5])
    with pytest.raises(ValueError, match=r"pred_faces: vertex indices must lie in \[0, "):
        call(pred_faces=np.where(faces == 0, verts.shape[0], faces))
    with pytest.raises(ValueError, match="pred_faces: expected integer"):
        call(pred_faces=faces.astype(np.float32))
    with pytest.raises(ValueError, match=r"pred_faces: expected shape \[F, 3\]"):
        call(pred_faces=faces[:, :2])
    with pytest.raises(ValueError, match="trim_m"):
        metric.align_to_scan(**ok, with_scale=False, trim_m=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        metric.align_to_scan(**ok, with_scale=False, iterations=-2)
    with pytest.raises(ValueError, match="vertices: 3 non-finite"):
        metric.scan_to_mesh_errors(pts, np.where(np.arange(len(verts))[:, None] == 3, np.nan,
                                                 verts), faces)


def test_bad_reporting_inputs():
    with pytest.raises(ValueError, match=r"errors\[1\]: 1 non-finite"):
        metric.summarise([np.ones(3), np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match="errors: expected a 1-D array"):
        metric.summarise(np.ones((2, 3)))
    with pytest.raises(ValueError, match="errors: empty list"):
        metric.summarise([])
    with pytest.raises(ValueError, match="must be >= 0"):
        metric.summarise(np.array([0.1, -0.2]))
    with pytest.raises(ValueError, match="lengths differ"):
        metric.evaluate([{}], [], with_scale=False)
    with pytest.raises(ValueError, match=r"scan_list\[0\]: missing key 'points'"):
        metric.evaluate([{"vertices": 0, "faces": 0, "landmarks": 0}], [{"landmarks": 0}],
                        with_scale=False)
    with pytest.raises(ValueError, match=r"rows\['x'\]: missing key 'std_mm'"):
        metric.results_table({"x": {"median_mm": 1.0, "mean_mm": 1.0}})
    with pytest.raises(ValueError, match="max_mm"):
        metric.plot_cumulative_errors("unused.png", {"a": np.ones(3)}, max_mm=0.0)
    with pytest.raises(ValueError, match=r"curves\['a'\]: 1 non-finite"):
        metric.plot_cumulative_errors("unused.png", {"a": np.array([np.nan, 1.0])})


def test_paired_comparison_p_value_against_sign_flip_enumeration():
    # Oracle: under the null every sign of |d| is equally likely, so the one-sided p-value of
    # "A is lower" is the share of the 2^n sign patterns whose rank sum of positive
    # differences is at most the observed one.
    rng = np.random.default_rng(4)
    b = rng.uniform(1.0, 2.0, 10)
    d = rng.normal(-0.05, 0.1, 10)
    a = b + d
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
    observed = ranks[d > 0].sum()
    signs = (np.arange(2 ** 10)[:, None] >> np.arange(10)) & 1
    p_exact = np.mean((signs * ranks).sum(1) <= observed)
    c = metric.paired_comparison(a, b)
    np.testing.assert_allclose(c["p_a_better"], p_exact, rtol=1e-9)
    assert c["n"] == 10 and c["wins"] == int(np.sum(d < 0)) and c["ties"] == 0
    np.testing.assert_allclose([c["mean_diff"], c["median_diff"]], [d.mean(), np.median(d)], rtol=1e-12)
    lo, hi = c["ci95_mean_diff"]
    assert lo < c["mean_diff"] < hi
    # swapping the methods mirrors the one-sided test; the two-sided one is symmetric
    s = metric.paired_comparison(b, a)
    np.testing.assert_allclose(s["p_two_sided"], c["p_two_sided"], rtol=1e-9)
    assert s["wins"] == 10 - c["wins"]


def test_paired_comparison_separates_a_consistent_gain_from_noise():
    rng = np.random.default_rng(5)
    b = rng.uniform(1.0, 2.0, 32)             # identities differ far more than the methods
    better = metric.paired_comparison(b - 0.02 + 0.005 * rng.normal(size=32), b)
    noise = metric.paired_comparison(b + 0.05 * rng.normal(size=32), b)
    assert better["p_a_better"] < 1e-6 and better["wins"] == 32
    assert noise["p_a_better"] > 0.01
    same = metric.paired_comparison(b, b)
    assert same["p_a_better"] == 1.0 and same["ties"] == 32


def test_paired_comparison_bad_inputs():
    with pytest.raises(ValueError, match="same items"):
        metric.paired_comparison(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="at least 2"):
        metric.paired_comparison(np.ones(1), np.ones(1))
    with pytest.raises(ValueError, match="b: 1 non-finite"):
        metric.paired_comparison(np.ones(3), np.array([1.0, np.inf, 1.0]))
