"""Two-stage registration of a fused scan to the template topology (paper section 4.1).

:func:`register` = stage 1 (:func:`kernels.similarity.fit_similarity`: robust Umeyama
similarity from the template's landmarks to the scan's fused landmarks, optional rigid
ICP polish) + stage 1b when the template has a jaw rig (:func:`kernels.jaw.fit_jaw`: the
jaw opening angle from the jaw landmarks and a trimmed closest-point term, the template
posed by it, the similarity refitted on the posed landmarks) + stage 2
(:func:`kernels.nicp.nicp`: optimal-step NICP with per-part stiffness, Eq. 3, from the
posed template). The output is the template mesh deformed onto the scan, per-vertex
distances and validity, per-iteration records and QC metrics. With ``start_vertices`` (a
registration of the same subject, e.g. its neutral scan, :class:`StartParams`) it starts
from that shape instead of the mean face, re-aligns it rigidly at its own scale and pulls
stage 2 tangentially towards it. See ``docs/registration.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial import cKDTree

from kernels._checks import as_array, as_rng, check_int, check_number
from kernels.jaw import JawFit, JawParams, fit_jaw, pose_jaw, transform_rig
from kernels.meshing import mesh_quality
from kernels.nicp import (
    NicpParams, NicpStep, PreparedTemplate, ScanSurface, _check_scan, _key, nicp, prepare_template, vertex_normals,
)
from kernels.photometric import PhotometricParams, ScanTexture, robust_std, texture_flow
from kernels.similarity import (
    Similarity, SimilarityParams, apply_similarity, fit_similarity, landmark_outliers, polish_rigid,
    refit_similarity, umeyama,
)
from kernels.template import Template

__all__ = ["DEFAULT_START_PART_PRIOR", "RegistrationParams", "RegistrationResult", "StartParams", "register",
           "registration_qc"]


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
    photometric : PhotometricParams
        Stage 2c, the photometric refinement (:mod:`kernels.photometric`); runs when
        ``photometric.enabled`` and :func:`register` gets a scan texture and a start's detail.
    drop_landmark_outliers : bool
        Leave landmarks flagged by :func:`kernels.similarity.landmark_outliers` out of the
        NICP landmark term (default True).
    outlier_tolerance_mm : float
        Tolerance of the local affine prediction (default 7 mm).
    """

    similarity: SimilarityParams = field(default_factory=SimilarityParams)
    nicp: NicpParams = field(default_factory=NicpParams)
    jaw: JawParams = field(default_factory=JawParams)
    photometric: PhotometricParams = field(default_factory=PhotometricParams)
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
        if not isinstance(self.photometric, PhotometricParams):
            raise ValueError(f"RegistrationParams.photometric: expected PhotometricParams, "
                             f"got {type(self.photometric).__name__}")
        check_number(self.outlier_tolerance_mm, "RegistrationParams.outlier_tolerance_mm", lo=0, lo_open=True)


#: Landmarks (106-point scheme) whose means give the face's up direction (eyes minus outer lip)
EYE_LANDMARKS, LIP_LANDMARKS = slice(66, 84), slice(84, 96)

#: Factors on ``StartParams.prior_weight`` per template part (parts not listed: 1): no pull
#: where expressions slide the skin most (eyes, mouth, chin / jaw), a weak one on the cheeks.
DEFAULT_START_PART_PRIOR = (("eyes", 0.0), ("mouth", 0.0), ("cheeks", 0.3), ("chin_jaw", 0.0))


@dataclass(frozen=True)
class StartParams:
    """How :func:`register` uses ``start_vertices`` (a registration of the same subject).

    The defaults are the setting measured in ``docs/registration.md`` ("Starting from the
    subject's neutral registration").

    Attributes
    ----------
    prior_weight : float
        Dimensionless weight (>= 0) of the pull of every vertex towards its position in the
        posed start during stage 2, relative to its data weight (default 0.2; 0: no pull,
        the start only replaces the mean face). See :func:`kernels.nicp.nicp`.
    tangential : bool
        Pull only within the tangent plane (default True): the scan alone sets the
        position along the normal, the prior keeps vertices from sliding.
    part_prior : tuple of (str, float)
        Factor (>= 0) on ``prior_weight`` per template part, parts not listed: 1 (default
        :data:`DEFAULT_START_PART_PRIOR`: eyes 0, mouth 0, cheeks 0.3, chin_jaw 0).
    landmark_radius_mm : float
        When > 0, the prior weight of a vertex is scaled by ``1 - exp(-(d / r)^2)``, d the
        distance (on the posed start) to the nearest used landmark that is more than
        ``landmark_motion_mm`` away from its scan landmark: no pull where the expression
        moved the skin (default 10 mm; 0: off).
    landmark_motion_mm : float
        Landmark displacement that counts as moved (default 2 mm, > 0).
    fix_scale : bool
        After stages 1 / 1b, set the similarity's scale to the start's (same subject, same
        mm: the scale is known) and re-centre its translation on the landmark inliers
        (default True).
    rigid_parts : tuple of str
        Template parts of a rigid point-to-plane ICP of the posed start onto the scan after
        that (default forehead and nose: the parts expressions move least); empty: none.
    rigid_iterations : int
        Iterations of that ICP (default 10; 0: none).
    max_shape_rms_mm : float
        The start, aligned to the template by a least-squares similarity over all
        vertices, must be within this RMS distance of the template (default 15 mm; the
        neutral registrations of the test subjects are at 3.5-6.2 mm): else it is taken
        for another topology or vertex order and rejected.
    """

    prior_weight: float = 0.2
    tangential: bool = True
    part_prior: tuple = DEFAULT_START_PART_PRIOR
    landmark_radius_mm: float = 10.0
    landmark_motion_mm: float = 2.0
    fix_scale: bool = True
    rigid_parts: tuple = ("forehead", "nose")
    rigid_iterations: int = 10
    max_shape_rms_mm: float = 15.0

    def __post_init__(self):
        check_number(self.prior_weight, "StartParams.prior_weight", lo=0)
        check_number(self.landmark_radius_mm, "StartParams.landmark_radius_mm", lo=0)
        check_number(self.landmark_motion_mm, "StartParams.landmark_motion_mm", lo=0, lo_open=True)
        check_number(self.max_shape_rms_mm, "StartParams.max_shape_rms_mm", lo=0, lo_open=True)
        check_int(self.rigid_iterations, "StartParams.rigid_iterations", 0)
        for name in ("tangential", "fix_scale"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"StartParams.{name}: must be a bool, got {getattr(self, name)!r}")
        try:
            pp = tuple((a, b) for a, b in self.part_prior)
        except (TypeError, ValueError):
            raise ValueError(f"StartParams.part_prior: expected (part name, factor) pairs, "
                             f"got {self.part_prior!r}") from None
        for a, b in pp:
            if not isinstance(a, str):
                raise ValueError(f"StartParams.part_prior: part names must be strings, got {a!r}")
            check_number(b, f"StartParams.part_prior[{a!r}]", lo=0)
        names = [a for a, _ in pp]
        if len(set(names)) != len(names):
            raise ValueError(f"StartParams.part_prior: duplicate part names in {names}")
        object.__setattr__(self, "part_prior", tuple((a, float(b)) for a, b in pp))
        if isinstance(self.rigid_parts, str) or not all(isinstance(a, str) for a in self.rigid_parts):
            raise ValueError(f"StartParams.rigid_parts: expected a tuple of part names, got {self.rigid_parts!r}")
        object.__setattr__(self, "rigid_parts", tuple(self.rigid_parts))

    def check_parts(self, part_names) -> None:
        """Raise ``ValueError`` when ``part_prior`` or ``rigid_parts`` names a part not in ``part_names``."""
        known = tuple(part_names)
        for field_name, names in (("part_prior", [a for a, _ in self.part_prior]), ("rigid_parts", self.rigid_parts)):
            bad = [a for a in names if a not in known]
            if bad:
                raise ValueError(f"StartParams.{field_name}: unknown template parts {bad} (template parts: {known})")


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
    detail : (n,) float64 or None
        The scan's colour detail at every registered vertex (:class:`ScanTexture`; NaN
        where the scan has none), the reference of later registrations that start from
        this one; None without a scan texture.
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
        (reason, empty when fitted), ``start`` (1.0 when registered from
        ``start_vertices``, else 0.0), ``start_shape_rms_mm`` (RMS distance of the start
        to the template after a similarity alignment; NaN without a start),
        ``start_rigid_rmse_mm`` (point-to-plane residual of the rigid re-alignment of the
        start on ``StartParams.rigid_parts``; NaN without a start or that ICP),
        ``texture_rounds`` (stage 2c rounds run, 0 when it did not run),
        ``texture_matched_fraction`` (of the flow grid's vertices with reference detail,
        matched in the first round; NaN when stage 2c did not run), ``texture_flow_p90_mm`` (90th
        percentile of the matched vertices' displacements in the first round), ``texture_s``,
        ``texture_detail_std`` (the scan texture's :attr:`ScanTexture.detail_std`; NaN
        without one; stage 2c needs it and the start's detail at ``min_detail_std``).
    """

    vertices: np.ndarray
    distance_mm: np.ndarray
    valid: np.ndarray
    similarity: Similarity
    landmarks_used: np.ndarray
    iterations: tuple
    qc: dict
    jaw: JawFit | None = None
    detail: np.ndarray | None = None


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


def _start_in_template_frame(T: Template, start_vertices, sp: StartParams):
    """The start mapped onto the template by the least-squares similarity over all vertices.

    Returns ``(rest, scale, shape_rms_mm)``: the start in the template frame (n, 3) mm,
    the similarity's scale (start size / template size) and the RMS distance of ``rest``
    to the template vertices (mm, template frame). Raises ``ValueError`` naming the
    problem (shape, NaN, coincident vertices, not a registration to this template).
    """
    n = T.n_vertices
    shape = np.shape(start_vertices)
    if shape != (n, 3):
        raise ValueError(f"start_vertices: expected shape ({n}, 3) (one row per vertex of the template, "
                         f"a registration in its topology), got {shape}")
    Vs = as_array(start_vertices, "start_vertices", (n, 3), finite=True)
    tv = np.asarray(T.vertices, float)
    if np.sqrt(np.mean(np.sum((Vs - Vs.mean(axis=0)) ** 2, axis=1))) < 1e-6 * max(1.0, np.abs(Vs).max()):
        raise ValueError("start_vertices: all vertices coincide")
    scale, R, t = umeyama(tv, Vs)
    rest = ((Vs - t) @ R) / scale                       # the start in the template frame
    rms = float(np.sqrt(np.mean(np.sum((rest - tv) ** 2, axis=1))))
    if not rms <= sp.max_shape_rms_mm:
        raise ValueError(f"start_vertices: {rms:.1f} mm RMS from the template after a similarity alignment "
                         f"(StartParams.max_shape_rms_mm = {sp.max_shape_rms_mm:g}): not a registration to "
                         f"this template (other topology or vertex order?)")
    return rest, float(scale), rms


def _oriented_closest(scan: ScanSurface, P, N):
    """``closest(Q) -> (points, normals, rejected)`` on the scan, with the scan's normals turned to agree
    with ``N`` (mm frame of the scan) at the points ``P`` (flipped when its winding faces inwards;
    judged on the points within 10 mm of the scan)."""
    _, nq, dq, _ = scan.closest(P)
    near = dq < 10.0
    flip = -1.0 if near.any() and np.median(np.einsum("ij,ij->i", nq, N)[near]) < 0 else 1.0

    def closest(Q):
        q, nq_, _, onb = scan.closest(Q)
        return q, flip * nq_, ~onb

    return closest


def _start_similarity(T: Template, rest, L, usable, sim: Similarity, scale: float, scan: ScanSurface,
                      sim_params: SimilarityParams, sp: StartParams) -> tuple[Similarity, float]:
    """Stage 1 of a start of known scale: the start's scale, rigid ICP on ``sp.rigid_parts``.

    ``rest`` is the (jaw-posed) start in the template frame, ``L`` the scan landmarks (mm),
    ``usable`` the landmark inliers, ``sim`` stages 1 / 1b's similarity, ``scale`` the
    start's (:func:`_start_in_template_frame`). Returns the similarity posing ``rest`` on
    the scan and the rigid ICP's point-to-plane RMS residual (mm; NaN when it did not run).
    """
    rmse = float("nan")
    if sp.fix_scale:
        tl = T.landmark_points(rest)
        m = usable & sim.inliers if (usable & sim.inliers).sum() >= 3 else usable
        t = L[m].mean(axis=0) - scale * sim.rotation @ tl[m].mean(axis=0)
        sim = replace(sim, scale=float(scale), translation=t)
    if sp.rigid_iterations > 0 and sp.rigid_parts:
        ids = [T.part_names.index(p) for p in sp.rigid_parts]
        mask = np.isin(np.asarray(T.parts), ids)
        if mask.sum() >= 6:
            Nr = vertex_normals(rest, np.asarray(T.faces, np.int64))
            closest = _oriented_closest(scan, apply_similarity(sim, rest[mask]), Nr[mask] @ sim.rotation.T)
            sim = polish_rigid(rest[mask], Nr[mask], closest, sim,
                               replace(sim_params, icp_iterations=sp.rigid_iterations))
            rmse = float(sim.icp_rmse_mm)
    return sim, rmse


def _prior_weights(T: Template, sp: StartParams, start, L, used) -> np.ndarray:
    """Per-vertex prior weights (n,) of stage 2: ``prior_weight`` x part factor x landmark fall-off."""
    fac = dict(sp.part_prior)
    pf = np.array([fac.get(nm, 1.0) for nm in T.part_names])
    mu = sp.prior_weight * pf[np.asarray(T.parts, np.int64)]
    if sp.landmark_radius_mm > 0 and used.any():
        ls = T.landmark_points(start)
        moved = used.copy()
        moved[used] = np.linalg.norm(L[used] - ls[used], axis=1) > sp.landmark_motion_mm
        if moved.any():
            d, _ = cKDTree(ls[moved]).query(start)
            mu = mu * (1.0 - np.exp(-(d / sp.landmark_radius_mm) ** 2))
    return mu


def register(template, scan_vertices, scan_faces, scan_landmarks,
             params: RegistrationParams = RegistrationParams(), rng=0, start_vertices=None,
             start_params: StartParams | None = None, scan_texture: ScanTexture | None = None,
             start_detail=None) -> RegistrationResult:
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
    start_vertices : (n, 3) float64, optional
        Start from this shape instead of the template's mean face (default None): a
        registration of the same subject (e.g. its neutral scan; mm, any frame, template
        topology). It is mapped to the template frame by the least-squares similarity over
        all vertices and goes through stages 1 and 1b as the template would; then the
        similarity gets the start's scale and a rigid ICP on the forehead and nose
        (``start_params``), and stage 2 runs with a tangential pull towards the posed start
        (:class:`StartParams`). Without it the result is the same as before the option
        existed.
    start_params : StartParams, optional
        Only with ``start_vertices`` (default ``StartParams()``).
    scan_texture : ScanTexture, optional
        The scan's colour detail (from its coloured points, e.g. the fused cloud, built
        with ``params.photometric``). With it the result carries ``detail``.
    start_detail : (n,) float64, optional
        Only with ``start_vertices``: the start's ``detail`` (NaN where unknown). With a
        scan texture too, stage 2c runs after stage 2: ``params.photometric.rounds`` rounds of
        :func:`kernels.photometric.texture_flow` (the displacement that brings the scan's
        detail under each vertex's start detail) and a short NICP on the full template
        pulling the matched vertices to their displaced positions (projected onto the scan).

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
        PreparedTemplate, a PreparedTemplate built with other parameters;
        ``start_params`` without ``start_vertices`` or not a StartParams, ``start_vertices``
        of the wrong shape, non-finite, with coincident vertices or farther than
        ``max_shape_rms_mm`` from the template, ``start_params`` naming unknown parts;
        ``scan_texture`` not a ScanTexture, ``start_detail`` without ``start_vertices``,
        of the wrong shape or infinite.
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

    if start_params is not None and start_vertices is None:
        raise ValueError("start_params: given without start_vertices")
    if scan_texture is not None and not isinstance(scan_texture, ScanTexture):
        raise ValueError(f"scan_texture: expected a ScanTexture, got {type(scan_texture).__name__}")
    ref_detail = None
    if start_detail is not None:
        if start_vertices is None:
            raise ValueError("start_detail: given without start_vertices")
        ref_detail = as_array(start_detail, "start_detail", (T.n_vertices,))
        if np.isinf(ref_detail).any():
            raise ValueError("start_detail: contains infinite values (NaN means unknown)")
    sp = None
    rest = np.asarray(T.vertices, float)
    if start_vertices is not None:
        sp = StartParams() if start_params is None else start_params
        if not isinstance(sp, StartParams):
            raise ValueError(f"start_params: expected StartParams, got {type(sp).__name__}")
        sp.check_parts(T.part_names)
        rest, start_scale, start_rms = _start_in_template_frame(T, start_vertices, sp)

    # stage 1
    t1 = time.perf_counter()
    tl = T.landmark_points(rest)
    sim = fit_similarity(tl, L, params.similarity, gen)
    scan = ScanSurface(V, F)
    if params.similarity.icp_iterations > 0:
        face = np.asarray(T.parts) != 0

        def closest(P):
            q, nq, _, onb = scan.closest(P)
            return q, nq, ~onb

        Nt = vertex_normals(rest, np.asarray(T.faces, np.int64))
        sim = polish_rigid(rest[face], Nt[face], closest, sim, params.similarity)
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
    # orientation reference of the flip count: the template, posed as the start is (with a start
    # the posed start itself may fold a few triangles where the jaw rig meets its shape)
    ref_rest = np.asarray(T.vertices, float)
    if params.jaw.enabled and T.jaw is not None:
        rig = T.jaw
        V1 = apply_similarity(sim, rest)
        Fi = np.asarray(T.faces, np.int64)
        N1 = vertex_normals(V1, Fi)
        probe = np.random.default_rng(params.jaw.seed).choice(len(V1), min(len(V1), 2000), replace=False)
        closest_jaw = _oriented_closest(scan, V1[probe], N1[probe])

        pivot, axis = transform_rig(rig.pivot, rig.axis, sim.scale, sim.rotation, sim.translation)
        lw = T.landmark_weights(rig.weights)
        la = T.landmark_weights(axis) if axis.ndim == 2 else axis
        jaw = fit_jaw(V1, N1, rig.weights, pivot, axis, apply_similarity(sim, tl), lw, la, L, finite & ~out,
                      closest_jaw, params.jaw)
        if not jaw.skipped and jaw.angle_deg != 0.0:
            # the posed template (the similarity preserves angles: posing in the template frame
            # about the template's hinge is the same), the similarity refitted on its landmarks
            rest = pose_jaw(rest, rig.weights, rig.pivot, rig.axis, jaw.angle_deg)
            if sp is not None:
                ref_rest = pose_jaw(ref_rest, rig.weights, rig.pivot, rig.axis, jaw.angle_deg)
            tl = T.landmark_points(rest)
            if params.jaw.refit_similarity:
                sim = refit_similarity(tl, L, sim, params.similarity)
            out = outliers(tl, sim)
    jaw_s = time.perf_counter() - t1
    if sp is not None:
        sim, start_rigid_rmse = _start_similarity(T, rest, L, finite & ~out, sim, start_scale, scan,
                                                  params.similarity, sp)
        out = outliers(tl, sim)
    start = apply_similarity(sim, rest)
    used = finite & ~out
    n_out = int((out & finite).sum())

    # stage 2
    if prepared is None:
        prepared = prepare_template(T, params.nicp)
        prep_s = prepared.prepare_s
    if sp is None:
        res = nicp(prepared, start, scan, L, used, params.nicp)
        ref = start
    else:
        mu = _prior_weights(T, sp, start, L, used)
        ref = apply_similarity(sim, ref_rest)
        res = nicp(prepared, start, scan, L, used, params.nicp,
                   prior_weight=mu if sp.prior_weight > 0 else None, prior_tangential=sp.tangential,
                   orientation_reference=ref)
    iterations = res.iterations
    nicp_s = res.time_s

    # stage 2c: photometric refinement (the skin's slide along the surface, from its detail)
    tp = params.photometric
    t1 = time.perf_counter()
    tex_rounds, tex_matched, tex_flow = 0, float("nan"), float("nan")
    if tp.enabled and tp.rounds > 0 and scan_texture is not None and ref_detail is not None \
            and scan_texture.detail_std >= tp.min_detail_std and robust_std(ref_detail) >= tp.min_detail_std:
        step = NicpStep(tp.stiffness, tp.landmark_weight, tp.iterations, len(prepared.levels) - 1,
                        tp.max_distance_mm)
        rp = replace(params.nicp, schedule=(step,))
        ref_detail = ref_detail.copy()
        skip = [k for k, name in enumerate(T.part_names) if name in tp.skip_parts]
        ref_detail[np.isin(np.asarray(T.parts), skip)] = np.nan
        for k in range(tp.rounds):
            lm = T.landmark_points(res.vertices)
            up = lm[EYE_LANDMARKS].mean(axis=0) - lm[LIP_LANDMARKS].mean(axis=0)
            fl = texture_flow(res.vertices, T.faces, ref_detail, scan_texture, tp, up=up)
            if k == 0:
                tex_matched = float(fl.matched[fl.grid].mean()) if fl.grid.size else 0.0
                tex_flow = float(np.percentile(np.linalg.norm(fl.displacement[fl.matched], axis=1), 90)) \
                    if fl.matched.any() else 0.0
            if not fl.matched.any():
                break
            targets = np.where(fl.matched[:, None], res.vertices + fl.displacement, np.nan)
            res = nicp(prepared, res.vertices, scan, L, used, rp, orientation_reference=ref, targets=targets)
            iterations = iterations + res.iterations
            tex_rounds += 1
    tex_s = time.perf_counter() - t1
    detail = scan_texture.sample(res.vertices) if scan_texture is not None else None
    qc = registration_qc(res.vertices, T.faces, ref, res.distance_mm, res.valid)
    lm_reg = T.landmark_points(res.vertices)
    lm_err = np.linalg.norm(lm_reg[used] - L[used], axis=1)
    qc.update({
        "similarity_s": sim_s, "nicp_s": nicp_s, "prepare_s": float(prep_s),
        "time_s": time.perf_counter() - t0, "n_iterations": len(iterations),
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
        "start": 0.0 if sp is None else 1.0,
        "start_shape_rms_mm": float("nan") if sp is None else start_rms,
        "start_rigid_rmse_mm": float("nan") if sp is None else start_rigid_rmse,
        "texture_rounds": tex_rounds, "texture_matched_fraction": tex_matched, "texture_flow_p90_mm": tex_flow,
        "texture_s": tex_s,
        "texture_detail_std": scan_texture.detail_std if scan_texture is not None else float("nan"),
    })
    return RegistrationResult(res.vertices, res.distance_mm, res.valid, sim, used, iterations, qc, jaw, detail)
