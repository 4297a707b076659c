"""kernels.meshing: round trip against the exact synthetic face surface.

Points are sampled on the analytic surface of a synthetic subject (``surface_points``)
over the inner face region, with Gaussian noise (0.04 mm) and no points at the eyes and
inside the mouth; the mesh is compared with the exact ground-truth mesh.
"""

import numpy as np
import open3d as o3d
import pytest
from scipy.spatial import cKDTree

from kernels.meshing import MeshingParams, MeshResult, mesh_point_cloud, mesh_quality
from kernels.synth.face import face_mesh, face_region, landmark_uv, sample_subject, surface_points

N_POINTS = 60_000
TARGET = 10_000
EYE_HOLE_MM = 7.0


def _cloud(n_points, seed=1, noise=0.04):
    """Noisy points + exact normals on the face region, with eye and mouth holes."""
    rng = np.random.default_rng(seed)
    subj = sample_subject("s0", rng)
    uv = np.empty((0, 2))
    while len(uv) < 2 * n_points:
        c = np.column_stack([rng.uniform(-1.3, 1.3, 4 * n_points), rng.uniform(-1.2, 1.0, 4 * n_points)])
        uv = np.vstack([uv, c[face_region(c)]])
    P = surface_points(subj, "neutral", uv)
    lm = landmark_uv()
    keep = np.ones(len(P), bool)
    for c in surface_points(subj, "neutral", lm[[104, 105]]):       # pupils
        keep &= np.linalg.norm(P - c, axis=1) > EYE_HOLE_MM
    m = surface_points(subj, "neutral", lm[[98, 102, 96, 100]])     # inner lips
    d = P - m.mean(axis=0)
    half_w = 0.7 * np.linalg.norm(m[2] - m[3]) / 2
    keep &= ~((np.abs(d[:, 0]) < half_w) & (np.abs(d[:, 1]) < 3.0) & (d[:, 2] > -15))
    uv, P = uv[keep][:n_points], P[keep][:n_points]
    e = 1e-5
    du = surface_points(subj, "neutral", uv + [e, 0]) - surface_points(subj, "neutral", uv - [e, 0])
    dv = surface_points(subj, "neutral", uv + [0, e]) - surface_points(subj, "neutral", uv - [0, e])
    N = np.cross(du, dv)
    N /= np.linalg.norm(N, axis=1, keepdims=True)
    N *= np.sign(np.sum(N * P, axis=1))[:, None]                    # out of the head
    return P + rng.normal(0.0, noise, P.shape), N, P, subj


def _distance(V, F, Q):
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.asarray(V, np.float32)), o3d.core.Tensor(np.asarray(F, np.uint32)))
    return scene.compute_distance(o3d.core.Tensor(np.asarray(Q, np.float32))).numpy()


@pytest.fixture(scope="module")
def case():
    P, N, clean, subj = _cloud(N_POINTS)
    P0, N0 = P.copy(), N.copy()
    res = mesh_point_cloud(P, N, MeshingParams(target_vertices=TARGET))
    assert np.array_equal(P, P0) and np.array_equal(N, N0)          # inputs not mutated
    return P, N, clean, subj, res


def test_accuracy_against_ground_truth(case):
    P, N, clean, subj, res = case
    gt = face_mesh(subj, "neutral", 600_000)
    V, F = res.vertices, res.faces
    d_mesh = _distance(gt.vertices, gt.faces, np.vstack([V, V[F].mean(axis=1)]))  # mesh -> GT
    d_gt = _distance(V, F, clean)                                                  # GT (scanned) -> mesh
    d = np.concatenate([d_mesh, d_gt])
    assert d.mean() <= 0.08, d.mean()
    assert np.percentile(d, 99) <= 0.3, np.percentile(d, 99)


def test_vertex_count_and_element_quality(case):
    *_, res = case
    q = res.quality
    assert isinstance(res, MeshResult)
    assert res.vertices.shape == (q["n_vertices"], 3) and res.faces.dtype == np.int32
    assert abs(q["n_vertices"] - TARGET) <= 0.02 * TARGET
    assert q["frac_min_angle_ok"] >= 0.95
    assert q["n_degenerate"] == 0
    assert q["edge_manifold"] and q["n_nonmanifold_edges"] == 0
    assert q["n_unreferenced"] == 0 and q["n_components"] == 1
    assert q["meshing_s"] > 0


def test_open_surface_with_holes_only_where_no_points(case):
    P, N, clean, subj, res = case
    q = res.quality
    assert q["n_boundary_loops"] >= 1            # open, not a closed Poisson blob
    assert 2 <= q["n_holes"] <= 8                # both eyes at least; the thin mouth slit may split
    # the border is cut back to the data, so a hole may exceed the point-free disc by up to
    # about one mesh edge (the dual mesh's border vertices are cluster centroids, inside it)
    edge = np.sqrt(q["area_mm2"] / q["n_faces"] * 4 / np.sqrt(3))
    assert q["hole_areas_mm2"][0] < np.pi * (EYE_HOLE_MM + edge) ** 2, (q["hole_areas_mm2"], edge)
    d, _ = cKDTree(P).query(np.asarray(q["hole_centroids_mm"]))
    assert np.all(d > 0.5), d                    # every hole sits where there were no points
    # ... and the mesh covers the data: almost every input point lies on it
    d_pts = _distance(res.vertices, res.faces, P)
    assert np.mean(d_pts > 0.5) < 0.01, np.mean(d_pts > 0.5)


def test_border_stays_on_the_data(case):
    P, N, clean, subj, res = case
    d, _ = cKDTree(P).query(res.vertices)
    assert res.quality["border_trim_mm"] > 0
    assert np.percentile(d, 99.9) <= 1.5 * res.quality["border_trim_mm"], np.percentile(d, 99.9)


def test_faces_follow_input_normals(case):
    P, N, clean, subj, res = case
    V, F = res.vertices, res.faces
    fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    _, i = cKDTree(P).query(V[F].mean(axis=1))
    assert np.mean(np.sum(fn * N[i], axis=1) > 0) > 0.99


def test_mesh_quality_on_known_meshes():
    # a unit square of two right isosceles triangles: min angle 45, one boundary loop
    V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
    q = mesh_quality(V, [[0, 1, 2], [0, 2, 3]])
    assert q["min_angle_deg"] == pytest.approx(45.0) and q["frac_min_angle_ok"] == 1.0
    assert q["n_boundary_loops"] == 1 and q["n_holes"] == 0 and q["edge_manifold"]
    assert q["area_mm2"] == pytest.approx(1.0)
    # a 4x4 grid with the centre cell missing: one hole of area 1
    g = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    V = np.column_stack([g, np.zeros(len(g))])
    F = []
    for i in range(3):
        for j in range(3):
            if (i, j) == (1, 1):
                continue
            a, b, c, d = 4 * i + j, 4 * (i + 1) + j, 4 * (i + 1) + j + 1, 4 * i + j + 1
            F += [[a, b, c], [a, c, d]]
    q = mesh_quality(V, F)
    assert q["n_holes"] == 1 and q["hole_area_mm2"] == pytest.approx(1.0)
    assert q["hole_centroids_mm"][0] == pytest.approx([1.5, 1.5, 0.0])
    # three triangles on one edge: not edge-manifold; a sliver counts as degenerate
    V = np.array([[0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -1, 0], [0.5, 0, 1], [0.5, 1e-4, 0]], float)
    q = mesh_quality(V, [[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    assert not q["edge_manifold"] and q["n_nonmanifold_edges"] == 1
    assert mesh_quality(V, [[0, 1, 5]])["n_degenerate"] == 1


@pytest.mark.parametrize("points, normals, params, match", [
    (np.zeros((5000, 2)), np.zeros((5000, 3)), MeshingParams(), r"points: expected shape \(n, 3\)"),
    (np.zeros((5000, 3)), np.zeros((4000, 3)), MeshingParams(), r"normals: expected shape \(5000, 3\)"),
    (np.full((5000, 3), np.nan), np.ones((5000, 3)), MeshingParams(), "points: contains 15000 NaN"),
    (np.zeros((5000, 3)), np.ones((5000, 3)), MeshingParams(), "points: expected at least 25000"),
    (np.zeros((5000, 3)), np.zeros((5000, 3)), MeshingParams(target_vertices=1000), "normals: 5000 zero-length"),
    (np.zeros((5000, 3)), np.ones((5000, 3)), "x", "params: expected MeshingParams"),
])
def test_mesh_point_cloud_rejects_bad_input(points, normals, params, match):
    with pytest.raises(ValueError, match=match):
        mesh_point_cloud(points, normals, params)


def test_params_and_quality_validation():
    with pytest.raises(ValueError, match="MeshingParams.target_vertices"):
        MeshingParams(target_vertices=10)
    with pytest.raises(ValueError, match="MeshingParams.relax_step"):
        MeshingParams(relax_step=0.0)
    with pytest.raises(ValueError, match=r"faces: indices must be in \[0, 3\)"):
        mesh_quality(np.zeros((3, 3)), [[0, 1, 3]])
