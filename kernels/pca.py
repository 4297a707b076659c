"""Exact principal component analysis by the Gram (snapshot) method, in blocks.

Paper section 4.2: the shape model is the PCA of ~600 neutral registrations and the
expression model the PCA of ~6000 expression residuals, each row a flattened mesh
(``d = 3 * n_vertices`` up to ~90k). With ``n_samples << d`` the snapshot method is exact
and cheap: for the centred data ``Xc = X - mu`` (n, d),

* ``G = Xc @ Xc.T`` (n, n) is accumulated **over column blocks** of ``X`` in float64
  (:func:`column_block_gram`); a column block holds every row, so its column means are
  known locally and nothing else is needed from the other blocks;
* the top-k eigenpairs ``G U = U diag(lam)`` (:func:`pca_from_gram`) give the variances
  ``lam / (n - 1)`` (the squared singular values of ``Xc`` over ``n - 1``);
* the components ``V = Xc.T @ U / sqrt(lam)`` (d, k) have orthonormal columns and are
  produced block by block too (:func:`components_block`); :func:`assemble_pca` fixes their
  signs and gathers a :class:`PCAResult`.

So the data matrix is read twice, one column block at a time, and the largest array held is
the (n, n) Gram matrix: the out-of-core driver in ``tasks/pca.py`` only streams blocks into
these functions. :func:`exact_pca` is the in-memory convenience for small inputs.

Eigen-decomposition. ``scipy.linalg.eigh`` with ``subset_by_index`` spends its time in the
Householder tridiagonalisation of the whole (n, n) matrix (memory-bound: ~10-30 s at
n = 6000 on this machine). For ``k << n`` the default solver is a **block Krylov (block
Lanczos) Rayleigh-Ritz** iteration with full re-orthogonalisation on ``G`` that stops when
every returned pair satisfies ``||G u - theta u|| <= tol * theta_1`` (a residual
certificate: each returned eigenvalue is then within ``tol * theta_1`` of a true one, and
the error is quadratic in the residual for separated eigenvalues); if it has not converged
within its basis budget it falls back to ``eigh``. Both are exact to float64 rounding; the
result records which one ran.

Rank. The centred data has rank <= ``min(n_samples - 1, n_features)``. Eigenvalues at or
below ``max(n_samples, n_features) * eps * lam_1`` (the float64 rounding level of the Gram
matrix) count as zero. Asking for more components than the rank returns fewer, with
``truncated_reason`` saying why; it is never an error.

Precision. :func:`pca_from_blocks` with ``precision="mixed"`` accumulates the Gram matrix in
float32 (about 2x faster, the dominant cost), then refines its top eigenvectors by one float64
Rayleigh-Ritz step over a second pass (:func:`refine_block`, :func:`rayleigh_ritz`) with a
residual certificate, falling back to the float64 computation when the certificate fails.

Signs. Each component is flipped so that its entry of largest absolute value is positive
(the first such entry on ties), so results are deterministic across solvers and runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.linalg import blas, eigh, qr
from threadpoolctl import threadpool_limits

from kernels._checks import as_array, as_rng, check_int, check_number

__all__ = ["GramEigen", "PCAResult", "column_block_gram", "pca_from_gram", "components_block",
           "refine_block", "rayleigh_ritz", "ritz_components", "assemble_pca", "pca_from_blocks", "exact_pca",
           "project", "reconstruct", "DEFAULT_BLOCK_COLS", "PRECISIONS"]

DEFAULT_BLOCK_COLS = 2048
_EPS = float(np.finfo(np.float64).eps)
_SOLVERS = ("auto", "eigh", "krylov")
_KRYLOV_MIN_N = 1500  # below this, eigh of the whole Gram matrix takes well under a second
MIXED_KRYLOV_TOL = 1e-8
"""Krylov stop (``||G u - theta u|| <= tol * theta_1``) for the float32 Gram matrix of ``"mixed"``:
that matrix differs from the exact one by float32 accumulation error (measured ~2e-8 relative in
the top eigenvalues at 6000 x 90000), so converging its eigenvectors further buys nothing; the
float64 Rayleigh-Ritz step and its certificate decide the result."""


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class GramEigen:
    """Top eigenpairs of a Gram matrix (output of :func:`pca_from_gram`).

    Attributes
    ----------
    eigenvectors : (n, k) float64
        ``U``, orthonormal columns, in the order of ``eigenvalues`` (read-only).
    eigenvalues : (k,) float64
        ``lam``, eigenvalues of ``G`` (sum of squares, not variances), descending, all above
        the rank tolerance (read-only).
    n_samples : int
        ``n``.
    n_features : int
        ``d`` (used for the rank tolerance).
    total_variance : float
        ``trace(G) / (n - 1)``: the sum of the per-feature sample variances.
    rank : int
        Numerical rank of the centred data as far as it was resolved: the number of computed
        eigenvalues above the tolerance. Equal to ``k``; when ``k`` equals the number
        requested, the true rank may be larger.
    n_requested : int
        Components asked for.
    truncated_reason : str or None
        Why ``k < n_requested`` (``None`` when all requested components are returned).
    solver : str
        ``"eigh"``, ``"krylov"``, ``"eigh (krylov did not converge)"`` or
        ``"rayleigh-ritz"`` (:func:`rayleigh_ritz`).
    max_residual : float or None
        ``max ||G u - lam u|| / lam_1`` over the returned pairs for the Krylov solver
        (``None`` for ``eigh``).
    centered : bool
        Whether ``G`` is of centred data (True) or of the raw rows (PCA about zero); sets the
        rank bound (``n - 1`` or ``n``) and the divisor of the variances (``n - 1`` or ``n``).
    """

    eigenvectors: np.ndarray
    eigenvalues: np.ndarray
    n_samples: int
    n_features: int
    total_variance: float
    rank: int
    n_requested: int
    truncated_reason: str | None
    solver: str
    max_residual: float | None = None
    centered: bool = True


@dataclass(frozen=True)
class PCAResult:
    """An exact PCA (output of :func:`exact_pca`, :func:`assemble_pca`).

    Attributes
    ----------
    mean : (d,) float64
        Mean row (mm for meshes).
    components : (d, k) float64
        Principal directions, orthonormal columns, by decreasing variance; the entry of
        largest absolute value of each column is positive.
    variances : (k,) float64
        Sample variance along each component (``lam / (n - 1)``, mm^2 for meshes).
    explained_ratio : (k,) float64
        ``variances / total_variance``.
    n_samples : int
    rank : int
        See :class:`GramEigen` (equal to ``k``).
    total_variance : float
        Sum of all per-feature sample variances (mm^2), i.e. of all n - 1 eigen-variances.
    n_components_99 : int or None
        Smallest number of components explaining >= 99% of ``total_variance``; ``None`` when
        the returned components explain less (the count is larger than ``k``).
    n_requested : int
    truncated_reason : str or None
        Why fewer components than requested were returned.
    solver : str
        Eigen-solver that ran (see :class:`GramEigen`).
    centered : bool
        ``False`` for a PCA about zero (``center=False``: ``mean`` is all zeros, ``variances``
        are mean squares ``lam / n`` along the components, ``total_variance`` the mean squared
        row norm).
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    explained_ratio: np.ndarray
    n_samples: int
    rank: int
    total_variance: float
    n_components_99: int | None
    n_requested: int
    truncated_reason: str | None
    solver: str
    centered: bool = True

    @property
    def n_components(self) -> int:
        """``k``, the number of components returned."""
        return int(self.components.shape[1])

    @property
    def n_features(self) -> int:
        """``d``."""
        return int(self.mean.shape[0])


# -- blocks ----------------------------------------------------------------------------------

def _centred_block(X_block, mu_block, name: str, dtype=np.float64, checked: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``X_block - mu_block`` as a new C-ordered array of ``dtype``, and ``mu_block`` (float64).

    ``checked=True``: the caller has already validated the block (:func:`_checked_block`), so
    the finiteness scan is skipped (it is a full extra pass over the block).
    """
    Xb = np.asarray(X_block)
    if checked:
        mu = np.asarray(mu_block, dtype=np.float64)
        return np.subtract(Xb, mu, dtype=dtype), mu
    if Xb.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n_samples, n_block_columns) array, got shape {Xb.shape}")
    if not (np.issubdtype(Xb.dtype, np.floating) or np.issubdtype(Xb.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {Xb.dtype}")
    if mu_block is None:
        mu = Xb.mean(axis=0, dtype=np.float64)
    else:
        mu = as_array(mu_block, "mu_block", (Xb.shape[1],), finite=True)
    Xc = np.subtract(Xb, mu, dtype=dtype)  # one new array; the input is never touched
    if Xc.size and not np.isfinite(Xc).all():
        bad = int(np.count_nonzero(~np.isfinite(Xb)))
        raise ValueError(f"{name}: contains {bad} NaN or infinite value(s)")
    return Xc, mu


def column_block_gram(X_block, mu_block=None, out: np.ndarray | None = None, *, _checked: bool = False
                      ) -> np.ndarray:
    """Contribution of a block of columns to the Gram matrix of the centred data.

    Parameters
    ----------
    X_block : (n, b) array_like of float
        Columns ``j0:j1`` of the data matrix, **all** rows (any float dtype; accumulated in
        float64).
    mu_block : (b,) array_like of float or None
        Means of these columns over all rows. ``None``: computed from ``X_block`` (exact,
        since the block holds every row).
    out : (n, n) float64 or float32 Fortran-ordered ndarray or None
        Accumulator: the contribution is **added** to its lower triangle in place (BLAS
        ``dsyrk``) and ``out`` is returned. ``None``: a new zero-initialised float64 one.
        A **float32** accumulator selects the fast approximate Gram matrix of the
        ``"mixed"`` precision (block centred in float32, BLAS ``ssyrk``: about 2x faster,
        ~1e-7 relative error), which is only good as a start for
        :func:`rayleigh_ritz`.

    Returns
    -------
    (n, n) float64 or float32, Fortran order
        ``out`` with ``(X_block - mu_block) @ (X_block - mu_block).T`` added to its **lower
        triangle** (diagonal included); the strict upper triangle is not referenced or
        changed. :func:`pca_from_gram` reads only the lower triangle.

    Raises
    ------
    ValueError
        Not 2-D, non-numeric, NaN/inf values, ``mu_block`` of the wrong length, or an
        ``out`` that is not an (n, n) float64/float32 Fortran-ordered writeable array.
    """
    n = np.shape(X_block)[0] if np.ndim(X_block) == 2 else None
    if out is None:
        dtype = np.float64
    elif not (isinstance(out, np.ndarray) and out.dtype in (np.float64, np.float32) and out.ndim == 2
              and out.shape == (n, n) and out.flags.f_contiguous and out.flags.writeable):
        got = f"{type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}"
        raise ValueError(f"out: expected a writeable ({n}, {n}) float64 or float32 Fortran-ordered array, got {got}")
    else:
        dtype = out.dtype.type
    Xc, _ = _centred_block(X_block, mu_block, "X_block", dtype=dtype, checked=_checked)
    n = Xc.shape[0]
    if out is None:
        out = np.zeros((n, n), dtype=np.float64, order="F")
    if Xc.shape[1] == 0 or n == 0:
        return out
    # Xc is C-ordered (n, b), so Xc.T is Fortran-ordered (b, n): trans=1 gives Xc @ Xc.T, no copy
    syrk = blas.dsyrk if dtype is np.float64 else blas.ssyrk
    res = syrk(1.0, Xc.T, beta=1.0, c=out, trans=1, lower=1, overwrite_c=1)
    if res is not out and not np.shares_memory(res, out):  # BLAS wrapper made a copy after all
        out[...] = res
    return out


def components_block(X_block, mu_block, eig: GramEigen, *, _checked: bool = False) -> np.ndarray:
    """Rows ``j0:j1`` of the components: ``(X_block - mu_block).T @ U / sqrt(lam)``.

    Parameters
    ----------
    X_block : (n, b) array_like of float
        Columns ``j0:j1`` of the data matrix, all rows.
    mu_block : (b,) array_like of float or None
        Their means (``None``: computed from the block).
    eig : GramEigen
        From :func:`pca_from_gram` on the Gram matrix of the same data.

    Returns
    -------
    (b, k) float64
        Unsigned components (signs are fixed by :func:`assemble_pca`).

    Raises
    ------
    ValueError
        Bad block (see :func:`column_block_gram`) or a row count differing from ``eig``'s.
    """
    if not isinstance(eig, GramEigen):
        raise ValueError(f"eig: expected a GramEigen, got {type(eig).__name__}")
    Xc, _ = _centred_block(X_block, mu_block, "X_block", checked=_checked)
    if Xc.shape[0] != eig.n_samples:
        raise ValueError(f"X_block: expected {eig.n_samples} rows (as the Gram matrix), got {Xc.shape[0]}")
    k = eig.eigenvalues.shape[0]
    if k == 0:
        return np.zeros((Xc.shape[1], 0))
    return (Xc.T @ eig.eigenvectors) / np.sqrt(eig.eigenvalues)


# -- eigen-decomposition -------------------------------------------------------------------

def _lower_fortran(G) -> tuple[np.ndarray, int]:
    """A Fortran-ordered view of G and the BLAS/LAPACK ``lower`` flag naming G's lower triangle."""
    if G.flags.f_contiguous:
        return G, 1
    if G.flags.c_contiguous:
        return G.T, 0  # G's lower triangle is the upper triangle of the Fortran view G.T
    return np.asfortranarray(G), 1


def _count_nonfinite_lower(G: np.ndarray, rows: int = 512) -> int:
    """NaN/inf entries on and below the diagonal, counted in row blocks (no (n, n) temporary)."""
    bad = 0
    for i0 in range(0, G.shape[0], rows):
        i1 = min(i0 + rows, G.shape[0])
        bad += int(np.count_nonzero(~np.isfinite(G[i0:i1, :i0])))
        bad += int(np.count_nonzero(~np.isfinite(np.tril(G[i0:i1, i0:i1]))))
    return bad


def _symm(A: np.ndarray, lower: int, B: np.ndarray) -> np.ndarray:
    return blas.dsymm(1.0, A, B, side=0, lower=lower)


def _orth_block(Z: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning Z minus its projection on ``basis`` (orthonormal columns).

    Classical Gram-Schmidt twice, Householder QR, then the same once more so that columns
    that were (numerically) in span(basis) come out as orthogonal directions, not noise.
    Callers run it (and the small Rayleigh-Ritz ``eigh``) with one BLAS thread: these
    LAPACK routines synchronise threads at every panel, and on a loaded machine a
    2-thread OpenBLAS QR of a 6000 x 250 block was measured 12x slower than 1 thread.
    """
    for _ in range(2):
        for _ in range(2):
            if basis.shape[1]:
                Z = Z - basis @ (basis.T @ Z)
        Z = qr(Z, mode="economic", check_finite=False)[0]
    return Z


def _block_krylov(A: np.ndarray, lower: int, k: int, tol: float, rng, max_dim: int):
    """Top-k eigenpairs of the symmetric matrix A by block Krylov + Rayleigh-Ritz.

    Returns ``(theta (k,) descending, U (n, k), converged, max_rel_residual)``.
    """
    n = A.shape[0]
    m = min(n, k + max(10, k // 4))
    g = as_rng(rng)
    Qb = np.empty((n, max_dim), order="F")
    AQb = np.empty((n, max_dim), order="F")
    with threadpool_limits(1, user_api="blas"):
        Q = _orth_block(g.standard_normal((n, m)), Qb[:, :0])
    p = 0
    while True:
        w = Q.shape[1]
        Qb[:, p:p + w] = Q
        AQb[:, p:p + w] = _symm(A, lower, np.asfortranarray(Q))
        p += w
        Qa, AQa = Qb[:, :p], AQb[:, :p]
        T = Qa.T @ AQa
        T = 0.5 * (T + T.T)
        with threadpool_limits(1, user_api="blas"):  # see _orth_block
            th, Y = eigh(T, check_finite=False)
        th, Y = th[::-1][:k], Y[:, ::-1][:, :k]
        U = Qa @ Y
        R = AQa @ Y - U * th
        scale = max(abs(float(th[0])), np.finfo(float).tiny)
        res = float(np.linalg.norm(R, axis=0).max()) / scale
        if res <= tol:
            return th, U, True, res
        if p + m > max_dim:
            return th, U, False, res
        with threadpool_limits(1, user_api="blas"):
            Q = _orth_block(AQb[:, p - w:p], Qa)


def pca_from_gram(G, n_components, *, n_features: int | None = None, solver: str = "auto",
                  tol: float = 1e-10, rng=0, overwrite: bool = False, center: bool = True) -> GramEigen:
    """Top eigenpairs of the Gram matrix of centred data.

    Parameters
    ----------
    G : (n, n) float64 (or float32, decomposed as a float64 copy)
        ``Xc @ Xc.T`` of the centred data; **only the lower triangle is read** (as written
        by :func:`column_block_gram`). Needs ``n >= 2``.
    n_components : int
        Components wanted (>= 1). More than the rank gives fewer, see ``truncated_reason``.
    n_features : int or None
        ``d``, the number of columns of the data (caps the rank and sets the rank tolerance
        ``max(n, d) * eps * lam_1``); ``None``: taken as ``n``.
    solver : {"auto", "eigh", "krylov"}
        ``"eigh"``: LAPACK ``syevr`` on the requested index range. ``"krylov"``: block
        Krylov Rayleigh-Ritz with a residual stop, falling back to ``eigh`` when its basis
        budget (``min(6 * block, max(n // 2, 5 * block), n)`` columns, block = ``k + max(10, k // 4)``)
        is used up. ``"auto"`` (default): ``"krylov"``
        when ``n >= 1500`` and ``k <= n / 4``, else ``"eigh"``.
    tol : float
        Krylov stop: ``max ||G u - theta u|| <= tol * theta_1`` (default 1e-10; floored at
        ``10 * n * eps``).
    rng : int or numpy.random.Generator
        Krylov start block (default seed 0; results agree to rounding for any seed).
    overwrite : bool
        Allow ``eigh`` to overwrite ``G`` (saves an (n, n) copy; default False).
    center : bool
        ``G`` is of centred rows (default) or of raw rows (PCA about zero).

    Returns
    -------
    GramEigen

    Raises
    ------
    ValueError
        ``G`` not square, ``n < 2``, NaN/inf in the lower triangle, bad ``n_components``,
        ``n_features``, ``solver`` or ``tol``.
    """
    G = np.asarray(G)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G: expected a square (n, n) matrix, got shape {G.shape}")
    if G.dtype != np.float64:
        G = np.asarray(G, dtype=np.float64)
        overwrite = True  # a private copy
    n = G.shape[0]
    if n < 2:
        raise ValueError(f"G: a PCA needs at least 2 samples, got n_samples = {n}")
    k_req = check_int(n_components, "n_components", 1)
    d = n if n_features is None else check_int(n_features, "n_features", 1)
    if solver not in _SOLVERS:
        raise ValueError(f"solver: expected one of {_SOLVERS}, got {solver!r}")
    tol = max(check_number(tol, "tol", lo=0.0, lo_open=True), 10 * n * _EPS)
    A, lower = _lower_fortran(G)
    if A is not G and not np.shares_memory(A, G):
        overwrite = True
    bad = _count_nonfinite_lower(G)
    if bad:
        raise ValueError(f"G: its lower triangle contains {bad} NaN or infinite value(s)")
    total_ss = float(np.trace(G))
    center = bool(center)
    dof = n - 1 if center else n

    cap = min(dof, d)
    k = min(k_req, cap)
    reason = None
    if k < k_req:
        why = (f"n_samples - 1 = {n - 1}" if center else f"n_samples = {n}") if cap == dof else f"n_features = {d}"
        reason = f"requested {k_req} components but the {'centred ' if center else ''}data has rank <= {cap} ({why})"

    use = solver
    if solver == "auto":
        use = "krylov" if (n >= _KRYLOV_MIN_N and 4 * k <= n) else "eigh"
    max_res = None
    done = False
    if use == "krylov":
        block = min(n, k + max(10, k // 4))
        max_dim = max(min(6 * block, max(n // 2, 5 * block), n), block)
        th, U, ok, res = _block_krylov(A, lower, k, tol, rng, max_dim)
        if ok:
            lam, done, max_res, used = th, True, res, "krylov"
        else:
            used = "eigh (krylov did not converge)"
    else:
        used = "eigh"
    if not done:
        w, V = eigh(A, lower=bool(lower), subset_by_index=(n - k, n - 1), driver="evr",
                    overwrite_a=overwrite, check_finite=False)
        lam, U = w[::-1].copy(), np.ascontiguousarray(V[:, ::-1])

    lam_1 = float(lam[0]) if lam.size else 0.0
    rank_tol = max(n, d) * _EPS * max(lam_1, 0.0)
    keep = lam > rank_tol if lam_1 > 0 else np.zeros(lam.shape, dtype=bool)
    r = int(np.count_nonzero(keep))  # eigenvalues are descending, so keep is a prefix
    if r < k:
        msg = (f"the centred data has numerical rank {r} (eigenvalues of the Gram matrix <= "
               f"{rank_tol:.3g} = max(n, d) * eps * lam_1 count as zero)")
        if total_ss <= 0 or lam_1 <= 0:
            msg = "the data has zero variance (all rows are equal)"
        reason = f"requested {k_req} components but {msg}"
    lam, U = np.ascontiguousarray(lam[:r]), np.ascontiguousarray(U[:, :r])
    return GramEigen(_ro(U), _ro(lam), n, d, total_ss / dof, r, k_req, reason, used, max_res, center)


# -- mixed precision: Rayleigh-Ritz refinement in float64 ---------------------------------------

def refine_block(X_block, mu_block, U, *, _checked: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """One column block's share of the float64 Rayleigh-Ritz step on the subspace span(U).

    Parameters
    ----------
    X_block : (n, b) array_like of float
        Columns ``j0:j1`` of the data matrix, all rows.
    mu_block : (b,) array_like of float or None
        Their means (``None``: computed from the block).
    U : (n, p) array_like of float
        Approximate top eigenvectors of the Gram matrix (e.g. from a float32 Gram matrix).

    Returns
    -------
    W_block : (b, p) float64
        ``Xc_block.T @ U`` (rows ``j0:j1`` of ``W = Xc.T @ U``).
    Z_block : (n, p) float64
        ``Xc_block @ W_block``; summed over the blocks it is ``G @ U`` exactly in float64.
    sum_sq : float
        ``sum(Xc_block ** 2)``; summed over the blocks it is ``trace(G)``.

    Raises
    ------
    ValueError
        Bad block (see :func:`column_block_gram`) or ``U`` with another row count.
    """
    Xc, _ = _centred_block(X_block, mu_block, "X_block", checked=_checked)
    U = U if _checked else as_array(U, "U", (Xc.shape[0], None), finite=True)
    W = Xc.T @ U
    return W, Xc @ W, float(np.einsum("ij,ij->", Xc, Xc))


def rayleigh_ritz(U, Z, n_components, *, n_features: int, total_variance: float,
                  rtol: float = 1e-10, max_linear: float = 1e-5,
                  center: bool = True) -> tuple[GramEigen, np.ndarray, bool]:
    """Rayleigh-Ritz on span(U) with ``Z = G @ U`` computed exactly, and its residual certificate.

    Parameters
    ----------
    U : (n, p) array_like of float
        Orthonormal columns (approximate top-p eigenvectors of ``G``).
    Z : (n, p) array_like of float
        ``G @ U`` in float64 (the sum of :func:`refine_block` ``Z_block``).
    n_components : int
        Components wanted, ``k`` (>= 1).
    n_features : int
        ``d``.
    total_variance : float
        ``trace(G) / (n - 1)`` (from the :func:`refine_block` sums).
    rtol : float
        Certificate: for each returned pair, the error estimate ``||r_i||^2 / ((theta_i -
        theta_p) * theta_i)`` must be <= ``rtol`` (default 1e-10), where ``r_i = G u_i -
        theta_i u_i`` and ``theta_p`` is the smallest Ritz value (the gap to the rest of the
        spectrum; ``theta_i`` itself when ``p`` reaches the rank bound ``n - 1``)...
    max_linear : float
        ... and ``||r_i|| <= max_linear * theta_i`` (default 1e-5), so the gap estimate
        cannot hide a poor subspace.
    center : bool
        ``G`` of centred rows (default) or of raw rows (rank bound ``n``).

    Returns
    -------
    eig : GramEigen
        Ritz pairs (eigenvectors ``U @ Y[:, :k]``), rank-truncated as :func:`pca_from_gram`;
        ``solver = "rayleigh-ritz"`` and ``max_residual`` = max ``||r_i|| / theta_1``.
    Y : (p, k) float64
        The Ritz rotation (components are ``W @ Y / sqrt(eigenvalues)``, see
        :func:`ritz_components`).
    certified : bool
        Whether every returned pair passed the certificate (if not, recompute with a float64
        Gram matrix).

    Raises
    ------
    ValueError
        Shapes inconsistent, NaN values, bad numbers.
    """
    U = as_array(U, "U", (None, None), finite=True)
    n, p = U.shape
    Z = as_array(Z, "Z", (n, p), finite=True)
    k_req = check_int(n_components, "n_components", 1)
    d = check_int(n_features, "n_features", 1)
    tv = check_number(total_variance, "total_variance", lo=0.0)
    rtol = check_number(rtol, "rtol", lo=0.0, lo_open=True)
    max_linear = check_number(max_linear, "max_linear", lo=0.0, lo_open=True)
    if n < 2 or p < 1:
        raise ValueError(f"U: expected n >= 2 rows and p >= 1 columns, got {U.shape}")
    M = U.T @ Z
    th, Y = eigh(0.5 * (M + M.T), check_finite=False)
    th, Y = th[::-1], np.ascontiguousarray(Y[:, ::-1])
    center = bool(center)
    dof = n - 1 if center else n
    cap = min(dof, d)
    k = min(k_req, cap, p)
    reason = None
    if k < k_req:
        why = (f"n_samples - 1 = {n - 1}" if center else f"n_samples = {n}") if cap == dof else f"n_features = {d}"
        reason = f"requested {k_req} components but the {'centred ' if center else ''}data has rank <= {cap} ({why})"
    lam_1 = max(float(th[0]), 0.0)
    rank_tol = max(n, d) * _EPS * lam_1
    r = int(np.count_nonzero(th[:k] > rank_tol)) if lam_1 > 0 else 0
    if r < k:
        reason = (f"requested {k_req} components but the centred data has numerical rank {r} (eigenvalues of the "
                  f"Gram matrix <= {rank_tol:.3g} = max(n, d) * eps * lam_1 count as zero)")
    Yk = Y[:, :r]
    Uk = U @ Yk
    res = np.linalg.norm(Z @ Yk - Uk * th[:r], axis=0)
    if r:
        gap = th[:r] - (th[p - 1] if p < cap else 0.0)
        certified = bool(np.all(gap > 0) and np.all(res <= max_linear * th[:r])
                         and np.all(res ** 2 <= rtol * gap * th[:r]))
        max_res = float(res.max() / lam_1)
    else:
        certified, max_res = True, 0.0
    eig = GramEigen(_ro(np.ascontiguousarray(Uk)), _ro(th[:r].copy()), n, d, tv, r, k_req, reason,
                    "rayleigh-ritz", max_res, center)
    return eig, Yk, certified


def ritz_components(W, Y, eig: GramEigen) -> np.ndarray:
    """Components ``W @ Y / sqrt(eigenvalues)`` (d, k) of a :func:`rayleigh_ritz` result.

    Raises
    ------
    ValueError
        Shapes inconsistent with each other or with ``eig``.
    """
    if not isinstance(eig, GramEigen):
        raise ValueError(f"eig: expected a GramEigen, got {type(eig).__name__}")
    k = eig.eigenvalues.shape[0]
    Y = as_array(Y, "Y", (None, k))
    W = as_array(W, "W", (None, Y.shape[0]))
    if k == 0:
        return np.zeros((W.shape[0], 0))
    return (W @ Y) / np.sqrt(eig.eigenvalues)


# -- assembly ----------------------------------------------------------------------------------

def assemble_pca(mean, components, eig: GramEigen) -> PCAResult:
    """Gather a :class:`PCAResult` from the mean, the unsigned components and the eigenpairs.

    Parameters
    ----------
    mean : (d,) array_like of float
        Column means of the data.
    components : (d, k) array_like of float
        Stacked :func:`components_block` outputs.
    eig : GramEigen

    Returns
    -------
    PCAResult
        With each component's sign set so its largest-magnitude entry is positive (new
        arrays; the inputs are not modified).

    Raises
    ------
    ValueError
        Shapes inconsistent with each other or with ``eig``, NaN values.
    """
    if not isinstance(eig, GramEigen):
        raise ValueError(f"eig: expected a GramEigen, got {type(eig).__name__}")
    mu = as_array(mean, "mean", (None,), finite=True).copy()
    k = eig.eigenvalues.shape[0]
    V = as_array(components, "components", (mu.shape[0], k), finite=True)
    if k:
        idx = np.argmax(np.abs(V), axis=0)
        s = np.sign(V[idx, np.arange(k)])
        s[s == 0] = 1.0
        V = V * s
    else:
        V = V.copy()
    n = eig.n_samples
    var = eig.eigenvalues / (n - 1 if eig.centered else n)
    tv = eig.total_variance
    ratio = var / tv if tv > 0 else np.zeros_like(var)
    n99 = None
    if tv <= 0:
        n99 = 0
    elif k and ratio.sum() >= 0.99:
        n99 = int(np.searchsorted(np.cumsum(ratio), 0.99) + 1)
        n99 = min(n99, k)
    return PCAResult(_ro(mu), _ro(V), _ro(var.copy()), _ro(ratio), n, eig.rank, tv, n99,
                     eig.n_requested, eig.truncated_reason, eig.solver, eig.centered)


def _check_data(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n_samples, n_features) array, got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {X.dtype}")
    if X.shape[0] < 2:
        raise ValueError(f"{name}: a PCA needs at least 2 samples (rows), got {X.shape[0]}")
    if X.shape[1] < 1:
        raise ValueError(f"{name}: needs at least 1 feature (column), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: contains {int(np.count_nonzero(~np.isfinite(X)))} NaN or infinite value(s)")
    return X


PRECISIONS = ("double", "mixed")


def _checked_block(X_block, j0: int, j1: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The block as an array and its column sums (float64), after checking shape, dtype, finiteness.

    Finiteness is read off the column sums (one pass that the mean needs anyway): a sum in
    float64 is NaN/inf when a column holds a NaN/inf, and a float32 or integer block cannot
    overflow it; only when a sum is not finite is the block scanned to count the bad values
    (a float64 block whose finite values overflow the sum is accepted after that scan).
    """
    Xb = np.asarray(X_block)
    if Xb.shape != (n, j1 - j0):
        raise ValueError(f"X[:, {j0}:{j1}]: expected a block of shape ({n}, {j1 - j0}), got {Xb.shape}")
    if not (np.issubdtype(Xb.dtype, np.floating) or np.issubdtype(Xb.dtype, np.integer)):
        raise ValueError(f"X[:, {j0}:{j1}]: expected a real numeric array, got dtype {Xb.dtype}")
    sums = Xb.sum(axis=0, dtype=np.float64)
    if not np.isfinite(sums).all():
        bad = int(np.count_nonzero(~np.isfinite(Xb)))
        if bad:
            raise ValueError(f"X[:, {j0}:{j1}]: contains {bad} NaN or infinite value(s)")
    return Xb, sums


def _blocks(read_blocks, n: int, d: int):
    """Iterate ``read_blocks()`` as ``(j0, j1, block, column_sums)``, checking that the blocks tile 0..d in order."""
    nxt = 0
    for j0, j1, Xb in read_blocks():
        if j0 != nxt or j1 <= j0 or j1 > d:
            raise ValueError(f"read_blocks: blocks must tile columns 0..{d} in order; got [{j0}, {j1}) after {nxt}")
        nxt = j1
        yield (j0, j1) + _checked_block(Xb, j0, j1, n)
    if nxt != d:
        raise ValueError(f"read_blocks: blocks stopped at column {nxt} of {d}")


def _block_mean(sums: np.ndarray, n: int, center: bool) -> np.ndarray:
    return sums / n if center else np.zeros(sums.shape[0])


def _double(read_blocks, n, d, k, solver, rng, center, mean=None):
    G = np.zeros((n, n), order="F")
    mean_out = np.empty(d) if mean is None else mean
    for j0, j1, Xb, sums in _blocks(read_blocks, n, d):
        mu = _block_mean(sums, n, center) if mean is None else mean[j0:j1]
        column_block_gram(Xb, mu, out=G, _checked=True)
        mean_out[j0:j1] = mu
    eig = pca_from_gram(G, k, n_features=d, solver=solver, rng=rng, overwrite=True, center=center)
    del G
    V = np.empty((d, eig.eigenvalues.shape[0]))
    for j0, j1, Xb, _ in _blocks(read_blocks, n, d):
        V[j0:j1] = components_block(Xb, mean_out[j0:j1], eig, _checked=True)
    return assemble_pca(mean_out, V, eig)


def pca_from_blocks(read_blocks, n_samples: int, n_features: int, n_components: int, *,
                    precision: str = "double", center: bool = True, solver: str = "auto", rng=0) -> PCAResult:
    """Exact PCA of a matrix seen only through passes over its column blocks.

    Parameters
    ----------
    read_blocks : callable
        ``read_blocks()`` returns an iterable of ``(j0, j1, X_block)`` with ``X_block`` the
        (n, j1 - j0) columns ``j0:j1`` (all rows, any float dtype), tiling ``0..d`` in order.
        It is called once per pass (two passes; three if a ``"mixed"`` run falls back), so it
        may read from disk or a cluster; nothing else is kept between blocks but the
        accumulators.
    n_samples, n_features : int
        ``n >= 2`` and ``d >= 1``.
    n_components : int
        Components wanted (>= 1); fewer when the data's rank is lower (``truncated_reason``).
    precision : {"double", "mixed"}
        ``"double"`` (default): float64 Gram matrix (:func:`column_block_gram`), top-k
        eigenpairs (:func:`pca_from_gram`), then :func:`components_block`. ``"mixed"``: float32
        Gram matrix (about 2x faster pass), its top ``p = k + max(8, k // 10)`` eigenvectors,
        then one float64 pass computing ``W = Xc.T @ U`` and ``G @ U`` (:func:`refine_block`)
        for a Rayleigh-Ritz step with a residual certificate (:func:`rayleigh_ritz`); if the
        certificate fails (clustered spectrum at ``k``, rank-deficient data), the
        ``"double"`` computation is run instead. The result's ``solver`` says what ran.
    center : bool
        Subtract the column means (default). ``False``: PCA about zero (e.g. expression
        residuals ``expression - neutral``); the result's ``mean`` is zero and its variances are
        mean squares (divided by ``n``), see :class:`PCAResult`.
    solver, rng
        See :func:`pca_from_gram`.

    Returns
    -------
    PCAResult

    Raises
    ------
    ValueError
        Bad sizes or parameters; a block of the wrong shape, dtype, or with NaN/inf values
        (naming its columns); blocks not tiling the columns.
    """
    n = check_int(n_samples, "n_samples", 1)
    d = check_int(n_features, "n_features", 1)
    if n < 2:
        raise ValueError(f"n_samples: a PCA needs at least 2 samples, got {n}")
    k = check_int(n_components, "n_components", 1)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if solver not in _SOLVERS:
        raise ValueError(f"solver: expected one of {_SOLVERS}, got {solver!r}")
    center = bool(center)
    if precision == "double":
        return _double(read_blocks, n, d, k, solver, rng, center)
    G = np.zeros((n, n), dtype=np.float32, order="F")
    mean = np.empty(d)
    for j0, j1, Xb, sums in _blocks(read_blocks, n, d):
        mu = _block_mean(sums, n, center)
        column_block_gram(Xb, mu, out=G, _checked=True)
        mean[j0:j1] = mu
    p = min(k + max(8, k // 10), n - 1 if center else n, d)
    G64 = G.astype(np.float64, order="F")  # float32 accumulator freed before the eigen-solver's buffers
    del G
    approx = pca_from_gram(G64, p, n_features=d, solver=solver, rng=rng, overwrite=True, center=center,
                           tol=MIXED_KRYLOV_TOL)
    del G64
    U = approx.eigenvectors
    if U.shape[1] == 0:
        res = _double(read_blocks, n, d, k, solver, rng, center, mean)
        return replace(res, solver=f"{res.solver} (mixed: float32 Gram matrix had no components)")
    W = np.empty((d, U.shape[1]))
    Z = np.zeros((n, U.shape[1]))
    ss = 0.0
    for j0, j1, Xb, _ in _blocks(read_blocks, n, d):
        Wb, Zb, s = refine_block(Xb, mean[j0:j1], U, _checked=True)
        W[j0:j1] = Wb
        Z += Zb
        ss += s
    eig, Y, ok = rayleigh_ritz(U, Z, k, n_features=d, total_variance=ss / (n - 1 if center else n), center=center)
    if not ok:
        del W
        res = _double(read_blocks, n, d, k, solver, rng, center, mean)
        return replace(res, solver=f"{res.solver} (mixed: Rayleigh-Ritz not certified, "
                                   f"max residual {eig.max_residual:.2g} * lam_1)")
    V = ritz_components(W, Y, eig)
    del W
    eig = replace(eig, solver=f"mixed: float32 Gram matrix ({approx.solver}, p = {U.shape[1]}) + float64 "
                              f"Rayleigh-Ritz (max residual {eig.max_residual:.2g} * lam_1)")
    return assemble_pca(mean, V, eig)


def exact_pca(X, n_components, *, block_cols: int = DEFAULT_BLOCK_COLS, precision: str = "double",
              center: bool = True, solver: str = "auto", rng=0) -> PCAResult:
    """In-memory exact PCA of the rows of ``X`` (the same code path as the out-of-core one).

    Parameters
    ----------
    X : (n, d) array_like of float
        One sample per row (e.g. a flattened (v, 3) mesh in mm), n >= 2, finite.
    n_components : int
        Components wanted (>= 1); fewer are returned when the data's rank is lower.
    block_cols : int
        Columns per block (default 2048).
    precision, center, solver, rng
        See :func:`pca_from_blocks`.

    Returns
    -------
    PCAResult

    Raises
    ------
    ValueError
        ``X`` not 2-D, fewer than 2 rows, NaN/inf, bad ``n_components`` / ``block_cols`` /
        ``precision`` / ``solver``.
    """
    X = _check_data(X)
    bc = check_int(block_cols, "block_cols", 1)
    n, d = X.shape

    def read_blocks():
        return ((j0, min(j0 + bc, d), X[:, j0:j0 + bc]) for j0 in range(0, d, bc))

    return pca_from_blocks(read_blocks, n, d, n_components, precision=precision, center=center, solver=solver,
                           rng=rng)


# -- use ------------------------------------------------------------------------------------------

def _check_model(model) -> PCAResult:
    if not isinstance(model, PCAResult):
        raise ValueError(f"model: expected a PCAResult, got {type(model).__name__}")
    return model


def _check_k(n_components, model: PCAResult) -> int:
    if n_components is None:
        return model.n_components
    k = check_int(n_components, "n_components", 0)
    if k > model.n_components:
        raise ValueError(f"n_components: the model has {model.n_components} components, got {k}")
    return k


def project(X, model: PCAResult, n_components: int | None = None) -> np.ndarray:
    """Coefficients ``(X - mean) @ components[:, :k]`` of rows of ``X``.

    Parameters
    ----------
    X : (m, d) array_like of float
    model : PCAResult
    n_components : int or None
        ``k`` (default: all of the model's components).

    Returns
    -------
    (m, k) float64
        Coefficients (mm for meshes; variance of coefficient j over the training rows is
        ``model.variances[j]``).

    Raises
    ------
    ValueError
        Wrong number of columns, NaN values, ``n_components`` beyond the model.
    """
    model = _check_model(model)
    k = _check_k(n_components, model)
    X = as_array(X, "X", (None, model.n_features), finite=True)
    return (X - model.mean) @ model.components[:, :k]


def reconstruct(coefficients, model: PCAResult) -> np.ndarray:
    """Rows ``mean + coefficients @ components[:, :k].T`` for (m, k) coefficients.

    Raises
    ------
    ValueError
        Coefficients not 2-D, NaN, or more columns than the model has components.
    """
    model = _check_model(model)
    C = as_array(coefficients, "coefficients", (None, None), finite=True)
    k = _check_k(C.shape[1], model)
    return model.mean + C @ model.components[:, :k].T
