"""Cost of simulating one capture: face mesh -> 3 views of fringes + RGB -> PNG files.

    python -m benchmarks.synth --size full --json work/bench/synth.json

Pins itself to one core (``--cores``) and runs Open3D's ray casting with that many
threads. Alongside the simulator it times a reference in the same run: Open3D casting
the same number of camera rays (one per IR and RGB pixel of every view) on the same
mesh, with nothing else; ``ratio_to_raycast`` = render time / that floor.

Target (foundation issue): one full-size sample (3 views at 1280x1024, all fringe
images + RGB) in under 5 s on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"full": (1280, 1024, 150_000), "small": (320, 256, 30_000)}


def _pin(cores: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        avail = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(avail[:cores]))


def run(size: str = "full", cores: int = 1, repeats: int = 3, seed: int = 0) -> dict:
    import open3d as o3d

    from flows.synthesize import _mesh_record, _sample_meta, write_capture
    from kernels.camera import pixel_grid, pixel_rays
    from kernels.synth.face import face_mesh, sample_subject
    from kernels.synth.rig import build_rig, perturb_rig
    from kernels.synth.scanner import SceneMesh, scan
    from pixelface.config import load_config

    width, height, n_vertices = SIZES[size]
    cfg = load_config(overrides={"synth": {"mesh_vertices": n_vertices, "rig": {"width": width, "height": height}}}).synth
    rig = build_rig(cfg.rig)
    stored = perturb_rig(rig, cfg.rig, np.random.default_rng(seed))
    subject = sample_subject("S0000", np.random.default_rng(seed), cfg.face)

    t_mesh, t_render, t_write, t_floor = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        from storage import raw
        for r in range(repeats):
            t0 = time.perf_counter()
            mesh = face_mesh(subject, "smile", n_vertices, cfg.face)
            t1 = time.perf_counter()
            scene = SceneMesh(mesh.vertices, mesh.faces, mesh.albedo_ir, mesh.albedo_rgb, mesh.landmarks)
            renders = scan(scene, rig, cfg.fringe, cfg.photometry, seed + r, nthreads=cores)
            t2 = time.perf_counter()
            root, gt = Path(tmp) / f"raw{r}", Path(tmp) / f"gt{r}"
            raw.write_subject(root, raw.SubjectMeta("S0000", subject.gender, int(subject.age), "train"))
            meta = _sample_meta(cfg, "S0000", "smile", "smile", "positive", rig)
            write_capture(root, gt, meta, _mesh_record(mesh), renders, rig, stored, cfg, overwrite=False)
            t3 = time.perf_counter()
            # reference: the bare ray casts of the same pixels on the same mesh
            rs = o3d.t.geometry.RaycastingScene(nthreads=cores)
            rs.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)),
                             o3d.core.Tensor(mesh.faces.astype(np.uint32)))
            rays = []
            for g in rig.groups:
                for cam in (g.ir, g.rgb):
                    o, d = pixel_rays(cam, pixel_grid(cam.width, cam.height))
                    rays.append(np.concatenate([np.broadcast_to(o, d.shape), d], 1).astype(np.float32))
            t4 = time.perf_counter()
            for rr in rays:
                rs.cast_rays(o3d.core.Tensor(rr))
            t5 = time.perf_counter()
            t_mesh.append(t1 - t0)
            t_render.append(t2 - t1)
            t_write.append(t3 - t2)
            t_floor.append(t5 - t4)
    best = int(np.argmin(np.add(t_mesh, t_render) + np.asarray(t_write)))
    mod = np.asarray(renders["middle"].gt.modulation)
    skin = np.asarray(renders["middle"].gt.albedo) > 0.5
    out = {
        "size": size, "width": width, "height": height, "mesh_vertices": int(len(mesh.vertices)), "cores": cores,
        "views": len(renders), "images_per_view": int(np.prod(renders["middle"].fringe.shape[:2])) + 1,
        "face_mesh_s": round(t_mesh[best], 3),
        "render_s": round(t_render[best], 3),
        "write_s": round(t_write[best], 3),
        "sample_seconds": round(t_mesh[best] + t_render[best] + t_write[best], 3),
        "raycast_reference_s": round(t_floor[best], 3),
        "ratio_to_raycast": round(t_render[best] / t_floor[best], 2),
        "median_skin_modulation": round(float(np.nanmedian(mod[skin])), 1) if skin.any() else None,
        "target_sample_seconds": 5.0,
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    _pin(args.cores)
    res = run(args.size, args.cores, args.repeats)
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
