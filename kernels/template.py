"""Registration template: a triangle mesh with 106 landmarks and per-vertex face parts.

Paper section 4.1 registers every fused scan to one template topology so that PCA can be
computed over vertices. :func:`default_template` builds the project's template from the
synthetic model's mean face (:func:`kernels.synth.face.mean_face_mesh`), cropped to what
the scanner sees; :func:`make_template` validates a user-supplied one (read from files by
:func:`storage.template_io.read_template`). See ``docs/registration.md``.

Landmarks are barycentric points on template triangles (``landmark_faces``,
``landmark_bary``), so a landmark need not sit on a vertex; vertex-id landmarks are
converted to a one-hot barycentric point on a triangle using that vertex.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from kernels._checks import as_array, check_int, check_number
from kernels.synth.face import PART_NAMES, face_region, landmark_uv, mean_face_mesh, uv_grid

__all__ = ["N_LANDMARKS", "JawRig", "Template", "default_template", "default_jaw_rig", "make_jaw_rig",
           "make_template", "template_edges", "DEFAULT_MARGIN_DEG"]

N_LANDMARKS = 106
DEFAULT_MARGIN_DEG = 12.0
_MIN_VERTICES, _MAX_VERTICES = 1_000, 500_000


@dataclass(frozen=True)
class JawRig:
    """An articulated jaw on a template (as in FLAME): one hinge and per-vertex skinning weights.

    Posing by an angle ``a`` turns vertex i about the hinge (axis ``axis`` through
    ``pivot``) by ``weights[i] * a`` (:func:`kernels.jaw.pose_jaw`); a positive angle
    opens the mouth (the chin goes down and back).

    Attributes
    ----------
    weights : (n,) float64
        Jaw skinning weight of each template vertex in [0, 1]: 1 on the chin, lower lip and
        jaw, 0 on the upper face, a smooth ramp between.
    pivot : (3,) float64
        A point on the hinge axis, mm, template frame.
    axis : (3,) or (n, 3) float64
        Unit direction of the hinge axis (right-handed: a positive angle about it opens
        the jaw): one for all vertices (a hinge, e.g. through the temporomandibular
        joints) or one per vertex (every vertex turns about its own axis through the
        pivot; the default template's: perpendicular to the vertex's meridian plane).
    """

    weights: np.ndarray
    pivot: np.ndarray
    axis: np.ndarray

    def __post_init__(self) -> None:
        for name in ("weights", "pivot", "axis"):
            a = getattr(self, name)
            if a.flags.writeable:
                a = a.copy()
                a.setflags(write=False)
                object.__setattr__(self, name, a)


def make_jaw_rig(weights, pivot, axis, n_vertices: int) -> JawRig:
    """Validate a jaw rig for a template of ``n_vertices`` vertices.

    Parameters
    ----------
    weights : (n_vertices,) float
        Per-vertex jaw weights, finite, in [0, 1] (within 1e-6; clipped), at least one > 0.
    pivot : (3,) float
        Point on the hinge axis, mm, finite.
    axis : (3,) or (n_vertices, 3) float
        Hinge direction (or one per vertex), finite, non-zero (normalised here).
    n_vertices : int

    Returns
    -------
    JawRig

    Raises
    ------
    ValueError
        Naming the field: wrong shape, NaN/inf, weights outside [0, 1] or all zero, a zero
        axis.
    """
    W = as_array(weights, "jaw weights", (n_vertices,))
    if not np.all(np.isfinite(W)):
        raise ValueError(f"jaw weights: {int(np.sum(~np.isfinite(W)))} value(s) are NaN or infinite")
    if W.min() < -1e-6 or W.max() > 1.0 + 1e-6:
        raise ValueError(f"jaw weights: must be in [0, 1], got [{W.min():.6g}, {W.max():.6g}]")
    if not np.any(W > 0):
        raise ValueError("jaw weights: all zero (no vertex moves with the jaw)")
    P = as_array(pivot, "jaw pivot", (3,))
    if not np.all(np.isfinite(P)):
        raise ValueError("jaw pivot: must be finite")
    A = as_array(axis, "jaw axis", None)
    if A.shape not in ((3,), (n_vertices, 3)):
        raise ValueError(f"jaw axis: expected shape (3,) or ({n_vertices}, 3), got {tuple(A.shape)}")
    if not np.all(np.isfinite(A)):
        raise ValueError("jaw axis: must be finite")
    nrm = np.linalg.norm(A, axis=-1, keepdims=True)
    if np.any(nrm < 1e-12):
        bad = "" if A.ndim == 1 else f" (vertex {int(np.flatnonzero(nrm[:, 0] < 1e-12)[0])})"
        raise ValueError(f"jaw axis: must be non-zero{bad}")
    return JawRig(np.clip(W, 0.0, 1.0), P.copy(), A / nrm)


@dataclass(frozen=True)
class Template:
    """A registration template (all arrays read-only).

    Attributes
    ----------
    vertices : (n, 3) float64
        Rest positions, mm.
    faces : (m, 3) int32
        Triangles, counter-clockwise seen from outside (normals point out of the head).
    parts : (n,) uint8
        Face-part code of each vertex, an index into ``part_names``.
    part_names : tuple of str
        Names of the parts (the default template uses
        :data:`kernels.synth.face.PART_NAMES`).
    landmark_faces : (106,) int64
        Triangle holding each landmark.
    landmark_bary : (106, 3) float64
        Barycentric coordinates of each landmark in its triangle (rows sum to 1).
    uv : (n, 2) float64 or None
        Material coordinates (theta, phi) in radians of the synthetic model (default
        template only; None for a user template).
    jaw : JawRig or None
        Optional articulated jaw (hinge + per-vertex weights) used by the registration's
        jaw stage (:mod:`kernels.jaw`); None skips that stage. The default template
        carries :func:`default_jaw_rig`.
    """

    vertices: np.ndarray
    faces: np.ndarray
    parts: np.ndarray
    part_names: tuple
    landmark_faces: np.ndarray
    landmark_bary: np.ndarray
    uv: np.ndarray | None = None
    jaw: JawRig | None = None

    def __post_init__(self) -> None:
        for name in ("vertices", "faces", "parts", "landmark_faces", "landmark_bary", "uv"):
            a = getattr(self, name)
            if a is not None and a.flags.writeable:
                a = a.copy()
                a.setflags(write=False)
                object.__setattr__(self, name, a)

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    def landmark_weights(self, values) -> np.ndarray:
        """(106, ...) barycentric interpolation of per-vertex ``values`` (n, ...) at the landmarks."""
        tri = self.faces[self.landmark_faces]
        v = np.asarray(values)
        return np.einsum("kj,kj...->k...", self.landmark_bary, v[tri])

    def landmark_points(self, vertices=None) -> np.ndarray:
        """(106, 3) landmark positions on the template, or on ``vertices`` (n, 3) in template topology."""
        V = self.vertices if vertices is None else vertices
        tri = self.faces[self.landmark_faces]
        return np.einsum("kj,kjc->kc", self.landmark_bary, V[tri])


def template_edges(faces: np.ndarray) -> np.ndarray:
    """(e, 2) int64 unique undirected edges (i < j) of a triangle list."""
    f = np.asarray(faces, dtype=np.int64)
    he = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    he.sort(axis=1)
    base = int(f.max()) + 1
    key = np.unique(he[:, 0] * base + he[:, 1])
    return np.stack([key // base, key % base], axis=1)


# -- default template ----------------------------------------------------------------------

def _crop_mask(uv: np.ndarray, margin_deg: float) -> np.ndarray:
    """Vertices within ``margin_deg`` (in (theta, phi) degrees) of the face region."""
    d = np.degrees(uv)
    fr = face_region(uv)
    dist, _ = cKDTree(d[fr]).query(d, k=1, distance_upper_bound=margin_deg + 1e-9)
    return np.isfinite(dist)


def _crop_count(uv: np.ndarray, faces: np.ndarray, margin_deg: float) -> int:
    keep = _crop_mask(uv, margin_deg)
    fk = keep[faces].any(axis=1)
    used = np.zeros(len(uv), bool)
    used[faces[fk].ravel()] = True
    return int(used.sum())


def _grid_axes(uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Theta and phi axes (degrees) of a row-major uv grid (theta fastest)."""
    phi0 = uv[0, 1]
    nt = int(np.argmax(uv[:, 1] != phi0))
    return np.degrees(uv[:nt, 0]), np.degrees(uv[::nt, 1])


def _grid_landmarks(theta: np.ndarray, phi: np.ndarray, luv: np.ndarray):
    """Grid face ids (k,) and barycentric weights (k, 3) of the cells containing ``luv``.

    Same cell split as :func:`kernels.synth.face._grid_faces` (face ``2c``:
    ``(v00, v01, v11)``, face ``2c + 1``: ``(v00, v11, v10)`` of cell ``c``).
    """
    nt = len(theta)
    t, p = np.degrees(luv[:, 0]), np.degrees(luv[:, 1])
    j = np.clip(np.searchsorted(theta, t, "right") - 1, 0, nt - 2)
    i = np.clip(np.searchsorted(phi, p, "right") - 1, 0, len(phi) - 2)
    a = (t - theta[j]) / (theta[j + 1] - theta[j])
    b = (p - phi[i]) / (phi[i + 1] - phi[i])
    up = a >= b
    cell = i * (nt - 1) + j
    fid = 2 * cell + np.where(up, 0, 1)
    w = np.where(up[:, None], np.stack([1 - a, a - b, b], 1), np.stack([1 - b, a, b - a], 1))
    return fid.astype(np.int64), w


def _contact_line():
    L = landmark_uv()
    pts = np.array([L[96], 0.5 * (L[97] + L[103]), 0.5 * (L[98] + L[102]), 0.5 * (L[99] + L[101]), L[100]])
    return pts[np.argsort(pts[:, 0])]


def _contact_side(uv: np.ndarray) -> np.ndarray:
    """phi minus the lip contact line's phi at the same theta (radians; > 0 above)."""
    pts = _contact_line()
    return uv[:, 1] - np.interp(uv[:, 0], pts[:, 0], pts[:, 1])


def _mouth_slit(uv: np.ndarray, F: np.ndarray) -> np.ndarray:
    """(m,) bool: grid faces crossed by the lip contact line between the inner mouth corners.

    The contact line is the polyline (in (theta, phi)) through the inner-corner landmarks
    96 and 100 and the midpoints of the facing inner-lip landmarks (97, 103), (98, 102),
    (99, 101).
    """
    pts = _contact_line()
    sf = _contact_side(uv)[F]
    tf = uv[:, 0][F]
    inside = (tf.min(axis=1) > pts[0, 0]) & (tf.max(axis=1) < pts[-1, 0])
    return inside & (sf.min(axis=1) < 0) & (sf.max(axis=1) >= 0)


def _reattach(uv, F, fkeep, fid, bary, lost):
    """Move landmarks whose triangle was cut to the nearest kept triangle on their side of the slit."""
    fid, bary = fid.copy(), bary.copy()
    L = landmark_uv()
    cand = np.flatnonzero(fkeep)
    tri_uv = uv[F[cand]]
    cen = tri_uv.mean(axis=1)
    side = _contact_side(cen)
    for k in np.flatnonzero(lost):
        p = L[k]
        d = np.linalg.norm(cen - p, axis=1)
        d[np.sign(side) != np.sign(_contact_side(p[None])[0])] = np.inf
        j = int(np.argmin(d))
        A = tri_uv[j]
        ab = np.linalg.lstsq(np.column_stack([A[1] - A[0], A[2] - A[0]]), p - A[0], rcond=None)[0]
        b = np.clip(np.array([1.0 - ab.sum(), ab[0], ab[1]]), 0.0, None)   # clipped to the triangle
        fid[k], bary[k] = cand[j], b / b.sum()
    return fid, bary


def default_jaw_rig(uv) -> JawRig:
    """The jaw rig of the default template, from the synthetic model's jaw definition.

    Template knowledge, like the part labels (no scan data): the synthetic expressions
    open the jaw by turning the material down along the meridians about the head centre
    (:func:`kernels.synth.expressions.deform`) with the soft mask
    :func:`kernels.synth.expressions.jaw_weight` (1 on the lower lip, chin and jaw, 0
    above the mouth, a 30 mm ramp across the cheeks, fading towards the ears and down
    the neck). The rig is that mask evaluated at the mean face's material points, the
    pivot the head centre (the origin of the model frame) and per-vertex axes
    perpendicular to each vertex's meridian plane, ``(cos theta, 0, -sin theta)`` (on the
    midline the x axis, ear to ear): posing turns every vertex down its meridian, as
    the model does. (One x axis for all vertices is 10-15 mm off on the sides of the jaw
    at 15-25 degrees.)

    Parameters
    ----------
    uv : (n, 2) float64
        Material coordinates (theta, phi) in radians of the template vertices.

    Returns
    -------
    JawRig
        ``pivot = (0, 0, 0)``, ``axis`` (n, 3).
    """
    from kernels.synth.expressions import jaw_weight
    from kernels.synth.face_geometry import Domain

    uv = as_array(uv, "uv", (None, 2))
    td, pd = np.degrees(uv[:, 0]), np.degrees(uv[:, 1])
    dom = Domain.points(td, pd)
    w = np.clip(jaw_weight(dom.X, dom.Y, td, pd), 0.0, 1.0)
    axes = np.column_stack([np.cos(uv[:, 0]), np.zeros(len(uv)), -np.sin(uv[:, 0])])
    return JawRig(w, np.zeros(3), axes)


def default_template(n_vertices: int = 25_000, margin_deg: float = DEFAULT_MARGIN_DEG,
                     mouth_slit: bool = True, jaw: bool = True) -> Template:
    """The project's template: the synthetic mean face, cropped to the scanned region.

    The mean identity, neutral (:func:`kernels.synth.face.mean_face_mesh`), is generated
    on its (theta, phi) grid at the resolution that leaves about ``n_vertices`` vertices
    in the crop. The crop keeps the grid vertices within ``margin_deg`` degrees (in
    (theta, phi)) of the face region (:func:`kernels.synth.face.face_region`: forehead
    to chin, |theta| < 72 deg); with the default 12 deg this is |theta| < 84 deg, the
    jaw line minus 12 deg (under the chin) and the forehead top plus 12 deg. It holds
    the 33 contour landmarks (|theta| <= 81 deg) and is seen by the three groups of
    the default rig (which see |theta| < ~95 deg); the back of the head, the ears,
    the neck and the scalp are dropped. Kept: the triangles with at least one vertex in
    the margin (so a coarse grid still covers it), largest connected component.
    Deterministic; about 0.1 s for the default size.

    Parameters
    ----------
    n_vertices : int
        Wanted vertex count in the crop, in [1000, 500000]; met within 3%.
    margin_deg : float
        Margin around the face region, degrees in (theta, phi), in [10, 30] (10 deg
        is the least that keeps every landmark's triangle).
    mouth_slit : bool
        Cut the mouth open (default True): the row of triangles crossed by the lip
        contact line between the inner mouth corners is removed, so the upper and lower
        lips are separate surfaces joined only at the corners, as in the scans (the
        mouth interior is never scanned) and in common face templates. Without the slit
        an open jaw must stretch a 1.6 mm band of template triangles by 10-30 mm.
    jaw : bool
        Attach the jaw rig :func:`default_jaw_rig` (default True); False gives a template
        without a jaw (the registration then skips its jaw stage).

    Returns
    -------
    Template
        With ``uv`` set, parts from the mean mesh, the 106 landmarks as barycentric
        points of the grid triangles that contain their uv (exactly the landmarks of
        :func:`kernels.synth.face.face_mesh`) and the jaw rig.

    Raises
    ------
    ValueError
        ``n_vertices`` or ``margin_deg`` out of range.
    """
    n = check_int(n_vertices, "n_vertices", _MIN_VERTICES)
    if n > _MAX_VERTICES:
        raise ValueError(f"n_vertices: must be <= {_MAX_VERTICES}, got {n_vertices!r}")
    margin = check_number(margin_deg, "margin_deg", lo=10.0, hi=30.0)
    # resolution of the full grid that leaves ~n vertices in the crop (the fraction varies
    # slowly with resolution: two corrections reach < 1%)
    n_full = int(round(n / 0.55))
    for _ in range(4):
        uv, faces = uv_grid(n_full)
        kept = _crop_count(uv, faces, margin)
        if abs(kept - n) <= 0.01 * n:
            break
        n_full = int(round(n_full * n / kept))
    mesh = mean_face_mesh(n_full)
    uv = mesh.uv
    keep = _crop_mask(uv, margin)
    F = np.asarray(mesh.faces, dtype=np.int64)
    fkeep = keep[F].any(axis=1)
    if mouth_slit:
        fkeep &= ~_mouth_slit(np.asarray(uv), F)
    # largest connected component of the kept faces
    Fk = F[fkeep]
    nv = len(uv)
    A = sparse.coo_matrix((np.ones(2 * len(Fk)), (Fk[:, [0, 1]].ravel(), Fk[:, [1, 2]].ravel())), shape=(nv, nv))
    _, lab = connected_components(A, directed=False)
    used = np.zeros(nv, bool)
    used[Fk.ravel()] = True
    big = np.bincount(lab[used]).argmax()
    fkeep &= lab[F[:, 0]] == big
    vkeep = np.zeros(nv, bool)
    vkeep[F[fkeep].ravel()] = True
    vmap = np.full(nv, -1, np.int64)
    vmap[vkeep] = np.arange(int(vkeep.sum()))
    fmap = np.full(len(F), -1, np.int64)
    fmap[fkeep] = np.arange(int(fkeep.sum()))
    theta, phi = _grid_axes(np.asarray(uv))
    fid, bary = _grid_landmarks(theta, phi, landmark_uv())
    lf = fmap[fid]
    if mouth_slit:  # inner-lip landmarks in the slit move to the nearest kept triangle on their side
        fid, bary = _reattach(np.asarray(uv), F, fkeep, fid, bary, lf < 0)
        lf = fmap[fid]
    if np.any(lf < 0):  # pragma: no cover - guarded by the margin range
        raise ValueError(f"margin_deg: {margin} drops the triangles of landmarks {np.flatnonzero(lf < 0).tolist()}")
    uv_k = np.asarray(uv)[vkeep].copy()
    return Template(
        vertices=np.asarray(mesh.vertices)[vkeep].copy(),
        faces=vmap[F[fkeep]].astype(np.int32),
        parts=np.asarray(mesh.parts)[vkeep].astype(np.uint8),
        part_names=tuple(PART_NAMES),
        landmark_faces=lf,
        landmark_bary=bary,
        uv=uv_k,
        jaw=default_jaw_rig(uv_k) if jaw else None,
    )


# -- user templates ------------------------------------------------------------------------

def _check_faces(F: np.ndarray, n: int) -> None:
    if F.shape[0] == 0:
        raise ValueError("faces: the template has no faces (a triangle mesh is required)")
    if F.min() < 0 or F.max() >= n:
        raise ValueError(f"faces: vertex indices must be in [0, {n}), got [{F.min()}, {F.max()}]")
    rep = (F[:, 0] == F[:, 1]) | (F[:, 1] == F[:, 2]) | (F[:, 0] == F[:, 2])
    if rep.any():
        raise ValueError(f"faces: {int(rep.sum())} face(s) repeat a vertex (first: face {int(np.flatnonzero(rep)[0])})")
    he = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    s = np.sort(he, axis=1)
    key = s[:, 0] * n + s[:, 1]
    uk, cnt = np.unique(key, return_counts=True)
    if np.any(cnt > 2):
        bad = uk[cnt > 2][0]
        raise ValueError(f"faces: non-manifold mesh, {int(np.sum(cnt > 2))} edge(s) shared by more than two faces "
                         f"(first: vertices {int(bad // n)}-{int(bad % n)})")
    dkey = he[:, 0] * n + he[:, 1]
    ud, dcnt = np.unique(dkey, return_counts=True)
    if np.any(dcnt > 1):
        bad = ud[dcnt > 1][0]
        raise ValueError(f"faces: inconsistent orientation, directed edge {int(bad // n)}->{int(bad % n)} is used by "
                         f"two faces (neighbouring faces must have the same winding)")


def make_template(vertices, faces, landmarks, parts, part_names=PART_NAMES, jaw=None) -> Template:
    """Validate a user-supplied template.

    Parameters
    ----------
    vertices : (n, 3) float64
        Rest positions, mm, finite; n >= 4.
    faces : (m, 3) int
        Triangles with consistent winding (normals out of the head), edge-manifold, no
        repeated vertex in a face, m >= 1.
    landmarks : (106,) int or tuple of ((106,) int, (106, 3) float)
        Either 106 vertex ids, or ``(face_ids, barycentric)`` with barycentric rows >= 0
        summing to 1 (within 1e-6; they are renormalised).
    parts : (n,) int
        Part code of each vertex, in ``[0, len(part_names))``.
    part_names : sequence of str
        Distinct names of the parts (default :data:`kernels.synth.face.PART_NAMES`).
    jaw : JawRig or tuple of (weights (n,), pivot (3,), axis (3,)), optional
        Optional jaw rig (validated by :func:`make_jaw_rig`); None (default): no jaw, the
        registration skips its jaw stage.

    Returns
    -------
    Template
        ``uv = None``. Vertex-id landmarks become one-hot barycentric points on the
        first triangle that uses the vertex.

    Raises
    ------
    ValueError
        Naming the problem: wrong shapes, NaN/inf vertices, no faces, face indices out
        of range, repeated vertices in a face, non-manifold edges or inconsistent
        winding, landmark vertex / face ids out of range or a vertex in no face, bad
        barycentric rows, part codes out of range, bad part names, a bad jaw rig.
    """
    V = as_array(vertices, "vertices", (None, 3))
    if V.shape[0] < 4:
        raise ValueError(f"vertices: need at least 4 vertices, got {V.shape[0]}")
    if not np.all(np.isfinite(V)):
        bad = int(np.sum(~np.isfinite(V).all(axis=1)))
        raise ValueError(f"vertices: {bad} vertex row(s) contain NaN or infinite values")
    n = V.shape[0]
    try:
        F = np.asarray(faces)
    except (TypeError, ValueError) as exc:  # pragma: no cover - ragged input
        raise ValueError(f"faces: cannot convert to an integer array: {exc}") from None
    if F.ndim != 2 or F.shape[1] != 3:
        raise ValueError(f"faces: expected shape (m, 3), got {tuple(F.shape)}")
    if F.size and not np.issubdtype(F.dtype, np.integer):
        if not np.all(np.isfinite(F)) or np.any(F != np.round(F)):
            raise ValueError("faces: expected integer vertex indices")
    F = F.astype(np.int64)
    _check_faces(F, n)
    names = tuple(part_names)
    if not names or not all(isinstance(s, str) and s for s in names) or len(set(names)) != len(names):
        raise ValueError(f"part_names: expected distinct non-empty strings, got {part_names!r}")
    P = np.asarray(parts)
    if P.shape != (n,):
        raise ValueError(f"parts: expected shape ({n},), got {tuple(P.shape)}")
    if P.size and (not np.issubdtype(P.dtype, np.integer) and np.any(P != np.round(P))):
        raise ValueError("parts: expected integer part codes")
    P = P.astype(np.int64)
    if P.min() < 0 or P.max() >= len(names):
        raise ValueError(f"parts: codes must be in [0, {len(names)}) (one per part name), got [{P.min()}, {P.max()}]")
    if len(names) > 255:
        raise ValueError(f"part_names: at most 255 parts, got {len(names)}")
    lf, lb = _landmarks(landmarks, F, n)
    rig = None
    if jaw is not None:
        if isinstance(jaw, JawRig):
            rig = make_jaw_rig(jaw.weights, jaw.pivot, jaw.axis, n)
        elif isinstance(jaw, tuple) and len(jaw) == 3:
            rig = make_jaw_rig(*jaw, n)
        else:
            raise ValueError(f"jaw: expected a JawRig or (weights, pivot, axis), got {type(jaw).__name__}")
    return Template(V.copy(), F.astype(np.int32), P.astype(np.uint8), names, lf, lb, None, rig)


def _landmarks(landmarks, F: np.ndarray, n: int):
    if isinstance(landmarks, tuple) and len(landmarks) == 2:
        fid = np.asarray(landmarks[0])
        bary = as_array(landmarks[1], "landmarks barycentric", (N_LANDMARKS, 3))
        if fid.shape != (N_LANDMARKS,):
            raise ValueError(f"landmarks face ids: expected shape ({N_LANDMARKS},), got {tuple(fid.shape)}")
        if not np.issubdtype(fid.dtype, np.integer):
            raise ValueError(f"landmarks face ids: expected integers, got dtype {fid.dtype}")
        fid = fid.astype(np.int64)
        bad = np.flatnonzero((fid < 0) | (fid >= len(F)))
        if bad.size:
            raise ValueError(f"landmarks face ids: {bad.size} id(s) out of range [0, {len(F)}) "
                             f"(landmark {int(bad[0])}: face {int(fid[bad[0]])})")
        if not np.all(np.isfinite(bary)) or np.any(bary < -1e-6) or np.any(np.abs(bary.sum(axis=1) - 1.0) > 1e-6):
            raise ValueError("landmarks barycentric: rows must be finite, >= 0 and sum to 1")
        bary = np.clip(bary, 0.0, None)
        return fid, bary / bary.sum(axis=1, keepdims=True)
    ids = np.asarray(landmarks)
    if ids.shape != (N_LANDMARKS,):
        raise ValueError(f"landmarks: expected ({N_LANDMARKS},) vertex ids or (face ids, barycentric), "
                         f"got shape {tuple(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"landmarks: expected integer vertex ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= n))
    if bad.size:
        raise ValueError(f"landmarks: {bad.size} vertex id(s) out of range [0, {n}) "
                         f"(landmark {int(bad[0])}: vertex {int(ids[bad[0]])})")
    # first face using each vertex, and the vertex's corner in it
    flat = F.ravel()
    first = np.full(n, -1, np.int64)
    order = np.arange(flat.size)[::-1]
    first[flat[order]] = order
    pos = first[ids]
    if np.any(pos < 0):
        k = int(np.flatnonzero(pos < 0)[0])
        raise ValueError(f"landmarks: vertex {int(ids[k])} (landmark {k}) is in no face")
    bary = np.zeros((N_LANDMARKS, 3))
    bary[np.arange(N_LANDMARKS), pos % 3] = 1.0
    return pos // 3, bary
