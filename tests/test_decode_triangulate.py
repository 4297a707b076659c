"""Ray / projector-plane triangulation (kernels/triangulate.py) against analytic geometry."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.camera import Camera, world_to_camera
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
