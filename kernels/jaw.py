"""Stage 1b of the registration: the template's articulated jaw posed to the scan.

A template may carry a jaw rig (:class:`kernels.template.JawRig`: a hinge axis through a
pivot and per-vertex skinning weights, 1 on the chin / lower lip / jaw, 0 on the upper
face; the default template's comes from the synthetic model's jaw definition). After the
stage-1 similarity, :func:`fit_jaw` estimates the one opening angle ``a`` (bounded) that
best explains

* the scan's landmarks on the jaw (landmarks whose template jaw weight is at least
  ``JawParams.landmark_min_weight``: lower lip outer / inner, chin contour when seen),
  Cauchy-weighted, and
* a trimmed closest-point term on the scan surface over template vertices with a jaw
  weight of at least ``JawParams.icp_min_weight`` (rejected: farther than
  ``icp_max_distance_mm``, normal angle > 60 degrees, on the scan's boundary; then the
  worst ``1 - icp_keep`` of the rest),

by a grid search over the angle range on the landmark term, then Gauss-Newton iterations on
the sum of both terms with the correspondences re-found each iteration.
:func:`pose_jaw` turns vertex i about the hinge by ``w_i * a`` (the weighted-angle form of
skinning with one joint: unlike linear blend skinning of the rotated and rest positions,
it keeps the distance to the hinge, so the partly weighted cheeks do not shrink towards
the chord). The hinge axis is one for all vertices or one per vertex (the default template
turns each vertex in its meridian plane about the head centre, as the synthetic model's
jaw does; a single ear-to-ear axis leaves 10-15 mm on the sides of the jaw there). An
estimate below ``JawParams.dead_zone_deg`` (3 degrees) is set to 0 (identity differences
of the lower face read as up to ~2.6 degrees of opening). The NICP of stage 2 then starts from -- and
regularises deviations from -- the posed template, so the stiffness no longer has to
carry a 10-30 mm jaw rotation.

The angle comes from the landmarks: a jaw turning about the head centre slides along a
near-spherical surface, so the surface term hardly constrains it (measured: the same
angles to 0.1 degree with and without it); it is kept as a guard for templates whose
hinge is not at the centre of curvature of the jaw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kernels._checks import as_array, check_int, check_number

__all__ = ["JawParams", "JawFit", "JawIteration", "pose_jaw", "fit_jaw", "transform_rig"]


@dataclass(frozen=True)
class JawParams:
    """Parameters of :func:`fit_jaw` (the registration's stage 1b).

    Attributes
    ----------
    enabled : bool
        Run the stage when the template has a jaw rig (default True).
    angle_range_deg : tuple of float
        Bounds of the opening angle (default (-10, 40) degrees; positive opens).
    grid_step_deg : float
        Step of the initial grid search over the range on the landmark term (default 1).
    landmark_min_weight : float
        Landmarks whose template jaw weight is below this do not enter the fit (default
        0.3; they hardly move with the jaw).
    min_landmarks : int
        With fewer usable jaw landmarks the stage is skipped (angle 0; default 3): the
        surface term alone cannot tell the angle (a jaw turning about the head centre
        slides along a near-spherical surface).
    landmark_scale_mm : float
        Scale ``c`` of the Cauchy weights ``1 / (1 + (r / c)^2)`` of the landmark
        residuals (default 3 mm: identity differences between the template and the
        subject are 1.5-3.5 mm; a wrong landmark is further off).
    icp_iterations : int
        Gauss-Newton iterations with re-found closest points (default 2; 0 = landmarks
        only).
    icp_weight : float
        Weight of the surface term relative to the landmark term (default 0.5; both are
        means, of squared mm).
    icp_min_weight : float
        Template vertices with a jaw weight at least this enter the surface term
        (default 0.5).
    icp_points : int
        At most this many of them, a fixed seeded subset (default 800).
    icp_max_distance_mm : float
        Closest points farther than this are rejected (default 5 mm).
    icp_keep : float
        Fraction of the remaining correspondences kept, the closest (default 0.8).
    max_normal_angle_deg : float
        Correspondences whose scan normal is farther than this from the template normal
        are rejected (default 60).
    convergence_deg : float
        Gauss-Newton stops when the angle changes by less than this (default 0.01).
    seed : int
        Seed of the vertex subset (default 0).
    dead_zone_deg : float
        Estimates smaller than this in magnitude are set to 0 (default 3 degrees): the
        lower face of a subject differs from the template's by what the landmarks read as
        -1.2 to +2.6 degrees of opening on closed-mouth expressions (5 subjects); a
        closed mouth posed open costs more than a small opening left to the NICP. Larger
        estimates are kept as they are (shrinking them too lost 0.01-0.1 mm on open
        jaws).
    refit_similarity : bool
        After posing, refit the similarity on the posed template's landmarks
        (:func:`kernels.similarity.refit_similarity`; default True).
    """

    enabled: bool = True
    angle_range_deg: tuple = (-10.0, 40.0)
    grid_step_deg: float = 1.0
    landmark_min_weight: float = 0.3
    min_landmarks: int = 3
    landmark_scale_mm: float = 3.0
    icp_iterations: int = 2
    icp_weight: float = 0.5
    icp_min_weight: float = 0.5
    icp_points: int = 800
    icp_max_distance_mm: float = 5.0
    icp_keep: float = 0.8
    max_normal_angle_deg: float = 60.0
    convergence_deg: float = 0.01
    seed: int = 0
    dead_zone_deg: float = 3.0
    refit_similarity: bool = True

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"JawParams.enabled: expected a bool, got {self.enabled!r}")
        try:
            lo, hi = (float(x) for x in self.angle_range_deg)
        except (TypeError, ValueError):
            raise ValueError(f"JawParams.angle_range_deg: expected (low, high) degrees, got "
                             f"{self.angle_range_deg!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and -90.0 <= lo < hi <= 90.0):
            raise ValueError(f"JawParams.angle_range_deg: need -90 <= low < high <= 90, got {self.angle_range_deg!r}")
        object.__setattr__(self, "angle_range_deg", (lo, hi))
        check_number(self.grid_step_deg, "JawParams.grid_step_deg", lo=0, lo_open=True, hi=10)
        check_number(self.landmark_min_weight, "JawParams.landmark_min_weight", lo=0, lo_open=True, hi=1)
        check_int(self.min_landmarks, "JawParams.min_landmarks", 1)
        check_number(self.landmark_scale_mm, "JawParams.landmark_scale_mm", lo=0, lo_open=True)
        check_int(self.icp_iterations, "JawParams.icp_iterations", 0)
        check_number(self.icp_weight, "JawParams.icp_weight", lo=0)
        check_number(self.icp_min_weight, "JawParams.icp_min_weight", lo=0, lo_open=True, hi=1)
        check_int(self.icp_points, "JawParams.icp_points", 10)
        check_number(self.icp_max_distance_mm, "JawParams.icp_max_distance_mm", lo=0, lo_open=True)
        check_number(self.icp_keep, "JawParams.icp_keep", lo=0, lo_open=True, hi=1)
        check_number(self.max_normal_angle_deg, "JawParams.max_normal_angle_deg", lo=0, lo_open=True, hi=180)
        check_number(self.convergence_deg, "JawParams.convergence_deg", lo=0)
        check_int(self.seed, "JawParams.seed", 0)
        check_number(self.dead_zone_deg, "JawParams.dead_zone_deg", lo=0, hi=10)
        if not isinstance(self.refit_similarity, bool):
            raise ValueError(f"JawParams.refit_similarity: expected a bool, got {self.refit_similarity!r}")


@dataclass(frozen=True)
class JawIteration:
    """One Gauss-Newton iteration of :func:`fit_jaw`.

    Attributes
    ----------
    iteration : int
    angle_deg : float
        Angle after the iteration.
    landmark_rmse_mm : float
        RMS residual of the jaw landmarks before the update.
    surface_mm : float
        Mean distance of the kept surface correspondences before the update (NaN
        without the surface term).
    n_points : int
        Surface correspondences kept.
    """

    iteration: int
    angle_deg: float
    landmark_rmse_mm: float
    surface_mm: float
    n_points: int


@dataclass(frozen=True)
class JawFit:
    """Outcome of :func:`fit_jaw`.

    Attributes
    ----------
    angle_deg : float
        Estimated opening angle after the dead zone (0 when skipped).
    raw_angle_deg : float
        Before the dead zone (0 when skipped).
    skipped : str
        Empty when fitted, else why the stage did not run.
    n_landmarks : int
        Jaw landmarks used.
    landmark_rmse_mm : float
        RMS residual of the jaw landmarks at the estimated angle (NaN when skipped).
    at_bound : bool
        The angle reached a bound of ``angle_range_deg``.
    iterations : tuple of JawIteration
    time_s : float
    """

    angle_deg: float
    raw_angle_deg: float
    skipped: str
    n_landmarks: int
    landmark_rmse_mm: float
    at_bound: bool
    iterations: tuple
    time_s: float


def _rotate(D: np.ndarray, k: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rodrigues: rows of ``D`` turned about unit ``k`` ((3,) or one per row) by per-row angles ``theta`` (rad)."""
    k = np.broadcast_to(k, D.shape)
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    return D * c + np.cross(k, D) * s + k * np.einsum("ij,ij->i", D, k)[:, None] * (1.0 - c)


def _unit_axes(axis: np.ndarray, n: int, name: str) -> np.ndarray:
    """(3,) or (n, 3) axes -> unit rows (3,) or (n, 3); ValueError on zero rows."""
    if axis.shape not in ((3,), (n, 3)):
        raise ValueError(f"{name}: expected shape (3,) or ({n}, 3), got {tuple(axis.shape)}")
    nrm = np.linalg.norm(axis, axis=-1, keepdims=True)
    if np.any(nrm < 1e-12):
        raise ValueError(f"{name}: must be non-zero")
    return axis / nrm


def pose_jaw(vertices, weights, pivot, axis, angle_deg: float) -> np.ndarray:
    """Pose the jaw: vertex i turns about the hinge by ``weights[i] * angle``.

    Parameters
    ----------
    vertices : (n, 3) float64
        mm.
    weights : (n,) float64
        Jaw weights in [0, 1].
    pivot : (3,) float64
        Point on the hinge axis, mm (same frame as ``vertices``).
    axis : (3,) or (n, 3) float64
        Hinge direction, one for all vertices or one per vertex (normalised here).
    angle_deg : float
        Opening angle, degrees (positive opens about a right-handed ``axis``).

    Returns
    -------
    (n, 3) float64
        Posed vertices, mm (a new array).

    Raises
    ------
    ValueError
        Bad shapes, non-finite values, a zero axis.
    """
    V = as_array(vertices, "vertices", (None, 3), finite=True)
    W = as_array(weights, "weights", (V.shape[0],), finite=True)
    p = as_array(pivot, "pivot", (3,), finite=True)
    k = _unit_axes(as_array(axis, "axis", None, finite=True), V.shape[0], "axis")
    a = check_number(angle_deg, "angle_deg")
    return p + _rotate(V - p, k, np.radians(a) * W)


def transform_rig(pivot, axis, scale: float, rotation: np.ndarray, translation: np.ndarray):
    """Pivot (3,) and axis ((3,) or (n, 3)) of a jaw rig after the similarity ``x -> scale R x + t``."""
    R = np.asarray(rotation, float)
    return scale * R @ np.asarray(pivot, float) + np.asarray(translation, float), np.asarray(axis, float) @ R.T


def fit_jaw(vertices, normals, weights, pivot, axis, landmark_points, landmark_weights, landmark_axes,
            scan_landmarks, landmark_mask, closest, params: JawParams = JawParams()) -> JawFit:
    """Estimate the jaw opening angle of a similarity-aligned template on a scan.

    Parameters
    ----------
    vertices : (n, 3) float64
        Template vertices after the similarity (mm, scan frame).
    normals : (n, 3) float64
        Their unit normals (outwards).
    weights : (n,) float64
        Jaw weights of the template vertices.
    pivot : (3,) float64
        The hinge pivot in the scan frame (:func:`transform_rig`).
    axis : (3,) or (n, 3) float64
        The hinge axis in the scan frame, one or one per vertex.
    landmark_points : (k, 3) float64
        Template landmarks after the similarity (mm).
    landmark_weights : (k,) float64
        Jaw weights at the landmarks (barycentric interpolation).
    landmark_axes : (3,) or (k, 3) float64
        Hinge axes at the landmarks (scan frame; per-vertex axes interpolated).
    scan_landmarks : (k, 3) float64
        Scan landmarks (mm), NaN where unknown.
    landmark_mask : (k,) bool
        Landmarks allowed in the fit (e.g. not flagged as wrong).
    closest : callable
        ``closest(P) -> (Q, NQ, ok)``: closest scan points (m, 3), their unit normals
        oriented like the template's, and which are acceptable (not on the scan's boundary).
    params : JawParams

    Returns
    -------
    JawFit

    Raises
    ------
    ValueError
        Bad shapes or non-finite template inputs, params not JawParams.
    """
    t0 = time.perf_counter()
    if not isinstance(params, JawParams):
        raise ValueError(f"params: expected JawParams, got {type(params).__name__}")
    V = as_array(vertices, "vertices", (None, 3), finite=True)
    n = V.shape[0]
    N = as_array(normals, "normals", (n, 3), finite=True)
    W = as_array(weights, "weights", (n,), finite=True)
    p = as_array(pivot, "pivot", (3,), finite=True)
    k = _unit_axes(as_array(axis, "axis", None, finite=True), n, "axis")
    X = as_array(landmark_points, "landmark_points", (None, 3), finite=True)
    nl = X.shape[0]
    lw = as_array(landmark_weights, "landmark_weights", (nl,), finite=True)
    kl = _unit_axes(as_array(landmark_axes, "landmark_axes", None, finite=True), nl, "landmark_axes")
    Y = as_array(scan_landmarks, "scan_landmarks", (nl, 3))
    m = as_array(landmark_mask, "landmark_mask", (nl,), dtype=bool)
    lo, hi = np.radians(params.angle_range_deg[0]), np.radians(params.angle_range_deg[1])

    use = m & np.isfinite(Y).all(axis=1) & (lw >= params.landmark_min_weight)
    nL = int(use.sum())
    if nL < params.min_landmarks:
        return JawFit(0.0, 0.0, f"{nL} usable jaw landmarks (< {params.min_landmarks})", nL, float("nan"), False, (),
                      time.perf_counter() - t0)
    XL, YL, WL = X[use] - p, Y[use], lw[use]
    KL = kl[use] if kl.ndim == 2 else kl
    c2 = params.landmark_scale_mm ** 2

    def lm_pos(a):
        return p + _rotate(XL, KL, a * WL)

    # grid search on the robust landmark cost (avoids a local minimum far from 0)
    grid = np.arange(lo, hi + 1e-12, np.radians(params.grid_step_deg))
    th = (grid[:, None] * WL[None]).ravel()
    m_ = len(WL)
    PG = p + _rotate(np.tile(XL, (len(grid), 1)), np.tile(KL, (len(grid), 1)) if KL.ndim == 2 else KL, th)
    r2g = np.sum((PG - np.tile(YL, (len(grid), 1))) ** 2, axis=1).reshape(len(grid), m_)
    a = float(grid[int(np.argmin(np.sum(np.log1p(r2g / c2), axis=1)))])

    # surface term: a fixed subset of the jaw vertices
    sel = np.flatnonzero(W >= params.icp_min_weight)
    if sel.size > params.icp_points:
        sel = np.sort(np.random.default_rng(params.seed).choice(sel, params.icp_points, replace=False))
    VS, NS, WS = V[sel] - p, N[sel], W[sel]
    KS = k[sel] if k.ndim == 2 else k
    cos_max = np.cos(np.radians(params.max_normal_angle_deg))
    records = []
    n_iter = max(params.icp_iterations, 1) + 4   # landmark-only refinement when icp_iterations = 0
    for it in range(n_iter):
        # landmark term: residuals and Jacobian d pos / d a = w (k x (pos - p))
        PL = lm_pos(a)
        rL = PL - YL
        JL = WL[:, None] * np.cross(np.broadcast_to(KL, PL.shape), PL - p)
        r2 = np.sum(rL ** 2, axis=1)
        cw = 1.0 / (1.0 + r2 / c2)
        g = float(np.sum(cw * np.einsum("ij,ij->i", JL, rL))) / nL
        h = float(np.sum(cw * np.einsum("ij,ij->i", JL, JL))) / nL
        surf, n_pts = float("nan"), 0
        if params.icp_iterations > 0 and params.icp_weight > 0 and sel.size and it < params.icp_iterations:
            th = a * WS
            PS = p + _rotate(VS, KS, th)
            NSr = _rotate(NS, KS, th)
            Q, NQ, ok = closest(PS)
            d = np.linalg.norm(PS - Q, axis=1)
            ok = ok & (d <= params.icp_max_distance_mm) & (np.einsum("ij,ij->i", NQ, NSr) >= cos_max)
            if ok.sum() >= 10:
                idx = np.flatnonzero(ok)
                keep = idx[np.argsort(d[idx])[:max(10, int(np.ceil(params.icp_keep * idx.size)))]]
                rS = PS[keep] - Q[keep]
                JS = WS[keep, None] * np.cross(KS[keep] if KS.ndim == 2 else np.broadcast_to(KS, (keep.size, 3)),
                                               PS[keep] - p)
                g += params.icp_weight * float(np.sum(np.einsum("ij,ij->i", JS, rS))) / keep.size
                h += params.icp_weight * float(np.sum(np.einsum("ij,ij->i", JS, JS))) / keep.size
                surf, n_pts = float(d[keep].mean()), int(keep.size)
        step = -g / h if h > 0 else 0.0
        a_new = float(np.clip(a + step, lo, hi))
        records.append(JawIteration(it, float(np.degrees(a_new)), float(np.sqrt(np.mean(r2))), surf, n_pts))
        done = abs(a_new - a) < np.radians(params.convergence_deg) and it >= params.icp_iterations - 1
        a = a_new
        if done:
            break
    raw = float(np.degrees(a))
    if abs(a) < np.radians(params.dead_zone_deg):
        a = 0.0
    rmse = float(np.sqrt(np.mean(np.sum((lm_pos(a) - YL) ** 2, axis=1))))
    at_bound = bool(np.isclose(a, lo) or np.isclose(a, hi))
    return JawFit(float(np.degrees(a)), raw, "", nL, rmse, at_bound, tuple(records), time.perf_counter() - t0)
