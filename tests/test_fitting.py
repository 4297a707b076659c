"""Morphable model and 3DMM fitting against known answers (kernels/model.py, kernels/fitting.py).

The test model is built from the synthetic generator: template = the uv-grid points of the
front of the face, mean = the generator's mean face there, shape basis = the orthonormalised
true identity generator (variances from its SVD), expression basis = PCA of
``expression - neutral`` of a few training subjects.
"""

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from threadpoolctl import threadpool_limits

from kernels import fitting as FT
from kernels.fitting import FitParams, fit
from kernels.metrics import armse, nme
from kernels.model import MorphableModel, instance, landmarks, truncate
from kernels.synth.face import (
    PART_NAMES, expression_names, face_mesh, identity_basis, landmark_uv, mean_face_mesh, part_labels,
    sample_subject, surface_points, uv_grid,
)

N_GRID = 8000          # -> ~5100 template vertices
N_TRAIN = 4            # expression training subjects (x 21 expressions)


def _landmark_triangles(uv, faces, old):
    """Grid triangle (in the reindexed template) and barycentric weights of each landmark."""
    th, ph = np.unique(uv[:, 0]), np.unique(uv[:, 1])
    nt = th.size
    lu = landmark_uv()
    j = np.clip(np.searchsorted(th, lu[:, 0], "right") - 1, 0, nt - 2)
    i = np.clip(np.searchsorted(ph, lu[:, 1], "right") - 1, 0, ph.size - 2)
    a = (lu[:, 0] - th[j]) / (th[j + 1] - th[j])
    b = (lu[:, 1] - ph[i]) / (ph[i + 1] - ph[i])
    v00 = i * nt + j
    up = (a >= b)[:, None]
    tri = np.where(up, np.stack([v00, v00 + 1, v00 + nt + 1], 1), np.stack([v00, v00 + nt + 1, v00 + nt], 1))
    w = np.where(up, np.stack([1 - a, a - b, b], 1), np.stack([1 - b, a, b - a], 1))
    lookup = {tuple(t): k for k, t in enumerate(faces)}
    return np.array([lookup[tuple(old[t])] for t in tri]), w


def build_model(n_grid=N_GRID, n_train=N_TRAIN, seed=0):
    uv, faces = uv_grid(n_grid)
    td, pd = np.degrees(uv[:, 0]), np.degrees(uv[:, 1])
    region = (np.abs(td) <= 84) & (pd >= -60) & (pd <= 52)     # the face plus the contour landmarks
    new = np.full(len(uv), -1)
    new[region] = np.arange(region.sum())
    F = new[faces[np.all(region[faces], axis=1)]].astype(np.int32)
    u = uv[region]
    n = u.shape[0]
    lf, lb = _landmark_triangles(uv, F, new)
    # shape: the true identity generator, scaled by the coefficients' s.d. (age ~ U(-1, 1))
    B = identity_basis(u).reshape(3 * n, -1)
    sd = np.ones(B.shape[1])
    sd[-1] = 1 / np.sqrt(3)
    U, S, _ = np.linalg.svd(B * sd, full_matrices=False)
    ks = int(np.sum(S > 1e-6 * S[0]))
    # expression: PCA of residuals to the same subject's neutral
    rng = np.random.default_rng(seed)
    cols = []
    for k in range(n_train):
        subj = sample_subject(f"train{k}", rng)
        neutral = surface_points(subj, "neutral", u)
        cols += [(surface_points(subj, e, u) - neutral).ravel() for e in expression_names() if e != "neutral"]
    D = np.array(cols).T
    E, SE, _ = np.linalg.svd(D, full_matrices=False)
    ke = int(np.sum(SE > 1e-6 * SE[0]))
    return MorphableModel(mean_face_mesh(n_grid).vertices[region], U[:, :ks], S[:ks] ** 2, E[:, :ke],
                          SE[:ke] ** 2 / D.shape[1], F, lf, lb, part_labels(u), PART_NAMES)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    # the fits are many small BLAS calls: on a loaded 2-core machine OpenBLAS's spinning
    # threads cost ~10x the CPU time (measured 2.6 s vs 0.27 s per fit)
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def model(_one_blas_thread):
    return build_model()


def _subdivide(v, f):
    """Midpoint subdivision: the same piecewise-linear surface with other vertices."""
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    uniq, inv = np.unique(e, axis=0, return_inverse=True)
    m, n = f.shape[0], v.shape[0]
    a, b, c = inv[:m] + n, inv[m:2 * m] + n, inv[2 * m:] + n
    F = np.concatenate([np.stack([f[:, 0], a, c], 1), np.stack([a, f[:, 1], b], 1),
                        np.stack([c, b, f[:, 2]], 1), np.stack([a, b, c], 1)])
    return np.vstack([v, 0.5 * (v[uniq[:, 0]] + v[uniq[:, 1]])]), F


@pytest.fixture(scope="module")
def instance_scan(model):
    """A model instance (random coefficients), moved by a random similarity, re-tessellated, noisy."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal(model.n_shape) * np.sqrt(model.shape_variance)
    b = rng.standard_normal(model.n_expression) * np.sqrt(model.expression_variance) * 0.5
    X = instance(model, a, b)
    R, s, t = Rotation.random(random_state=7).as_matrix(), 1.1, np.array([5.0, -20.0, 400.0])
    V, F = _subdivide(X, model.faces.astype(np.int64))
    scan = s * V @ R.T + t + rng.normal(scale=0.02, size=V.shape)
    lms = s * landmarks(model, X) @ R.T + t + rng.normal(scale=0.3, size=(106, 3))
    truth = s * X @ R.T + t
    return scan, F, lms, truth, s


# The noise model of instance_scan (scan 0.02 mm, landmarks 0.3 mm per axis) -> MAP weights
MAP = FitParams(dense_reg=0.02 ** 2, dense_landmark_weight=(0.02 / 0.3) ** 2)


# -- model --------------------------------------------------------------------------------------

def test_model_instance_landmarks_truncate(model):
    assert model.n_vertices > 4000 and model.n_shape == 50 and model.n_expression > 60
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=model.n_shape), rng.normal(size=model.n_expression)
    X = instance(model, a, b)
    np.testing.assert_allclose(X, model.mean + (model.shape_basis @ a + model.expression_basis @ b).reshape(-1, 3))
    np.testing.assert_allclose(instance(model), model.mean)
    # the template landmarks are the generator's landmarks on the mean face
    np.testing.assert_allclose(landmarks(model, model.mean), mean_face_mesh(N_GRID).landmarks, atol=1e-9)
    t = truncate(model, 10, 5)
    assert (t.n_shape, t.n_expression) == (10, 5)
    np.testing.assert_allclose(instance(t, a[:10], b[:5]), instance(model, np.r_[a[:10], np.zeros(40)],
                                                                    np.r_[b[:5], np.zeros(model.n_expression - 5)]))
    with pytest.raises(ValueError, match="ks"):
        truncate(model, model.n_shape + 1, 0)
    with pytest.raises(ValueError, match="shape_coeffs"):
        instance(model, a[:3], b)
    with pytest.raises(ValueError):
        model.mean[0, 0] = 1.0                      # read-only


def test_model_validation(model):
    kw = {f: getattr(model, f) for f in ("mean", "shape_basis", "shape_variance", "expression_basis",
                                          "expression_variance", "faces", "landmark_faces", "landmark_bary",
                                          "parts", "part_names")}
    bad = {
        "shape_basis": (model.shape_basis * 1.01, "orthonormal"),
        "shape_variance": (-model.shape_variance, "shape_variance"),
        "expression_basis": (model.expression_basis[:-3], "expression_basis"),
        "faces": (model.faces + model.n_vertices, "faces"),
        "landmark_bary": (model.landmark_bary * 2, "landmark_bary"),
        "landmark_faces": (model.landmark_faces[:100], "landmark_faces"),
        "parts": (model.parts.astype(np.int64), "parts"),
        "mean": (np.where(np.arange(model.n_vertices)[:, None] == 0, np.nan, model.mean), "mean"),
    }
    for field, (value, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            MorphableModel(**{**kw, field: value})
    with pytest.raises(ValueError, match="part_names"):
        MorphableModel(**{**kw, "part_names": ("a", "b")})


# -- fitting ------------------------------------------------------------------------------------

def test_fit_recovers_a_model_instance(model, instance_scan):
    scan, F, lms, truth, s = instance_scan
    lms = lms.copy()
    lms[[5, 40, 70, 100]] = np.nan
    res = fit(model, scan, F, lms, MAP)
    err = np.linalg.norm(res.vertices - truth, axis=1)
    assert err.mean() < 0.03 and np.percentile(err, 99) < 0.1      # mm, vs 0.02 mm scan noise
    assert res.dense_rms_mm < 0.03 and res.n_correspondences > 0.95 * model.n_vertices
    assert res.scale == pytest.approx(s, rel=0.02)
    assert np.isnan(res.landmark_residuals[[5, 40, 70, 100]]).all()
    assert res.landmark_rms_mm < 0.6                                 # ~ the 0.3 mm/axis landmark noise
    stages = [it.stage for it in res.iterations]
    assert stages[0] == "landmarks" and stages[-1] == "dense"
    # the dense stage improves on the landmark-only fit
    lm_only = fit(model, scan, F, lms, replace(MAP, dense_max_distance_mm=()))
    assert np.linalg.norm(lm_only.vertices - truth, axis=1).mean() > 10 * err.mean()
    assert np.isnan(lm_only.dense_residuals).all() and lm_only.n_correspondences == 0


def test_fit_tolerates_missing_landmarks(model, instance_scan):
    scan, F, lms, truth, _ = instance_scan
    lms = lms.copy()
    lms[np.random.default_rng(1).permutation(106)[:70]] = np.nan   # two thirds missing
    res = fit(model, scan, F, lms, MAP)
    assert np.linalg.norm(res.vertices - truth, axis=1).mean() < 0.05
    lms[np.isfinite(lms[:, 0]).nonzero()[0][3:]] = np.nan           # 3 left < min_landmarks
    with pytest.raises(ValueError, match="finite rows"):
        fit(model, scan, F, lms, MAP)


@pytest.fixture(scope="module")
def heldout_scans():
    rng = np.random.default_rng(123)
    out = []
    for k, expr in enumerate(("neutral", "smile", "brow_raise")):
        out.append(face_mesh(sample_subject(f"held{k}", rng), expr, 20000))
    return out


def test_full_model_fits_unseen_faces_best(model, heldout_scans):
    """Table 2 shape: the full model beats truncated shape / expression bases on NME and ARMSE."""
    models = {"full": model, "shape_10": truncate(model, 10, model.n_expression),
              "expr_5": truncate(model, model.n_shape, 5), "both": truncate(model, 10, 5)}
    scores = {}
    for name, m in models.items():
        vals = []
        for g in heldout_scans:
            r = fit(m, g.vertices, g.faces, g.landmarks)
            a = armse(r.vertices, m.faces, g.vertices, g.faces, r.landmarks, g.landmarks)
            vals.append((nme(r.landmarks, g.landmarks), a.armse[0.6]))
        scores[name] = np.mean(vals, axis=0)
    full = scores.pop("full")
    assert full[0] < 0.003 and full[1] < 0.004          # NME < 0.3 %, ARMSE(0.6) < 0.4 % of the IOD
    for name, other in scores.items():
        assert full[0] < other[0] and full[1] < other[1], (name, other, full)


def test_fit_bad_inputs(model, instance_scan):
    scan, F, lms, _, _ = instance_scan
    with pytest.raises(ValueError, match="scan_landmarks"):
        fit(model, scan, F, lms[:100])
    bad = lms.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        fit(model, scan, F, bad)
    with pytest.raises(ValueError, match="scan_faces"):
        fit(model, scan, F + scan.shape[0], lms)
    with pytest.raises(ValueError, match="scan_vertices"):
        fit(model, scan[:, :2], F, lms)
    with pytest.raises(ValueError, match="model"):
        fit("model", scan, F, lms)
    with pytest.raises(ValueError, match="params"):
        fit(model, scan, F, lms, params={"dense_reg": 1})
    for kw in ({"dense_reg": 0.0}, {"dense_max_distance_mm": (5.0, -1.0)}, {"dense_subsample": 0},
               {"max_normal_angle_deg": 200.0}, {"landmark_iterations": 0}):
        with pytest.raises(ValueError, match="FitParams"):
            FitParams(**kw)


def test_fit_reports_too_few_correspondences(model, instance_scan):
    scan, F, lms, _, _ = instance_scan
    far = scan + [0.0, 0.0, 50.0]                     # landmarks 50 mm away from the surface
    res = fit(model, far, F, lms, replace(MAP, dense_max_distance_mm=(2.0,)))
    assert not res.converged and res.iterations[-1].n_correspondences < MAP.min_correspondences
    assert FT.FitIteration is type(res.iterations[-1])


def test_fit_with_mean_only_and_rigid_settings(model, instance_scan):
    scan, F, lms, truth, _ = instance_scan
    mean_only = fit(truncate(model, 0, 0), scan, F, lms)     # pose-only fit of the mean shape
    assert mean_only.shape_coeffs.size == 0 and mean_only.expr_coeffs.size == 0
    full = fit(model, scan, F, lms, replace(MAP, fit_scale=False))
    assert full.scale == 1.0
    err = lambda r: np.linalg.norm(r.vertices - truth, axis=1).mean()   # noqa: E731
    assert err(full) < 0.15 < 1.0 < err(mean_only)
