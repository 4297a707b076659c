"""Multi-view fusion of one capture (paper section 3.1, "Multi-View Fusion").

"We set the middle mesh as the pivot and align the left and right point clouds to the
pivot [...] coarsely [from the 3D landmarks]. [...] we further refine the fusion results
by [ICP]. Finally, we merge the overlapped vertices and omit the isolated vertices.
After fusion, we obtain full-view 3D point clouds and complete 3D landmarks."

:func:`fuse_views` chains the three kernels:

1. :func:`kernels.align.align_landmarks` -- RANSAC + Kabsch on the landmarks a side view
   and the pivot both lifted (fallback to the stored calibration, i.e. the identity,
   when too few are shared);
2. :func:`kernels.icp.refine_icp` -- coarse-to-fine point-to-plane ICP onto the pivot;
3. :func:`kernels.merge.merge_views` -- overlap merge, isolated-point removal, normals;

and fuses the landmarks (mean of the aligned views that lifted each one).

Speed (full size, three 1280 x 1024 views, 1.5 M points, one core): before ICP, each view
is reduced to confidence-weighted 0.7 mm voxel means (:func:`kernels.merge.voxel_average`,
``FusionParams.view_voxel_mm``; ~0.22 mm pixels -> ~7x fewer points at a ~0.5 mm spacing,
still dense enough for a 100k-vertex face mesh), and, when the organised valid masks are passed
(``masks=``), per-view normals come from the image grid
(:func:`kernels.merge.organised_normals`, over the bounding box of the valid pixels only)
instead of a KD-tree PCA over the fused cloud.
ICP and the merge then run on the reduced views (benchmarks/fusion.py).

Frames: every view's points are given in the world frame of the *stored* calibration
(``decode_view(..., frame="world")``); the pivot's stored pose defines the world frame
(docs/conventions.md), so the pivot's transform is the identity and a side view's
transform is the correction of its stored calibration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels._checks import as_array
from kernels._geometry import apply_transform as _apply
from kernels.align import FALLBACK, CoarseAlignment, CoarseParams, align_landmarks
from kernels.icp import IcpParams, IcpResult, prepare_target, refine_icp
from kernels.merge import MergeParams, _grid_normals, merge_views, valid_box, voxel_average

N_LANDMARKS = 106


@dataclass(frozen=True)
class FusionParams:
    """Parameters of :func:`fuse_views` (all solver schedules are data here).

    Attributes
    ----------
    coarse : CoarseParams
        Landmark alignment (minimum shared landmarks, RANSAC threshold and trials).
    icp : IcpParams
        ICP schedule (voxel sizes, correspondence distances, iterations per level).
    merge : MergeParams
        Overlap merge, outlier removal and normals.
    icp_on_fallback : bool
        When the landmark alignment falls back to the stored calibration, still refine
        it by ICP from the identity (default True: the stored calibration is normally
        within a degree / a few mm, inside ICP's capture range). The coarse record keeps
        the fallback status either way.
    seed : int
        Seed of the RANSAC draws (default 0; each view's generator is derived from it
        and the view name, so the result does not depend on the dict order).
    view_voxel_mm : float
        Each view is replaced by its confidence-weighted voxel means at this size
        before ICP and the merge (mm; default 0.7, a ~0.5 mm point spacing: enough for
        a 100k-vertex face mesh; 0 = keep every point). Measured at full size
        (benchmarks/fusion.py): 0.7 -> 2.7 s, RMS to GT 0.070 mm, 208k points; 0.5 ->
        3.3 s, 0.063 mm, 374k points; 0 (no averaging) -> 0.057 mm.
    min_view_points : int
        A side view with fewer valid points than this (default 500; e.g. a view that is
        entirely masked because its projector or camera failed) is dropped: the sample is
        fused from the remaining views, the dropped view gets a NaN transform,
        ``converged[view] = False`` and ``qc["<view>_dropped"] = 1``. A pivot view with
        fewer points is an error (it defines the frame and the ICP target).
    """

    coarse: CoarseParams = field(default_factory=CoarseParams)
    icp: IcpParams = field(default_factory=IcpParams)
    merge: MergeParams = field(default_factory=MergeParams)
    icp_on_fallback: bool = True
    seed: int = 0
    view_voxel_mm: float = 0.7
    min_view_points: int = 500

    def __post_init__(self):
        for name, cls in (("coarse", CoarseParams), ("icp", IcpParams), ("merge", MergeParams)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"FusionParams.{name}: expected {cls.__name__}, got "
                                 f"{type(getattr(self, name)).__name__}")
        if not isinstance(self.icp_on_fallback, bool):
            raise ValueError(f"FusionParams.icp_on_fallback: expected a bool, got {self.icp_on_fallback!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"FusionParams.seed: expected an int >= 0, got {self.seed!r}")
        if isinstance(self.view_voxel_mm, bool) or not isinstance(self.view_voxel_mm, (int, float, np.floating)) \
                or not np.isfinite(self.view_voxel_mm) or self.view_voxel_mm < 0:
            raise ValueError(f"FusionParams.view_voxel_mm: expected a finite number >= 0, got {self.view_voxel_mm!r}")
        if isinstance(self.min_view_points, bool) or not isinstance(self.min_view_points, (int, np.integer)) \
                or self.min_view_points < 1:
            raise ValueError(f"FusionParams.min_view_points: expected an int >= 1, got {self.min_view_points!r}")


@dataclass(frozen=True)
class FusionResult:
    """Outcome of :func:`fuse_views`.

    Attributes
    ----------
    pivot : str
    transforms : dict of str to (4, 4) float64
        Per view, input frame -> pivot frame (``x_p = T[:3, :3] @ x + T[:3, 3]``, mm);
        the identity for the pivot; all NaN for a dropped view (too few points).
    coarse : dict of str to CoarseAlignment
        Landmark alignment of each side view that was not dropped.
    icp : dict of str to IcpResult or None
        ICP of each side view (None when it was not run: fallback with
        ``icp_on_fallback = False``).
    converged : dict of str to bool
        Per side view: the final transform comes from a converged ICP (or, without ICP,
        from a converged landmark alignment).
    points : (m, 3) float64
        Fused points in the pivot frame (mm).
    normals : (m, 3) float64
        Unit normals, oriented outwards.
    colours : (m, 3) float64 or None
        Fused colours (NaN rows where unknown); None when no view had colours.
    confidence : (m,) float64
    n_views : (m,) uint8
        Views merged into each point.
    landmarks : (106, 3) float64
        Fused landmarks in the pivot frame, NaN rows where no view lifted one.
    landmark_n_views : (106,) uint8
        Views that lifted each landmark.
    qc : dict of str to float or int
        ``n_input``, ``n_view_samples`` (points after the per-view voxel means),
        ``n_points``, ``n_merged_groups``, ``n_isolated_removed``,
        ``n_cluster_removed``, ``spacing_mm``, ``landmark_spread_mm`` (median over
        multi-view landmarks of the largest distance of a view's landmark to the fused
        one), per side view ``{name}_fitness``, ``{name}_inlier_rmse_mm``,
        ``{name}_landmark_inliers``, ``{name}_coarse_rmse_mm``,
        ``{name}_correction_deg`` and ``{name}_correction_mm`` (size of the applied
        transform at the centroid of the view).
    """

    pivot: str
    transforms: dict
    coarse: dict
    icp: dict
    converged: dict
    points: np.ndarray
    normals: np.ndarray
    colours: np.ndarray | None
    confidence: np.ndarray
    n_views: np.ndarray
    landmarks: np.ndarray
    landmark_n_views: np.ndarray
    qc: dict


def _check_view(name, view):
    if not isinstance(view, (tuple, list)) or len(view) != 4:
        raise ValueError(f"views[{name!r}]: expected a tuple (points, confidence, colours, landmarks), got "
                         f"{type(view).__name__}{'' if not isinstance(view, (tuple, list)) else f' of length {len(view)}'}")
    pts, conf, col, lm = view
    p = as_array(pts, f"views[{name!r}].points", (None, 3), finite=True)
    n = p.shape[0]
    c = as_array(conf, f"views[{name!r}].confidence", (n,), finite=True)
    if np.any((c < 0) | (c > 1)):
        raise ValueError(f"views[{name!r}].confidence: values must be in [0, 1], got range "
                         f"[{c.min():.3g}, {c.max():.3g}]")
    if col is not None:
        col = as_array(col, f"views[{name!r}].colours", (n, 3))
        if np.any(np.isinf(col)):
            raise ValueError(f"views[{name!r}].colours: contains infinite values (NaN rows mean unknown)")
    L = as_array(lm, f"views[{name!r}].landmarks", (N_LANDMARKS, 3))
    if np.any(np.isinf(L)) or np.any(np.isnan(L).any(axis=1) != np.isnan(L).all(axis=1)):
        raise ValueError(f"views[{name!r}].landmarks: rows must be all finite or all NaN")
    return p, c, col, L


def _check_mask(name, mask, n):
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != bool:
        raise ValueError(f"masks[{name!r}]: expected an (H, W) bool array, got {m.dtype} of shape {m.shape}")
    if int(np.count_nonzero(m)) != n:
        raise ValueError(f"masks[{name!r}]: {int(np.count_nonzero(m))} valid pixels, but the view has {n} points")
    return m


def _view_normals(P, mask, half_window, towards):
    """Grid normals of one view's points (row-major True pixels of ``mask``), oriented as a
    whole so that most face ``towards`` (per-point directions)."""
    # only the bounding box of the valid pixels (plus the filter margin) is filtered: the face
    # covers ~40% of the image; same normals as organised_normals over the whole grid
    box = valid_box(mask, int(half_window) + 1)
    if box is None:
        return np.zeros((0, 3))
    N = _grid_normals(mask[box[0]:box[1], box[2]:box[3]], P, int(half_window))
    s = np.nansum(np.einsum("ij,ij->i", N, towards))
    return -N if s < 0 else N


def _angle_deg(R: np.ndarray) -> float:
    s = 0.5 * np.linalg.norm([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    return float(np.degrees(np.arctan2(s, 0.5 * (np.trace(R) - 1.0))))


def grid_view(points: np.ndarray, confidence: np.ndarray, flags: np.ndarray, colours: np.ndarray | None = None,
              landmarks: np.ndarray | None = None) -> tuple[tuple, np.ndarray]:
    """One view's input to :func:`fuse_views` from its decoded image grids.

    Parameters
    ----------
    points : (H, W, 3) float
        Decoded points in mm (NaN where not decoded).
    confidence : (H, W) float
        Per-pixel confidence; clipped to [0, 1].
    flags : (H, W) integer
        Decode flags; 0 = valid.
    colours : (H, W, 3) float, optional
        Colours per pixel (NaN = unknown).
    landmarks : (106, 3) float, optional
        Lifted landmarks in mm, NaN rows where not lifted.

    Returns
    -------
    view : tuple
        ``(points (n, 3) float64, confidence (n,) float64, colours (n, 3) float64 or None,
        landmarks)``: the valid pixels (flag 0, finite point and confidence) in row-major order.
    valid : (H, W) bool
        Those pixels (the ``masks`` entry of :func:`fuse_views`).

    Raises
    ------
    ValueError
        Shapes that do not agree.
    """
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] != 3:
        raise ValueError(f"points: expected (H, W, 3), got {points.shape}")
    grid = points.shape[:2]
    confidence, flags = np.asarray(confidence), np.asarray(flags)
    for name, a in (("confidence", confidence), ("flags", flags)):
        if a.shape != grid:
            raise ValueError(f"{name}: expected {grid} like points, got {a.shape}")
    if colours is not None and np.shape(colours) != points.shape:
        raise ValueError(f"colours: expected {points.shape} like points, got {np.shape(colours)}")
    valid = (flags == 0) & np.isfinite(points).all(axis=-1) & np.isfinite(confidence)
    cols = None if colours is None else np.asarray(colours)[valid].astype(np.float64)
    view = (points[valid].astype(np.float64), np.clip(confidence[valid].astype(np.float64), 0.0, 1.0), cols,
            landmarks)
    return view, valid


def fuse_views(views: dict, pivot: str = "middle", params: FusionParams = FusionParams(), *,
               viewpoints: dict | None = None, masks: dict | None = None) -> FusionResult:
    """Fuse a capture's views into one point cloud with outward normals and 106 landmarks.

    Parameters
    ----------
    views : dict of str to tuple
        ``name -> (points, confidence, colours, landmarks)`` with ``points`` (n, 3)
        float64 in mm (stored-calibration world frame, finite), ``confidence`` (n,) in
        [0, 1], ``colours`` (n, 3) float or None (NaN rows = unknown), ``landmarks``
        (106, 3) float64 with NaN rows where not lifted.
    pivot : str
        The view that defines the frame (default ``"middle"``).
    params : FusionParams
    viewpoints : dict of str to (3,) float64, optional
        Each view's IR camera centre in its input frame; normals are then oriented
        towards the camera that contributed most to each point (else away from
        ``params.merge.head_centre_mm``).
    masks : dict of str to (H, W) bool, optional
        Each view's organised valid-pixel mask (``decode_view(...).valid``), the view's
        points being its True pixels in row-major order (``points = dv.points[valid]``).
        Normals are then taken from the image grid (fast); without masks they are PCA
        normals of the fused cloud.

    Returns
    -------
    FusionResult

    Raises
    ------
    ValueError
        ``views`` empty or not a dict, ``pivot`` not a view, a view malformed (NaN or
        infinite points, confidence outside [0, 1], wrong shapes), bad ``viewpoints`` or
        ``masks`` (not (H, W) bool, or a count of True pixels other than the view's points),
        a pivot view with fewer than ``params.min_view_points`` points. A side view with
        too few points is dropped, not an error (see ``FusionParams.min_view_points``).
    """
    if not isinstance(views, dict) or not views:
        raise ValueError(f"views: expected a non-empty dict of name -> view, got {type(views).__name__}")
    if pivot not in views:
        raise ValueError(f"pivot: {pivot!r} is not one of the views {sorted(views)}")
    if not isinstance(params, FusionParams):
        raise ValueError(f"params: expected FusionParams, got {type(params).__name__}")
    data = {name: _check_view(name, v) for name, v in views.items()}
    vps = None
    if viewpoints is not None:
        if not isinstance(viewpoints, dict) or set(viewpoints) != set(views):
            raise ValueError(f"viewpoints: expected a dict with the keys {sorted(views)}")
        vps = {k: as_array(v, f"viewpoints[{k!r}]", (3,), finite=True) for k, v in viewpoints.items()}
    if masks is not None:
        if not isinstance(masks, dict) or set(masks) != set(views):
            raise ValueError(f"masks: expected a dict with the keys {sorted(views)}")
        masks = {k: _check_mask(k, masks[k], data[k][0].shape[0]) for k in views}

    n_input = int(sum(d[0].shape[0] for d in data.values()))
    if data[pivot][0].shape[0] < params.min_view_points:
        raise ValueError(f"views[{pivot!r}]: the pivot view has {data[pivot][0].shape[0]} valid points, fewer "
                         f"than min_view_points={params.min_view_points}; cannot fuse without it")
    n_view_points = {n: int(data[n][0].shape[0]) for n in views}
    dropped = [n for n in views if n != pivot and n_view_points[n] < params.min_view_points]
    names = [n for n in views if n not in dropped]
    centroid = {n: data[n][0].mean(axis=0) if data[n][0].shape[0] else np.zeros(3) for n in names}
    # per view: grid normals (when organised), then voxel means (ICP and the merge work on these)
    nrm = {n: None for n in names}
    if masks is not None:
        hc = np.asarray(params.merge.head_centre_mm, dtype=float)
        for n in names:
            P = data[n][0]
            nrm[n] = _view_normals(P, masks[n], params.merge.normal_half_window,
                                   (vps[n] - P) if vps is not None else (P - hc))
    if params.view_voxel_mm > 0:
        red = {}
        for n in names:
            P, c, col, L = data[n]
            attrs = [a for a in (col, nrm[n]) if a is not None]
            Pv, cv, av, _ = voxel_average(P, c, params.view_voxel_mm, attrs)
            colv = av.pop(0) if col is not None else None
            if nrm[n] is not None:
                Nv = av.pop(0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    nrm[n] = Nv / np.linalg.norm(Nv, axis=1, keepdims=True)
            red[n] = (Pv, np.clip(cv, 0.0, 1.0), colv, L)
        data = red
    Pp, _, _, Lp = data[pivot]
    transforms = {pivot: np.eye(4)}
    coarse, icp, conv = {}, {}, {}
    qc: dict = {"n_views_used": len(names)}
    for name in dropped:
        transforms[name] = np.full((4, 4), np.nan)
        conv[name] = False
        qc[f"{name}_dropped"] = 1
        qc[f"{name}_n_points"] = n_view_points[name]
    pivot_icp = None    # the pivot's ICP pyramid, prepared once for every side view
    for name in names:
        if name == pivot:
            continue
        P, _, _, L = data[name]
        rng = np.random.default_rng([params.seed, *name.encode()])
        ca: CoarseAlignment = align_landmarks(L, Lp, params.coarse, rng=rng)
        coarse[name] = ca
        T = ca.transform
        ir: IcpResult | None = None
        if ca.converged or params.icp_on_fallback:
            if pivot_icp is None:
                pivot_icp = prepare_target(Pp, params.icp, target_normals=nrm[pivot])
            ir = refine_icp(P, pivot_icp, ca.transform, params.icp)
            if ir.converged:
                T = ir.transform
        icp[name] = ir
        conv[name] = bool(ir.converged) if ir is not None else bool(ca.converged)
        transforms[name] = T
        c = centroid[name]
        qc[f"{name}_coarse_status"] = ca.status if ca.converged else f"{FALLBACK} ({ca.reason})"
        qc[f"{name}_landmark_inliers"] = ca.n_inliers
        qc[f"{name}_coarse_rmse_mm"] = ca.rmse_mm
        qc[f"{name}_fitness"] = float("nan") if ir is None else ir.fitness
        qc[f"{name}_inlier_rmse_mm"] = float("nan") if ir is None else ir.inlier_rmse_mm
        qc[f"{name}_correction_deg"] = _angle_deg(T[:3, :3])
        qc[f"{name}_correction_mm"] = float(np.linalg.norm(_apply(T, c[None])[0] - c))

    # merge in the pivot frame
    pts = [_apply(transforms[n], data[n][0]) for n in names]
    conf = [data[n][1] for n in names]
    cols = [data[n][2] for n in names]
    vp = None if vps is None else [_apply(transforms[n], vps[n][None])[0] for n in names]
    vn = None if masks is None else [nrm[n] @ transforms[n][:3, :3].T for n in names]
    m = merge_views(pts, conf, cols if any(c is not None for c in cols) else None, vp, params.merge, normals=vn)

    # landmarks: mean of the aligned views that lifted each one
    Ls = np.stack([_apply(transforms[n], data[n][3]) for n in names])      # (v, 106, 3), NaN rows kept
    seen = np.isfinite(Ls[..., 0])
    cnt = seen.sum(axis=0)
    with np.errstate(invalid="ignore"):
        lm = np.where(cnt[:, None] > 0, np.nansum(Ls, axis=0) / np.maximum(cnt, 1)[:, None], np.nan)
        spread = np.nanmax(np.linalg.norm(Ls - lm[None], axis=2), axis=0, initial=-1.0, where=seen)
    multi = cnt > 1
    qc.update(n_input=n_input, n_view_samples=m.n_input, n_points=int(m.points.shape[0]), n_merged_groups=m.n_merged_groups,
              n_isolated_removed=m.n_isolated_removed, n_cluster_removed=m.n_cluster_removed,
              spacing_mm=m.spacing_mm,
              landmark_spread_mm=float(np.median(spread[multi])) if multi.any() else float("nan"),
              n_landmarks=int(np.count_nonzero(cnt)))
    return FusionResult(pivot, transforms, coarse, icp, conv, m.points, m.normals, m.colours, m.confidence,
                        m.n_views, lm, cnt.astype(np.uint8), qc)
