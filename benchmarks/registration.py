"""Benchmark of the two-stage registration (:func:`kernels.registration.register`) on one core,
against the simulator's dense ground truth and against ``trimesh.registration.nricp_amberg``.

Usage::

    python -m benchmarks.registration --size full --json out.json      # 20k template, 100k scan
    python -m benchmarks.registration --size small                      # 5k template, 40k scan
    python -m benchmarks.registration --size small --sweep              # + 22 expressions x 3 subjects,
                                                                        #   ablation, missing data, landmarks
    python -m benchmarks.registration --size full --sweep --no-jaw     # the same without stage 1b (jaw)

The process pins itself to one core (``os.sched_setaffinity``; BLAS / OpenMP thread counts
set to 1 before numpy and Open3D are imported).

Scans (:func:`synthetic_scan`): ``face_mesh(subject, expression)`` at the resolution that
leaves about ``scan_vertices`` vertices after cropping to what the default rig observes (a
vertex is kept when the IR camera and the projector of at least one group see it
unoccluded, at less than 80 degrees from its normal), minus the dark regions the scanner
cannot decode (iris / pupil and the band between the lips: IR albedo < 0.1 in the eyes
and mouth parts -- holes like those of a fused mesh), largest component, 0.04 mm Gaussian
noise. Fused landmarks: the GT landmarks + isotropic Gaussian noise of 0.35 mm median
(NaN where the landmark is not on the scan).
Colours: the simulator's RGB albedo (with its skin detail,
``FaceModelParams.skin_detail``) at the scan vertices, 1 % relative noise; no shading
(the pipeline scan of ``benchmarks.reg_from_neutral --pipeline`` has it).

Ground truth: template vertex i (material point ``uv_i``) corresponds to
``surface_points(subject, expression, uv_i)``. The **correspondence error** is
``|registered_i - gt_i|`` over template vertices in ``face_region`` whose GT point is
observed (within ``OBSERVED_MM`` = 1 mm of the scan surface: the open mouth's interior and
the removed holes are not observed, so no method can be judged there). ``surface`` is the
mean distance of the registered vertices in the face region to the scan.

Peer: ``trimesh.registration.nricp_amberg`` with the same template (after our stage-1
similarity, which it does not have), the same landmarks (``source_landmarks`` as (face ids,
barycentric), ``target_positions`` = the scan's finite fused landmarks) and its default
steps, on the same scan mesh.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: BLAS / OpenMP must not spawn threads

import argparse  # noqa: E402
import zlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._report import format_table  # noqa: E402

OBSERVED_MM = 1.0
LANDMARK_MEDIAN_MM = 0.35
COLOUR_NOISE = 0.01  # relative colour noise of a scan vertex (a camera pixel: ~1 % of the signal)
SIZES = {"full": (20_000, 100_000), "small": (5_000, 40_000)}
EXAGGERATED = ("grin", "surprise", "cheek_blow")


def _pin_one_core() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- synthetic scans -----------------------------------------------------------------------------

def _scene(V, F):
    import open3d as o3d

    sc = o3d.t.geometry.RaycastingScene()
    sc.add_triangles(o3d.core.Tensor(np.ascontiguousarray(V, dtype=np.float32)),
                     o3d.core.Tensor(np.ascontiguousarray(F, dtype=np.uint32)))
    return sc


def observed_by_rig(V: np.ndarray, F: np.ndarray, max_angle_deg: float = 80.0) -> np.ndarray:
    """(n,) bool: vertex seen unoccluded by the IR camera and the projector of some group."""
    import open3d as o3d

    from kernels.nicp import vertex_normals
    from kernels.synth.rig import RigParams, build_rig

    rig = build_rig(RigParams())
    sc = _scene(V, F)
    N = vertex_normals(V, F)
    cmin = np.cos(np.radians(max_angle_deg))
    seen = np.zeros(len(V), bool)
    for g in rig.groups:
        both = np.ones(len(V), bool)
        for cam in (g.ir, g.projector):
            c = np.asarray(cam.center, float)
            d = V - c
            r = np.linalg.norm(d, axis=1)
            u = d / r[:, None]
            facing = np.einsum("ij,ij->i", -u, N) > cmin
            rays = np.hstack([np.broadcast_to(c, V.shape), u]).astype(np.float32)
            hit = sc.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
            both &= facing & (hit >= r - 0.05)
        seen |= both
    return seen


def _largest_component(F: np.ndarray, n: int) -> np.ndarray:
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    A = sparse.coo_matrix((np.ones(2 * len(F)), (F[:, [0, 1]].ravel(), F[:, [1, 2]].ravel())), shape=(n, n))
    _, lab = connected_components(A, directed=False)
    big = np.bincount(lab[F[:, 0]]).argmax()
    return lab[F[:, 0]] == big


def synthetic_scan(subject, expression: str, scan_vertices: int = 40_000, rng=0, noise_mm: float = 0.04,
                   landmark_median_mm: float = LANDMARK_MEDIAN_MM, remove_uv_discs=(),
                   colour_noise: float = COLOUR_NOISE) -> dict:
    """A fused-scan-like open mesh of ``subject`` / ``expression`` (see the module docstring).

    ``remove_uv_discs``: extra holes, each ``(theta_rad, phi_rad, radius_mm)`` -- vertices
    within ``radius_mm`` (3D) of the GT surface point at that uv are removed.

    Returns a dict: ``vertices``, ``faces``, ``landmarks`` (106, 3) with NaN rows,
    ``gt_landmarks``, ``subject``, ``expression``, ``uv`` (scan vertices' material points),
    ``colours`` (the simulator's RGB albedo, skin detail included, times ``1 + N(0,
    colour_noise)`` per vertex and channel, clipped to [0, 1]; drawn after everything else,
    so the geometry is that of earlier versions, from a generator seeded by ``rng`` and the
    expression, so that it does not repeat between a subject's scans).
    """
    from kernels.synth.face import face_mesh, surface_points

    g = np.random.default_rng(rng)
    n_grid = int(scan_vertices / 0.95)
    fm = face_mesh(subject, expression, n_grid)
    V = np.asarray(fm.vertices, float)
    F = np.asarray(fm.faces, np.int64)
    keep = observed_by_rig(V, F)
    dark = (np.asarray(fm.albedo_ir) < 0.1) & np.isin(np.asarray(fm.parts), (2, 5))
    keep &= ~dark
    for th, ph, rad in remove_uv_discs:
        c = surface_points(subject, expression, np.array([[th, ph]]))[0]
        keep &= np.linalg.norm(V - c, axis=1) > rad
    fk = keep[F].all(axis=1)
    Fk = F[fk]
    Fk = Fk[_largest_component(Fk, len(V))]
    used = np.zeros(len(V), bool)
    used[Fk.ravel()] = True
    vmap = np.full(len(V), -1, np.int64)
    vmap[used] = np.arange(int(used.sum()))
    Vs = V[used] + g.normal(0.0, noise_mm, (int(used.sum()), 3))
    Fs = vmap[Fk].astype(np.int32)
    sigma = landmark_median_mm / 1.5382  # median of a 3D isotropic Gaussian's norm = 1.5382 sigma
    L = np.asarray(fm.landmarks, float) + g.normal(0.0, sigma, (106, 3))
    d = _scene(Vs, Fs).compute_distance(__import__("open3d").core.Tensor(fm.landmarks.astype(np.float32))).numpy()
    L[d > OBSERVED_MM] = np.nan
    C = np.asarray(fm.albedo_rgb, float)[used]
    # a generator of its own per expression: drawn from ``g`` alone, the noise of a subject's
    # scans (same seed) would repeat per grid vertex, i.e. move with the skin like a texture
    gc = np.random.default_rng([int(g.integers(2 ** 62)), zlib.crc32(expression.encode())])
    C = np.clip(C * (1.0 + gc.normal(0.0, colour_noise, C.shape)), 0.0, 1.0)
    return {"vertices": Vs, "faces": Fs, "landmarks": L, "gt_landmarks": np.asarray(fm.landmarks, float),
            "subject": subject, "expression": expression, "uv": np.asarray(fm.uv)[used], "colours": C}


def evaluate(template, registered: np.ndarray, scan: dict) -> dict:
    """Correspondence and surface errors of a registration against the simulator's GT (mm)."""
    import open3d as o3d

    from kernels.meshing import mesh_quality
    from kernels.synth.face import PART_NAMES, face_region, surface_points

    gt = surface_points(scan["subject"], scan["expression"], template.uv)
    sc = _scene(scan["vertices"], scan["faces"])
    d_gt = sc.compute_distance(o3d.core.Tensor(gt.astype(np.float32))).numpy()
    region = face_region(template.uv) & (d_gt <= OBSERVED_MM)
    err = np.linalg.norm(registered - gt, axis=1)
    d_reg = sc.compute_distance(o3d.core.Tensor(registered.astype(np.float32))).numpy()
    fr = face_region(template.uv)
    parts = np.asarray(template.parts)
    out = {
        "corr_mean_mm": float(err[region].mean()), "corr_p95_mm": float(np.percentile(err[region], 95)),
        "corr_max_mm": float(err[region].max()),
        "surface_mm": float(d_reg[fr & (d_gt <= OBSERVED_MM)].mean()),
        "n_eval": int(region.sum()),
        "n_degenerate": int(mesh_quality(registered, template.faces)["n_degenerate"]),
    }
    for k, name in enumerate(PART_NAMES):
        m = region & (parts == k)
        if m.any() and k:
            out[f"corr_{name}_mm"] = float(err[m].mean())
    out["_err"] = err
    out["_region"] = region
    return out


def wrong_landmarks(L: np.ndarray, n_wrong: int, rng, offset_mm: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """Move ``n_wrong`` random finite landmarks by ``offset_mm`` in a random direction."""
    g = np.random.default_rng(rng)
    L = L.copy()
    idx = g.choice(np.flatnonzero(np.isfinite(L[:, 0])), n_wrong, replace=False)
    d = g.normal(size=(n_wrong, 3))
    L[idx] += offset_mm * d / np.linalg.norm(d, axis=1, keepdims=True)
    return L, idx


def px_to_mm() -> float:
    """Size of one IR pixel at the working distance of the default rig (mm)."""
    from kernels.synth.rig import RigParams

    p = RigParams()
    fx = (p.width / 2) / np.tan(np.radians(p.ir_hfov_deg) / 2)
    return p.working_distance_mm / fx


def missing_data_scan(subject, expression: str, scan_vertices: int, rng, target_fraction: float = 0.10) -> dict:
    """:func:`synthetic_scan` with a hole on the right cheek and the right eye region removed.

    The eye region is a 16 mm disc around the right pupil landmark; the cheek disc (centred
    at theta = -40 deg, phi = -12 deg) gets the radius that makes the two remove
    ``target_fraction`` of the face region's area (bisection). Returns the scan dict plus
    ``removed_fraction`` and ``discs``.
    """
    from kernels.synth.face import face_mesh, face_region, landmark_uv, surface_points

    fm = face_mesh(subject, expression, 60_000)
    V, F = np.asarray(fm.vertices), np.asarray(fm.faces, np.int64)
    area = 0.5 * np.linalg.norm(np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]]), axis=1)
    fr = face_region(np.asarray(fm.uv))[F].all(axis=1)
    cen = V[F].mean(axis=1)
    eye = (float(landmark_uv()[104, 0]), float(landmark_uv()[104, 1]), 16.0)
    cheek_uv = np.radians([-40.0, -12.0])
    c_eye = surface_points(subject, expression, np.array([eye[:2]]))[0]
    c_cheek = surface_points(subject, expression, cheek_uv[None])[0]

    def frac(r):
        gone = (np.linalg.norm(cen - c_eye, axis=1) <= eye[2]) | (np.linalg.norm(cen - c_cheek, axis=1) <= r)
        return float(area[fr & gone].sum() / area[fr].sum())

    lo, hi = 0.0, 80.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if frac(mid) < target_fraction else (lo, mid)
    discs = (eye, (float(cheek_uv[0]), float(cheek_uv[1]), 0.5 * (lo + hi)))
    sc = synthetic_scan(subject, expression, scan_vertices, rng=rng, remove_uv_discs=discs)
    sc["removed_fraction"] = frac(discs[1][2])
    sc["discs"] = discs
    return sc


def laplacian_norm(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """(n,) norm of the uniform Laplacian (mean of the 1-ring minus the vertex), mm."""
    from scipy import sparse

    from kernels.template import template_edges

    E = template_edges(F)
    n = len(V)
    A = sparse.coo_matrix((np.ones(2 * len(E)), (np.r_[E[:, 0], E[:, 1]], np.r_[E[:, 1], E[:, 0]])), shape=(n, n)).tocsr()
    deg = np.asarray(A.sum(axis=1)).ravel()
    return np.linalg.norm((A @ V) / deg[:, None] - V, axis=1)


def _trimesh_register(template, start: np.ndarray, scan: dict, used: np.ndarray) -> tuple[np.ndarray, float]:
    import trimesh
    from trimesh.registration import nricp_amberg

    src = trimesh.Trimesh(np.array(start), np.array(template.faces), process=False)
    tgt = trimesh.Trimesh(np.array(scan["vertices"]), np.array(scan["faces"]), process=False)
    lms = (np.asarray(template.landmark_faces)[used], np.asarray(template.landmark_bary)[used])
    t0 = time.perf_counter()
    out = nricp_amberg(src, tgt, source_landmarks=lms, target_positions=scan["landmarks"][used])
    return np.asarray(out, float), time.perf_counter() - t0


SUBJECT_SEEDS = (11, 12, 13)


def _subject(k: int):
    from kernels.synth.face import sample_subject

    return sample_subject(f"B{k:03d}", SUBJECT_SEEDS[k % len(SUBJECT_SEEDS)] if k < len(SUBJECT_SEEDS) else k)


def _params(jaw: bool = True):
    from kernels.jaw import JawParams
    from kernels.registration import RegistrationParams

    return RegistrationParams() if jaw else RegistrationParams(jaw=JawParams(enabled=False))


def run(size: str = "full", with_trimesh: bool = True, expression: str = "smile", jaw: bool = True) -> dict:
    """Ours against trimesh on one scan (subject B000, ``expression``); ``jaw=False`` disables stage 1b."""
    from kernels.nicp import prepare_template
    from kernels.registration import RegistrationParams, register
    from kernels.similarity import apply_similarity
    from kernels.template import default_template

    nt, ns = SIZES[size]
    t0 = time.perf_counter()
    T = default_template(nt)
    template_s = time.perf_counter() - t0
    params = _params(jaw)
    t0 = time.perf_counter()
    prepared = prepare_template(T, params.nicp)
    prepare_s = time.perf_counter() - t0
    scan = synthetic_scan(_subject(0), expression, ns, rng=0)
    register(prepared, scan["vertices"], scan["faces"], scan["landmarks"], params)   # warm-up (imports, caches)
    t0 = time.perf_counter()
    r = register(prepared, scan["vertices"], scan["faces"], scan["landmarks"], params)
    ours_s = time.perf_counter() - t0
    ev = evaluate(T, r.vertices, scan)
    res = {
        "size": size, "cpu_affinity": sorted(os.sched_getaffinity(0)), "expression": expression,
        "template_vertices": int(T.n_vertices), "scan_vertices": int(len(scan["vertices"])),
        "ours_s": ours_s, "ours_prepare_s": prepare_s, "template_build_s": template_s,
        "ours_corr_mm": ev["corr_mean_mm"], "ours_corr_p95_mm": ev["corr_p95_mm"],
        "ours_surface_mm": ev["surface_mm"], "ours_flipped": int(r.qc["n_flipped"]),
        "ours_degenerate": int(r.qc["n_degenerate"]), "ours_valid_fraction": float(r.qc["valid_fraction"]),
        "ours_iterations": int(r.qc["n_iterations"]), "n_eval_vertices": ev["n_eval"],
    }
    if with_trimesh:
        start = apply_similarity(r.similarity, T.vertices)
        used = np.isfinite(scan["landmarks"][:, 0])
        V_tm, tm_s = _trimesh_register(T, start, scan, used)
        ev_tm = evaluate(T, V_tm, scan)
        res.update({"trimesh_s": tm_s, "speedup": tm_s / ours_s, "speedup_incl_prepare": tm_s / (ours_s + prepare_s),
                    "trimesh_corr_mm": ev_tm["corr_mean_mm"], "trimesh_corr_p95_mm": ev_tm["corr_p95_mm"],
                    "trimesh_surface_mm": ev_tm["surface_mm"], "trimesh_degenerate": ev_tm["n_degenerate"]})
    return res


def sweep(size: str = "small", n_subjects: int = 3, ablation: bool = True, robustness: bool = True,
          jaw: bool = True) -> dict:
    """All 22 expressions x ``n_subjects``; uniform-stiffness ablation; missing data; landmark noise.

    ``jaw=False`` disables stage 1b (the jaw) everywhere. Rows carry the estimated jaw angle
    and the simulator's (``jaw_true_deg``, for the report only)."""
    from dataclasses import replace as dc_replace

    from kernels.nicp import prepare_template
    from kernels.registration import RegistrationParams, register
    from kernels.synth.expressions import EXPRESSION_INDEX, jaw_open_deg
    from kernels.synth.face import PART_NAMES, expression_names
    from kernels.synth.face_params import FaceModelParams
    from kernels.template import default_template

    nt, ns = SIZES[size]
    T = default_template(nt)
    params = _params(jaw)
    uniform = dc_replace(params, nicp=dc_replace(params.nicp, part_stiffness=tuple((p, 1.0) for p in PART_NAMES)))
    prep = prepare_template(T, params.nicp)
    prep_u = prepare_template(T, uniform.nicp) if ablation else None
    rows, errs, abl = [], [], []
    for k in range(n_subjects):
        subj = _subject(k)
        for e in expression_names():
            sc = synthetic_scan(subj, e, ns, rng=k)
            t0 = time.perf_counter()
            r = register(prep, sc["vertices"], sc["faces"], sc["landmarks"], params)
            dt = time.perf_counter() - t0
            ev = evaluate(T, r.vertices, sc)
            errs.append(ev["_err"][ev["_region"]])
            rows.append({"subject": subj.subject_id, "expression": e, "corr_mm": ev["corr_mean_mm"],
                         "corr_p95_mm": ev["corr_p95_mm"], "surface_mm": ev["surface_mm"],
                         "flipped": int(r.qc["n_flipped"]), "degenerate": int(r.qc["n_degenerate"]),
                         "valid_fraction": float(r.qc["valid_fraction"]), "time_s": dt,
                         "nose_mm": ev.get("corr_nose_mm"), "mouth_mm": ev.get("corr_mouth_mm"),
                         "jaw_angle_deg": float(r.qc["jaw_angle_deg"]),
                         "jaw_true_deg": jaw_open_deg(e, subj.expression_intensity[EXPRESSION_INDEX[e]],
                                                      FaceModelParams())})
            if ablation:
                ru = register(prep_u, sc["vertices"], sc["faces"], sc["landmarks"], uniform)
                eu = evaluate(T, ru.vertices, sc)
                abl.append({"per_part": {p: ev.get(f"corr_{p}_mm") for p in PART_NAMES[1:]} | {"all": ev["corr_mean_mm"]},
                            "uniform": {p: eu.get(f"corr_{p}_mm") for p in PART_NAMES[1:]} | {"all": eu["corr_mean_mm"]}})
    pooled = np.concatenate(errs)
    corr = np.array([r["corr_mm"] for r in rows])
    names = np.array([r["expression"] for r in rows])
    neutral = float(corr[names == "neutral"].mean())
    out = {
        "size": size, "template_vertices": int(T.n_vertices), "n_subjects": n_subjects, "rows": rows,
        "corr_mean_mm": float(corr.mean()), "corr_p95_pooled_mm": float(np.percentile(pooled, 95)),
        "corr_p95_mean_mm": float(np.mean([r["corr_p95_mm"] for r in rows])),
        "surface_mean_mm": float(np.mean([r["surface_mm"] for r in rows])),
        "flipped_max": int(max(r["flipped"] for r in rows)), "degenerate_max": int(max(r["degenerate"] for r in rows)),
        "time_mean_s": float(np.mean([r["time_s"] for r in rows])),
        "neutral_corr_mm": neutral,
        "exaggerated": {x: float(corr[names == x].mean()) for x in EXAGGERATED},
        "exaggerated_ratio": {x: float(corr[names == x].mean() / neutral) for x in EXAGGERATED},
        "non_exaggerated_corr_mm": float(corr[~np.isin(names, EXAGGERATED)].mean()),
    }
    if ablation:
        out["ablation"] = {kind: {p: float(np.nanmean([a[kind][p] if a[kind][p] is not None else np.nan for a in abl]))
                                  for p in list(PART_NAMES[1:]) + ["all"]} for kind in ("uniform", "per_part")}
    if robustness:
        out["missing_data"] = _missing_data(T, prep, params, ns)
        out["landmarks"] = _landmark_robustness(T, prep, params, ns)
    return out


MISSING_CASES = (("neutral", 0), ("smile", 1), ("brow_lower", 2), ("kiss", 0))
LANDMARK_CASES = (("neutral", 0), ("smile", 1), ("eyes_closed", 2), ("mouth_left", 0))


def _missing_data(T, prep, params, ns) -> dict:
    from kernels.registration import register

    out = []
    lap_ref = None
    for e, k in MISSING_CASES:
        subj = _subject(k)
        full = synthetic_scan(subj, e, ns, rng=k)
        holed = missing_data_scan(subj, e, ns, rng=k)
        r_f = register(prep, full["vertices"], full["faces"], full["landmarks"], params)
        r_h = register(prep, holed["vertices"], holed["faces"], holed["landmarks"], params)
        ev_f, ev_h = evaluate(T, r_f.vertices, full), evaluate(T, r_h.vertices, holed)
        keep = ev_h["_region"] & ev_f["_region"]              # remaining (observed in both) face region
        hole = ev_f["_region"] & ~ev_h["_region"]             # observed only in the complete scan
        lap_f, lap_h = laplacian_norm(r_f.vertices, T.faces), laplacian_norm(r_h.vertices, T.faces)
        lap_ref = laplacian_norm(T.vertices, T.faces)
        out.append({"expression": e, "subject": subj.subject_id, "removed_fraction": holed["removed_fraction"],
                    "corr_complete_mm": float(ev_f["_err"][keep].mean()), "corr_holed_mm": float(ev_h["_err"][keep].mean()),
                    "ratio": float(ev_h["_err"][keep].mean() / ev_f["_err"][keep].mean()),
                    "hole_corr_complete_mm": float(ev_f["_err"][hole].mean()),
                    "hole_corr_holed_mm": float(ev_h["_err"][hole].mean()),
                    "hole_laplacian_complete_mm": float(lap_f[hole].mean()),
                    "hole_laplacian_holed_mm": float(lap_h[hole].mean()),
                    "hole_laplacian_template_mm": float(lap_ref[hole].mean()),
                    "hole_laplacian_ratio": float(lap_h[hole].mean() / lap_f[hole].mean()),
                    "flipped": int(r_h.qc["n_flipped"])})
    return {"cases": out, "ratio_max": max(c["ratio"] for c in out),
            "hole_laplacian_ratio_max": max(c["hole_laplacian_ratio"] for c in out)}


def _landmark_robustness(T, prep, params, ns) -> dict:
    from kernels.registration import register

    px = px_to_mm()
    out = []
    for e, k in LANDMARK_CASES:
        subj = _subject(k)
        sc = synthetic_scan(subj, e, ns, rng=k)
        r0 = register(prep, sc["vertices"], sc["faces"], sc["landmarks"], params)
        g = np.random.default_rng(1000 + k)
        L = sc["landmarks"].copy()
        L[:, :2] += g.normal(0.0, 2.0 * px, (L.shape[0], 2))   # 2 px in the frontal image plane
        Lw, idx = wrong_landmarks(L, 5, rng=2000 + k)
        r1 = register(prep, sc["vertices"], sc["faces"], Lw, params)
        e0, e1 = evaluate(T, r0.vertices, sc), evaluate(T, r1.vertices, sc)
        dropped = np.flatnonzero(~r1.landmarks_used & np.isfinite(Lw[:, 0]))
        out.append({"expression": e, "subject": subj.subject_id, "corr_clean_mm": e0["corr_mean_mm"],
                    "corr_noisy_wrong_mm": e1["corr_mean_mm"], "ratio": e1["corr_mean_mm"] / e0["corr_mean_mm"],
                    "wrong": sorted(int(i) for i in idx), "dropped": [int(i) for i in dropped],
                    "similarity_inliers": int(r1.similarity.n_inliers)})
    return {"px_mm": px, "noise_px": 2.0, "n_wrong": 5, "cases": out, "ratio_max": max(c["ratio"] for c in out)}


def _table(res: dict) -> str:
    rows = [("template_vertices", ""), ("scan_vertices", ""), ("ours_s", "s"), ("ours_prepare_s", "s"),
            ("ours_corr_mm", "mm"), ("ours_corr_p95_mm", "mm"), ("ours_surface_mm", "mm"), ("ours_flipped", ""),
            ("ours_degenerate", ""), ("ours_valid_fraction", ""), ("ours_iterations", "")]
    if "trimesh_s" in res:
        rows += [("trimesh_s", "s"), ("speedup", "x"), ("speedup_incl_prepare", "x"), ("trimesh_corr_mm", "mm"),
                 ("trimesh_corr_p95_mm", "mm"), ("trimesh_surface_mm", "mm")]
    return format_table(f"registration benchmark ({res['size']}, {res['expression']}, cpu {res['cpu_affinity']})",
                        res, rows)


def _sweep_table(sw: dict) -> str:
    lines = [f"per expression ({sw['n_subjects']} subjects, template {sw['template_vertices']} vertices): "
             f"mean corr / p95 / surface mm, max flipped / degenerate, mean s, jaw angle est / true deg"]
    by = {}
    for r in sw["rows"]:
        by.setdefault(r["expression"], []).append(r)
    for e, rs in by.items():
        lines.append(f"  {e:<14} {np.mean([r['corr_mm'] for r in rs]):6.3f} {np.mean([r['corr_p95_mm'] for r in rs]):6.2f} "
                     f"{np.mean([r['surface_mm'] for r in rs]):6.3f} {max(r['flipped'] for r in rs):3d} "
                     f"{max(r['degenerate'] for r in rs):3d} {np.mean([r['time_s'] for r in rs]):5.2f} "
                     f"{np.mean([r.get('jaw_angle_deg', np.nan) for r in rs]):6.1f} "
                     f"{np.mean([r.get('jaw_true_deg', np.nan) for r in rs]):5.1f}")
    lines.append(f"  ALL: corr {sw['corr_mean_mm']:.3f} mm, p95 pooled {sw['corr_p95_pooled_mm']:.2f} mm "
                 f"(mean of p95 {sw['corr_p95_mean_mm']:.2f}), surface {sw['surface_mean_mm']:.3f} mm, "
                 f"flipped max {sw['flipped_max']}, degenerate max {sw['degenerate_max']}")
    lines.append(f"  without the exaggerated: corr {sw['non_exaggerated_corr_mm']:.3f} mm; neutral {sw['neutral_corr_mm']:.3f}; "
                 + ", ".join(f"{x} {sw['exaggerated'][x]:.3f} ({sw['exaggerated_ratio'][x]:.2f}x)" for x in EXAGGERATED))
    if "ablation" in sw:
        a = sw["ablation"]
        lines.append("  ablation (mean corr mm per part)   " + " ".join(f"{p:>9}" for p in a["uniform"]))
        for kind in ("uniform", "per_part"):
            lines.append(f"    {kind:<31} " + " ".join(f"{a[kind][p]:9.3f}" for p in a[kind]))
    if "missing_data" in sw:
        for c in sw["missing_data"]["cases"]:
            lines.append(f"  missing {c['removed_fraction']:.1%} ({c['subject']} {c['expression']}): corr remaining "
                         f"{c['corr_complete_mm']:.3f} -> {c['corr_holed_mm']:.3f} ({c['ratio']:.2f}x); in the hole "
                         f"corr {c['hole_corr_complete_mm']:.2f} -> {c['hole_corr_holed_mm']:.2f}, laplacian "
                         f"{c['hole_laplacian_complete_mm']:.3f} -> {c['hole_laplacian_holed_mm']:.3f} mm")
    if "landmarks" in sw:
        for c in sw["landmarks"]["cases"]:
            lines.append(f"  landmarks 2 px + 5 wrong ({c['subject']} {c['expression']}): corr {c['corr_clean_mm']:.3f} -> "
                         f"{c['corr_noisy_wrong_mm']:.3f} ({c['ratio']:.2f}x), wrong {c['wrong']} dropped {c['dropped']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.registration", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-trimesh", action="store_true", help="skip the peer (about 2.5 min at full size)")
    p.add_argument("--sweep", action="store_true",
                   help="also: 22 expressions x 3 subjects, ablation, missing data, landmark robustness")
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--no-jaw", action="store_true", help="disable the registration's jaw stage (1b)")
    a = p.parse_args(argv)
    _pin_one_core()
    res = run(a.size, not a.no_trimesh, jaw=not a.no_jaw)
    res["jaw"] = not a.no_jaw
    print(_table(res), flush=True)
    if a.sweep:
        sw = sweep(a.size, a.subjects, jaw=not a.no_jaw)
        print(_sweep_table(sw))
        res["sweep"] = sw
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
