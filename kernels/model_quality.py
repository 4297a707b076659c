"""Quality of a linear (PCA) shape model: compactness, generalisation, specificity, subspace angles.

The standard measures of statistical shape models (Styner et al. 2003; Davies et al. 2008; as in
the LSFM and BFM papers), for models whose rows are flattened meshes in corresponding
(template) topology, ``x = (v_0x, v_0y, v_0z, v_1x, ...)`` in mm:

* **compactness** ``C(k)``: fraction of the total variance captured by the first ``k``
  components (higher is better);
* **generalisation** ``G(k)``: held-out meshes projected onto the first ``k`` components
  and reconstructed; the error of a mesh is its **mean per-vertex Euclidean distance** (mm)
  to its reconstruction; ``G(k)`` is the mean over the held-out meshes (lower is better);
* **specificity** ``S(k)``: random model instances ``mean + V_k c`` with ``c ~ N(0,
  diag(variances[:k]))`` (a seeded draw; the same standard-normal draws are reused for every
  ``k``); the error of an instance is its mean per-vertex distance to the **nearest training
  mesh under that same distance** (exhaustive search); ``S(k)`` is the mean over instances
  (lower is better);
* **principal angles** between two subspaces (degrees), e.g. a learned identity subspace and a
  generator's true one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import subspace_angles

from kernels._checks import as_array, as_rng, check_int
from kernels.pca import PCAResult

__all__ = ["QualityCurve", "compactness", "generalisation", "specificity", "principal_angles_deg",
           "per_vertex_errors"]


@dataclass(frozen=True)
class QualityCurve:
    """A quality measure against the number of components.

    Attributes
    ----------
    n_components : (m,) int64
        The ``k`` evaluated, ascending.
    mean_mm : (m,) float64
        The measure at each ``k`` (mean over meshes of the mean per-vertex error, mm).
    std_mm : (m,) float64
        Standard deviation over meshes of the per-mesh error (mm).
    n_meshes : int
        Meshes (held-out meshes, or random instances) averaged over.
    """

    n_components: np.ndarray
    mean_mm: np.ndarray
    std_mm: np.ndarray
    n_meshes: int


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _check_model(model) -> PCAResult:
    if not isinstance(model, PCAResult):
        raise ValueError(f"model: expected a PCAResult, got {type(model).__name__}")
    if model.n_features % 3:
        raise ValueError(f"model: rows must be flattened (v, 3) meshes, got {model.n_features} features "
                         "(not a multiple of 3)")
    return model


def _ks(n_components, k_max: int) -> np.ndarray:
    if n_components is None:
        return np.arange(k_max + 1)
    ks = np.asarray(n_components)
    if ks.ndim == 0:
        ks = ks[None]
    if ks.ndim != 1 or ks.size == 0 or not np.issubdtype(ks.dtype, np.integer):
        raise ValueError(f"n_components: expected a non-empty 1-D sequence of integers, got {n_components!r}")
    if ks.min() < 0 or ks.max() > k_max:
        raise ValueError(f"n_components: values must be in [0, {k_max}] (the model's components), got "
                         f"{ks.min()}..{ks.max()}")
    return np.unique(ks.astype(np.int64))


def per_vertex_errors(A, B) -> np.ndarray:
    """Mean per-vertex Euclidean distance between rows of ``A`` and ``B`` (flattened meshes).

    Parameters
    ----------
    A, B : (m, 3 v) array_like of float
        Rows are flattened (v, 3) meshes in the same topology (mm); ``B`` may also be a single
        (3 v,) row, broadcast against every row of ``A``.

    Returns
    -------
    (m,) float64
        ``mean_v ||A_i[v] - B_i[v]||`` in mm.

    Raises
    ------
    ValueError
        Shapes that differ or are not multiples of 3, NaN values.
    """
    A = as_array(A, "A", (None, None), finite=True)
    B = as_array(B, "B", finite=True)
    if A.shape[1] % 3:
        raise ValueError(f"A: rows must be flattened (v, 3) meshes, got {A.shape[1]} columns (not a multiple of 3)")
    if B.shape not in (A.shape, (A.shape[1],)):
        raise ValueError(f"B: expected shape {A.shape} or ({A.shape[1]},), got {B.shape}")
    return _pv(A - B)


def _pv(R: np.ndarray) -> np.ndarray:
    m = R.shape[0]
    return np.sqrt(np.square(R).reshape(m, -1, 3).sum(axis=2)).mean(axis=1)


def compactness(variances, total_variance: float | None = None) -> np.ndarray:
    """Cumulative fraction of the total variance explained by the first ``k`` components.

    Parameters
    ----------
    variances : (K,) array_like of float
        Component variances, descending (mm^2), all >= 0.
    total_variance : float or None
        Total variance of the data (all components, mm^2); ``None``: ``sum(variances)`` (the
        curve then ends at 1).

    Returns
    -------
    (K,) float64
        ``C[k - 1] = sum(variances[:k]) / total_variance`` for k = 1..K.

    Raises
    ------
    ValueError
        Not 1-D, negative or NaN variances, a total that is <= 0 or smaller than their sum.
    """
    v = as_array(variances, "variances", (None,), finite=True)
    if np.any(v < 0):
        raise ValueError(f"variances: must be >= 0, got min {v.min()}")
    total = float(v.sum()) if total_variance is None else float(total_variance)
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"total_variance: must be a finite number > 0, got {total_variance!r}")
    if v.sum() > total * (1 + 1e-9):
        raise ValueError(f"total_variance: {total} is smaller than the sum of the variances {v.sum()}")
    return np.cumsum(v) / total


def generalisation(model: PCAResult, X_test, n_components=None) -> QualityCurve:
    """Reconstruction error of held-out meshes against the number of components.

    Parameters
    ----------
    model : PCAResult
        Rows of its training data were flattened (v, 3) meshes (mm).
    X_test : (m, 3 v) array_like of float
        Held-out meshes, same topology, m >= 1.
    n_components : sequence of int or None
        The ``k`` to evaluate (each in [0, model.n_components]); ``None``: every k from 0
        (the mean alone) to ``model.n_components``.

    Returns
    -------
    QualityCurve
        ``mean_mm[i]``: mean over test meshes of the mean per-vertex distance between the
        mesh and ``mean + V_k V_k^T (x - mean)``.

    Raises
    ------
    ValueError
        Column count differing from the model's, NaN values, bad ``n_components``.
    """
    model = _check_model(model)
    X = as_array(X_test, "X_test", (None, model.n_features), finite=True)
    if X.shape[0] == 0:
        raise ValueError("X_test: needs at least one mesh (row), got 0")
    ks = _ks(n_components, model.n_components)
    V = model.components
    R = X - model.mean
    C = R @ V[:, :int(ks[-1])]
    mean, std, done = np.empty(ks.size), np.empty(ks.size), 0
    for i, k in enumerate(ks):
        if k > done:
            R -= C[:, done:k] @ V[:, done:k].T   # R is now x - reconstruction with k components
            done = int(k)
        e = _pv(R)
        mean[i], std[i] = e.mean(), e.std()
    return QualityCurve(_ro(ks), _ro(mean), _ro(std), int(X.shape[0]))


def _nearest_mean_error(S: np.ndarray, T: np.ndarray, batch: int) -> np.ndarray:
    """For each row of S, the smallest mean per-vertex distance to a row of T (exhaustive)."""
    best = np.full(S.shape[0], np.inf)
    for t0 in range(0, T.shape[0], batch):
        Tb = T[t0:t0 + batch]
        for i in range(S.shape[0]):
            best[i] = min(best[i], float(_pv(Tb - S[i]).min()))
    return best


def specificity(model: PCAResult, X_train, n_components=None, *, n_samples: int = 100, rng=0,
                batch: int = 64) -> QualityCurve:
    """Distance of random model instances to the nearest training mesh, against ``k``.

    Parameters
    ----------
    model : PCAResult
    X_train : (t, 3 v) array_like of float
        The training meshes (t >= 1), same topology as the model (mm).
    n_components : sequence of int or None
        The ``k`` to evaluate (each in [0, model.n_components]); ``None``: 1, 2, 5, 10, 20,
        50, 100, 200, ... up to and including ``model.n_components``.
    n_samples : int
        Random instances per ``k`` (default 100).
    rng : int or numpy.random.Generator
        Seed of the instances (default 0). One (n_samples, K) standard-normal draw ``z`` is
        made and instance ``j`` at ``k`` is ``mean + V_k (sqrt(variances[:k]) * z[j, :k])``.
    batch : int
        Training meshes compared at once (memory ``batch * 3 v`` floats; default 64).

    Returns
    -------
    QualityCurve
        ``mean_mm[i]``: mean over instances of ``min_t mean_v ||s[v] - x_t[v]||``.

    Raises
    ------
    ValueError
        Column count differing from the model's, NaN values, no training mesh, bad
        ``n_components`` / ``n_samples`` / ``batch``.

    Notes
    -----
    Cost ``len(n_components) * n_samples * t * 3 v`` flops-ish (exhaustive nearest search
    under the per-vertex distance): about 2e10 for 100 instances, 600 training meshes of 30k
    vertices, per ``k``.
    """
    model = _check_model(model)
    T = as_array(X_train, "X_train", (None, model.n_features), finite=True)
    if T.shape[0] == 0:
        raise ValueError("X_train: needs at least one mesh (row), got 0")
    K = model.n_components
    if n_components is None:
        grid = [k for e in range(0, 7) for k in (10 ** e, 2 * 10 ** e, 5 * 10 ** e) if k < K] + [K]
        n_components = sorted(set(grid))
    ks = _ks(n_components, K)
    ns = check_int(n_samples, "n_samples", 1)
    b = check_int(batch, "batch", 1)
    z = as_rng(rng).standard_normal((ns, K))
    coef = z * np.sqrt(model.variances)
    mean, std = np.empty(ks.size), np.empty(ks.size)
    for i, k in enumerate(ks):
        S = model.mean + coef[:, :k] @ model.components[:, :k].T
        e = _nearest_mean_error(S, T, b)
        mean[i], std[i] = e.mean(), e.std()
    return QualityCurve(_ro(ks), _ro(mean), _ro(std), ns)


def principal_angles_deg(A, B) -> np.ndarray:
    """Principal angles between the column spaces of ``A`` and ``B``, in degrees.

    Parameters
    ----------
    A : (d, p) array_like of float
    B : (d, q) array_like of float
        Any spanning columns (orthonormalised internally; numerically dependent columns are
        dropped, so a rank-deficient basis gives its range's angles).

    Returns
    -------
    (min(rank A, rank B),) float64
        Angles in [0, 90] degrees, **largest first** (``scipy.linalg.subspace_angles``, which
        is accurate for small angles).

    Raises
    ------
    ValueError
        Not 2-D, row counts differing, NaN values.
    """
    A = as_array(A, "A", (None, None), finite=True)
    B = as_array(B, "B", (A.shape[0], None), finite=True)
    if A.shape[1] == 0 or B.shape[1] == 0:
        return np.zeros(0)
    return np.degrees(subspace_angles(A, B))
