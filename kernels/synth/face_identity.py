"""The true linear identity generator of the synthetic faces.

Every mode is a smooth 3D displacement field over the uv parametrisation, written as a
sum of terms ``g(uv) * D(uv)`` where ``g`` is a scalar field with a bounded support
and ``D`` one of four direction fields: ``"r"`` (the unit radial direction of the
parametrisation, i.e. the mean surface's own direction), ``"x"``, ``"y"``, ``"z"``
(world axes). Fields are normalised so that their largest displacement is about 1 mm;
a mode's standard deviation ``sigma`` (mm) multiplies it, so a coefficient drawn from
N(0, 1) moves the surface by about ``sigma`` mm where the mode acts.

The columns of :func:`kernels.synth.face.identity_basis` are, in order, the
``N_IDENTITY`` modes of :data:`IDENTITY_MODES` (already multiplied by their sigma),
then the gender field (multiplied by the gender sign, -1 female / +1 male) and the age
field (multiplied by the normalised age ``(age - 49) / 31``, -1 at 18, +1 at 80).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kernels.synth.face_geometry import (
    EYE_X, EYE_Y, FULL, MOUTH_Y, Domain, bump, mouth_line, nasolabial_distance, sstep, xy_box,
)

KINDS = ("r", "x", "y", "z")


@dataclass(frozen=True)
class Term:
    kind: str                     # one of KINDS
    box: tuple                    # (theta0, theta1, phi0, phi1) degrees, support of fn
    fn: Callable | None           # fn(X, Y, theta_deg, phi_deg, mean_xyz) -> scalar field
    sep: tuple | None = None      # (f(theta_deg), g(phi_deg)): separable field f * g

    def evaluate(self, dom: Domain, s, mean_xyz):
        if self.sep is None:
            return self.fn(dom.X[s], dom.Y[s], dom.td[s], dom.pd[s], mean_xyz[s])
        ft, fp = self.sep
        if dom.grid_axes is not None:  # outer product on the grid axes: cheap
            ta, pa = dom.grid_axes
            return fp(pa[s[0]])[:, None] * ft(ta[s[1]])[None, :]
        return ft(dom.td[s]) * fp(dom.pd[s])


@dataclass(frozen=True)
class Mode:
    name: str
    sigma_mm: float
    description: str
    terms: tuple


def _front(t):
    return sstep((85.0 - np.abs(t)) / 30.0)


def _sgn(x):
    return np.where(x >= 0, 1.0, -1.0)


def _lower(y):
    return sstep((-15.0 - y) / 50.0)


def _upper(y):
    return sstep((y - 5.0) / 50.0)


FACE_BOX = xy_box(95, -95, 95)
EYES_BOX = xy_box(EYE_X + 25, EYE_Y - 22, EYE_Y + 22)
NOSE_BOX = xy_box(30, -35, 35)
MOUTH_BOX = xy_box(45, -70, -15)
CHIN_BOX = xy_box(60, -100, -35)


def _m(name, sigma, desc, *terms):
    return Mode(name, sigma, desc, tuple(Term(*t) for t in terms))


def _lowfreq(l, m, odd):
    """Smooth whole-head radial field: cos/sin(m theta) times a Legendre-like polynomial in phi."""
    def fp(p):
        u = p / 70.0
        return 0.8 * {0: np.ones_like(u), 1: u, 2: 1.5 * u * u - 0.5, 3: 2.5 * u ** 3 - 1.5 * u}[l]

    def ft(t):
        ang = np.radians(t) * 1.2
        return np.sin(m * ang) if odd else np.cos(m * ang)
    return ft, fp


_MODES = [
    _m("head_width", 4.0, "x scale of the whole head (x/76)", ("x", FULL, lambda x, y, t, p, m: m[..., 0] / 76.0)),
    _m("face_height", 4.0, "y scale of the whole head (y/100)", ("y", FULL, lambda x, y, t, p, m: m[..., 1] / 100.0)),
    _m("head_depth", 3.5, "z scale of the whole head (z/100)", ("z", FULL, lambda x, y, t, p, m: m[..., 2] / 100.0)),
    _m("jaw_width", 3.2, "x displacement of the mandible and lower cheeks",
       ("x", FULL, lambda x, y, t, p, m: (m[..., 0] / 60.0) * _lower(m[..., 1]) * sstep((m[..., 1] + 130.0) / 40.0))),
    _m("lower_face_height", 3.0, "y stretch of the face below the nose",
       ("y", FULL, lambda x, y, t, p, m: np.clip(m[..., 1] + 15.0, None, 0.0) / 85.0 * _front(t) * sstep((m[..., 1] + 140.0) / 30.0))),
    _m("forehead_slope", 3.0, "forehead leans forward/back (z displacement growing with height)",
       ("z", FULL, lambda x, y, t, p, m: np.clip(m[..., 1] - 25.0, 0.0, None) / 95.0 * _front(t))),
    _m("chin_projection", 2.8, "chin forward/back (radial)", ("r", CHIN_BOX, lambda x, y, t, p, m: bump(x, y + 66.0, 45.0, 30.0))),
    _m("nose_projection", 2.6, "nose tip and dorsum forward (radial)",
       ("r", NOSE_BOX, lambda x, y, t, p, m: bump(x, y + 6.0, 18.0, 30.0) * sstep((25.0 - y) / 25.0))),
    _m("cheekbones", 2.5, "malar prominence (radial)", ("r", FACE_BOX, lambda x, y, t, p, m: bump(np.abs(x) - 47.0, y - 2.0, 30.0, 22.0))),
    _m("cheek_fullness", 2.4, "soft-tissue fullness of the lower cheeks (radial)",
       ("r", FACE_BOX, lambda x, y, t, p, m: bump(np.abs(x) - 40.0, y + 30.0, 30.0, 30.0))),
    _m("upper_face_width", 2.3, "x scale of forehead and temples",
       ("x", FULL, lambda x, y, t, p, m: (m[..., 0] / 76.0) * _upper(m[..., 1]))),
    _m("submental", 2.2, "fullness under the chin (radial)",
       ("r", (-90, 90, -75, -35), lambda x, y, t, p, m: bump(t / 60.0, (p + 62.0) / 14.0, 1.0, 1.0))),
    _m("brow_ridge", 2.0, "supraorbital ridge (radial)", ("r", FACE_BOX, lambda x, y, t, p, m: bump(np.abs(x) - 22.0, y - 33.0, 35.0, 13.0))),
    _m("nose_width", 2.0, "alar width (x displacement of the nose wings)",
       ("x", NOSE_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - 12.0, y + 14.0, 12.0, 16.0))),
    _m("jaw_angle_height", 2.0, "jaw angle up/down", ("y", FULL, lambda x, y, t, p, m: bump((np.abs(t) - 75.0) / 30.0, (p + 50.0) / 25.0, 1.0, 1.0))),
    _m("eye_socket_depth", 2.0, "depth of the orbits (radial, + = shallower)",
       ("r", EYES_BOX, lambda x, y, t, p, m: bump(np.abs(x) - EYE_X, y - EYE_Y, 22.0, 18.0))),
    _m("nose_length", 1.9, "nose tip down/up (y displacement)", ("y", NOSE_BOX, lambda x, y, t, p, m: -bump(x, y + 10.0, 20.0, 22.0))),
    _m("forehead_bulge", 1.8, "frontal bossing (radial)", ("r", FACE_BOX, lambda x, y, t, p, m: bump(x, y - 62.0, 70.0, 35.0))),
    _m("lip_protrusion", 1.8, "dental arch / lips forward (radial)", ("r", MOUTH_BOX, lambda x, y, t, p, m: bump(x, y - MOUTH_Y, 32.0, 24.0))),
    _m("mouth_width", 1.7, "mouth corners apart (x displacement)",
       ("x", MOUTH_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - 20.0, y - MOUTH_Y, 20.0, 16.0))),
    _m("ear_protrusion", 1.7, "ears stand out (radial)",
       ("r", (-140, 140, -45, 50), lambda x, y, t, p, m: bump(np.abs(t) - 103.0, p - 5.0, 16.0, 28.0))),
    _m("chin_height", 1.6, "chin down/up (y displacement)", ("y", CHIN_BOX, lambda x, y, t, p, m: -bump(x, y + 70.0, 40.0, 30.0))),
    _m("eye_spacing", 1.5, "eyes apart (x displacement of the eye regions)",
       ("x", EYES_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - EYE_X, y - EYE_Y, 22.0, 18.0))),
    _m("eye_height", 1.5, "eyes up/down (y displacement)", ("y", EYES_BOX, lambda x, y, t, p, m: bump(np.abs(x) - EYE_X, y - EYE_Y, 22.0, 18.0))),
    _m("neck_width", 1.5, "neck thickness (radial on the neck)", ("r", FULL, lambda x, y, t, p, m: sstep((-105.0 - m[..., 1]) / 30.0))),
    _m("temple_hollow", 1.4, "temples (radial)", ("r", FACE_BOX, lambda x, y, t, p, m: bump(np.abs(x) - 60.0, y - 28.0, 22.0, 30.0))),
    _m("nose_bridge", 1.4, "height of the nasal bridge (radial)", ("r", NOSE_BOX, lambda x, y, t, p, m: bump(x, y - 12.0, 10.0, 18.0))),
    _m("lower_lip", 1.3, "lower lip fullness (radial)", ("r", MOUTH_BOX, lambda x, y, t, p, m: bump(x, y - mouth_line(x) + 5.5, 24.0, 7.0))),
    _m("upper_lip", 1.2, "upper lip fullness (radial)", ("r", MOUTH_BOX, lambda x, y, t, p, m: bump(x, y - mouth_line(x) - 5.0, 24.0, 6.5))),
    _m("nose_tip", 1.2, "size of the nasal tip (radial)", ("r", NOSE_BOX, lambda x, y, t, p, m: bump(x, y + 10.0, 10.0, 9.0))),
    _m("philtrum_length", 1.2, "mouth up/down (y displacement of the lips)",
       ("y", MOUTH_BOX, lambda x, y, t, p, m: bump(x, y - MOUTH_Y, 36.0, 20.0))),
    _m("glabella", 1.1, "glabella prominence (radial)", ("r", FACE_BOX, lambda x, y, t, p, m: bump(x, y - 30.0, 18.0, 14.0))),
    _m("chin_width", 1.1, "chin width (x displacement)", ("x", CHIN_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - 16.0, y + 66.0, 22.0, 26.0))),
    _m("nasal_hump", 1.0, "dorsal hump (radial)", ("r", NOSE_BOX, lambda x, y, t, p, m: bump(x, y - 5.0, 9.0, 9.0))),
    _m("upper_lid", 1.0, "upper lid fullness (radial)",
       ("r", EYES_BOX, lambda x, y, t, p, m: bump(np.abs(x) - EYE_X, y - EYE_Y - 7.0, 16.0, 6.0))),
    _m("nasolabial", 0.9, "nasolabial fold depth (radial)",
       ("r", FACE_BOX, lambda x, y, t, p, m: _nasolabial(x, y))),
    _m("nose_deviation", 0.9, "nose bent to the side (asymmetric x displacement)", ("x", NOSE_BOX, lambda x, y, t, p, m: bump(x, y + 5.0, 20.0, 30.0))),
    _m("jaw_asymmetry", 1.0, "one side of the jaw fuller (antisymmetric radial)",
       ("r", FACE_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - 45.0, y + 55.0, 30.0, 30.0))),
    _m("eye_asymmetry", 0.8, "one eye higher (antisymmetric y)",
       ("y", EYES_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - EYE_X, y - EYE_Y, 22.0, 18.0))),
    _m("brow_asymmetry", 0.7, "one brow fuller (antisymmetric radial)",
       ("r", FACE_BOX, lambda x, y, t, p, m: _sgn(x) * bump(np.abs(x) - 25.0, y - 34.0, 30.0, 12.0))),
]

_LOWFREQ = [
    ("lowfreq_l1m0", 2.2, 1, 0, False), ("lowfreq_l0m1s", 2.0, 0, 1, True), ("lowfreq_l1m1", 1.9, 1, 1, False),
    ("lowfreq_l2m0", 1.8, 2, 0, False), ("lowfreq_l0m2", 1.6, 0, 2, False), ("lowfreq_l1m1s", 1.5, 1, 1, True),
    ("lowfreq_l2m1", 1.3, 2, 1, False), ("lowfreq_l3m0", 1.2, 3, 0, False), ("lowfreq_l0m3", 1.1, 0, 3, False),
    ("lowfreq_l2m2", 1.0, 2, 2, False),
]
_MODES += [_m(n, s, f"smooth whole-head radial field (phi order {l}, theta order {k}{' odd' if o else ''})",
              ("r", FULL, None, _lowfreq(l, k, o))) for n, s, l, k, o in _LOWFREQ]


def _nasolabial(x, y):
    d, s = nasolabial_distance(np.abs(x), y)
    return -bump(d, 0.0, 6.0, 1.0) * np.sin(np.pi * s) ** 0.5


# Sorted by decreasing sigma (stable): the documented order of the identity columns.
IDENTITY_MODES: tuple = tuple(sorted(_MODES, key=lambda m: -m.sigma_mm))
N_IDENTITY = len(IDENTITY_MODES)

GENDER_FIELD = _m(
    "gender", 1.0, "half the male-female difference (x +1 male, -1 female)",
    ("x", FULL, lambda x, y, t, p, m: 2.5 * m[..., 0] / 76.0),
    ("y", FULL, lambda x, y, t, p, m: 3.5 * m[..., 1] / 100.0),
    ("z", FULL, lambda x, y, t, p, m: 2.5 * m[..., 2] / 100.0),
    ("r", FACE_BOX, lambda x, y, t, p, m: 1.5 * bump(np.abs(x) - 22.0, y - 33.0, 35.0, 13.0)
     + 1.0 * bump(x, y - 30.0, 18.0, 14.0) + 1.2 * bump(x, y + 66.0, 45.0, 30.0)
     - 0.5 * bump(x, y - mouth_line(x), 24.0, 12.0) - 1.0 * bump(np.abs(x) - 40.0, y + 30.0, 30.0, 30.0)),
    ("r", NOSE_BOX, lambda x, y, t, p, m: 1.2 * bump(x, y + 6.0, 18.0, 30.0) * sstep((25.0 - y) / 25.0)),
    ("x", FULL, lambda x, y, t, p, m: 1.5 * (m[..., 0] / 60.0) * _lower(m[..., 1]) * sstep((m[..., 1] + 130.0) / 40.0)),
)

AGE_FIELD = _m(
    "age", 1.0, "half the 80-year minus 18-year difference (x +1 at 80, -1 at 18)",
    ("r", FACE_BOX, lambda x, y, t, p, m: 2.0 * bump(np.abs(x) - 42.0, y + 62.0, 22.0, 16.0)       # jowls
     - 1.2 * bump(x, y - mouth_line(x), 24.0, 12.0)                                              # thinner lips
     + 1.2 * _nasolabial(x, y) + 1.0 * bump(np.abs(x) - 30.0, y + 32.0, 10.0, 22.0)              # deeper folds
     - 1.0 * bump(np.abs(x) - EYE_X, y - EYE_Y, 20.0, 16.0)                                      # hollow eyes
     - 0.8 * bump(np.abs(x) - 60.0, y - 28.0, 22.0, 30.0)),                                      # temples
    ("y", FACE_BOX, lambda x, y, t, p, m: -1.5 * bump(np.abs(x) - 40.0, y + 45.0, 30.0, 30.0)      # sagging cheeks
     - 1.2 * bump(x, y + 10.0, 20.0, 22.0) - 0.8 * bump(np.abs(x) - 25.0, y - 34.0, 30.0, 12.0)),  # nose, brows
    ("r", (-90, 90, -75, -35), lambda x, y, t, p, m: 2.0 * bump(t / 60.0, (p + 62.0) / 14.0, 1.0, 1.0)),  # under chin
    ("y", (-140, 140, -45, 50), lambda x, y, t, p, m: 1.5 * np.clip(p - 5.0, -25, 25) / 25.0
     * bump(np.abs(t) - 101.0, p - 5.0, 16.0, 30.0)),                                               # longer ears
)

ALL_FIELDS: tuple = IDENTITY_MODES + (GENDER_FIELD, AGE_FIELD)


def field_scalars(dom: Domain, mean_xyz: np.ndarray, coeffs: np.ndarray) -> dict:
    """Sum of ``coeffs[k] * sigma_k * g_k`` per direction kind, arrays in the domain's shape.

    ``coeffs`` has one entry per field of :data:`ALL_FIELDS` (identity, gender, age).
    """
    acc = {k: None for k in KINDS}
    for mode, c in zip(ALL_FIELDS, coeffs):
        if c == 0.0:
            continue
        w = float(c) * mode.sigma_mm
        for term in mode.terms:
            s = dom.sel(term.box)
            if s is None:
                continue
            if acc[term.kind] is None:
                acc[term.kind] = np.zeros(dom.shape)
            acc[term.kind][s] += w * term.evaluate(dom, s, mean_xyz)
    return acc


def field_matrix(dom: Domain, mean_xyz: np.ndarray, radial: np.ndarray) -> np.ndarray:
    """All fields as an ``(n, 3, K_total)`` matrix (columns already multiplied by sigma)."""
    n = int(np.prod(dom.shape))
    out = np.zeros((n, 3, len(ALL_FIELDS)))
    for k, mode in enumerate(ALL_FIELDS):
        coeffs = np.zeros(len(ALL_FIELDS))
        coeffs[k] = 1.0
        acc = field_scalars(dom, mean_xyz, coeffs)
        out[:, :, k] = displacement(acc, radial).reshape(n, 3)
    return out


def displacement(acc: dict, radial: np.ndarray) -> np.ndarray:
    """3D displacement ``(..., 3)`` from the per-kind scalar sums of :func:`field_scalars`."""
    d = np.zeros(radial.shape)
    if acc["r"] is not None:
        d += acc["r"][..., None] * radial
    for i, k in enumerate(("x", "y", "z")):
        if acc[k] is not None:
            d[..., i] += acc[k]
    return d
