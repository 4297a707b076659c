"""The 106 landmarks of the synthetic faces as material points (uv) of the parametrisation.

Ordering: the JD-landmark / LaPa 106-point convention (``docs/landmarks.md``). "A"
groups and index 0 are on the **subject's right** (world -x). Every landmark of the
subject's left is the mirror (theta -> -theta) of its partner in the flip map, so the
flip-map symmetry holds exactly by construction.
"""

from __future__ import annotations

import numpy as np

from kernels.synth.face_geometry import (
    D2R, EYE_TILT, EYE_X, EYE_Y, EYE_W, MOUTH_BAND, MOUTH_W, design_to_angles, lid_margins, mouth_line,
)

FLIP_MAP = np.array([
    32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
    46, 45, 44, 43, 42, 50, 49, 48, 47, 37, 36, 35, 34, 33, 41, 40, 39, 38,
    51, 52, 53, 54, 65, 64, 63, 62, 61, 60, 59, 58, 57, 56, 55,
    79, 78, 77, 76, 75, 82, 81, 80, 83, 70, 69, 68, 67, 66, 73, 72, 71, 74,
    90, 89, 88, 87, 86, 85, 84, 95, 94, 93, 92, 91, 100, 99, 98, 97, 96, 103, 102, 101, 105, 104,
])

# Contour keypoints (theta_deg, phi_deg) from point 0 (subject's right, level with the
# eyes) down along the jaw line to the chin (point 16 at theta = 0).
_CONTOUR_KEYS = np.array([
    [-80.0, 13.0], [-81.0, 0.0], [-81.0, -13.0], [-79.0, -26.0], [-74.0, -37.0],
    [-64.0, -45.0], [-51.0, -49.0], [-37.0, -51.5], [-24.0, -53.5], [-12.0, -55.0], [0.0, -55.5],
])


def brow_line(xl):
    """Y (mm, design) of the eyebrow centre line at eye-lateral coordinate ``xl`` (mm)."""
    return EYE_Y + 13.5 + 3.0 * (1.0 - ((xl + 2.0) / 20.0) ** 2)


def brow_half_thickness(xl):
    """Half thickness (mm) of the eyebrow at ``xl``: 3.8 medially, 1.6 at the tail."""
    return 3.8 - 2.2 * np.clip((xl + 17.0) / 37.0, 0.0, 1.0)


BROW_XL = (-17.0, 20.0)  # medial and lateral ends (eye-lateral coordinate)


def vermilion_upper(X):
    """Height (mm) of the upper vermilion above the lip line at design ``X`` (Cupid's bow)."""
    t = np.clip(1.0 - (np.abs(X) / MOUTH_W) ** 2, 0.0, None)
    return (7.0 + 2.2 * np.exp(-0.5 * ((np.abs(X) - 6.0) / 3.0) ** 2)) * t ** 0.6


def vermilion_lower(X):
    """Height (mm) of the lower vermilion below the lip line at design ``X``."""
    t = np.clip(1.0 - (np.abs(X) / MOUTH_W) ** 2, 0.0, None)
    return 10.5 * t ** 0.55


def _right_side_design() -> dict[int, tuple[float, float]]:
    """Design (X, Y) of the landmarks on the subject's right and on the midline."""
    pts: dict[int, tuple[float, float]] = {}
    # brow A: upper arc 33 (outer) -> 37 (inner), lower arc 38 (inner) -> 41 (outer)
    xs_up = np.linspace(BROW_XL[1], BROW_XL[0], 5)
    for k, xl in zip(range(33, 38), xs_up):
        pts[k] = (-(EYE_X + xl), float(brow_line(xl) + brow_half_thickness(xl)))
    xs_lo = np.linspace(BROW_XL[0] + 2.0, BROW_XL[1] - 3.0, 4)
    for k, xl in zip(range(38, 42), xs_lo):
        pts[k] = (-(EYE_X + xl), float(brow_line(xl) - brow_half_thickness(xl)))
    # nose bridge, top -> tip
    for k, y in zip(range(51, 55), (27.0, 15.0, 3.0, -9.5)):
        pts[k] = (0.0, y)
    # lower nose arc 55 .. 60 (midline)
    for k, (x, y) in zip(range(55, 61), ((-17.5, -9.0), (-18.0, -14.0), (-14.0, -18.5), (-9.5, -20.5), (-5.0, -21.0), (0.0, -21.5))):
        pts[k] = (x, y)
    # eye A: 66 outer corner, 67-69 upper lid outer -> inner, 70 inner corner, 71-73 lower lid inner -> outer
    def eye_pt(xl, which):
        yu, yl = lid_margins(np.array(xl))
        ey = {"u": float(yu), "l": float(yl), "c": 0.0}[which]
        return (-(EYE_X + xl), EYE_Y + ey + EYE_TILT * xl)
    w = EYE_W - 0.3
    pts[66] = eye_pt(w, "c")
    for k, xl in zip((67, 68, 69), (w / 2, 0.0, -w / 2)):
        pts[k] = eye_pt(xl, "u")
    pts[70] = eye_pt(-w, "c")
    for k, xl in zip((71, 72, 73), (-w / 2, 0.0, w / 2)):
        pts[k] = eye_pt(xl, "l")
    yu0, yl0 = lid_margins(np.array(0.0))
    pts[74] = (-EYE_X, EYE_Y + 0.5 * float(yu0 + yl0))
    pts[104] = (-EYE_X, EYE_Y + 0.3)
    # outer lip: 84 corner, 85-86 upper, 87 top midline; 93 bottom midline, 94-95 lower
    cx = MOUTH_W - 0.5
    pts[84] = (-cx, float(mouth_line(cx)))
    for k, x in zip((85, 86, 87), (-15.0, -6.0, 0.0)):
        pts[k] = (x, float(mouth_line(x) + vermilion_upper(x) - 0.3))
    for k, x in zip((93, 94, 95), (0.0, -7.0, -15.0)):
        pts[k] = (x, float(mouth_line(x) - vermilion_lower(x) + 0.3))
    # inner lip: 96 corner, 97 upper, 98 top midline; 102 bottom midline, 103 lower
    ci = MOUTH_W - 2.5
    pts[96] = (-ci, float(mouth_line(ci)))
    for k, x in zip((97, 98), (-10.0, 0.0)):
        pts[k] = (x, float(mouth_line(x) + 0.5 * MOUTH_BAND))
    for k, x in zip((102, 103), (0.0, -10.0)):
        pts[k] = (x, float(mouth_line(x) - 0.5 * MOUTH_BAND))
    return pts


def landmark_uv_table() -> np.ndarray:
    """(106, 2) float64 uv = (theta, phi) in radians of the 106 landmarks."""
    uv = np.full((106, 2), np.nan)
    # contour: 17 points on the right half (0..16) along the key polyline, arc-length spaced
    keys = _CONTOUR_KEYS
    seg = np.linalg.norm(np.diff(keys, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.linspace(0.0, cum[-1], 17)
    th = np.interp(s, cum, keys[:, 0])
    ph = np.interp(s, cum, keys[:, 1])
    uv[:17] = np.stack([th, ph], axis=1) * D2R
    for k, (x, y) in _right_side_design().items():
        t, p = design_to_angles(np.array(x), np.array(y))
        uv[k] = (float(t) * D2R, float(p) * D2R)
    # mirror: every landmark without a value is the mirror of its flip partner
    for k in range(106):
        if np.isnan(uv[k, 0]):
            j = FLIP_MAP[k]
            uv[k] = (-uv[j, 0], uv[j, 1])
    midline = (16, 51, 52, 53, 54, 60, 87, 93, 98, 102)
    uv[list(midline), 0] = 0.0
    return uv
