"""Geometry of the synthetic head: the uv domain, the mean surface and the identity fields.

The surface is a radial graph about the head centre (the world origin)::

    p(theta, phi) = r(theta, phi) * dir(theta, phi)
    dir(theta, phi) = (cos(phi) sin(theta), sin(phi), cos(phi) cos(theta))

``theta`` is the azimuth about +y (0 = straight ahead, +90 deg = the subject's left ear),
``phi`` the elevation. Features of the face are designed in the *design coordinates*
``X = RF cos(phi) sin(theta)``, ``Y = RF sin(phi)`` (mm, ``RF = 95``): the frontal
projection of the unit sphere scaled to the size of a face, which is close to the real
frontal image coordinates of the face.

Everything here is private to the face model; the public API is in
:mod:`kernels.synth.face`. Arrays of a tensor-product grid are kept 2D ``(n_phi,
n_theta)`` so that features with a bounded support are evaluated on a rectangular
slice only (that is what makes a 150k-vertex mesh cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RF = 95.0  # mm, radius of the design sphere
D2R = np.pi / 180.0

# Eye geometry in design coordinates (mm): centre |X| = EYE_X, Y = EYE_Y, half width
# EYE_W, upper / lower margin heights at neutral, tilt of the eye axis (outer corner up).
EYE_X, EYE_Y, EYE_W, EYE_HU, EYE_HL, EYE_TILT = 31.0, 20.0, 14.5, 5.8, 4.4, 0.05
EYE_TOP, EYE_BOT = 13.0, -10.0  # extent of the lid warp above/below the eye axis
# Mouth: lip contact line Y = MOUTH_Y + MOUTH_CURVE * X^2, corners at |X| = MOUTH_W,
# the band between the inner lips is MOUTH_BAND mm tall at neutral.
MOUTH_Y, MOUTH_CURVE, MOUTH_W, MOUTH_BAND = -40.5, 0.0015, 24.0, 1.6
PUPIL_R, IRIS_R = 2.2, 5.8


# -- small smooth helpers ------------------------------------------------------------------

def sstep(x):
    """C1 smoothstep of ``x`` clamped to [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def bump(x, y, sx, sy):
    """Compactly supported bump ``(1 - (x/sx)^2 - (y/sy)^2)^3``, 0 outside the ellipse."""
    q = np.clip(1.0 - (x / sx) ** 2 - (y / sy) ** 2, 0.0, None)
    return q * q * q


def bump1(x, s):
    q = np.clip(1.0 - (x / s) ** 2, 0.0, None)
    return q * q * q


def smoothmax(a, b, k):
    m = np.maximum(a, b)
    return m + k * np.log1p(np.exp(-np.abs(a - b) / k))


def direction(td, pd):
    """Unit directions of (theta, phi) given in degrees, shape ``td.shape + (3,)``."""
    t, p = td * D2R, pd * D2R
    cp = np.cos(p)
    return np.stack([cp * np.sin(t), np.sin(p), cp * np.cos(t)], axis=-1)


def to_spherical(xyz):
    """(theta_deg, phi_deg, r) of points ``(..., 3)`` about the origin."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    h = np.hypot(x, z)
    return np.arctan2(x, z) / D2R, np.arctan2(y, h) / D2R, np.sqrt(h * h + y * y)


def design_to_angles(X, Y):
    """Inverse of the design coordinates on the front hemisphere (degrees)."""
    pd = np.arcsin(np.clip(Y / RF, -1.0, 1.0)) / D2R
    cp = np.cos(pd * D2R)
    td = np.arcsin(np.clip(X / (RF * cp), -1.0, 1.0)) / D2R
    return td, pd


def xy_box(x_abs: float, y0: float, y1: float) -> tuple[float, float, float, float]:
    """Conservative (theta, phi) degree box of the design region |X| <= x_abs, y0 <= Y <= y1."""
    p0 = np.arcsin(np.clip(y0 / RF, -1, 1)) / D2R
    p1 = np.arcsin(np.clip(y1 / RF, -1, 1)) / D2R
    cmin = min(np.cos(p0 * D2R), np.cos(p1 * D2R)) if p0 * p1 > 0 else min(np.cos(p0 * D2R), np.cos(p1 * D2R), 1.0)
    t = np.arcsin(min(1.0, x_abs / (RF * cmin))) / D2R if cmin > 0 else 90.0
    return (-t - 0.01, t + 0.01, p0 - 0.01, p1 + 0.01)


# -- evaluation domains --------------------------------------------------------------------

class Domain:
    """Material points (theta, phi) in degrees: a tensor grid (2D arrays) or a point list.

    ``sel(box)`` returns a selector usable on every per-point array of the domain
    (a pair of slices for a grid, an index array for points) or ``None`` when empty.
    """

    def __init__(self, td, pd, grid_axes=None):
        self.td = td
        self.pd = pd
        self.grid_axes = grid_axes  # (theta_1d, phi_1d) for grids
        self.shape = td.shape
        self.X = RF * np.cos(pd * D2R) * np.sin(td * D2R)
        self.Y = RF * np.sin(pd * D2R)

    @classmethod
    def grid(cls, theta_deg: np.ndarray, phi_deg: np.ndarray) -> "Domain":
        td, pd = np.meshgrid(theta_deg, phi_deg)
        return cls(td, pd, (theta_deg, phi_deg))

    @classmethod
    def points(cls, td: np.ndarray, pd: np.ndarray) -> "Domain":
        return cls(np.asarray(td, float), np.asarray(pd, float))

    def sel(self, box):
        t0, t1, p0, p1 = box
        if self.grid_axes is not None:
            ta, pa = self.grid_axes
            j0, j1 = np.searchsorted(ta, t0, "left"), np.searchsorted(ta, t1, "right")
            i0, i1 = np.searchsorted(pa, p0, "left"), np.searchsorted(pa, p1, "right")
            if j1 <= j0 or i1 <= i0:
                return None
            return (slice(i0, i1), slice(j0, j1))
        idx = np.nonzero((self.td >= t0) & (self.td <= t1) & (self.pd >= p0) & (self.pd <= p1))[0]
        return idx if idx.size else None

    def subset(self, mask: np.ndarray) -> "Domain":
        """A point domain of the entries where ``mask`` is true."""
        return Domain(self.td[mask], self.pd[mask])


FULL = (-400.0, 400.0, -100.0, 100.0)


# -- eyes and mouth ------------------------------------------------------------------------

@dataclass(frozen=True)
class FaceState:
    """Expression state that changes the *shape functions* (not only the material).

    ``lid_up``/``lid_low``: multipliers of the upper/lower eyelid margin heights of the
    (right, left) eye (1 = neutral, 0 = closed on the eye axis).
    """

    lid_up: tuple = (1.0, 1.0)
    lid_low: tuple = (1.0, 1.0)


NEUTRAL_STATE = FaceState()


def eye_local(X, Y):
    """Eye-local design coordinates (lateral xl, up ey) in mm and the side (+1 = left, -1 = right)."""
    side = np.where(X >= 0, 1.0, -1.0)
    xl = np.abs(X) - EYE_X
    ey = Y - EYE_Y - EYE_TILT * xl
    return xl, ey, side


def lid_margins(xl, up=1.0, low=1.0):
    """Upper and lower lid margin heights ``(yu, yl)`` above the eye axis (mm) at lateral ``xl``."""
    s = np.clip(1.0 - (xl / EYE_W) ** 2, 0.0, None)
    sh = np.clip(1.0 - ((xl + 2.0) / (EYE_W + 2.0)) ** 2, 0.0, None)  # upper peak is medial
    yu = up * EYE_HU * (s * sh) ** 0.85
    yl = -low * EYE_HL * s
    return yu, yl


def fissure_mask(xl, ey, up=1.0, low=1.0, soft=0.7):
    """1 inside the open palpebral fissure (eyeball visible), 0 on the lids, C1 in between."""
    yu, yl = lid_margins(xl, up, low)
    d = np.minimum(yu - ey, ey - yl)
    return sstep(d / soft)


def _side_value(pair, side):
    return np.where(side > 0, pair[1], pair[0])


def eye_shape(X, Y, state: FaceState = NEUTRAL_STATE):
    """Radial relief of the eye region (socket, eyeball, lids), mm."""
    xl, ey, side = eye_local(X, Y)
    up = _side_value(state.lid_up, side)
    low = _side_value(state.lid_low, side)
    r = -10.0 * bump(xl + 1.0, ey + 0.5, 36.0, 27.0)                      # orbit
    r += 4.5 * bump(xl, ey, 22.0, 17.0)                                      # eyeball under the lids
    fm = fissure_mask(xl, ey, up, low)
    rho2 = xl * xl + (ey - 0.3) ** 2
    cornea = 1.6 * bump1(np.sqrt(rho2), IRIS_R + 0.8)
    r += fm * (cornea - 1.6)                                                 # recessed eyeball, cornea
    crease_y = 8.0 + 3.0 * (1.0 - np.clip(up, 0.0, 1.0))
    r -= 1.0 * bump(xl + 1.0, ey - crease_y, 15.0, 2.5)                       # upper lid crease
    r -= 0.7 * bump(xl - 1.0, ey + 8.5, 13.0, 3.5)                            # lower lid / tear trough
    closed = np.clip(1.0 - up, 0.0, 1.0)
    r -= 0.35 * closed * bump(xl, ey, EYE_W, 1.0)                              # lash line of a closed eye
    return r


def mouth_line(X):
    """Y of the lip contact line (mm) at design X."""
    return MOUTH_Y + MOUTH_CURVE * X * X


def mouth_lateral(X):
    """1 between the mouth corners, 0 beyond them (C1)."""
    return sstep((MOUTH_W - np.abs(X)) / 4.0)


def mouth_band_coord(X, Y):
    """Coordinate across the band between the inner lips: 0 at the upper inner lip, 1 at the lower."""
    return np.clip((mouth_line(X) + 0.5 * MOUTH_BAND - Y) / MOUTH_BAND, 0.0, 1.0)


def nasolabial_distance(aX, Y):
    """Signed distance (mm, + lateral) to the nasolabial segment and the position along it."""
    ax_, ay_, bx_, by_ = 17.5, -14.0, 31.0, -47.0
    vx, vy = bx_ - ax_, by_ - ay_
    s = np.clip(((aX - ax_) * vx + (Y - ay_) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    dx, dy = aX - (ax_ + s * vx), Y - (ay_ + s * vy)
    sgn = np.where(dx * (-vy) + dy * vx >= 0, 1.0, -1.0)
    return np.sqrt(dx * dx + dy * dy) * sgn, s


# -- the mean radius -----------------------------------------------------------------------

def _base_radius(td, pd):
    """Skull + face envelope (a superquadric with an azimuth-dependent jaw) joined to the neck."""
    t, p = td * D2R, pd * D2R
    cp = np.cos(p)
    dx, dy, dz = cp * np.sin(t), np.sin(p), cp * np.cos(t)
    c = np.where(dz > 0, 88.0, 95.0)
    at = np.abs(td)
    bb = 57.0 + 53.0 * (1.0 - sstep((at - 10.0) / 95.0))  # mandible border depth below the centre
    b = np.where(dy > 0, 120.0, bb)
    nv = np.where(dy > 0, 2.2, 3.0)
    hor = (np.abs(dx) / 76.0) ** 2.6 + (np.abs(dz) / c) ** 2.6
    r = (hor ** (nv / 2.6) + (np.abs(dy) / b) ** nv) ** (-1.0 / nv)
    cn = np.where(dz > 0, 50.0, 70.0)
    rho = ((np.sin(t) / 56.0) ** 2 + (np.cos(t) / cn) ** 2) ** -0.5
    rn = rho / np.maximum(cp, 1e-3)
    return smoothmax(r, rn, 3.0)


def mean_radius(dom: Domain, state: FaceState = NEUTRAL_STATE) -> np.ndarray:
    """Radius (mm) of the mean neutral head at the domain's (theta, phi), in the domain's shape."""
    out = _base_radius(dom.td, dom.pd)
    X, Y = dom.X, dom.Y

    def add(box, fn):
        s = dom.sel(box)
        if s is not None:
            out[s] += fn(X[s], Y[s], dom.td[s], dom.pd[s])

    # broad envelope: forehead, muzzle (dental arch), chin, labiomental fold
    add(xy_box(95, -12, 95), lambda x, y, t, p: 9.0 * bump(x, y - 45.0, 140.0, 56.0) * _front(t))
    add(xy_box(80, -92, 10), lambda x, y, t, p: 6.5 * bump(x, y + 40.0, 78.0, 47.0)
        + 8.5 * bump(x, y + 64.0, 52.0, 26.0) - 2.5 * bump(x, y + 54.5, 40.0, 7.5))
    # brow ridge, glabella, temples, cheekbones, cheeks
    add(xy_box(90, -10, 65), lambda x, y, t, p: 4.0 * bump(np.abs(x) - 24.0, y - 33.0, 50.0, 15.0)
        + 2.0 * bump(x, y - 31.0, 25.0, 18.0) - 4.0 * bump(np.abs(x) - 60.0, y - 28.0, 25.0, 35.0))
    add(xy_box(90, -60, 30), lambda x, y, t, p: 5.0 * bump(np.abs(x) - 47.0, y - 2.0, 35.0, 25.0)
        + 3.0 * bump(np.abs(x) - 38.0, y + 26.0, 30.0, 30.0))
    # eyes
    add(xy_box(EYE_X + 45, EYE_Y - 35, EYE_Y + 35),
        lambda x, y, t, p: eye_shape(x, y, state) * sstep((np.abs(x) - 2.0) / 6.0))
    add(xy_box(60, -62, 45), lambda x, y, t, p: _nose(x, y))
    add(xy_box(60, -75, -5), lambda x, y, t, p: _mouth_region(x, y))
    add((-140, -70, -45, 50), lambda x, y, t, p: _ear(-t, p))
    add((70, 140, -45, 50), lambda x, y, t, p: _ear(t, p))
    return out


def _front(td):
    """1 on the face, fading to 0 before the design coordinates fold at |theta| = 90 deg."""
    return sstep((88.0 - np.abs(td)) / 30.0)


def _nose(X, Y):
    aX = np.abs(X)
    ny = np.clip((27.0 - Y) / 38.0, 0.0, 1.3)
    h = np.where(Y > -10.0, 1.0 + 19.5 * ny ** 1.35, 20.5 * np.exp(-0.5 * ((Y + 10.0) / 4.3) ** 2))
    w = 5.0 + 4.5 * ny
    r = h * np.exp(-0.5 * (X / w) ** 2) * sstep((36.0 - Y) / 10.0) * sstep((Y + 30.0) / 8.0)
    r -= 2.0 * bump(X, Y - 27.0, 12.0, 8.0)                     # radix (nasion dip)
    r += 5.0 * bump(aX - 13.0, Y + 14.0, 13.0, 13.0)            # alae
    r -= 1.5 * bump(aX - 17.5, Y + 12.0, 5.0, 15.0)             # alar crease
    r -= 3.0 * bump(aX - 6.0, Y + 18.0, 7.0, 4.5)               # nostrils
    d, s = nasolabial_distance(aX, Y)
    r -= 1.5 * np.exp(-0.5 * (d / 2.5) ** 2) * np.sin(np.pi * s) ** 0.5  # nasolabial folds
    return r


def _mouth_region(X, Y):
    ys = mouth_line(X)
    mw = np.exp(-((X / 22.0) ** 4))
    r = 3.2 * mw * np.exp(-0.5 * ((Y - ys - 4.5) / 2.8) ** 2)            # upper lip
    r += 4.0 * mw * np.exp(-0.5 * ((Y - ys + 5.0) / 3.2) ** 2)           # lower lip
    r -= 2.0 * mouth_lateral(X) * np.exp(-0.5 * ((Y - ys) / 0.8) ** 2)  # contact groove
    r -= 0.7 * bump(X, Y + 27.0, 7.0, 9.0)                               # philtrum
    r -= 1.5 * bump(np.abs(X) - MOUTH_W - 1.0, Y - ys, 5.0, 5.0)         # commissures
    return r


def _ear(td, pd):
    """Relief of the (left) ear in angular coordinates; the right ear uses -theta."""
    e_t, e_p = td - 101.0, pd - 5.0
    er = np.sqrt((e_t / 11.0) ** 2 + (e_p / 21.0) ** 2)
    ear = 13.0 * sstep((1.0 - er) / 0.12)
    ang = np.arctan2(e_p, -e_t)
    ear += 4.0 * np.exp(-0.5 * ((er - 0.85) / 0.08) ** 2) * (1.0 - 0.8 * np.exp(-0.5 * ((ang + 0.3) / 0.5) ** 2))
    conc = np.sqrt(((e_t + 2.0) / 7.5) ** 2 + ((e_p + 3.0) / 11.0) ** 2)
    ear -= 8.0 * sstep((1.0 - conc) / 0.4)
    return ear * (1.0 + 0.3 * np.clip(e_t / 11.0, -1.0, 1.0))
