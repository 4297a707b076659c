"""Two-stage registration of a fused scan to the template topology (paper section 4.1).

:func:`register` = stage 1 (:func:`kernels.similarity.fit_similarity`: robust Umeyama
similarity from the template's landmarks to the scan's fused landmarks, optional rigid
ICP polish) + stage 1b when the template has a jaw rig (:func:`kernels.jaw.fit_jaw`: the
jaw opening angle from the jaw landmarks and a trimmed closest-point term, the template
posed by it, the similarity refitted on the posed landmarks) + stage 2
(:func:`kernels.nicp.nicp`: optimal-step NICP with per-part stiffness, Eq. 3, from the
posed template). The output is the template mesh deformed onto the scan, per-vertex
distances and validity, per-iteration records and QC metrics. See
``docs/registration.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kernels._checks import as_array, as_rng, check_number
from kernels.jaw import JawFit, JawParams, fit_jaw, pose_jaw, transform_rig
from kernels.meshing import mesh_quality
from kernels.nicp import (
    NicpParams, PreparedTemplate, ScanSurface, _check_scan, _key, nicp, prepare_template, vertex_normals,
)
from kernels.similarity import (
    Similarity, SimilarityParams, apply_similarity, fit_similarity, landmark_outliers, polish_rigid,
    refit_similarity,
)
from kernels.template import Template

__all__ = ["RegistrationParams", "RegistrationResult", "register", "registration_qc"]


@dataclass(frozen=True)
class RegistrationParams:
    """Parameters of :func:`register`.

    Attributes
    ----------
    similarity : SimilarityParams
        Stage 1 (RANSAC/IRLS thresholds, optional rigid ICP polish).
    nicp : NicpParams
        Stage 2 (schedule, levels, per-part stiffness, data term, rejection).
    jaw : JawParams
        Stage 1b (jaw angle bounds, landmark / surface terms); runs when
        ``jaw.enabled`` and the template has a jaw rig.
    drop_landmark_outliers : bool
        Leave landmarks flagged by :func:`kernels.similarity.landmark_outliers` out of the
        NICP landmark term (default True).
    outlier_tolerance_mm : float
        Tolerance of the local affine prediction (default 7 mm).
    """

    similarity: SimilarityParams = field(default_factory=SimilarityParams)
    nicp: NicpParams = field(default_factory=NicpParams)
    jaw: JawParams = field(default_factory=JawParams)
    drop_landmark_outliers: bool = True
    outlier_tolerance_mm: float = 7.0

    def __post_init__(self):
        if not isinstance(self.similarity, SimilarityParams):
            raise ValueError(f"RegistrationParams.similarity: expected SimilarityParams, got "
                             f"{type(self.similarity).__name__}")
        if not isinstance(self.nicp, NicpParams):
            raise ValueError(f"RegistrationParams.nicp: expected NicpParams, got {type(self.nicp).__name__}")
        if not isinstance(self.jaw, JawParams):
            raise ValueError(f"RegistrationParams.jaw: expected JawParams, got {type(self.jaw).__name__}")
        check_number(self.outlier_tolerance_mm, "RegistrationParams.outlier_tolerance_mm", lo=0, lo_open=True)


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of :func:`register` (arrays in template topology).

    Attributes
    ----------
    vertices : (n, 3) float64
        Registered template vertices, mm, scan frame; faces are the template's.
    distance_mm : (n,) float64
        Distance of each registered vertex to the scan surface.
    valid : (n,) bool
        The vertex had an accepted correspondence within ``valid_distance_mm`` at the end
        (False: no reliable scan data there, e.g. a hole; its position is interpolated).
    similarity : Similarity
        Stage 1 (template -> scan; refitted on the jaw-posed landmarks when the jaw
        stage ran).
    jaw : JawFit or None
        Stage 1b (None when the template has no jaw rig or the stage is disabled).
    landmarks_used : (106,) bool
        Landmarks in the NICP landmark term.
    iterations : tuple of NicpIteration
        Per-iteration records of stage 2.
    qc : dict
        :func:`registration_qc` plus ``similarity_s``, ``nicp_s``, ``prepare_s``,
        ``time_s``, ``n_iterations``, ``similarity_scale``, ``similarity_inliers``,
        ``similarity_rmse_mm``, ``n_landmarks_used``, ``n_landmark_outliers``,
        ``landmark_rmse_mm`` (used landmarks, registered template vs scan),
        ``jaw_angle_deg`` (NaN without a jaw stage, 0 when skipped), ``jaw_s``,
        ``jaw_landmarks``, ``jaw_landmark_rmse_mm``, ``jaw_at_bound``, ``jaw_skipped``
        (reason, empty when fitted).
    """

    vertices: np.ndarray
    distance_mm: np.ndarray
    valid: np.ndarray
    similarity: Similarity
    landmarks_used: np.ndarray
    iterations: tuple
    qc: dict
    jaw: JawFit | None = None


def registration_qc(vertices, faces, reference_vertices, distance_mm, valid) -> dict:
    """Quality metrics of a registered mesh.

    Parameters
    ----------
    vertices : (n, 3) float64
        Registered vertices (mm).
    faces : (m, 3) int
        Template faces.
    reference_vertices : (n, 3) float64
        The template after stage 1 (orientation reference for flips).
    distance_mm : (n,) float64
    valid : (n,) bool

    Returns
    -------
    dict
        ``mean_distance_mm`` / ``p95_distance_mm`` (valid vertices), ``mean_distance_all_mm``,
        ``valid_fraction``, ``n_flipped`` (triangles whose normal turned by more than 90
        degrees from the reference), ``n_degenerate`` (smallest angle < 1 degree or zero
        area, as :func:`kernels.meshing.mesh_quality`), ``min_angle_deg``.
    """
    V = np.asarray(vertices, float)
    F = np.asarray(faces, np.int64)
    R = np.asarray(reference_vertices, float)
    d = np.asarray(distance_mm, float)
    ok = np.asarray(valid, bool)

    def fn(X):
        return np.cross(X[F[:, 1]] - X[F[:, 0]], X[F[:, 2]] - X[F[:, 0]])

    flipped = np.einsum("ij,ij->i", fn(V), fn(R)) <= 0
    q = mesh_quality(V, F)
    return {
        "mean_distance_mm": float(d[ok].mean()) if ok.any() else float("nan"),
        "p95_distance_mm": float(np.percentile(d[ok], 95)) if ok.any() else float("nan"),
        "mean_distance_all_mm": float(d.mean()),
        "valid_fraction": float(ok.mean()),
        "n_flipped": int(flipped.sum()),
        "n_degenerate": int(q["n_degenerate"]),
        "min_angle_deg": float(q["min_angle_deg"]),
    }


def register(template, scan_vertices, scan_faces, scan_landmarks,
             params: RegistrationParams = RegistrationParams(), rng=0) -> RegistrationResult:
    """Register the template to a scan: landmark similarity, then per-part-stiffness NICP.

    Parameters
    ----------
    template : Template or PreparedTemplate
        A :class:`PreparedTemplate` (from :func:`kernels.nicp.prepare_template` with
        ``params.nicp``) skips the preparation (about 0.5 s for 20k vertices); reuse it
        across scans.
    scan_vertices : (v, 3) float64
        Scan mesh vertices, mm, finite.
    scan_faces : (f, 3) int
        Scan triangles (at least one; an open mesh with holes is expected).
    scan_landmarks : (106, 3) float64
        Fused scan landmarks, mm, NaN rows where unknown.
    params : RegistrationParams
    rng : numpy.random.Generator or int or None
        Randomness of stage 1's RANSAC (default seed 0: deterministic).

    Returns
    -------
    RegistrationResult
        ``vertices`` etc. in template topology; the start of stage 2 is the template
        posed by the jaw angle of stage 1b (when the template has a jaw rig) and mapped
        by the similarity.

    Raises
    ------
    ValueError
        Naming the problem: a scan without faces, NaN scan vertices, face indices out of
        range, landmarks of the wrong shape, all-NaN landmarks or fewer usable than
        ``params.similarity.min_landmarks``, a template that is neither a Template nor a
        PreparedTemplate, a PreparedTemplate built with other parameters.
    """
    t0 = time.perf_counter()
    if not isinstance(params, RegistrationParams):
        raise ValueError(f"params: expected RegistrationParams, got {type(params).__name__}")
    if isinstance(template, PreparedTemplate):
        prepared = template
        if prepared.key != _key(params.nicp):
            raise ValueError("template: PreparedTemplate built with other level_vertices / part_stiffness / "
                             "part_blend than params.nicp")
        prep_s = 0.0
    elif isinstance(template, Template):
        prepared = None
        prep_s = None
    else:
        raise ValueError(f"template: expected a Template or PreparedTemplate, got {type(template).__name__}")
    T = template.template if prepared is not None else template
    V, F = _check_scan(scan_vertices, scan_faces)
    L = as_array(scan_landmarks, "scan_landmarks", (T.landmark_faces.shape[0], 3))
    gen = as_rng(rng)

    # stage 1
    t1 = time.perf_counter()
    tl = T.landmark_points()
    sim = fit_similarity(tl, L, params.similarity, gen)
    scan = ScanSurface(V, F)
    if params.similarity.icp_iterations > 0:
        face = np.asarray(T.parts) != 0
        Nt = vertex_normals(np.asarray(T.vertices, float), np.asarray(T.faces, np.int64))

        def closest(P):
            q, nq, _, onb = scan.closest(P)
            return q, nq, ~onb

        sim = polish_rigid(np.asarray(T.vertices)[face], Nt[face], closest, sim, params.similarity)
    finite = np.isfinite(L).all(axis=1)

    def outliers(tl_, sim_):
        if not params.drop_landmark_outliers:
            return np.zeros(len(L), bool)
        return landmark_outliers(tl_, L, sim_, tolerance_mm=params.outlier_tolerance_mm)

    out = outliers(tl, sim)
    sim_s = time.perf_counter() - t1

    # stage 1b: the jaw
    t1 = time.perf_counter()
    jaw = None
    rest = np.asarray(T.vertices, float)
    if params.jaw.enabled and T.jaw is not None:
        rig = T.jaw
        V1 = apply_similarity(sim, rest)
        Fi = np.asarray(T.faces, np.int64)
        N1 = vertex_normals(V1, Fi)
        # orientation of the scan's normals (flipped when its winding faces inwards)
        probe = np.random.default_rng(params.jaw.seed).choice(len(V1), min(len(V1), 2000), replace=False)
        _, nq, dq, _ = scan.closest(V1[probe])
        near = dq < 10.0
        flip = -1.0 if near.any() and np.median(np.einsum("ij,ij->i", nq, N1[probe])[near]) < 0 else 1.0

        def closest_jaw(P):
            q, nq, _, onb = scan.closest(P)
            return q, flip * nq, ~onb

        pivot, axis = transform_rig(rig.pivot, rig.axis, sim.scale, sim.rotation, sim.translation)
        lw = T.landmark_weights(rig.weights)
        la = T.landmark_weights(axis) if axis.ndim == 2 else axis
        jaw = fit_jaw(V1, N1, rig.weights, pivot, axis, apply_similarity(sim, tl), lw, la, L, finite & ~out,
                      closest_jaw, params.jaw)
        if not jaw.skipped and jaw.angle_deg != 0.0:
            # the posed template (the similarity preserves angles: posing in the template frame
            # about the template's hinge is the same), the similarity refitted on its landmarks
            rest = pose_jaw(rest, rig.weights, rig.pivot, rig.axis, jaw.angle_deg)
            tl = T.landmark_points(rest)
            if params.jaw.refit_similarity:
                sim = refit_similarity(tl, L, sim, params.similarity)
            out = outliers(tl, sim)
    jaw_s = time.perf_counter() - t1
    start = apply_similarity(sim, rest)
    used = finite & ~out
    n_out = int((out & finite).sum())

    # stage 2
    if prepared is None:
        prepared = prepare_template(T, params.nicp)
        prep_s = prepared.prepare_s
    res = nicp(prepared, start, scan, L, used, params.nicp)
    qc = registration_qc(res.vertices, T.faces, start, res.distance_mm, res.valid)
    lm_reg = T.landmark_points(res.vertices)
    lm_err = np.linalg.norm(lm_reg[used] - L[used], axis=1)
    qc.update({
        "similarity_s": sim_s, "nicp_s": res.time_s, "prepare_s": float(prep_s),
        "time_s": time.perf_counter() - t0, "n_iterations": len(res.iterations),
        "similarity_scale": sim.scale, "similarity_inliers": sim.n_inliers,
        "similarity_rmse_mm": sim.rmse_mm, "n_landmarks_used": int(used.sum()),
        "n_landmark_outliers": n_out,
        "landmark_rmse_mm": float(np.sqrt(np.mean(lm_err ** 2))) if lm_err.size else float("nan"),
        "n_scan_boundary_edges": scan.n_boundary_edges,
        "untangle_rounds": res.untangle_rounds, "untangled_vertices": res.untangled_vertices,
        "jaw_angle_deg": float(jaw.angle_deg) if jaw is not None else float("nan"), "jaw_s": jaw_s,
        "jaw_landmarks": int(jaw.n_landmarks) if jaw is not None else 0,
        "jaw_landmark_rmse_mm": float(jaw.landmark_rmse_mm) if jaw is not None else float("nan"),
        "jaw_at_bound": bool(jaw.at_bound) if jaw is not None else False,
        "jaw_skipped": (jaw.skipped if jaw is not None else ("disabled" if not params.jaw.enabled else "no jaw rig")),
    })
    return RegistrationResult(res.vertices, res.distance_mm, res.valid, sim, used, res.iterations, qc, jaw)
