"""Model-quality measures (kernels/model_quality.py) on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.model_quality import (compactness, generalisation, per_vertex_errors, principal_angles_deg,
                                   specificity)
from kernels.pca import exact_pca
from kernels.synth.face import face_region, identity_basis, sample_subject, subject_coefficients, uv_grid


def _axis_model(n_vertices=4, variances=(4.0, 1.0), mean_offset=10.0):
    """A PCAResult whose component j moves vertex j along axis j (unit vectors), built from data."""
    d = 3 * n_vertices
    k = len(variances)
    n = 2 * k + 1
    # rows mean +- sqrt(var * (n - 1) / 2) e_j: exact mean, exact sample variances, rank k
    E = np.zeros((k, d))
    for j in range(k):
        E[j, 3 * j + j % 3] = 1.0
    rows = [np.zeros(d)]
    for j, v in enumerate(variances):
        a = np.sqrt(v * (n - 1) / 2)
        rows += [a * E[j], -a * E[j]]
    X = mean_offset + np.array(rows)
    return exact_pca(X, k), E, X


def test_compactness_known():
    np.testing.assert_allclose(compactness([3.0, 2.0, 1.0]), [0.5, 5 / 6, 1.0])
    np.testing.assert_allclose(compactness([3.0, 2.0], total_variance=10.0), [0.3, 0.5])
    with pytest.raises(ValueError, match="total_variance"):
        compactness([3.0, 2.0], total_variance=4.0)
    with pytest.raises(ValueError, match="variances"):
        compactness([1.0, -1.0])


def test_model_from_axis_data():
    m, E, _ = _axis_model()
    np.testing.assert_allclose(m.variances, [4.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(np.abs(m.components.T), E, atol=1e-12)


def test_generalisation_known_errors():
    m, E, _ = _axis_model(n_vertices=4)
    V = 4
    # a held-out mesh: mean + 2 along component 0 (vertex 0) + 3 along component 1 (vertex 1)
    # + 5 on vertex 3 (outside the model): per-vertex errors are exactly known
    off = np.zeros(3 * V)
    off[9 + 2] = 5.0
    x = m.mean + 2 * m.components[:, 0] + 3 * m.components[:, 1] + off
    c = generalisation(m, x[None])
    np.testing.assert_array_equal(c.n_components, [0, 1, 2])
    np.testing.assert_allclose(c.mean_mm, [(2 + 3 + 5) / V, (3 + 5) / V, 5 / V], atol=1e-12)
    np.testing.assert_allclose(c.std_mm, 0, atol=1e-12)
    # two meshes: std over meshes
    c2 = generalisation(m, np.stack([x, m.mean]), n_components=[2])
    np.testing.assert_allclose(c2.mean_mm, [5 / V / 2])
    np.testing.assert_allclose(c2.std_mm, [5 / V / 2])
    with pytest.raises(ValueError, match="n_components"):
        generalisation(m, x[None], n_components=[3])
    with pytest.raises(ValueError, match="X_test"):
        generalisation(m, x[None, :-3])


def test_specificity_known_distribution():
    # one component of variance sigma^2 moving vertex 0; training set = {mean, far-away mesh}
    sigma, V = 2.0, 5
    m, E, _ = _axis_model(n_vertices=V, variances=(sigma ** 2,))
    far = m.mean + 1e3 * m.components[:, 0]
    train = np.stack([m.mean, far])
    s = specificity(m, train, n_components=[0, 1], n_samples=20_000, rng=3)
    assert s.mean_mm[0] == 0.0                                   # k = 0: every instance is the mean
    expected = sigma * np.sqrt(2 / np.pi) / V                     # E|N(0, sigma^2)| / V
    assert abs(s.mean_mm[1] / expected - 1) < 0.02, (s.mean_mm[1], expected)
    assert s.n_meshes == 20_000
    # seeded: same answer twice; the nearest mesh is searched exhaustively (batch size is irrelevant)
    a = specificity(m, train, n_components=[1], n_samples=50, rng=5)
    b = specificity(m, train, n_components=[1], n_samples=50, rng=5, batch=1)
    np.testing.assert_array_equal(a.mean_mm, b.mean_mm)


def test_principal_angles_known():
    t = 30.0
    a = np.array([[1.0], [0.0], [0.0]])
    b = np.array([[np.cos(np.radians(t))], [np.sin(np.radians(t))], [0.0]])
    np.testing.assert_allclose(principal_angles_deg(a, b), [t])
    # planes sharing the x axis, tilted by 40 degrees about it; non-orthonormal spanning columns
    P = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    c = np.radians(40.0)
    Q = np.array([[2.0, 0.0], [0.0, np.cos(c)], [0.0, np.sin(c)]])
    np.testing.assert_allclose(principal_angles_deg(P, Q), [40.0, 0.0], atol=1e-10)
    # tiny angles are resolved (not lost to arccos rounding)
    e = 1e-7
    np.testing.assert_allclose(principal_angles_deg(a, [[1.0], [e], [0.0]]), [np.degrees(e)], rtol=1e-6)


def test_per_vertex_errors_known():
    A = np.zeros((2, 6))
    B = np.array([3.0, 4.0, 0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(per_vertex_errors(A, B), [3.0, 3.0])
    with pytest.raises(ValueError, match="multiple of 3"):
        per_vertex_errors(np.zeros((1, 4)), np.zeros(4))


def test_generalisation_on_generator_reaches_zero_at_its_rank():
    uv, _ = uv_grid(3000)
    uv = uv[face_region(uv)]
    B = identity_basis(uv)
    C = np.array([subject_coefficients(sample_subject(f"q{i}", 500 + i)) for i in range(120)])
    X = np.einsum("vck,sk->svc", B, C).reshape(len(C), -1) + 50.0
    m = exact_pca(X[:100], 60)                            # 100 training subjects, 20 held out
    g = generalisation(m, X[100:])
    assert m.n_components == 50                           # the generator's rank in the face region
    assert np.all(np.diff(g.mean_mm) <= 1e-12)            # more components never hurt
    assert g.mean_mm[-1] < 1e-9 and g.mean_mm[0] > 1.0   # exact at the rank; mm-level with the mean only
    s = specificity(m, X[:100], n_components=[1, 10, 50], n_samples=20, rng=0)
    assert np.all(s.mean_mm > 0) and np.all(np.isfinite(s.mean_mm))
