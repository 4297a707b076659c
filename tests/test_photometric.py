"""kernels.photometric: skin colour detail and the texture flow, against exact shifts.

A textured plane (z = 0; colour = albedo (1 + detail(x, y)) times a smooth shading ramp) is
scanned twice: the second time the skin has slid by a known (dx, dy) and the light has
changed. A template grid mesh sees the first scan's detail as its reference; the flow on
the second scan must recover the slide.
"""

import numpy as np
import pytest

from kernels.photometric import ScanTexture, PhotometricParams, flow_grid, texture_flow
from kernels.synth.face import skin_detail
from kernels.synth.face_params import FaceModelParams


def _detail(x, y, seed=3):
    """The simulator's skin detail, used as a function of plane coordinates (mm)."""
    # skin_detail takes (theta, phi) in degrees on the face sphere; any smooth map will do here
    from kernels.synth.face_geometry import RF
    return skin_detail(np.degrees(x / RF), np.degrees(y / RF), seed)


def _plane_scan(shift=(0.0, 0.0), shading=(0.0, 0.0), spacing=0.5, half=40.0, noise=0.0, rng=0):
    g = np.arange(-half, half + 1e-9, spacing)
    X, Y = np.meshgrid(g, g)
    x, y = X.ravel(), Y.ravel()
    P = np.column_stack([x, y, np.zeros_like(x)])
    a = 0.55 * (1.0 + _detail(x - shift[0], y - shift[1]))
    s = 1.0 + shading[0] * x / half + shading[1] * y / half      # light falling off across the plane
    c = np.clip(a * s * (1.0 + np.random.default_rng(rng).normal(0.0, noise, a.shape)), 0, 1)
    return P, np.repeat(c[:, None], 3, axis=1)


def _grid_mesh(half=30.0, spacing=2.0):
    g = np.arange(-half, half + 1e-9, spacing)
    n = len(g)
    X, Y = np.meshgrid(g, g)
    V = np.column_stack([X.ravel(), Y.ravel(), np.zeros(n * n)])
    i = np.arange(n - 1)
    I, J = np.meshgrid(i, i, indexing="ij")
    a = (I * n + J).ravel()
    F = np.concatenate([np.column_stack([a, a + 1, a + n + 1]), np.column_stack([a, a + n + 1, a + n])])
    return V, F


def test_skin_detail_statistics_and_determinism():
    p = FaceModelParams()
    td, pd = np.meshgrid(np.linspace(-60, 60, 300), np.linspace(-50, 45, 300))
    d = skin_detail(td, pd, 7, p)
    assert d.shape == td.shape
    assert abs(d.std() - p.skin_detail) < 0.25 * p.skin_detail, d.std()
    assert abs(d.mean()) < 0.02
    assert np.array_equal(d, skin_detail(td, pd, 7, p))
    assert not np.allclose(d, skin_detail(td, pd, 8, p))
    assert np.all(skin_detail(td, pd, 7, FaceModelParams(skin_detail=0.0)) == 0)
    with pytest.raises(ValueError, match="skin_detail"):
        FaceModelParams(skin_detail=0.5)
    with pytest.raises(ValueError, match="skin_detail_wavelength_mm"):
        FaceModelParams(skin_detail_wavelength_mm=(5.0, 2.0))


def test_detail_is_independent_of_shading_and_exposure():
    P, C = _plane_scan()
    _, C2 = _plane_scan(shading=(0.3, -0.2))
    t1, t2 = ScanTexture(P, C), ScanTexture(P, 0.6 * C2)       # other light, darker exposure
    q = np.column_stack([np.linspace(-25, 25, 200), np.linspace(-20, 20, 200), np.zeros(200)])
    d1, d2 = t1.sample(q), t2.sample(q)
    assert np.isfinite(d1).all() and np.isfinite(d2).all()
    assert np.std(d1) > 0.04                                     # the detail survives
    assert np.max(np.abs(d1 - d2)) < 0.01, np.max(np.abs(d1 - d2))
    # far from the scan: NaN
    assert np.isnan(t1.sample(np.array([[0.0, 0.0, 5.0]]))).all()
    # the detail's robust spread: the texture's, against camera noise alone on even skin
    flat = np.clip(0.5 * (1.0 + np.random.default_rng(3).normal(0, 0.005, C.shape)), 0, 1)
    assert 0.05 < t1.detail_std < 0.1 and ScanTexture(P, flat).detail_std < 0.005, t1.detail_std


@pytest.mark.parametrize("shift", [(3.0, -2.0), (0.0, 4.5), (-1.2, 0.7)])
def test_flow_recovers_a_known_slide(shift):
    V, F = _grid_mesh()
    P0, C0 = _plane_scan(noise=0.01, rng=1)
    ref = ScanTexture(P0, C0).sample(V)
    P1, C1 = _plane_scan(shift=shift, shading=(0.25, 0.1), noise=0.01, rng=2)
    fl = texture_flow(V, F, ref, ScanTexture(P1, C1), PhotometricParams(), up=(0.0, 1.0, 0.0))
    inner = np.all(np.abs(V[:, :2]) < 20.0, axis=1)
    m = fl.matched & inner
    assert m.sum() >= 0.9 * (inner & np.isin(np.arange(len(V)), fl.grid)).sum(), m.sum()
    err = np.linalg.norm(fl.displacement[m] - np.array([shift[0], shift[1], 0.0]), axis=1)
    assert np.median(err) < 0.15 and np.percentile(err, 95) < 0.4, (np.median(err), np.percentile(err, 95))
    assert np.all(fl.displacement[~fl.matched] == 0)


def test_flow_rejects_a_textureless_scan_and_a_slide_beyond_the_window():
    V, F = _grid_mesh()
    P0, C0 = _plane_scan()
    ref = ScanTexture(P0, C0).sample(V)
    flat = np.full_like(C0, 0.5)
    flat *= 1.0 + np.random.default_rng(0).normal(0, 0.01, flat.shape)     # noise only
    fl = texture_flow(V, F, ref, ScanTexture(P0, flat), PhotometricParams())
    assert fl.matched.mean() < 0.05, fl.matched.mean()
    P1, C1 = _plane_scan(shift=(12.0, 0.0))                                 # twice the 6 mm window
    fl = texture_flow(V, F, ref, ScanTexture(P1, C1), PhotometricParams())
    inner = np.all(np.abs(V[:, :2]) < 20.0, axis=1)
    wrong = fl.matched & inner & (np.linalg.norm(fl.displacement - [12.0, 0, 0], axis=1) > 1.0)
    assert wrong.sum() <= 0.1 * (inner & np.isin(np.arange(len(V)), fl.grid)).sum(), wrong.sum()


def test_flow_grid_spacing():
    V, _ = _grid_mesh(spacing=0.5)
    g = flow_grid(V, 2.0)
    assert np.all(np.diff(g) > 0)
    from scipy.spatial import cKDTree
    d, _ = cKDTree(V[g]).query(V[g], k=2)
    assert d[:, 1].min() >= 1.0 and 0.05 < len(g) / len(V) < 0.08    # one 0.25 mm^2 vertex per 4 mm^2


def test_bad_inputs_raise_naming_the_problem():
    P, C = _plane_scan()
    V, F = _grid_mesh()
    with pytest.raises(ValueError, match="colours: values must be in"):
        ScanTexture(P, C * 3)
    with pytest.raises(ValueError, match="coloured points"):
        ScanTexture(P, np.full_like(C, np.nan))
    with pytest.raises(ValueError, match="colours: expected shape"):
        ScanTexture(P, C[:10])
    t = ScanTexture(P, C)
    with pytest.raises(ValueError, match="reference: expected shape"):
        texture_flow(V, F, np.zeros(3), t)
    with pytest.raises(ValueError, match="texture: expected a ScanTexture"):
        texture_flow(V, F, np.zeros(len(V)), "scan")
    with pytest.raises(ValueError, match="faces: indices"):
        texture_flow(V, F + len(V), np.zeros(len(V)), t)
    with pytest.raises(ValueError, match="up: must not be the zero vector"):
        texture_flow(V, F, np.zeros(len(V)), t, up=(0, 0, 0))
    with pytest.raises(ValueError, match="PhotometricParams.search_mm"):
        PhotometricParams(search_mm=0)
    with pytest.raises(ValueError, match="step_mm"):
        PhotometricParams(step_mm=8.0)
    with pytest.raises(ValueError, match="PhotometricParams.rounds"):
        PhotometricParams(rounds=-1)


def test_numba_sampler_matches_the_numpy_reference():
    P, C = _plane_scan(noise=0.01, rng=4)
    t = ScanTexture(P, C)
    q = np.random.default_rng(5).uniform(-45, 45, (5000, 3)) * [1, 1, 0.03]     # on, near and off the scan
    a, b = t.sample(q, engine="numpy"), t.sample(q, engine="numba")
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.isnan(a).any() and np.isfinite(a).sum() > 1000
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="engine"):
        t.sample(q, engine="gpu")
