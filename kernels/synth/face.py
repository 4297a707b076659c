"""Parametric synthetic head model with exact ground truth (see ``docs/synthetic-faces.md``).

A head is a radial graph about the head centre over a fixed 2D parametrisation
``uv = (theta, phi)`` in **radians** (azimuth about +y, 0 = straight ahead, + = the
subject's left; elevation, + = up)::

    p(uv) = r_mean(uv) * dir(uv)                         mean neutral head
          + sum_k c_k * B_k(uv)                          identity (exactly linear)
          -> expression deformation (skin sliding, lids, radial offsets, jaw rotation)

The same uv is the same material point for every subject, expression and resolution,
so meshes of any resolution are in exact dense correspondence, and the 106 landmarks
(fixed uv) have exact ground truth. Units: mm, world/head frame of
``docs/conventions.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kernels._checks import as_array, as_rng
from kernels.synth import face_geometry as G
from kernels.synth.expressions import EXPRESSION_INDEX, EXPRESSIONS, Expression, deform, jaw_open_deg
from kernels.synth.face_identity import ALL_FIELDS, IDENTITY_MODES, N_IDENTITY, field_matrix, field_scalars, displacement
from kernels.synth.face_params import FaceModelParams
from kernels.synth.landmark_defs import (
    BROW_XL, FLIP_MAP, brow_half_thickness, brow_line, landmark_uv_table, vermilion_lower, vermilion_upper,
)

__all__ = [
    "PART_NAMES", "EXPRESSIONS", "Expression", "FaceModelParams", "Subject", "FaceMesh", "N_IDENTITY",
    "K_TOTAL", "FLIP_MAP", "expression_names", "sample_subject", "subject_coefficients", "uv_grid",
    "face_mesh", "surface_points", "identity_basis", "mean_face_mesh", "face_region", "landmark_uv",
    "part_labels", "IDENTITY_MODES", "skin_detail",
]

PART_NAMES: tuple = ("outer", "forehead", "eyes", "nose", "cheeks", "mouth", "chin_jaw")
K_TOTAL = N_IDENTITY + 2  # identity modes, then gender, then age
MIN_VERTICES = 500
MAX_VERTICES = 5_000_000
AGE_CENTRE, AGE_HALF_RANGE = 49.0, 31.0


def expression_names() -> tuple:
    """Names of the 22 expressions in their fixed order (index = expression id)."""
    return tuple(e.name for e in EXPRESSIONS)


# -- subjects ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """One synthetic person.

    Attributes
    ----------
    subject_id : str
    gender : str
        ``"female"`` or ``"male"``.
    age : int
        Years, 18..80.
    identity : (N_IDENTITY,) float64
        Standardised identity coefficients (N(0, 1) truncated at
        ``FaceModelParams.identity_clip``); mode k moves the surface by
        ``identity[k] * sigma_k`` mm (see ``kernels.synth.face_identity``).
    expression_intensity : (22,) float64
        Intensity of each expression (index = position in :data:`EXPRESSIONS`).
    skin_tone : float
        0 (lightest) .. 1 (darkest); sets the skin IR reflectance and RGB colour.
    hair_tone : float
        0 (black) .. 1 (blond); eyebrows and hair.
    iris_rgb : (3,) float64
        Iris colour in [0, 1].
    skin_detail_seed : int
        Seed of the skin's colour detail (``FaceModelParams.skin_detail``), >= 0.
    """

    subject_id: str
    gender: str
    age: int
    identity: np.ndarray
    expression_intensity: np.ndarray
    skin_tone: float
    hair_tone: float = 0.2
    iris_rgb: np.ndarray = None
    skin_detail_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.subject_id, str) or not self.subject_id:
            raise ValueError(f"Subject.subject_id: expected a non-empty string, got {self.subject_id!r}")
        if self.gender not in ("female", "male"):
            raise ValueError(f"Subject.gender: expected 'female' or 'male', got {self.gender!r}")
        if int(self.age) != self.age or not 18 <= int(self.age) <= 80:
            raise ValueError(f"Subject.age: expected an integer in [18, 80], got {self.age!r}")
        ident = as_array(self.identity, "Subject.identity", (N_IDENTITY,), finite=True).copy()
        inten = as_array(self.expression_intensity, "Subject.expression_intensity", (len(EXPRESSIONS),), finite=True).copy()
        if np.any(inten < 0) or np.any(inten > 1.5):
            raise ValueError("Subject.expression_intensity: values must be in [0, 1.5]")
        iris = np.array([0.35, 0.22, 0.12]) if self.iris_rgb is None else self.iris_rgb
        iris = as_array(iris, "Subject.iris_rgb", (3,), finite=True).copy()
        for name in ("skin_tone", "hair_tone"):
            v = getattr(self, name)
            if not np.isfinite(v) or not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"Subject.{name}: expected a number in [0, 1], got {v!r}")
            object.__setattr__(self, name, float(v))
        for name, arr in (("identity", ident), ("expression_intensity", inten), ("iris_rgb", iris)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "age", int(self.age))
        sd = self.skin_detail_seed
        if isinstance(sd, bool) or not isinstance(sd, (int, np.integer)) or sd < 0:
            raise ValueError(f"Subject.skin_detail_seed: expected an integer >= 0, got {sd!r}")
        object.__setattr__(self, "skin_detail_seed", int(sd))


def sample_subject(subject_id: str, rng, params: FaceModelParams = FaceModelParams()) -> Subject:
    """Draw a random subject.

    Parameters
    ----------
    subject_id : str
    rng : numpy.random.Generator | int | None
        Randomness; the same seed gives the same subject.
    params : FaceModelParams

    Returns
    -------
    Subject
        Gender uniform over {female, male}, age uniform over ``params.age_range``,
        identity N(0, 1) truncated to +-``params.identity_clip``, each expression
        intensity uniform over ``params.intensity_range``, skin and hair tones and
        iris colour uniform over plausible ranges, a skin-detail seed (drawn last, so
        the other draws are those of earlier versions).
    """
    g = as_rng(rng)
    gender = "male" if g.random() < 0.5 else "female"
    lo, hi = params.age_range
    age = int(g.integers(int(lo), int(hi) + 1))
    ident = g.standard_normal(N_IDENTITY)
    clip = params.identity_clip
    bad = np.abs(ident) > clip
    while np.any(bad):  # truncated normal by rejection
        ident[bad] = g.standard_normal(int(bad.sum()))
        bad = np.abs(ident) > clip
    inten = g.uniform(*params.intensity_range, size=len(EXPRESSIONS))
    inten[0] = 1.0
    skin = float(g.uniform(0.0, 1.0))
    hair = float(g.beta(1.2, 2.5))
    irises = np.array([[0.30, 0.18, 0.08], [0.20, 0.12, 0.06], [0.30, 0.45, 0.60], [0.35, 0.42, 0.25]])
    iris = irises[int(g.integers(0, len(irises)))] * g.uniform(0.85, 1.15)
    detail_seed = int(g.integers(0, 2 ** 31))
    return Subject(subject_id, gender, age, ident, inten, skin, hair, np.clip(iris, 0, 1), detail_seed)


def subject_coefficients(subject: Subject, params: FaceModelParams = FaceModelParams()) -> np.ndarray:
    """(K_TOTAL,) coefficients of :func:`identity_basis` for ``subject``.

    ``[identity * identity_scale, gender_sign * gender_scale, age_norm * age_scale]`` with
    ``gender_sign = -1`` (female) / ``+1`` (male) and ``age_norm = (age - 49) / 31``.
    """
    gs = 1.0 if subject.gender == "male" else -1.0
    an = (subject.age - AGE_CENTRE) / AGE_HALF_RANGE
    return np.concatenate([subject.identity * params.identity_scale, [gs * params.gender_scale, an * params.age_scale]])


# -- meshes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceMesh:
    """A triangle mesh of a head with per-vertex attributes (all arrays read-only).

    Attributes
    ----------
    vertices : (n, 3) float64
        World/head frame, mm.
    faces : (m, 3) int32
        Counter-clockwise seen from outside: normals point out of the head.
    uv : (n, 2) float64
        Material coordinates (theta, phi) in radians.
    albedo_ir : (n,) float32
        IR reflectance in [0, 1].
    albedo_rgb : (n, 3) float32
        Linear RGB reflectance in [0, 1].
    parts : (n,) uint8
        Face-part codes, index into :data:`PART_NAMES`.
    landmarks : (106, 3) float64
        The 106 landmarks, exactly on the triangle mesh (mm).
    landmark_uv : (106, 2) float64
        Their material coordinates (radians).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    albedo_ir: np.ndarray
    albedo_rgb: np.ndarray
    parts: np.ndarray
    landmarks: np.ndarray
    landmark_uv: np.ndarray

    def __post_init__(self) -> None:
        for name in ("vertices", "faces", "uv", "albedo_ir", "albedo_rgb", "parts", "landmarks", "landmark_uv"):
            a = getattr(self, name)
            if a.flags.writeable:
                a = a.copy() if not a.flags.owndata else a
                a.setflags(write=False)
                object.__setattr__(self, name, a)


def _check_n_vertices(n_vertices) -> int:
    if isinstance(n_vertices, bool) or not isinstance(n_vertices, (int, np.integer)):
        raise ValueError(f"n_vertices: expected an integer, got {n_vertices!r}")
    if not MIN_VERTICES <= n_vertices <= MAX_VERTICES:
        raise ValueError(f"n_vertices: must be in [{MIN_VERTICES}, {MAX_VERTICES}], got {n_vertices}")
    return int(n_vertices)


def _check_expression(expression) -> str:
    if expression not in EXPRESSION_INDEX:
        raise ValueError(f"expression: unknown name {expression!r}; expected one of {expression_names()}")
    return expression


def _check_params(params) -> FaceModelParams:
    if not isinstance(params, FaceModelParams):
        raise ValueError(f"params: expected FaceModelParams, got {type(params).__name__}")
    return params


def _check_subject(subject) -> Subject:
    if not isinstance(subject, Subject):
        raise ValueError(f"subject: expected a Subject, got {type(subject).__name__}")
    return subject


def _check_uv(uv, params: FaceModelParams) -> np.ndarray:
    uv = as_array(uv, "uv", (None, 2), finite=True)
    if uv.size:
        tmax = np.radians(params.theta_max_deg) + 1e-9
        lo, hi = np.radians(params.phi_min_deg) - 1e-9, np.radians(params.phi_max_deg) + 1e-9
        if np.any(np.abs(uv[:, 0]) > tmax) or np.any(uv[:, 1] < lo) or np.any(uv[:, 1] > hi):
            raise ValueError(f"uv: values outside the parametrisation (|theta| <= {params.theta_max_deg} deg, "
                             f"{params.phi_min_deg} <= phi <= {params.phi_max_deg} deg)")
    return uv


def _grid_shape(n_vertices: int, params: FaceModelParams) -> tuple[int, int]:
    trange = 2.0 * params.theta_max_deg * 0.8
    prange = params.phi_max_deg - params.phi_min_deg
    n_phi = max(8, int(round(np.sqrt(n_vertices * prange / trange))))
    n_theta = max(8, int(round(n_vertices / n_phi)))
    return n_phi, n_theta


def _axes(n_vertices: int, params: FaceModelParams) -> tuple[np.ndarray, np.ndarray]:
    """Grid axes in degrees: theta (warped towards the face), phi (uniform)."""
    n_phi, n_theta = _grid_shape(n_vertices, params)
    s = np.linspace(-1.0, 1.0, n_theta)
    b = params.grid_face_density
    theta = params.theta_max_deg * ((1.0 - b) * s + b * s ** 3)
    theta[n_theta // 2] = 0.0 if n_theta % 2 else theta[n_theta // 2]
    phi = np.linspace(params.phi_min_deg, params.phi_max_deg, n_phi)
    return theta, phi


def _grid_faces(n_phi: int, n_theta: int) -> np.ndarray:
    i = (np.arange(n_phi - 1)[:, None] * n_theta + np.arange(n_theta - 1)[None, :]).ravel()
    v00, v01, v10, v11 = i, i + 1, i + n_theta, i + n_theta + 1
    # quad split along v00-v11; (v00, v01, v11) and (v00, v11, v10) are counter-clockwise
    # seen from outside (d/dtheta x d/dphi points out of the head)
    f = np.empty((2 * i.size, 3), dtype=np.int32)
    f[0::2] = np.stack([v00, v01, v11], axis=1)
    f[1::2] = np.stack([v00, v11, v10], axis=1)
    return f


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class _GridData:
    theta: np.ndarray   # (nt,) degrees
    phi: np.ndarray     # (np,) degrees
    dom: G.Domain
    uv: np.ndarray      # (n, 2) radians
    faces: np.ndarray
    r0: np.ndarray      # (np, nt)
    radial: np.ndarray  # (np, nt, 3)
    mean: np.ndarray    # (np, nt, 3)
    parts: np.ndarray   # (n,) uint8


@lru_cache(maxsize=4)
def _grid_data(n_vertices: int, params: FaceModelParams) -> _GridData:
    theta, phi = _axes(n_vertices, params)
    dom = G.Domain.grid(theta, phi)
    for a in (dom.td, dom.pd, dom.X, dom.Y):
        a.setflags(write=False)
    uv = np.stack([dom.td.ravel(), dom.pd.ravel()], axis=1) * G.D2R
    r0 = G.mean_radius(dom)
    radial = G.direction(dom.td, dom.pd)
    mean = r0[..., None] * radial
    parts = part_labels(uv, params)
    return _GridData(_ro(theta), _ro(phi), dom, _ro(uv), _ro(_grid_faces(len(phi), len(theta))), _ro(r0),
                     _ro(radial), _ro(mean), _ro(np.asarray(parts)))


def uv_grid(n_vertices: int, params: FaceModelParams = FaceModelParams()) -> tuple[np.ndarray, np.ndarray]:
    """The uv grid and its triangles for about ``n_vertices`` vertices.

    Parameters
    ----------
    n_vertices : int
        Wanted vertex count, in [500, 5e6]; the grid has ``n_phi * n_theta`` vertices,
        within 2% of it.
    params : FaceModelParams

    Returns
    -------
    uv : (n, 2) float64
        (theta, phi) in radians, row-major with theta varying fastest (read-only).
    faces : (m, 3) int32
        Two triangles per grid cell, normals out of the head (read-only).

    Raises
    ------
    ValueError
        For a bad ``n_vertices`` or ``params``.
    """
    gd = _grid_data(_check_n_vertices(n_vertices), _check_params(params))
    return gd.uv, gd.faces


def landmark_uv() -> np.ndarray:
    """(106, 2) float64 uv (radians) of the 106 landmarks (a new array)."""
    return _LANDMARK_UV.copy()


_LANDMARK_UV = landmark_uv_table()
_LANDMARK_UV.setflags(write=False)


def _barycentric(theta_deg: np.ndarray, phi_deg: np.ndarray, uv: np.ndarray):
    """Vertex indices (k, 3) and weights (k, 3) of the grid triangles containing ``uv``."""
    nt = len(theta_deg)
    t, p = np.degrees(uv[:, 0]), np.degrees(uv[:, 1])
    j = np.clip(np.searchsorted(theta_deg, t, "right") - 1, 0, nt - 2)
    i = np.clip(np.searchsorted(phi_deg, p, "right") - 1, 0, len(phi_deg) - 2)
    a = (t - theta_deg[j]) / (theta_deg[j + 1] - theta_deg[j])
    b = (p - phi_deg[i]) / (phi_deg[i + 1] - phi_deg[i])
    v00 = i * nt + j
    v01, v10, v11 = v00 + 1, v00 + nt, v00 + nt + 1
    up = a >= b
    idx = np.where(up[:, None], np.stack([v00, v01, v11], 1), np.stack([v00, v11, v10], 1))
    w = np.where(up[:, None], np.stack([1 - a, a - b, b], 1), np.stack([1 - b, a, b - a], 1))
    return idx, w


# -- evaluation ----------------------------------------------------------------------------

def _evaluate(dom: G.Domain, r0, radial, mean, subject: Subject, expression: str, params: FaceModelParams):
    coeffs = subject_coefficients(subject, params)
    acc = field_scalars(dom, mean, coeffs)
    p_id = mean + displacement(acc, radial)
    if expression == "neutral":
        Xw, Yw, state = dom.X, dom.Y, G.NEUTRAL_STATE
        return p_id, (Xw, Yw, state)
    inten = float(subject.expression_intensity[EXPRESSION_INDEX[expression]])
    return deform(dom, p_id, expression, inten, coeffs, params)


def face_mesh(subject: Subject, expression: str, n_vertices: int = 150_000,
              params: FaceModelParams = FaceModelParams()) -> FaceMesh:
    """Triangle mesh of ``subject`` performing ``expression``.

    Parameters
    ----------
    subject : Subject
    expression : str
        One of :func:`expression_names`.
    n_vertices : int
        About this many vertices (within 2%), in [500, 5e6].
    params : FaceModelParams

    Returns
    -------
    FaceMesh
        Vertices in mm (world/head frame), outward-oriented faces, uv, albedo, parts and
        the 106 landmarks interpolated barycentrically inside their grid triangles (so
        they lie exactly on the mesh).

    Raises
    ------
    ValueError
        Unknown expression, bad ``n_vertices``, bad ``subject`` or ``params``.
    """
    _check_subject(subject)
    _check_expression(expression)
    params = _check_params(params)
    gd = _grid_data(_check_n_vertices(n_vertices), params)
    pts, (Xw, Yw, state) = _evaluate(gd.dom, gd.r0, gd.radial, gd.mean, subject, expression, params)
    vertices = pts.reshape(-1, 3)
    ir, rgb = _albedo(gd.dom, Xw, Yw, state, subject, expression, params)
    idx, w = _barycentric(gd.theta, gd.phi, _LANDMARK_UV)
    landmarks = np.einsum("kj,kjc->kc", w, vertices[idx])
    return FaceMesh(vertices, gd.faces, gd.uv, ir.reshape(-1), rgb.reshape(-1, 3), gd.parts, landmarks,
                    _LANDMARK_UV.copy())


def mean_face_mesh(n_vertices: int = 150_000, params: FaceModelParams = FaceModelParams()) -> FaceMesh:
    """The mean identity (all coefficients 0: mid age, between genders), neutral expression.

    Used as the registration template. Albedo is that of a mid skin tone. Parameters and
    errors as :func:`face_mesh`.
    """
    params = _check_params(params)
    n = _check_n_vertices(n_vertices)
    subj = Subject("mean", "female", 49, np.zeros(N_IDENTITY), np.ones(len(EXPRESSIONS)), 0.5, 0.2)
    gd = _grid_data(n, params)
    vertices = gd.mean.reshape(-1, 3).copy()
    ir, rgb = _albedo(gd.dom, gd.dom.X, gd.dom.Y, G.NEUTRAL_STATE, subj, "neutral", params)
    idx, w = _barycentric(gd.theta, gd.phi, _LANDMARK_UV)
    landmarks = np.einsum("kj,kjc->kc", w, vertices[idx])
    return FaceMesh(vertices, gd.faces, gd.uv, ir.reshape(-1), rgb.reshape(-1, 3), gd.parts, landmarks,
                    _LANDMARK_UV.copy())


def _point_domain(uv: np.ndarray):
    dom = G.Domain.points(np.degrees(uv[:, 0]), np.degrees(uv[:, 1]))
    r0 = G.mean_radius(dom)
    radial = G.direction(dom.td, dom.pd)
    return dom, r0, radial, r0[:, None] * radial


def surface_points(subject: Subject, expression: str, uv, params: FaceModelParams = FaceModelParams()) -> np.ndarray:
    """Evaluate the analytic surface of ``subject`` / ``expression`` at material points.

    Parameters
    ----------
    subject : Subject
    expression : str
    uv : (n, 2) float64
        (theta, phi) in radians inside the parametrisation domain.
    params : FaceModelParams

    Returns
    -------
    (n, 3) float64
        Points in mm. :func:`face_mesh` vertices are this function at the grid uv (to
        floating-point rounding); between vertices the mesh is the linear interpolant.

    Raises
    ------
    ValueError
        Bad ``uv`` shape, NaN or out-of-domain values, unknown expression.
    """
    _check_subject(subject)
    _check_expression(expression)
    params = _check_params(params)
    uv = _check_uv(uv, params)
    if uv.shape[0] == 0:
        return np.zeros((0, 3))
    dom, r0, radial, mean = _point_domain(uv)
    pts, _ = _evaluate(dom, r0, radial, mean, subject, expression, params)
    return pts


def identity_basis(uv, params: FaceModelParams = FaceModelParams()) -> np.ndarray:
    """The true linear identity generator at material points.

    Parameters
    ----------
    uv : (n, 2) float64
        Material points (radians).
    params : FaceModelParams

    Returns
    -------
    (n, 3, K_TOTAL) float64
        Column k < N_IDENTITY is identity mode k (``IDENTITY_MODES[k]``, already scaled
        by its sigma in mm); column N_IDENTITY is the gender field (coefficient -1 female,
        +1 male) and column N_IDENTITY + 1 the age field (coefficient ``(age - 49) / 31``).
        A neutral vertex is exactly ``mean + basis @ subject_coefficients(subject)``.
    """
    params = _check_params(params)
    uv = _check_uv(uv, params)
    if uv.shape[0] == 0:
        return np.zeros((0, 3, K_TOTAL))
    dom, r0, radial, mean = _point_domain(uv)
    return field_matrix(dom, mean, radial)


# -- parts, face region, albedo ------------------------------------------------------------

def _parts_design(X, Y, td, pd):
    out = np.zeros(X.shape, dtype=np.uint8)
    at = np.abs(td)
    inner = (at < 72.0) & (pd > _jaw_phi(td)) & (pd < 52.0 - 12.0 * G.sstep((at - 20.0) / 50.0))
    xl = np.abs(X) - G.EYE_X
    ey = Y - G.EYE_Y
    eyes = (xl / 25.0) ** 2 + ((ey - 4.0) / 17.0) ** 2 < 1.0
    nose = (np.abs(X) < 9.0 + np.clip(18.0 - Y, 0.0, None) * 0.3) & (Y > -24.0) & (Y < 24.0)
    mouth = (X / 34.0) ** 2 + ((Y - G.mouth_line(X) + 1.0) / 17.0) ** 2 < 1.0
    chin = Y < -54.0
    forehead = Y > 38.0
    out[inner] = 4  # cheeks
    out[inner & forehead] = 1
    out[inner & chin] = 6
    out[inner & mouth] = 5
    out[inner & nose] = 3
    out[inner & eyes] = 2
    return out


def _jaw_phi(td):
    """Elevation (deg) of the jaw line (lower border of the face region) at azimuth td."""
    at = np.abs(td)
    return -56.0 + 14.0 * G.sstep((at - 20.0) / 55.0) + 20.0 * G.sstep((at - 60.0) / 25.0)


def part_labels(uv, params: FaceModelParams = FaceModelParams()) -> np.ndarray:
    """(n,) uint8 face-part codes (index into :data:`PART_NAMES`) of material points ``uv`` (radians)."""
    params = _check_params(params)
    uv = _check_uv(uv, params)
    td, pd = np.degrees(uv[:, 0]), np.degrees(uv[:, 1])
    X = G.RF * np.cos(uv[:, 1]) * np.sin(uv[:, 0])
    Y = G.RF * np.sin(uv[:, 1])
    return _parts_design(X, Y, td, pd)


def face_region(uv, params: FaceModelParams = FaceModelParams()) -> np.ndarray:
    """(n,) bool: the inner face (forehead to chin, cheek to cheek; no neck, ears, scalp).

    Equal to ``part_labels(uv) != 0``: |theta| < 72 deg, above the jaw line and below the
    forehead top (52 deg at the midline, 40 deg at the temples).
    """
    return part_labels(uv, params) != 0


_SKIN_RGB_LIGHT = np.array([0.85, 0.66, 0.56])
_SKIN_RGB_DARK = np.array([0.36, 0.22, 0.15])
_HAIR_RGB_DARK = np.array([0.05, 0.04, 0.035])
_HAIR_RGB_LIGHT = np.array([0.62, 0.48, 0.30])


_BOX_HAIR_TOP = (-400.0, 400.0, 20.0, 100.0)
_BOX_HAIR_BACK_L = (-400.0, -100.0, -40.0, 19.999)
_BOX_HAIR_BACK_R = (100.0, 400.0, -40.0, 19.999)
_BOX_CHEEKS = G.xy_box(72.0, -48.0, 18.0)
_BOX_BROWS = G.xy_box(G.EYE_X + BROW_XL[1] + 3.0, G.EYE_Y + 5.0, G.EYE_Y + 25.0)
_BOX_LIPS = G.xy_box(G.MOUTH_W + 2.0, G.MOUTH_Y - 14.0, G.MOUTH_Y + 12.0)
_BOX_NOSTRILS = G.xy_box(11.0, -22.0, -15.0)
_BOX_EYES = G.xy_box(G.EYE_X + 17.0, G.EYE_Y - 12.0, G.EYE_Y + 14.0)


def skin_detail(theta_deg, phi_deg, seed: int, params: FaceModelParams = FaceModelParams()) -> np.ndarray:
    """Relative colour detail of the skin at material points (theta, phi) in degrees.

    A sum of ``params.skin_detail_waves`` plane waves over the arc-length coordinates
    ``(RF * theta * cos(phi), RF * phi)`` mm (RF the face sphere's radius), directions
    uniform, wavelengths log-uniform over ``skin_detail_wavelength_mm``, phases uniform,
    all drawn from ``seed``; scaled to standard deviation ``skin_detail``. Same shape as
    the inputs; float64.
    """
    g = np.random.default_rng(int(seed))
    k = int(params.skin_detail_waves)
    ang = g.uniform(0.0, np.pi, k)
    lo, hi = params.skin_detail_wavelength_mm
    lam = np.exp(g.uniform(np.log(lo), np.log(hi), k))
    ph = g.uniform(0.0, 2.0 * np.pi, k)
    td = np.asarray(theta_deg, float)
    pd = np.asarray(phi_deg, float)
    U = G.RF * np.radians(td) * np.cos(np.radians(pd))
    W = G.RF * np.radians(pd)
    out = np.zeros(np.broadcast(U, W).shape)
    kx, ky = 2.0 * np.pi / lam * np.cos(ang), 2.0 * np.pi / lam * np.sin(ang)
    for j in range(k):
        out += np.cos(kx[j] * U + ky[j] * W + ph[j])
    return out * (params.skin_detail * np.sqrt(2.0 / k))


def _albedo(dom: G.Domain, Xw, Yw, state, subject: Subject, expression: str, params: FaceModelParams):
    """IR and RGB albedo (float32) in the domain's shape (regions evaluated on their boxes)."""
    tone = subject.skin_tone
    lo, hi = params.skin_ir_range
    skin_ir = lo + (hi - lo) * tone
    skin_rgb = (1.0 - tone) * _SKIN_RGB_LIGHT + tone * _SKIN_RGB_DARK
    hair_ir = 0.15 + 0.25 * subject.hair_tone
    hair_rgb = (1.0 - subject.hair_tone) * _HAIR_RGB_DARK + subject.hair_tone * _HAIR_RGB_LIGHT
    ir = np.full(dom.shape, skin_ir)
    rgb = np.empty(dom.shape + (3,))
    rgb[...] = skin_rgb

    def mix(s, mask, a_ir, a_rgb):
        ir[s] += mask * (a_ir - ir[s])
        rgb[s] += mask[..., None] * (np.asarray(a_rgb) - rgb[s])

    def region(box):
        s = dom.sel(box)
        if s is None:
            return None, None, None, None, None
        return s, dom.X[s], dom.Y[s], dom.td[s], dom.pd[s]

    # mild redness of the cheeks
    s, X, Y, td, pd = region(_BOX_CHEEKS)
    if s is not None:
        rgb[s] += G.bump(np.abs(X) - 40.0, Y + 15.0, 30.0, 30.0)[..., None] * np.array([0.04, -0.02, -0.02])
    # hair above the hairline and at the back of the head
    for box in (_BOX_HAIR_TOP, _BOX_HAIR_BACK_L, _BOX_HAIR_BACK_R):
        s, X, Y, td, pd = region(box)
        if s is None:
            continue
        at = np.abs(td)
        top = G.sstep((pd - (50.0 - 22.0 * G.sstep((at - 15.0) / 65.0))) / 3.0)
        back = G.sstep((at - 108.0) / 6.0) * G.sstep((pd + 20.0) / 8.0) * (1.0 - G.bump(at - 101.0, pd - 5.0, 16.0, 30.0))
        mix(s, np.maximum(top, back), hair_ir, hair_rgb)
    # eyebrows (material)
    s, X, Y, td, pd = region(_BOX_BROWS)
    if s is not None:
        xl = np.abs(X) - G.EYE_X
        d = np.abs(Y - brow_line(xl)) / brow_half_thickness(xl)
        ends = G.sstep((xl - BROW_XL[0] + 1.0) / 3.0) * G.sstep((BROW_XL[1] + 1.0 - xl) / 3.0)
        mix(s, 0.9 * G.sstep((1.15 - d) / 0.35) * ends, hair_ir * 0.9 + 0.03, hair_rgb * 0.9)
    # lips: vermilion, then the band between the inner lips / mouth cavity (material)
    s, X, Y, td, pd = region(_BOX_LIPS)
    if s is not None:
        ys = G.mouth_line(X)
        up = G.sstep((ys + vermilion_upper(X) - Y) / 0.8) * (Y >= ys)
        low = G.sstep((Y - (ys - vermilion_lower(X))) / 0.8) * (Y < ys)
        lip = np.clip(up + low, 0.0, 1.0) * (np.abs(X) < G.MOUTH_W + 1.0)
        mix(s, lip, skin_ir * 0.85, skin_rgb * np.array([0.95, 0.62, 0.62]) + np.array([0.05, 0.0, 0.0]))
        sb = G.mouth_band_coord(X, Y)
        band = G.mouth_lateral(X) * G.sstep(np.minimum(sb, 1.0 - sb) / 0.04)
        mix(s, band, 0.03, [0.04, 0.015, 0.015])
    # nostrils (material)
    s, X, Y, td, pd = region(_BOX_NOSTRILS)
    if s is not None:
        nos = G.sstep((1.0 - (((np.abs(X) - 6.0) / 3.6) ** 2 + ((Y + 18.5) / 2.2) ** 2)) / 0.5)
        mix(s, nos, 0.06, [0.08, 0.04, 0.03])
    # eyes: spatial, at the place the lids moved the material to
    s = dom.sel(_BOX_EYES)
    if s is not None:
        xlw, eyw, side = G.eye_local(Xw[s], Yw[s])
        upm = np.where(side > 0, state.lid_up[1], state.lid_up[0])
        lom = np.where(side > 0, state.lid_low[1], state.lid_low[0])
        fm = G.fissure_mask(xlw, eyw, upm, lom, soft=0.5) * G.sstep((upm - 0.12) / 0.25)
        rho = np.sqrt(xlw ** 2 + (eyw - 0.3) ** 2)
        iris = G.sstep((G.IRIS_R - rho) / 0.4)
        pupil = G.sstep((G.PUPIL_R - rho) / 0.3)
        sclera = np.array([0.9, 0.88, 0.85])
        e_ir = 0.7 + iris * (0.09 - 0.7) + pupil * (0.05 - 0.09)
        e_rgb = (sclera + iris[..., None] * (subject.iris_rgb - sclera)
                 + pupil[..., None] * (np.array([0.02, 0.02, 0.02]) - subject.iris_rgb))
        ir[s] += fm * (e_ir - ir[s])
        rgb[s] += fm[..., None] * (e_rgb - rgb[s])
        yu, yl = G.lid_margins(xlw, upm, lom)
        dm = np.minimum(np.abs(eyw - yu), np.abs(eyw - yl))
        lash = 0.55 * np.exp(-0.5 * (dm / 0.6) ** 2) * (np.abs(xlw) < G.EYE_W) * (1.0 - fm)
        ir[s] *= 1.0 - lash
        rgb[s] *= 1.0 - lash[..., None]
    if params.skin_detail > 0:
        rgb *= 1.0 + skin_detail(dom.td, dom.pd, subject.skin_detail_seed, params)[..., None]
    return np.clip(ir, 0.0, 1.0).astype(np.float32), np.clip(rgb, 0.0, 1.0).astype(np.float32)
