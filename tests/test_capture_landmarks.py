"""2D landmarks: the Landmarks record and its checks, the mediapipe -> iBUG mapping, ArcFace's five
points against align.five_points_from_68, every file format read back, errors that name the
problem, overlays, and (with mediapipe, a peer) detection on a real photo: geometry of the face,
the pixel-centre convention by mirroring, and the ArcFace crop built from the detection."""

import json
import re
import sys

import numpy as np
import pytest

from dhjax.capture import align
from dhjax.capture import landmarks as L
from dhjax.io.landmark_schemes import MEDIAPIPE_INDICES, MEDIAPIPE_TO_IBUG


def face68(seed=0, scale=100.0, offset=(150.0, 120.0)):
    """[68, 2] plausible-looking random landmarks (a jittered mean face would do as well)."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (68, 2)) * scale + np.asarray(offset)).astype(np.float32)


def mesh468(seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (468, 2)) * 120 + 200).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The record and the conversions.


def test_landmarks_record_validates_and_freezes():
    lm = L.Landmarks(face68()[:3].tolist(), [5, 0, 67], "synthetic")
    assert lm.points.dtype == np.float32 and lm.points.shape == (3, 2)
    assert lm.ibug_ids.dtype == np.int32 and lm.ibug_ids.tolist() == [5, 0, 67]
    assert len(lm) == 3 and lm.dense is None
    with pytest.raises(ValueError):  # read-only arrays
        lm.points[0, 0] = 1.0
    with pytest.raises(Exception):  # frozen
        lm.source = "x"
    bad = [
        (dict(points=np.zeros((3, 3)), ibug_ids=[0, 1, 2]), "[K, 2]"),
        (dict(points=np.zeros((3, 2)), ibug_ids=[0, 1]), "one id per point"),
        (dict(points=np.zeros((3, 2)), ibug_ids=[0, 1, 68]), "68"),
        (dict(points=np.zeros((3, 2)), ibug_ids=[0, 1, 1]), "repeated"),
        (dict(points=[[0, 0], [np.nan, 1]], ibug_ids=[0, 1]), "non-finite"),
        (dict(points=np.zeros((2, 2)), ibug_ids=[0.5, 1]), "integers"),
        (dict(points=np.zeros((0, 2)), ibug_ids=np.zeros(0, int)), "at least one"),
    ]
    for kwargs, words in bad:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            L.Landmarks(source="synthetic", **kwargs)
    with pytest.raises(ValueError, match="dense"):
        L.Landmarks(np.zeros((2, 2)), [0, 1], "mediapipe", dense=np.zeros((10, 2)))
    with pytest.raises(ValueError, match="source"):
        L.Landmarks(np.zeros((2, 2)), [0, 1], "")


def test_from_mediapipe_uses_the_model_correspondence():
    dense = mesh468()
    lm = L.from_mediapipe(dense)
    assert lm.source == "mediapipe" and len(lm) == 51
    np.testing.assert_array_equal(lm.ibug_ids, np.arange(17, 68))
    np.testing.assert_array_equal(lm.ibug_ids, MEDIAPIPE_TO_IBUG)
    np.testing.assert_array_equal(lm.points, dense[MEDIAPIPE_INDICES])
    np.testing.assert_array_equal(lm.dense, dense)
    # spot checks of the table itself: nose tip (iBUG 30) is face-mesh 4, mouth corners 61/291,
    # eye corners 33/133 (image-left eye) and 362/263
    for ibug, mp_index in [(30, 4), (48, 61), (54, 291), (36, 33), (39, 133), (42, 362), (45, 263)]:
        np.testing.assert_array_equal(lm.points[lm.ibug_ids == ibug][0], dense[mp_index])
    # a depth column is dropped; the refined mesh (478, iris last) keeps the first 468
    xyz = np.c_[dense, np.arange(468.0)]
    np.testing.assert_array_equal(L.from_mediapipe(xyz).points, lm.points)
    iris = np.r_[dense, np.full((10, 2), 7.0, np.float32)]
    np.testing.assert_array_equal(L.from_mediapipe(iris).dense, dense)
    with pytest.raises(ValueError, match=r"\(467, 2\)"):
        L.from_mediapipe(dense[:-1])


def test_from_ibug68():
    p = face68()
    lm = L.from_ibug68(p)
    assert lm.source == "file" and lm.dense is None
    np.testing.assert_array_equal(lm.points, p)
    np.testing.assert_array_equal(lm.ibug_ids, np.arange(68))
    np.testing.assert_array_equal(L.from_ibug68(np.c_[p, np.ones(68)]).points, p)
    with pytest.raises(ValueError, match=r"\(51, 2\)"):
        L.from_ibug68(p[17:])


def test_five_points_matches_align_on_68_and_51():
    for seed in range(3):
        p = face68(seed)
        want = np.asarray(align.five_points_from_68(p))
        got68 = L.five_points(L.from_ibug68(p))
        assert got68.shape == (5, 2) and got68.dtype == np.float32
        np.testing.assert_allclose(got68, want, rtol=0, atol=1e-4)
        # the 51 inner points alone (the 68's last 51) carry all five
        got51 = L.five_points(L.Landmarks(p[17:], np.arange(17, 68), "file"))
        np.testing.assert_allclose(got51, want, rtol=0, atol=1e-4)
        # order of the points does not matter, the ids do
        perm = np.random.default_rng(seed).permutation(68)
        np.testing.assert_allclose(L.five_points(L.Landmarks(p[perm], perm, "file")), want,
                                   rtol=0, atol=1e-4)
    # mediapipe: the same as five_points_from_68 on a 68 whose inner 51 are the mapped points
    dense = mesh468()
    p68 = np.zeros((68, 2), np.float32)
    p68[17:] = dense[MEDIAPIPE_INDICES]
    np.testing.assert_allclose(L.five_points(L.from_mediapipe(dense)),
                               np.asarray(align.five_points_from_68(p68)), rtol=0, atol=1e-4)
    # missing ids are named
    jaw_and_brows = L.Landmarks(face68()[:27], np.arange(27), "file")
    with pytest.raises(ValueError, match=r"lack iBUG point\(s\) \[36, 37"):
        L.five_points(jaw_and_brows)
    no_mouth_corner = L.Landmarks(np.delete(face68(), 54, 0), np.delete(np.arange(68), 54), "file")
    with pytest.raises(ValueError, match=r"\[54\]"):
        L.five_points(no_mouth_corner)


# ----------------------------------------------------------------------------------------------
# Files.


def write_pts(path, points_0based):
    rows = "\n".join(f"{x + 1:.6f} {y + 1:.6f}" for x, y in points_0based)
    path.write_text(f"version: 1\nn_points: {len(points_0based)}\n{{\n{rows}\n}}\n")


def test_load_round_trips_every_format(tmp_path):
    p68, dense = face68(), mesh468()
    p51 = p68[17:]

    np.save(tmp_path / "a.npy", p68)
    lm = L.load(tmp_path / "a.npy")
    assert lm.source == "file" and lm.dense is None
    np.testing.assert_array_equal(lm.points, p68)
    np.testing.assert_array_equal(lm.ibug_ids, np.arange(68))

    # text: whitespace, a comment, a z column; 51 points are iBUG 17..67
    lines = ["# x y z"] + [f"{x!r} {y!r} 0.5" for x, y in p51.astype(np.float64).tolist()]
    (tmp_path / "b.txt").write_text("\n".join(lines) + "\n")
    lm = L.load(str(tmp_path / "b.txt"))
    np.testing.assert_allclose(lm.points, p51, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(lm.ibug_ids, np.arange(17, 68))

    # json list of [x, y, z] for 468 mediapipe points, and the {"landmarks": ...} form
    (tmp_path / "c.json").write_text(json.dumps(np.c_[dense, np.zeros(468)].tolist()))
    lm = L.load(tmp_path / "c.json")
    np.testing.assert_allclose(lm.dense, dense, rtol=0, atol=1e-4)
    np.testing.assert_allclose(lm.points, dense[MEDIAPIPE_INDICES], rtol=0, atol=1e-4)
    assert len(lm) == 51 and lm.source == "file"
    (tmp_path / "d.json").write_text(json.dumps({"landmarks": p68.tolist(), "note": "x"}))
    np.testing.assert_allclose(L.load(tmp_path / "d.json").points, p68, rtol=0, atol=1e-5)

    # iBUG .pts: 1-based in the file
    write_pts(tmp_path / "e.pts", p68.astype(np.float64))
    np.testing.assert_allclose(L.load(tmp_path / "e.pts").points, p68, rtol=0, atol=1e-4)

    # npz with key 'landmarks'
    np.savez(tmp_path / "f.npz", landmarks=p51, other=np.zeros(3))
    np.testing.assert_array_equal(L.load(tmp_path / "f.npz").points, p51)


def test_load_video_gives_one_set_per_frame(tmp_path):
    frames = np.stack([face68(t) for t in range(4)])
    np.save(tmp_path / "v.npy", frames)
    got = L.load(tmp_path / "v.npy")
    assert isinstance(got, list) and len(got) == 4
    for t, lm in enumerate(got):
        np.testing.assert_array_equal(lm.points, frames[t])
    (tmp_path / "v.json").write_text(json.dumps({"landmarks": frames[:, 17:].tolist()}))
    got = L.load(tmp_path / "v.json")
    assert len(got) == 4 and all(len(lm) == 51 for lm in got)
    # a NaN in one frame names the frame
    frames[2, 5, 1] = np.nan
    np.save(tmp_path / "w.npy", frames)
    with pytest.raises(ValueError, match=r"frame 2.*non-finite"):
        L.load(tmp_path / "w.npy")


def test_load_errors_name_the_problem(tmp_path):
    p68 = face68()
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        L.load(missing)

    np.save(tmp_path / "n67.npy", p68[:67])
    with pytest.raises(ValueError, match=r"n67\.npy.*found 67 landmarks.*68.*51.*468"):
        L.load(tmp_path / "n67.npy")

    bad = p68.copy()
    bad[10, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"nan\.npy.*non-finite.*\[10\]"):
        L.load(tmp_path / "nan.npy")
    (tmp_path / "null.json").write_text(json.dumps([None if i == 3 else r
                                                    for i, r in enumerate(p68.tolist())]))
    with pytest.raises(ValueError, match=r"null\.json"):
        L.load(tmp_path / "null.json")

    np.save(tmp_path / "four.npy", p68[:, :1].repeat(4, 1))
    with pytest.raises(ValueError, match="2 .* or 3"):
        L.load(tmp_path / "four.npy")

    (tmp_path / "ragged.txt").write_text("1 2\n3 4\n5\n")
    with pytest.raises(ValueError, match=r"ragged\.txt: line 3 has 1 values"):
        L.load(tmp_path / "ragged.txt")
    (tmp_path / "words.txt").write_text("1 2\nx y\n")
    with pytest.raises(ValueError, match=r"words\.txt: line 2"):
        L.load(tmp_path / "words.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        L.load(tmp_path / "empty.txt")

    rows = "\n".join("1 2" for _ in range(68))
    (tmp_path / "short.pts").write_text(f"version: 1\nn_points: 70\n{{\n{rows}\n}}\n")
    with pytest.raises(ValueError, match=r"short\.pts.*n_points: 70.*68"):
        L.load(tmp_path / "short.pts")

    (tmp_path / "obj.json").write_text(json.dumps({"points": p68.tolist()}))
    with pytest.raises(ValueError, match=r"obj\.json.*'landmarks'"):
        L.load(tmp_path / "obj.json")

    # mediapipe's normalised coordinates saved as they come
    np.save(tmp_path / "norm.npy", np.random.default_rng(0).uniform(0.3, 0.7, (468, 2)))
    with pytest.raises(ValueError, match="normalised"):
        L.load(tmp_path / "norm.npy")


def test_load_checks_image_size(tmp_path):
    p68 = face68(scale=100, offset=(150, 120))  # inside [150, 250] x [120, 220]
    np.save(tmp_path / "a.npy", p68)
    assert len(L.load(tmp_path / "a.npy", image_size=(320, 240))) == 68
    # landmarks of a 4x larger image: far outside a 64x48 one
    with pytest.raises(ValueError, match=r"a\.npy.*far outside the 64x48 image"):
        L.load(tmp_path / "a.npy", image_size=(64, 48))
    # a little outside is fine (a face cut by the border)
    assert len(L.load(tmp_path / "a.npy", image_size=(200, 160))) == 68
    with pytest.raises(ValueError, match="image_size"):
        L.load(tmp_path / "a.npy", image_size=(0, 10))


def test_landmarks_for_image_reads_the_file(tmp_path):
    image = np.zeros((240, 320, 3), np.float32)
    np.save(tmp_path / "a.npy", face68())
    lm = L.landmarks_for_image(image, path="a.png", landmarks_path=tmp_path / "a.npy")
    assert lm.source == "file" and len(lm) == 68
    np.save(tmp_path / "v.npy", np.stack([face68(0), face68(1)]))
    with pytest.raises(ValueError, match="holds 2 landmark sets"):
        L.landmarks_for_image(image, landmarks_path=tmp_path / "v.npy")
    with pytest.raises(ValueError, match="far outside"):
        L.landmarks_for_image(image[:40, :40], landmarks_path=tmp_path / "a.npy")


# ----------------------------------------------------------------------------------------------
# Detection input checks (before mediapipe is needed) and the missing-mediapipe message.


def test_detect_rejects_bad_images():
    with pytest.raises(ValueError, match=r"photo\.jpg.*\[H, W, 3\]"):
        L.detect(np.zeros((4, 8, 8, 3)), name="photo.jpg")
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
        L.detect(np.zeros((8, 8, 2)))
    nan = np.zeros((8, 8, 3), np.float32)
    nan[1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        L.detect(nan)
    with pytest.raises(ValueError, match=r"\[0, 1\].*255"):
        L.detect(np.full((8, 8, 3), 200.0))
    with pytest.raises(ValueError, match="min_confidence"):
        L.detect(np.zeros((8, 8, 3)), min_confidence=1.5)


def test_missing_mediapipe_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(ImportError, match=r"pip install 'dhjax\[landmarks\]'.*file"):
        L.detect(np.zeros((32, 32, 3), np.uint8))


# What each way in must be told: the command-line flag and the Python keyword of its callers
# (experiments.track and experiments.mica_predict take --landmarks; landmarks_for_image
# landmarks_path; track_run.run landmarks).
_GENERIC_HINT = [r"--landmarks=", r"experiments\.track", r"experiments\.mica_predict",
                 r"landmarks_path=", r"landmarks_for_image"]
_TRACK_HINT = [r"--landmarks=", r"python -m experiments\.track", r"track_run\.run\(.*landmarks="]


def _no_face_mesh(monkeypatch):
    """A stand-in for mediapipe's face mesh that never finds a face."""

    class FaceMesh:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def process(self, rgb):
            return type("Result", (), {"multi_face_landmarks": None})()

    monkeypatch.setattr(L, "_face_mesh_module", lambda *hint: type("Module", (), {"FaceMesh": FaceMesh}))


def _assert_hint(message, patterns, absent=()):
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    for pattern in absent:
        assert not re.search(pattern, message), (pattern, message)


def test_missing_mediapipe_and_no_face_name_the_flag_and_the_keyword(monkeypatch):
    image = np.zeros((32, 32, 3), np.uint8)
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    for call in (lambda: L.detect(image), lambda: L.landmarks_for_image(image, path="a.png")):
        with pytest.raises(ImportError) as info:
            call()
        _assert_hint(str(info.value), [r"pip install 'dhjax\[landmarks\]'"] + _GENERIC_HINT)
    monkeypatch.delitem(sys.modules, "mediapipe")
    _no_face_mesh(monkeypatch)
    with pytest.raises(L.NoFaceError) as info:
        L.landmarks_for_image(image, path="frames/0007.jpg")
    _assert_hint(str(info.value), [r"frames/0007\.jpg: no face found"] + _GENERIC_HINT)
    with pytest.raises(L.NoFaceError) as info:
        L.detect(image, name="a.png", file_hint="pass --my-flag")
    _assert_hint(str(info.value), [r"a\.png: no face found", r"or pass --my-flag"], absent=[r"landmarks_path"])


def test_track_without_mediapipe_or_face_names_its_own_flag(monkeypatch):
    from dhjax.capture import track_run

    frames, names = [np.zeros((32, 32, 3), np.uint8)], ["frame_0000"]
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(ImportError) as info:
        track_run.frame_landmarks(frames, names, None)
    _assert_hint(str(info.value), _TRACK_HINT, absent=[r"landmarks_path", r"mica_predict"])
    monkeypatch.delitem(sys.modules, "mediapipe")
    _no_face_mesh(monkeypatch)
    with pytest.raises(L.NoFaceError) as info:
        track_run.frame_landmarks(frames, names, "")
    _assert_hint(str(info.value), [r"frame 0 \(frame_0000\): no face found"] + _TRACK_HINT,
                 absent=[r"landmarks_path", r"mica_predict"])


# ----------------------------------------------------------------------------------------------
# Overlays.


def test_draw_paints_dots_on_a_copy():
    image = np.full((20, 30, 3), 0.25, np.float32)
    lm = L.Landmarks([[5.0, 4.0], [29.0, 19.0], [-50.0, 3.0]], [0, 1, 2], "synthetic")
    out = L.draw(image, lm, color=(1.0, 0.0, 0.5), radius=2)
    assert out.shape == (20, 30, 3) and out.dtype == np.float32
    assert np.all(image == 0.25)  # input untouched
    np.testing.assert_array_equal(out[4, 5], [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(out[4, 7], [1.0, 0.0, 0.5])      # distance 2: on the dot
    np.testing.assert_array_equal(out[6, 7], [0.25, 0.25, 0.25])   # distance 2.83: off
    np.testing.assert_array_equal(out[19, 29], [1.0, 0.0, 0.5])    # the corner point, clipped
    painted = np.any(out != 0.25, axis=-1)
    assert painted.sum() == 13 + 6  # a full radius-2 disc + the quarter disc in the corner
    # radius 0 marks the nearest pixel only; uint8 and grey input become float RGB
    out = L.draw(np.zeros((10, 10), np.uint8), L.Landmarks([[3.0, 6.0]], [0], "s"), radius=0)
    assert out.shape == (10, 10, 3) and np.argwhere(out.any(-1)).tolist() == [[6, 3]]
    with pytest.raises(ValueError, match="color"):
        L.draw(image, lm, color=(0, 255, 0))


# ----------------------------------------------------------------------------------------------
# mediapipe on a real photo (peer: the detector itself is mediapipe's).


@pytest.fixture(scope="module")
def astronaut():
    pytest.importorskip("mediapipe")
    data = pytest.importorskip("skimage.data")
    image = data.astronaut()  # [512, 512, 3] uint8, Eileen Collins, frontal face
    return image, L.detect(image, name="astronaut.png")


@pytest.mark.peers
def test_detect_astronaut_face_geometry(astronaut):
    image, lm = astronaut
    assert lm.source == "mediapipe" and len(lm) == 51 and lm.dense.shape == (468, 2)
    np.testing.assert_array_equal(lm.ibug_ids, np.arange(17, 68))
    np.testing.assert_array_equal(lm.points, lm.dense[MEDIAPIPE_INDICES])
    # the face box (OpenCV's Haar cascade finds x 177..272, y 66..161; the chin reaches lower)
    x, y = lm.points[:, 0], lm.points[:, 1]
    assert x.min() > 165 and x.max() < 285 and y.min() > 55 and y.max() < 185
    at = {int(i): p for i, p in zip(lm.ibug_ids, lm.points)}
    mean_y = lambda ids: np.mean([at[i][1] for i in ids])  # noqa: E731
    brows, eyes, nose, mouth = range(17, 27), range(36, 48), [30, 33], range(48, 68)
    assert mean_y(brows) < mean_y(eyes) < mean_y(nose) < mean_y(mouth)
    # image left/right: brow ends, eye corners, nostrils, mouth corners
    assert at[17][0] < at[21][0] < at[22][0] < at[26][0]
    assert at[36][0] < at[39][0] < at[42][0] < at[45][0]
    assert at[31][0] < at[33][0] < at[35][0]
    assert at[48][0] < at[51][0] < at[54][0]
    # float input in [0, 1] gives the same detection as the uint8 image
    again = L.detect(image.astype(np.float32) / 255.0)
    np.testing.assert_allclose(again.dense, lm.dense, atol=1e-3)


@pytest.mark.peers
def test_detect_pixel_convention_by_mirroring(astronaut):
    """Mirroring the image maps pixel x to W - 1 - x. With the right convention (u W - 0.5) the
    mirrored detection, mapped back, has the same centroid; with u W it would be off by 1 px."""
    image, lm = astronaut
    w = image.shape[1]
    flipped = L.detect(image[:, ::-1])
    back = flipped.dense.copy()
    back[:, 0] = w - 1 - back[:, 0]
    shift = back.mean(0) - lm.dense.mean(0)
    assert abs(shift[0]) < 0.4 and abs(shift[1]) < 0.4, shift
    # left and right swap under mirroring: image-left eye <-> image-right eye, mouth corners
    five, five_f = L.five_points(lm), L.five_points(flipped)
    five_f[:, 0] = w - 1 - five_f[:, 0]
    np.testing.assert_allclose(five_f[[1, 0, 2, 4, 3]], five, atol=3.0)


@pytest.mark.peers
def test_detect_astronaut_arcface_crop(astronaut):
    image, lm = astronaut
    five = L.five_points(lm)
    M = np.asarray(align.arcface_transform(five))
    mapped = five @ M[:, :2].T + M[:, 2]
    residual = np.linalg.norm(mapped - align.ARCFACE_TEMPLATE, axis=1)  # crop pixels (112)
    assert residual[:2].max() < 5.0 and residual.max() < 9.0, residual  # eyes, all five
    # the crop holds an upright frontal face whose own landmarks land near the template
    crop = np.asarray(align.arcface_crop(image.astype(np.float32) / 255.0, five))
    again = L.five_points(L.detect(crop, name="crop"))
    err = np.linalg.norm(again - align.ARCFACE_TEMPLATE, axis=1)
    assert err[:2].max() < 5.0 and err.max() < 9.0, err
    # the overlay draws on the photo
    overlay = L.draw(image, lm, color=(0, 1, 0), radius=1)
    for x, y in np.round(lm.points).astype(int):
        np.testing.assert_array_equal(overlay[y, x], [0.0, 1.0, 0.0])


@pytest.mark.peers
def test_detect_no_face_names_the_image(tmp_path):
    pytest.importorskip("mediapipe")
    blank = np.full((256, 256, 3), 0.5, np.float32)
    with pytest.raises(L.NoFaceError, match=r"blank\.png: no face found"):
        L.detect(blank, name="blank.png")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with pytest.raises(L.NoFaceError, match=r"frames/0007\.jpg.*landmarks_path"):
        L.landmarks_for_image(noise, path="frames/0007.jpg")
    with pytest.raises(ValueError):  # NoFaceError is a ValueError
        L.detect(noise)


@pytest.mark.peers
def test_detect_iris_points_of_the_refined_mesh(astronaut):
    """detect(iris=True) runs mediapipe's refined mesh and keeps its iris points 468-477: 468-472
    in the subject's right eye (image left, between iBUG 36 and 39), 473-477 in the left eye,
    each centre inside its contour, 470/475 above 472/477 and 469/474 right of 471/476 in the
    image for both eyes (the order the head model embeds, `head_default._iris_embedding`)."""
    image, plain = astronaut
    assert plain.iris is None
    lm = L.detect(image, name="astronaut.png", iris=True)
    assert lm.iris.shape == (10, 2) and lm.dense.shape == (468, 2)
    at = {int(i): p for i, p in zip(lm.ibug_ids, lm.points)}
    for k, (a, b) in ((0, (36, 39)), (5, (42, 45))):
        c = lm.iris[k]
        assert at[a][0] < c[0] < at[b][0]
        ring = lm.iris[k + 1:k + 5]
        assert ring[:, 0].min() < c[0] < ring[:, 0].max() and ring[:, 1].min() < c[1] < ring[:, 1].max()
        assert ring[1, 1] < c[1] < ring[3, 1]            # 470/475 up, 472/477 down (image y down)
        assert ring[2, 0] < c[0] < ring[0, 0]            # 469/474 image right, 471/476 left
    # The refined mesh moves the plain mesh's points only a little (it refines eyes and lips).
    assert np.median(np.linalg.norm(lm.dense - plain.dense, axis=1)) < 2.0
