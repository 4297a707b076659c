"""Per-view triangle mesh from an organised point cloud (IR pixel grid).

Paper section 3.1: each view gives a point cloud "with pixel-wise resolution"; its grid
structure defines a mesh directly. Neighbouring valid pixels are connected; an edge is
cut at a depth discontinuity, where the IR-frame depth step between the two pixels
exceeds ``max_step_px`` pixel footprints (footprint ``z / f`` mm at depth ``z``):

    |z_a - z_b| <= max_step_px * z_a / f_ir        (diagonals: times sqrt 2)

A step of ``k`` footprints per pixel is a surface tilted by ``atan(k)`` from facing the
camera, so the default ``k = 6`` keeps surfaces up to ~80 degrees from frontal and cuts
occlusion boundaries (nose over cheek: tens of footprints). Connected components with
fewer than ``min_component`` vertices (isolated speckles, e.g. a pixel decoded a whole
fringe period off) are dropped. The same continuity rule is used by
:mod:`kernels.depth`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kernels._checks import check_positive


@dataclass(frozen=True)
class GridMeshParams:
    """Thresholds of :func:`grid_mesh`.

    Attributes
    ----------
    max_step_px : float
        Maximum depth step between neighbours in pixel footprints (default 6, ~80 deg).
    min_component : int
        Connected components with fewer vertices are removed (default 64).
    """

    max_step_px: float = 6.0
    min_component: int = 64

    def __post_init__(self):
        check_positive(self.max_step_px, "GridMeshParams.max_step_px")
        if int(self.min_component) < 1:
            raise ValueError(f"GridMeshParams.min_component: must be >= 1, got {self.min_component}")


def neighbour_links(depth, focal_px: float, max_step_px: float = 6.0):
    """Continuity of the 4-neighbour and diagonal links of an organised depth map.

    Parameters
    ----------
    depth : (H, W) float32
        IR-frame depth ``z`` in mm, NaN where there is no point.
    focal_px : float
        IR focal length in pixels (``fx``).
    max_step_px : float
        Allowed depth step in pixel footprints.

    Returns
    -------
    right : (H, W-1) bool
        Pixel ``[r, c]`` links to ``[r, c+1]``.
    down : (H-1, W) bool
        ``[r, c]`` links to ``[r+1, c]``.
    anti : (H-1, W-1) bool
        ``[r, c+1]`` links to ``[r+1, c]`` (the diagonal used to split cells).
    diag : (H-1, W-1) bool
        ``[r, c]`` links to ``[r+1, c+1]``.
    """
    z = np.asarray(depth, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"depth: expected shape (H, W), got {z.shape}")
    check_positive(focal_px, "focal_px")
    check_positive(max_step_px, "max_step_px")
    thr = z * np.float32(max_step_px / focal_px)  # NaN where no point: comparisons are False
    with np.errstate(invalid="ignore"):
        right = np.abs(z[:, 1:] - z[:, :-1]) <= thr[:, :-1]
        down = np.abs(z[1:, :] - z[:-1, :]) <= thr[:-1, :]
        t2 = thr[:-1, :-1] * np.float32(np.sqrt(2.0))
        anti = np.abs(z[1:, :-1] - z[:-1, 1:]) <= t2
        diag = np.abs(z[1:, 1:] - z[:-1, :-1]) <= t2
    return right, down, anti, diag


@dataclass(frozen=True)
class GridMesh:
    """Triangle mesh of one view.

    Attributes
    ----------
    vertices : (n, 3) float32
        Vertex positions in mm (the frame of the input points).
    faces : (m, 3) int32
        Vertex indices; counter-clockwise seen from the IR camera (normals point to it).
    pixel : (n,) int64
        Row-major IR pixel index ``r * W + c`` of each vertex.
    vertex_map : (H, W) int32
        Vertex index of each IR pixel, -1 where none.
    n_components : int
        Number of kept connected components.
    """

    vertices: np.ndarray
    faces: np.ndarray
    pixel: np.ndarray
    vertex_map: np.ndarray
    n_components: int


def grid_mesh(points, depth, focal_px: float, params: GridMeshParams = GridMeshParams()) -> GridMesh:
    """Triangulate an organised point cloud along its pixel grid.

    Each 2x2 cell ``a=[r,c], b=[r,c+1], c=[r+1,c], d=[r+1,c+1]`` gives the triangles
    ``(a, c, b)`` and ``(b, c, d)`` (split along ``b-c``) when all their edges are
    continuous; when ``b`` or ``c`` is missing the other split ``(a, c, d)`` /
    ``(a, d, b)`` is used. Then vertex-connected components smaller than
    ``params.min_component`` are dropped (labelled on a 2x upsampled grid where links
    are cells, so cut edges separate components).

    Parameters
    ----------
    points : (H, W, 3) float
        Organised points in mm (any frame), NaN where invalid.
    depth : (H, W) float
        IR-frame depth of the same pixels (mm), NaN where invalid (used by the
        discontinuity test).
    focal_px : float
        IR focal length ``fx`` (pixels).
    params : GridMeshParams

    Returns
    -------
    GridMesh

    Raises
    ------
    ValueError
        ``points`` not ``(H, W, 3)``, ``depth`` not ``(H, W)``, bad ``focal_px``.
    """
    P = np.asarray(points)
    if P.ndim != 3 or P.shape[2] != 3:
        raise ValueError(f"points: expected shape (H, W, 3), got {P.shape}")
    z = np.asarray(depth, dtype=np.float32)
    if z.shape != P.shape[:2]:
        raise ValueError(f"depth: expected shape {P.shape[:2]} (as points), got {z.shape}")
    if not isinstance(params, GridMeshParams):
        raise ValueError(f"params: expected GridMeshParams, got {type(params).__name__}")
    H, W = z.shape
    right, down, anti, diag = neighbour_links(z, focal_px, params.max_step_px)
    # triangles of each cell (H-1, W-1)
    ab, cd = right[:-1, :], right[1:, :]
    ac, bd = down[:, :-1], down[:, 1:]
    t1 = ac & ab & anti             # (a, c, b)
    t2 = anti & bd & cd             # (b, c, d)
    t3 = ~anti & ac & cd & diag     # (a, c, d)  when the b-c split is not available
    t4 = ~anti & diag & bd & ab     # (a, d, b)
    # vertex connectivity through triangle edges, labelled on a (2H-1, 2W-1) grid
    G = np.zeros((2 * H - 1, 2 * W - 1), bool)
    used = np.zeros((H, W), bool)
    tri_any = t1 | t2 | t3 | t4
    used[:-1, :-1] |= t1 | t3 | t4
    used[:-1, 1:] |= t1 | t2 | t4
    used[1:, :-1] |= t1 | t2 | t3
    used[1:, 1:] |= t2 | t3 | t4
    G[::2, ::2] = used
    G[::2, 1::2][:-1] |= (t1 | t4)         # edge a-b
    G[::2, 1::2][1:] |= (t2 | t3)          # edge c-d
    G[1::2, ::2][:, :-1] |= (t1 | t3)      # edge a-c
    G[1::2, ::2][:, 1:] |= (t2 | t4)       # edge b-d
    G[1::2, 1::2] = tri_any                # the cell's diagonal (either split)
    labels, n = ndimage.label(G)
    vlab = labels[::2, ::2]
    counts = np.bincount(vlab[used], minlength=n + 1)
    keep_label = counts >= int(params.min_component)
    keep_label[0] = False
    keep = used & keep_label[vlab]
    vertex_map = np.full(H * W, -1, np.int32)
    pix = np.flatnonzero(keep.reshape(-1))
    vertex_map[pix] = np.arange(pix.size, dtype=np.int32)
    vm = vertex_map.reshape(H, W)
    a, b = vm[:-1, :-1], vm[:-1, 1:]
    c, d = vm[1:, :-1], vm[1:, 1:]
    faces = []
    for tmask, (i, j, k) in ((t1, (a, c, b)), (t2, (b, c, d)), (t3, (a, c, d)), (t4, (a, d, b))):
        m = tmask & (i >= 0) & (j >= 0) & (k >= 0)
        faces.append(np.stack([i[m], j[m], k[m]], axis=1))
    F = np.concatenate(faces).astype(np.int32) if faces else np.zeros((0, 3), np.int32)
    V = P.reshape(-1, 3)[pix].astype(np.float32)
    n_comp = int(np.count_nonzero(keep_label))
    return GridMesh(V, F, pix.astype(np.int64), vm, n_comp)
