"""Evaluation metrics against known answers: brute-force distances, NME, ARMSE (kernels/metrics.py)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from kernels import metrics as M
from kernels.synth.face import face_mesh, mean_face_mesh, sample_subject


def _similarity(seed, scale=1.7):
    R = Rotation.random(random_state=seed).as_matrix()
    t = np.random.default_rng(seed).normal(scale=200.0, size=3)
    return lambda x: scale * x @ R.T + t


@pytest.fixture(scope="module")
def small_faces():
    """Two tiny synthetic face meshes (~500 vertices): the GT and another subject's prediction."""
    gt = face_mesh(sample_subject("gt", 11), "smile", 500)
    pred = face_mesh(sample_subject("pred", 12), "neutral", 520)
    return gt, pred


@pytest.fixture(scope="module")
def faces_30k():
    gt = face_mesh(sample_subject("gt", 21), "smile", 30000)
    pred = face_mesh(sample_subject("pred", 22), "brow_raise", 8000)
    return gt, pred


# -- exact distances ----------------------------------------------------------------------------

def test_distances_match_brute_force_random_meshes():
    rng = np.random.default_rng(0)
    for _ in range(4):
        V = rng.normal(size=(30, 3))
        F = rng.integers(0, 30, size=(40, 3))            # includes degenerate (repeated-id) triangles
        P = rng.normal(size=(400, 3)) * 1.5
        cp, ref = M.closest_points(P, V, F), M.closest_points_reference(P, V, F)
        np.testing.assert_allclose(cp.distances, ref.distances, rtol=0, atol=1e-9)
        # the returned points, triangles and weights are consistent
        np.testing.assert_allclose(np.linalg.norm(cp.points - P, axis=1), cp.distances, atol=1e-12)
        q = np.einsum("kj,kjc->kc", cp.bary, V[F[cp.triangles]])
        np.testing.assert_allclose(q, cp.points, atol=1e-12)
        assert cp.bary.min() >= -1e-12 and np.allclose(cp.bary.sum(axis=1), 1.0)


def test_distances_match_brute_force_face_mesh_in_mm():
    m = mean_face_mesh(500)
    rng = np.random.default_rng(1)
    P = np.vstack([m.vertices + rng.normal(scale=1.0, size=m.vertices.shape),
                   m.vertices[::5] + rng.normal(scale=20.0, size=m.vertices[::5].shape)])
    d = M.point_triangle_distance(P, m.vertices, m.faces)
    ref = M.point_triangle_distance_reference(P, m.vertices, m.faces)
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-6)
    # far from the origin (float32 BVH): still exact after the float64 refinement
    off = np.array([1e4, -2e4, 3e4])
    d2 = M.point_triangle_distance(P + off, m.vertices + off, m.faces)
    np.testing.assert_allclose(d2, ref, rtol=0, atol=1e-6)


def test_points_on_the_mesh_have_zero_distance():
    m = mean_face_mesh(2000)
    rng = np.random.default_rng(2)
    t = rng.integers(0, m.faces.shape[0], 500)
    w = rng.dirichlet(np.ones(3), 500)
    P = np.einsum("kj,kjc->kc", w, m.vertices[m.faces[t]])
    assert M.point_triangle_distance(P, m.vertices, m.faces).max() < 1e-9


def test_mesh_boundary_of_a_grid():
    n = 6
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    v00 = (i * n + j).ravel()
    F = np.concatenate([np.stack([v00, v00 + 1, v00 + n + 1], 1), np.stack([v00, v00 + n + 1, v00 + n], 1)])
    ef, vf = M.mesh_boundary(F, n * n)
    assert ef.sum() == 4 * (n - 1)
    assert vf.sum() == 4 * (n - 1)
    # a point beyond the border projects onto it; one above the middle does not
    grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    Vg = np.column_stack([grid, np.zeros(n * n)]).astype(float)
    cp = M.closest_points([[-1.0, 2.5, 0.3], [2.5, 2.5, 0.3]], Vg, F)
    assert M.on_boundary(cp, F, ef, vf).tolist() == [True, False]


def test_similarity_fit_recovers_a_known_transform():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(20, 3)) * 50
    f = _similarity(4, 0.8)
    T = M.similarity_fit(src, f(src))
    np.testing.assert_allclose(src @ T[:3, :3].T + T[:3, 3], f(src), atol=1e-9)
    assert np.cbrt(np.linalg.det(T[:3, :3])) == pytest.approx(0.8, rel=1e-12)
    with pytest.raises(ValueError, match="degenerate"):
        M.similarity_fit(np.outer(np.arange(5.0), [1, 2, 3]), rng.normal(size=(5, 3)))


# -- NME ----------------------------------------------------------------------------------------

def test_nme_normaliser_of_a_box():
    # 8 corners of a 120 x 80 x 30 box, rotated: the principal-axes bbox is the box itself
    c = np.array([[x, y, z] for x in (0, 120) for y in (0, 80) for z in (0, 30)], float)
    g = _similarity(5, 1.0)(c)
    assert M.landmark_normaliser(g) == pytest.approx(np.sqrt(120 * 80), rel=1e-12)
    assert M.landmark_normaliser(g, "diagonal") == pytest.approx(np.sqrt(120**2 + 80**2 + 30**2), rel=1e-12)
    assert M.landmark_normaliser(c, "bbox_xy") == pytest.approx(np.sqrt(120 * 80), rel=1e-12)


def test_nme_zero_known_offset_and_similarity_invariance(small_faces):
    gt, pred = small_faces
    g = gt.landmarks
    d = M.landmark_normaliser(g)
    assert M.nme(g, g) == pytest.approx(0.0, abs=1e-12)
    off = np.array([0.3, -0.4, 1.2])                       # |off| = 1.3 mm
    assert M.nme(g + off, g, align="none") == pytest.approx(1.3 / d, rel=1e-12)
    assert M.nme(g + off, g) == pytest.approx(0.0, abs=1e-12)   # the alignment removes it
    p = pred.landmarks
    v = M.nme(p, g)
    assert v > 0.005
    for seed in (6, 7):
        assert M.nme(_similarity(seed)(p), g) == pytest.approx(v, rel=1e-9)


def test_nme_excludes_nan_rows_and_rejects_all_nan(small_faces):
    gt, pred = small_faces
    p, g = pred.landmarks.copy(), gt.landmarks.copy()
    p[[3, 40]] = np.nan                                    # missing in the prediction
    g[[77, 90]] = np.nan                                   # missing in the ground truth
    ok = np.all(np.isfinite(p), 1) & np.all(np.isfinite(g), 1)
    T = M.similarity_fit(p[ok], g[ok])
    err = np.linalg.norm(p[ok] @ T[:3, :3].T + T[:3, 3] - g[ok], axis=1).mean()
    assert M.nme(p, g) == pytest.approx(err / M.landmark_normaliser(g), rel=1e-12)
    with pytest.raises(ValueError, match="no landmark is finite"):
        M.nme(np.full((106, 3), np.nan), g)
    with pytest.raises(ValueError, match="shape"):
        M.nme(p[:50], g)
    with pytest.raises(ValueError, match="normaliser"):
        M.nme(p, g, normaliser="iod")


# -- ARMSE --------------------------------------------------------------------------------------

def _armse_by_hand(pv, pf, gv, gf, pl, gl, radii):
    """Independent ARMSE without ICP: own Umeyama, brute-force distances."""
    iod = np.linalg.norm(gl[66] - gl[79])
    gvn, gln = (gv - gl[54]) / iod, (gl - gl[54]) / iod
    ok = np.all(np.isfinite(pl), 1) & np.all(np.isfinite(gln), 1)
    a, b = pl[ok], gln[ok]
    ma, mb = a.mean(0), b.mean(0)
    U, S, Vt = np.linalg.svd((b - mb).T @ (a - ma))
    D = np.diag([1, 1, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / np.sum((a - ma) ** 2)
    pvn = s * (pv - ma) @ R.T + mb
    out = {}
    for r in radii:
        P = pvn[np.unique(pf)]
        P = P[np.linalg.norm(P, axis=1) <= r]
        G = gvn[np.unique(gf)]
        G = G[np.linalg.norm(G, axis=1) <= r]
        e1 = np.sqrt(np.mean(M.point_triangle_distance_reference(P, gvn, gf) ** 2))
        e2 = np.sqrt(np.mean(M.point_triangle_distance_reference(G, pvn, pf) ** 2))
        out[r] = 0.5 * (e1 + e2)
    return out


def test_armse_without_polish_matches_an_independent_brute_force(small_faces):
    gt, pred = small_faces
    pl = pred.landmarks.copy()
    pl[[10, 90]] = np.nan
    res = M.armse(pred.vertices, pred.faces, gt.vertices, gt.faces, pl, gt.landmarks, icp_polish=False)
    ref = _armse_by_hand(pred.vertices, pred.faces, gt.vertices, gt.faces, pl, gt.landmarks, M.RADII)
    for r in M.RADII:
        assert res.armse[r] == pytest.approx(ref[r], rel=1e-6, abs=1e-9)
    assert res.n_landmarks == 104 and res.icp == ()


def test_armse_with_polish_matches_brute_force_closest_points(small_faces, monkeypatch):
    gt, pred = small_faces
    args = (pred.vertices, pred.faces, gt.vertices, gt.faces, pred.landmarks, gt.landmarks)
    fast = M.armse(*args)
    monkeypatch.setattr(M.MeshIndex, "query", lambda self, p: M.closest_points_reference(p, self.vertices, self.faces))
    slow = M.armse(*args)
    assert len(fast.icp) == len(slow.icp) >= 2
    np.testing.assert_allclose(fast.transform, slow.transform, atol=1e-9)
    for r in M.RADII:
        assert fast.armse[r] == pytest.approx(slow.armse[r], rel=1e-6)
    # the polish lowers the error of the landmark alignment
    assert fast.icp[-1].rms < fast.icp[0].rms


def test_armse_zero_for_identical_meshes(small_faces):
    gt, _ = small_faces
    res = M.armse(gt.vertices, gt.faces, gt.vertices, gt.faces, gt.landmarks, gt.landmarks)
    for r in M.RADII:
        assert res.armse[r] < 1e-9
        assert res.n_pred[r] == res.n_gt[r] > 0
    np.testing.assert_allclose(res.transform, res.gt_transform, atol=1e-9)
    assert res.interocular_mm == pytest.approx(np.linalg.norm(gt.landmarks[66] - gt.landmarks[79]))


def test_armse_known_offset_on_a_plane():
    # GT: a flat 3 x 3 (IOD units) grid in z = 0 with an IOD of 80 mm; prediction: the same
    # grid 0.8 mm above it, with the GT's landmarks (so the landmark alignment is the identity)
    n = 61
    x = np.linspace(-120.0, 120.0, n)
    X, Y = np.meshgrid(x, x, indexing="ij")
    V = np.column_stack([X.ravel(), Y.ravel(), np.zeros(n * n)])
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    v00 = (i * n + j).ravel()
    F = np.concatenate([np.stack([v00, v00 + 1, v00 + n + 1], 1), np.stack([v00, v00 + n + 1, v00 + n], 1)])
    rng = np.random.default_rng(8)
    L = np.column_stack([rng.uniform(-60, 60, (106, 2)), np.zeros(106)])
    L[54] = [0, 0, 0]
    L[66], L[79] = [-40, 0, 0], [40, 0, 0]
    res = M.armse(V + [0, 0, 0.8], F, V, F, L, L, icp_polish=False)
    for r in M.RADII:
        assert res.armse[r] == pytest.approx(0.8 / 80.0, rel=1e-9)
    # the rigid polish removes a pure offset along the normal
    res = M.armse(V + [0, 0, 0.8], F, V, F, L, L)
    assert max(res.armse.values()) < 1e-6


def test_armse_invariant_to_a_similarity_of_the_prediction(faces_30k):
    gt, pred = faces_30k
    base = M.armse(pred.vertices, pred.faces, gt.vertices, gt.faces, pred.landmarks, gt.landmarks)
    assert 0.005 < base.armse[0.6] < 0.05                 # two different people: 0.4-4 mm
    assert all(base.n_pred[r] > 500 for r in M.RADII)
    for seed in (9, 10):
        f = _similarity(seed)
        res = M.armse(f(pred.vertices), pred.faces, gt.vertices, gt.faces, f(pred.landmarks), gt.landmarks)
        for r in M.RADII:
            assert res.armse[r] == pytest.approx(base.armse[r], rel=1e-6)


def test_armse_bad_inputs(small_faces):
    gt, pred = small_faces
    args = [pred.vertices, pred.faces, gt.vertices, gt.faces, pred.landmarks, gt.landmarks]
    bad = list(args)
    bad[1] = pred.faces + pred.vertices.shape[0]
    with pytest.raises(ValueError, match="pred_faces"):
        M.armse(*bad)
    bad = list(args)
    bad[2] = gt.vertices.copy()
    bad[2][0, 0] = np.nan
    with pytest.raises(ValueError, match="gt_vertices"):
        M.armse(*bad)
    bad = list(args)
    bad[5] = gt.landmarks.copy()
    bad[5][54] = np.nan
    with pytest.raises(ValueError, match="nose-tip"):
        M.armse(*bad)
    with pytest.raises(ValueError, match="pred_landmarks"):
        M.armse(*args[:4], np.full((106, 3), np.nan), gt.landmarks)
    with pytest.raises(ValueError, match="radii"):
        M.armse(*args, radii=(0.5, -1.0))
    with pytest.raises(ValueError, match="interocular"):
        M.armse(*args, interocular=((66,), (200,)))
    with pytest.raises(ValueError, match="max_distance"):
        M.IcpPolishParams(max_distance=0.0)
    with pytest.raises(ValueError, match="points"):
        M.point_triangle_distance(np.zeros((3, 2)), gt.vertices, gt.faces)
