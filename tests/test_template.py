"""kernels.template and storage.template_io: the default template and user templates."""

import json

import numpy as np
import pytest

from kernels.meshing import mesh_quality
from kernels.synth.face import PART_NAMES, face_region, landmark_uv, mean_face_mesh, part_labels
from kernels.template import Template, default_template, make_template
from storage.template_io import read_template, write_template


@pytest.fixture(scope="module")
def tpl():
    return default_template(5_000)


@pytest.mark.parametrize("n", [5_000, 25_000])
def test_default_template_size_and_crop(n):
    T = default_template(n)
    assert abs(T.n_vertices - n) <= 0.05 * n
    th, ph = np.degrees(T.uv[:, 0]), np.degrees(T.uv[:, 1])
    assert np.abs(th).max() < 90.0                                   # no ears / back of the head
    # every face-region vertex of a dense grid lies inside the template's uv hull
    dense = mean_face_mesh(60_000)
    fr = face_region(dense.uv)
    tdeg = np.degrees(dense.uv[fr])
    assert tdeg[:, 0].min() > th.min() and tdeg[:, 0].max() < th.max()
    assert tdeg[:, 1].min() > ph.min() and tdeg[:, 1].max() < ph.max()
    q = mesh_quality(T.vertices, T.faces)
    assert q["n_components"] == 1 and q["edge_manifold"] and q["n_degenerate"] == 0
    assert q["n_holes"] == 1                                          # the mouth slit


def test_default_template_landmarks_parts_orientation(tpl):
    T = tpl
    # barycentric landmarks reproduce the landmarks' uv (exactly, except the inner-lip
    # landmarks moved off the mouth slit, which stay within a grid cell)
    tri = T.faces[T.landmark_faces]
    luv = np.einsum("kj,kjc->kc", T.landmark_bary, T.uv[tri])
    err = np.linalg.norm(luv - landmark_uv(), axis=1)
    inner = np.isin(np.arange(106), [97, 98, 99, 101, 102, 103])
    assert err[~inner].max() < 1e-9 and np.degrees(err[inner]).max() < 3.0
    np.testing.assert_allclose(T.landmark_bary.sum(axis=1), 1.0)
    # landmarks on the mean surface (mesh interpolation error only)
    d = np.linalg.norm(T.landmark_points() - mean_face_mesh(200_000).landmarks, axis=1)
    assert d[~inner].max() < 1.5 and d[inner].max() < 4.0
    np.testing.assert_array_equal(T.parts, part_labels(T.uv))
    assert T.part_names == PART_NAMES
    V, F = T.vertices, T.faces
    fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    assert np.mean(np.einsum("ij,ij->i", fn, V[F].mean(axis=1)) > 0) > 0.95   # outward
    T2 = default_template(5_000)
    np.testing.assert_array_equal(T2.vertices, T.vertices)            # deterministic
    assert not T.vertices.flags.writeable


def _small():
    T = default_template(1_000)
    return np.array(T.vertices), np.array(T.faces), np.array(T.parts)


def test_make_template_vertex_id_landmarks():
    V, F, P = _small()
    ids = np.arange(106) * 7
    T = make_template(V, F, ids, P)
    assert isinstance(T, Template) and T.uv is None
    np.testing.assert_allclose(T.landmark_points(), V[ids])


@pytest.mark.parametrize("mutate, match", [
    (lambda V, F, L, P: (V, F, L + 10_000, P), "landmarks: 106 vertex id"),
    (lambda V, F, L, P: (V, F, L[:50], P), r"landmarks: expected \(106,\) vertex ids"),
    (lambda V, F, L, P: (np.where(np.arange(len(V))[:, None] == 3, np.nan, V), F, L, P), "vertices: 1 vertex row"),
    (lambda V, F, L, P: (V, F[:0], L, P), "faces: the template has no faces"),
    (lambda V, F, L, P: (V, np.vstack([F, F[:1]]), L, P), "faces: non-manifold|faces: inconsistent orientation"),
    (lambda V, F, L, P: (V, np.vstack([F, F[:1, ::-1]]), L, P), "faces: non-manifold"),
    (lambda V, F, L, P: (V, F, L, P + 10), "parts: codes must be in"),
    (lambda V, F, L, P: (V[:, :2], F, L, P), r"vertices: expected shape \(n, 3\)"),
    (lambda V, F, L, P: (V, F, (np.full(106, len(F)), np.full((106, 3), 1 / 3)), P), "landmarks face ids: 106 id"),
])
def test_make_template_rejects(mutate, match):
    V, F, P = _small()
    L = np.arange(106)
    with pytest.raises(ValueError, match=match):
        make_template(*mutate(V, F, L, P))


def test_template_files_roundtrip_and_errors(tmp_path, tpl):
    m, lm, pt = tmp_path / "t.ply", tmp_path / "l.json", tmp_path / "p.json"
    write_template(tpl, m, lm, pt)
    R = read_template(m, lm, pt)
    np.testing.assert_allclose(R.vertices, tpl.vertices)
    np.testing.assert_array_equal(R.faces, tpl.faces)
    np.testing.assert_allclose(R.landmark_points(), tpl.landmark_points(), atol=1e-9)
    np.testing.assert_array_equal(R.parts, tpl.parts)
    assert R.part_names == tpl.part_names
    # vertex-id landmark file with an id out of range: the error names that file
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "pixelface-template-landmarks", "version": 1,
                               "vertex_ids": [0] * 105 + [tpl.n_vertices + 5]}))
    with pytest.raises(ValueError, match=f"landmark file {bad}: 1 vertex id"):
        read_template(m, bad, pt)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"landmark file {bad}: not valid JSON"):
        read_template(m, bad, pt)
    parts = json.loads(pt.read_text())
    parts["labels"] = parts["labels"][:-1]
    pt2 = tmp_path / "p2.json"
    pt2.write_text(json.dumps(parts))
    with pytest.raises(ValueError, match=f"part-label file {pt2}: 'labels' has"):
        read_template(m, lm, pt2)
    with pytest.raises(ValueError, match="mesh file .*missing.ply: no such file"):
        read_template(tmp_path / "missing.ply", lm, pt)


def test_default_jaw_rig_follows_the_model_jaw(tpl):
    """Posing the default template's jaw by the model's angle reproduces the model's jaw motion."""
    from kernels.jaw import pose_jaw
    from kernels.synth.face import EXPRESSIONS, N_IDENTITY, Subject, surface_points

    rig = tpl.jaw
    assert rig is not None and rig.weights.shape == (tpl.n_vertices,)
    assert rig.weights.min() >= 0.0 and rig.weights.max() <= 1.0 and not rig.weights.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(rig.axis, axis=1), 1.0)
    lw = tpl.landmark_weights(rig.weights)
    assert lw[[93, 94, 95]].min() > 0.9 and lw[16] > 0.5              # lower lip; chin (the mask fades down the neck)
    assert lw[[51, 54, 66, 74, 87, 104]].max() < 0.05                # nose, eyes, upper lip
    mean = Subject("mean", "female", 49, np.zeros(N_IDENTITY), np.ones(len(EXPRESSIONS)), 0.5, 0.2)
    motion = surface_points(mean, "mouth_open", tpl.uv) - surface_points(mean, "neutral", tpl.uv)
    posed = pose_jaw(tpl.vertices, rig.weights, rig.pivot, rig.axis, 15.0) - tpl.vertices
    # outside the lips' band (which the model also pushes into a mouth cavity); the subject's
    # radius differs from the mean face's by a few percent, so is its jaw motion
    fr = face_region(tpl.uv) & (tpl.parts != PART_NAMES.index("mouth"))
    m = np.linalg.norm(motion[fr], axis=1)
    assert m.max() > 20.0
    assert np.all(np.linalg.norm(posed[fr] - motion[fr], axis=1) <= 0.05 * m + 0.05)
    assert default_template(5_000, jaw=False).jaw is None


def test_jaw_rig_validation_and_files(tmp_path, tpl):
    from kernels.template import make_jaw_rig

    V, F, P = _small()
    n = len(V)
    T = make_template(V, F, np.arange(106), P, jaw=(np.linspace(0, 1, n), [0, 0, 0], [2.0, 0, 0]))
    np.testing.assert_allclose(T.jaw.axis, [1.0, 0.0, 0.0])
    for args, match in [((np.full(n, 1.5), np.zeros(3), [1, 0, 0]), r"jaw weights: must be in \[0, 1\]"),
                        ((np.zeros(n), np.zeros(3), [1, 0, 0]), "jaw weights: all zero"),
                        ((np.ones(n - 1), np.zeros(3), [1, 0, 0]), r"jaw weights: expected shape"),
                        ((np.ones(n), np.zeros(3), [0, 0, 0]), "jaw axis: must be non-zero"),
                        ((np.ones(n), [0, np.nan, 0], [1, 0, 0]), "jaw pivot: must be finite")]:
        with pytest.raises(ValueError, match=match):
            make_jaw_rig(*args, n)
    with pytest.raises(ValueError, match="jaw: expected a JawRig"):
        make_template(V, F, np.arange(106), P, jaw=np.ones(n))
    # files: the optional jaw file round-trips; without it the template has no jaw
    m, lm, pt, jw = tmp_path / "t.ply", tmp_path / "l.json", tmp_path / "p.json", tmp_path / "j.json"
    write_template(tpl, m, lm, pt, jw)
    R = read_template(m, lm, pt, jaw_path=jw)
    np.testing.assert_allclose(R.jaw.weights, tpl.jaw.weights)
    np.testing.assert_allclose(R.jaw.axis, tpl.jaw.axis)
    assert read_template(m, lm, pt).jaw is None
    Rc = read_template(m, lm, pt, units="cm", jaw_path=jw)
    np.testing.assert_allclose(Rc.jaw.pivot, 10.0 * np.asarray(tpl.jaw.pivot))
    obj = json.loads(jw.read_text())
    obj["weights"] = obj["weights"][:-1]
    jw.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=f"jaw file {jw}: 'weights' must have shape"):
        read_template(m, lm, pt, jaw_path=jw)
    obj["weights"] = [2.0] * tpl.n_vertices
    jw.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=rf"jaw file {jw}: jaw weights: must be in \[0, 1\]"):
        read_template(m, lm, pt, jaw_path=jw)
    with pytest.raises(ValueError, match="has no jaw rig to write"):
        write_template(make_template(V, F, np.arange(106), P), tmp_path / "u.ply", lm, pt, jw)
