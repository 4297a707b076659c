"""Multi-view fusion (kernels/align.py, icp.py, merge.py, fusion.py) against simulator GT.

Scene (pattern of tests/test_decode_sim.py): one synthetic subject, the default rig at
320 x 256, rendered with the TRUE rig and decoded / textured / landmark-lifted with the
STORED (perturbed) rig in its world frame, as the pipeline does. A side view is then
off by its stored-calibration error; the GT correction of view ``v`` is

    T_gt = [R_true^T R_stored | R_true^T (t_stored - t_true)]   (IR camera poses),

which maps the stored-frame decoded points onto the GT surface. Two calibration errors:
the simulator default (0.5 deg / 1 mm) and 5 deg / 20 mm.
"""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
from scipy.spatial import cKDTree

from kernels.align import FALLBACK, CoarseParams, align_landmarks, kabsch
from kernels.decode import decode_view
from kernels.depth import depth_image
from kernels.fusion import FusionParams, fuse_views, grid_view
from kernels.icp import IcpParams, prepare_target, refine_icp
from kernels.landmarks import lift_landmarks
from kernels.merge import MergeParams, merge_views, organised_normals, voxel_average
from kernels.synth.face import face_mesh, sample_subject
from kernels.synth.rig import RigParams, build_rig, perturb_rig, rotation_angle_deg
from kernels.synth.scanner import FringeParams, PhotometryParams, SceneMesh, render_view
from kernels.texture import project_to_rgb, texture_map, visibility

W, H = 320, 256
FR = FringeParams()
NAMES = ("left", "middle", "right")
CALIB = {"default": (0.5, 1.0), "large": (5.0, 20.0)}


def _rigid(rot_deg, axis, t):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(rot_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    T = np.eye(4)
    T[:3, :3] = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    T[:3, 3] = t
    return T


def _apply(T, x):
    return x @ T[:3, :3].T + T[:3, 3]


@pytest.fixture(scope="module")
def scene():
    fm = face_mesh(sample_subject("T001", 5), "neutral", n_vertices=60_000)
    sm = SceneMesh(fm.vertices, fm.faces, fm.albedo_ir, fm.albedo_rgb, fm.landmarks)
    rc = o3d.t.geometry.RaycastingScene()
    rc.add_triangles(o3d.core.Tensor(fm.vertices.astype(np.float32)), o3d.core.Tensor(fm.faces.astype(np.uint32)))
    renders = {}
    true = build_rig(RigParams(width=W, height=H))
    for g in true.groups:
        vr = render_view(sm, g, FR, rng=11, nthreads=1)
        clean = render_view(sm, g, FR, PhotometryParams(annotator_noise_px=0.0), rng=11, nthreads=1)
        renders[g.name] = (vr, clean)
    return fm, rc, true, renders


@pytest.fixture(scope="module", params=sorted(CALIB))
def capture(request, scene):
    """Views decoded with the stored rig: views (noisy landmarks), clean landmarks, GT transforms."""
    fm, rc, true, renders = scene
    rot, tr = CALIB[request.param]
    stored = perturb_rig(true, RigParams(width=W, height=H, calib_rot_deg=rot, calib_trans_mm=tr), rng=3)
    views, clean_lm, gt_T, vps, gt_pts, masks = {}, {}, {}, {}, {}, {}
    for name in NAMES:
        vr, clean = renders[name]
        s, g = stored.group(name), true.group(name)
        dv = decode_view(vr.fringe, s.ir, s.projector, FR.frequencies, FR.steps)
        pr = project_to_rgb(dv.depth, s.ir, s.rgb)
        D = depth_image(pr, dv.depth, float(s.ir.K[0, 0]))
        vis = visibility(pr, D)
        tex = texture_map(pr, vr.rgb, D, visible=vis)
        lift = {}
        for key, ann in (("noisy", vr), ("clean", clean)):
            lift[key] = lift_landmarks(ann.landmarks_px, pr, dv.points, dv.depth, float(s.ir.K[0, 0]), visible=vis,
                                       landmark_visible=ann.landmark_visible).points
        v = dv.valid
        views[name] = (dv.points[v].astype(np.float64), dv.confidence[v].astype(np.float64),
                       tex.colors[v].astype(np.float64), lift["noisy"])
        clean_lm[name] = lift["clean"]
        T = np.eye(4)
        T[:3, :3] = g.ir.R.T @ s.ir.R
        T[:3, 3] = g.ir.R.T @ (s.ir.t - g.ir.t)
        gt_T[name] = T
        vps[name] = s.ir.center
        gt_pts[name] = vr.gt.points[v]
        masks[name] = v
    return dict(key=request.param, fm=fm, rc=rc, views=views, clean_lm=clean_lm, gt_T=gt_T, vps=vps,
                gt_pts=gt_pts, masks=masks)


@pytest.fixture(scope="module")
def fused(capture):
    return fuse_views(capture["views"], viewpoints=capture["vps"])


def _dist(rc, pts):
    return rc.compute_distance(o3d.core.Tensor(np.asarray(pts, np.float32))).numpy()


# -- coarse alignment ---------------------------------------------------------------------------

def test_kabsch_round_trip():
    rng = np.random.default_rng(0)
    src = rng.normal(scale=50, size=(40, 3))
    T = _rigid(33.0, (1, 2, -1), (10, -4, 7))
    np.testing.assert_allclose(kabsch(src, _apply(T, src)), T, atol=1e-9)
    with pytest.raises(ValueError, match="src"):
        kabsch(src[:2], src[:2])


def test_align_landmarks_ignores_wrong_landmarks():
    rng = np.random.default_rng(1)
    src = rng.normal(scale=40, size=(106, 3))
    src[rng.random(106) < 0.4] = np.nan
    T = _rigid(5.0, (0, 1, 0.2), (20, 3, -5))
    dst = _apply(T, src) + rng.normal(scale=0.5, size=src.shape)
    bad = np.flatnonzero(np.isfinite(src[:, 0]))[:6]
    dst[bad] += rng.normal(scale=15, size=(6, 3)) + 10
    r = align_landmarks(src, dst, rng=0)
    assert r.converged and r.status == "ok" and r.reason == ""
    assert not r.inliers[bad].any()
    assert r.n_inliers == r.n_shared - 6
    assert rotation_angle_deg(r.transform[:3, :3] @ T[:3, :3].T) < 0.3
    assert np.linalg.norm(r.transform[:3, 3] - T[:3, 3]) < 1.0


def test_align_landmarks_fallback_when_too_few_shared():
    rng = np.random.default_rng(2)
    src = rng.normal(scale=40, size=(106, 3))
    dst = src + 1.0
    src[5:] = np.nan  # 5 shared < min_shared = 6
    r = align_landmarks(src, dst, CoarseParams(min_shared=6))
    assert not r.converged and r.status == FALLBACK == "fallback: stored calibration"
    assert "only 5 shared landmarks (minimum 6)" in r.reason
    np.testing.assert_array_equal(r.transform, np.eye(4))
    assert r.n_shared == 5 and r.n_inliers == 0 and np.isnan(r.rmse_mm)


def test_align_landmarks_rejects_partial_rows():
    a = np.zeros((106, 3))
    a[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"source_landmarks: rows \[3\]"):
        align_landmarks(a, np.zeros((106, 3)))


# -- ICP ----------------------------------------------------------------------------------------

def test_icp_recovers_known_transform_on_gt_surface(scene):
    fm, _, _, _ = scene
    rng = np.random.default_rng(3)
    P = fm.vertices[fm.vertices[:, 2] > 20]
    src = P[rng.random(P.shape[0]) < 0.5]
    T = _rigid(1.0, (0.3, 1, 0), (1.0, -0.5, 0.8))
    r = refine_icp(_apply(np.linalg.inv(T), src), P, None, IcpParams())
    assert r.converged and len(r.levels) == 3 and r.n_iter == 3
    assert rotation_angle_deg(r.transform[:3, :3] @ T[:3, :3].T) < 0.01
    assert np.linalg.norm(r.transform[:3, 3] - T[:3, 3]) < 0.05
    with pytest.raises(ValueError, match="IcpParams"):
        IcpParams(voxel_mm=(1.0,), max_distance_mm=(1.0, 2.0), max_iterations=(5,))


def test_icp_with_given_target_normals(scene):
    """Target normals averaged per voxel instead of estimated: same recovery."""
    fm, _, _, _ = scene
    rng = np.random.default_rng(3)
    keep = fm.vertices[:, 2] > 20
    P = fm.vertices[keep]
    pc = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(fm.vertices.copy()),
                                   o3d.utility.Vector3iVector(fm.faces.astype(np.int32)))
    Nv = np.asarray(pc.compute_vertex_normals().vertex_normals)[keep]
    src = P[rng.random(P.shape[0]) < 0.5]
    T = _rigid(1.0, (0.3, 1, 0), (1.0, -0.5, 0.8))
    Nin = Nv.copy()
    r = refine_icp(_apply(np.linalg.inv(T), src), P, None, IcpParams(), target_normals=-Nv)  # any sign
    np.testing.assert_array_equal(Nv, Nin)
    assert r.converged and len(r.levels) == 3
    assert rotation_angle_deg(r.transform[:3, :3] @ T[:3, :3].T) < 0.01
    assert np.linalg.norm(r.transform[:3, 3] - T[:3, 3]) < 0.05
    with pytest.raises(ValueError, match="target_normals"):
        refine_icp(src, P, None, target_normals=Nv[:-1])
    # a target prepared once (as fuse_views does for both side views) gives the same result
    # (bit for bit on one thread; Open3D's multi-threaded sums may differ in the last digit)
    tgt = prepare_target(P, IcpParams(), target_normals=-Nv)
    for _ in range(2):
        r2 = refine_icp(_apply(np.linalg.inv(T), src), tgt, None, IcpParams())
        np.testing.assert_allclose(r2.transform, r.transform, rtol=0, atol=1e-12)
        assert [lv.n_target for lv in r2.levels] == [lv.n_target for lv in r.levels]
        np.testing.assert_allclose([r2.fitness, r2.inlier_rmse_mm], [r.fitness, r.inlier_rmse_mm], rtol=1e-9)
    with pytest.raises(ValueError, match="prepared for voxel_mm"):
        refine_icp(src, tgt, None, IcpParams(voxel_mm=(1.0,), max_distance_mm=(1.0,), max_iterations=(5,)))
    with pytest.raises(ValueError, match="target_normals"):
        refine_icp(src, tgt, None, IcpParams(), target_normals=Nv)


# -- fusion against GT --------------------------------------------------------------------------

def test_side_view_poses(capture, fused):
    """Rotation error, translation error at the view's centroid and at its IR camera centre."""
    for name in ("left", "right"):
        T, G = fused.transforms[name], capture["gt_T"][name]
        assert fused.coarse[name].converged and fused.converged[name]
        rot = rotation_angle_deg(T[:3, :3] @ G[:3, :3].T)
        c = capture["views"][name][0].mean(axis=0)
        t_c = np.linalg.norm(_apply(T, c[None]) - _apply(G, c[None]))
        t_cam = np.linalg.norm(_apply(T, capture["vps"][name][None]) - _apply(G, capture["vps"][name][None]))
        # the side view is brought onto the GT surface
        moved = _apply(T, capture["views"][name][0])
        rms = np.sqrt(np.mean(_dist(capture["rc"], moved) ** 2))
        print(f"{capture['key']} {name}: rot {rot:.4f} deg, t@centroid {t_c:.4f} mm, t@camera {t_cam:.4f} mm, "
              f"rms to GT {rms:.4f} mm, fitness {fused.icp[name].fitness:.3f}")
        assert rot <= 0.05
        assert t_c <= 0.10     # target 0.05 mm: measured 0.03-0.06 at 320 x 256
        assert t_cam <= 0.35   # lever arm: 0.03 deg x 500 mm = 0.26 mm
        assert rms <= 0.10


def test_fused_cloud_quality(capture, fused):
    rc = capture["rc"]
    d = _dist(rc, fused.points)
    assert np.sqrt(np.mean(d ** 2)) <= 0.10
    assert np.mean(d > 1.0) <= 0.001
    n_in = sum(v[0].shape[0] for v in capture["views"].values())
    assert fused.qc["n_input"] == n_in and fused.points.shape[0] < n_in
    # isolated points: fewer than 4 others within 3 spacings
    sp = fused.qc["spacing_mm"]
    cnt = cKDTree(fused.points).query_ball_point(fused.points, 3 * sp, return_length=True) - 1
    assert np.mean(cnt < 4) < 0.001
    # no duplicated layer in the overlap: local plane spread of merged points' neighbourhoods
    tree = cKDTree(fused.points)
    ov = np.flatnonzero(fused.n_views > 1)
    assert ov.size > 5000
    _, nb = tree.query(fused.points[ov[::10]], k=16)
    X = fused.points[nb] - fused.points[nb].mean(axis=1, keepdims=True)
    ev = np.linalg.eigvalsh(np.einsum("mki,mkj->mij", X, X) / 16)
    spread = np.sqrt(ev[:, 0])
    print(f"{capture['key']}: rms {np.sqrt(np.mean(d ** 2)):.4f} mm, overlap spread median "
          f"{np.median(spread):.4f} p95 {np.percentile(spread, 95):.4f} mm, overlap rms to GT "
          f"{np.sqrt(np.mean(d[ov] ** 2)):.4f}, isolated {np.mean(cnt < 4):.5f}, {fused.qc}")
    assert np.median(spread) <= 0.10
    assert np.sqrt(np.mean(d[ov] ** 2)) <= 0.10
    # normals: unit, outward (agree with the GT face normal)
    np.testing.assert_allclose(np.linalg.norm(fused.normals, axis=1), 1.0, atol=1e-6)
    cp = rc.compute_closest_points(o3d.core.Tensor(fused.points.astype(np.float32)))
    fm = capture["fm"]
    f = fm.faces[cp["primitive_ids"].numpy()]
    V = fm.vertices
    fn = np.cross(V[f[:, 1]] - V[f[:, 0]], V[f[:, 2]] - V[f[:, 0]])
    assert np.mean(np.einsum("ij,ij->i", fn, fused.normals) > 0) > 0.99
    # colours and confidence kept
    assert fused.colours.shape == fused.points.shape
    ok = np.isfinite(fused.colours[:, 0])
    assert ok.mean() > 0.95 and np.all((fused.colours[ok] >= 0) & (fused.colours[ok] <= 1))
    assert np.all((fused.confidence >= 0) & (fused.confidence <= 1))


def test_fusion_with_organised_masks(capture, fused):
    """Grid normals (masks given) instead of PCA: same poses and cloud, outward normals."""
    r = fuse_views(capture["views"], viewpoints=capture["vps"], masks=capture["masks"])
    for name in ("left", "right"):
        G = capture["gt_T"][name]
        assert r.converged[name]
        assert rotation_angle_deg(r.transforms[name][:3, :3] @ G[:3, :3].T) <= 0.05
    # the pivot's grid normals also serve ICP, so the poses differ slightly, not the cloud
    assert abs(r.points.shape[0] - fused.points.shape[0]) <= 0.001 * fused.points.shape[0]
    d = _dist(capture["rc"], r.points)
    assert np.sqrt(np.mean(d ** 2)) <= 0.10
    np.testing.assert_allclose(np.linalg.norm(r.normals, axis=1), 1.0, atol=1e-6)
    cp = capture["rc"].compute_closest_points(o3d.core.Tensor(r.points.astype(np.float32)))
    fm = capture["fm"]
    f = fm.faces[cp["primitive_ids"].numpy()]
    V = fm.vertices
    fn = np.cross(V[f[:, 1]] - V[f[:, 0]], V[f[:, 2]] - V[f[:, 0]])
    fn /= np.linalg.norm(fn, axis=1, keepdims=True)
    cos = np.einsum("ij,ij->i", fn, r.normals)
    print(f"{capture['key']}: grid normals median angle to GT {np.degrees(np.median(np.arccos(np.clip(cos, -1, 1)))):.2f} deg")
    assert np.mean(cos > 0) > 0.99
    assert np.median(cos) > np.cos(np.radians(10))
    # without view points: away from the head centre
    r2 = fuse_views(capture["views"], masks=capture["masks"])
    assert np.mean(np.einsum("ij,ij->i", r2.normals, r2.points) > 0) > 0.97
    bad = dict(capture["masks"])
    bad["left"] = bad["left"].copy()
    bad["left"][0, 0] = not bad["left"][0, 0]
    with pytest.raises(ValueError, match=r"masks\['left'\]: .* valid pixels, but the view has"):
        fuse_views(capture["views"], masks=bad)
    with pytest.raises(ValueError, match="masks: expected a dict"):
        fuse_views(capture["views"], masks={"left": bad["left"]})


def test_normals_without_viewpoints_point_away_from_head_centre(capture, fused):
    r = fuse_views(capture["views"])
    assert np.mean(np.einsum("ij,ij->i", r.normals, r.points) > 0) > 0.97
    # same cloud as with view points, normals agree almost everywhere
    assert r.points.shape == fused.points.shape
    assert np.mean(np.einsum("ij,ij->i", r.normals, fused.normals) > 0) > 0.97


def test_fused_landmarks(capture, fused):
    fm = capture["fm"]
    err = np.linalg.norm(fused.landmarks - fm.landmarks, axis=1)
    seen = np.zeros(106, bool)
    for v in capture["views"].values():
        seen |= np.isfinite(v[3][:, 0])
    assert np.array_equal(np.isfinite(fused.landmarks[:, 0]), seen)
    np.testing.assert_array_equal(fused.landmark_n_views, sum(np.isfinite(v[3][:, 0]) for v in capture["views"].values()))
    # the annotations carry the simulator's 1 px annotator noise (~1 mm per view)
    assert np.nanmedian(err) <= 2.0
    # noise-free annotations: only decoding and alignment errors are left
    views = {n: (*v[:3], capture["clean_lm"][n]) for n, v in capture["views"].items()}
    r = fuse_views(views, viewpoints=capture["vps"])
    e2 = np.linalg.norm(r.landmarks - fm.landmarks, axis=1)
    print(f"{capture['key']}: fused landmark median error noisy {np.nanmedian(err):.3f} mm, "
          f"clean {np.nanmedian(e2):.3f} mm, n = {np.isfinite(e2).sum()}")
    assert np.nanmedian(e2) <= 0.5


def test_side_view_with_too_few_landmarks_falls_back(capture):
    views = dict(capture["views"])
    pts, conf, col, lm = views["left"]
    lm = lm.copy()
    keep = np.flatnonzero(np.isfinite(lm[:, 0]) & np.isfinite(views["middle"][3][:, 0]))[:4]
    drop = np.ones(106, bool)
    drop[keep] = False
    lm[drop] = np.nan
    views["left"] = (pts, conf, col, lm)
    r = fuse_views(views, params=FusionParams(icp_on_fallback=False))
    ca = r.coarse["left"]
    assert not ca.converged and ca.status == FALLBACK and "only 4 shared landmarks" in ca.reason
    assert r.icp["left"] is None and not r.converged["left"]
    np.testing.assert_array_equal(r.transforms["left"], np.eye(4))
    assert r.qc["left_coarse_status"].startswith("fallback: stored calibration")
    assert r.coarse["right"].converged
    if capture["key"] == "default":  # the stored calibration is within ICP's capture range
        r2 = fuse_views(views)
        G = capture["gt_T"]["left"]
        assert not r2.coarse["left"].converged and r2.converged["left"]
        assert rotation_angle_deg(r2.transforms["left"][:3, :3] @ G[:3, :3].T) <= 0.05


def test_entirely_masked_side_view_is_dropped(capture):
    """A failed side view (no valid pixel): fused from the other two, flagged; an empty pivot is an error."""
    views, masks, vps = dict(capture["views"]), dict(capture["masks"]), capture["vps"]
    lm_nan = np.full((106, 3), np.nan)
    views["left"] = (np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), lm_nan)
    masks["left"] = np.zeros_like(masks["left"])
    r = fuse_views(views, viewpoints=vps, masks=masks)
    assert r.qc["left_dropped"] == 1 and r.qc["n_views_used"] == 2
    assert not r.converged["left"] and np.isnan(r.transforms["left"]).all()
    assert r.converged["right"]
    G = capture["gt_T"]["right"]
    assert rotation_angle_deg(r.transforms["right"][:3, :3] @ G[:3, :3].T) <= 0.05
    d = _dist(capture["rc"], r.points)
    assert np.sqrt(np.mean(d ** 2)) <= 0.10
    assert not np.any(r.n_views > 2)
    # landmarks: present exactly where the middle or right view lifted them
    seen = np.isfinite(capture["views"]["middle"][3][:, 0]) | np.isfinite(capture["views"]["right"][3][:, 0])
    np.testing.assert_array_equal(np.isfinite(r.landmarks[:, 0]), seen)
    # a view with a handful of points is dropped the same way
    pts, conf, col, lm = capture["views"]["right"]
    few = {**capture["views"], "right": (pts[:10], conf[:10], col[:10], lm)}
    assert fuse_views(few).qc["right_dropped"] == 1
    with pytest.raises(ValueError, match=r"views\['middle'\]: the pivot view has 0 valid points"):
        fuse_views({**capture["views"], "middle": (np.zeros((0, 3)), np.zeros(0), None, lm_nan)})


def test_input_validation(capture):
    views = dict(capture["views"])
    pts = views["left"][0].copy()
    pts[10, 1] = np.nan
    with pytest.raises(ValueError, match=r"views\['left'\].points: contains 1 NaN"):
        fuse_views({**views, "left": (pts, *views["left"][1:])})
    with pytest.raises(ValueError, match="pivot"):
        fuse_views(views, pivot="top")
    with pytest.raises(ValueError, match="confidence: expected shape"):
        fuse_views({**views, "left": (views["left"][0], views["left"][1][:-1], None, views["left"][3])})
    with pytest.raises(ValueError, match="landmarks: expected shape"):
        fuse_views({**views, "left": (*views["left"][:3], np.zeros((68, 3)))})
    with pytest.raises(ValueError, match="expected a tuple"):
        fuse_views({**views, "left": views["left"][:2]})


# -- merge --------------------------------------------------------------------------------------

def test_merge_two_offset_samplings_of_a_plane():
    g = np.arange(0, 60, 1.0)
    X, Y = np.meshgrid(g, g)
    a = np.stack([X.ravel(), Y.ravel(), np.zeros(X.size)], axis=1)
    b = a[a[:, 0] >= 30] + [0.1, 0.1, 0.0]        # overlaps half of a, 0.14 mm off
    far = np.array([[500.0, 500.0, 0.0]])          # isolated point
    ca = np.full(a.shape[0], 0.8)
    cb = np.full(b.shape[0], 0.2)
    m = merge_views([a, np.concatenate([b, far])], [ca, np.append(cb, 1.0)],
                    [np.zeros_like(a), np.ones((b.shape[0] + 1, 3))], None,
                    MergeParams(head_centre_mm=(30.0, 30.0, -100.0)))
    assert m.n_merged_groups == b.shape[0]
    assert m.points.shape[0] == a.shape[0]
    assert m.n_isolated_removed == 1
    merged = m.n_views == 2
    # confidence-weighted mean: 0.8 a + 0.2 b
    np.testing.assert_allclose(m.points[merged][:, 0] % 1.0, 0.02, atol=1e-9)
    np.testing.assert_allclose(m.colours[merged], 0.2, atol=1e-12)
    np.testing.assert_allclose(m.confidence[merged], 1 - 0.2 * 0.8)
    assert np.all(m.normals[:, 2] > 0.999)


def test_organised_normals_of_a_sphere():
    """Grid normals of an organised sphere cap against the analytic normal; invalid pixels NaN."""
    R = 80.0
    u = np.linspace(-30, 30, 121)
    X, Y = np.meshgrid(u, u)
    P = np.stack([X, Y, np.sqrt(R ** 2 - X ** 2 - Y ** 2)], axis=-1)
    valid = np.hypot(X, Y) < 28
    valid[60, 60] = False                       # a hole
    P_in = P.copy()
    n = organised_normals(P, valid, 2)
    np.testing.assert_array_equal(P, P_in)
    assert np.all(np.isnan(n[~valid])) and np.all(np.isfinite(n[valid]))
    truth = P[valid] / R
    cos = np.abs(np.einsum("ij,ij->i", n[valid], truth))
    assert np.degrees(np.arccos(np.clip(cos.min(), -1, 1))) < 2.0
    s = np.sign(np.einsum("ij,ij->i", n[valid], truth))
    assert np.all(s == s[0])                      # one consistent sign over the grid
    with pytest.raises(ValueError, match="valid: expected shape"):
        organised_normals(P, valid[:-1])


@pytest.mark.parametrize("at, small, small_at", [((0, 0), 64, (0, 0)),        # touches the top-left border
                                                  ((7, 40), 67, (3, 3)),       # inside
                                                  ((139, 179), 64, (3, 3))])   # touches the bottom-right border
def test_organised_normals_only_filter_the_valid_box(at, small, small_at):
    """Only the bounding box of the valid pixels (+ margin) is filtered: the normals are the
    same, bit for bit, as in a small image that holds the patch in the same way."""
    R = 80.0
    u = np.linspace(-30, 30, 61)
    X, Y = np.meshgrid(u, u)
    P = np.stack([X, Y, np.sqrt(R ** 2 - X ** 2 - Y ** 2)], axis=-1)
    valid = np.hypot(X, Y) < 31                     # reaches the patch's border

    def place(shape, pos):
        G = np.full(shape + (3,), 1e6)              # junk at invalid pixels must not matter
        V = np.zeros(shape, bool)
        G[pos[0]:pos[0] + 61, pos[1]:pos[1] + 61] = P
        V[pos[0]:pos[0] + 61, pos[1]:pos[1] + 61] = valid
        return G, V

    ref = organised_normals(*place((small, small), small_at), 2)
    n = organised_normals(*place((200, 240), at), 2)
    (r, c), (rs, cs) = at, small_at
    np.testing.assert_array_equal(n[r:r + 61, c:c + 61], ref[rs:rs + 61, cs:cs + 61])
    assert np.isfinite(n[r:r + 61, c:c + 61][valid]).all()
    assert np.count_nonzero(np.isfinite(n[..., 0])) == np.count_nonzero(valid)
    assert np.all(np.isnan(organised_normals(P, np.zeros_like(valid), 2)))


def test_voxel_average_weighted_means():
    pts = np.array([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.2, 0.1, 0.1]])
    w = np.array([1.0, 3.0, 0.5])
    col = np.array([[0.0, 0.0, 0.0], [np.nan, np.nan, np.nan], [1.0, 1.0, 1.0]])
    P, wm, (C,), inv = voxel_average(pts, w, 1.0, [col])
    assert P.shape == (2, 3) and inv.tolist() == [0, 0, 1]
    np.testing.assert_allclose(P[0], [0.25, 0.25, 0.25])          # (1 * 0.1 + 3 * 0.3) / 4
    np.testing.assert_allclose(wm, [2.0, 0.5])
    np.testing.assert_allclose(C, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # NaN rows ignored
    with pytest.raises(ValueError, match="voxel_mm"):
        voxel_average(pts, w, 0.0)


def test_grid_view_keeps_flag_zero_finite_pixels_in_row_major_order():
    rng = np.random.default_rng(3)
    P = rng.normal(size=(4, 5, 3)).astype(np.float32)
    C = rng.uniform(-0.2, 1.2, (4, 5)).astype(np.float32)
    F = np.zeros((4, 5), np.uint8)
    F[0, 1] = 2
    P[1, 2, 0] = np.nan
    C[3, 4] = np.inf
    col = rng.random((4, 5, 3)).astype(np.float32)
    L = np.full((106, 3), np.nan)
    (pts, conf, cols, lm), valid = grid_view(P, C, F, col, L)
    expect = np.ones((4, 5), bool)
    expect[0, 1] = expect[1, 2] = expect[3, 4] = False
    assert np.array_equal(valid, expect) and pts.dtype == np.float64 and lm is L
    assert np.array_equal(pts, P[expect].astype(np.float64)) and np.array_equal(cols, col[expect].astype(np.float64))
    assert conf.min() >= 0 and conf.max() <= 1 and np.allclose(conf, np.clip(C[expect], 0, 1))
    assert grid_view(P, C, F)[0][2] is None
    with pytest.raises(ValueError, match=r"flags: expected \(4, 5\)"):
        grid_view(P, C, F[:3])
    with pytest.raises(ValueError, match="colours"):
        grid_view(P, C, F, col[:, :4])
