"""Coarse-to-fine point-to-plane ICP of a view onto the pivot (paper section 3.1).

"The coarse fusion results have limitations in the smoothness of a surface, seamless
integration between edges and precision of details. Therefore, we further refine the
fusion results by iteratively calculating the transformation matrix [ICP]."

:func:`refine_icp` runs Open3D's point-to-plane ICP
(``o3d.pipelines.registration.registration_icp``, Chen & Medioni 1992) over a schedule of
levels: at each level both clouds are voxel-downsampled (``voxel_mm``; 0 = no
downsampling), target normals are estimated, and ICP runs with a correspondence
distance ``max_distance_mm`` that shrinks from level to level, starting from the
previous level's transform. The last level optionally uses a Tukey robust kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from kernels._checks import as_array, check_int, check_number


@dataclass(frozen=True)
class IcpParams:
    """Schedule of :func:`refine_icp` (one entry per level, coarse to fine).

    Attributes
    ----------
    voxel_mm : tuple of float
        Voxel size of the downsampling at each level (mm; 0 = full resolution).
        Default ``(2, 1, 0.75)``: a rigid fit needs a few 10k points per view, not the
        full resolution (full size: ~75k source points at the last level; measured the
        same pose errors as with ``0`` at a fifth of the time).
    max_distance_mm : tuple of float
        Maximum correspondence distance at each level (mm), default ``(6, 2, 0.75)``:
        the first level must capture the residual of the landmark alignment (~1 mm at
        the face, up to ~3 mm at its border). A first level much wider than that (20 mm)
        pairs the side view's cheek with the wrong parts of the partially overlapping
        pivot and moves the transform away (measured: 5 degrees off after level 0).
    max_iterations : tuple of int
        ICP iterations per level, default ``(40, 40, 60)``.
    normal_radius_factor : float
        Target normals use neighbours within ``factor * max(voxel, spacing)`` (default 4;
        spacing of the level's downsampled target) with at most ``normal_max_nn`` (30)
        neighbours.
    normal_max_nn : int
    tukey_k_mm : float
        Scale of the Tukey kernel of the finest level (mm; 0 disables; default 0.3).
    relative_fitness, relative_rmse : float
        Open3D convergence criteria per level (default 1e-6 each).
    min_fitness : float
        The final level must reach this fitness (fraction of source points with a
        correspondence, default 0.05: side views overlap the pivot only in part) for
        ``converged``.
    """

    voxel_mm: tuple[float, ...] = (2.0, 1.0, 0.75)
    max_distance_mm: tuple[float, ...] = (6.0, 2.0, 0.75)
    max_iterations: tuple[int, ...] = (40, 40, 60)
    normal_radius_factor: float = 4.0
    normal_max_nn: int = 30
    tukey_k_mm: float = 0.3
    relative_fitness: float = 1e-6
    relative_rmse: float = 1e-6
    min_fitness: float = 0.05

    def __post_init__(self):
        n = len(self.voxel_mm)
        if n == 0 or len(self.max_distance_mm) != n or len(self.max_iterations) != n:
            raise ValueError(f"IcpParams: voxel_mm, max_distance_mm and max_iterations must have the same "
                             f"non-zero length, got {len(self.voxel_mm)}, {len(self.max_distance_mm)}, "
                             f"{len(self.max_iterations)}")
        for i in range(n):
            check_number(self.voxel_mm[i], f"IcpParams.voxel_mm[{i}]", lo=0)
            check_number(self.max_distance_mm[i], f"IcpParams.max_distance_mm[{i}]", lo=0, lo_open=True)
            check_int(self.max_iterations[i], f"IcpParams.max_iterations[{i}]", 1)
        check_number(self.normal_radius_factor, "IcpParams.normal_radius_factor", lo=0, lo_open=True)
        check_int(self.normal_max_nn, "IcpParams.normal_max_nn", 3)
        check_number(self.tukey_k_mm, "IcpParams.tukey_k_mm", lo=0)
        check_number(self.relative_fitness, "IcpParams.relative_fitness", lo=0)
        check_number(self.relative_rmse, "IcpParams.relative_rmse", lo=0)
        check_number(self.min_fitness, "IcpParams.min_fitness", lo=0, hi=1)


@dataclass(frozen=True)
class IcpLevel:
    """Record of one ICP level.

    Attributes
    ----------
    voxel_mm, max_distance_mm : float
        The level's schedule entries.
    n_source, n_target : int
        Points after downsampling.
    fitness : float
        Fraction of source points with a correspondence within ``max_distance_mm``.
    inlier_rmse_mm : float
        RMS point-to-point distance of those correspondences (mm).
    transform : (4, 4) float64
        Transform after the level.
    """

    voxel_mm: float
    max_distance_mm: float
    n_source: int
    n_target: int
    fitness: float
    inlier_rmse_mm: float
    transform: np.ndarray


@dataclass(frozen=True)
class IcpResult:
    """Outcome of :func:`refine_icp`.

    Attributes
    ----------
    transform : (4, 4) float64
        Source -> target transform (mm).
    converged : bool
        Final fitness >= ``min_fitness`` and a finite transform.
    fitness : float
        Final level's fitness.
    inlier_rmse_mm : float
        Final level's inlier RMSE (mm).
    n_iter : int
        Number of levels run.
    levels : tuple of IcpLevel
    """

    transform: np.ndarray
    converged: bool
    fitness: float
    inlier_rmse_mm: float
    n_iter: int
    levels: tuple


def _cloud(points: np.ndarray) -> o3d.geometry.PointCloud:
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))


def mean_spacing(points: np.ndarray, sample: int = 2000) -> float:
    """Median nearest-neighbour distance of (a deterministic subsample of) ``points`` (mm)."""
    from scipy.spatial import cKDTree

    step = max(1, points.shape[0] // sample)
    d, _ = cKDTree(points).query(points[::step], k=2)
    return float(np.median(d[:, 1]))


@dataclass(frozen=True)
class IcpTarget:
    """A target prepared once for several :func:`refine_icp` calls (e.g. both side views onto
    the pivot): per level of the schedule, the downsampled cloud with its normals.

    Attributes
    ----------
    n_points : int
        Points of the full-resolution target.
    voxel_mm : tuple of float
        The schedule's voxel sizes it was prepared for.
    normal_key : tuple
        ``(given_normals, normal_radius_factor, normal_max_nn)``: how the normals were made.
    clouds : tuple of open3d.geometry.PointCloud
        One per level (with normals); do not modify.
    """

    n_points: int
    voxel_mm: tuple
    normal_key: tuple
    clouds: tuple


def prepare_target(target, params: IcpParams = IcpParams(), *, target_normals=None) -> IcpTarget:
    """Downsample ``target`` and set its normals for every level of ``params`` (see
    :func:`refine_icp`, whose ``target`` may then be the returned :class:`IcpTarget`; the
    result is the same as passing the points, without redoing this per source).

    Parameters
    ----------
    target : (m, 3) float64
        Pivot points (mm), finite, at least 10.
    params : IcpParams
    target_normals : (m, 3) float64, optional
        As in :func:`refine_icp`.

    Returns
    -------
    IcpTarget

    Raises
    ------
    ValueError
        Wrong shapes, non-finite points, fewer than 10 points.
    """
    dst = as_array(target, "target", (None, 3), finite=True)
    if dst.shape[0] < 10:
        raise ValueError(f"target: need at least 10 points, got {dst.shape[0]}")
    if not isinstance(params, IcpParams):
        raise ValueError(f"params: expected IcpParams, got {type(params).__name__}")
    pct = _cloud(dst)
    if target_normals is not None:
        tn = as_array(target_normals, "target_normals", dst.shape)
        pct.normals = o3d.utility.Vector3dVector(np.nan_to_num(tn))
    clouds = []
    for vox in params.voxel_mm:
        t = pct.voxel_down_sample(vox) if vox > 0 else pct
        if target_normals is not None:
            # voxel means of the given normals, renormalised; points without one are dropped
            Nt = np.asarray(t.normals)
            ln = np.linalg.norm(Nt, axis=1)
            ok = ln > 1e-6
            t = _cloud(np.asarray(t.points)[ok])
            t.normals = o3d.utility.Vector3dVector(Nt[ok] / ln[ok, None])
        else:
            # spacing of the (downsampled) target: a tree over the level's points, not the full cloud
            rad = params.normal_radius_factor * max(vox, mean_spacing(np.asarray(t.points)))
            t.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=rad, max_nn=params.normal_max_nn))
        clouds.append(t)
    return IcpTarget(int(dst.shape[0]), tuple(float(v) for v in params.voxel_mm), _normal_key(params, target_normals),
                     tuple(clouds))


def _normal_key(params: IcpParams, target_normals) -> tuple:
    return (target_normals is not None, float(params.normal_radius_factor), int(params.normal_max_nn))


def refine_icp(source, target, init=None, params: IcpParams = IcpParams(), *, target_normals=None) -> IcpResult:
    """Coarse-to-fine point-to-plane ICP of ``source`` onto ``target``.

    Parameters
    ----------
    source : (n, 3) float64
        Points of the view to move (mm), finite.
    target : (m, 3) float64 or IcpTarget
        Pivot points (mm), finite; or the pivot prepared once by :func:`prepare_target`
        with the same ``params`` (then ``target_normals`` go there): same result, the
        per-level downsampling and normals of the target are not redone per source.
    init : (4, 4) float64, optional
        Initial source -> target transform (e.g. the landmark alignment); identity by default.
    params : IcpParams
    target_normals : (m, 3) float64, optional
        Unit normals of ``target`` (e.g. from its image grid, any consistent sign). Each
        level then averages them in the voxels instead of estimating them by KD-tree
        PCA (the costly part at full resolution); rows that are not finite are
        estimated.

    Returns
    -------
    IcpResult

    Raises
    ------
    ValueError
        Wrong shapes, non-finite values, fewer than 10 points, or ``init`` not rigid,
        ``target_normals`` not (m, 3); a prepared target for another schedule.
    """
    src = as_array(source, "source", (None, 3), finite=True)
    if src.shape[0] < 10:
        raise ValueError(f"source: need at least 10 points, got {src.shape[0]}")
    if not isinstance(params, IcpParams):
        raise ValueError(f"params: expected IcpParams, got {type(params).__name__}")
    if isinstance(target, IcpTarget):
        if target_normals is not None:
            raise ValueError("target_normals: give them to prepare_target, not with a prepared target")
        if target.voxel_mm != tuple(float(v) for v in params.voxel_mm):
            raise ValueError(f"target: prepared for voxel_mm={target.voxel_mm}, the schedule has {params.voxel_mm}")
        if not target.normal_key[0] and target.normal_key != _normal_key(params, None):
            raise ValueError("target: prepared with other normal parameters (normal_radius_factor, normal_max_nn)")
    else:
        dst = as_array(target, "target", (None, 3), finite=True)
        if dst.shape[0] < 10:
            raise ValueError(f"target: need at least 10 points, got {dst.shape[0]}")
    T = np.eye(4) if init is None else as_array(init, "init", (4, 4), finite=True).copy()
    R = T[:3, :3]
    if not (np.allclose(R @ R.T, np.eye(3), atol=1e-6) and np.linalg.det(R) > 0 and np.allclose(T[3], [0, 0, 0, 1])):
        raise ValueError("init: not a rigid (4, 4) transform")
    tgt = target if isinstance(target, IcpTarget) else prepare_target(dst, params, target_normals=target_normals)
    pcs = _cloud(src)
    levels = []
    reg = o3d.pipelines.registration
    res = None
    nlev = len(params.voxel_mm)
    for i, (vox, dmax, it) in enumerate(zip(params.voxel_mm, params.max_distance_mm, params.max_iterations)):
        s = pcs.voxel_down_sample(vox) if vox > 0 else pcs
        t = tgt.clouds[i]
        if i == nlev - 1 and params.tukey_k_mm > 0:
            est = reg.TransformationEstimationPointToPlane(reg.TukeyLoss(k=params.tukey_k_mm))
        else:
            est = reg.TransformationEstimationPointToPlane()
        crit = reg.ICPConvergenceCriteria(relative_fitness=params.relative_fitness,
                                          relative_rmse=params.relative_rmse, max_iteration=int(it))
        res = reg.registration_icp(s, t, float(dmax), T, est, crit)
        T = np.asarray(res.transformation).copy()
        levels.append(IcpLevel(float(vox), float(dmax), len(s.points), len(t.points), float(res.fitness),
                               float(res.inlier_rmse), T.copy()))
    ok = bool(np.all(np.isfinite(T)) and res.fitness >= params.min_fitness)
    return IcpResult(T, ok, float(res.fitness), float(res.inlier_rmse), len(levels), tuple(levels))
