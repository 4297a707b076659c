"""Stage 1 of the registration (paper section 4.1): a similarity from landmarks.

"We first estimate the transformation matrix between the landmarks of T and S, and then
use the obtained transformation matrices to transform T to S."

:func:`fit_similarity` estimates ``y = s R x + t`` (Umeyama 1991, with scale) from the
template's 106 landmarks to the scan's fused landmarks: RANSAC over random landmark
triplets (consensus = residual below ``inlier_threshold_mm``), then an IRLS refit with
Cauchy weights over every usable landmark. The template is the mean neutral face and the
scan carries identity and expression (an open jaw moves the chin landmarks by up to
~30 mm), so the fit must follow the rigid majority (forehead, eyes, nose) and not the
least-squares compromise; the same robustness rejects a few wrong landmarks.
:func:`landmark_outliers` flags landmarks that disagree with their neighbours (used to
drop wrong landmarks from the NICP landmark term without dropping expression motion).
:func:`polish_rigid` optionally refines the similarity by a few rigid point-to-plane ICP
iterations of the template's face onto the scan surface.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kernels._checks import as_array, as_rng, check_int, check_number, check_point_pairs

__all__ = ["SimilarityParams", "Similarity", "umeyama", "fit_similarity", "refit_similarity", "landmark_outliers",
           "polish_rigid", "apply_similarity"]


@dataclass(frozen=True)
class SimilarityParams:
    """Parameters of :func:`fit_similarity` and :func:`polish_rigid`.

    Attributes
    ----------
    min_landmarks : int
        Minimum number of usable landmarks (finite in the scan; default 6). Fewer is a
        ``ValueError``: the registration cannot be initialised.
    inlier_threshold_mm : float
        RANSAC consensus / reported inlier threshold on the residual (default 5 mm).
        After a similarity the mean face differs from a neutral subject by a median
        1.5-3.5 mm at the landmarks (identity); expression and wrong landmarks move
        them by much more.
    n_trials : int
        RANSAC triplets (default 400).
    min_triplet_area_mm2 : float
        Degenerate triplets (triangle area below this on either side) are skipped
        (default 100 mm^2).
    irls_iterations : int
        Cauchy-weighted Umeyama refits after RANSAC (default 10).
    irls_scale_mm : float
        Scale ``c`` of the Cauchy weight ``1 / (1 + (r / c)^2)`` (default 3 mm).
    scale_range : tuple of float
        Allowed scale ``s`` (default (0.7, 1.4)); every fit clips its scale to it (the
        translation follows the clipped scale). A narrow range around 1 makes stage 1
        rigid.
    icp_iterations : int
        Rigid ICP polish iterations (default 0 = off; see :func:`polish_rigid`).
    icp_max_distance_mm : float
        ICP correspondences farther than this are ignored (default 4 mm).
    """

    min_landmarks: int = 6
    inlier_threshold_mm: float = 5.0
    n_trials: int = 400
    min_triplet_area_mm2: float = 100.0
    irls_iterations: int = 10
    irls_scale_mm: float = 3.0
    scale_range: tuple = (0.7, 1.4)
    icp_iterations: int = 0
    icp_max_distance_mm: float = 4.0

    def __post_init__(self):
        check_int(self.min_landmarks, "SimilarityParams.min_landmarks", 3)
        check_number(self.inlier_threshold_mm, "SimilarityParams.inlier_threshold_mm", lo=0, lo_open=True)
        check_int(self.n_trials, "SimilarityParams.n_trials", 1)
        check_number(self.min_triplet_area_mm2, "SimilarityParams.min_triplet_area_mm2", lo=0)
        check_int(self.irls_iterations, "SimilarityParams.irls_iterations", 0)
        check_number(self.irls_scale_mm, "SimilarityParams.irls_scale_mm", lo=0, lo_open=True)
        sr = tuple(self.scale_range)
        if len(sr) != 2 or not (0 < float(sr[0]) < 1.0 < float(sr[1]) < np.inf):
            raise ValueError(f"SimilarityParams.scale_range: expected (lo, hi) with 0 < lo < 1 < hi, "
                             f"got {self.scale_range!r}")
        object.__setattr__(self, "scale_range", (float(sr[0]), float(sr[1])))
        check_int(self.icp_iterations, "SimilarityParams.icp_iterations", 0)
        check_number(self.icp_max_distance_mm, "SimilarityParams.icp_max_distance_mm", lo=0, lo_open=True)


@dataclass(frozen=True)
class Similarity:
    """A similarity ``y = scale * rotation @ x + translation`` (template -> scan, mm).

    Attributes
    ----------
    scale : float
    rotation : (3, 3) float64
        Proper rotation.
    translation : (3,) float64
        mm.
    inliers : (k,) bool
        Landmarks with residual below the inlier threshold after the final fit.
    residuals_mm : (k,) float64
        Residual of each landmark after the final fit (NaN where unusable).
    n_usable : int
        Landmarks finite in the scan.
    n_inliers : int
    rmse_mm : float
        RMS residual of the inliers.
    icp_iterations : int
        Rigid polish iterations run (0 when off).
    icp_rmse_mm : float
        RMS point-to-plane residual of the polish's last iteration (NaN when off).
    """

    scale: float
    rotation: np.ndarray
    translation: np.ndarray
    inliers: np.ndarray
    residuals_mm: np.ndarray
    n_usable: int
    n_inliers: int
    rmse_mm: float
    icp_iterations: int = 0
    icp_rmse_mm: float = float("nan")

    @property
    def matrix(self) -> np.ndarray:
        """(4, 4) homogeneous matrix of the similarity."""
        T = np.eye(4)
        T[:3, :3] = self.scale * self.rotation
        T[:3, 3] = self.translation
        return T


def apply_similarity(sim: Similarity, points) -> np.ndarray:
    """(n, 3) ``sim`` applied to points (n, 3) mm."""
    return sim.scale * np.asarray(points, float) @ sim.rotation.T + sim.translation


def _umeyama(src: np.ndarray, dst: np.ndarray, w: np.ndarray, lo: float = 0.0, hi: float = np.inf):
    """Weighted Umeyama; the scale is clipped to [lo, hi] (the translation follows the clipped scale)."""
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    S, D = src - ms, dst - md
    C = (D * w[:, None]).T @ S
    U, sig, Vt = np.linalg.svd(C)
    d = np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0
    E = np.array([1.0, 1.0, d])
    R = (U * E) @ Vt
    var = float(w @ np.einsum("ij,ij->i", S, S))
    s = float(np.clip(np.dot(sig, E) / var, lo, hi)) if var > 0 else 1.0
    return s, R, md - s * R @ ms


def umeyama(src, dst, weights=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991, Eq. 40-42).

    Parameters
    ----------
    src, dst : (n, 3) float64
        Corresponding points (mm), n >= 3, finite.
    weights : (n,) float64, optional
        Non-negative, positive sum (default all 1).

    Returns
    -------
    scale : float
    rotation : (3, 3) float64
    translation : (3,) float64

    Raises
    ------
    ValueError
        Shapes differ, n < 3, non-finite values, bad weights.
    """
    src, dst, w = check_point_pairs(src, dst, weights)
    return _umeyama(src, dst, w)


def _batch_umeyama(src: np.ndarray, dst: np.ndarray, lo: float, hi: float):
    """Umeyama of a batch (m, k, 3) -> scales (m,) clipped to [lo, hi], rotations, translations."""
    ms, md = src.mean(axis=1, keepdims=True), dst.mean(axis=1, keepdims=True)
    S, D = src - ms, dst - md
    C = np.einsum("mki,mkj->mij", D, S) / src.shape[1]
    U, sig, Vt = np.linalg.svd(C)
    d = np.sign(np.linalg.det(U) * np.linalg.det(Vt))
    d[d == 0] = 1.0
    U[:, :, 2] *= d[:, None]
    sig[:, 2] *= d
    R = U @ Vt
    var = np.einsum("mki,mki->m", S, S) / src.shape[1]
    s = np.clip(sig.sum(axis=1) / np.maximum(var, 1e-300), lo, hi)
    t = md[:, 0] - s[:, None] * np.einsum("mij,mj->mi", R, ms[:, 0])
    return s, R, t


def _check_landmarks(a: np.ndarray, name: str) -> None:
    if np.any(np.isinf(a)):
        raise ValueError(f"{name}: contains infinite values")
    part = np.isnan(a).any(axis=1) != np.isnan(a).all(axis=1)
    if part.any():
        raise ValueError(f"{name}: rows {np.flatnonzero(part).tolist()[:10]} are partly NaN "
                         f"(a row is all NaN or finite)")


def _landmark_pairs(template_landmarks, scan_landmarks, need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked (k, 3) template and scan landmarks and the indices of the usable (finite) scan rows.

    Raises ``ValueError`` for bad shapes, infinite values, partly-NaN rows, all rows NaN, or fewer
    than ``need`` usable rows.
    """
    src = as_array(template_landmarks, "template_landmarks", (None, 3), finite=True)
    dst = as_array(scan_landmarks, "scan_landmarks", (src.shape[0], 3))
    _check_landmarks(dst, "scan_landmarks")
    ok = np.isfinite(dst[:, 0])
    n = int(ok.sum())
    if n == 0:
        raise ValueError(f"scan_landmarks: all {src.shape[0]} rows are NaN (no landmark was seen); cannot initialise")
    if n < need:
        raise ValueError(f"scan_landmarks: only {n} usable (finite) landmarks, need at least {need}")
    return src, dst, np.flatnonzero(ok)


def _irls_similarity(S, D, s, R, t, r, idx, k: int, params: "SimilarityParams") -> "Similarity":
    """IRLS refits (Cauchy weights of scale ``irls_scale_mm``) from ``(s, R, t)`` with residuals ``r`` of the
    usable pairs ``S -> D`` (rows ``idx`` of ``k`` landmarks), then residuals, inliers and RMSE as a Similarity."""
    lo, hi = params.scale_range
    c = params.irls_scale_mm
    for _ in range(params.irls_iterations):
        s, R, t = _umeyama(S, D, 1.0 / (1.0 + (r / c) ** 2), lo, hi)
        r = np.linalg.norm(s * S @ R.T + t - D, axis=1)
    thr = params.inlier_threshold_mm
    res = np.full(k, np.nan)
    res[idx] = r
    inliers = np.zeros(k, bool)
    inliers[idx] = r < thr
    n_in = int(inliers.sum())
    rmse = float(np.sqrt(np.mean(r[r < thr] ** 2))) if n_in else float("nan")
    return Similarity(float(s), R, t, inliers, res, len(idx), n_in, rmse)


def fit_similarity(template_landmarks, scan_landmarks, params: SimilarityParams = SimilarityParams(),
                   rng=None) -> Similarity:
    """Robust similarity taking the template's landmarks onto the scan's.

    RANSAC over random triplets of usable landmarks (batched Umeyama on each, scale
    clipped to ``params.scale_range``; triplets with a small area are skipped; consensus =
    residual < ``inlier_threshold_mm``, ties broken by the inliers' cost), then
    ``irls_iterations`` Umeyama refits over all usable landmarks with Cauchy weights of
    scale ``irls_scale_mm`` starting from the best triplet's residuals.

    Parameters
    ----------
    template_landmarks : (k, 3) float64
        Template landmarks (mm), finite.
    scan_landmarks : (k, 3) float64
        Scan landmarks (mm); NaN rows are unusable (not seen by any view).
    params : SimilarityParams
    rng : numpy.random.Generator or int or None
        Randomness of the triplet draws.

    Returns
    -------
    Similarity

    Raises
    ------
    ValueError
        Shapes, infinite values, partly-NaN rows, all scan landmarks NaN, or fewer
        than ``params.min_landmarks`` usable landmarks.
    """
    if not isinstance(params, SimilarityParams):
        raise ValueError(f"params: expected SimilarityParams, got {type(params).__name__}")
    src, dst, idx = _landmark_pairs(template_landmarks, scan_landmarks, params.min_landmarks)
    k, n = src.shape[0], len(idx)
    S, D = src[idx], dst[idx]
    gen = as_rng(rng)
    thr = params.inlier_threshold_mm
    lo, hi = params.scale_range
    tri = np.stack([gen.choice(n, 3, replace=False) for _ in range(params.n_trials)])

    def area(P):
        return 0.5 * np.linalg.norm(np.cross(P[:, 1] - P[:, 0], P[:, 2] - P[:, 0]), axis=1)

    keep = (area(S[tri]) >= params.min_triplet_area_mm2) & (area(D[tri]) >= params.min_triplet_area_mm2)
    s_all = np.ones(n)
    if keep.any():
        s_b, R_b, t_b = _batch_umeyama(S[tri[keep]], D[tri[keep]], lo, hi)
    else:
        s_b = np.zeros(0)
    if s_b.size:
        pred = s_b[:, None, None] * np.einsum("mij,nj->mni", R_b, S) + t_b[:, None]
        r = np.linalg.norm(pred - D[None], axis=2)
        inl = r < thr
        cost = np.where(inl, r, thr).sum(axis=1)
        best = int(np.argmin(cost))  # MSAC: inliers cost r, outliers the threshold
        s_all = r[best]
        s, R, t = s_b[best], R_b[best], t_b[best]
    else:  # every triplet degenerate: plain least squares start
        s, R, t = _umeyama(S, D, np.ones(n), lo, hi)
        s_all = np.linalg.norm(s * S @ R.T + t - D, axis=1)
    return _irls_similarity(S, D, s, R, t, s_all, idx, k, params)


def refit_similarity(template_landmarks, scan_landmarks, sim: Similarity,
                     params: SimilarityParams = SimilarityParams()) -> Similarity:
    """Refit a similarity from a start: ``params.irls_iterations`` Cauchy-weighted Umeyama fits.

    Used after the jaw stage (:mod:`kernels.jaw`): with the template's jaw posed, the
    chin and lower-lip landmarks agree with the rigid majority again and the robust fit
    can use them. The weights start from the residuals of ``sim``.

    Parameters
    ----------
    template_landmarks : (k, 3) float64
        Template landmarks (mm), finite.
    scan_landmarks : (k, 3) float64
        Scan landmarks (mm), NaN rows unusable.
    sim : Similarity
        Start.
    params : SimilarityParams
        ``irls_iterations``, ``irls_scale_mm``, ``scale_range``, ``inlier_threshold_mm``.

    Returns
    -------
    Similarity
        New scale / rotation / translation, inliers and residuals; the polish fields of
        ``sim`` are kept.

    Raises
    ------
    ValueError
        Shapes, infinite values, partly-NaN rows, fewer than 3 usable landmarks.
    """
    if not isinstance(sim, Similarity):
        raise ValueError(f"sim: expected a Similarity, got {type(sim).__name__}")
    if not isinstance(params, SimilarityParams):
        raise ValueError(f"params: expected SimilarityParams, got {type(params).__name__}")
    src, dst, idx = _landmark_pairs(template_landmarks, scan_landmarks, 3)
    k = src.shape[0]
    S, D = src[idx], dst[idx]
    s, R, t = sim.scale, np.asarray(sim.rotation, float), np.asarray(sim.translation, float)
    r = np.linalg.norm(s * S @ R.T + t - D, axis=1)
    out = _irls_similarity(S, D, s, R, t, r, idx, k, params)
    return replace(out, icp_iterations=sim.icp_iterations, icp_rmse_mm=sim.icp_rmse_mm)


UPPER_LIP = (85, 86, 87, 88, 89, 97, 98, 99)
LOWER_LIP = (91, 92, 93, 94, 95, 101, 102, 103)


def landmark_outliers(template_landmarks, scan_landmarks, sim: Similarity, tolerance_mm: float = 7.0,
                      neighbours: int = 10, ridge: float = 30.0, agree_mm: float = 6.0,
                      agree_neighbours: int = 4, upper_lip=UPPER_LIP, lower_lip=LOWER_LIP) -> np.ndarray:
    """Landmarks whose motion is explained neither by their neighbourhood nor by a near neighbour.

    The motion of landmark k is ``d_k = y_k - sim(x_k)``. Expression moves neighbouring
    landmarks coherently (the jaw, a lip, a lid; with stretch), a wrong landmark moves
    alone. k is an outlier when both

    1. the local affine prediction of ``d_k`` from its ``neighbours`` nearest usable
       template landmarks (ridge-regularised fit ``d = A (x - x_k) + b``, prediction
       ``b``; two passes, the second without the first pass's outliers) misses by more
       than ``tolerance_mm``; upper-lip landmarks never use lower-lip ones as neighbours
       and vice versa (an open jaw separates them), a mouth corner takes the better of the
       two sides; and
    2. none of its ``agree_neighbours`` nearest landmarks moves within ``agree_mm`` of it.

    Parameters
    ----------
    template_landmarks : (k, 3) float64
    scan_landmarks : (k, 3) float64
        NaN rows are never outliers (they are unusable anyway).
    sim : Similarity
    tolerance_mm, ridge, agree_mm : float
    neighbours, agree_neighbours : int
    upper_lip, lower_lip : sequence of int
        Index sets kept apart (default: the 106-point convention of ``docs/landmarks.md``).

    Returns
    -------
    (k,) bool
    """
    src = as_array(template_landmarks, "template_landmarks", (None, 3), finite=True)
    dst = as_array(scan_landmarks, "scan_landmarks", (src.shape[0], 3))
    ok = np.flatnonzero(np.isfinite(dst[:, 0]))
    out = np.zeros(src.shape[0], bool)
    if ok.size < 5:
        return out
    x = src[ok]
    d = dst[ok] - apply_similarity(sim, x)
    D = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(D, np.inf)
    up = np.isin(ok, upper_lip)
    lo = np.isin(ok, lower_lip)
    reg = np.diag([ridge, ridge, ridge, 0.0])
    flag = np.zeros(ok.size, bool)

    def miss(i, allowed):
        Di = np.where(allowed & ~flag, D[i], np.inf)
        j = np.argsort(Di)[:neighbours]
        j = j[np.isfinite(Di[j])]
        if j.size < 4:
            return 0.0
        M = np.column_stack([x[j] - x[i], np.ones(j.size)])
        coef = np.linalg.solve(M.T @ M + reg, M.T @ d[j])
        return float(np.linalg.norm(d[i] - coef[3]))

    for _ in range(2):
        res = np.array([min(miss(i, a) for a in ([~lo] if not lo[i] else []) + ([~up] if not up[i] else []))
                        for i in range(ok.size)])
        flag = res > tolerance_mm
    nb = np.argsort(D, axis=1)[:, :min(agree_neighbours, ok.size - 1)]
    alone = ~np.any(np.linalg.norm(d[nb] - d[:, None], axis=2) < agree_mm, axis=1)
    out[ok] = flag & alone
    return out


def polish_rigid(template_points, template_normals, closest, sim: Similarity,
                 params: SimilarityParams = SimilarityParams()) -> Similarity:
    """Refine a similarity by rigid point-to-plane ICP of template points onto the scan.

    Each iteration: the template points under the current similarity are matched to
    their closest scan-surface points (``closest``), pairs farther than
    ``params.icp_max_distance_mm`` or with normals more than 60 degrees apart are
    dropped, and the linearised point-to-plane rigid update is applied (the scale is
    kept). ``params.icp_iterations`` iterations.

    Parameters
    ----------
    template_points : (n, 3) float64
        Template points in the template frame (mm), e.g. its face-region vertices.
    template_normals : (n, 3) float64
        Their unit normals (template frame).
    closest : callable
        ``closest(points (n, 3)) -> (points (n, 3), normals (n, 3), ok (n,) bool)``: the
        closest scan-surface points, unit face normals and whether they are usable (not
        on the scan boundary).
    sim : Similarity
        Start.
    params : SimilarityParams

    Returns
    -------
    Similarity
        Same scale, refined rotation and translation, ``icp_iterations`` and
        ``icp_rmse_mm`` set; landmark fields as ``sim``.
    """
    P0 = as_array(template_points, "template_points", (None, 3), finite=True)
    N0 = as_array(template_normals, "template_normals", (P0.shape[0], 3), finite=True)
    R, t = sim.rotation.copy(), sim.translation.copy()
    rmse = float("nan")
    it = 0
    for it in range(1, params.icp_iterations + 1):
        P = sim.scale * P0 @ R.T + t
        N = N0 @ R.T
        Q, NQ, ok = closest(P)
        r = np.einsum("ij,ij->i", P - Q, NQ)
        dist = np.linalg.norm(P - Q, axis=1)
        use = ok & (dist < params.icp_max_distance_mm) & (np.einsum("ij,ij->i", N, NQ) > 0.5)
        if use.sum() < 6:
            break
        Pu, Nu, ru = P[use], NQ[use], r[use]
        J = np.hstack([np.cross(Pu, Nu), Nu])          # d r / d (omega, dt)
        x = np.linalg.lstsq(J, -ru, rcond=None)[0]
        w, dt = x[:3], x[3:]
        th = np.linalg.norm(w)
        if th > 0:
            k = w / th
            Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
            dR = np.eye(3) + np.sin(th) * Kx + (1 - np.cos(th)) * Kx @ Kx
        else:
            dR = np.eye(3)
        R, t = dR @ R, dR @ t + dt
        rmse = float(np.sqrt(np.mean((ru + J @ x) ** 2)))
        if th < 1e-6 and np.linalg.norm(dt) < 1e-4:
            break
    return Similarity(sim.scale, R, t, sim.inliers, sim.residuals_mm, sim.n_usable, sim.n_inliers, sim.rmse_mm,
                      it, rmse)
