"""Stage 2 of the registration: optimal-step non-rigid ICP with per-part stiffness.

Amberg, Romdhani & Vetter, "Optimal Step Nonrigid ICP Algorithms for Surface
Registration", CVPR 2007, with the spatially varying stiffness of the paper's Eq. 3: each
template vertex i carries an affine transform X_i (4 x 3, acting on ``[x, y, z, 1]``) and
for a stiffness alpha of the schedule the step minimises::

    E(X) = 1/n sum_i w_i |X_i^T v_i - u_i|^2                   data (closest scan points)
         + alpha^2 sum_{(i,j) in edges} lambda_ij |(X_i - X_j) G|^2   stiffness, G = diag(1,1,1,gamma)
         + beta^2 / L sum_k |sum_c b_kc X_{f_kc}^T v_{f_kc} - y_k|^2   landmarks

re-finding the correspondences ``u_i`` after every solve until the step converges, then
lowering alpha and beta (the schedule is data, :class:`NicpStep`). ``w_i`` is the vertex
area (mean 1) where the correspondence is accepted and 0 where it is rejected (farther than
the step's threshold, normals more than ``max_normal_angle_deg`` apart, or on the scan's
boundary: missing data never pulls the template into a hole). ``lambda_ij`` blends the
per-part weights of the edge's two vertices. Coordinates are normalised (template centred,
RMS radius 1), the data term is a mean over vertices, so alpha and beta do not depend on
the template's resolution or size.

Speed (``docs/registration.md``): the 4n-unknown system of a 20k-vertex template costs ~2 s
per factorisation, so the schedule runs on a hierarchy: the high-stiffness steps solve the
same energy with the affine transforms living on the vertices of decimated copies of the
template (quadric decimation to ``level_vertices``; each template vertex takes the
barycentric blend of the transforms of the coarse triangle nearest to it; the data term
uses a fixed subset of template vertices, four per node), and the final low-stiffness
step runs on the full template with the linear part of every X_i frozen (Amberg's energy
restricted to the per-vertex translations: 3 unknowns per vertex sharing one scalar
matrix). Each level starts from the previous level's result (the rest shape is re-based).
Within a level, matrices are assembled on a fixed sparsity pattern and a factorisation
(CHOLMOD through ``cholespy`` when installed, else SuperLU) is re-used as the
preconditioner of conjugate gradients until they need more than ``pcg_max_iterations``.
Point-to-plane data terms always go through those conjugate gradients. After the
schedule, a safeguard relaxes the few triangles that turned over or degenerated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import open3d as o3d
from scipy import sparse
from scipy.sparse import linalg as spla

from kernels._checks import as_array, check_int, check_number
from kernels.template import Template, template_edges

__all__ = ["NicpStep", "NicpParams", "NicpIteration", "NicpResult", "PreparedTemplate", "ScanSurface",
           "prepare_template", "nicp", "vertex_normals", "DEFAULT_PART_STIFFNESS", "DEFAULT_SCHEDULE"]


# -- parameters ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NicpStep:
    """One stiffness step of the schedule.

    Attributes
    ----------
    stiffness : float
        alpha (> 0). Multiplies every edge's per-part weight.
    landmark_weight : float
        beta (>= 0).
    iterations : int
        Maximum correspondence/solve iterations of the step (>= 1).
    level : int
        Where the step runs: ``i < len(level_vertices)`` = the i-th coarse level (affine
        transforms on its vertices), ``len(level_vertices)`` = the full template
        (per-vertex translations). Levels must not decrease along the schedule.
    max_distance_mm : float
        Correspondences farther than this are rejected (> 0).
    tangential_weight : float or None
        Data term of the step: ``w ((n . r)^2 + t |r - (n . r) n|^2)`` for the residual r
        to the closest point and the scan normal n; t = 1 is point-to-point, t = 0
        point-to-plane. None (default) takes :attr:`NicpParams.data_term`.
    """

    stiffness: float
    landmark_weight: float
    iterations: int
    level: int
    max_distance_mm: float
    tangential_weight: float | None = None

    def __post_init__(self):
        check_number(self.stiffness, "NicpStep.stiffness", lo=0, lo_open=True)
        check_number(self.landmark_weight, "NicpStep.landmark_weight", lo=0)
        check_int(self.iterations, "NicpStep.iterations", 1)
        check_int(self.level, "NicpStep.level", 0)
        check_number(self.max_distance_mm, "NicpStep.max_distance_mm", lo=0, lo_open=True)
        if self.tangential_weight is not None:
            check_number(self.tangential_weight, "NicpStep.tangential_weight", lo=0, hi=1)


DEFAULT_PART_STIFFNESS = (("outer", 1.0), ("forehead", 1.0), ("eyes", 2.0), ("nose", 10.0), ("cheeks", 0.5),
                          ("mouth", 3.0), ("chin_jaw", 3.0))

# (stiffness, landmark weight, iterations, level, max distance mm): two steps on the coarse
# level (~1500 nodes), two on the middle level (~5000 nodes), one on the full template
DEFAULT_SCHEDULE = (
    NicpStep(0.1, 10.0, 6, 0, 4.0),
    NicpStep(0.03, 3.0, 6, 0, 4.0),
    NicpStep(0.01, 2.0, 6, 1, 5.0),
    NicpStep(0.01, 1.0, 5, 1, 4.0),
    NicpStep(0.003, 0.2, 4, 2, 3.0),
)


@dataclass(frozen=True)
class NicpParams:
    """Parameters of :func:`nicp` (and of :func:`prepare_template`).

    Attributes
    ----------
    schedule : tuple of NicpStep
        Decreasing stiffness / landmark weights (see :data:`DEFAULT_SCHEDULE`).
    level_vertices : tuple of int
        Vertex counts of the coarse levels, coarse to fine (default (1500, 5000)); a count
        above half the template's is clamped to that half.
    part_stiffness : tuple of (str, float)
        lambda_p per part name (default :data:`DEFAULT_PART_STIFFNESS`: nose 10, mouth 3,
        chin/jaw 3, eyes 2, forehead and outer 1, cheeks 0.5). Template parts not listed
        get 1.
    part_blend : {"max", "geometric"}
        lambda of an edge between two parts: the larger of the two (default: the stiffer
        part keeps its stiffness up to its border) or their geometric mean.
    gamma : float
        Weight of the translation column in the stiffness (Amberg's G; default 1, in the
        normalised frame: template centred, RMS radius 1).
    data_term : {"point", "plane"}
        Point-to-point or point-to-plane distance to the closest scan point.
    plane_tangential_weight : float
        Point-to-plane only: weight of the tangential component (default 0.1; 0 = pure
        point-to-plane, 1 = point-to-point).
    max_normal_angle_deg : float
        Correspondences whose scan normal is farther than this from the template vertex
        normal are rejected (default 60).
    reject_boundary : bool
        Reject correspondences on the scan's boundary edges / vertices (default True).
    convergence_mm : float
        A step ends when the RMS vertex motion of an iteration is below this (default 0.02).
    valid_distance_mm : float
        At the end, a vertex is valid when its accepted correspondence is within this
        (default 1.0).
    regulariser : float
        Tikhonov weight towards the previous solution keeping every system positive
        definite when data weights vanish, relative to one vertex's data weight
        (default 1e-3).
    pcg_tol : float
        Relative residual at which the conjugate gradients stop (default 1e-5).
    pcg_max_iterations : int
        An iteration re-uses the level's last factorisation as the preconditioner of
        conjugate gradients; when they need more than this many iterations the matrix is
        factorised again (default 8).
    min_angle_deg : float
        After the schedule, triangles that turned over (normal more than 90 degrees from
        the stage-1 template's) or whose smallest angle is below this (default 1 degree,
        the ``degenerate`` threshold of :func:`kernels.meshing.mesh_quality`) are repaired
        by Laplacian relaxation of their vertices (and, after ``untangle_ring_after``
        rounds, their 1-ring).
    untangle_rounds : int
        Maximum relaxation rounds (default 50; 0 disables the repair).
    untangle_step : float
        Fraction of the way to the neighbours' mean a relaxed vertex moves per round
        (default 0.5, in (0, 1]): the repair moves the few vertices it needs by as little
        as it can (a flipped mouth-corner triangle: 3-5 vertices, instead of 12-14 moved
        all the way with their 1-ring, which took the corner landmarks 2-3.5 mm off).
    untangle_ring_after : int
        Rounds after which the 1-ring of the bad triangles' vertices is relaxed too
        (default 10; 0: from the first round).
    coarse_data_per_node : float
        On a coarse level, the data term uses a fixed random subset of
        ``coarse_data_per_node * level nodes`` template vertices (area weights rescaled;
        default 4), which keeps the closest-point queries proportional to the level.
    """

    schedule: tuple[NicpStep, ...] = DEFAULT_SCHEDULE
    level_vertices: tuple[int, ...] = (1500, 5000)
    part_stiffness: tuple[tuple[str, float], ...] = DEFAULT_PART_STIFFNESS
    part_blend: str = "max"
    gamma: float = 1.0
    data_term: str = "point"
    plane_tangential_weight: float = 0.1
    max_normal_angle_deg: float = 60.0
    reject_boundary: bool = True
    convergence_mm: float = 0.02
    valid_distance_mm: float = 1.0
    regulariser: float = 1e-3
    pcg_tol: float = 1e-5
    pcg_max_iterations: int = 8
    coarse_data_per_node: float = 4.0
    min_angle_deg: float = 1.0
    untangle_rounds: int = 50
    untangle_step: float = 0.5
    untangle_ring_after: int = 10

    def __post_init__(self):
        sched = tuple(self.schedule)
        if not sched or not all(isinstance(s, NicpStep) for s in sched):
            raise ValueError("NicpParams.schedule: expected a non-empty tuple of NicpStep")
        object.__setattr__(self, "schedule", sched)
        lv = tuple(self.level_vertices)
        for i, v in enumerate(lv):
            check_int(v, f"NicpParams.level_vertices[{i}]", 100)
        if any(b <= a for a, b in zip(lv, lv[1:])):
            raise ValueError(f"NicpParams.level_vertices: must increase (coarse to fine), got {lv}")
        object.__setattr__(self, "level_vertices", lv)
        levels = [s.level for s in sched]
        if any(b < a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"NicpParams.schedule: step levels must not decrease, got {levels}")
        if max(levels) > len(lv):
            raise ValueError(f"NicpParams.schedule: level {max(levels)} does not exist (coarse levels: {len(lv)}, "
                             f"full template = {len(lv)})")
        ps = tuple((str(n), float(w)) for n, w in self.part_stiffness)
        for n, w in ps:
            check_number(w, f"NicpParams.part_stiffness[{n!r}]", lo=0, lo_open=True)
        if len({n for n, _ in ps}) != len(ps):
            raise ValueError("NicpParams.part_stiffness: part names repeat")
        object.__setattr__(self, "part_stiffness", ps)
        if self.part_blend not in ("max", "geometric"):
            raise ValueError(f"NicpParams.part_blend: expected 'max' or 'geometric', got {self.part_blend!r}")
        if self.data_term not in ("point", "plane"):
            raise ValueError(f"NicpParams.data_term: expected 'point' or 'plane', got {self.data_term!r}")
        check_number(self.gamma, "NicpParams.gamma", lo=0, lo_open=True)
        check_number(self.plane_tangential_weight, "NicpParams.plane_tangential_weight", lo=0, hi=1)
        check_number(self.max_normal_angle_deg, "NicpParams.max_normal_angle_deg", lo=0, hi=180, lo_open=True)
        check_number(self.convergence_mm, "NicpParams.convergence_mm", lo=0)
        check_number(self.valid_distance_mm, "NicpParams.valid_distance_mm", lo=0, lo_open=True)
        check_number(self.regulariser, "NicpParams.regulariser", lo=0, lo_open=True)
        check_number(self.pcg_tol, "NicpParams.pcg_tol", lo=0, lo_open=True, hi=1)
        check_int(self.pcg_max_iterations, "NicpParams.pcg_max_iterations", 1)
        check_number(self.coarse_data_per_node, "NicpParams.coarse_data_per_node", lo=1.0)
        check_number(self.min_angle_deg, "NicpParams.min_angle_deg", lo=0, hi=30)
        check_int(self.untangle_rounds, "NicpParams.untangle_rounds", 0)
        check_number(self.untangle_step, "NicpParams.untangle_step", lo=0, lo_open=True, hi=1)
        check_int(self.untangle_ring_after, "NicpParams.untangle_ring_after", 0)


@dataclass(frozen=True)
class NicpIteration:
    """Record of one correspondence/solve iteration.

    Attributes
    ----------
    step, level, iteration : int
        Schedule step, level and iteration within the step.
    stiffness, landmark_weight, max_distance_mm : float
        The step's alpha, beta and rejection distance.
    cost, data_cost, stiffness_cost, landmark_cost : float
        Energy terms after the solve (normalised frame); ``cost`` also holds the
        locality prior's energy when :func:`nicp` has one.
    rejected_fraction : float
        Fraction of template vertices without an accepted correspondence before the solve.
    rejected_distance, rejected_normal, rejected_boundary : int
        Counts by reason (a vertex may have several).
    mean_distance_mm : float
        Mean distance of the accepted correspondences before the solve.
    landmark_rmse_mm : float
        RMS distance of the used landmarks after the solve (NaN without landmarks).
    motion_mm : float
        RMS vertex motion of the solve.
    solver_iterations : int
        Conjugate-gradient iterations (0 for a direct solve).
    time_s : float
        Wall-clock seconds of the iteration.
    """

    step: int
    level: int
    iteration: int
    stiffness: float
    landmark_weight: float
    max_distance_mm: float
    cost: float
    data_cost: float
    stiffness_cost: float
    landmark_cost: float
    rejected_fraction: float
    rejected_distance: int
    rejected_normal: int
    rejected_boundary: int
    mean_distance_mm: float
    landmark_rmse_mm: float
    motion_mm: float
    solver_iterations: int
    time_s: float


@dataclass(frozen=True)
class NicpResult:
    """Outcome of :func:`nicp`.

    Attributes
    ----------
    vertices : (n, 3) float64
        Registered template vertices, mm, scan frame.
    distance_mm : (n,) float64
        Distance of each vertex to the scan surface.
    valid : (n,) bool
        Accepted correspondence within ``valid_distance_mm`` at the end.
    iterations : tuple of NicpIteration
    time_s : float
    untangle_rounds : int
        Relaxation rounds of the final safeguard (0: nothing was flipped or degenerate).
    untangled_vertices : int
        Vertices it moved.
    """

    vertices: np.ndarray
    distance_mm: np.ndarray
    valid: np.ndarray
    iterations: tuple
    time_s: float
    untangle_rounds: int = 0
    untangled_vertices: int = 0


# -- scan surface --------------------------------------------------------------------------

class ScanSurface:
    """Closest-point queries on an open triangle mesh, with boundary detection.

    Parameters
    ----------
    vertices : (n, 3) float64
        mm, finite.
    faces : (m, 3) int
        At least one face, indices in range.

    Notes
    -----
    Open3D ``RaycastingScene.compute_closest_points`` (float32 BVH). A closest point is
    *on the boundary* when it lies on a boundary edge (its barycentric coordinate
    opposite that edge is below 1e-4) or at a boundary vertex.
    """

    BARY_TOL = 1e-4

    def __init__(self, vertices, faces):
        V = np.asarray(vertices, dtype=np.float64)
        F = np.asarray(faces, dtype=np.int64)
        self.vertices, self.faces = V, F
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(V, dtype=np.float32)),
                                  o3d.core.Tensor(np.ascontiguousarray(F, dtype=np.uint32)))
        fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
        nrm = np.linalg.norm(fn, axis=1, keepdims=True)
        self.face_normals = fn / np.where(nrm > 0, nrm, 1.0)
        # boundary edges: edge opposite corner k of face f is (F[f, k+1], F[f, k+2])
        opp = np.stack([F[:, [1, 2]], F[:, [2, 0]], F[:, [0, 1]]], axis=1).reshape(-1, 2)
        s = np.sort(opp, axis=1)
        base = int(F.max()) + 1
        key = s[:, 0] * base + s[:, 1]
        _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        self.boundary_opposite = (cnt[inv] == 1).reshape(-1, 3)
        bv = np.zeros(len(V), bool)
        bv[opp[cnt[inv] == 1].ravel()] = True
        self.boundary_vertex = bv
        self.n_boundary_edges = int(np.count_nonzero(cnt == 1))

    def closest(self, points: np.ndarray):
        """Closest surface points of ``points`` (k, 3) mm.

        Returns
        -------
        q : (k, 3) float64
        normals : (k, 3) float64
            Unit normals of the closest triangles (orientation of the scan's winding).
        distance : (k,) float64
        on_boundary : (k,) bool
        """
        r = self._scene.compute_closest_points(o3d.core.Tensor(np.ascontiguousarray(points, dtype=np.float32)))
        q = r["points"].numpy().astype(np.float64)
        fid = r["primitive_ids"].numpy().astype(np.int64)
        uv = r["primitive_uvs"].numpy().astype(np.float64)
        bary = np.column_stack([1.0 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]])
        tol = self.BARY_TOL
        onb = np.any(self.boundary_opposite[fid] & (bary < tol), axis=1)
        onb |= np.any(self.boundary_vertex[self.faces[fid]] & (bary > 1.0 - tol), axis=1)
        return q, self.face_normals[fid], np.linalg.norm(q - points, axis=1), onb

    def distance(self, points: np.ndarray) -> np.ndarray:
        """Unsigned distance (k,) of ``points`` to the surface, mm."""
        return self._scene.compute_distance(
            o3d.core.Tensor(np.ascontiguousarray(points, dtype=np.float32))).numpy().astype(np.float64)


def vertex_normals(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """(n, 3) area-weighted unit vertex normals of a triangle mesh."""
    fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    idx = F.ravel()
    N = np.stack([np.bincount(idx, weights=np.repeat(fn[:, c], 3), minlength=len(V)) for c in range(3)], axis=1)
    nrm = np.linalg.norm(N, axis=1, keepdims=True)
    return N / np.where(nrm > 0, nrm, 1.0)


# -- template hierarchy --------------------------------------------------------------------

@dataclass(frozen=True)
class _Level:
    n: int                    # unknown nodes
    P: sparse.csr_matrix      # (n_fine, n) interpolation (identity on the full level)
    L: sparse.csr_matrix      # (n, n) lambda-weighted graph Laplacian of the level's edges
    vertices: np.ndarray      # (n, 3) rest positions of the level's nodes (template frame)


@dataclass(frozen=True)
class PreparedTemplate:
    """A template with its coarse levels (:func:`prepare_template`; reusable across scans).

    Attributes
    ----------
    template : Template
    levels : tuple
        Coarse levels then the full template (private structure).
    area : (n,) float64
        Vertex areas normalised to mean 1 (data weights).
    vertex_lambda : (n,) float64
        lambda_p of each template vertex.
    edges : (e, 2) int64
        Template edges.
    key : tuple
        The parameters the hierarchy depends on.
    prepare_s : float
        Seconds spent preparing.
    """

    template: Template
    levels: tuple
    area: np.ndarray
    vertex_lambda: np.ndarray
    edges: np.ndarray
    key: tuple
    prepare_s: float


def _laplacian(n: int, edges: np.ndarray, weights: np.ndarray) -> sparse.csr_matrix:
    i, j = edges[:, 0], edges[:, 1]
    W = sparse.coo_matrix((np.r_[weights, weights], (np.r_[i, j], np.r_[j, i])), shape=(n, n)).tocsr()
    return (sparse.diags(np.asarray(W.sum(axis=1)).ravel()) - W).tocsr()


def _blend(la: np.ndarray, lb: np.ndarray, how: str) -> np.ndarray:
    return np.maximum(la, lb) if how == "max" else np.sqrt(la * lb)


def _vertex_area(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    a = 0.5 * np.linalg.norm(np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]]), axis=1)
    A = np.zeros(len(V))
    for k in range(3):
        np.add.at(A, F[:, k], a / 3.0)
    return A


def _key(params: NicpParams) -> tuple:
    return (params.level_vertices, params.part_stiffness, params.part_blend)


def prepare_template(template: Template, params: NicpParams = NicpParams()) -> PreparedTemplate:
    """Build the coarse levels, edge stiffness and data weights of a template.

    Each coarse level is an Open3D quadric decimation of the template to about
    ``level_vertices[i]`` vertices (boundary preserved); every template vertex is bound to
    the closest point of the decimated mesh (its triangle's barycentric weights form the
    interpolation matrix). A coarse node's lambda is the interpolation-weighted mean of the
    lambda of the template vertices bound to it; an edge's lambda is the ``part_blend`` of
    its two ends.

    Parameters
    ----------
    template : Template
    params : NicpParams

    Returns
    -------
    PreparedTemplate

    Raises
    ------
    ValueError
        Not a Template / NicpParams.
    """
    if not isinstance(template, Template):
        raise ValueError(f"template: expected a Template, got {type(template).__name__}")
    if not isinstance(params, NicpParams):
        raise ValueError(f"params: expected NicpParams, got {type(params).__name__}")
    t0 = time.perf_counter()
    V = np.asarray(template.vertices, dtype=np.float64)
    F = np.asarray(template.faces, dtype=np.int64)
    n = len(V)
    counts = [min(int(nv), n // 2) for nv in params.level_vertices]
    lam_of = dict(params.part_stiffness)
    part_lam = np.array([lam_of.get(name, 1.0) for name in template.part_names])
    vlam = part_lam[np.asarray(template.parts, dtype=np.int64)]
    E = template_edges(F)
    levels = []
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(V.copy()),
                                     o3d.utility.Vector3iVector(F.astype(np.int32)))
    for nv in counts:
        c = mesh.simplify_quadric_decimation(int(2 * nv), boundary_weight=100.0)
        c.remove_unreferenced_vertices()
        Vc = np.asarray(c.vertices, dtype=np.float64).copy()
        Fc = np.asarray(c.triangles, dtype=np.int64).copy()
        surf = ScanSurface(Vc, Fc)
        r = surf._scene.compute_closest_points(o3d.core.Tensor(V.astype(np.float32)))
        fid = r["primitive_ids"].numpy().astype(np.int64)
        uv = r["primitive_uvs"].numpy().astype(np.float64)
        bary = np.clip(np.column_stack([1.0 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]]), 0.0, 1.0)
        bary /= bary.sum(axis=1, keepdims=True)
        nc = len(Vc)
        P = sparse.csr_matrix((bary.ravel(), (np.repeat(np.arange(n), 3), Fc[fid].ravel())), shape=(n, nc))
        P.sum_duplicates()
        wsum = np.asarray(P.sum(axis=0)).ravel()
        used = wsum > 0
        clam = np.where(used, (P.T @ vlam) / np.where(used, wsum, 1.0), 1.0)
        Ec = template_edges(Fc)
        L = _laplacian(nc, Ec, _blend(clam[Ec[:, 0]], clam[Ec[:, 1]], params.part_blend))
        levels.append(_Level(nc, P, L, Vc))
    Lf = _laplacian(n, E, _blend(vlam[E[:, 0]], vlam[E[:, 1]], params.part_blend))
    levels.append(_Level(n, sparse.identity(n, format="csr"), Lf, V))
    area = _vertex_area(V, F)
    area = area / area.mean()
    return PreparedTemplate(template, tuple(levels), area, vlam, E, _key(params), time.perf_counter() - t0)


# -- solver --------------------------------------------------------------------------------

try:  # CHOLMOD through cholespy: ~2x faster factorisations than SuperLU on these systems
    import cholespy as _cholespy
except ImportError:  # pragma: no cover - scipy fallback
    _cholespy = None


class _Factor:
    """Sparse Cholesky (cholespy) or LU (scipy SuperLU) factor of an SPD CSR matrix."""

    def __init__(self, A: sparse.csr_matrix):
        if _cholespy is not None:
            self._f = _cholespy.CholeskySolverD(A.shape[0], A.indptr.astype(np.int32), A.indices.astype(np.int32),
                                                np.ascontiguousarray(A.data, dtype=np.float64),
                                                _cholespy.MatrixType.CSR)
            self._lu = None
        else:
            self._lu = spla.splu(A.tocsc(), permc_spec="MMD_AT_PLUS_A")

    def solve(self, B: np.ndarray) -> np.ndarray:
        if self._lu is not None:
            return self._lu.solve(B)
        B = np.ascontiguousarray(B, dtype=np.float64)
        X = np.empty_like(B)
        self._f.solve(B, X)
        return X


def _affine_design(P: sparse.csr_matrix, Vh: np.ndarray) -> sparse.csr_matrix:
    """(rows, 4 n) matrix D with D[i, 4j + c] = P[i, j] * Vh[i, c] (positions = D @ X)."""
    P = P.tocoo()
    rows = np.repeat(P.row, 4)
    cols = (4 * P.col[:, None] + np.arange(4)[None]).ravel()
    data = (P.data[:, None] * Vh[P.row]).ravel()
    return sparse.csr_matrix((data, (rows, cols)), shape=(P.shape[0], 4 * P.shape[1]))


def _pcg(apply_A, B: np.ndarray, X0: np.ndarray, precond, tol: float, maxiter: int):
    """Preconditioned conjugate gradients on every column of B at once (independent recurrences)."""
    X = X0.copy()
    R = B - apply_A(X)
    bn = np.linalg.norm(B, axis=0)
    bn[bn == 0] = 1.0
    Z = precond(R)
    Pd = Z.copy()
    rz = np.einsum("ij,ij->j", R, Z)
    it = 0
    while it < maxiter and not np.all(np.linalg.norm(R, axis=0) <= tol * bn):
        it += 1
        AP = apply_A(Pd)
        pap = np.einsum("ij,ij->j", Pd, AP)
        a = np.where(pap > 0, rz / np.where(pap > 0, pap, 1.0), 0.0)
        X += Pd * a
        R -= AP * a
        Z = precond(R)
        rz_new = np.einsum("ij,ij->j", R, Z)
        Pd = Z + Pd * np.where(rz > 0, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        rz = rz_new
    converged = bool(np.all(np.linalg.norm(R, axis=0) <= tol * bn))
    return X, it, converged


class _System:
    """Normal equations of one level with a fixed sparsity pattern.

    Positions of the template vertices are ``pos(X) = H0 + Dfull @ X`` (affine levels:
    ``Dfull`` = affine design of all vertices, ``H0 = 0``; the full level: ``Dfull = I``,
    ``H0 = base``). The matrix ``a2 S + G^T W G + wl H^T H + eps I`` (``G`` = rows of
    ``Dfull`` of the data vertices, ``H`` = landmark rows) is assembled as
    ``a2 s + M @ w + wl h + eps i`` on one CSR pattern (``M`` maps the data weights to
    the pattern's entries), so an iteration costs one sparse mat-vec, not a product.
    """

    def __init__(self, S: sparse.csr_matrix, Dfull: sparse.csr_matrix, H0: np.ndarray, data_idx: np.ndarray,
                 BL: sparse.csr_matrix | None):
        self.Dfull = Dfull.tocsr()
        self.H0 = H0
        self.data_idx = data_idx
        G = self.Dfull[data_idx].tocsr()
        self.G = G
        self.GT = G.T.tocsr()
        N = S.shape[0]
        self.H = (BL @ self.Dfull).tocsr() if BL is not None else None
        self.h0 = (BL @ H0) if BL is not None else None
        one = lambda A: sparse.csr_matrix((np.abs(A.data) + 1.0, A.indices, A.indptr), shape=A.shape)  # noqa: E731
        pat = one(S) + one(G.T @ G) + sparse.identity(N, format="csr")
        if self.H is not None:
            pat = pat + one(self.H.T @ self.H)
        pat = pat.tocsr()
        pat.sum_duplicates()
        pat.sort_indices()
        self.indptr, self.indices = pat.indptr, pat.indices
        rows = np.repeat(np.arange(N), np.diff(pat.indptr))
        self.keys = rows.astype(np.int64) * N + pat.indices
        self.N = N
        self.s = self._align(S)
        self.h = self._align((self.H.T @ self.H).tocsr()) if self.H is not None else None
        self.i = self._align(sparse.identity(N, format="csr"))
        # M: (nnz, n_data) with M[pos(a, b), r] = G[r, a] * G[r, b]
        Gc = G.tocsr()
        k = np.diff(Gc.indptr)
        r_all, a_all, b_all, v_all = [], [], [], []
        for kk in np.unique(k):
            rr = np.flatnonzero(k == kk)
            if kk == 0:
                continue
            start = Gc.indptr[rr][:, None] + np.arange(kk)[None]
            cols = Gc.indices[start]                      # (m, kk)
            vals = Gc.data[start]
            a_all.append(np.repeat(cols, kk, axis=1).ravel())
            b_all.append(np.tile(cols, (1, kk)).ravel())
            v_all.append((vals[:, :, None] * vals[:, None, :]).ravel())
            r_all.append(np.repeat(rr, kk * kk))
        a_ = np.concatenate(a_all).astype(np.int64)
        b_ = np.concatenate(b_all).astype(np.int64)
        pos = np.searchsorted(self.keys, a_ * N + b_)
        self.M = sparse.csr_matrix((np.concatenate(v_all), (pos, np.concatenate(r_all))),
                                   shape=(len(self.keys), len(data_idx)))

    def _align(self, A: sparse.csr_matrix) -> np.ndarray:
        A = A.tocoo()
        out = np.zeros(len(self.keys))
        np.add.at(out, np.searchsorted(self.keys, A.row.astype(np.int64) * self.N + A.col), A.data)
        return out

    def matrix(self, a2: float, w: np.ndarray, wl: float, eps: float) -> sparse.csr_matrix:
        data = a2 * self.s + self.M @ w + eps * self.i
        if self.h is not None and wl:
            data = data + wl * self.h
        return sparse.csr_matrix((data, self.indices, self.indptr), shape=(self.N, self.N))

    def positions(self, X: np.ndarray) -> np.ndarray:
        return self.H0 + self.Dfull @ X


class _AffineSystem:
    """Normal equations of a coarse level in 4 x 4 blocks (same interface as :class:`_System`).

    Unknowns: the 4 x 3 affine transform of each node; template vertex i is at
    ``sum_j P[i, j] X_j^T [v_i, 1]``. The data block of nodes (j, k) is
    ``sum_i w_i P_ij P_ik v_i v_i^T``: a sparse (blocks x data vertices) matrix of
    ``P_ij P_ik`` times the per-vertex outer products ``w_i v_i v_i^T`` (16 columns), so
    assembling the matrix for new weights costs one sparse-times-dense product.
    """

    def __init__(self, P: sparse.csr_matrix, Lw: sparse.csr_matrix, g2: np.ndarray, base: np.ndarray,
                 data_idx: np.ndarray, BL: sparse.csr_matrix | None):
        n, nc = P.shape
        Vh = np.column_stack([base, np.ones(n)])
        self.Dfull = _affine_design(P, Vh)
        self.H0 = np.zeros((n, 3))
        self.data_idx = data_idx
        self.G = self.Dfull[data_idx].tocsr()
        self.GT = self.G.T.tocsr()
        self.H = (BL @ self.Dfull).tocsr() if BL is not None else None
        self.h0 = np.zeros((BL.shape[0], 3)) if BL is not None else None
        # node-level pattern: stiffness edges, diagonal, data couplings, landmark couplings
        Pd = P[data_idx].tocsr()
        Pd.sum_duplicates()
        node = (abs(Lw) + sparse.identity(nc) + abs(Pd.T @ Pd)).tocsr()
        if BL is not None:
            PL = (BL @ P).tocsr()
            node = node + abs(PL.T @ PL)
        node = node.tocsr()
        node.sum_duplicates()
        node.sort_indices()
        nb = node.nnz
        brow = np.repeat(np.arange(nc), np.diff(node.indptr)).astype(np.int64)
        bkeys = brow * nc + node.indices
        # data couplings: every (row, j, k) of Pd
        k = np.diff(Pd.indptr)
        rr, jj, kk_, vv = [], [], [], []
        for kk in np.unique(k):
            if kk == 0:
                continue
            rows = np.flatnonzero(k == kk)
            st = Pd.indptr[rows][:, None] + np.arange(kk)[None]
            cols, vals = Pd.indices[st], Pd.data[st]
            jj.append(np.repeat(cols, kk, axis=1).ravel())
            kk_.append(np.tile(cols, (1, kk)).ravel())
            vv.append((vals[:, :, None] * vals[:, None, :]).ravel())
            rr.append(np.repeat(rows, kk * kk))
        pos = np.searchsorted(bkeys, np.concatenate(jj).astype(np.int64) * nc + np.concatenate(kk_))
        self.Mb = sparse.csr_matrix((np.concatenate(vv), (pos, np.concatenate(rr))), shape=(nb, len(data_idx)))
        vd = Vh[data_idx]
        self.VV = (vd[:, :, None] * vd[:, None, :]).reshape(-1, 16)
        # fixed blocks: stiffness (L_jk diag(g2)) and identity
        Lal = np.zeros(nb)
        Lc = Lw.tocoo()
        np.add.at(Lal, np.searchsorted(bkeys, Lc.row.astype(np.int64) * nc + Lc.col), Lc.data)
        self.sblk = (Lal[:, None, None] * np.diag(g2)[None]).reshape(-1)
        diag = brow == node.indices
        self.iblk = (diag[:, None, None] * np.eye(4)[None]).reshape(-1)
        # scalar CSR pattern of the blocks and the permutation from block order to CSR order
        ones = sparse.bsr_matrix((np.arange(1, 16 * nb + 1, dtype=np.float64).reshape(nb, 4, 4), node.indices,
                                  node.indptr), shape=(4 * nc, 4 * nc)).tocsr()
        ones.sort_indices()
        self.perm = ones.data.astype(np.int64) - 1
        self.indptr, self.indices = ones.indptr, ones.indices
        self.N = 4 * nc
        self.h = None
        if self.H is not None:
            HH = (self.H.T @ self.H).tocoo()
            rows = np.repeat(np.arange(self.N), np.diff(self.indptr)).astype(np.int64)
            keys = rows * self.N + self.indices
            self.h = np.zeros(len(keys))
            np.add.at(self.h, np.searchsorted(keys, HH.row.astype(np.int64) * self.N + HH.col), HH.data)

    def matrix(self, a2: float, w: np.ndarray, wl: float, eps: float) -> sparse.csr_matrix:
        blk = a2 * self.sblk + (self.Mb @ (w[:, None] * self.VV)).reshape(-1) + eps * self.iblk
        data = blk[self.perm]
        if self.h is not None and wl:
            data = data + wl * self.h
        return sparse.csr_matrix((data, self.indices, self.indptr), shape=(self.N, self.N))

    def positions(self, X: np.ndarray) -> np.ndarray:
        return self.Dfull @ X


def _min_angles_deg(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    a, b, c = V[F[:, 0]], V[F[:, 1]], V[F[:, 2]]
    la, lb, lc = np.linalg.norm(b - c, axis=1), np.linalg.norm(c - a, axis=1), np.linalg.norm(a - b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ca = np.clip((lb ** 2 + lc ** 2 - la ** 2) / (2 * lb * lc), -1, 1)
        cb = np.clip((lc ** 2 + la ** 2 - lb ** 2) / (2 * lc * la), -1, 1)
        cc = np.clip((la ** 2 + lb ** 2 - lc ** 2) / (2 * la * lb), -1, 1)
    ang = np.degrees(np.arccos(np.stack([ca, cb, cc], axis=1)))
    return np.where(np.isfinite(ang), ang, 0.0).min(axis=1)


def _untangle(V: np.ndarray, F: np.ndarray, ref_fn: np.ndarray, min_angle_deg: float, rounds: int,
              step: float = 1.0, ring_after: int = 0):
    """Laplacian relaxation of the vertices of flipped or degenerate triangles.

    Each round moves those vertices ``step`` of the way to their neighbours' mean; from
    round ``ring_after`` on their 1-ring too. Returns the new vertices, the number of
    rounds run and the number of vertices moved.
    """
    n = len(V)
    E = template_edges(F)
    A = sparse.coo_matrix((np.ones(2 * len(E)), (np.r_[E[:, 0], E[:, 1]], np.r_[E[:, 1], E[:, 0]])),
                          shape=(n, n)).tocsr()
    deg = np.asarray(A.sum(axis=1)).ravel()
    V = V.copy()
    moved = np.zeros(n, bool)
    r = 0
    for r in range(rounds):
        fn = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
        bad = (np.einsum("ij,ij->i", fn, ref_fn) <= 0) | (_min_angles_deg(V, F) < min_angle_deg)
        if not bad.any():
            break
        sel = np.zeros(n, bool)
        sel[F[bad].ravel()] = True
        if r >= ring_after:
            sel |= (A @ sel.astype(float)) > 0      # with the 1-ring
        idx = np.flatnonzero(sel)
        V[idx] += step * ((A @ V)[idx] / deg[idx, None] - V[idx])
        moved |= sel
    else:
        r = rounds
    return V, r, int(moved.sum())


def _check_scan(scan_vertices, scan_faces):
    V = as_array(scan_vertices, "scan_vertices", (None, 3))
    if V.shape[0] < 3:
        raise ValueError(f"scan_vertices: need at least 3 vertices, got {V.shape[0]}")
    if not np.all(np.isfinite(V)):
        raise ValueError(f"scan_vertices: {int(np.sum(~np.isfinite(V).all(axis=1)))} vertex row(s) contain NaN or "
                         f"infinite values")
    F = np.asarray(scan_faces)
    if F.ndim != 2 or F.shape[1] != 3:
        raise ValueError(f"scan_faces: expected shape (m, 3), got {tuple(F.shape)}")
    if F.shape[0] == 0:
        raise ValueError("scan_faces: the scan has no faces (a triangle mesh is required, not a point cloud)")
    if not np.issubdtype(F.dtype, np.integer):
        raise ValueError(f"scan_faces: expected integer vertex indices, got dtype {F.dtype}")
    F = F.astype(np.int64)
    if F.min() < 0 or F.max() >= V.shape[0]:
        raise ValueError(f"scan_faces: vertex indices must be in [0, {V.shape[0]}), got [{F.min()}, {F.max()}]")
    return V, F


def nicp(prepared: PreparedTemplate, start_vertices, scan: ScanSurface, landmarks=None,
         landmark_mask=None, params: NicpParams = NicpParams(), prior_weight=None,
         prior_tangential: bool = False, orientation_reference=None, targets=None) -> NicpResult:
    """Optimal-step NICP of a (similarity-aligned) template onto a scan surface.

    Parameters
    ----------
    prepared : PreparedTemplate
        From :func:`prepare_template` with the same ``level_vertices``, ``part_stiffness``
        and ``part_blend`` as ``params``.
    start_vertices : (n, 3) float64
        Template vertices after stage 1, mm in the scan frame.
    scan : ScanSurface
    landmarks : (106, 3) float64, optional
        Scan landmarks (mm); NaN rows are not used.
    landmark_mask : (106,) bool, optional
        Landmarks to use (default: every finite one).
    params : NicpParams
    prior_weight : (n,) float64 or float, optional
        Locality prior (default None: none), dimensionless, >= 0: on every step vertex i
        is pulled towards its start position ``s_i`` by ``mu_i |p_i - s_i|^2`` with
        ``mu_i = prior_weight_i * area_i``, the normalisation of the data term (so 1 means
        "as strong as a scan correspondence"). Meant for a start that already has the
        subject's identity (a registration of the same subject,
        :class:`kernels.registration.StartParams`). Its energy is part of the records'
        ``cost``.
    prior_tangential : bool
        With a prior: pull only within the tangent plane of the current template normal,
        so the data term alone sets the position along the normal (default False: all
        directions). Vertices without an accepted correspondence in an iteration are
        pulled in all directions (nothing else holds their normal position; this also
        keeps the isotropic system's factor a good CG preconditioner: 4-8 CG iterations
        per full-template solve instead of 80-88 and a refactorisation).
    orientation_reference : (n, 3) float64, optional
        Vertices whose triangle orientations the final untangling restores: a triangle of
        the result whose normal points against its normal here is relaxed (default: the
        start vertices). Give the template posed like the start when the start may itself
        fold a few triangles (a registration of another scan, posed by the jaw rig).
    targets : (n, 3) float64, optional
        Explicit correspondence targets, mm (NaN rows: none). A vertex with a target is
        pulled, every iteration, to the scan point closest to its target instead of the
        scan point closest to itself, and is exempt from the distance rejection (the
        normal-angle and boundary rejections still apply). Stage 2c of
        :func:`kernels.registration.register` gives the texture flow's displaced positions.

    Returns
    -------
    NicpResult

    Raises
    ------
    ValueError
        Mismatched hierarchy/parameters, bad shapes, non-finite start vertices, prior
        weights of the wrong shape, negative or non-finite; targets of the wrong shape or
        infinite.
    """
    if not isinstance(prepared, PreparedTemplate):
        raise ValueError(f"prepared: expected a PreparedTemplate, got {type(prepared).__name__}")
    if not isinstance(params, NicpParams):
        raise ValueError(f"params: expected NicpParams, got {type(params).__name__}")
    if prepared.key != _key(params):
        raise ValueError("prepared: built with other level_vertices / part_stiffness / part_blend than params; "
                         "call prepare_template(template, params)")
    T = prepared.template
    n = T.n_vertices
    V0 = as_array(start_vertices, "start_vertices", (n, 3), finite=True)
    Vref = V0 if orientation_reference is None else as_array(orientation_reference, "orientation_reference",
                                                             (n, 3), finite=True)
    if not isinstance(scan, ScanSurface):
        raise ValueError(f"scan: expected a ScanSurface, got {type(scan).__name__}")
    tgt = tgt_has = tgt_n = tgt_b = None
    if targets is not None:
        tgt = as_array(targets, "targets", (n, 3))
        tgt_has = np.isfinite(tgt).all(axis=1)
        if np.isinf(tgt).any():
            raise ValueError("targets: contains infinite values (NaN rows mean no target)")
        tgt_n = np.zeros((n, 3))
        tgt_b = np.zeros(n, bool)
        if tgt_has.any():
            Qt, tgt_n[tgt_has], _, tgt_b[tgt_has] = scan.closest(tgt[tgt_has])
            tgt[tgt_has] = Qt
    mu_v = None                           # locality prior weights per vertex (None: no prior)
    if prior_weight is not None:
        pw = np.asarray(prior_weight, dtype=np.float64)
        if pw.ndim == 0:
            pw = np.full(n, float(pw))
        pw = as_array(pw, "prior_weight", (n,), finite=True)
        if pw.min() < 0:
            raise ValueError(f"prior_weight: must be >= 0, got minimum {pw.min():.3g}")
        mu_v = pw
    tang = mu_v is not None and bool(prior_tangential)
    t_start = time.perf_counter()
    F = np.asarray(T.faces, dtype=np.int64)

    # normalised frame: template centred, RMS radius 1
    centre = V0.mean(axis=0)
    s = float(np.sqrt(np.mean(np.sum((V0 - centre) ** 2, axis=1))))

    def to_n(x):
        return (x - centre) / s

    def to_mm(x):
        return x * s + centre

    # landmark rows: (L, n) barycentric matrix and normalised targets
    lidx = np.zeros(0, np.int64)
    if landmarks is not None:
        Y = as_array(landmarks, "landmarks", (T.landmark_faces.shape[0], 3))
        use = np.isfinite(Y).all(axis=1)
        if landmark_mask is not None:
            use &= as_array(landmark_mask, "landmark_mask", (Y.shape[0],), dtype=bool)
        lidx = np.flatnonzero(use)
    nL = len(lidx)
    if nL:
        tri = F[T.landmark_faces[lidx]]
        BL = sparse.csr_matrix((T.landmark_bary[lidx].ravel(), (np.repeat(np.arange(nL), 3), tri.ravel())),
                               shape=(nL, n))
        Yn = to_n(Y[lidx])
    else:
        BL, Yn = None, None

    area = prepared.area
    eps = params.regulariser / n
    tau_default = params.plane_tangential_weight if params.data_term == "plane" else 1.0
    cos_max = np.cos(np.radians(params.max_normal_angle_deg))
    g2 = np.array([1.0, 1.0, 1.0, params.gamma ** 2])
    n_levels = len(prepared.levels)

    # scan normal orientation: flip when the scan is wound inwards
    _, NQ, dist, _ = scan.closest(V0)
    near = dist < 10.0
    dots = np.einsum("ij,ij->i", NQ, vertex_normals(V0, F))
    flip = -1.0 if near.any() and np.median(dots[near]) < 0 else 1.0

    records = []
    cur = V0.copy()                       # current positions, mm
    cur_level = -1
    sys_ = X = None

    def correspond(P_mm, idx, max_d):
        Q, NQ, dist, onb = scan.closest(P_mm[idx])
        t = tgt_has[idx] if tgt_has is not None else np.zeros(len(idx), bool)
        if t.any():                      # explicit targets replace the closest point
            it_ = idx[t]
            Q[t], NQ[t], onb[t] = tgt[it_], tgt_n[it_], tgt_b[it_]
            dist[t] = np.linalg.norm(P_mm[it_] - tgt[it_], axis=1)
        NQ = NQ * flip
        Nt = vertex_normals(P_mm, F)[idx]
        bad_d = (dist > max_d) & ~t
        bad_n = np.einsum("ij,ij->i", NQ, Nt) < cos_max
        bad_b = onb if params.reject_boundary else np.zeros(len(idx), bool)
        ok = ~(bad_d | bad_n | bad_b)
        return Q, NQ, dist, ok, bad_d, bad_n, bad_b

    for si, step in enumerate(params.schedule):
        lev = prepared.levels[step.level]
        full = step.level == n_levels - 1
        if step.level != cur_level:       # re-base: the new level starts from the current shape
            base = to_n(cur)
            cur_level = step.level
            m = min(n, int(params.coarse_data_per_node * lev.n)) if not full else n
            didx = np.arange(n) if m >= n else np.sort(np.random.default_rng(0).choice(n, m, replace=False))
            dw = area[didx] * (n / len(didx))
            if mu_v is not None:
                mu = mu_v[didx] * dw / n
                Sd = to_n(V0)[didx]
            if full:
                sys_ = _System(params.gamma ** 2 * lev.L, sparse.identity(n, format="csr"), base, didx, BL)
                X = np.zeros((n, 3))
            else:
                sys_ = _AffineSystem(lev.P, lev.L, g2, base, didx, BL)
                X = np.tile(np.vstack([np.eye(3), np.zeros((1, 3))]), (lev.n, 1))
            factor = None                  # factorisations are re-used across the steps of a level
            S_mat = sys_.matrix(1.0, np.zeros(len(didx)), 0.0, 0.0)  # the stiffness alone, for the records
        a2, b2 = step.stiffness ** 2, step.landmark_weight ** 2
        tau = tau_default if step.tangential_weight is None else float(step.tangential_weight)
        for it in range(step.iterations):
            t0 = time.perf_counter()
            Q, NQ, dist, ok, bad_d, bad_n, bad_b = correspond(cur, didx, step.max_distance_mm)
            w = np.where(ok, dw, 0.0) / n
            Qn = to_n(Q)
            wl = b2 / nL if nL else 0.0
            g0 = sys_.H0[didx]
            A0 = sys_.matrix(a2, w if mu_v is None else w + mu, wl, eps)
            if tau >= 1.0:
                rhs = sys_.GT @ (w[:, None] * (Qn - g0))
            else:
                nq = np.einsum("ij,ij->i", Qn - g0, NQ)[:, None] * NQ
                rhs = sys_.GT @ (w[:, None] * (tau * (Qn - g0) + (1 - tau) * nq))
            if mu_v is not None:        # the prior: mu |g - S|^2 (tangential: the normal part removed)
                dS = Sd - g0
                if tang:
                    # tangential only where the scan holds the normal position; where this
                    # iteration has no correspondence the pull is isotropic (the vertex keeps
                    # its start), which also keeps the isotropic factor a good preconditioner
                    NT = vertex_normals(cur, F)[didx]
                    held = (w > 0)[:, None]     # the scan holds these vertices' normal position
                    mt = np.where(w > 0, mu, 0.0)
                    dS = dS - held * np.einsum("ij,ij->i", dS, NT)[:, None] * NT
                rhs = rhs + sys_.GT @ (mu[:, None] * dS)
            rhs = rhs + eps * X
            if nL:
                rhs = rhs + wl * (sys_.H.T @ (Yn - sys_.h0))

            if tau >= 1.0 and not tang:
                apply_A = A0.__matmul__
            else:
                def apply_A(Z, A0=A0, w=w, NQ=NQ, tau=tau, tang=tang):
                    GZ = sys_.G @ Z
                    c = np.zeros_like(GZ)
                    if tau < 1.0:
                        c += (1 - tau) * w[:, None] * (np.einsum("ij,ij->i", GZ, NQ)[:, None] * NQ - GZ)
                    if tang:
                        c -= mt[:, None] * np.einsum("ij,ij->i", GZ, NT)[:, None] * NT
                    return A0 @ Z + sys_.GT @ c
            n_cg = 0
            if factor is not None:
                Xn, n_cg, conv = _pcg(apply_A, rhs, X, factor.solve, params.pcg_tol, params.pcg_max_iterations)
                if not conv:
                    factor = None
            if factor is None:
                factor = _Factor(A0)
                if tau >= 1.0 and not tang:
                    Xn = factor.solve(rhs)
                else:
                    Xn, k, _ = _pcg(apply_A, rhs, X, factor.solve, params.pcg_tol, 10 * params.pcg_max_iterations)
                    n_cg += k
            X = Xn
            new = to_mm(sys_.positions(X))
            motion = float(np.sqrt(np.mean(np.sum((new - cur) ** 2, axis=1))))
            cur = new
            # energy terms (normalised frame) after the solve
            Pn = to_n(cur)
            r = Pn[didx] - Qn
            if tau < 1.0:
                rn = np.einsum("ij,ij->i", r, NQ)
                e_data = float(np.sum(w * (rn ** 2 + tau * (np.sum(r * r, axis=1) - rn ** 2))))
            else:
                e_data = float(np.sum(w * np.sum(r * r, axis=1)))
            e_pr = 0.0
            if mu_v is not None:
                rp = Pn[didx] - Sd
                if tang:
                    rp = rp - held * np.einsum("ij,ij->i", rp, NT)[:, None] * NT
                e_pr = float(np.sum(mu * np.sum(rp * rp, axis=1)))
            Xd = X if full else X - np.tile(np.vstack([np.eye(3), np.zeros((1, 3))]), (lev.n, 1))
            e_st = float(a2 * np.sum(Xd * (S_mat @ Xd)))
            lres = np.sum((BL @ Pn - Yn) ** 2, axis=1) if nL else np.zeros(0)
            e_lm = float(wl * lres.sum())
            lm_rmse = float(np.sqrt(lres.mean()) * s) if nL else float("nan")
            acc = int(ok.sum())
            records.append(NicpIteration(
                si, step.level, it, float(step.stiffness), float(step.landmark_weight), float(step.max_distance_mm),
                e_data + e_st + e_lm + e_pr, e_data, e_st, e_lm, float(1.0 - acc / len(didx)), int(bad_d.sum()),
                int(bad_n.sum()), int(bad_b.sum()), float(dist[ok].mean()) if acc else float("nan"), lm_rmse, motion,
                int(n_cg), time.perf_counter() - t0))
            if motion < params.convergence_mm:
                break

    # safeguard: relax the few triangles that turned over or degenerated (strongly compressed
    # lids and mouth corners with noisy, nearly coincident landmarks)
    ref_fn = np.cross(Vref[F[:, 1]] - Vref[F[:, 0]], Vref[F[:, 2]] - Vref[F[:, 0]])
    cur, n_rounds, n_moved = _untangle(cur, F, ref_fn, params.min_angle_deg, params.untangle_rounds,
                                       params.untangle_step, params.untangle_ring_after)
    last = params.schedule[-1]
    Q, NQ, dist, ok, *_ = correspond(cur, np.arange(n), last.max_distance_mm)
    valid = ok & (dist <= params.valid_distance_mm)
    return NicpResult(cur, dist, valid, tuple(records), time.perf_counter() - t_start, n_rounds, n_moved)
