"""Ray / projector-plane triangulation (kernels/triangulate.py) against analytic geometry."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.camera import (Camera, clear_caches, distort, pixel_grid, pixels_to_normalized,
                           undistorted_pixel_grid, world_to_camera)
from kernels.triangulate import point_confidence, ray_table, triangulate
from tests._fringe import Plane, Sphere, make_group, render


@pytest.mark.parametrize("distortion", [False, True])
@pytest.mark.parametrize("surface", [Plane(normal=(0.1, -0.2, 1.0)), Sphere()])
def test_exact_projector_column_gives_exact_points(distortion, surface):
    g = make_group(160, 128, distortion=distortion)
    r = render(g, surface)
    tr = triangulate(r.projector_x, g.ir, g.projector)
    ok = tr.valid
    assert ok.sum() > 0.2 * ok.size
    err = np.linalg.norm(tr.points[ok] - r.points[ok], axis=1)
    assert err.max() < 2e-3  # float32 arithmetic at ~500 mm
    assert np.all(np.isnan(tr.points[~ok]))
    assert np.all((tr.sin_angle[ok] > 0) & (tr.sin_angle[ok] <= 1))


def test_group_frame_output():
    g = make_group(120, 96)
    r = render(g, Plane())
    tr = triangulate(r.projector_x, g.ir, g.projector, frame="ir")
    ok = tr.valid
    want = world_to_camera(g.ir, r.points[ok])
    assert np.max(np.abs(tr.points[ok] - want)) < 2e-3


def test_confidence_range():
    c = point_confidence(np.array([0, 10, 50, 200, np.nan], np.float32), np.array([0.34] * 5, np.float32))
    np.testing.assert_allclose(c[:4], [0, 0.2, 1, 1], atol=1e-6)
    assert np.isnan(c[4])


def test_ray_table_is_cached_and_read_only():
    g = make_group(64, 48)
    t1 = ray_table(g.ir, g.projector)
    assert ray_table(g.ir, g.projector) is t1
    with pytest.raises(ValueError):
        t1.a[0] = 1.0


def test_undistorted_grid_is_shared_per_intrinsics_and_cleared():
    """One undistorted pixel grid per (size, K, dist), whatever the name and pose; clear_caches
    empties it and the per-calibration ray tables."""
    import kernels.texture  # noqa: F401  (registers its cache)

    g = make_group(64, 48)
    ir = g.ir
    moved = Camera("other", ir.width, ir.height, ir.K, ir.dist, g.projector.R, ir.t + 1.0)
    xn = undistorted_pixel_grid(ir)
    assert undistorted_pixel_grid(moved) is xn
    np.testing.assert_array_equal(xn, pixels_to_normalized(ir, pixel_grid(ir.width, ir.height)))
    with pytest.raises(ValueError):
        xn[0, 0] = 1.0
    other = Camera(ir.name, ir.width, ir.height, ir.K, ir.dist * 0.5, ir.R, ir.t)
    assert undistorted_pixel_grid(other) is not xn
    t1 = ray_table(ir, g.projector)
    assert clear_caches() >= 3                      # the ray table and both grids
    assert ray_table(ir, g.projector) is not t1
    assert undistorted_pixel_grid(ir) is not xn
    assert clear_caches(keep_intrinsics=True) >= 1
    xn2 = undistorted_pixel_grid(ir)
    assert clear_caches(keep_intrinsics=True) == 0 and undistorted_pixel_grid(ir) is xn2


@pytest.mark.parametrize("dist", [(-0.08, 0.10, 5e-4, -3e-4, 0.0), (0.1, -0.2, 1e-3, 2e-3, 0.05)])
def test_undistort_inverts_distort(dist):
    from kernels.camera import undistort

    xd = np.random.default_rng(0).uniform(-0.3, 0.3, (5000, 2))
    x = undistort(xd, np.array(dist))
    assert np.abs(distort(x, np.array(dist)) - xd).max() < 1e-12


def _corrupt(cam: Camera, **fields) -> Camera:
    bad = Camera(cam.name, cam.width, cam.height, cam.K, cam.dist, cam.R, cam.t)
    for k, v in fields.items():
        object.__setattr__(bad, k, v)
    return bad


def test_singular_projector_matrix_raises():
    g = make_group(64, 48)
    K = g.projector.K.copy()
    K[0, 0] = 0.0
    with pytest.raises(ValueError, match="projector"):
        triangulate(np.zeros((48, 64)), g.ir, _corrupt(g.projector, K=K))
    K = g.ir.K.copy()
    K[1, 1] = 0.0
    with pytest.raises(ValueError, match="ir"):
        triangulate(np.zeros((48, 64)), _corrupt(g.ir, K=K), g.projector)


def test_degenerate_geometry_raises():
    g = make_group(64, 48)
    # projector at the IR camera centre: every plane contains every ray
    same = g.projector.with_pose(g.ir.R, g.ir.t)
    with pytest.raises(ValueError, match="projector"):
        triangulate(np.zeros((48, 64)), g.ir, same)
    # projector straight behind the IR camera (baseline along the optical axis): the
    # IR centre lies on the plane of a column inside the projector image
    behind = g.projector.with_pose(g.ir.R, g.ir.t + np.array([0.0, 0.0, 50.0]))
    with pytest.raises(ValueError, match="projector"):
        triangulate(np.zeros((48, 64)), g.ir, behind)


def test_bad_arguments_raise():
    g = make_group(64, 48)
    with pytest.raises(ValueError, match="projector_x"):
        triangulate(np.zeros((10, 10)), g.ir, g.projector)
    with pytest.raises(ValueError, match="projector"):
        triangulate(np.zeros((48, 64)), g.ir, "not a camera")
    with pytest.raises(ValueError, match="frame"):
        triangulate(np.zeros((48, 64)), g.ir, g.projector, frame="camera")
    distorted = _corrupt(g.projector, dist=np.array([0.1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="projector"):
        triangulate(np.zeros((48, 64)), g.ir, distorted)
