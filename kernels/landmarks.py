"""Lift annotated 2D landmarks (RGB image) to 3D points of a view (paper section 3.1).

"To find the corresponding 3D landmark for each annotated 2D facial landmark, we
calculate the distance between 2D landmarks and the projected 2D coordinates of each 3D
vertex in point clouds. The nearest 3D vertex is retrieved as the corresponding 3D
landmark." This module does exactly that and then refines the retrieved vertex to
sub-pixel precision:

1. Landmarks that are NaN or flagged invisible -> ``NOT_ANNOTATED``; outside the RGB
   image -> ``OUT_OF_IMAGE`` (data, not an error).
2. Candidates are the view's points that the RGB camera sees (the ``visible`` mask of
   :func:`kernels.texture.visibility`; a point hidden behind the nose must not be
   retrieved for a landmark on the nose) whose projection lies within ``radius_px`` of
   some landmark; a ``scipy.spatial.cKDTree`` over their projections gives the nearest
   one. None within ``radius_px`` -> ``NO_POINT_WITHIN_RADIUS``.
3. Sub-pixel refinement: Newton iterations solve ``q(s) = landmark`` for the IR-grid
   position ``s`` with ``q`` the bilinear interpolation of the projected positions over
   the grid cell containing ``s`` (local bilinear inversion), starting at the nearest
   vertex and staying within ``max_shift_px`` of it; the 3D landmark is the bilinear
   interpolation of the points at ``s``. The cell's four corners must exist and be
   continuous (:func:`kernels.gridmesh.neighbour_links`), else the nearest vertex itself is
   returned (``refined = False``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from kernels._checks import check_positive
from kernels.texture import RGBProjection, _use_fast

try:  # fused loops (optional; the numpy code below is the reference, same result)
    from kernels import _fast_products as _fast
except ImportError:  # pragma: no cover - numba not installed
    _fast = None

N_LANDMARKS = 106


class LandmarkStatus(enum.IntEnum):
    """Reason code of each lifted landmark (``uint8``)."""

    #: lifted (see ``refined`` for sub-pixel refinement)
    OK = 0
    #: NaN coordinates or flagged invisible by the annotation
    NOT_ANNOTATED = 1
    #: annotated outside the RGB image
    OUT_OF_IMAGE = 2
    #: no visible point of the view projects within ``radius_px``
    NO_POINT_WITHIN_RADIUS = 3


@dataclass(frozen=True)
class LandmarkParams:
    """Parameters of :func:`lift_landmarks`.

    Attributes
    ----------
    radius_px : float
        Retrieval radius in RGB pixels (default 2.0; the view's points are about 1 px
        apart in the RGB image, so a landmark on the surface always has one within 1 px).
    max_shift_px : float
        Largest IR-grid move of the sub-pixel refinement from the nearest vertex (default 1.5).
    max_step_px : float
        Continuity rule of :mod:`kernels.gridmesh` for the refinement cell (default 6).
    iterations : int
        Newton iterations of the refinement (default 6).
    """

    radius_px: float = 2.0
    max_shift_px: float = 1.5
    max_step_px: float = 6.0
    iterations: int = 6

    def __post_init__(self):
        check_positive(self.radius_px, "LandmarkParams.radius_px")
        check_positive(self.max_shift_px, "LandmarkParams.max_shift_px")
        check_positive(self.max_step_px, "LandmarkParams.max_step_px")
        if int(self.iterations) < 0:
            raise ValueError(f"LandmarkParams.iterations: must be >= 0, got {self.iterations}")


@dataclass(frozen=True)
class LiftedLandmarks:
    """3D landmarks of one view.

    Attributes
    ----------
    points : (106, 3) float64
        Landmarks in mm (frame of the input points), NaN rows where not lifted.
    status : (106,) uint8
        :class:`LandmarkStatus` codes.
    distance_px : (106,) float32
        RGB distance from the annotation to the nearest visible projected point (NaN when
        none was searched or found).
    ir_position : (106, 2) float32
        ``(x, y)`` IR-grid position of the lifted point (sub-pixel when refined), NaN rows
        where not lifted.
    refined : (106,) bool
        Sub-pixel refinement succeeded.
    """

    points: np.ndarray
    status: np.ndarray
    distance_px: np.ndarray
    ir_position: np.ndarray
    refined: np.ndarray


def check_landmarks(landmarks_px, name: str = "landmarks_px") -> np.ndarray:
    """Validate a 2D landmark array: ``(106, 2)`` real numbers (NaN rows allowed)."""
    arr = np.asarray(landmarks_px)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValueError(f"{name}: expected a real (106, 2) array of pixel coordinates, got dtype {arr.dtype}")
    if arr.shape != (N_LANDMARKS, 2):
        raise ValueError(f"{name}: expected shape ({N_LANDMARKS}, 2), got {arr.shape}")
    arr = arr.astype(np.float64)
    if np.any(np.isinf(arr)):
        raise ValueError(f"{name}: contains infinite values")
    return arr


def lift_landmarks(landmarks_px, projection: RGBProjection, points, ir_depth, ir_focal_px: float, *,
                   visible=None, landmark_visible=None,
                   params: LandmarkParams = LandmarkParams(), engine: str = "auto") -> LiftedLandmarks:
    """Retrieve the 3D point of a view under each annotated 2D landmark.

    Parameters
    ----------
    landmarks_px : (106, 2) float
        Annotated ``(x, y)`` RGB pixel coordinates, NaN rows for unannotated landmarks.
    projection : RGBProjection
        The view's points projected into the RGB camera (:func:`kernels.texture.project_to_rgb`).
    points : (H, W, 3) float
        The view's organised points (mm), NaN where invalid.
    ir_depth : (H, W) float
        IR-frame depth of the points (continuity rule of the refinement cell).
    ir_focal_px : float
        IR focal length ``fx`` (pixels).
    visible : (H, W) bool, optional
        Points seen by the RGB camera (:func:`kernels.texture.visibility`); default: all
        points with a projection.
    landmark_visible : (106,) bool, optional
        The annotation's visibility flags; ``False`` rows are ``NOT_ANNOTATED``.
    params : LandmarkParams
    engine : {"auto", "numba", "numpy"}
        Candidate search with the fused loop of :mod:`kernels._fast_products` (default
        when numba is installed) or numpy; same result.

    Returns
    -------
    LiftedLandmarks

    Raises
    ------
    ValueError
        ``landmarks_px`` not a real ``(106, 2)`` array; ``landmark_visible`` not ``(106,)``;
        ``points`` / ``ir_depth`` / ``visible`` not matching the projection.
    """
    L = check_landmarks(landmarks_px)
    if not isinstance(projection, RGBProjection):
        raise ValueError(f"projection: expected an RGBProjection, got {type(projection).__name__}")
    if not isinstance(params, LandmarkParams):
        raise ValueError(f"params: expected LandmarkParams, got {type(params).__name__}")
    H, W = projection.x.shape
    P = np.asarray(points)
    if P.shape != (H, W, 3):
        raise ValueError(f"points: expected shape ({H}, {W}, 3), got {P.shape}")
    Zi = np.asarray(ir_depth, dtype=np.float32)
    if Zi.shape != (H, W):
        raise ValueError(f"ir_depth: expected shape ({H}, {W}), got {Zi.shape}")
    check_positive(ir_focal_px, "ir_focal_px")
    if landmark_visible is not None:
        lv = np.asarray(landmark_visible)
        if lv.shape != (N_LANDMARKS,) or lv.dtype != np.bool_:
            raise ValueError(f"landmark_visible: expected a ({N_LANDMARKS},) bool array, got {lv.dtype} {lv.shape}")
    else:
        lv = np.ones(N_LANDMARKS, bool)
    if visible is not None:
        vis = np.asarray(visible)
        if vis.shape != (H, W) or vis.dtype != np.bool_:
            raise ValueError(f"visible: expected a ({H}, {W}) bool array, got {vis.dtype} {vis.shape}")
    else:
        vis = np.isfinite(projection.x)

    h, w = projection.rgb_size
    status = np.full(N_LANDMARKS, LandmarkStatus.OK, np.uint8)
    annotated = lv & np.all(np.isfinite(L), axis=1)
    status[~annotated] = LandmarkStatus.NOT_ANNOTATED
    with np.errstate(invalid="ignore"):
        inside = (L[:, 0] >= -0.5) & (L[:, 0] <= w - 0.5) & (L[:, 1] >= -0.5) & (L[:, 1] <= h - 0.5)
    status[annotated & ~inside] = LandmarkStatus.OUT_OF_IMAGE
    todo = np.flatnonzero(status == LandmarkStatus.OK)

    out_pts = np.full((N_LANDMARKS, 3), np.nan)
    dist = np.full(N_LANDMARKS, np.nan, np.float32)
    pos = np.full((N_LANDMARKS, 2), np.nan, np.float32)
    refined = np.zeros(N_LANDMARKS, bool)
    if todo.size:
        cand = _candidates(projection, vis, L[todo], params.radius_px, fast=_use_fast(engine))
        if cand.size:
            qx = projection.x.reshape(-1)[cand]
            qy = projection.y.reshape(-1)[cand]
            tree = cKDTree(np.stack([qx, qy], axis=1).astype(np.float64))
            d, j = tree.query(L[todo], k=1, distance_upper_bound=params.radius_px)
        else:
            d = np.full(todo.size, np.inf)
            j = np.zeros(todo.size, np.intp)
        found = np.isfinite(d)
        status[todo[~found]] = LandmarkStatus.NO_POINT_WITHIN_RADIUS
        ok = todo[found]
        if ok.size:
            pix = cand[j[found]]
            dist[ok] = d[found]
            r0 = (pix // W).astype(np.float64)
            c0 = (pix % W).astype(np.float64)
            s, good = _refine(projection, Zi, float(ir_focal_px), params, L[ok], c0, r0)
            refined[ok] = good
            sx = np.where(good, s[:, 0], c0)
            sy = np.where(good, s[:, 1], r0)
            pos[ok, 0] = sx
            pos[ok, 1] = sy
            out_pts[ok] = _interp_points(P, sx, sy, good, pix)
    return LiftedLandmarks(out_pts, status, dist, pos, refined)


def _candidates(projection: RGBProjection, vis: np.ndarray, L: np.ndarray, radius: float,
                fast: bool = False) -> np.ndarray:
    """Flat IR indices of visible points projecting within ``radius`` (box) of some landmark."""
    H, W = projection.x.shape
    h, w = projection.rgb_size
    r = int(np.ceil(radius)) + 1
    M = np.zeros((h, w), bool)
    for x, y in np.rint(L).astype(int):
        M[max(y - r, 0): min(y + r + 1, h), max(x - r, 0): min(x + r + 1, w)] = True
    r0, r1 = projection.rows
    band = slice(r0 * W, r1 * W)
    if fast:
        out = np.empty((r1 - r0) * W, np.intp)
        k = _fast.landmark_candidates(projection.x.reshape(-1)[band], projection.y.reshape(-1)[band],
                                      np.ascontiguousarray(vis).reshape(-1)[band], M.reshape(-1), h, w, r0 * W, out)
        return out[:k]
    idx = np.flatnonzero(vis.reshape(-1)[band])
    idx += r0 * W
    x = projection.x.reshape(-1)[idx]
    y = projection.y.reshape(-1)[idx]
    with np.errstate(invalid="ignore"):
        cx = np.rint(x)
        cy = np.rint(y)
        ok = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    sel = np.flatnonzero(ok)
    lin = cy[sel].astype(np.intp) * w + cx[sel].astype(np.intp)
    return idx[sel[M.reshape(-1)[lin]]]


def _refine(projection, Zi, f_ir, params, L, c0, r0):
    """Newton on the bilinear map q(s) of the grid cell containing s; returns s (n, 2) and success."""
    H, W = projection.x.shape
    QX, QY = projection.x, projection.y
    n = L.shape[0]
    sx, sy = c0.copy(), r0.copy()
    good = np.ones(n, bool)
    for _ in range(int(params.iterations)):
        cx = np.clip(np.floor(sx), 0, W - 2).astype(np.intp)
        cy = np.clip(np.floor(sy), 0, H - 2).astype(np.intp)
        u, v = sx - cx, sy - cy
        q = [(QX[cy + a, cx + b].astype(np.float64), QY[cy + a, cx + b].astype(np.float64))
             for a, b in ((0, 0), (0, 1), (1, 0), (1, 1))]
        (x00, y00), (x01, y01), (x10, y10), (x11, y11) = q
        fx = x00 * (1 - u) * (1 - v) + x01 * u * (1 - v) + x10 * (1 - u) * v + x11 * u * v
        fy = y00 * (1 - u) * (1 - v) + y01 * u * (1 - v) + y10 * (1 - u) * v + y11 * u * v
        jxu = (x01 - x00) * (1 - v) + (x11 - x10) * v
        jxv = (x10 - x00) * (1 - u) + (x11 - x01) * u
        jyu = (y01 - y00) * (1 - v) + (y11 - y10) * v
        jyv = (y10 - y00) * (1 - u) + (y11 - y01) * u
        det = jxu * jyv - jxv * jyu
        ex, ey = L[:, 0] - fx, L[:, 1] - fy
        with np.errstate(invalid="ignore", divide="ignore"):
            du = (jyv * ex - jxv * ey) / det
            dv = (jxu * ey - jyu * ex) / det
        bad = ~(np.isfinite(du) & np.isfinite(dv))
        good &= ~bad
        du[bad] = 0
        dv[bad] = 0
        sx = sx + du
        sy = sy + dv
    shift = np.hypot(sx - c0, sy - r0)
    good &= shift <= params.max_shift_px
    good &= (sx >= 0) & (sx <= W - 1) & (sy >= 0) & (sy <= H - 1)
    # the final cell must be a continuous mesh cell
    cx = np.clip(np.floor(sx), 0, W - 2).astype(np.intp)
    cy = np.clip(np.floor(sy), 0, H - 2).astype(np.intp)
    z = np.stack([Zi[cy, cx], Zi[cy, cx + 1], Zi[cy + 1, cx], Zi[cy + 1, cx + 1]], axis=1).astype(np.float64)
    with np.errstate(invalid="ignore"):
        spread = np.max(z, axis=1) - np.min(z, axis=1)
        good &= spread <= params.max_step_px * np.sqrt(2.0) * np.min(z, axis=1) / f_ir
    s = np.stack([sx, sy], axis=1)
    s[~good] = np.nan
    return s, good


def _interp_points(P, sx, sy, good, pix):
    H, W, _ = P.shape
    out = P.reshape(-1, 3)[pix].astype(np.float64)
    if np.any(good):
        g = np.flatnonzero(good)
        x, y = sx[g], sy[g]
        cx = np.clip(np.floor(x), 0, W - 2).astype(np.intp)
        cy = np.clip(np.floor(y), 0, H - 2).astype(np.intp)
        u = (x - cx)[:, None]
        v = (y - cy)[:, None]
        p00 = P[cy, cx].astype(np.float64)
        p01 = P[cy, cx + 1].astype(np.float64)
        p10 = P[cy + 1, cx].astype(np.float64)
        p11 = P[cy + 1, cx + 1].astype(np.float64)
        out[g] = p00 * (1 - u) * (1 - v) + p01 * u * (1 - v) + p10 * (1 - u) * v + p11 * u * v
    return out
