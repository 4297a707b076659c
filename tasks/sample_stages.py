"""Sample-level stages (one instance per sample, after the view-level stages of every view).

Graph (``<stage>/<view>`` = the view-level output of each view of the sample)::

    decode/<v>, texture/<v>, landmarks/<v>  ─►  fusion  ─►  surface

* ``fusion``: multi-view fusion (:func:`kernels.fusion.fuse_views`, pivot ``middle``) of the
  decoded points of every view (``decode``: ``points``, ``confidence``; valid pixels are
  ``flags == 0`` with finite points and confidence, passed as ``masks=`` so the per-view normals
  come from the image grid), their colours (``texture``: ``colors``, NaN where unseen) and
  lifted landmarks (``landmarks``: ``points`` where ``status == OK``), the IR camera centres
  of the raw calibration as ``viewpoints``. Arrays: ``points`` (m, 3) float32 mm (pivot frame),
  ``normals`` (m, 3) float32, ``confidence`` (m,) float32, ``colours`` (m, 3) float32 (NaN
  rows unknown; present when some view had colours), ``n_views`` (m,) uint8, ``landmarks``
  (106, 3) float64 (NaN rows where no view lifted one), ``landmark_n_views`` (106,) uint8,
  ``transforms`` (n_views, 4, 4) float64 (view -> pivot, in the order of ``Target.views``).
  QC: per side view ``<v>_fitness``, ``<v>_rmse_mm`` (ICP inlier RMSE), ``<v>_converged`` (0/1),
  ``<v>_correction_deg`` / ``<v>_correction_mm``; ``n_points``, ``n_landmarks``,
  ``landmark_spread_mm``, ``spacing_mm``, ``n_views_used``. A side view with too few valid points
  (e.g. entirely masked) is dropped (``<v>_dropped`` = 1, NaN transform) and the sample is fused
  from the others; an empty pivot view fails the sample with a ValueError naming it.
* ``surface``: CVT mesh of the fused cloud (:func:`kernels.meshing.mesh_point_cloud`,
  ``MeshingParams.target_vertices``, default 100k; small test views need a smaller target,
  the kernel requires at least ``max(1000, target_vertices // 4)`` points) -> ``vertices``
  (n, 3) float32 mm, ``faces`` (k, 3) int32. QC: ``min_angle_30_fraction``, ``n_vertices``,
  ``n_faces``, ``holes``, ``hole_area_mm2``, ``meshing_s``.

* ``registration``: the template (``StageParams.registration.template``: the default template of
  :func:`kernels.template.default_template`, or a user template read from files by
  :func:`storage.template_io.read_template`) registered to the ``surface`` mesh with the
  ``fusion`` landmarks (:func:`kernels.registration.register`: landmark similarity, then NICP
  with per-part stiffness) -> ``vertices`` (n, 3) float32 mm in template topology, ``distance``
  (n,) float32 mm to the scan, ``valid`` (n,) bool, ``landmarks`` (106, 3) float64 (the
  template's landmarks on the registered mesh). QC: ``mean_distance_mm``, ``p95_distance_mm``,
  ``valid_fraction``, ``n_flipped``, ``n_degenerate``, ``landmark_rmse_mm``, timings, ...
  The template is built once per worker process (cached by its parameters). With the optional
  input ``start`` (another sample's registration, given by the subject flow when
  ``BuildConfig.register_from_neutral`` is set: the subject's neutral scan) the kernel starts
  from it (``register(start_vertices=...)``, default ``StartParams``), and the key includes it.
  The fused colours (when the fusion has them, at least 1000 coloured points) give the scan's
  colour detail (:class:`kernels.photometric.ScanTexture`): the artifact then has ``detail`` (n,)
  float32 (NaN where none), and a registration from a start that has ``detail`` runs the
  photometric refinement (stage 2c of :func:`kernels.registration.register`).

Neither stage reads raw files through its key: ``fusion`` reads the raw calibration only for
the camera centres, and every view's ``decode`` key already hashes the raw view.
"""

from __future__ import annotations

import functools

import numpy as np

from kernels.fusion import FusionParams, fuse_views, grid_view
from kernels.landmarks import LandmarkStatus
from kernels.meshing import MeshingParams, mesh_point_cloud
from kernels.nicp import PreparedTemplate, prepare_template
from kernels.photometric import ScanTexture
from kernels.registration import register
from kernels.template import Template, default_template
from pixelface.config import RegistrationStageParams, TemplateConfig
from tasks.stage import Sources, StageSpec

PIVOT = "middle"
MIN_COLOURED_POINTS = 1000  # fewer coloured fused points: no scan texture (no photometric stage 2c)


# -- fusion --------------------------------------------------------------------------------------

def _fusion_load(src: Sources, params):
    names = tuple(src.raw.target.unit_views)
    grids, vps = {}, {}
    for v in names:
        d = src.arrays(f"decode/{v}", ["points", "confidence", "flags"])
        lm = src.arrays(f"landmarks/{v}", ["points", "status"])
        L = np.where((lm["status"] == LandmarkStatus.OK)[:, None], lm["points"], np.nan).astype(np.float64)
        grids[v] = dict(points=d["points"], confidence=d["confidence"], flags=d["flags"],
                        colours=src.arrays(f"texture/{v}", ["colors"])["colors"], landmarks=L)
        vps[v] = np.asarray(src.raw.calibration(v).ir.center, dtype=np.float64)
    return dict(grids=grids, viewpoints=vps, names=names)


def _fusion_kernel(params: FusionParams | None, grids, viewpoints, names):
    views, masks = {}, {}
    for v, g in grids.items():
        views[v], masks[v] = grid_view(**g)
    pivot = PIVOT if PIVOT in views else names[len(names) // 2]
    r = fuse_views(views, pivot, params if params is not None else FusionParams(), viewpoints=viewpoints,
                   masks=masks)
    return r, names


def _fusion_pack(out):
    r, names = out
    arrays = {"points": r.points.astype(np.float32), "normals": r.normals.astype(np.float32),
              "confidence": r.confidence.astype(np.float32), "n_views": r.n_views.astype(np.uint8),
              "landmarks": np.asarray(r.landmarks, dtype=np.float64),
              "landmark_n_views": r.landmark_n_views.astype(np.uint8),
              "transforms": np.stack([r.transforms[n] for n in names]).astype(np.float64)}
    if r.colours is not None:
        arrays["colours"] = r.colours.astype(np.float32)
    qc = {"n_points": r.qc["n_points"], "n_landmarks": r.qc["n_landmarks"],
          "landmark_spread_mm": r.qc["landmark_spread_mm"], "spacing_mm": r.qc["spacing_mm"]}
    qc["n_views_used"] = r.qc["n_views_used"]
    for n in names:
        if n == r.pivot:
            continue
        if r.qc.get(f"{n}_dropped"):
            qc[f"{n}_dropped"] = 1.0
            continue
        qc.update({f"{n}_fitness": r.qc[f"{n}_fitness"], f"{n}_rmse_mm": r.qc[f"{n}_inlier_rmse_mm"],
                   f"{n}_converged": float(bool(r.converged[n])),
                   f"{n}_correction_deg": r.qc[f"{n}_correction_deg"],
                   f"{n}_correction_mm": r.qc[f"{n}_correction_mm"]})
    qc = {k: float(v) for k, v in qc.items()}
    return arrays, {k: v for k, v in qc.items() if np.isfinite(v)}


# -- surface -------------------------------------------------------------------------------------

def _surface_load(src: Sources, params):
    f = src.arrays("fusion", ["points", "normals"])
    P, N = f["points"].astype(np.float64), f["normals"].astype(np.float64)
    ok = np.isfinite(P).all(axis=1) & np.isfinite(N).all(axis=1) & (np.linalg.norm(N, axis=1) > 0)
    return dict(points=P[ok], normals=N[ok])


def _surface_kernel(params: MeshingParams | None, points, normals):
    return mesh_point_cloud(points, normals, params if params is not None else MeshingParams())


def _surface_pack(m):
    q = m.quality
    return ({"vertices": np.asarray(m.vertices, dtype=np.float32), "faces": np.asarray(m.faces, dtype=np.int32)},
            {"min_angle_30_fraction": float(q["frac_min_angle_ok"]), "n_vertices": float(q["n_vertices"]),
             "n_faces": float(q["n_faces"]), "holes": float(q["n_holes"]),
             "hole_area_mm2": float(q["hole_area_mm2"]), "meshing_s": float(q["meshing_s"])})


# -- registration ----------------------------------------------------------------------------------

def load_template(cfg: TemplateConfig) -> Template:
    """The template a configuration names (default: the synthetic mean face; else the user's files)."""
    if cfg.mesh is None:
        return default_template(cfg.n_vertices, cfg.margin_deg)
    from storage.template_io import read_template, template_files_sha256

    files = (cfg.mesh, cfg.landmarks, cfg.parts)
    if cfg.sha256 is not None and template_files_sha256(*files, jaw_path=cfg.jaw) != cfg.sha256:
        named = list(files) + ([cfg.jaw] if cfg.jaw else [])
        raise ValueError(f"template files {named} changed since the build was configured "
                         f"(sha256 {cfg.sha256[:12]}...); restart the build")
    return read_template(*files, jaw_path=cfg.jaw)


@functools.lru_cache(maxsize=4)
def prepared_template(stage: RegistrationStageParams) -> PreparedTemplate:
    """Template + its NICP operators, built once per process and parameters."""
    return prepare_template(load_template(stage.template), stage.registration.nicp)


def _registration_load(src: Sources, params):
    m = src.arrays("surface", ["vertices", "faces"])
    names = ["landmarks", "points", "colours"] if "colours" in src.array_names("fusion") else ["landmarks"]
    f = src.arrays("fusion", names)
    out = dict(vertices=m["vertices"].astype(np.float64), faces=m["faces"], landmarks=f["landmarks"])
    if "colours" in f:
        out["colour_points"] = f["points"].astype(np.float64)
        out["colours"] = f["colours"].astype(np.float64)
    if src.has("start"):  # the subject's neutral registration (BuildConfig.register_from_neutral)
        start = src.arrays("start", ["vertices", "detail"] if "detail" in src.array_names("start") else ["vertices"])
        out["start_vertices"] = start["vertices"].astype(np.float64)
        if "detail" in start:
            out["start_detail"] = start["detail"].astype(np.float64)
    return out


def _scan_texture(points, colours, params) -> ScanTexture | None:
    """The scan's colour detail, or None when too few of its points have a colour."""
    if points is None or colours is None:
        return None
    ok = np.isfinite(points).all(axis=1) & np.isfinite(colours).all(axis=1)
    if ok.sum() < MIN_COLOURED_POINTS:
        return None
    return ScanTexture(points[ok], np.clip(colours[ok], 0.0, 1.0), params)


def _registration_kernel(params: RegistrationStageParams | None, vertices, faces, landmarks, start_vertices=None,
                         colour_points=None, colours=None, start_detail=None):
    p = params if params is not None else RegistrationStageParams()
    prep = prepared_template(p)
    tex = _scan_texture(colour_points, colours, p.registration.photometric)
    return register(prep, vertices, faces, landmarks, p.registration, rng=p.seed, start_vertices=start_vertices,
                    scan_texture=tex, start_detail=start_detail if start_vertices is not None else None), prep.template


def _registration_pack(out):
    r, template = out
    arrays = {"vertices": r.vertices.astype(np.float32), "distance": r.distance_mm.astype(np.float32),
              "valid": np.asarray(r.valid, dtype=bool),
              "landmarks": template.landmark_points(r.vertices).astype(np.float64)}
    if r.detail is not None:
        arrays["detail"] = r.detail.astype(np.float32)
    qc = {}
    for k, v in r.qc.items():
        if isinstance(v, (bool, int, float, np.integer, np.floating)) and np.isfinite(float(v)):
            qc[k] = float(v)
    return arrays, qc


FUSION = StageSpec("fusion", "2", "sample", False, _fusion_load, _fusion_kernel, _fusion_pack)
SURFACE = StageSpec("surface", "2", "sample", False, _surface_load, _surface_kernel, _surface_pack)
REGISTRATION = StageSpec("registration", "3", "sample", False, _registration_load, _registration_kernel,
                         _registration_pack)
