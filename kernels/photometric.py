"""Photometric refinement: the skin's motion along the surface, read from its colour detail.

Geometry fixes a registration's position along the scan's normal, but hardly along the
surface where the skin is smooth and has no landmark: in a grin the skin between the mouth
corners and the nose wings slides ~4 mm up, and a geometric NICP started from the subject's
neutral registration leaves it near its neutral place. The skin's colour detail (freckles,
mottling, vessels: a few mm across) moves with the skin. Given a *reference*, the detail
each template vertex saw on another scan of the same subject (its neutral registration),
block matching on the template mesh finds for every vertex the displacement within its
tangent plane that brings the scan's detail under it; :func:`kernels.registration.register`
(stage 2c) then pulls the vertices to those targets with a short NICP.

Detail = relative luminance, ``lum / mean(lum within highpass_radius_mm) - 1``, computed on
the scan's coloured points pooled into cells of ``cell_mm``: shading multiplies the albedo
and varies slowly over the surface, so the ratio hardly depends on the lighting, the view or
the camera's exposure, and the slowly varying skin colour (cheek redness) drops out.

* :class:`PhotometricParams`: every parameter (defaults measured in ``docs/registration.md``).
* :class:`ScanTexture`: a scan's coloured points -> detail, sampled at any point.
* :func:`texture_flow`: block matching of a reference detail per template vertex against a
  scan's detail -> per-vertex tangential displacement and a match flag.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from kernels._checks import as_array, check_int, check_number
from kernels.nicp import vertex_normals

try:  # fused loop (optional; the numpy path below is the reference)
    from kernels import _fast_photometric as _fast
except ImportError:  # pragma: no cover - numba not installed
    _fast = None

__all__ = ["PhotometricParams", "ScanTexture", "TextureFlow", "flow_grid", "robust_std", "texture_flow"]

SAMPLE_SIGMA = 0.6  # Gaussian width of ScanTexture.sample, in cells
LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 luminance weights


@dataclass(frozen=True)
class PhotometricParams:
    """Parameters of the photometric refinement (stage 2c of :func:`kernels.registration.register`).

    Attributes
    ----------
    enabled : bool
        Run stage 2c when a scan texture and a start's detail are given (default True).
    cell_mm : float
        Coloured scan points are pooled into cubic cells of this size before anything else
        (default 1 mm): the work no longer depends on the scan's point density.
    highpass_radius_mm : float
        Radius of the local mean luminance the detail is relative to (default 4 mm).
    min_luminance : float
        Cells whose local mean luminance is below this carry no detail (NaN; default 0.03:
        nostrils, the mouth cavity, dark hair).
    search_mm : float
        Radius of the disc of offsets searched in the tangent plane (default 6 mm).
    step_mm : float
        Spacing of the search offsets (default 1 mm); the best offset is refined below
        the spacing by a parabola through its neighbours.
    flow_spacing_mm : float
        The flow is computed on one vertex per cubic cell of this size (default 2 mm,
        :func:`flow_grid`); the NICP carries the other vertices along.
    patch_radius_mm : float
        Radius of the patch whose detail is compared: a grid vertex's costs are averaged
        over the grid vertices within it (Gaussian weights, sigma = radius / 2; default 7 mm).
    min_contrast : float
        A vertex is matched when ``(median cost - best cost) / median cost`` over its window
        is at least this (default 0.7): a flat cost means no usable detail, and a slide
        beyond the window leaves only false minima (contrast 0.4-0.67 on the textured plane
        of ``tests/test_photometric.py``, against 0.73-1.0 for true matches on face scans).
    min_support : float
        ... and when at least this fraction of its patch had detail on both sides at the
        best offset (default 0.5).
    max_deviation_mm : float
        ... and when its displacement is within this of the weighted mean of the other
        matches in its patch (default 1.5 mm): a lone match that disagrees with its
        neighbours is a false minimum (motion beyond the window, strong stretch).
    min_flow_mm : float
        Displacements up to this are set to 0 (the vertex is held where it is; default
        0.5 mm): on pipeline scans they are within the flow's noise.
    min_detail_std : float
        Stage 2c runs only when the scan's and the reference's detail have at least this
        robust standard deviation (:attr:`ScanTexture.detail_std`, default 0.015): on skin
        without visible detail the matches follow the colour noise (over a 7 mm patch a
        sharp minimum is not rare there) and made every exaggerated expression worse.
    skip_parts : tuple of str
        Template parts without texture targets (default ``("eyes",)``: the lids slide over
        the eyeball and the iris / sclera pattern is not skin, it does not move with it).
        Names the template does not have are ignored (a user template's parts are its own).
    rounds : int
        Match-then-pull rounds (default 1; a second round, matching from the first one's
        result, changed the test-size errors by less than 0.01 mm).
    stiffness, landmark_weight : float
        The pull's NICP step on the full template (defaults 0.003 and 0.2: the last step of
        the default schedule).
    iterations : int
        NICP iterations per round (default 4).
    max_distance_mm : float
        Correspondence distance limit of the vertices without a match (default 3 mm).
    """

    enabled: bool = True
    cell_mm: float = 1.0
    highpass_radius_mm: float = 4.0
    min_luminance: float = 0.03
    search_mm: float = 6.0
    step_mm: float = 1.0
    max_deviation_mm: float = 1.5
    min_detail_std: float = 0.015
    min_flow_mm: float = 0.5
    flow_spacing_mm: float = 2.0
    patch_radius_mm: float = 7.0
    min_contrast: float = 0.7
    min_support: float = 0.5
    skip_parts: tuple = ("eyes",)
    rounds: int = 1
    stiffness: float = 0.003
    landmark_weight: float = 0.2
    iterations: int = 4
    max_distance_mm: float = 3.0

    def __post_init__(self):
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise ValueError(f"PhotometricParams.enabled: must be a bool, got {self.enabled!r}")
        for name in ("cell_mm", "highpass_radius_mm", "search_mm", "step_mm", "max_deviation_mm",
                     "flow_spacing_mm",
                     "patch_radius_mm", "max_distance_mm"):
            check_number(getattr(self, name), f"PhotometricParams.{name}", lo=0, lo_open=True)
        for name in ("min_contrast", "min_support", "min_luminance", "min_detail_std"):
            check_number(getattr(self, name), f"PhotometricParams.{name}", lo=0, hi=1)
        for name in ("stiffness", "landmark_weight", "min_flow_mm"):
            check_number(getattr(self, name), f"PhotometricParams.{name}", lo=0)
        check_int(self.rounds, "PhotometricParams.rounds", 0)
        if isinstance(self.skip_parts, str) or not all(isinstance(a, str) for a in self.skip_parts):
            raise ValueError(f"PhotometricParams.skip_parts: expected a tuple of part names, got {self.skip_parts!r}")
        object.__setattr__(self, "skip_parts", tuple(self.skip_parts))
        check_int(self.iterations, "PhotometricParams.iterations", 1)
        if self.step_mm > self.search_mm:
            raise ValueError(f"PhotometricParams.step_mm ({self.step_mm}) must not exceed search_mm ({self.search_mm})")
        if self.highpass_radius_mm < 2 * self.cell_mm:
            raise ValueError(f"PhotometricParams.highpass_radius_mm ({self.highpass_radius_mm}) must be at least "
                             f"2 * cell_mm ({2 * self.cell_mm})")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (float, np.floating)):
                object.__setattr__(self, f.name, float(v))


def robust_std(x) -> float:
    """1.4826 x the median absolute deviation of the finite values of ``x`` (0 without any):
    the standard deviation of normal data, not swayed by a few edges (lips, brows)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else 0.0


class _SparseGrid:
    """Occupied cells of a regular grid: integer cell coordinates -> row.

    Rows are found in a dense index array over the cells' bounding box when it has at most
    ``DENSE_MAX_CELLS`` cells (a face at 1 mm: ~15M cells, 60 MB, for the duration of one
    registration), else by binary search in the sorted cell keys.
    """

    DENSE_MAX_CELLS = 2 ** 24

    def __init__(self, cells: np.ndarray):
        self.origin = cells.min(axis=0) - 2          # room for the neighbours of every cell
        c = cells - self.origin
        if c.max() + 2 >= 2 ** 21:
            raise ValueError(f"points span {int(c.max())} grid cells along an axis; at most 2^21 - 3")
        self.keys, self.inverse = np.unique(self._key(c), return_inverse=True)
        self.inverse = self.inverse.ravel()
        self.shape = tuple(int(x) for x in c.max(axis=0) + 3)
        self.dense = None
        if np.prod(np.array(self.shape, dtype=np.float64)) <= self.DENSE_MAX_CELLS:
            self.dense = np.full(self.shape, -1, dtype=np.int32)
            u = self._unkey(self.keys)
            self.dense[u[:, 0], u[:, 1], u[:, 2]] = np.arange(len(self.keys), dtype=np.int32)

    @staticmethod
    def _unkey(k: np.ndarray) -> np.ndarray:
        m = (1 << 21) - 1
        return np.stack([k >> 42, (k >> 21) & m, k & m], axis=1)

    def cells(self) -> np.ndarray:
        """(len, 3) integer coordinates of the occupied cells, in row order."""
        return self._unkey(self.keys) + self.origin

    @staticmethod
    def _key(c: np.ndarray) -> np.ndarray:
        return (c[..., 0] << 42) | (c[..., 1] << 21) | c[..., 2]

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of integer cells (..., 3) and whether each is occupied (row 0 where not)."""
        c = cells - self.origin
        if self.dense is not None:
            inside = np.all((c >= 0) & (c < np.array(self.shape)), axis=-1)
            c = np.where(inside[..., None], c, 0)
            i = self.dense[c[..., 0], c[..., 1], c[..., 2]]
            hit = inside & (i >= 0)
            return np.where(hit, i, 0), hit
        inside = np.all((c >= 0) & (c < 2 ** 21), axis=-1)
        k = self._key(np.where(inside[..., None], c, 0))
        i = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
        hit = inside & (self.keys[i] == k)
        return np.where(hit, i, 0), hit


_CORNERS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.int64)
_BLOCK = np.array([[a, b, c] for a in range(3) for b in range(3) for c in range(3)], dtype=np.int64)


def _trilinear(grid: _SparseGrid, values: np.ndarray, x: np.ndarray, min_weight: float):
    """Trilinear interpolation of per-cell ``values`` (NaN = none) at grid coordinates ``x``
    (m, 3) (cell centres at integer + 0.5), over the occupied corners with a value; NaN where
    their weights sum to less than ``min_weight``."""
    u = x - 0.5
    base = np.floor(u).astype(np.int64)
    f = u - base
    num = np.zeros(len(x))
    den = np.zeros(len(x))
    for c in _CORNERS:
        i, hit = grid.find(base + c)
        v = values[i]
        ok = hit & np.isfinite(v)
        w = np.prod(np.where(c == 1, f, 1.0 - f), axis=1) * ok
        num += w * np.where(ok, v, 0.0)
        den += w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den >= min_weight, num / den, np.nan)


class ScanTexture:
    """A scan's colour detail: coloured points -> relative luminance detail per grid cell.

    The coloured points are pooled into cubic cells of ``cell_mm`` (mean luminance per
    occupied cell). The local mean luminance is a box mean over 3 x 3 x 3 cells of
    ``highpass_radius_mm / 2`` (a 1.5 ``highpass_radius_mm`` cube), interpolated
    trilinearly at each fine cell; the detail of a cell is ``lum / local mean - 1``. Both
    grids store only their occupied cells (:class:`_SparseGrid`): the cost is proportional
    to the points, whatever their extent.

    Parameters
    ----------
    points : (k, 3) float64
        Coloured scan points, mm (e.g. the fused cloud); rows with a NaN point or colour are
        ignored.
    colours : (k, 3) float64
        RGB in [0, 1] (any linear scale works: the detail is a ratio), NaN rows unknown.
    params : PhotometricParams
        ``cell_mm``, ``highpass_radius_mm``, ``min_luminance`` are used.

    Attributes
    ----------
    cells : (c, 3) float64
        Mean position of the points of each occupied cell, mm.
    detail : (c,) float64
        ``lum / local mean - 1`` per cell (NaN where the local mean is darker than
        ``min_luminance``).
    detail_std : float
        Robust standard deviation of ``detail`` (1.4826 x its median absolute deviation):
        0.03-0.04 on the pipeline's fused colours of the simulator's skin; on skin without
        detail ~0.007 (1 % colour noise) to 0.010-0.012 (pipeline colours, 1280 x 1024).

    Raises
    ------
    ValueError
        Bad shapes, infinite values, colours outside [0, 1], fewer than 10 coloured points,
        points spanning more than 2^21 cells along an axis.
    """

    def __init__(self, points, colours, params: PhotometricParams = PhotometricParams()):
        if not isinstance(params, PhotometricParams):
            raise ValueError(f"params: expected PhotometricParams, got {type(params).__name__}")
        P = as_array(points, "points", (None, 3))
        C = as_array(colours, "colours", (P.shape[0], 3))
        if np.isinf(P).any() or np.isinf(C).any():
            raise ValueError("points / colours: contain infinite values (NaN rows mean unknown)")
        ok = np.isfinite(P).all(axis=1) & np.isfinite(C).all(axis=1)
        if ok.sum() < 10:
            raise ValueError(f"colours: {int(ok.sum())} coloured points, need at least 10")
        C = C[ok]
        if C.min() < 0 or C.max() > 1:
            raise ValueError(f"colours: values must be in [0, 1], got range [{C.min():.3g}, {C.max():.3g}]")
        P = P[ok]
        self.params = params
        h = params.cell_mm
        lum = C @ LUMA
        self._grid = g = _SparseGrid(np.floor(P / h).astype(np.int64))
        cnt = np.bincount(g.inverse, minlength=len(g))
        self.cells = np.stack([np.bincount(g.inverse, P[:, d], len(g)) for d in range(3)], axis=1) / cnt[:, None]
        lum_c = np.bincount(g.inverse, lum, len(g)) / cnt
        # local mean: box sums over 3^3 coarse cells, interpolated at the fine cells' centres
        hc = 0.5 * params.highpass_radius_mm
        centres = (g.cells() + 0.5) * h
        cg = _SparseGrid(np.floor(centres / hc).astype(np.int64))
        s0 = np.bincount(cg.inverse, lum_c, len(cg))
        n0 = np.bincount(cg.inverse, None, len(cg)).astype(np.float64)
        coarse = cg.cells()
        bs = np.zeros(len(cg))
        bn = np.zeros(len(cg))
        for o in np.array(np.meshgrid(*(np.arange(-1, 2),) * 3, indexing="ij")).reshape(3, -1).T:
            i, hit = cg.find(coarse + o)
            bs += np.where(hit, s0[i], 0.0)
            bn += np.where(hit, n0[i], 0.0)
        box = bs / np.maximum(bn, 1.0)
        mean = _trilinear(cg, box, centres / hc, 1e-9)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.detail = np.where(mean >= params.min_luminance, lum_c / mean - 1.0, np.nan)
        self.detail_std = robust_std(self.detail)

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def sample(self, points, engine: str = "auto") -> np.ndarray:
        """Detail at ``points`` (m, 3) mm: Gaussian-weighted mean (sigma ``SAMPLE_SIGMA`` = 0.6
        ``cell_mm``) over the 3 x 3 x 3 cells around the point's cell, each at its points'
        centroid (so the value sits where it was seen, whatever the surface's position in the
        cell); NaN where no such cell with a detail has its centroid within 1.5 ``cell_mm``.

        ``engine``: "auto" (the numba loop when available and the cell index is dense),
        "numpy" (the reference) or "numba"."""
        Q = as_array(points, "points", (None, 3), finite=True)
        if engine not in ("auto", "numpy", "numba"):
            raise ValueError(f"engine: expected 'auto', 'numpy' or 'numba', got {engine!r}")
        h = self.params.cell_mm
        s2 = 2.0 * (SAMPLE_SIGMA * h) ** 2
        fast = _fast is not None and self._grid.dense is not None
        if engine == "numba" and not fast:
            raise ValueError("engine: 'numba' needs numba and a dense cell index")
        if engine != "numpy" and fast:
            out = np.empty(len(Q))
            _fast.sample_dense(Q, float(h), self._grid.origin.astype(np.int64), self._grid.dense, self.cells,
                               self.detail, s2, (1.5 * h) ** 2, out)
            return out
        base = np.floor(Q / h).astype(np.int64) - 1
        num = np.zeros(len(Q))
        den = np.zeros(len(Q))
        dmin = np.full(len(Q), np.inf)
        for c in _BLOCK:
            i, hit = self._grid.find(base + c)
            v = self.detail[i]
            ok = hit & np.isfinite(v)
            d2 = np.sum((Q - self.cells[i]) ** 2, axis=1)
            w = np.where(ok, np.exp(-d2 / s2), 0.0)
            num += w * np.where(ok, v, 0.0)
            den += w
            dmin = np.minimum(dmin, np.where(ok, d2, np.inf))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((dmin <= (1.5 * h) ** 2) & (den > 0), num / den, np.nan)


@dataclass(frozen=True)
class TextureFlow:
    """Outcome of :func:`texture_flow` (per template vertex).

    Attributes
    ----------
    displacement : (n, 3) float64
        Tangential displacement, mm, that brings the scan's detail under the vertex (zero
        rows where not matched).
    matched : (n,) bool
        Matched vertices: on the flow grid, with a clear, supported minimum inside the
        search window (not on its rim).
    contrast : (n,) float64
        ``(median cost - best cost) / median cost`` (NaN off the flow grid or where the
        patch had no detail).
    grid : (g,) int64
        The vertices the flow was computed at (one per ``flow_spacing_mm`` cell).
    """

    displacement: np.ndarray
    matched: np.ndarray
    contrast: np.ndarray
    grid: np.ndarray


def flow_grid(vertices, spacing_mm: float) -> np.ndarray:
    """Sorted indices of a subset of ``vertices`` (n, 3) mm: the vertex nearest the centre
    of each occupied cubic cell of ``spacing_mm``."""
    V = np.asarray(vertices, float)
    c = np.floor(V / spacing_mm)
    cell = _SparseGrid(c.astype(np.int64)).inverse
    d = np.linalg.norm(V - (c + 0.5) * spacing_mm, axis=1)
    order = np.lexsort((d, cell))
    first = np.r_[True, cell[order][1:] != cell[order][:-1]]
    return np.sort(order[first])


def _tangent_frames(N: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex tangent frames (e1, e2): e2 the projection of ``up`` (a fallback axis where
    the normal is nearly parallel to it), e1 = e2 x N. Neighbouring frames agree, so costs
    can be averaged over a patch offset by offset."""
    e2 = up[None, :] - (N @ up)[:, None] * N
    nrm = np.linalg.norm(e2, axis=1)
    bad = nrm < 0.1
    if bad.any():
        alt = np.array([1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
        e2[bad] = alt - (N[bad] @ alt)[:, None] * N[bad]
        nrm[bad] = np.linalg.norm(e2[bad], axis=1)
    e2 /= nrm[:, None]
    return np.cross(e2, N), e2


def _parabola(cm, c0, cp):
    """Offset (in steps, within [-0.5, 0.5]) of the minimum of a parabola through 3 costs."""
    den = cm - 2.0 * c0 + cp
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(np.isfinite(den) & (den > 0), 0.5 * (cm - cp) / den, 0.0)
    return np.clip(np.nan_to_num(t), -0.5, 0.5)


def texture_flow(vertices, faces, reference, texture: ScanTexture, params: PhotometricParams = PhotometricParams(),
                 up=(0.0, 1.0, 0.0), normals=None) -> TextureFlow:
    """Tangential displacement per template vertex that matches its reference detail on a scan.

    On a subset of the vertices (:func:`flow_grid`, ``flow_spacing_mm``) and for every
    offset ``(a, b) * step_mm`` within a disc of radius ``search_mm`` in each vertex's
    tangent plane, the squared difference between the scan's detail at the displaced
    vertex and the vertex's reference detail is averaged over the vertex's patch (the grid
    vertices within ``patch_radius_mm``, Gaussian weights of sigma ``patch_radius_mm / 2``;
    NaN samples left out); the offset of least mean cost, refined below the grid spacing by
    parabolas, is the vertex's displacement.

    Parameters
    ----------
    vertices : (n, 3) float64
        Current registration, mm, in the scan's frame.
    faces : (f, 3) int
        Template triangles (for the normals).
    reference : (n,) float64
        The detail each vertex should see (e.g. ``RegistrationResult.detail`` of the
        subject's neutral registration), NaN where unknown.
    texture : ScanTexture
        The scan's detail.
    params : PhotometricParams
    up : (3,) float64
        The face's up direction in the scan frame (tangent frames are built from it so
        that neighbouring vertices' offsets agree; default +y).
    normals : (n, 3) float64, optional
        Unit vertex normals (default: area-weighted normals of ``vertices``).

    Returns
    -------
    TextureFlow

    Raises
    ------
    ValueError
        Bad shapes, non-finite vertices, face indices out of range, a zero ``up``,
        ``texture`` not a ScanTexture.
    """
    V = as_array(vertices, "vertices", (None, 3), finite=True)
    n = V.shape[0]
    F = as_array(faces, "faces", (None, 3), dtype=np.int64)
    if F.size and (F.min() < 0 or F.max() >= n):
        raise ValueError(f"faces: indices must be in [0, {n}), got range [{F.min()}, {F.max()}]")
    ref = as_array(reference, "reference", (n,))
    if np.isinf(ref).any():
        raise ValueError("reference: contains infinite values (NaN means unknown)")
    if not isinstance(texture, ScanTexture):
        raise ValueError(f"texture: expected a ScanTexture, got {type(texture).__name__}")
    if not isinstance(params, PhotometricParams):
        raise ValueError(f"params: expected PhotometricParams, got {type(params).__name__}")
    u = as_array(up, "up", (3,), finite=True)
    if np.linalg.norm(u) == 0:
        raise ValueError("up: must not be the zero vector")
    u = u / np.linalg.norm(u)
    N = vertex_normals(V, F) if normals is None else as_array(normals, "normals", (n, 3), finite=True)

    disp = np.zeros((n, 3))
    matched = np.zeros(n, bool)
    contrast = np.full(n, np.nan)
    grid = flow_grid(V, params.flow_spacing_mm)
    grid = grid[np.isfinite(ref[grid])]
    if grid.size == 0:
        return TextureFlow(disp, matched, contrast, grid)
    Vg, rg = V[grid], ref[grid]
    e1, e2 = _tangent_frames(N[grid], u)
    K = int(np.floor(params.search_mm / params.step_mm + 1e-9))
    g = np.arange(-K, K + 1)
    m = len(g)
    A, B = np.meshgrid(g, g, indexing="ij")
    in_disc = A ** 2 + B ** 2 <= (params.search_mm / params.step_mm + 1e-9) ** 2
    R2 = (params.search_mm / params.step_mm + 1e-9) ** 2

    def inside(a, b):
        return a ** 2 + b ** 2 <= R2

    rim = in_disc & ~(inside(A - 1, B) & inside(A + 1, B) & inside(A, B - 1) & inside(A, B + 1))
    ng = len(grid)
    num = np.zeros((ng, m * m))
    den = np.zeros((ng, m * m))
    h = params.step_mm
    for ia in range(m):                         # one query per row of the window
        cols = [ib for ib in range(m) if in_disc[ia, ib]]
        if not cols:
            continue
        bo = g[cols] * h
        Q = (Vg + (g[ia] * h) * e1)[:, None, :] + bo[None, :, None] * e2[:, None, :]
        smp = texture.sample(Q.reshape(-1, 3)).reshape(ng, len(cols))
        ok = np.isfinite(smp)
        j = ia * m + np.asarray(cols)
        num[:, j] = np.where(ok, (smp - rg[:, None]) ** 2, 0.0)
        den[:, j] = ok
    # patch means: Gaussian weights over the grid vertices within patch_radius_mm
    tree = cKDTree(Vg)
    D = tree.sparse_distance_matrix(tree, params.patch_radius_mm, output_type="coo_matrix")
    sig = 0.5 * params.patch_radius_mm
    Wm = sparse.coo_matrix((np.exp(-0.5 * (D.data / sig) ** 2), (D.row, D.col)), shape=(ng, ng)).tocsr()
    Wm = Wm + sparse.identity(ng, format="csr")       # the diagonal (distance 0 is not stored)
    Wm = sparse.diags(1.0 / np.asarray(Wm.sum(axis=1)).ravel()) @ Wm
    num = Wm @ num
    den = Wm @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        cost = np.where((den >= params.min_support) & in_disc.ravel()[None, :], num / den, np.inf)
    best = np.argmin(cost, axis=1)
    cb = cost[np.arange(ng), best]
    finite = np.isfinite(cost)
    any_f = finite.any(axis=1)
    med = np.full(ng, np.nan)
    if any_f.any():
        med[any_f] = np.nanmedian(np.where(finite, cost, np.nan)[any_f], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cg = np.where(any_f & (med > 0), (med - cb) / med, np.nan)
    ia, ib = best // m, best % m
    C3 = cost.reshape(ng, m, m)
    inner = ~rim.ravel()[best]
    ta = np.zeros(ng)
    tb = np.zeros(ng)
    k = np.flatnonzero(inner & np.isfinite(cb))
    if k.size:
        ta[k] = _parabola(C3[k, ia[k] - 1, ib[k]], cb[k], C3[k, ia[k] + 1, ib[k]])
        tb[k] = _parabola(C3[k, ia[k], ib[k] - 1], cb[k], C3[k, ia[k], ib[k] + 1])
    ok = inner & np.isfinite(cb) & (np.nan_to_num(cg, nan=-1.0) >= params.min_contrast)
    dg = ((g[ia] + ta) * h)[:, None] * e1 + ((g[ib] + tb) * h)[:, None] * e2
    # consistency: a match must agree with the mean of its patch's other matches (twice: the
    # first pass removes the gross outliers from the means of the second)
    Wo = (Wm - sparse.diags(Wm.diagonal())).tocsc()
    for _ in range(2):
        wk = Wo @ ok.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (Wo @ (dg * ok[:, None])) / wk[:, None]
        dev = np.linalg.norm(dg - mean, axis=1)
        ok &= (wk == 0) | (dev <= params.max_deviation_mm)
    # displacements within the flow's noise are no evidence of a slide: the vertex stays
    dg[np.linalg.norm(dg, axis=1) <= params.min_flow_mm] = 0.0
    disp[grid[ok]] = dg[ok]
    matched[grid[ok]] = True
    contrast[grid] = cg
    return TextureFlow(disp, matched, contrast, grid)
