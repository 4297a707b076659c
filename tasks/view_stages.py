"""Per-view stages downstream of ``decode``: ``depth``, ``texture``, ``mesh``, ``landmarks``.

Graph (per view; every stage also keys on the raw view, whose calibration it reads)::

    raw ─► decode ─┬─► depth ─► texture ─► landmarks
                   └─► mesh                    ▲
                   └───────────────────────────┘

* ``depth``: RGB-aligned depth image (:func:`kernels.depth.depth_image`) -> ``depth`` (h, w) float32 mm.
* ``texture``: per-point colour (:func:`kernels.texture.texture_map`) -> ``colors`` (H, W, 3)
  float32 in [0, 1] (NaN unseen), ``visible`` (H, W) bool.
* ``mesh``: the view's grid mesh (:func:`kernels.gridmesh.grid_mesh`) -> ``vertices`` (n, 3)
  float32, ``faces`` (m, 3) int32, ``pixel`` (n,) int64.
* ``landmarks``: 106 annotated 2D landmarks lifted to 3D (:func:`kernels.landmarks.lift_landmarks`)
  -> ``points`` (106, 3) float64, ``status`` (106,) uint8, ``distance_px``, ``ir_position``, ``refined``.
"""

from __future__ import annotations

import numpy as np

from kernels.depth import DepthParams, depth_image
from kernels.gridmesh import GridMeshParams, grid_mesh
from kernels.landmarks import LandmarkParams, LandmarkStatus, lift_landmarks
from kernels.texture import project_to_rgb, texture_map
from kernels.texture import TextureParams
from tasks.decode import SPEC as DECODE
from tasks.sample_stages import FUSION, REGISTRATION, SURFACE
from tasks.stage import Chain, Sources, StageSpec, Step


# -- depth ---------------------------------------------------------------------------------------

def _depth_load(src: Sources, params):
    cal = src.raw.calibration(src.view)
    return dict(ir_depth=src.arrays("decode", ["depth"])["depth"], ir=cal.ir, rgb=cal.rgb)


def _depth_kernel(params: DepthParams, ir_depth, ir, rgb):
    proj = project_to_rgb(ir_depth, ir, rgb)
    return depth_image(proj, ir_depth, float(ir.K[0, 0]), params)


def _depth_pack(d):
    ok = np.isfinite(d)
    return {"depth": d}, {"valid_fraction": float(ok.mean()),
                          **({"median_mm": float(np.median(d[ok]))} if ok.any() else {})}


# -- texture -------------------------------------------------------------------------------------

def _texture_load(src: Sources, params):
    cal = src.raw.calibration(src.view)
    return dict(ir_depth=src.arrays("decode", ["depth"])["depth"], rgb_depth=src.arrays("depth", ["depth"])["depth"],
                ir=cal.ir, rgb=cal.rgb, image=src.raw.rgb(src.view))


def _texture_kernel(params: TextureParams, ir_depth, rgb_depth, ir, rgb, image):
    proj = project_to_rgb(ir_depth, ir, rgb)
    return texture_map(proj, image, rgb_depth, occlusion_tol_mm=params.occlusion_tol_mm,
                       occlusion_tol_px=params.occlusion_tol_px)


def _texture_pack(t):
    return {"colors": t.colors, "visible": t.visible}, {"visible_fraction": float(t.visible.mean())}


# -- mesh ----------------------------------------------------------------------------------------

def _mesh_load(src: Sources, params):
    d = src.arrays("decode", ["points", "depth"])
    return dict(points=d["points"], ir_depth=d["depth"], focal=float(src.raw.calibration(src.view).ir.K[0, 0]))


def _mesh_kernel(params: GridMeshParams, points, ir_depth, focal):
    return grid_mesh(points, ir_depth, focal, params)


def _mesh_pack(m):
    return ({"vertices": m.vertices, "faces": m.faces, "pixel": m.pixel},
            {"n_vertices": float(len(m.vertices)), "n_faces": float(len(m.faces)),
             "n_components": float(m.n_components)})


# -- landmarks -----------------------------------------------------------------------------------

def _landmarks_load(src: Sources, params):
    cal = src.raw.calibration(src.view)
    lm, vis = src.raw.landmarks(src.view)
    d = src.arrays("decode", ["points", "depth"])
    visible = src.arrays("texture", ["visible"])["visible"]
    return dict(landmarks_px=lm, landmark_visible=vis, points=d["points"], ir_depth=d["depth"], ir=cal.ir,
                rgb=cal.rgb, visible=visible)


def _landmarks_kernel(params: LandmarkParams, landmarks_px, landmark_visible, points, ir_depth, ir, rgb, visible):
    proj = project_to_rgb(ir_depth, ir, rgb)
    return lift_landmarks(landmarks_px, proj, points, ir_depth, float(ir.K[0, 0]), visible=visible,
                          landmark_visible=landmark_visible, params=params)


def _landmarks_pack(r):
    ok = r.status == LandmarkStatus.OK
    return ({"points": r.points, "status": r.status, "distance_px": r.distance_px, "ir_position": r.ir_position,
             "refined": r.refined},
            {"lifted": float(ok.sum()), "refined": float(r.refined.sum()),
             **({"max_distance_px": float(np.nanmax(r.distance_px[ok]))} if ok.any() else {})})


DEPTH = StageSpec("depth", "1", "view", True, _depth_load, _depth_kernel, _depth_pack)
TEXTURE = StageSpec("texture", "1", "view", True, _texture_load, _texture_kernel, _texture_pack)
MESH = StageSpec("mesh", "1", "view", True, _mesh_load, _mesh_kernel, _mesh_pack)
LANDMARKS = StageSpec("landmarks", "1", "view", True, _landmarks_load, _landmarks_kernel, _landmarks_pack)

VIEW_STEPS = (Step(DECODE), Step(DEPTH, ("decode",)), Step(TEXTURE, ("decode", "depth")), Step(MESH, ("decode",)),
              Step(LANDMARKS, ("decode", "texture")))
"""Per-view stages in dependency order (fusion, meshing, registration append sample-level steps)."""

SAMPLE_STEPS = (Step(FUSION, ("decode", "texture", "landmarks")), Step(SURFACE, ("fusion",)),
                Step(REGISTRATION, ("surface", "fusion"), external=("start",)))
"""Sample-level stages (tasks/sample_stages.py): multi-view fusion, then the CVT surface mesh."""

SAMPLE_CHAIN = Chain("sample", VIEW_STEPS + SAMPLE_STEPS)
"""One unit per sample: every view's stages, then the sample-level ones (fusion, surface)."""
VIEW_CHAIN = Chain("view", VIEW_STEPS)
"""One unit per view (the view-level stages only; units of a finer grain, no sample-level stages)."""
