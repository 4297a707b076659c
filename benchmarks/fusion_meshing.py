"""Benchmark of the sample-level chain tail: fusion (:func:`kernels.fusion.fuse_views`) then the
CVT surface (:func:`kernels.meshing.mesh_point_cloud`) on one core, against the simulator's GT.

Usage::

    python -m benchmarks.fusion_meshing --size full --json out.json
    python -m benchmarks.fusion_meshing --size small --target-vertices 20000

The process pins itself to one core (``os.sched_setaffinity``; BLAS / OpenMP thread counts
set to 1 before numpy and Open3D are imported). The sample is :func:`benchmarks.fusion.build_sample`
(one synthetic subject rendered with the TRUE rig, decoded with :func:`kernels.decode.decode_view`,
textured and landmark-lifted with :mod:`kernels.landmarks` in the STORED rig's world frame);
``--cache PATH`` keeps it in an ``.npz``. Fusion runs as the ``fusion`` stage calls it
(``masks=`` the decode valid masks, ``viewpoints=`` the IR camera centres), meshing at
``--target-vertices`` (default 100k, the ``MeshingParams`` default).

Reported (one run each, wall-clock):

* ``fusion_s``, ``meshing_s`` (``fuse_views`` call; ``mesh_point_cloud`` call including its
  quality metrics);
* ``rot_err_deg`` / ``trans_err_mm``: worst side view against the GT calibration correction
  (rotation; translation at the view's centroid), as benchmarks/fusion.py;
* ``mesh_mean_mm`` / ``mesh_p99_mm``: symmetric surface distance between the output mesh and
  the GT mesh *within the scanned region*: Open3D ``RaycastingScene.compute_distance`` of the
  output vertices to the GT mesh, and of the GT vertices within 1 mm of the fused cloud to the
  output mesh; mean and 99th percentile of both sets together (each direction also reported);
* ``min_angle_30_fraction`` (triangles whose smallest angle is >= 30 deg), ``n_vertices``.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: BLAS / OpenMP must not spawn threads

import argparse  # noqa: E402

from benchmarks._report import format_table  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.fusion import NAMES, SIZES, _apply, _pin_one_core, _rot_deg, build_sample  # noqa: E402

GT_BAND_MM = 1.0


def _scene(V, F):
    import open3d as o3d

    sc = o3d.t.geometry.RaycastingScene()
    sc.add_triangles(o3d.core.Tensor(np.ascontiguousarray(V, dtype=np.float32)),
                     o3d.core.Tensor(np.ascontiguousarray(F, dtype=np.uint32)))
    return sc


def _dist(scene, X) -> np.ndarray:
    import open3d as o3d

    return scene.compute_distance(o3d.core.Tensor(np.ascontiguousarray(X, dtype=np.float32))).numpy().astype(float)


def run(size: str = "full", cache: str | None = None, target_vertices: int = 100_000) -> dict:
    from scipy.spatial import cKDTree

    from kernels.fusion import FusionParams, fuse_views
    from kernels.meshing import MeshingParams, mesh_point_cloud

    if cache and os.path.exists(cache):
        S = dict(np.load(cache))
    else:
        t0 = time.perf_counter()
        S = build_sample(size)
        print(f"sample built in {time.perf_counter() - t0:.1f} s")
        if cache:
            np.savez(cache, **S)
    views = {n: (S[f"{n}_points"], S[f"{n}_conf"], S[f"{n}_colours"], S[f"{n}_landmarks"]) for n in NAMES}
    t0 = time.perf_counter()
    r = fuse_views(views, "middle", FusionParams(), viewpoints={n: S[f"{n}_vp"] for n in NAMES},
                   masks={n: S[f"{n}_mask"] for n in NAMES})
    fusion_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = mesh_point_cloud(r.points, r.normals, MeshingParams(target_vertices=target_vertices))
    meshing_s = time.perf_counter() - t0

    def pose_err(name):
        T, G = r.transforms[name], S[f"{name}_gt_T"]
        c = S[f"{name}_points"].mean(axis=0)
        return _rot_deg(T[:3, :3] @ G[:3, :3].T), float(np.linalg.norm(_apply(T, c[None]) - _apply(G, c[None])))

    errs = {n: pose_err(n) for n in NAMES if n != r.pivot}
    gtV, gtF = S["gt_vertices"], S["gt_faces"]
    d_out = _dist(_scene(gtV, gtF), m.vertices)                       # output mesh -> GT
    near, _ = cKDTree(r.points).query(gtV, k=1, distance_upper_bound=GT_BAND_MM)
    gt_in = gtV[np.isfinite(near)]                                    # GT within the scanned region
    d_gt = _dist(_scene(m.vertices, m.faces), gt_in)                  # GT -> output mesh
    d = np.concatenate([d_out, d_gt])
    q = m.quality
    return {
        "size": size, "cpu_affinity": sorted(os.sched_getaffinity(0)), "target_vertices": target_vertices,
        "fusion_s": fusion_s, "meshing_s": meshing_s,
        "meshing_kernel_s": float(q["meshing_s"]),
        "rot_err_deg": max(e[0] for e in errs.values()), "trans_err_mm": max(e[1] for e in errs.values()),
        "per_view": {n: {"rot_err_deg": e[0], "trans_err_mm": e[1]} for n, e in errs.items()},
        "mesh_mean_mm": float(d.mean()), "mesh_p99_mm": float(np.percentile(d, 99)),
        "mesh_to_gt_mean_mm": float(d_out.mean()), "mesh_to_gt_p99_mm": float(np.percentile(d_out, 99)),
        "gt_to_mesh_mean_mm": float(d_gt.mean()), "gt_to_mesh_p99_mm": float(np.percentile(d_gt, 99)),
        "n_gt_in_region": int(len(gt_in)),
        "min_angle_30_fraction": float(q["frac_min_angle_ok"]), "n_vertices": int(q["n_vertices"]),
        "n_faces": int(q["n_faces"]), "n_holes": int(q["n_holes"]),
        "n_points_in": int(r.qc["n_input"]), "n_points_fused": int(r.points.shape[0]),
    }


def _table(res: dict) -> str:
    rows = [("fusion_s", "s"), ("meshing_s", "s"), ("rot_err_deg", "deg"), ("trans_err_mm", "mm"),
            ("mesh_mean_mm", "mm"), ("mesh_p99_mm", "mm"), ("mesh_to_gt_mean_mm", "mm"), ("mesh_to_gt_p99_mm", "mm"),
            ("gt_to_mesh_mean_mm", "mm"), ("gt_to_mesh_p99_mm", "mm"), ("min_angle_30_fraction", ""),
            ("n_vertices", ""), ("n_faces", ""), ("n_holes", ""), ("n_points_in", ""), ("n_points_fused", ""),
            ("n_gt_in_region", "")]
    return format_table(f"fusion + meshing benchmark ({res['size']}, cpu {res['cpu_affinity']})", res, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fusion_meshing", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--cache", default=None, help="npz of the decoded sample (created when missing)")
    p.add_argument("--target-vertices", type=int, default=100_000)
    a = p.parse_args(argv)
    _pin_one_core()
    res = run(a.size, a.cache, a.target_vertices)
    print(_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
