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
3. **Normals.** When per-view normals are given (e.g. :func:`organised_normals` of each
   view's organised grid), the confidence-weighted mean of the members' normals;
   otherwise PCA normals (Open3D ``estimate_normals``, ``normal_max_nn`` nearest
   neighbours within ``normal_radius``, ~3 s at 1.4 M points). Either way oriented towards
   the camera of the view that contributed most to the point when the view points are
   given, else away from ``head_centre_mm`` (the world origin is the head centre,
   docs/conventions.md).

Two helpers prepare full-resolution views cheaply: :func:`organised_normals` (normals from
the image grid, box-smoothed positions and central differences, no neighbour search) and
:func:`voxel_average` (confidence-weighted per-voxel means of one view, so the merge and
ICP work on ~0.5 mm samples instead of the ~0.2 mm full-resolution pixels).

Radii default to multiples of the sampling spacing (median nearest-neighbour distance
within the views), so one parameter set serves test-size and full-size views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d
from scipy import ndimage, sparse
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
        Normal neighbourhood radius in spacings (default 4; PCA normals only).
    normal_max_nn : int
        At most this many neighbours for a normal (default 30; PCA normals only).
    normal_half_window : int
        Half width (pixels) of the box that smooths the organised points before the
        grid normals of :func:`organised_normals` (default 2, a 5 x 5 window).
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
    normal_half_window: int = 2
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
        check_int(self.normal_half_window, "MergeParams.normal_half_window", 1)
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


def _spacing(points: list[np.ndarray], trees: list | None = None) -> float:
    d = []
    for i, p in enumerate(points):
        if p.shape[0] >= 2:
            step = max(1, p.shape[0] // 2000)
            dd, _ = (cKDTree(p) if trees is None else trees[i]).query(p[::step], k=2)
            d.append(dd[:, 1])
    return float(np.median(np.concatenate(d))) if d else 1.0


def organised_normals(points, valid, half_window: int = 2) -> np.ndarray:
    """Unit normals of an organised (image-grid) point cloud, without a neighbour search.

    The valid points are box-averaged over a ``(2 h + 1)^2`` pixel window (invalid
    pixels excluded), and the normal of a pixel is the cross product of the central
    differences of the smoothed positions along the image columns and rows,
    ``n = (S[y, x+1] - S[y, x-1]) x (S[y+1, x] - S[y-1, x])``. The sign is the grid's
    (consistent over a view, not yet oriented); orient it with the viewpoint. Only the
    bounding box of the valid pixels (grown by ``h + 1``) is filtered: the same result as
    over the whole image.

    Parameters
    ----------
    points : (H, W, 3) float
        Organised points (mm); values at invalid pixels are ignored.
    valid : (H, W) bool
    half_window : int
        ``h`` (default 2).

    Returns
    -------
    (H, W, 3) float64
        Unit normals at the valid pixels, NaN elsewhere (and where degenerate).

    Raises
    ------
    ValueError
        Shapes do not match or ``half_window < 1``.
    """
    P = np.asarray(points, dtype=np.float64)
    if P.ndim != 3 or P.shape[2] != 3:
        raise ValueError(f"points: expected shape (H, W, 3), got {P.shape}")
    m = np.asarray(valid, dtype=bool)
    if m.shape != P.shape[:2]:
        raise ValueError(f"valid: expected shape {P.shape[:2]}, got {m.shape}")
    check_int(half_window, "half_window", 1)
    out = np.full(P.shape, np.nan)
    box = valid_box(m, int(half_window) + 1)
    if box is None:
        return out
    win = (slice(box[0], box[1]), slice(box[2], box[3]))
    mc = m[win]
    out[win][mc] = _grid_normals(mc, P[win][mc], int(half_window))
    return out


def valid_box(valid: np.ndarray, margin: int):
    """``(r0, r1, c0, c1)``: the bounding box of the True pixels of ``valid`` grown by
    ``margin`` pixels (clipped to the image), or None when there is none."""
    rows = np.flatnonzero(valid.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(valid.any(axis=0))
    H, W = valid.shape
    return (max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, H),
            max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, W))


def _grid_normals(m: np.ndarray, pts: np.ndarray, half_window: int) -> np.ndarray:
    """Normals of :func:`organised_normals` at the True pixels of ``m`` (row-major, (n, 3)).

    ``pts`` (n, 3) float64 are the points of those pixels in row-major order. ``m`` may be a
    crop of the image that holds every valid pixel with a margin of at least
    ``half_window + 1`` pixels (or reaches the image border, :func:`valid_box`): the box
    filters only ever add invalid (zero) pixels outside it, so the result is the same, bit
    for bit, as on the whole image. One coordinate at a time (no (H, W, 3) temporaries).
    """
    size = 2 * half_window + 1
    cnt = ndimage.uniform_filter(m.astype(np.float64), size, mode="constant")
    d = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in range(3):
            G = np.zeros(m.shape)
            G[m] = pts[:, k]
            S = ndimage.uniform_filter(G, size, mode="constant")
            S /= cnt
            # the smoothed field is defined at both grid neighbours of every valid pixel
            # (h >= 1: the pixel is inside their windows); edge padding gives one-sided
            # differences at the image border; NaN away from the valid pixels (not kept)
            Sp = np.pad(S, 1, mode="edge")
            d.append((Sp[1:-1, 2:] - Sp[1:-1, :-2])[m])     # along the columns (du)
            d.append((Sp[2:, 1:-1] - Sp[:-2, 1:-1])[m])     # along the rows (dv)
        ux, vx, uy, vy, uz, vz = d
        n = np.stack([uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx], axis=1)   # du x dv
        ln = np.sqrt(n[:, 0] * n[:, 0] + n[:, 1] * n[:, 1] + n[:, 2] * n[:, 2])[:, None]
        return np.where(ln > 0, n / ln, np.nan)


def voxel_average(points, weights, voxel_mm: float, attributes=()):
    """Weighted per-voxel mean of one view's points (a deterministic downsampling).

    Parameters
    ----------
    points : (n, 3) float64
        Points (mm).
    weights : (n,) float64
        Non-negative weights (e.g. confidences); the voxel's weight is their mean.
    voxel_mm : float
        Voxel edge (mm, > 0); voxels are aligned to the world origin.
    attributes : sequence of (n, k) float64
        Averaged with the same weights, ignoring NaN rows (a voxel whose rows are all NaN
        gets NaN).

    Returns
    -------
    points : (m, 3) float64
    weights : (m,) float64
    attributes : list of (m, k) float64
    inverse : (n,) int64
        Voxel index of each input point.

    Raises
    ------
    ValueError
        ``voxel_mm <= 0`` or mismatched lengths.
    """
    check_number(voxel_mm, "voxel_mm", lo=0, lo_open=True)
    P = np.asarray(points, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 3 or w.shape != (P.shape[0],):
        raise ValueError(f"points, weights: expected (n, 3) and (n,), got {P.shape} and {w.shape}")
    if P.shape[0] == 0:
        return P.copy(), w.copy(), [np.asarray(a, dtype=np.float64).copy() for a in attributes], \
            np.zeros(0, np.int64)
    # per coordinate on contiguous columns (axis-0 reductions of an (n, 3) array are slow)
    q = [np.floor(P[:, k] / voxel_mm).astype(np.int64) for k in range(3)]
    for c in q:
        c -= c.min()
    ext = [int(c.max()) + 1 for c in q]
    key = (q[0] * ext[1] + q[1]) * ext[2] + q[2]
    _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    m = cnt.size
    ww = np.maximum(w, 1e-12)
    ws = np.bincount(inv, ww, m)
    Pm = np.stack([np.bincount(inv, ww * P[:, k], m) for k in range(3)], axis=1) / ws[:, None]
    wm = np.bincount(inv, w, m) / cnt
    out = []
    for a in attributes:
        A = np.asarray(a, dtype=np.float64)
        ok = np.isfinite(A[:, 0])
        for k in range(1, A.shape[1]):
            ok &= np.isfinite(A[:, k])
        wa = np.where(ok, ww, 0.0)
        sa = np.bincount(inv, wa, m)
        Am = np.stack([np.bincount(inv, wa * np.where(ok, A[:, k], 0.0), m) for k in range(A.shape[1])], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(sa[:, None] > 0, Am / sa[:, None], np.nan))
    return Pm, wm, out, inv


def merge_views(points, confidence, colours=None, viewpoints=None,
                params: MergeParams = MergeParams(), *, normals=None) -> MergedCloud:
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
    normals : sequence of ((n_v, 3) float64 or None), optional
        Per-view unit normals, each view consistently oriented (e.g. towards its camera;
        NaN rows allowed). When every view has them, a point's normal is the
        confidence-weighted mean of its members' normals (no PCA); otherwise PCA normals.

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
    if normals is not None and len(normals) != nv:
        raise ValueError(f"normals: expected a sequence of {nv} arrays, got {len(normals)}")
    has_nrm = normals is not None and all(n is not None for n in normals)
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
    if has_nrm:
        Nin = np.concatenate([np.asarray(n, dtype=np.float64).reshape(s, 3) for n, s in zip(normals, sizes)])
    offs = np.concatenate([[0], np.cumsum(sizes)])
    trees = [cKDTree(p) if p.shape[0] else None for p in points]
    spacing = _spacing(points, trees)
    r_merge = params.merge_radius_mm if params.merge_radius_mm is not None else params.merge_radius_factor * spacing

    # 1. mutual nearest neighbours across each pair of views within r_merge
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
    if has_nrm:
        nw = np.where(np.isfinite(Nin[:, 0]), w, 0.0)
        Nm = np.stack([np.bincount(lab, nw * np.nan_to_num(Nin[:, k]), n_comp) for k in range(3)], axis=1)
    n_groups = int(np.count_nonzero(nview > 1))

    # 2. isolated points, then tiny clusters, from one k-nearest-neighbour query within the
    # linking radius: a point is isolated when fewer than min_neighbours others lie within
    # the outlier radius (counted in that query; the few points short of it are queried
    # again with the outlier radius when it is the larger); the cluster graph links each
    # kept point to those of its cluster_k nearest points within the linking radius that
    # are kept (a surface sampling stays connected; the full radius graph costs ~3x more,
    # a ball count over 1.4 M points alone ~1 s)
    r_out = params.outlier_radius_factor * spacing
    r_cl = params.cluster_radius_factor * spacing
    M = Pm.shape[0]
    k = min(max(params.min_neighbours, params.cluster_k) + 1, M)
    tree = cKDTree(Pm)
    dk, ik = tree.query(Pm, k=k, distance_upper_bound=r_cl * (1 + 1e-9))
    dk, ik = dk.reshape(M, -1), ik.reshape(M, -1)
    keep = np.count_nonzero(dk[:, 1:] <= r_out, axis=1) >= params.min_neighbours
    if r_cl < r_out and not keep.all():
        # only the points with too few neighbours within the query radius need the wider
        # outlier radius (a second, small query)
        u = np.flatnonzero(~keep)
        du, _ = tree.query(Pm[u], k=min(params.min_neighbours + 1, M), distance_upper_bound=r_out * (1 + 1e-9))
        keep[u] = np.count_nonzero(du.reshape(u.size, -1)[:, 1:] <= r_out, axis=1) >= params.min_neighbours
    n_iso = int(np.count_nonzero(~keep))
    idx = np.flatnonzero(keep)
    e = (dk[:, 1:params.cluster_k + 1] <= r_cl) & keep[:, None]
    e &= keep[np.where(e, ik[:, 1:params.cluster_k + 1], 0)]
    sub = np.full(M, -1, np.int64)
    sub[idx] = np.arange(idx.size)
    A = sparse.coo_matrix((np.ones(int(e.sum()), np.int8), (sub[np.nonzero(e)[0]], sub[ik[:, 1:params.cluster_k + 1][e]])),
                          shape=(idx.size, idx.size))
    _, cl = connected_components(A, directed=False)
    big = np.bincount(cl)[cl] >= params.min_cluster_size
    n_cl = int(np.count_nonzero(~big))
    idx = idx[big]
    Pm, conf, nview, src = Pm[idx], conf[idx], nview[idx], src[idx]
    Cm = Cm[idx] if has_col else None

    # 3. normals, oriented outwards
    pca = ~has_nrm
    if has_nrm:
        Nm = Nm[idx]
        ln = np.linalg.norm(Nm, axis=1)
        miss = ~(ln > 1e-9)                # no member had a normal: mean of the neighbours'
        Nm[~miss] /= ln[~miss, None]
        if miss.any() and not miss.all():
            k = int(min(9, np.count_nonzero(~miss)))
            _, nb = cKDTree(Pm[~miss]).query(Pm[miss], k=k)
            Nm[miss] = Nm[~miss][nb.reshape(-1, k)].sum(axis=1)
            ln = np.linalg.norm(Nm, axis=1)
            miss = ~(ln > 1e-9)
            Nm[~miss] /= ln[~miss, None]
        pca = bool(miss.any())
    if pca:
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
