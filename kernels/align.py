"""Coarse rigid alignment of two views from their shared 3D landmarks (paper section 3.1).

"To get the coarse results, we use the corresponding 3D landmarks to calculate the
transformation relationship between point clouds in different views. We set the middle
mesh as the pivot and align the left and right point clouds to the pivot by calculating
the rigid transformation matrix coarsely."

:func:`kabsch` is the (weighted) least-squares rigid fit (Umeyama 1991 without scale);
:func:`align_landmarks` wraps it in RANSAC over landmark triplets followed by a
least-squares refit on the consensus set, so a few wrongly lifted landmarks (annotator
slips, a landmark lifted onto the wrong side of a silhouette) do not bias the result.
Too few shared landmarks, or too small a consensus, is an expected outcome, reported as
a :class:`CoarseAlignment` with ``converged = False`` and the identity transform (the
stored calibration is then kept), never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels._checks import as_array, as_rng, check_int, check_number, check_point_pairs

FALLBACK = "fallback: stored calibration"


@dataclass(frozen=True)
class CoarseParams:
    """Parameters of :func:`align_landmarks`.

    Attributes
    ----------
    min_shared : int
        Minimum number of landmarks lifted in both views (default 6). Below it the
        alignment is not attempted and the result is the fallback (identity).
    min_inliers : int
        Minimum size of the consensus set (default 5); a smaller one is a fallback too.
    inlier_threshold_mm : float
        A landmark pair is an inlier when its residual after the candidate transform is
        below this (default 4 mm: the lifted landmarks carry the annotator's noise, about
        1-3 mm on the default rig; a wrong landmark is off by 10 mm and more).
    n_trials : int
        RANSAC trials (random triplets; default 300). With 30 % outliers a clean triplet
        is drawn with probability 0.34 per trial.
    n_refits : int
        Least-squares refits on the consensus set after RANSAC (default 5; stops early
        when the set no longer changes).
    min_triplet_area_mm2 : float
        Triplets whose triangle area is below this are skipped (degenerate; default 25).
    """

    min_shared: int = 6
    min_inliers: int = 5
    inlier_threshold_mm: float = 4.0
    n_trials: int = 300
    n_refits: int = 5
    min_triplet_area_mm2: float = 25.0

    def __post_init__(self):
        check_int(self.min_shared, "CoarseParams.min_shared", 3)
        check_int(self.min_inliers, "CoarseParams.min_inliers", 3)
        check_number(self.inlier_threshold_mm, "CoarseParams.inlier_threshold_mm", lo=0, lo_open=True)
        check_int(self.n_trials, "CoarseParams.n_trials", 1)
        check_int(self.n_refits, "CoarseParams.n_refits", 0)
        check_number(self.min_triplet_area_mm2, "CoarseParams.min_triplet_area_mm2", lo=0)


@dataclass(frozen=True)
class CoarseAlignment:
    """Outcome of :func:`align_landmarks`.

    Attributes
    ----------
    transform : (4, 4) float64
        Rigid transform taking source points to the target frame
        (``x_t = T[:3, :3] @ x_s + T[:3, 3]``, mm); the identity on fallback.
    converged : bool
        A consensus transform was found. ``False`` means fallback to the stored calibration.
    status : str
        ``"ok"`` or ``"fallback: stored calibration"``.
    reason : str
        Why it fell back (empty when ``converged``).
    n_shared : int
        Landmarks lifted (finite) in both views.
    n_inliers : int
        Size of the consensus set (0 on fallback before RANSAC).
    inliers : (106,) bool
        Consensus landmarks (all False on fallback).
    rmse_mm : float
        RMS residual of the inliers after the final fit (NaN on fallback).
    n_iter : int
        RANSAC trials run plus refits.
    """

    transform: np.ndarray
    converged: bool
    status: str
    reason: str
    n_shared: int
    n_inliers: int
    inliers: np.ndarray
    rmse_mm: float
    n_iter: int


def kabsch(src, dst, weights=None) -> np.ndarray:
    """Weighted least-squares rigid transform ``dst ~ R src + t`` (Kabsch / Umeyama, no scale).

    Minimises ``sum_i w_i |R src_i + t - dst_i|^2`` (Umeyama 1991, Eq. 40-42 with ``c = 1``);
    the SVD sign correction keeps ``det R = +1``.

    Parameters
    ----------
    src, dst : (n, 3) float64
        Corresponding points (mm), ``n >= 3``, finite.
    weights : (n,) float64, optional
        Non-negative weights (default all 1).

    Returns
    -------
    (4, 4) float64
        The homogeneous transform.

    Raises
    ------
    ValueError
        Shapes differ, ``n < 3``, non-finite values, or negative / all-zero weights.

    References
    ----------
    S. Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", IEEE TPAMI 13(4), 1991.
    """
    src, dst, w = check_point_pairs(src, dst, weights)
    return _kabsch(src, dst, w)


def _kabsch(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = w / w.sum()
    ms = w @ src
    md = w @ dst
    C = ((dst - md) * w[:, None]).T @ (src - ms)          # cross-covariance, Umeyama Eq. 38
    U, _, Vt = np.linalg.svd(C)
    S = np.eye(3)
    S[2, 2] = np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0
    R = U @ S @ Vt
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = md - R @ ms
    return T


def _batch_kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Kabsch of a batch of (m, k, 3) correspondences -> (m, 4, 4)."""
    ms = src.mean(axis=1, keepdims=True)
    md = dst.mean(axis=1, keepdims=True)
    C = np.einsum("mki,mkj->mij", dst - md, src - ms)
    U, _, Vt = np.linalg.svd(C)
    d = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    d[d == 0] = 1.0
    U[:, :, 2] *= d[:, None]
    R = U @ Vt
    T = np.tile(np.eye(4), (src.shape[0], 1, 1))
    T[:, :3, :3] = R
    T[:, :3, 3] = md[:, 0] - np.einsum("mij,mj->mi", R, ms[:, 0])
    return T


def _fallback(reason: str, n_shared: int, n_lm: int, n_iter: int = 0, inliers=None, n_inl: int = 0):
    return CoarseAlignment(np.eye(4), False, FALLBACK, reason, n_shared, n_inl,
                           np.zeros(n_lm, bool) if inliers is None else inliers, float("nan"), n_iter)


def align_landmarks(source_landmarks, target_landmarks, params: CoarseParams = CoarseParams(),
                    rng=None) -> CoarseAlignment:
    """Robust rigid transform of a view onto the pivot from the landmarks both lifted.

    RANSAC over random triplets of shared landmarks (Kabsch on each, consensus =
    residual below ``inlier_threshold_mm``), then ``n_refits`` least-squares refits on
    the consensus set (the set is recomputed after each fit).

    Parameters
    ----------
    source_landmarks : (k, 3) float64
        Landmarks of the view to move (mm), NaN rows where not lifted (k = 106 normally).
    target_landmarks : (k, 3) float64
        The pivot's landmarks, same ordering.
    params : CoarseParams
    rng : numpy.random.Generator or int or None
        Randomness of the triplet draws.

    Returns
    -------
    CoarseAlignment
        ``converged = False`` with the identity transform and a reason when fewer than
        ``params.min_shared`` landmarks are shared or the consensus is below
        ``params.min_inliers``.

    Raises
    ------
    ValueError
        Shapes differ, infinite values, or a row that is partly NaN.
    """
    src = as_array(source_landmarks, "source_landmarks", (None, 3))
    dst = as_array(target_landmarks, "target_landmarks", (src.shape[0], 3))
    for name, a in (("source_landmarks", src), ("target_landmarks", dst)):
        if np.any(np.isinf(a)):
            raise ValueError(f"{name}: contains infinite values")
        part = np.isnan(a).any(axis=1) != np.isnan(a).all(axis=1)
        if part.any():
            raise ValueError(f"{name}: rows {np.flatnonzero(part).tolist()} are partly NaN (a row is all NaN or finite)")
    if not isinstance(params, CoarseParams):
        raise ValueError(f"params: expected CoarseParams, got {type(params).__name__}")
    gen = as_rng(rng)
    k = src.shape[0]
    shared = np.isfinite(src[:, 0]) & np.isfinite(dst[:, 0])
    idx = np.flatnonzero(shared)
    n = idx.size
    if n < params.min_shared:
        return _fallback(f"only {n} shared landmarks (minimum {params.min_shared})", n, k)
    S, D = src[idx], dst[idx]
    thr2 = params.inlier_threshold_mm ** 2

    # RANSAC: all trials at once (a batch of 3-point Kabsch fits)
    tri = np.stack([gen.choice(n, 3, replace=False) for _ in range(params.n_trials)])
    a, b, c = S[tri[:, 0]], S[tri[:, 1]], S[tri[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    a2, b2, c2 = D[tri[:, 0]], D[tri[:, 1]], D[tri[:, 2]]
    area_d = 0.5 * np.linalg.norm(np.cross(b2 - a2, c2 - a2), axis=1)
    keep = (area >= params.min_triplet_area_mm2) & (area_d >= params.min_triplet_area_mm2)
    if not keep.any():
        return _fallback(f"all {params.n_trials} landmark triplets are degenerate (area < "
                         f"{params.min_triplet_area_mm2} mm^2)", n, k, params.n_trials)
    T = _batch_kabsch(S[tri[keep]], D[tri[keep]])
    res = np.einsum("mij,nj->mni", T[:, :3, :3], S) + T[:, None, :3, 3] - D[None]
    r2 = np.einsum("mni,mni->mn", res, res)
    inl = r2 < thr2
    count = inl.sum(axis=1)
    # best consensus; ties broken by the smaller inlier cost
    cost = np.where(inl, r2, 0.0).sum(axis=1)
    best = np.lexsort((cost, -count))[0]
    mask = inl[best]
    n_iter = params.n_trials
    Tb = T[best]
    for _ in range(params.n_refits):
        if mask.sum() < 3:
            break
        Tb = _kabsch(S[mask], D[mask], np.ones(int(mask.sum())))
        r2b = np.sum((S @ Tb[:3, :3].T + Tb[:3, 3] - D) ** 2, axis=1)
        new = r2b < thr2
        n_iter += 1
        if np.array_equal(new, mask):
            break
        mask = new
    inliers = np.zeros(k, bool)
    inliers[idx[mask]] = True
    n_inl = int(mask.sum())
    if n_inl < params.min_inliers:
        return _fallback(f"only {n_inl} of {n} shared landmarks agree within {params.inlier_threshold_mm} mm "
                         f"(minimum {params.min_inliers})", n, k, n_iter, inliers, n_inl)
    r2b = np.sum((S[mask] @ Tb[:3, :3].T + Tb[:3, 3] - D[mask]) ** 2, axis=1)
    return CoarseAlignment(Tb, True, "ok", "", n, n_inl, inliers, float(np.sqrt(r2b.mean())), n_iter)
