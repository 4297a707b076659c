"""Benchmark of multi-view fusion (:func:`kernels.fusion.fuse_views`) on one core: speed and
accuracy against the scanner simulator's ground truth.

Usage::

    python -m benchmarks.fusion --size full --json out.json
    python -m benchmarks.fusion --size small

The process pins itself to one core (``os.sched_setaffinity``) and sets the BLAS / OpenMP
thread counts to 1 before numpy and Open3D are imported.

Sample (as tests/test_fusion.py): one synthetic subject rendered with the TRUE rig,
decoded / textured / landmark-lifted with the STORED rig (simulator default calibration
error, 0.5 deg / 1 mm) in its world frame. ``--cache PATH`` keeps the decoded sample in
an ``.npz`` so repeated runs skip the rendering.

Reported (seconds are medians of ``--repeat`` runs after one warm-up):

* ``fusion_s``: :func:`fuse_views` with view points (and the organised valid masks when
  ``fuse_views`` accepts ``masks=``);
* ``icp_s`` / ``merge_s``: time spent in :func:`kernels.icp.refine_icp` (both side
  views) and :func:`kernels.merge.merge_views` inside that call;
* ``rot_err_deg`` / ``trans_err_mm``: worst side view, rotation error and translation
  error at the view's centroid against the GT correction;
* ``fused_rms_mm``: RMS distance of the fused points to the GT mesh; ``overlap_spread_mm``
  (median local plane spread of 16-neighbourhoods around merged points),
  ``isolated_fraction`` (points with < 4 others within 3 spacings), ``n_points_out``;
* peer, the naive route: Open3D's plain ``registration_icp`` point-to-plane of the
  full-resolution left view onto the full-resolution middle view (target normals by
  KD-tree, from the landmark alignment, 0.75 mm, Tukey 0.3 mm, 60 iterations);
  ``naive_icp_s`` (normals included) and ``naive_icp_ratio = naive_icp_s / (icp_s / 2)``
  (per side view), with its errors ``naive_rot_err_deg`` / ``naive_trans_err_mm``.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: BLAS / OpenMP must not spawn threads

import argparse  # noqa: E402

from benchmarks._report import format_table  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

SIZES = {"full": (1280, 1024), "small": (320, 256)}
NAMES = ("left", "middle", "right")


def _pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def build_sample(size: str, seed: int = 5, n_vertices: int | None = None, expression: str = "neutral") -> dict:
    """Decoded views of one synthetic subject (stored rig, default calibration error) + GT."""
    from kernels.decode import decode_view
    from kernels.depth import depth_image
    from kernels.landmarks import lift_landmarks
    from kernels.synth.face import face_mesh, sample_subject
    from kernels.synth.rig import RigParams, build_rig, perturb_rig
    from kernels.synth.scanner import FringeParams, SceneMesh, render_view
    from kernels.texture import project_to_rgb, texture_map, visibility

    W, H = SIZES[size]
    fr = FringeParams()
    nv = n_vertices or (150_000 if size == "full" else 60_000)
    fm = face_mesh(sample_subject("T001", seed), expression, n_vertices=nv)
    sm = SceneMesh(fm.vertices, fm.faces, fm.albedo_ir, fm.albedo_rgb, fm.landmarks)
    true = build_rig(RigParams(width=W, height=H))
    stored = perturb_rig(true, RigParams(width=W, height=H, calib_rot_deg=0.5, calib_trans_mm=1.0), rng=3)
    out = {"gt_vertices": fm.vertices, "gt_faces": fm.faces}
    for name in NAMES:
        g, s = true.group(name), stored.group(name)
        vr = render_view(sm, g, fr, rng=11, nthreads=1)
        dv = decode_view(vr.fringe, s.ir, s.projector, fr.frequencies, fr.steps)
        pr = project_to_rgb(dv.depth, s.ir, s.rgb)
        D = depth_image(pr, dv.depth, float(s.ir.K[0, 0]))
        vis = visibility(pr, D)
        tex = texture_map(pr, vr.rgb, D, visible=vis)
        lm = lift_landmarks(vr.landmarks_px, pr, dv.points, dv.depth, float(s.ir.K[0, 0]), visible=vis,
                            landmark_visible=vr.landmark_visible).points
        v = dv.valid
        T = np.eye(4)
        T[:3, :3] = g.ir.R.T @ s.ir.R
        T[:3, 3] = g.ir.R.T @ (s.ir.t - g.ir.t)
        out.update({f"{name}_points": dv.points[v].astype(np.float64),
                    f"{name}_conf": dv.confidence[v].astype(np.float64),
                    f"{name}_colours": tex.colors[v].astype(np.float64), f"{name}_landmarks": lm,
                    f"{name}_mask": v, f"{name}_gt_T": T, f"{name}_vp": s.ir.center})
    return out


def _apply(T, x):
    return x @ T[:3, :3].T + T[:3, 3]


def _rot_deg(R) -> float:
    from kernels.synth.rig import rotation_angle_deg

    return float(rotation_angle_deg(R))


def run(size: str = "full", repeat: int = 1, cache: str | None = None, view_voxel_mm: float | None = None) -> dict:
    import open3d as o3d
    from scipy.spatial import cKDTree

    import kernels.fusion as kf
    from kernels.align import align_landmarks

    if cache and os.path.exists(cache):
        S = dict(np.load(cache))
    else:
        S = build_sample(size)
        if cache:
            np.savez(cache, **S)
    views = {n: (S[f"{n}_points"], S[f"{n}_conf"], S[f"{n}_colours"], S[f"{n}_landmarks"]) for n in NAMES}
    vps = {n: S[f"{n}_vp"] for n in NAMES}
    kw = {"viewpoints": vps}
    if view_voxel_mm is not None:
        kw["params"] = kf.FusionParams(view_voxel_mm=view_voxel_mm)
    if "masks" in inspect.signature(kf.fuse_views).parameters:
        kw["masks"] = {n: S[f"{n}_mask"] for n in NAMES}

    # time the stages inside fuse_views by wrapping the module's references
    acc = {"icp": 0.0, "merge": 0.0}

    def _timed(fn, key):
        def w(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t0
        return w

    orig = (kf.refine_icp, kf.merge_views)
    kf.refine_icp, kf.merge_views = _timed(orig[0], "icp"), _timed(orig[1], "merge")
    try:
        kf.fuse_views(views, **kw)  # warm-up
        ts, icp_ts, merge_ts = [], [], []
        for _ in range(repeat):
            acc.update(icp=0.0, merge=0.0)
            t0 = time.perf_counter()
            r = kf.fuse_views(views, **kw)
            ts.append(time.perf_counter() - t0)
            icp_ts.append(acc["icp"])
            merge_ts.append(acc["merge"])
    finally:
        kf.refine_icp, kf.merge_views = orig

    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(o3d.core.Tensor(S["gt_vertices"].astype(np.float32)),
                     o3d.core.Tensor(S["gt_faces"].astype(np.uint32)))

    def pose_err(T, name):
        G = S[f"{name}_gt_T"]
        c = S[f"{name}_points"].mean(axis=0)
        return _rot_deg(T[:3, :3] @ G[:3, :3].T), float(np.linalg.norm(_apply(T, c[None]) - _apply(G, c[None])))

    errs = {n: pose_err(r.transforms[n], n) for n in ("left", "right")}
    d = rc.compute_distance(o3d.core.Tensor(r.points.astype(np.float32))).numpy()
    tree = cKDTree(r.points)
    sp = r.qc["spacing_mm"]
    cnt = tree.query_ball_point(r.points, 3 * sp, return_length=True) - 1
    ov = np.flatnonzero(r.n_views > 1)
    spread = float("nan")
    if ov.size:
        _, nb = tree.query(r.points[ov[::10]], k=16)
        X = r.points[nb] - r.points[nb].mean(axis=1, keepdims=True)
        spread = float(np.median(np.sqrt(np.linalg.eigvalsh(np.einsum("mki,mkj->mij", X, X) / 16)[:, 0])))
    cp = rc.compute_closest_points(o3d.core.Tensor(r.points.astype(np.float32)))
    F = S["gt_faces"][cp["primitive_ids"].numpy()]
    V = S["gt_vertices"]
    fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    normals_ok = float(np.mean(np.einsum("ij,ij->i", fn, r.normals) > 0))

    # peer: the naive route, plain point-to-plane ICP at full resolution (left onto middle)
    reg = o3d.pipelines.registration
    Ps, Pt = S["left_points"], S["middle_points"]
    init = align_landmarks(S["left_landmarks"], S["middle_landmarks"],
                           rng=np.random.default_rng([0, *b"left"])).transform
    t0 = time.perf_counter()
    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(Ps))
    dst = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(Pt))
    dst.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=4 * sp, max_nn=30))
    nr = reg.registration_icp(src, dst, 0.75, init, reg.TransformationEstimationPointToPlane(reg.TukeyLoss(k=0.3)),
                              reg.ICPConvergenceCriteria(relative_fitness=1e-7, relative_rmse=1e-7, max_iteration=60))
    naive_s = time.perf_counter() - t0
    naive = pose_err(np.asarray(nr.transformation), "left")

    icp_s = float(np.median(icp_ts))
    return {
        "size": size, "repeat": repeat, "view_voxel_mm": view_voxel_mm, "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "n_points_in": int(r.qc["n_input"]),
        "fusion_s": float(np.median(ts)), "icp_s": icp_s, "merge_s": float(np.median(merge_ts)),
        "rot_err_deg": max(e[0] for e in errs.values()), "trans_err_mm": max(e[1] for e in errs.values()),
        "per_view": {n: {"rot_err_deg": e[0], "trans_err_mm": e[1]} for n, e in errs.items()},
        "fused_rms_mm": float(np.sqrt(np.mean(d ** 2))), "gross_fraction": float(np.mean(d > 1.0)),
        "overlap_spread_mm": spread, "isolated_fraction": float(np.mean(cnt < 4)),
        "normals_outward_fraction": normals_ok, "n_overlap": int(ov.size),
        "n_points_out": int(r.points.shape[0]), "spacing_mm": float(sp),
        "naive_icp_s": naive_s, "naive_icp_ratio": naive_s / max(icp_s / 2, 1e-9),
        "naive_rot_err_deg": naive[0], "naive_trans_err_mm": naive[1],
    }


def _table(res: dict) -> str:
    rows = [("fusion_s", "s"), ("icp_s", "s"), ("merge_s", "s"), ("rot_err_deg", "deg"), ("trans_err_mm", "mm"),
            ("fused_rms_mm", "mm"), ("overlap_spread_mm", "mm"), ("isolated_fraction", ""),
            ("normals_outward_fraction", ""), ("n_points_in", ""), ("n_points_out", ""), ("spacing_mm", "mm"),
            ("naive_icp_s", "s"), ("naive_icp_ratio", "x"), ("naive_rot_err_deg", "deg"),
            ("naive_trans_err_mm", "mm")]
    return format_table(f"fusion benchmark ({res['size']}, cpu {res['cpu_affinity']})", res, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fusion", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cache", default=None, help="npz of the decoded sample (created when missing)")
    p.add_argument("--view-voxel-mm", type=float, default=None,
                   help="FusionParams.view_voxel_mm (default: the FusionParams default)")
    a = p.parse_args(argv)
    _pin_one_core()
    res = run(a.size, a.repeat, a.cache, a.view_voxel_mm)
    print(_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
