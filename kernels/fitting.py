"""3DMM fitting to a scan: pose, shape and expression (paper section 5.3, Table 2 analogue).

The fitted surface is ``y = s R (mean + U a + E b) + t`` (model -> scan similarity).
Two stages (see ``docs/evaluation.md``):

1. **Landmarks.** Start from the similarity (Umeyama) taking the model mean's landmarks
   onto the scan landmarks (rows with a NaN are missing), then alternate
   (a) the coefficients for a fixed pose: linear least squares
   ``min s^2 |L(a, b) - z|^2 + landmark_reg * (sum a_k^2 / var_k + sum b_k^2 / var_k)``
   with ``z`` the targets mapped into the model frame (Tikhonov by the inverse prior
   variances; ``landmark_reg`` is the assumed landmark noise variance in mm^2, so the
   solution is the MAP estimate), and (b) the pose for fixed coefficients (Umeyama).
2. **Dense.** One Levenberg-Marquardt iteration per entry of the distance schedule on
   ``F = sum_i d_i^2 + w_lm sum_l |y_l - target_l|^2 + dense_reg * prior``, jointly in the
   pose increment (rotation, translation, log-scale) and the coefficients; ``d_i`` is the
   exact distance from model vertex ``i`` to the scan triangles. The Gauss-Newton model
   linearises ``d_i`` along the scan's smooth normal at the closest point
   (point-to-plane); a step is accepted only if the exact ``F`` (fresh closest points for
   the same vertices) decreases, otherwise the damping grows. Correspondences farther
   than the entry's ``dense_max_distance_mm``, on the scan's boundary (holes, border) or
   with normals more than ``max_normal_angle_deg`` apart are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.linalg import cho_factor, cho_solve
from scipy.linalg.blas import dsyrk

from kernels._checks import as_array, check_int, check_number
from kernels._geometry import (apply_transform as _apply, axis_angle_matrix as _rotation,
                              unit_face_normals as _face_normals)
from kernels.metrics import MeshIndex, check_mesh, mesh_boundary, on_boundary, similarity_fit
from kernels.model import N_LANDMARKS, MorphableModel

__all__ = ["FitParams", "FitIteration", "FitResult", "fit"]


@dataclass(frozen=True)
class FitParams:
    """Parameters of :func:`fit`.

    Attributes
    ----------
    landmark_iterations : int
        Pose / coefficient alternations of the landmark stage (default 10; stops early
        when no landmark moves by more than ``tolerance_mm``).
    landmark_reg : float
        Weight of the prior ``sum c_k^2 / var_k`` in the landmark stage (mm^2, default 4:
        the landmarks' assumed noise variance, ~2 mm per coordinate, covering both the
        landmarking error and the model-vs-annotation definition mismatch).
    dense_max_distance_mm : tuple of float
        Schedule of the dense stage: one Levenberg-Marquardt step per entry, correspondences
        farther than the entry rejected (default ``(10, 5, 3)`` then nine times 2; empty =
        landmarks only). Repeats of the last entry are skipped once a step moves no vertex
        by more than ``tolerance_mm``.
    dense_reg : float
        Weight of the prior in the dense stage (mm^2, default 0.1). The dense objective is
        the MAP one for independent point-to-surface errors of variance ``dense_reg``
        (0.1 mm^2: scan noise plus the model's misfit of an unseen face) and landmark
        errors of variance ``dense_reg / dense_landmark_weight``.
    dense_landmark_weight : float
        Weight of one landmark's squared 3D residual relative to one vertex's squared
        distance (default 1; 0 drops the landmark term). With a known noise model use
        ``sigma_scan^2 / sigma_landmark^2``.
    max_normal_angle_deg : float
        Reject correspondences whose model-vertex and scan-triangle normals differ by
        more than this (default 60; the scan's orientation is detected, either sign).
    reject_boundary : bool
        Reject correspondences whose closest point is on the scan's boundary (default True).
    dense_subsample : int
        Use every k-th model vertex in the dense stage (default 1 = all).
    fit_scale : bool
        Similarity pose (default) or rigid (scale 1).
    min_landmarks : int
        Fewer finite scan landmarks raise ``ValueError`` (default 6).
    min_correspondences : int
        A dense step with fewer accepted correspondences ends the dense stage with
        ``converged = False`` (default 50).
    tolerance_mm : float
        Convergence: largest vertex motion of a step (default 2e-3 mm, a twentieth of the
        fused scans' error).
    max_damping_steps : int
        Levenberg-Marquardt tries per dense iteration (damping x10 after each failure,
        /3 after a success) before it gives up improving the objective, which then counts
        as converged (default 6).
    """

    landmark_iterations: int = 10
    landmark_reg: float = 4.0
    dense_max_distance_mm: tuple = (10.0, 5.0, 3.0) + (2.0,) * 9
    dense_reg: float = 0.1
    dense_landmark_weight: float = 1.0
    max_normal_angle_deg: float = 60.0
    reject_boundary: bool = True
    dense_subsample: int = 1
    fit_scale: bool = True
    min_landmarks: int = 6
    min_correspondences: int = 50
    tolerance_mm: float = 2e-3
    max_damping_steps: int = 6

    def __post_init__(self):
        check_int(self.landmark_iterations, "FitParams.landmark_iterations", 1)
        check_number(self.landmark_reg, "FitParams.landmark_reg", lo=0, lo_open=True)
        try:
            sched = tuple(float(check_number(d, "FitParams.dense_max_distance_mm[]", lo=0, lo_open=True))
                          for d in self.dense_max_distance_mm)
        except TypeError:
            raise ValueError("FitParams.dense_max_distance_mm: expected a sequence of numbers, got "
                             f"{self.dense_max_distance_mm!r}") from None
        object.__setattr__(self, "dense_max_distance_mm", sched)
        check_number(self.dense_reg, "FitParams.dense_reg", lo=0, lo_open=True)
        check_number(self.dense_landmark_weight, "FitParams.dense_landmark_weight", lo=0)
        check_number(self.max_normal_angle_deg, "FitParams.max_normal_angle_deg", lo=0, hi=180)
        if not isinstance(self.reject_boundary, bool) or not isinstance(self.fit_scale, bool):
            raise ValueError("FitParams.reject_boundary / fit_scale: expected bool")
        check_int(self.dense_subsample, "FitParams.dense_subsample", 1)
        check_int(self.min_landmarks, "FitParams.min_landmarks", 3)
        check_int(self.min_correspondences, "FitParams.min_correspondences", 10)
        check_number(self.tolerance_mm, "FitParams.tolerance_mm", lo=0)
        check_int(self.max_damping_steps, "FitParams.max_damping_steps", 1)


@dataclass(frozen=True)
class FitIteration:
    """One iteration of :func:`fit`.

    Attributes
    ----------
    stage : str
        ``"landmarks"`` or ``"dense"``.
    iteration : int
        Index within the stage.
    max_distance_mm : float
        Correspondence distance limit (NaN for the landmark stage).
    n_correspondences : int
        Accepted dense correspondences (0 for the landmark stage).
    dense_rms_mm : float
        RMS distance of the accepted correspondences before the step (NaN for landmarks).
    landmark_rms_mm : float
        RMS 3D landmark residual after the step (mm).
    scale : float
        Pose scale after the step.
    shape_norm, expr_norm : float
        Mahalanobis norms ``sqrt(sum c_k^2 / var_k)`` of the coefficients after the step.
    max_motion_mm : float
        Largest vertex motion of the step (mm).
    damping : float
        Levenberg-Marquardt damping after the step (NaN for the landmark stage).
    """

    stage: str
    iteration: int
    max_distance_mm: float
    n_correspondences: int
    dense_rms_mm: float
    landmark_rms_mm: float
    scale: float
    shape_norm: float
    expr_norm: float
    max_motion_mm: float
    damping: float


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    shape_coeffs : (ks,) float64
        Shape coefficients (mm along the unit basis vectors).
    expr_coeffs : (ke,) float64
        Expression coefficients (mm).
    transform : (4, 4) float64
        Model -> scan similarity (``T[:3, :3] = s R``).
    scale : float
    rotation : (3, 3) float64
    translation : (3,) float64
    vertices : (n, 3) float64
        Fitted model vertices in the scan frame (mm).
    landmarks : (106, 3) float64
        Fitted model landmarks in the scan frame (mm).
    landmark_residuals : (106,) float64
        ``|fitted - scan landmark|`` (mm), NaN where the scan landmark is missing.
    landmark_rms_mm : float
    dense_residuals : (n,) float64
        Distance of each fitted vertex to the scan (mm), NaN where the correspondence is
        rejected by the last schedule entry's tests (all NaN without a dense stage).
    dense_rms_mm : float
        RMS of the finite ``dense_residuals`` (NaN without a dense stage).
    n_correspondences : int
        Finite ``dense_residuals``.
    converged : bool
        Every dense step had enough correspondences and the last step moved the vertices
        by at most ``tolerance_mm`` (landmark stage only: its last alternation did).
    iterations : tuple of FitIteration
    """

    shape_coeffs: np.ndarray
    expr_coeffs: np.ndarray
    transform: np.ndarray
    scale: float
    rotation: np.ndarray
    translation: np.ndarray
    vertices: np.ndarray
    landmarks: np.ndarray
    landmark_residuals: np.ndarray
    landmark_rms_mm: float
    dense_residuals: np.ndarray
    dense_rms_mm: float
    n_correspondences: int
    converged: bool
    iterations: tuple


def _decompose(T: np.ndarray):
    s = float(np.cbrt(np.linalg.det(T[:3, :3])))
    return s, T[:3, :3] / s, T[:3, 3].copy()


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])   # area-weighted
    n = np.zeros_like(v)
    for k in range(3):
        for c in range(3):
            n[:, c] += np.bincount(f[:, k], weights=fn[:, c], minlength=v.shape[0])
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, ln, out=np.zeros_like(n), where=ln > 0)


class _Model:
    """The model's arrays in the shapes the solver uses."""

    def __init__(self, model: MorphableModel):
        n = model.n_vertices
        self.n, self.ks, self.ke = n, model.n_shape, model.n_expression
        self.K = self.ks + self.ke
        self.mean = model.mean
        self.U3 = model.shape_basis.reshape(n, 3, self.ks)
        self.E3 = model.expression_basis.reshape(n, 3, self.ke)
        self.inv_var = np.concatenate([1.0 / model.shape_variance, 1.0 / model.expression_variance])
        self.faces = model.faces.astype(np.int64)
        tri = self.faces[model.landmark_faces]                      # (106, 3)
        w = model.landmark_bary
        self.lm_mean = np.einsum("lj,ljc->lc", w, self.mean[tri])
        self.lm_basis = np.concatenate([np.einsum("lj,ljck->lck", w, self.U3[tri]),
                                        np.einsum("lj,ljck->lck", w, self.E3[tri])], axis=2)   # (106, 3, K)
        self.model = model

    def vertices(self, c: np.ndarray) -> np.ndarray:
        x = self.mean.reshape(-1).copy()
        if self.ks:
            x += self.model.shape_basis @ c[:self.ks]
        if self.ke:
            x += self.model.expression_basis @ c[self.ks:]
        return x.reshape(-1, 3)

    def landmarks(self, c: np.ndarray) -> np.ndarray:
        return self.lm_mean + self.lm_basis @ c

    def rows_into(self, out: np.ndarray, verts: np.ndarray, m: np.ndarray, scale: float) -> None:
        """``out[j] = scale * m_j^T B_{verts[j]}`` for model-frame directions ``m`` (k, 3).

        A sparse (k, 3n) selection matrix times the (3n, K) bases: no (k, 3, K) copy.
        """
        k = verts.size
        cols = (3 * verts[:, None] + np.arange(3)).ravel()
        S = sparse.csr_matrix((m.ravel() * scale, (np.repeat(np.arange(k), 3), cols)), shape=(k, 3 * self.n))
        col = 0
        for B in (self.model.shape_basis, self.model.expression_basis):
            kb = B.shape[1]
            if kb:
                out[:, col:col + kb] = S @ B
                col += kb


def _norms(mdl: _Model, c: np.ndarray):
    q = c * c * mdl.inv_var
    return float(np.sqrt(q[:mdl.ks].sum())), float(np.sqrt(q[mdl.ks:].sum()))


def _landmark_stage(mdl: _Model, target: np.ndarray, valid: np.ndarray, params: FitParams):
    c = np.zeros(mdl.K)
    tv = target[valid]
    T = similarity_fit(mdl.lm_mean[valid], tv, scale=params.fit_scale)
    A = mdl.lm_basis[valid].reshape(3 * int(valid.sum()), mdl.K)
    AtA = A.T @ A
    records = []
    prev = _apply(T, mdl.landmarks(c))
    converged = False
    for it in range(params.landmark_iterations):
        s, R, t = _decompose(T)
        if mdl.K:
            z = (tv - t) @ R / s
            r = (z - mdl.lm_mean[valid]).reshape(-1)
            H = AtA + (params.landmark_reg / s ** 2) * np.diag(mdl.inv_var)
            c = cho_solve(cho_factor(H), A.T @ r)
        L = mdl.landmarks(c)
        T = similarity_fit(L[valid], tv, scale=params.fit_scale)
        cur = _apply(T, L)
        motion = float(np.linalg.norm(cur - prev, axis=1).max())
        prev = cur
        rms = float(np.sqrt(np.mean(np.sum((cur[valid] - tv) ** 2, axis=1))))
        sn, en = _norms(mdl, c)
        records.append(FitIteration("landmarks", it, float("nan"), 0, float("nan"), rms, _decompose(T)[0], sn, en,
                                    motion, float("nan")))
        if motion <= params.tolerance_mm:
            converged = True
            break
    return c, T, records, converged


class _Correspondences:
    """Closest points of model vertices on the scan with the rejection tests."""

    def __init__(self, scan_v, scan_f, params: FitParams):
        self.index = MeshIndex(scan_v, scan_f)
        self.faces = scan_f
        self.normals = _face_normals(scan_v, scan_f)
        self.vnormals = _vertex_normals(scan_v, scan_f)
        self.edge_f, self.vert_f = mesh_boundary(scan_f, scan_v.shape[0]) if params.reject_boundary else (None, None)
        self.cos_min = float(np.cos(np.radians(params.max_normal_angle_deg)))

    def find(self, y: np.ndarray, ny: np.ndarray, dmax: float):
        cp = self.index.query(y)
        ns = self.normals[cp.triangles]
        cos = np.einsum("ij,ij->i", ny, ns)
        near = cp.distances <= dmax
        flip = bool(np.any(near) and np.median(cos[near]) < 0)     # scan oriented the other way
        if flip:
            cos = -cos
        keep = near & (cos >= self.cos_min)
        if self.edge_f is not None:
            keep &= ~on_boundary(cp, self.faces, self.edge_f, self.vert_f)
        # smooth normal at the closest point: barycentric blend of the scan's vertex normals
        sm = np.einsum("ij,ijc->ic", cp.bary, self.vnormals[self.faces[cp.triangles]])
        ln = np.linalg.norm(sm, axis=1, keepdims=True)
        sm = np.where(ln > 0, sm / np.where(ln > 0, ln, 1.0), ns)
        if flip:
            sm = -sm
        return cp, sm, keep


def _pose_update(delta: np.ndarray, g: np.ndarray, fit_scale: bool) -> np.ndarray:
    """``x -> g + exp(sigma) Rot(omega) (x - g) + dt`` as a (4, 4) matrix."""
    sig = float(delta[6]) if fit_scale else 0.0
    M = np.eye(4)
    M[:3, :3] = np.exp(sig) * _rotation(delta[:3])
    M[:3, 3] = g + delta[3:6] - M[:3, :3] @ g
    return M


class _DenseProblem:
    """Objective and Gauss-Newton system of one dense iteration (fixed correspondence set).

    ``F = sum_i d_i^2 + w sum_l |y_l - target_l|^2 + reg sum_k c_k^2 / var_k`` over the
    accepted vertices ``i`` (``d_i``: exact distance to the scan triangles).
    """

    def __init__(self, mdl: _Model, corr: _Correspondences, sl: slice, target, valid, params: FitParams):
        self.mdl, self.corr, self.sl, self.params = mdl, corr, sl, params
        self.target, self.valid = target, valid
        self.npose = 7 if params.fit_scale else 6

    def lm_terms(self, c, T):
        yl = _apply(T, self.mdl.landmarks(c))[self.valid]
        return yl, yl - self.target[self.valid]

    def value(self, c, T, d):
        """F given the distances ``d`` of the accepted vertices."""
        _, rl = self.lm_terms(c, T)
        p = self.params
        return float(d @ d) + p.dense_landmark_weight * float(np.sum(rl * rl)) + \
            p.dense_reg * float(np.sum(c * c * self.mdl.inv_var))

    def system(self, c, T, y, cp, n, keep):
        """Normal equations ``H delta = rhs`` (pose increment, coefficient increment) and centre g."""
        mdl, p = self.mdl, self.params
        npose = self.npose
        py, q, nk = y[keep], cp.points[keep], n[keep]
        s, R, _ = _decompose(T)
        g = py.mean(axis=0)
        J = np.empty((py.shape[0], npose + mdl.K))
        J[:, 0:3] = np.cross(py - g, nk)
        J[:, 3:6] = nk
        if p.fit_scale:
            J[:, 6] = np.einsum("ij,ij->i", nk, py - g)
        verts = np.arange(mdl.n)[self.sl][keep]
        mdl.rows_into(J[:, npose:], verts, nk @ R, s)       # n^T s R B_i (model-frame directions)
        r = np.einsum("ij,ij->i", nk, py - q)                # point-to-plane residual
        H = dsyrk(1.0, J, trans=1, lower=0)                  # J^T J (upper triangle)
        H = np.triu(H) + np.triu(H, 1).T
        rhs = -(J.T @ r)
        w = p.dense_landmark_weight
        if w > 0:
            yl, rl = self.lm_terms(c, T)
            nl = yl.shape[0]
            Jl = np.zeros((3 * nl, npose + mdl.K))
            P = yl - g
            # d/d omega of (omega x P) is -[P]_x
            Jl[0::3, 1], Jl[0::3, 2] = P[:, 2], -P[:, 1]
            Jl[1::3, 0], Jl[1::3, 2] = -P[:, 2], P[:, 0]
            Jl[2::3, 0], Jl[2::3, 1] = P[:, 1], -P[:, 0]
            for k in range(3):
                Jl[k::3, 3 + k] = 1.0
            if p.fit_scale:
                Jl[:, 6] = P.reshape(-1)
            Jl[:, npose:] = s * np.einsum("ab,lbk->lak", R, mdl.lm_basis[self.valid]).reshape(3 * nl, mdl.K)
            H += w * (Jl.T @ Jl)
            rhs -= w * (Jl.T @ rl.reshape(-1))
        H[npose:, npose:] += p.dense_reg * np.diag(mdl.inv_var)
        rhs[npose:] -= p.dense_reg * mdl.inv_var * c
        return H, rhs, g

    def trial(self, c, T, H, rhs, g, lam):
        """State after the step damped by ``lam`` (Marquardt: ``H + lam diag(H)``)."""
        Hd = H.copy()
        Hd[np.diag_indices_from(Hd)] *= 1.0 + lam + 1e-12
        delta = cho_solve(cho_factor(Hd), rhs)
        return c + delta[self.npose:], _pose_update(delta, g, self.params.fit_scale) @ T


def _dense_stage(mdl: _Model, c, T, corr: _Correspondences, target, valid, params: FitParams, records: list):
    """Levenberg-Marquardt over the schedule; returns (c, T, converged)."""
    sl = slice(0, mdl.n, params.dense_subsample)
    prob = _DenseProblem(mdl, corr, sl, target, valid, params)
    sched = params.dense_max_distance_mm
    lam = 1e-4
    converged = False
    Y = _apply(T, mdl.vertices(c))
    for it, dmax in enumerate(sched):
        if it > 0 and converged and all(d == dmax for d in sched[it - 1:]):
            break                                         # converged at the final distance limit
        y = Y[sl]
        cp, n, keep = corr.find(y, _vertex_normals(Y, mdl.faces)[sl], dmax)
        n_pairs = int(np.count_nonzero(keep))
        if n_pairs < params.min_correspondences:
            records.append(FitIteration("dense", it, dmax, n_pairs, float("nan"), float("nan"), _decompose(T)[0],
                                        *_norms(mdl, c), 0.0, lam))
            return c, T, False
        d0 = cp.distances[keep]
        F0 = prob.value(c, T, d0)
        H, rhs, g = prob.system(c, T, y, cp, n, keep)
        accepted = False
        for _ in range(params.max_damping_steps):
            c1, T1 = prob.trial(c, T, H, rhs, g, lam)
            Y1 = _apply(T1, mdl.vertices(c1))
            F1 = prob.value(c1, T1, corr.index.query(Y1[sl][keep]).distances)
            if F1 <= F0:
                accepted = True
                lam = max(lam / 3.0, 1e-7)
                break
            lam *= 10.0
        motion = 0.0
        if accepted:
            motion = float(np.linalg.norm(Y1 - Y, axis=1).max())
            c, T, Y = c1, T1, Y1
        # converged: no decrease possible, or a step that no longer moves the surface
        converged = (not accepted) or motion <= params.tolerance_mm or (F0 - F1) <= 1e-10 * F0
        yl, _ = prob.lm_terms(c, T)
        lrms = float(np.sqrt(np.mean(np.sum((yl - target[valid]) ** 2, axis=1))))
        records.append(FitIteration("dense", it, dmax, n_pairs, float(np.sqrt(np.mean(d0 ** 2))), lrms,
                                    _decompose(T)[0], *_norms(mdl, c), motion, lam))
    return c, T, converged


def fit(model: MorphableModel, scan_vertices, scan_faces, scan_landmarks, params: FitParams = FitParams()) -> FitResult:
    """Fit pose, shape and expression coefficients of ``model`` to a scan.

    Parameters
    ----------
    model : MorphableModel
    scan_vertices : (N, 3) float64
        Scan mesh vertices (mm), finite.
    scan_faces : (M, 3) int
        Scan triangles (an open mesh with holes is fine).
    scan_landmarks : (106, 3) float64
        Scan landmarks (mm); rows with a NaN are missing (at least ``min_landmarks``
        finite rows needed).
    params : FitParams

    Returns
    -------
    FitResult
        Coefficients, pose, fitted vertices and landmarks in the scan frame, residuals,
        per-iteration records.

    Raises
    ------
    ValueError
        Not a MorphableModel / FitParams, bad scan mesh, landmarks not (106, 3) or with
        infinite values, fewer than ``min_landmarks`` finite landmarks, or a degenerate
        (collinear) set of finite landmarks.
    """
    if not isinstance(model, MorphableModel):
        raise ValueError(f"model: expected a MorphableModel, got {type(model).__name__}")
    if not isinstance(params, FitParams):
        raise ValueError(f"params: expected FitParams, got {type(params).__name__}")
    sv, sf = check_mesh(scan_vertices, scan_faces, "scan_vertices", "scan_faces")
    target = as_array(scan_landmarks, "scan_landmarks", (N_LANDMARKS, 3))
    if np.any(np.isinf(target)):
        raise ValueError("scan_landmarks: contains infinite values")
    valid = np.all(np.isfinite(target), axis=1)
    if np.count_nonzero(valid) < params.min_landmarks:
        raise ValueError(f"scan_landmarks: need >= {params.min_landmarks} finite rows, got {np.count_nonzero(valid)}")
    mdl = _Model(model)
    c, T, records, converged = _landmark_stage(mdl, target, valid, params)
    sched = params.dense_max_distance_mm
    corr = _Correspondences(sv, sf, params) if sched else None
    if sched:
        c, T, converged = _dense_stage(mdl, c, T, corr, target, valid, params, records)
    Y = _apply(T, mdl.vertices(c))
    L = _apply(T, mdl.landmarks(c))
    lres = np.full(N_LANDMARKS, np.nan)
    lres[valid] = np.linalg.norm(L[valid] - target[valid], axis=1)
    dres = np.full(mdl.n, np.nan)
    if sched:
        cp, _, keep = corr.find(Y, _vertex_normals(Y, mdl.faces), sched[-1])
        dres[keep] = cp.distances[keep]
    n_ok = int(np.count_nonzero(np.isfinite(dres)))
    drms = float(np.sqrt(np.nanmean(dres ** 2))) if n_ok else float("nan")
    s, R, t = _decompose(T)
    return FitResult(c[:mdl.ks].copy(), c[mdl.ks:].copy(), T, s, R, t, Y, L, lres,
                     float(np.sqrt(np.nanmean(lres ** 2))), dres, drms, n_ok, bool(converged), tuple(records))
