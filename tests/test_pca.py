"""Exact PCA (kernels/pca.py, tasks/pca.py) against a full SVD and against the face generator's truth."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.linalg import subspace_angles

from kernels.pca import (PCAResult, column_block_gram, components_block, exact_pca, pca_from_gram,
                         project, reconstruct)
from kernels.synth.face import (K_TOTAL, face_region, identity_basis, sample_subject, subject_coefficients,
                                surface_points, uv_grid)
from tasks.pca import column_groups, exact_pca_dask, project_dask


def _data(n, d, decay=20.0, offset=100.0, seed=0, dtype=np.float64, rank=None, noise=0.0):
    """Rows with a decaying, non-degenerate spectrum (optionally of rank ``rank`` + noise), mesh-like offset."""
    g = np.random.default_rng(seed)
    r = min(n, d) if rank is None else rank
    A = g.standard_normal((n, r)) * np.geomspace(decay, 1.0, r)
    Q = np.linalg.qr(g.standard_normal((d, r)))[0]
    return (offset * g.uniform(-1, 1, d) + A @ Q.T + noise * g.standard_normal((n, d))).astype(dtype)


def _svd_reference(X, k):
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    return s[:k] ** 2 / (X.shape[0] - 1), Vt[:k].T, s ** 2 / (X.shape[0] - 1)


def _check_against_svd(r: PCAResult, X, k):
    var, V, allvar = _svd_reference(X, k)
    assert r.n_components == k and r.truncated_reason is None
    rel = np.max(np.abs(r.variances / var - 1))
    ang = np.degrees(subspace_angles(r.components, V).max())
    assert rel <= 1e-6, rel
    assert ang <= 0.01, ang
    # each component individually (the spectrum is non-degenerate), orthonormal, signs as documented
    assert np.abs(np.abs(np.sum(r.components * V, axis=0)) - 1).max() < 1e-8
    assert np.abs(r.components.T @ r.components - np.eye(k)).max() < 1e-10
    idx = np.argmax(np.abs(r.components), axis=0)
    assert np.all(r.components[idx, np.arange(k)] > 0)
    np.testing.assert_allclose(r.mean, np.asarray(X, dtype=np.float64).mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.total_variance, allvar.sum(), rtol=1e-10)
    np.testing.assert_allclose(r.explained_ratio, var / allvar.sum(), rtol=1e-6)
    return rel, ang


@pytest.mark.parametrize("n, d, k, solver, dtype", [
    (50, 400, 20, "eigh", np.float64),      # wide (the mesh case)
    (120, 30, 10, "auto", np.float64),      # tall: d < n
    (60, 500, 59, "auto", np.float32),      # float32 input, every component (k = n - 1)
    (400, 1200, 40, "krylov", np.float64),  # block Krylov solver (steeply decaying spectrum)
])
def test_exact_pca_matches_full_svd(n, d, k, solver, dtype):
    X = _data(n, d, dtype=dtype, decay=1e12 if solver == "krylov" else 20.0)
    X0 = X.copy()
    r = exact_pca(X, k, solver=solver, block_cols=97)
    np.testing.assert_array_equal(X, X0)  # input untouched
    _check_against_svd(r, X, k)
    assert r.solver == ("krylov" if solver == "krylov" else "eigh")


def test_krylov_and_eigh_agree_and_signs_are_deterministic():
    X = _data(400, 1200, decay=1e12, seed=3)
    a = exact_pca(X, 30, solver="krylov")
    b = exact_pca(X, 30, solver="eigh")
    c = exact_pca(X[::-1], 30, solver="krylov", rng=7)  # rows permuted, another start block
    assert a.solver == "krylov" and b.solver == "eigh"
    for other in (b, c):
        np.testing.assert_allclose(other.variances, a.variances, rtol=1e-10)
        np.testing.assert_allclose(other.components, a.components, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n, d, k, solver", [(60, 500, 20, "eigh"), (400, 1200, 40, "krylov")])
def test_mixed_precision_matches_full_svd_with_certificate(n, d, k, solver):
    # like the benchmark: rank 80 with a 10:1 spread of standard deviations, plus noise
    X = _data(n, d, dtype=np.float32, decay=10.0, rank=80, noise=0.02, seed=11)
    r = exact_pca(X, k, precision="mixed", solver=solver, block_cols=128)
    assert r.solver.startswith(f"mixed: float32 Gram matrix ({solver}"), r.solver  # certified, no fallback
    _check_against_svd(r, X, k)
    d64 = exact_pca(X, k)
    np.testing.assert_allclose(r.variances, d64.variances, rtol=1e-9)
    assert np.degrees(subspace_angles(r.components, d64.components).max()) < 1e-4


def _exact_spectrum(n, d, var, seed=4, offset=3.0):
    """Rows whose centred sample variances are exactly ``var`` (orthonormal scores and directions)."""
    g = np.random.default_rng(seed)
    r = len(var)
    U = g.standard_normal((n, r))
    U = np.linalg.qr(U - U.mean(axis=0))[0]               # orthonormal, orthogonal to the ones vector
    W = np.linalg.qr(g.standard_normal((d, r)))[0]
    return offset + np.sqrt(np.asarray(var) * (n - 1)) * U @ W.T


def test_mixed_precision_low_rank_and_fallback():
    g = np.random.default_rng(12)
    low = g.standard_normal((40, 3)) @ g.standard_normal((3, 500)) + 7.0  # rank 3
    r = exact_pca(low, 10, precision="mixed")
    ref = exact_pca(low, 10)
    assert r.n_components == 3 and "numerical rank 3" in r.truncated_reason
    np.testing.assert_allclose(r.variances, ref.variances, rtol=1e-10)
    np.testing.assert_allclose(r.components, ref.components, atol=1e-8)
    # a plateau of equal variances across the cut k: the top-k subspace is not determined, the
    # Rayleigh-Ritz certificate (gap to the rest) fails and the float64 computation runs instead
    var = np.r_[100.0, 50.0, np.ones(40)]
    X = _exact_spectrum(200, 300, var)
    r = exact_pca(X, 10, precision="mixed")
    assert "not certified" in r.solver, r.solver
    np.testing.assert_allclose(r.variances, var[:10], rtol=1e-9)


def test_block_functions_compose():
    X = _data(30, 200, seed=1)
    mu = X.mean(axis=0)
    G = np.zeros((30, 30), order="F")
    for j0 in range(0, 200, 64):
        out = column_block_gram(X[:, j0:j0 + 64], mu[j0:j0 + 64], out=G)
        assert out is G
    Xc = X - mu
    np.testing.assert_allclose(np.tril(G), np.tril(Xc @ Xc.T), rtol=1e-12, atol=1e-9)
    assert np.all(np.triu(G, 1) == 0)  # the strict upper triangle is never written
    # a block's own means are exact (it holds every row)
    np.testing.assert_allclose(np.tril(column_block_gram(X[:, :64])), np.tril(Xc[:, :64] @ Xc[:, :64].T), atol=1e-9)
    # pca_from_gram reads only the lower triangle: garbage above the diagonal is ignored
    G2 = G.copy()
    G2[np.triu_indices(30, 1)] = np.nan
    eig = pca_from_gram(G2, 5, n_features=200)
    V = np.vstack([components_block(X[:, j0:j0 + 64], mu[j0:j0 + 64], eig) for j0 in range(0, 200, 64)])
    var, Vref, _ = _svd_reference(X, 5)
    np.testing.assert_allclose(eig.eigenvalues / 29, var, rtol=1e-10)
    assert np.degrees(subspace_angles(V, Vref).max()) < 1e-6
    with pytest.raises(ValueError, match="out"):
        column_block_gram(X[:, :10], out=np.zeros((30, 30)))  # C order


def test_rank_truncation_is_reported_not_raised():
    g = np.random.default_rng(2)
    few = g.standard_normal((6, 300))
    r = exact_pca(few, 10)
    assert r.n_components == 5 and r.n_requested == 10
    assert "n_samples - 1 = 5" in r.truncated_reason
    low = g.standard_normal((40, 3)) @ g.standard_normal((3, 500)) + 7.0  # rank 3 after centring
    r = exact_pca(low, 10)
    assert r.n_components == 3 and r.rank == 3
    assert "numerical rank 3" in r.truncated_reason
    assert r.n_components_99 is not None and r.n_components_99 <= 3
    flat = np.ones((5, 12))
    r = exact_pca(flat, 2)
    assert r.n_components == 0 and "zero variance" in r.truncated_reason and r.components.shape == (12, 0)


def test_n_components_99_known_spectrum():
    var = np.array([80.0, 15.0, 4.5, 0.5])
    X = _exact_spectrum(50, 40, var)
    r = exact_pca(X, 4)
    np.testing.assert_allclose(r.variances, var, rtol=1e-10)
    np.testing.assert_allclose(np.cumsum(r.explained_ratio), [0.8, 0.95, 0.995, 1.0], rtol=1e-10)
    assert r.n_components_99 == 3
    assert exact_pca(X, 2).n_components_99 is None  # 95% < 99% within the returned components


def test_project_reconstruct_round_trip():
    X = _data(20, 90, seed=5)
    r = exact_pca(X, 19)
    C = project(X, r)
    np.testing.assert_allclose(C.var(axis=0, ddof=1), r.variances, rtol=1e-9)
    np.testing.assert_allclose(reconstruct(C, r), X, atol=1e-9)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 5)), "at least 2 samples"),
    (np.zeros(5), "2-D"),
    (np.zeros((3, 4, 2)), "2-D"),
    (np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 0.0]]), "1 NaN"),
])
def test_bad_input_raises_naming_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        exact_pca(bad, 1)


def test_bad_parameters_raise():
    X = _data(10, 20)
    for k in (0, True, 2.5):
        with pytest.raises(ValueError, match="n_components"):
            exact_pca(X, k)
    with pytest.raises(ValueError, match="solver"):
        exact_pca(X, 2, solver="svd")
    with pytest.raises(ValueError, match="precision"):
        exact_pca(X, 2, precision="single")
    with pytest.raises(ValueError, match="square"):
        pca_from_gram(np.zeros((3, 4)), 1)


# -- out of core (dask) -----------------------------------------------------------------------

def test_column_groups_merge_chunks_up_to_budget():
    assert column_groups((100, 100, 100, 50), 10, 16e-3) == [(0, 200), (200, 350)]  # 200 cols x 10 rows x 8 B
    assert column_groups((500, 10), 10, 1e-3) == [(0, 500), (500, 510)]            # a wide chunk stays whole


def test_dask_synchronous_matches_svd_and_in_memory():
    X = _data(80, 700, dtype=np.float32, seed=6)
    x = da.from_array(X, chunks=(30, 128))  # row chunks too: merged per column block
    with dask.config.set(scheduler="synchronous"):
        r = exact_pca_dask(x, 25, block_mb=0.2)
        C = project_dask(x, r, 10).compute()
        rm = exact_pca_dask(x, 25, block_mb=0.2, precision="mixed", prefetch=0)
    _check_against_svd(r, X, 25)
    _check_against_svd(rm, X, 25)
    assert rm.solver.startswith("mixed")
    ref = exact_pca(X, 25)
    np.testing.assert_allclose(r.components, ref.components, atol=1e-9)
    np.testing.assert_allclose(C, project(X, ref, 10), atol=1e-8)


def test_dask_nan_block_is_named():
    X = _data(10, 300)
    X[3, 250] = np.nan
    with dask.config.set(scheduler="synchronous"), pytest.raises(ValueError, match=r"X\[:, 2\d\d:300\].*1 NaN"):
        exact_pca_dask(da.from_array(X, chunks=(10, 50)), 3, block_mb=1e-3)


def test_dask_distributed_local_cluster_matches_svd():
    distributed = pytest.importorskip("distributed")
    X = _data(60, 900, seed=8)
    # worker processes on 127.0.0.1: the graph (blocks, eigenpairs) really goes through serialisation
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        r = exact_pca_dask(da.from_array(X, chunks=(60, 200)), 30, block_mb=0.2)
        C = project_dask(da.from_array(X, chunks=(60, 200)), r).compute()
    _check_against_svd(r, X, 30)
    np.testing.assert_allclose(C, project(X, r), atol=1e-8)


# -- the face generator's truth -----------------------------------------------------------------

def _subjects_meshes(n_subjects, uv, seed=0):
    """GT neutral meshes at material points uv (template topology), rows flattened (v*3,)."""
    B = identity_basis(uv)                                 # (v, 3, K_TOTAL)
    C = np.array([subject_coefficients(sample_subject(f"s{i:04d}", seed * 100_000 + i)) for i in range(n_subjects)])
    mean0 = surface_points(sample_subject("s0000", seed * 100_000), "neutral", uv) - B @ C[0]  # generator mean
    X = (mean0[None] + np.einsum("vck,sk->svc", B, C)).reshape(n_subjects, -1)
    return X, B.reshape(-1, K_TOTAL)


@pytest.fixture(scope="module")
def face_uv():
    uv, _ = uv_grid(6000)
    return uv[face_region(uv)]                              # ~3000 material points in the inner face


def test_generator_identity_subspace_recovered(face_uv):
    X, B = _subjects_meshes(300, face_uv)
    # the exact-neutral construction matches the generator's surface
    subj = sample_subject("s0007", 7)
    np.testing.assert_allclose(X[7].reshape(-1, 3), surface_points(subj, "neutral", face_uv), atol=1e-9)
    true_rank = np.linalg.matrix_rank(B)                   # 50: two of the 52 modes vanish in the face region
    r = exact_pca(X, K_TOTAL)
    assert r.n_components == true_rank and f"numerical rank {true_rank}" in r.truncated_reason
    ang = np.degrees(subspace_angles(r.components, B)).max()
    assert ang <= 5.0, ang
    # With 0.05 mm of i.i.d. noise per coordinate (about the pipeline's fused-mesh error) the weakest
    # generator directions (rms 0.007 mm per point) drown in the noise, so only the strong part of the
    # span is recoverable: the 30 strongest directions of the true span lie within 5 degrees.
    g = np.random.default_rng(1)
    rn = exact_pca(X + g.normal(0, 0.05, X.shape), int(true_rank))
    Ub = np.linalg.svd(B, full_matrices=False)[0]
    ang30 = np.degrees(subspace_angles(rn.components, Ub[:, :30])).max()
    assert ang30 <= 5.0, ang30
    print(f"max principal angle: GT {ang:.2e} deg (rank {true_rank}); +0.05 mm noise: strongest 30 "
          f"{ang30:.2f} deg, all {true_rank} {np.degrees(subspace_angles(rn.components, B)).max():.1f} deg")


def test_generator_full_grid_rank_52_via_dask():
    uv, _ = uv_grid(2000)                                  # the whole parametrised head: all 52 modes act
    X, B = _subjects_meshes(260, uv, seed=1)
    with dask.config.set(scheduler="synchronous"):
        r = exact_pca_dask(da.from_array(X, chunks=(260, 1024)), K_TOTAL)
    assert r.n_components == K_TOTAL and r.truncated_reason is None
    ang = np.degrees(subspace_angles(r.components, B)).max()
    assert ang <= 5.0, ang
    print(f"max principal angle, whole head grid, rank {K_TOTAL}: {ang:.2e} deg")


def test_too_few_subjects_fewer_components_with_reason(face_uv):
    X, _ = _subjects_meshes(20, face_uv, seed=2)
    r = exact_pca(X, K_TOTAL)
    assert r.n_components == 19
    assert r.truncated_reason == ("requested 52 components but the centred data has rank <= 19 "
                                  "(n_samples - 1 = 19)")
    assert r.n_components_99 is not None  # all variance is in the 19 returned components


@pytest.mark.parametrize("precision", ["double", "mixed"])
def test_uncentred_pca_matches_svd_of_raw_rows(precision):
    X = _data(70, 400, offset=0.0, seed=13, rank=30, decay=10.0, noise=0.01)  # e.g. expression residuals
    with dask.config.set(scheduler="synchronous"):
        r = exact_pca_dask(da.from_array(X, chunks=(70, 128)), 20, center=False, precision=precision)
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    assert not r.centered and np.all(r.mean == 0)
    np.testing.assert_allclose(r.variances, s[:20] ** 2 / 70, rtol=1e-6)
    np.testing.assert_allclose(r.total_variance, (s ** 2).sum() / 70, rtol=1e-10)
    assert np.degrees(subspace_angles(r.components, Vt[:20].T).max()) <= 0.01
    np.testing.assert_allclose(reconstruct(project(X, r), r), X @ r.components @ r.components.T, atol=1e-9)
    few = exact_pca(X[:5], 10, center=False)  # rank bound n (not n - 1) without centring
    assert few.n_components == 5 and "n_samples = 5" in few.truncated_reason
