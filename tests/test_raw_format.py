"""Raw format v1: round trip and the reader's errors (independent of the simulator)."""

import json

import numpy as np
import pytest

from kernels.camera import Camera, look_at
from storage import raw

H, W, PW = 24, 32, 64


def _cam(name, dist=True):
    R, t = look_at([0, 0, 500], [0, 0, 0])
    return Camera(name, W, H, np.array([[60.0, 0, 15.5], [0, 60.0, 11.5], [0, 0, 1]]),
                  np.array([-0.05, 0.01, 0, 0, 0]) if dist else np.zeros(5), R, t)


def _view(rng, name):
    calib = raw.ViewCalibration(name, _cam("ir"), _cam("proj", dist=False).__class__(
        "proj", PW, 40, np.array([[90.0, 0, 31.5], [0, 90.0, 19.5], [0, 0, 1]])), _cam("rgb"))
    lm = rng.uniform(0, [W - 1, H - 1], size=(106, 2))
    vis = rng.random(106) > 0.3
    lm[~vis] = np.nan
    return raw.RawView(rng.integers(0, 256, (3, 4, H, W), dtype=np.uint8),
                       rng.integers(0, 256, (H, W, 3), dtype=np.uint8), calib, lm, vis)


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "raw"
    raw.write_subject(root, raw.SubjectMeta("S0001", "female", 33, "train"))
    meta = raw.SampleMeta("S0001", "smile", "smile", "positive", ("left", "middle"),
                          raw.FringeSpec(4, (1, 8, 64), PW), W, H)
    views = {v: _view(rng, v) for v in meta.views}
    raw.write_sample(root, meta, views)
    return root, meta, views


def test_round_trip(dataset):
    root, meta, views = dataset
    ds = raw.RawDataset(root)
    assert ds.subjects() == ["S0001"]
    assert ds.samples("S0001") == ["smile"]
    assert ds.subject("S0001") == raw.SubjectMeta("S0001", "female", 33, "train")
    assert ds.sample("S0001", "smile") == meta
    for v in meta.views:
        got = ds.read_view("S0001", "smile", v)
        np.testing.assert_array_equal(got.fringe, views[v].fringe)
        np.testing.assert_array_equal(got.rgb, views[v].rgb)
        np.testing.assert_array_equal(got.landmark_visible, views[v].landmark_visible)
        np.testing.assert_allclose(got.landmarks_px, views[v].landmarks_px, atol=1e-3)
        np.testing.assert_array_equal(got.calibration.ir.K, views[v].calibration.ir.K)
        np.testing.assert_array_equal(got.calibration.ir.dist, views[v].calibration.ir.dist)
    assert not any(p.name.startswith(".") for p in (root / "S0001").iterdir())


def test_existing_sample_is_not_overwritten_silently(dataset):
    root, meta, views = dataset
    with pytest.raises(FileExistsError, match="S0001 / sample smile"):
        raw.write_sample(root, meta, views)


def test_failed_write_leaves_nothing_visible(dataset):
    root, meta, views = dataset
    bad = dict(views)
    bad["middle"] = raw.RawView(views["middle"].fringe[:, :3], views["middle"].rgb, views["middle"].calibration,
                                views["middle"].landmarks_px, views["middle"].landmark_visible)
    meta2 = raw.SampleMeta("S0001", "kiss", "kiss", "neutral", meta.views, meta.fringe, W, H)
    with pytest.raises(ValueError, match="view middle: fringe must be uint8"):
        raw.write_sample(root, meta2, bad)
    assert sorted(p.name for p in (root / "S0001").iterdir()) == ["smile", "subject.json"]


def _err(fn, *a):
    with pytest.raises(raw.RawFormatError) as ei:
        fn(*a)
    return str(ei.value)


def test_truncated_png_names_subject_sample_view_file(dataset):
    root, _, _ = dataset
    p = root / "S0001/smile/left/fringe_f1_n2.png"
    p.write_bytes(p.read_bytes()[:40])
    msg = _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")
    assert "subject S0001 / sample smile / view left / file" in msg and "fringe_f1_n2.png" in msg
    assert "not a readable image" in msg


def test_missing_calibration(dataset):
    root, _, _ = dataset
    (root / "S0001/smile/middle/calibration.json").unlink()
    msg = _err(raw.RawDataset(root).read_view, "S0001", "smile", "middle")
    assert "view middle" in msg and "calibration.json: missing file" in msg


def test_singular_calibration(dataset):
    root, _, _ = dataset
    p = root / "S0001/smile/left/calibration.json"
    d = json.loads(p.read_text())
    d["ir"]["K"][0][0] = 0.0
    p.write_text(json.dumps(d))
    msg = _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")
    assert "camera 'ir'" in msg and "not invertible" in msg


def test_landmarks_wrong_row_count(dataset):
    root, _, _ = dataset
    p = root / "S0001/smile/left/landmarks.csv"
    p.write_text("\n".join(p.read_text().splitlines()[:-3]) + "\n")
    msg = _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")
    assert "landmarks.csv" in msg and "expected 106 landmark rows, got 103" in msg


def test_landmark_outside_image(dataset):
    root, _, _ = dataset
    p = root / "S0001/smile/left/landmarks.csv"
    lines = p.read_text().splitlines()
    lines[6] = "5,9999.0,3.0,1"
    p.write_text("\n".join(lines) + "\n")
    assert "landmark 5: (9999.0, 3.0) outside" in _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")


def test_wrong_image_size_and_extra_file(dataset):
    from PIL import Image

    root, _, _ = dataset
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(root / "S0001/smile/left/fringe_f0_n0.png")
    assert "expected 32x24" in _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")
    (root / "S0001/smile/middle/notes.txt").write_text("x")
    assert "unexpected file(s) ['notes.txt']" in _err(raw.RawDataset(root).read_view, "S0001", "smile", "middle")


def test_sixteen_bit_image_refused(dataset):
    from PIL import Image

    root, _, _ = dataset
    Image.fromarray(np.zeros((H, W), np.uint16)).save(root / "S0001/smile/left/fringe_f0_n1.png")
    assert "image mode" in _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")


def test_bad_metadata(dataset):
    root, _, _ = dataset
    p = root / "S0001/smile/sample.json"
    d = json.loads(p.read_text())
    d["expression"] = "yawn"
    p.write_text(json.dumps(d))
    assert "unknown expression 'yawn'" in _err(raw.RawDataset(root).sample, "S0001", "smile", ["smile", "kiss"])
    (root / "S0001/subject.json").write_text("{not json")
    assert "not valid JSON" in _err(raw.RawDataset(root).subject, "S0001")


def test_unsafe_folder_names_and_symlinks(dataset, tmp_path):
    root, _, _ = dataset
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "S0001/smile/left/rgb.png").unlink()
    (root / "S0001/smile/left/rgb.png").symlink_to(outside / "x.png")
    assert "leaves its root" in _err(raw.RawDataset(root).read_view, "S0001", "smile", "left")
    (root / "bad id").mkdir()
    assert "subject id 'bad id' is not allowed" in _err(raw.RawDataset(root).subjects)


def test_not_a_raw_root(tmp_path):
    assert "missing raw-format.json" in _err(raw.RawDataset, tmp_path)
