"""Per-view products on analytic scenes: grid mesh, RGB projection, depth image, texture, landmarks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kernels.camera import pixel_grid, pixel_rays, project
from kernels.depth import DepthParams, depth_image
from kernels.gridmesh import GridMeshParams, grid_mesh, neighbour_links
from kernels.landmarks import N_LANDMARKS, LandmarkStatus, lift_landmarks
from kernels.texture import project_to_rgb, sample_bilinear_rgb, texture_map, visibility
from kernels.triangulate import triangulate
from tests._fringe import Plane, Sphere, make_group, render

W, H = 160, 128


@pytest.fixture(scope="module")
def plane_view():
    """Exact organised cloud of a tilted plane (no decoding noise) and its RGB projection."""
    g = make_group(W, H, distortion=True)
    surf = Plane(normal=(0.2, -0.1, 1.0))
    r = render(g, surf)
    tr = triangulate(r.projector_x, g.ir, g.projector)
    depth = np.where(tr.valid, (tr.points @ g.ir.R.T + g.ir.t)[..., 2], np.nan).astype(np.float32)
    return g, surf, tr, depth, project_to_rgb(depth, g.ir, g.rgb)


def _rgb_gt_depth(g, surf):
    o, d = pixel_rays(g.rgb, pixel_grid(g.rgb.width, g.rgb.height))
    t, _ = surf.intersect(o, d)
    X = o + t[:, None] * d
    return ((X @ g.rgb.R.T + g.rgb.t)[:, 2]).reshape(g.rgb.height, g.rgb.width), X


def test_projection_matches_camera_project(plane_view):
    g, _, tr, _, pr = plane_view
    v = tr.valid
    px, z = project(g.rgb, tr.points[v].astype(np.float64))
    assert np.max(np.abs(pr.x[v] - px[:, 0])) < 2e-3
    assert np.max(np.abs(pr.y[v] - px[:, 1])) < 2e-3
    assert np.max(np.abs(pr.z[v] - z)) < 2e-3
    assert np.all(np.isnan(pr.x[~v]))


def test_depth_image_of_plane_is_exact_and_hole_free(plane_view):
    g, surf, _, depth, pr = plane_view
    D = depth_image(pr, depth, float(g.ir.K[0, 0]))
    G, _ = _rgb_gt_depth(g, surf)
    both = np.isfinite(D)
    assert np.max(np.abs(D[both] - G[both])) < 0.01
    # no pinholes inside the covered area (rows/columns between covered pixels)
    from scipy import ndimage
    filled = ndimage.binary_fill_holes(both)
    inner = ndimage.binary_erosion(filled, iterations=2)
    assert np.all(both[inner])
    assert both.sum() > 0.5 * both.size


def test_texture_samples_the_rgb_image(plane_view):
    g, surf, tr, depth, pr = plane_view
    D = depth_image(pr, depth, float(g.ir.K[0, 0]))
    # an RGB image that is a smooth function of the pixel position
    yy, xx = np.mgrid[0:g.rgb.height, 0:g.rgb.width]
    img = np.stack([xx * 1.5, yy * 1.9, 40 + 0 * xx], axis=-1).clip(0, 255).astype(np.uint8)
    tex = texture_map(pr, img, D)
    v = tex.visible
    inside = (pr.x >= -0.5) & (pr.x <= g.rgb.width - 0.5) & (pr.y >= -0.5) & (pr.y <= g.rgb.height - 0.5)
    assert not np.any(v & ~inside)
    assert v.sum() > 0.97 * (tr.valid & inside).sum()
    want_r = np.clip(pr.x[v] * 1.5, 0, 255) / 255
    assert np.max(np.abs(tex.colors[v][:, 0] - want_r)) < 1.5 / 255
    assert np.all(np.isnan(tex.colors[~v]))
    # bilinear sampling at pixel centres returns the pixel
    c = sample_bilinear_rgb(img, np.array([3.0, 10.0]), np.array([4.0, 20.0]))
    np.testing.assert_allclose(c * 255, img[[4, 20], [3, 10]].astype(np.float32), atol=1e-3)
    assert np.all(np.isnan(sample_bilinear_rgb(img, np.array([-1.0]), np.array([5.0]))))


def test_occluded_points_get_no_colour():
    """A sphere in front of a plane: plane points hidden from the RGB camera get NaN."""
    g = make_group(W, H, distortion=False)

    class Scene:
        def intersect(self, o, d):
            t1, n1 = Plane(point=(0, 0, -80)).intersect(o, d)
            t2, n2 = Sphere(center=(-25.0, 0.0, 10.0), radius=30.0).intersect(o, d)
            use2 = np.isfinite(t2) & ~(t2 > t1)
            return np.where(use2, t2, t1), np.where(use2[:, None], n2, n1)

    s = Scene()
    r = render(g, s)
    tr = triangulate(r.projector_x, g.ir, g.projector)
    depth = np.where(tr.valid, (tr.points @ g.ir.R.T + g.ir.t)[..., 2], np.nan).astype(np.float32)
    pr = project_to_rgb(depth, g.ir, g.rgb)
    D = depth_image(pr, depth, float(g.ir.K[0, 0]))
    vis = visibility(pr, D)
    # GT: a point is hidden when the RGB ray to it hits something nearer; judged only
    # more than 2 px away from the occluder's silhouette in the RGB image
    v = tr.valid
    P = tr.points[v].astype(np.float64)
    C = g.rgb.center
    dirs = P - C
    dist = np.linalg.norm(dirs, axis=1)
    t, _ = s.intersect(C, dirs / dist[:, None])
    hidden = t < dist - 1.0
    o, d = pixel_rays(g.rgb, pixel_grid(g.rgb.width, g.rgb.height))
    tg, _ = Sphere(center=(-25.0, 0.0, 10.0), radius=30.0).intersect(o, d)
    from scipy import ndimage
    sph = np.isfinite(tg).reshape(g.rgb.height, g.rgb.width)
    rim = ndimage.binary_dilation(sph, iterations=2) & ~ndimage.binary_erosion(sph, iterations=2)
    px, _ = project(g.rgb, P)
    ci = np.clip(np.rint(px).astype(int), 0, [g.rgb.width - 1, g.rgb.height - 1])
    far = ~rim[ci[:, 1], ci[:, 0]]
    far &= (px[:, 0] >= 0) & (px[:, 0] <= g.rgb.width - 1) & (px[:, 1] >= 0) & (px[:, 1] <= g.rgb.height - 1)
    assert (hidden & far).sum() > 50
    assert not np.any(vis[v][hidden & far])
    assert vis[v][~hidden & far].mean() > 0.97


def test_grid_mesh_cuts_discontinuities_and_drops_speckles():
    Hm, Wm = 40, 60
    z = np.full((Hm, Wm), 500.0, np.float32)
    z[:, 30:] = 560.0                      # a 60 mm step: two components
    z[5:7, 5:7] = 700.0                    # a 2x2 speckle far behind: dropped
    pts = np.stack(np.meshgrid(np.arange(Wm), np.arange(Hm)), -1).astype(np.float32)
    pts = np.concatenate([pts, z[..., None]], -1)
    m = grid_mesh(pts, z, 1000.0, GridMeshParams(max_step_px=6.0, min_component=10))
    assert m.n_components == 2
    assert m.vertices.shape[0] == Hm * Wm - 4
    assert np.all(m.vertex_map[5:7, 5:7] == -1)
    side = pts[..., 0].reshape(-1)[m.pixel] >= 30
    f_side = side[m.faces]
    assert np.all(f_side.all(axis=1) | (~f_side).all(axis=1))  # no triangle across the step
    right, down, _, _ = neighbour_links(z, 1000.0, 6.0)
    assert not right[:, 29].any() and right[:, 28].all()
    with pytest.raises(ValueError, match="points"):
        grid_mesh(z, z, 1000.0)


def test_landmarks_analytic(plane_view):
    g, surf, tr, depth, pr = plane_view
    D = depth_image(pr, depth, float(g.ir.K[0, 0]))
    vis = visibility(pr, D)
    # landmarks: points of the plane seen by both cameras, projected exactly
    G, X = _rgb_gt_depth(g, surf)
    rng = np.random.default_rng(0)
    cols = np.arange(D.size) % D.shape[1]
    pick = rng.choice(np.flatnonzero(np.isfinite(D).reshape(-1) & (cols > 30)), N_LANDMARKS, replace=False)
    L3 = X[pick]
    L2, _ = project(g.rgb, L3)
    lv = np.ones(N_LANDMARKS, bool)
    lv[:3] = False                     # flagged invisible
    L2[3] = np.nan                     # not annotated
    L2[4] = (-20.0, 10.0)              # outside the image
    L2[5] = (10.0, 60.0)               # in the image, but no visible point near it (see below)
    vis = vis & (pr.x > 20)
    ll = lift_landmarks(L2, pr, tr.points, depth, float(g.ir.K[0, 0]), visible=vis, landmark_visible=lv)
    assert ll.points.shape == (N_LANDMARKS, 3) and ll.status.dtype == np.uint8
    assert np.all(ll.status[:4] == LandmarkStatus.NOT_ANNOTATED)
    assert ll.status[4] == LandmarkStatus.OUT_OF_IMAGE
    assert ll.status[5] == LandmarkStatus.NO_POINT_WITHIN_RADIUS
    assert np.all(np.isnan(ll.points[:6]))
    ok = ll.status == LandmarkStatus.OK
    assert ok.sum() >= N_LANDMARKS - 10
    err = np.linalg.norm(ll.points[ok] - L3[ok], axis=1)
    assert np.median(err) < 0.01 and ll.refined[ok].mean() > 0.9


def test_landmarks_bad_input(plane_view):
    g, _, tr, depth, pr = plane_view
    args = (pr, tr.points, depth, float(g.ir.K[0, 0]))
    with pytest.raises(ValueError, match="landmarks_px"):
        lift_landmarks(np.zeros((68, 2)), *args)
    with pytest.raises(ValueError, match="landmarks_px"):
        lift_landmarks(np.zeros((106, 3)), *args)
    with pytest.raises(ValueError, match="landmarks_px"):
        lift_landmarks(np.array([["a", "b"]] * 106), *args)
    with pytest.raises(ValueError, match="landmark_visible"):
        lift_landmarks(np.zeros((106, 2)), *args, landmark_visible=np.ones(106, np.uint8))
    with pytest.raises(ValueError, match="points"):
        lift_landmarks(np.zeros((106, 2)), pr, tr.points[:10], depth, 100.0)


def test_depth_and_texture_bad_input(plane_view):
    g, _, _, depth, pr = plane_view
    with pytest.raises(ValueError, match="ir_depth"):
        depth_image(pr, depth[:10], 100.0)
    with pytest.raises(ValueError, match="cell_slack"):
        DepthParams(cell_slack=2.0)
    with pytest.raises(ValueError, match="depth"):
        project_to_rgb(depth[:10], g.ir, g.rgb)
    D = depth_image(pr, depth, float(g.ir.K[0, 0]))
    with pytest.raises(ValueError, match="rgb_image"):
        texture_map(pr, np.zeros((H, W, 3), np.uint16), D)
    with pytest.raises(ValueError, match="rgb_image"):
        texture_map(pr, np.zeros((H, W), np.uint8), D)
    with pytest.raises(ValueError, match="rgb_depth"):
        texture_map(pr, np.zeros((H, W, 3), np.uint8), D[:5])


# -- fused (numba) paths against the numpy reference paths: bit-identical ------------------------

def test_numba_products_match_numpy():
    pytest.importorskip("numba")
    from kernels.decode import decode_view
    from tests._fringe import Photometry

    g = make_group(W, H, distortion=True)
    r = render(g, Sphere(), (1, 8, 64), 4, photometry=Photometry(sigma_read=2.0), rng=21)
    dv = decode_view(r.stack, g.ir, g.projector, (1, 8, 64), 4)
    fx = float(g.ir.K[0, 0])
    res = {}
    for eng in ("numpy", "numba"):
        pr = project_to_rgb(dv.depth, g.ir, g.rgb, engine=eng)
        D = depth_image(pr, dv.depth, fx, engine=eng)
        vis = visibility(pr, D, engine=eng)
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (g.rgb.height, g.rgb.width, 3), dtype=np.uint8)
        tex = texture_map(pr, img, D, visible=vis, engine=eng)
        lm_px = np.full((N_LANDMARKS, 2), np.nan)
        lm_px[:40] = np.stack([pr.x[np.isfinite(pr.x)][::97][:40], pr.y[np.isfinite(pr.x)][::97][:40]], 1) + 0.3
        ll = lift_landmarks(lm_px, pr, dv.points, dv.depth, fx, visible=vis, engine=eng)
        res[eng] = (pr.x, pr.y, pr.z, D, vis, tex.colors, ll.points, ll.status)
    assert np.isfinite(res["numpy"][3]).sum() > 1000 and (res["numpy"][7] == 0).sum() > 30
    for a, b in zip(res["numpy"], res["numba"]):
        assert np.array_equal(a, b, equal_nan=True)
