"""Merge aligned views into one point cloud (paper section 3.1: "Finally, we merge the
overlapped vertices and omit the isolated vertices").

:func:`merge_views` works on views already expressed in one frame:

1. **Overlap merge.** Between every pair of views, points that are each other's nearest
   neighbour in the other view and closer than ``merge_radius`` are linked; each
   connected group (at most one point per view pair link, so a few points) becomes one
   point, the confidence-weighted mean of its members (colour likewise, over the members
   with a colour). The confidence of a merged point is ``1 - prod(1 - c_i)``.
2. **Isolated points and tiny clusters.** A point with fewer than ``min_neighbours``
   others within ``outlier_radius`` is removed; then the radius graph
   (``cluster_radius``, at most ``cluster_k`` neighbours per point) is split into connected components and those smaller than
   ``min_cluster_size`` points are removed.
3. **Normals.** PCA normals (Open3D ``estimate_normals``, ``normal_max_nn`` nearest
   neighbours within ``normal_radius``), oriented towards the camera of the view that
   contributed most to the point when the view points are given, else away from
   ``head_centre_mm`` (the world origin is the head centre, docs/conventions.md).

Radii default to multiples of the sampling spacing (median nearest-neighbour distance
within the views), so one parameter set serves test-size and full-size views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from kernels._checks import check_int, check_number


@dataclass(frozen=True)
class MergeParams:
    """Parameters of :func:`merge_views`.

    Attributes
    ----------
    merge_radius_mm : float or None
        Cross-view merge radius (mm); None (default) = ``merge_radius_factor * spacing``.
    merge_radius_factor : float
        Default 0.75 (of the spacing): one pair per sample position of the overlap.
    outlier_radius_factor : float
        Isolated-point radius in spacings (default 3).
    min_neighbours : int
        Minimum other points within the outlier radius (default 4).
    cluster_radius_factor : float
        Linking radius of the cluster test in spacings (default 2).
    min_cluster_size : int
        Components with fewer points are removed (default 50).
    cluster_k : int
        Each point links to at most its ``cluster_k`` nearest neighbours within the
        linking radius (default 12).
    normal_radius_factor : float
        Normal neighbourhood radius in spacings (default 4).
    normal_max_nn : int
        At most this many neighbours for a normal (default 30).
    head_centre_mm : (float, float, float)
        Normals point away from this point when no view points are given (default the
        world origin, the head centre of docs/conventions.md).
    """

    merge_radius_mm: float | None = None
    merge_radius_factor: float = 0.75
    outlier_radius_factor: float = 3.0
    min_neighbours: int = 4
    cluster_radius_factor: float = 2.0
    min_cluster_size: int = 50
    cluster_k: int = 12
    normal_radius_factor: float = 4.0
    normal_max_nn: int = 30
    head_centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        if self.merge_radius_mm is not None:
            check_number(self.merge_radius_mm, "MergeParams.merge_radius_mm", lo=0, lo_open=True)
        for name in ("merge_radius_factor", "outlier_radius_factor", "cluster_radius_factor",
                     "normal_radius_factor"):
            check_number(getattr(self, name), f"MergeParams.{name}", lo=0, lo_open=True)
        check_int(self.min_neighbours, "MergeParams.min_neighbours", 0)
        check_int(self.min_cluster_size, "MergeParams.min_cluster_size", 1)
        check_int(self.cluster_k, "MergeParams.cluster_k", 1)
        check_int(self.normal_max_nn, "MergeParams.normal_max_nn", 3)
        c = np.asarray(self.head_centre_mm, dtype=float)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise ValueError(f"MergeParams.head_centre_mm: expected 3 finite numbers, got {self.head_centre_mm!r}")


@dataclass(frozen=True)
class MergedCloud:
    """Result of :func:`merge_views`.

    Attributes
    ----------
    points : (m, 3) float64
        Fused points (mm).
    normals : (m, 3) float64
        Unit normals, oriented outwards.
    colours : (m, 3) float64 or None
        Colours (NaN rows where no member had one); None when no view had colours.
    confidence : (m,) float64
        In [0, 1].
    n_views : (m,) uint8
        Number of views merged into each point (1 outside the overlap).
    source_view : (m,) int16
        Index of the view with the largest weight in each point.
    spacing_mm : float
        Sampling spacing the radii were derived from.
    n_input, n_merged_groups, n_isolated_removed, n_cluster_removed : int
        Bookkeeping: input points, multi-view groups merged, points removed as isolated
        and as members of tiny clusters.
    """

    points: np.ndarray
    normals: np.ndarray
    colours: np.ndarray | None
    confidence: np.ndarray
    n_views: np.ndarray
    source_view: np.ndarray
    spacing_mm: float
    n_input: int
    n_merged_groups: int
    n_isolated_removed: int
    n_cluster_removed: int


def _spacing(points: list[np.ndarray]) -> float:
    d = []
    for p in points:
        if p.shape[0] >= 2:
            step = max(1, p.shape[0] // 2000)
            dd, _ = cKDTree(p).query(p[::step], k=2)
            d.append(dd[:, 1])
    return float(np.median(np.concatenate(d))) if d else 1.0


def merge_views(points, confidence, colours=None, viewpoints=None,
                params: MergeParams = MergeParams()) -> MergedCloud:
    """Merge the overlap of aligned views, drop isolated points, estimate outward normals.

    Parameters
    ----------
    points : sequence of (n_v, 3) float64
        Each view's points in the common frame (mm), finite. Validated by the caller
        (:func:`kernels.fusion.fuse_views`); here only the list lengths are checked.
    confidence : sequence of (n_v,) float64
        Per-point confidence in [0, 1] (> 0 weight; zeros are clamped to 1e-6).
    colours : sequence of ((n_v, 3) float64 or None), optional
        Per-point colours, NaN rows allowed (unknown).
    viewpoints : sequence of ((3,) float64 or None), optional
        Each view's camera centre in the common frame (normal orientation).
    params : MergeParams

    Returns
    -------
    MergedCloud

    Raises
    ------
    ValueError
        When the sequences differ in length or no point is given.
    """
    nv = len(points)
    if nv == 0 or len(confidence) != nv or (colours is not None and len(colours) != nv) or \
            (viewpoints is not None and len(viewpoints) != nv):
        raise ValueError("points, confidence, colours, viewpoints: sequences of the same non-zero length expected")
    if not isinstance(params, MergeParams):
        raise ValueError(f"params: expected MergeParams, got {type(params).__name__}")
    sizes = [p.shape[0] for p in points]
    N = int(sum(sizes))
    if N == 0:
        raise ValueError("points: no point in any view")
    P = np.concatenate(points)
    w = np.clip(np.concatenate(confidence), 1e-6, 1.0)
    view = np.repeat(np.arange(nv, dtype=np.int16), sizes)
    has_col = colours is not None and any(c is not None for c in colours)
    if has_col:
        C = np.concatenate([c if c is not None else np.full((s, 3), np.nan) for c, s in zip(colours, sizes)])
    offs = np.concatenate([[0], np.cumsum(sizes)])
    spacing = _spacing(points)
    r_merge = params.merge_radius_mm if params.merge_radius_mm is not None else params.merge_radius_factor * spacing

    # 1. mutual nearest neighbours across each pair of views within r_merge
    trees = [cKDTree(p) if p.shape[0] else None for p in points]
    rows, cols = [], []
    for a in range(nv):
        for b in range(a + 1, nv):
            if trees[a] is None or trees[b] is None:
                continue
            da, ia = trees[b].query(points[a], distance_upper_bound=r_merge)
            db, ib = trees[a].query(points[b], distance_upper_bound=r_merge)
            ok = np.isfinite(da)
            ia_ok = np.where(ok, ia, 0)
            mutual = ok & np.isfinite(db[ia_ok]) & (ib[ia_ok] == np.arange(points[a].shape[0]))
            i = np.flatnonzero(mutual)
            rows.append(i + offs[a])
            cols.append(ia[i] + offs[b])
    if rows:
        r = np.concatenate(rows)
        c = np.concatenate(cols)
    else:
        r = c = np.zeros(0, np.int64)
    G = sparse.coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(N, N))
    n_comp, lab = connected_components(G, directed=False)
    wsum = np.bincount(lab, w, n_comp)
    Pm = np.stack([np.bincount(lab, w * P[:, k], n_comp) for k in range(3)], axis=1) / wsum[:, None]
    conf = 1.0 - np.exp(np.bincount(lab, np.log1p(-np.minimum(w, 1 - 1e-12)), n_comp))
    nview = np.bincount(lab, minlength=n_comp).astype(np.uint8)
    # view of the largest weight per group
    order = np.lexsort((-w, lab))
    first = np.ones(N, bool)
    first[1:] = lab[order][1:] != lab[order][:-1]
    src = np.empty(n_comp, np.int16)
    src[lab[order][first]] = view[order][first]
    if has_col:
        cw = np.where(np.isfinite(C[:, 0]), w, 0.0)
        csum = np.bincount(lab, cw, n_comp)
        Cm = np.stack([np.bincount(lab, cw * np.nan_to_num(C[:, k]), n_comp) for k in range(3)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            Cm = np.where(csum[:, None] > 0, Cm / csum[:, None], np.nan)
    n_groups = int(np.count_nonzero(nview > 1))

    # 2. isolated points, then tiny clusters
    tree = cKDTree(Pm)
    cnt = tree.query_ball_point(Pm, params.outlier_radius_factor * spacing, return_length=True) - 1
    keep = cnt >= params.min_neighbours
    n_iso = int(np.count_nonzero(~keep))
    idx = np.flatnonzero(keep)
    # radius graph limited to the cluster_k nearest neighbours (a surface sampling stays
    # connected; the full radius graph costs ~3x more at full resolution)
    Q = Pm[idx]
    dk, ik = cKDTree(Q).query(Q, k=min(params.cluster_k + 1, max(idx.size, 1)),
                              distance_upper_bound=params.cluster_radius_factor * spacing)
    dk, ik = dk.reshape(idx.size, -1), ik.reshape(idx.size, -1)
    e = np.isfinite(dk)
    A = sparse.coo_matrix((np.ones(int(e.sum()), np.int8), (np.nonzero(e)[0], ik[e])), shape=(idx.size, idx.size))
    _, cl = connected_components(A, directed=False)
    big = np.bincount(cl)[cl] >= params.min_cluster_size
    n_cl = int(np.count_nonzero(~big))
    idx = idx[big]
    Pm, conf, nview, src = Pm[idx], conf[idx], nview[idx], src[idx]
    Cm = Cm[idx] if has_col else None

    # 3. normals, oriented outwards
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(Pm))
    pc.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=params.normal_radius_factor * spacing,
                                                             max_nn=params.normal_max_nn))
    Nm = np.asarray(pc.normals).copy()
    if viewpoints is not None and all(v is not None for v in viewpoints):
        out = np.asarray(viewpoints, dtype=float)[src] - Pm        # towards the camera that saw it
    else:
        out = Pm - np.asarray(params.head_centre_mm, dtype=float)  # away from the head centre
    Nm[np.einsum("ij,ij->i", Nm, out) < 0] *= -1.0
    return MergedCloud(Pm, Nm, Cm, conf, nview, src, spacing, N, n_groups, n_iso, n_cl)
