"""Tests of the rig (kernels/synth/rig.py) and the scanner simulator (kernels/synth/scanner.py).

The scene is built here: a back plane (z = 0) with a dark albedo patch and a sphere in
front of it that casts a projector shadow on the plane. Images are 320 x 256 (the
default field of view); the image-model checks follow docs/image-model.md.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from kernels.camera import pixel_grid, project, world_to_camera
from kernels.synth.rig import (Group, Rig, RigParams, build_rig, group_pose_error, perturb_rig,
                               rotation_angle_deg)
from kernels.synth.scanner import (N_LANDMARKS, FringeParams, PhotometryParams, SceneMesh,
                                   pattern_radiance, render_view, scan)

W, H = 320, 256
SPHERE_C = np.array([-30.0, 0.0, 80.0])
SPHERE_R = 40.0
PATCH = (60.0, 110.0, -90.0, -40.0)  # dark patch on the plane: x0, x1, y0, y1 (mm)


def _plane(half=250.0, n=81):
    xs = np.linspace(-half, half, n)
    X, Y = np.meshgrid(xs, xs)
    V = np.stack([X.ravel(), Y.ravel(), np.zeros(X.size)], axis=1)
    i = np.arange(n - 1)
    a = (i[:, None] * n + i[None, :]).ravel()  # lower-left corner of each cell
    # counter-clockwise seen from +z (outward normal +z)
    F = np.concatenate([np.stack([a, a + 1, a + n + 1], 1), np.stack([a, a + n + 1, a + n], 1)])
    alb = np.full(len(V), 0.7, np.float32)
    x0, x1, y0, y1 = PATCH
    inside = (V[:, 0] >= x0) & (V[:, 0] <= x1) & (V[:, 1] >= y0) & (V[:, 1] <= y1)
    alb[inside] = 0.05
    return V, F, alb


def _sphere(center=SPHERE_C, radius=SPHERE_R, res=80):
    import open3d as o3d

    m = o3d.geometry.TriangleMesh.create_sphere(radius=radius, resolution=res)
    return np.asarray(m.vertices) + center, np.asarray(m.triangles).astype(np.int64)


CARD = np.array([[50.0, 50.0, 150.0], [90.0, 50.0, 150.0], [90.0, 90.0, 150.0], [50.0, 90.0, 150.0]])


def _scene(landmarks=None, card=False):
    """Plane + sphere; ``card`` adds a small square at z = 150 facing away from the cameras (-z)."""
    Vp, Fp, ap = _plane()
    Vs, Fs = _sphere()
    V = np.concatenate([Vp, Vs])
    F = np.concatenate([Fp, Fs + len(Vp)])
    alb = np.concatenate([ap, np.full(len(Vs), 0.7, np.float32)])
    if card:
        F = np.concatenate([F, len(V) + np.array([[0, 2, 1], [0, 3, 2]])])  # clockwise seen from +z
        V = np.concatenate([V, CARD])
        alb = np.concatenate([alb, np.full(4, 0.7, np.float32)])
    rgb = np.repeat(alb[:, None], 3, axis=1) * np.array([1.0, 0.8, 0.7], np.float32)
    return SceneMesh(V, F, alb, rgb, landmarks)


@pytest.fixture(scope="module")
def rig():
    return build_rig(RigParams(width=W, height=H))


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def clean(scene, rig):
    """Noise-free render of the middle view."""
    return render_view(scene, rig.group("middle"), FringeParams(), PhotometryParams().without_noise(), 0)


@pytest.fixture(scope="module")
def noisy(scene, rig):
    return render_view(scene, rig.group("middle"), FringeParams(), PhotometryParams(), 7)


def _fit(stack):
    """Per-pixel (A, B, wrapped phase) of I_n = A + B cos(phi + 2 pi n / N)."""
    I = stack.astype(np.float64)
    N = I.shape[0]
    d = 2 * np.pi * np.arange(N) / N
    c = np.tensordot(np.cos(d), I, 1)
    s = np.tensordot(np.sin(d), I, 1)
    return I.mean(0), 2.0 / N * np.hypot(c, s), np.arctan2(-s, c)


def _on_sphere(points):
    return np.abs(np.linalg.norm(points - SPHERE_C, axis=-1) - SPHERE_R) < 0.5


def _on_plane(points):
    return np.abs(points[..., 2]) < 1e-6


# -- parameters -----------------------------------------------------------------------------------

def test_fringe_params_validation():
    assert FringeParams().steps == 4 and FringeParams().frequencies == (1, 8, 64)
    with pytest.raises(ValueError, match=r"^steps: must be >= 3, got 2$"):
        FringeParams(steps=2)
    with pytest.raises(ValueError, match=r"^frequencies: must be strictly increasing, got \(1, 8, 8\)$"):
        FringeParams(frequencies=(1, 8, 8))
    with pytest.raises(ValueError, match=r"^frequencies: must be strictly increasing, got \(1, 16, 8\)$"):
        FringeParams(frequencies=(1, 16, 8))
    with pytest.raises(ValueError, match=r"^frequencies: must start at 1"):
        FringeParams(frequencies=(2, 8))
    with pytest.raises(ValueError, match=r"^frequencies: must be positive"):
        FringeParams(frequencies=(0, 1))
    with pytest.raises(ValueError, match=r"^frequencies: must be integers"):
        FringeParams(frequencies=(1, 8.5))
    with pytest.raises(ValueError, match=r"^steps: must be an integer"):
        FringeParams(steps=4.0)


def test_photometry_and_rig_params_validation():
    with pytest.raises(ValueError, match=r"^read_noise: must be >= 0"):
        PhotometryParams(read_noise=-1)
    with pytest.raises(ValueError, match=r"^projector_gamma: must be > 0"):
        PhotometryParams(projector_gamma=0)
    with pytest.raises(ValueError, match=r"^rgb_key_dir: must be a non-zero direction"):
        PhotometryParams(rgb_key_dir=(0, 0, 0))
    with pytest.raises(ValueError, match=r"^width: must be an integer >= 1"):
        RigParams(width=0)
    with pytest.raises(ValueError, match=r"^yaw_deg: must have one value per group \(3\), got 2"):
        RigParams(yaw_deg=(10.0, 0.0))
    with pytest.raises(ValueError, match=r"^reference_group: 'centre' is not one of group_names"):
        RigParams(reference_group="centre")
    with pytest.raises(ValueError, match=r"^ir_dist: expected shape \(5\)"):
        RigParams(ir_dist=(0.1, 0.0))
    with pytest.raises(ValueError, match=r"^calib_rot_deg: must be >= 0"):
        RigParams(calib_rot_deg=-0.5)
    with pytest.raises(ValueError, match=r"^group_names: 'a/b' is not a valid identifier"):
        RigParams(group_names=("a/b", "middle", "c"))


def test_scene_mesh_validation():
    V, F = _sphere(res=10)
    a = np.full(len(V), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"^faces: the mesh has no faces"):
        SceneMesh(V, np.zeros((0, 3), np.int64), a)
    bad = V.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"^vertices: contains 1 NaN or infinite"):
        SceneMesh(bad, F, a)
    F2 = F.copy()
    F2[0, 0] = len(V)
    with pytest.raises(ValueError, match=r"^faces: indices must be in \[0, "):
        SceneMesh(V, F2, a)
    with pytest.raises(ValueError, match=r"^faces: expected shape \(n, 3\), got \(10, 4\)"):
        SceneMesh(V, np.zeros((10, 4), np.int64), a)
    with pytest.raises(ValueError, match=r"^faces: must be an integer array"):
        SceneMesh(V, F.astype(float), a)
    with pytest.raises(ValueError, match=r"^vertices: expected shape \(n, 3\)"):
        SceneMesh(V[:, :2], F, a)
    with pytest.raises(ValueError, match=r"^albedo_ir: values must be in \[0, 1\]"):
        SceneMesh(V, F, a + 1.0)
    with pytest.raises(ValueError, match=r"^albedo_ir: expected shape"):
        SceneMesh(V, F, a[:-1])
    with pytest.raises(ValueError, match=r"^albedo_rgb: expected shape"):
        SceneMesh(V, F, a, np.zeros((len(V), 2)))
    lm = np.full((N_LANDMARKS, 3), np.nan)
    lm[0, :2] = 1.0  # partially NaN row
    with pytest.raises(ValueError, match=r"^landmarks: rows must be finite or entirely NaN"):
        SceneMesh(V, F, a, landmarks=lm)
    with pytest.raises(ValueError, match=r"^landmarks: expected shape \(106, 3\)"):
        SceneMesh(V, F, a, landmarks=np.zeros((68, 3)))
    s = SceneMesh(V, F, a)
    assert s.landmarks.shape == (N_LANDMARKS, 3) and np.isnan(s.landmarks).all()
    assert not s.vertices.flags.writeable and V.flags.writeable  # the caller's array is untouched


def test_render_arguments_validated(scene, rig):
    g = rig.group("middle")
    with pytest.raises(ValueError, match=r"^scene: expected a SceneMesh"):
        render_view({"vertices": 1}, g)
    with pytest.raises(ValueError, match=r"^group: expected a Group"):
        render_view(scene, rig)
    with pytest.raises(ValueError, match=r"^fringe: expected FringeParams"):
        render_view(scene, g, fringe=(4, (1, 8)))
    with pytest.raises(ValueError, match=r"^photometry: expected PhotometryParams"):
        render_view(scene, g, photometry={})
    with pytest.raises(ValueError, match=r"^rig: expected a Rig"):
        scan(scene, g)
    with pytest.raises(ValueError, match=r"^nthreads: must be an integer >= 0"):
        scan(scene, rig, nthreads=-1)


# -- rig --------------------------------------------------------------------------------------------

def test_rig_geometry():
    p = RigParams()
    rig = build_rig(p)
    assert rig.names == ("left", "middle", "right")
    mid, left, right = rig.group("middle"), rig.group("left"), rig.group("right")
    # positive yaw = +x = the subject's left
    assert left.ir.center[0] > 300 and right.ir.center[0] < -300
    for g, yaw in zip(rig.groups, p.yaw_deg):
        ir, pj, rgb = g.cameras()
        assert np.linalg.norm(ir.center - pj.center) == pytest.approx(180.0)
        assert not pj.has_distortion and ir.has_distortion and rgb.has_distortion
        assert (pj.width, pj.height) == (1280, 800) and (ir.width, ir.height) == (1280, 1024)
        mid_c = 0.5 * (ir.center + pj.center)
        assert rgb.center[1] - mid_c[1] == pytest.approx(60.0)
        assert ir.center[1] == pytest.approx(0.0) and pj.center[1] == pytest.approx(0.0)
        # the baseline runs along the projector's x axis (vertical stripes triangulate)
        b = world_to_camera(pj, ir.center[None])[0]
        assert abs(b[1]) < 1e-9 and abs(b[0]) > 170
        # about 0.2 mm per pixel at 500 mm, and the field covers 260 x 200 mm
        assert 500.0 / ir.K[0, 0] == pytest.approx(0.2, abs=0.015)
        assert ir.width * 500 / ir.K[0, 0] >= 260 and ir.height * 500 / ir.K[1, 1] >= 200
        assert pj.height * 500 / pj.K[1, 1] >= 240
        # all three devices look at the same aim point, 500 mm in front of the group centre
        az = math.radians(yaw)
        aim_dir = np.array([math.sin(az), 0.0, math.cos(az)])
        for cam in g.cameras():
            ax = cam.R[2]  # optical axis in world
            assert np.dot(ax, -aim_dir) > 0.98
    # the middle group looks at about (0, 0, +100)
    pix, _ = project(mid.ir, np.array([[0.0, 0.0, 100.0]]))
    assert np.allclose(pix[0], [(1280 - 1) / 2, (1024 - 1) / 2], atol=1e-6)
    small = build_rig(RigParams(width=W, height=H))
    assert small.group("middle").ir.K[0, 0] == pytest.approx(mid.ir.K[0, 0] * W / 1280)


def test_rig_dict_roundtrip():
    rig = build_rig(RigParams(width=W, height=H))
    d = json.loads(json.dumps(rig.to_dict()))
    back = Rig.from_dict(d)
    assert back.to_dict() == rig.to_dict()
    with pytest.raises(ValueError):
        Rig.from_dict({"groups": []})
    with pytest.raises(ValueError, match=r"misses field"):
        Group.from_dict({"name": "left"})
    with pytest.raises(ValueError, match=r"^name: no group 'top'"):
        rig.group("top")
    with pytest.raises(ValueError, match=r"^params.reference_group: 'middle' is not a group of the rig"):
        perturb_rig(Rig((rig.group("left"),)), RigParams(), 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 12345])
def test_perturb_rig_exact_error(seed):
    p = RigParams(width=W, height=H)
    true = build_rig(p)
    stored = perturb_rig(true, p, seed)
    for g in true.groups:
        s = stored.group(g.name)
        rot, trans = group_pose_error(g, s)
        if g.name == "middle":
            assert (rot, trans) == (0.0, 0.0)
            for a, b in zip(g.cameras(), s.cameras()):
                assert np.array_equal(a.R, b.R) and np.array_equal(a.t, b.t)
            continue
        assert rot == pytest.approx(0.5, abs=1e-9)
        assert trans == pytest.approx(1.0, abs=1e-9)
        # the intra-group calibration is exact (rigid unit) and intrinsics are untouched
        for a, b in zip(g.cameras()[1:], s.cameras()[1:]):
            assert rotation_angle_deg((b.R @ s.ir.R.T) @ (a.R @ g.ir.R.T).T) < 1e-9
            rel_true = g.ir.R @ (a.center - g.ir.center)
            rel_stored = s.ir.R @ (b.center - s.ir.center)
            assert np.allclose(rel_true, rel_stored, atol=1e-9)
        for a, b in zip(g.cameras(), s.cameras()):
            assert np.array_equal(a.K, b.K) and np.array_equal(a.dist, b.dist)
            assert rotation_angle_deg(b.R @ a.R.T) == pytest.approx(0.5, abs=1e-9)
    again = perturb_rig(true, p, seed)
    assert again.to_dict() == stored.to_dict()
    assert perturb_rig(true, p, seed + 1).to_dict() != stored.to_dict()
    zero = perturb_rig(true, RigParams(width=W, height=H, calib_rot_deg=0, calib_trans_mm=0), seed)
    assert all(group_pose_error(a, b) == pytest.approx((0.0, 0.0), abs=1e-9)
               for a, b in zip(true.groups, zero.groups))


# -- image model ----------------------------------------------------------------------------------

def test_ground_truth_geometry(clean, rig):
    g = rig.group("middle")
    gt = clean.gt
    assert gt.hit.all()  # the plane fills the image
    pts = gt.points[gt.hit]
    assert (_on_plane(pts) | _on_sphere(pts)).all()
    assert np.abs(pts[_on_plane(pts)][:, 2]).max() < 1e-9  # float64-refined hits
    # every GT point lies on its pixel's (distorted) ray
    px, z = project(g.ir, gt.points.reshape(-1, 3))
    assert np.abs(px - pixel_grid(W, H)).max() < 1e-6
    assert np.allclose(z.reshape(H, W), gt.depth, rtol=1e-6)
    xp, _ = project(g.projector, gt.points.reshape(-1, 3))
    assert np.allclose(xp[:, 0].reshape(H, W), gt.projector_x, atol=1e-6)
    assert np.isfinite(gt.rgb_depth).all() and gt.rgb_depth.shape == (H, W)
    assert clean.rgb.shape == (H, W, 3) and clean.rgb.dtype == np.uint8
    assert clean.fringe.shape == (3, 4, H, W) and clean.fringe.dtype == np.uint8
    assert not clean.fringe.flags.writeable and not gt.points.flags.writeable


def test_fringe_follows_image_model(clean, rig):
    """I = rho (A_amb + E e_{f,n}(x_p)) exactly (up to rounding), and ~A + B cos(phi + 2 pi n/N)."""
    gt = clean.gt
    ph = PhotometryParams()
    fp = FringeParams()
    Wp = rig.group("middle").projector.width
    lit = gt.lit
    assert lit.mean() > 0.5
    rho, B, xp = gt.albedo[lit].astype(np.float64), gt.modulation[lit].astype(np.float64), gt.projector_x[lit]
    assert B.max() < 127  # no saturation in this scene
    A = rho * ph.ambient + B
    worst_exact = worst_sine = 0.0
    n_off = n_total = 0
    for i, f in enumerate(fp.frequencies):
        phi = 2 * np.pi * f * (xp + 0.5) / Wp
        for n in range(fp.steps):
            I = clean.fringe[i, n][lit].astype(np.float64)
            theta = phi + 2 * np.pi * n / fp.steps
            exact = rho * ph.ambient + 2 * B * pattern_radiance(theta, ph.projector_gamma)
            dev = np.abs(I - exact)
            n_off += int(np.count_nonzero(dev > 0.5 + 1e-3))  # float rounding at a pattern code step
            n_total += dev.size
            worst_exact = max(worst_exact, dev.max())
            sine = A + B * np.cos(theta)
            # 0.5 for the 8-bit image, 2 B max|e - p| (<= 0.0043 * 2B) for the 8-bit pattern
            worst_sine = max(worst_sine, np.max(np.abs(I - sine) - 0.5 - 0.0087 * B))
    assert n_off <= 1e-4 * n_total and worst_exact <= 0.5 + 0.0087 * B.max()
    assert worst_sine <= 1e-3
    # pixels without fringe signal carry exactly round(rho * A_amb)
    unlit = gt.hit & ~gt.lit
    for i in range(fp.levels):
        for n in range(fp.steps):
            I = clean.fringe[i, n][unlit].astype(np.float64)
            assert np.abs(I - gt.albedo[unlit] * ph.ambient).max() <= 0.5 + 1e-3


def test_wrapped_phase_matches_projector_coordinate(clean, noisy, rig):
    Wp = rig.group("middle").projector.width
    gt = clean.gt
    ok = gt.lit & (gt.modulation > 40)
    phi = 2 * np.pi * 64 * (gt.projector_x + 0.5) / Wp
    _, B, wrapped = _fit(clean.fringe[2])
    err = np.angle(np.exp(1j * (wrapped - phi)))[ok]
    assert np.abs(err).max() < 0.03  # 8-bit quantisation only
    assert np.abs(B - gt.modulation)[ok].max() < 1.5
    # with noise, the phase error is sigma_I / (B sqrt(N/2)) with sigma_I^2 = read^2 + k A
    ph = PhotometryParams()
    A, B, wrapped = _fit(noisy.fringe[2])
    err = np.angle(np.exp(1j * (wrapped - phi)))[ok]
    sigma = np.sqrt(ph.read_noise**2 + ph.shot_noise_k * A[ok] + 1 / 12) / (gt.modulation[ok] * np.sqrt(2))
    z = err / sigma
    assert np.std(z) == pytest.approx(1.0, abs=0.08) and abs(np.mean(z)) < 0.05
    assert np.abs(z).max() < 6.5


def test_modulation_matches_geometry(clean, rig):
    """B = rho P max(0, n.l) (d0/|X - C_p|)^2 / 2 with the analytic normals of the scene."""
    g = rig.group("middle")
    gt = clean.gt
    X = gt.points[gt.lit]
    B = gt.modulation[gt.lit].astype(np.float64)
    rho = gt.albedo[gt.lit].astype(np.float64)
    sph = _on_sphere(X)
    nrm = np.where(sph[:, None], (X - SPHERE_C) / SPHERE_R, [0.0, 0.0, 1.0])
    to_p = g.projector.center - X
    d = np.linalg.norm(to_p, axis=1)
    expect = rho * PhotometryParams().projector_peak * np.einsum("ij,ij->i", nrm, to_p / d[:, None]) * (500.0 / d) ** 2 / 2
    rel = np.abs(B - expect) / np.maximum(expect, 1.0)
    assert rel[~sph].max() < 1e-5  # flat plane: exact
    assert np.median(rel[sph]) < 0.01 and np.abs(B - expect)[sph].max() < 2.0  # interpolated normals


def test_projector_shadow_has_low_modulation(clean, noisy):
    gt = clean.gt
    shadow = gt.hit & ~gt.lit & _on_plane(gt.points)
    assert shadow.sum() > 100  # the sphere shadows part of the plane seen by the IR camera
    assert (gt.modulation[shadow] == 0).all()
    # the shadow is where the projector ray towards the plane passes through the sphere
    X = gt.points[shadow]
    Cp = build_rig(RigParams(width=W, height=H)).group("middle").projector.center
    u = (X - Cp) / np.linalg.norm(X - Cp, axis=1, keepdims=True)
    miss = np.linalg.norm(np.cross(SPHERE_C - Cp, u), axis=1)
    assert (miss < SPHERE_R + 1.0).all()
    _, B_clean, _ = _fit(clean.fringe[2])
    assert B_clean[shadow].max() < 1.0
    _, B_noisy, _ = _fit(noisy.fringe[2])
    assert np.mean(B_noisy[shadow]) < 3.0 and np.quantile(B_noisy[shadow], 0.9) < 5.0
    bright = gt.lit & _on_plane(gt.points) & (gt.albedo > 0.69)
    assert np.median(B_noisy[bright]) > 50


def test_dark_patch_has_low_modulation(clean, noisy):
    gt = clean.gt
    x0, x1, y0, y1 = PATCH
    X = gt.points
    inner = (gt.lit & _on_plane(X) & (X[..., 0] > x0 + 8) & (X[..., 0] < x1 - 8)
             & (X[..., 1] > y0 + 8) & (X[..., 1] < y1 - 8))
    assert inner.sum() > 100
    assert np.allclose(gt.albedo[inner], 0.05)
    assert gt.modulation[inner].max() < 0.05 * PhotometryParams().projector_peak / 2 * 1.3
    _, B, _ = _fit(noisy.fringe[2])
    assert np.median(B[inner]) < 8.0


def test_noise_model(clean, noisy):
    """Residuals noisy - clean follow sqrt(read^2 + k I) (+ rounding)."""
    gt = clean.gt
    ph = PhotometryParams()
    res = noisy.fringe.astype(np.float64) - clean.fringe.astype(np.float64)
    I = clean.fringe.astype(np.float64)
    valid = (I > 2) & (I < 240)  # away from clipping
    for lo, hi in ((20, 40), (60, 90), (100, 140)):
        sel = valid & (I >= lo) & (I < hi)
        assert sel.sum() > 2000
        expect = np.sqrt(ph.read_noise**2 + ph.shot_noise_k * I[sel] + 2 / 12)  # two roundings
        assert np.std(res[sel]) == pytest.approx(np.sqrt(np.mean(expect**2)), rel=0.06)
        assert abs(np.mean(res[sel])) < 0.1


def test_background_is_black_noise():
    rig = build_rig(RigParams(width=W, height=H))
    Vs, Fs = _sphere(center=(0.0, 0.0, 60.0))
    scene = SceneMesh(Vs, Fs, np.full(len(Vs), 0.7, np.float32))
    v = render_view(scene, rig.group("middle"), rng=3)
    bg = ~v.gt.hit
    assert bg.sum() > 1000 and v.gt.hit.sum() > 1000
    assert np.isnan(v.gt.points[bg]).all() and np.isnan(v.gt.depth[bg]).all()
    assert np.isnan(v.gt.projector_x[bg]).all() and np.isnan(v.gt.albedo[bg]).all()
    assert (v.gt.modulation[bg] == 0).all() and not v.gt.lit[bg].any()
    I = v.fringe[:, :, bg].astype(np.float64)
    # clip(round(2 z), 0, 255): mean of the rectified noise, ~0.84 grey levels
    assert 0.6 < I.mean() < 1.1 and I.max() < 12
    assert np.isnan(v.gt.rgb_depth).any() and np.isfinite(v.gt.rgb_depth).any()


# -- determinism ------------------------------------------------------------------------------------

def _arrays(v):
    gt = v.gt
    return [v.fringe, v.rgb, v.landmarks_px, v.landmark_visible] + [
        getattr(gt, k) for k in ("hit", "points", "depth", "projector_x", "lit", "albedo", "modulation",
                                 "rgb_depth")]


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_determinism_and_view_independence(rig):
    lm = np.full((N_LANDMARKS, 3), np.nan)
    lm[0] = SPHERE_C + [0.0, 0.0, SPHERE_R]
    scene = _scene(lm)
    a = scan(scene, rig, rng=11)
    b = scan(scene, rig, rng=11)
    assert list(a) == ["left", "middle", "right"]
    for k in a:
        assert all(_same(x, y) for x, y in zip(_arrays(a[k]), _arrays(b[k])))
    c = scan(scene, rig, rng=12)
    for k in a:
        assert not _same(a[k].fringe, c[k].fringe) and not _same(a[k].rgb, c[k].rgb)
        assert all(_same(x, y) for x, y in zip(_arrays(a[k])[4:], _arrays(c[k])[4:]))  # GT unchanged
        assert a[k].landmark_visible[0] == c[k].landmark_visible[0]
    # a view depends on the seed and its name only, not on the other groups or their order
    sub = scan(scene, Rig((rig.group("right"), rig.group("middle"))), rng=11)
    for k in sub:
        assert all(_same(x, y) for x, y in zip(_arrays(a[k]), _arrays(sub[k])))
    # the views of one scan carry independent noise
    assert not _same(a["left"].fringe, a["right"].fringe)
    # the number of ray-casting threads does not change a bit
    one = scan(scene, Rig((rig.group("left"),)), rng=11, nthreads=1)
    assert all(_same(x, y) for x, y in zip(_arrays(a["left"]), _arrays(one["left"])))
    # a standalone render with the view's derived generator equals the scan's view
    from kernels.synth.seeding import derive_rng

    alone = render_view(scene, rig.group("middle"), rng=derive_rng(11, "view", "middle"))
    assert all(_same(x, y) for x, y in zip(_arrays(a["middle"]), _arrays(alone)))


# -- landmarks ----------------------------------------------------------------------------------

def _landmark_scene(rig):
    g = rig.group("middle")
    Crgb = g.rgb.center
    lm = np.full((N_LANDMARKS, 3), np.nan)
    rng = np.random.default_rng(5)
    # 20 points on the sphere cap facing the RGB camera (on the analytic sphere, < 0.1 mm off the mesh)
    towards = (Crgb - SPHERE_C) / np.linalg.norm(Crgb - SPHERE_C)
    k = 0
    while k < 20:
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        if np.dot(v, towards) > 0.6:
            lm[k] = SPHERE_C + SPHERE_R * v
            k += 1
    # 10 points on the plane, clear of the sphere and the card
    lm[20:30] = np.c_[rng.uniform(40, 100, 10), rng.uniform(-100, 20, 10), np.zeros(10)]
    # 5 points on the plane hidden behind the sphere from the RGB camera
    for j in range(5):
        off = np.array([(-1) ** j * 3.0 * j, 2.0 * j, 0.0])
        d = SPHERE_C + off - Crgb
        lm[30 + j] = Crgb + d * (-Crgb[2] / d[2])
    # 2 points on the back of the sphere (behind its front surface)
    back = np.array([-towards, [0.3, 0.0, -0.954], [-0.3, 0.1, -0.949]])[1:]
    lm[35:37] = SPHERE_C + SPHERE_R * back / np.linalg.norm(back, axis=1, keepdims=True)
    # 1 point on the card, first hit of its ray but facing away from the camera
    lm[37] = CARD.mean(axis=0)
    # 1 point on the plane outside the RGB image
    lm[38] = [240.0, 240.0, 0.0]
    # 1 point floating 5 mm in front of the plane (not on the surface -> invisible)
    lm[39] = [80.0, 0.0, 5.0]
    return lm


def test_landmarks_visibility_and_noise(rig):
    g = rig.group("middle")
    lm = _landmark_scene(rig)
    scene = _scene(lm, card=True)
    clean = render_view(scene, g, photometry=PhotometryParams().without_noise(), rng=1)
    noisy = render_view(scene, g, rng=2)
    for v in (clean, noisy):
        vis = v.landmark_visible
        assert vis[:30].all()
        assert not vis[30:].any()  # occluded, back-facing, off-image, off-surface, unknown
        assert np.isnan(v.landmarks_px[~vis]).all() and np.isfinite(v.landmarks_px[vis]).all()
    truth, _ = project(g.rgb, lm[:30])
    assert np.abs(clean.landmarks_px[:30] - truth).max() < 1e-9
    err = np.linalg.norm(noisy.landmarks_px[:30] - truth, axis=1)
    assert err.max() < 4.0 and 0.5 < np.sqrt(np.mean(err**2) / 2) < 1.6  # sigma ~1 px per axis
    # the hidden points do project inside the image: they are flagged, not dropped for leaving it
    px, _ = project(g.rgb, lm[30:35])
    assert ((px >= 0) & (px <= [W - 1, H - 1])).all()


# -- a real face, when the face model is present -------------------------------------------------------

def _face_api():
    if importlib.util.find_spec("kernels.synth.face") is None:
        return None
    from kernels.synth import face

    return face if hasattr(face, "sample_subject") and hasattr(face, "face_mesh") else None


@pytest.mark.skipif(_face_api() is None, reason="face model (kernels.synth.face) not present")
def test_scan_real_face_covers_each_side():
    face = _face_api()
    fm = face.face_mesh(face.sample_subject("S0002", 5), "neutral", n_vertices=20000)
    scene = SceneMesh(fm.vertices, fm.faces, fm.albedo_ir, fm.albedo_rgb, fm.landmarks)
    rig = build_rig(RigParams(width=W, height=H))
    views = scan(scene, rig, rng=4)
    V = fm.vertices
    on_face = np.asarray(fm.parts) > 0
    union = np.zeros(len(V), bool)
    for name, own_side in (("left", V[:, 0] > 15), ("middle", np.abs(V[:, 0]) < 40), ("right", V[:, 0] < -15)):
        g, v = rig.group(name), views[name]
        # a vertex is seen when its depth matches the GT depth at its pixel
        px, z = project(g.ir, V)
        ij = np.rint(px).astype(int)
        inside = (ij[:, 0] >= 0) & (ij[:, 0] < W) & (ij[:, 1] >= 0) & (ij[:, 1] < H)
        seen = np.zeros(len(V), bool)
        seen[inside] = np.abs(v.gt.depth[ij[inside, 1], ij[inside, 0]] - z[inside]) < 1.5
        lit = seen.copy()
        lit[inside] &= v.gt.lit[ij[inside, 1], ij[inside, 0]]
        union |= lit
        assert lit[on_face & own_side].mean() > 0.95, name
        assert 0.3 < v.gt.hit.mean() < 0.8
        # landmarks: the visible ones sit on their GT projection (+ ~1 px annotator noise)
        vis = v.landmark_visible
        assert vis.sum() > 55
        truth, _ = project(g.rgb, fm.landmarks[vis])
        err = np.linalg.norm(v.landmarks_px[vis] - truth, axis=1)
        assert err.max() < 4.5 and np.sqrt(np.mean(err**2) / 2) < 1.5
        assert np.isnan(v.landmarks_px[~vis]).all()
    # the subject's right contour end (0) is hidden from the left group and the left end (32)
    # from the right group; each side group sees its own end
    assert not views["left"].landmark_visible[0] and views["left"].landmark_visible[32]
    assert not views["right"].landmark_visible[32] and views["right"].landmark_visible[0]
    assert union[on_face].mean() > 0.99  # together the groups cover the face
