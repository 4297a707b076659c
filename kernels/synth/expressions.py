"""The 22 expressions of the synthetic faces (FaceWarehouse-style) and their deformation.

An expression is a localised deformation of the subject's neutral head, built from
four kinds of primitives, each scaled by the subject's intensity for that expression:

* **skin sliding**: a tangential motion ``(dX, dY)`` (mm, design coordinates) of the
  material with a smooth bounded weight; the moved skin takes the radius of the mean
  shape at its new place (it slides over the face) plus the subject's own identity offset;
* **shape state**: eyelid openness (upper / lower margin heights), which changes the
  shape of the eye region and moves the lid material (closing compresses the visible
  eyeball material into the lash line, the upper lid stretches down over the eye);
* **radial offsets** of the material (cheek inflation, lip protrusion, furrows);
* **jaw rotations** about the x axis (opening, chin down and back) and the y axis
  (lateral jaw) through the head centre, weighted by a soft jaw mask. The band of
  material between the inner lips is stretched by the opening and recedes into a mouth
  cavity (up to ``FaceModelParams.mouth_cavity_mm``).

Every primitive keeps the surface a radial graph about the head centre with an
orientation-preserving map of directions (bounded weight gradients), so no triangle
flips for intensities up to 1.25 and identity coefficients within +-3 sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.synth.face_identity import displacement, field_scalars
from kernels.synth.face_geometry import (
    EYE_BOT, EYE_TOP, EYE_X, EYE_Y, MOUTH_W, Domain, FaceState, bump, design_to_angles,
    direction, eye_local, lid_margins, mean_radius, mouth_band_coord, mouth_line,
    nasolabial_distance, sstep, to_spherical, xy_box,
)


@dataclass(frozen=True)
class Expression:
    """One of the 22 expressions.

    Attributes
    ----------
    name : str
    category : str
        ``"neutral"``, ``"positive"`` or ``"negative"``.
    exaggerated : bool
        True for the expressions on which registration is expected to fail
        (``grin``, ``surprise``, ``cheek_blow``).
    """

    name: str
    category: str
    exaggerated: bool = False


EXPRESSIONS: tuple = (
    Expression("neutral", "neutral"),
    Expression("mouth_open", "neutral"),
    Expression("smile", "positive"),
    Expression("grin", "positive", True),
    Expression("kiss", "neutral"),
    Expression("brow_raise", "positive"),
    Expression("brow_lower", "negative"),
    Expression("jaw_left", "neutral"),
    Expression("jaw_right", "neutral"),
    Expression("jaw_forward", "neutral"),
    Expression("mouth_left", "neutral"),
    Expression("mouth_right", "neutral"),
    Expression("dimpler", "positive"),
    Expression("chin_raiser", "negative"),
    Expression("lip_funneler", "neutral"),
    Expression("lip_roll", "neutral"),
    Expression("cheek_blow", "neutral", True),
    Expression("eyes_closed", "neutral"),
    Expression("sadness", "negative"),
    Expression("sneer", "negative"),
    Expression("surprise", "positive", True),
    Expression("lip_stretcher", "negative"),
)
EXPRESSION_INDEX = {e.name: i for i, e in enumerate(EXPRESSIONS)}

_FACE = xy_box(95, -95, 95)
_MOUTH = xy_box(70, -85, 0)
_UPPER = xy_box(85, -5, 90)


def _sgn(x):
    return np.where(x >= 0, 1.0, -1.0)


def _corners(ax, ay, sx, sy):
    """Move of the mouth corners by (ax lateral, ay up) mm with a bump of radii (sx, sy)."""
    return lambda X, Y: (ax * _sgn(X) * bump(np.abs(X) - 24.0, Y - mouth_line(X), sx, sy),
                         ay * bump(np.abs(X) - 24.0, Y - mouth_line(X), sx, sy))


def _lift(ax, ay, cx, cy, sx, sy, mirror=True):
    def f(X, Y):
        b = bump((np.abs(X) if mirror else X) - cx, Y - cy, sx, sy)
        return (ax * (_sgn(X) if mirror else 1.0) * b, ay * b)
    return f


def _nasolabial(X, Y):
    d, s = nasolabial_distance(np.abs(X), Y)
    return -bump(d, 0.0, 6.0, 1.0) * np.sin(np.pi * s) ** 0.5


def _wrinkles(X, Y):
    return -0.4 * np.sin(2.0 * np.pi * (Y - 45.0) / 9.0) * bump(X, Y - 52.0, 55.0, 18.0)


@dataclass(frozen=True)
class _Spec:
    moves: tuple = ()          # ((box, fn(X, Y) -> (dX, dY)), ...)
    radial: tuple = ()         # ((box, fn(X, Y) -> dr), ...)
    lid_up: tuple = (1.0, 1.0)
    lid_low: tuple = (1.0, 1.0)
    jaw_open: str | float = 0.0  # degrees, or the name of a FaceModelParams field
    jaw_side_deg: float = 0.0
    jaw_forward_mm: float = 0.0


_SPECS = {
    "neutral": _Spec(),
    "mouth_open": _Spec(jaw_open="mouth_open_deg"),
    "smile": _Spec(
        moves=((_MOUTH, _corners(5.0, 5.0, 22.0, 18.0)), (_FACE, _lift(0.0, 3.0, 38.0, -18.0, 25.0, 30.0))),
        radial=((_FACE, lambda X, Y: 2.5 * bump(np.abs(X) - 38.0, Y + 16.0, 22.0, 22.0) + 1.2 * _nasolabial(X, Y)
                 - 1.2 * bump(np.abs(X) - 26.0, Y - mouth_line(X), 6.0, 6.0)),),
        lid_up=(0.95, 0.95), lid_low=(0.8, 0.8)),
    "grin": _Spec(
        moves=((_MOUTH, _corners(9.0, 7.0, 23.0, 22.0)), (_FACE, _lift(0.0, 5.0, 38.0, -18.0, 28.0, 32.0)),
               (_MOUTH, _lift(0.0, 2.0, 0.0, -33.0, 26.0, 12.0, mirror=False))),
        radial=((_FACE, lambda X, Y: 4.0 * bump(np.abs(X) - 38.0, Y + 16.0, 24.0, 24.0) + 2.0 * _nasolabial(X, Y)),),
        lid_up=(0.75, 0.75), lid_low=(0.55, 0.55), jaw_open="grin_jaw_deg"),
    "kiss": _Spec(
        moves=((_MOUTH, _corners(-8.0, 0.0, 24.0, 18.0)),),
        radial=((_MOUTH, lambda X, Y: 6.0 * bump(X, Y - mouth_line(X), 26.0, 17.0)
                 - 1.5 * bump(np.abs(X) - 35.0, Y + 35.0, 15.0, 18.0)),)),
    "brow_raise": _Spec(
        moves=((_UPPER, _lift(0.0, 7.0, 0.0, 33.0, 70.0, 22.0, mirror=False)),),
        radial=((_UPPER, _wrinkles),), lid_up=(1.15, 1.15)),
    "brow_lower": _Spec(
        moves=((_UPPER, _lift(-2.5, -4.0, 20.0, 33.0, 28.0, 16.0)),),
        radial=((_UPPER, lambda X, Y: -1.0 * (bump(X - 5.0, Y - 30.0, 2.5, 12.0) + bump(X + 5.0, Y - 30.0, 2.5, 12.0))
                 + 1.5 * bump(np.abs(X) - 18.0, Y - 32.0, 16.0, 8.0)),), lid_up=(0.85, 0.85)),
    "jaw_left": _Spec(jaw_open=3.0, jaw_side_deg=5.0),
    "jaw_right": _Spec(jaw_open=3.0, jaw_side_deg=-5.0),
    "jaw_forward": _Spec(jaw_open=2.0, jaw_forward_mm=5.0),
    "mouth_left": _Spec(moves=((_MOUTH, _lift(7.0, 0.0, 0.0, -41.0, 38.0, 24.0, mirror=False)),)),
    "mouth_right": _Spec(moves=((_MOUTH, _lift(-7.0, 0.0, 0.0, -41.0, 38.0, 24.0, mirror=False)),)),
    "dimpler": _Spec(
        moves=((_MOUTH, _corners(2.0, 0.5, 14.0, 12.0)),),
        radial=((_MOUTH, lambda X, Y: -2.5 * bump(np.abs(X) - 25.0, Y - mouth_line(X), 8.0, 8.0)
                 - 1.5 * bump(np.abs(X) - 34.0, Y - mouth_line(X) + 3.0, 5.0, 5.0)),)),
    "chin_raiser": _Spec(
        moves=((_MOUTH, _lift(0.0, 3.0, 0.0, -64.0, 30.0, 22.0, mirror=False)), (_MOUTH, _corners(0.0, -2.0, 14.0, 12.0))),
        radial=((_MOUTH, lambda X, Y: 2.5 * bump(X, Y - mouth_line(X) + 6.0, 22.0, 8.0) + 2.0 * bump(X, Y + 66.0, 20.0, 14.0)),)),
    "lip_funneler": _Spec(
        moves=((_MOUTH, _corners(-5.0, 0.0, 20.0, 16.0)),),
        radial=((_MOUTH, lambda X, Y: 5.0 * bump(X, Y - mouth_line(X), 26.0, 15.0)),), jaw_open=4.0),
    "lip_roll": _Spec(radial=((_MOUTH, lambda X, Y: -3.0 * bump(X, Y - mouth_line(X), 26.0, 12.0)),)),
    "cheek_blow": _Spec(
        radial=((_FACE, lambda X, Y: 12.0 * bump(np.abs(X) - 38.0, Y + 28.0, 34.0, 36.0) - 1.5 * _nasolabial(X, Y)
                 + 2.0 * bump(X, Y - mouth_line(X), 22.0, 12.0)),)),
    "eyes_closed": _Spec(lid_up=(0.08, 0.08), lid_low=(0.7, 0.7)),
    "sadness": _Spec(
        moves=((_UPPER, _lift(0.0, 4.0, 12.0, 33.0, 18.0, 14.0)), (_MOUTH, _corners(0.0, -3.5, 16.0, 14.0))),
        radial=((_MOUTH, lambda X, Y: 1.5 * bump(X, Y - mouth_line(X) + 6.0, 20.0, 8.0) + 1.0 * bump(X, Y + 66.0, 20.0, 14.0)),),
        lid_up=(0.85, 0.85)),
    "sneer": _Spec(
        moves=((_MOUTH, lambda X, Y: (0.0 * X, 3.5 * bump(X - 13.0, Y - mouth_line(X) - 6.0, 16.0, 12.0))),
               (_FACE, lambda X, Y: (0.0 * X, 2.0 * bump(X - 13.0, Y + 14.0, 12.0, 12.0)))),
        radial=((_FACE, lambda X, Y: 1.5 * bump(X - 10.0, Y - 8.0, 10.0, 10.0) + 1.5 * _nasolabial(X, Y) * (X > 0)),),
        lid_low=(1.0, 0.8)),
    "surprise": _Spec(
        moves=((_UPPER, _lift(0.0, 9.0, 0.0, 33.0, 70.0, 24.0, mirror=False)),),
        radial=((_UPPER, _wrinkles),), lid_up=(1.3, 1.3), lid_low=(1.1, 1.1), jaw_open="surprise_jaw_deg"),
    "lip_stretcher": _Spec(
        moves=((_MOUTH, _corners(6.0, -1.5, 24.0, 16.0)),),
        radial=((_MOUTH, lambda X, Y: -1.5 * bump(X, Y - mouth_line(X), 26.0, 12.0)),), jaw_open=2.0),
}


def jaw_open_deg(name: str, intensity: float, params) -> float:
    """Jaw opening in degrees of expression ``name`` at ``intensity``."""
    j = _SPECS[name].jaw_open
    return float(getattr(params, j) if isinstance(j, str) else j) * intensity


def face_state(name: str, intensity: float) -> FaceState:
    """Eyelid state of expression ``name`` at ``intensity`` (interpolated from neutral)."""
    sp = _SPECS[name]

    def lerp(pair):
        return tuple(float(np.clip(1.0 + intensity * (v - 1.0), 0.08, 1.6)) for v in pair)
    return FaceState(lerp(sp.lid_up), lerp(sp.lid_low))


def jaw_weight(X, Y, td, pd, corner_mm: float = 10.0):
    """Soft jaw mask in [0, 1]: 1 on the lower lip, chin and jaw, 0 above the mouth.

    ``X, Y`` are the material design coordinates: across the band between the inner
    lips the mask ramps from 0 to 1 (so opening stretches the band); on the cheeks the
    ramp is 30 mm tall, the two blend over ``corner_mm`` inside the mouth corners.
    ``td, pd`` are the *current* direction (degrees) of the point: the mask fades
    towards the ears (|theta| from 40 to 100 deg) and down the neck; because these fades
    depend on the current direction, rotating by ``angle * mask`` is a map of the
    direction sphere onto itself that never folds for the angles used here.
    """
    lam = sstep((MOUTH_W - np.abs(X)) / corner_mm)
    s_band = sstep(mouth_band_coord(X, Y))
    s_cheek = sstep((mouth_line(X) + 3.0 - Y) / 30.0)
    w = lam * s_band + (1.0 - lam) * s_cheek
    return w * sstep((100.0 - np.abs(td)) / 60.0) * (0.35 + 0.65 * sstep((pd + 75.0) / 45.0))


def _lid_warp(X, Y, state: FaceState):
    """dY (mm) of the eyelid material for the lid state (piecewise linear per column)."""
    xl, ey, side = eye_local(X, Y)
    up = np.where(side > 0, state.lid_up[1], state.lid_up[0])
    low = np.where(side > 0, state.lid_low[1], state.lid_low[0])
    yu, yl = lid_margins(xl)
    yu2, yl2 = lid_margins(xl, up, low)
    out = ey.copy()
    ok_u = yu > 1e-6
    a = (ey >= 0) & (ey <= yu) & ok_u
    out[a] = ey[a] * (yu2[a] / yu[a])
    b = (ey > yu) & (ey < EYE_TOP) & ok_u
    out[b] = yu2[b] + (ey[b] - yu[b]) * (EYE_TOP - yu2[b]) / (EYE_TOP - yu[b])
    ok_l = yl < -1e-6
    c = (ey < 0) & (ey >= yl) & ok_l
    out[c] = ey[c] * (yl2[c] / yl[c])
    d = (ey < yl) & (ey > EYE_BOT) & ok_l
    out[d] = EYE_BOT + (ey[d] - EYE_BOT) * (yl2[d] - EYE_BOT) / (yl[d] - EYE_BOT)
    return out - ey


_JAW_BOX = (-100.5, 100.5, -100.0, -10.0)
_EYE_BOX = xy_box(EYE_X + 16.0, EYE_Y + EYE_BOT - 3.0, EYE_Y + EYE_TOP + 3.0)


def deform(dom: Domain, p_id: np.ndarray, name: str, intensity: float, coeffs: np.ndarray, params):
    """Apply expression ``name`` to the subject's neutral points.

    Parameters
    ----------
    dom : Domain
        Material points (shape S).
    p_id : (S..., 3) float64
        Neutral points of the subject (mean + identity).
    name : str
    intensity : float
    coeffs : (K_TOTAL,) float64
        The subject's identity, gender and age coefficients.
    params : FaceModelParams

    Returns
    -------
    points : (S..., 3) float64
        Deformed points (a new array).
    warped : tuple (Xw, Yw, state)
        Design coordinates of the material after skin sliding (S...) and the lid state,
        used for the spatial albedo of the eyes.
    """
    sp = _SPECS[name]
    s = float(intensity)
    out = p_id.copy()
    X, Y = dom.X, dom.Y
    dX = np.zeros(dom.shape)
    dY = np.zeros(dom.shape)
    dr = np.zeros(dom.shape)
    state = face_state(name, s)
    changed = np.zeros(dom.shape, dtype=bool)
    reshape = np.zeros(dom.shape, dtype=bool)
    for box, fn in sp.moves:
        sel = dom.sel(box)
        if sel is not None:
            mx, my = fn(X[sel], Y[sel])
            dX[sel] += s * mx
            dY[sel] += s * my
    for box, fn in sp.radial:
        sel = dom.sel(box)
        if sel is not None:
            dr[sel] += s * fn(X[sel], Y[sel])
    if state != FaceState():
        sel = dom.sel(_EYE_BOX)
        if sel is not None:
            dY[sel] += _lid_warp(X[sel], Y[sel], state)
            reshape[sel] = True
    jaw = jaw_open_deg(name, s, params)
    if jaw > 0.0 and params.mouth_cavity_mm > 0.0:
        sel = dom.sel(_MOUTH)
        if sel is not None:
            sb = mouth_band_coord(X[sel], Y[sel])
            depth = params.mouth_cavity_mm * min(1.0, jaw / 12.0)
            lam = sstep((MOUTH_W - np.abs(X[sel])) / 10.0)
            dr[sel] -= depth * lam * np.sin(np.pi * sb) ** 0.3
    slid = (dX != 0.0) | (dY != 0.0)
    changed |= slid | reshape | (dr != 0.0)
    Xw, Yw = X + dX, Y + dY
    if np.any(changed):
        m = changed
        moved = slid[m] | reshape[m]
        q = out[m]
        if np.any(moved):
            # the skin slides over the subject's own (expression-state) neutral shape:
            # evaluate mean + identity at the new place (composition keeps orientation)
            mm = np.nonzero(m)
            mm = tuple(a[moved] for a in mm)
            sub_t, sub_p = design_to_angles(Xw[mm], Yw[mm])
            sub = Domain.points(sub_t, sub_p)
            rad = direction(sub_t, sub_p)
            mean_w = mean_radius(sub, state)[:, None] * rad
            q[moved] = mean_w + displacement(field_scalars(sub, mean_w, coeffs), rad)
        q = q + dr[m][:, None] * q / np.linalg.norm(q, axis=-1, keepdims=True)
        out[m] = q
    side = sp.jaw_side_deg * s
    fwd = sp.jaw_forward_mm * s
    if jaw > 0.0 or side != 0.0 or fwd != 0.0:
        sel = dom.sel(_JAW_BOX)
        if sel is not None:
            q = out[sel]
            tq, pq, rq = to_spherical(q)
            w = jaw_weight(X[sel], Y[sel], tq, pq)
            w_side = jaw_weight(X[sel], Y[sel], tq, pq, corner_mm=24.0) if side else w
            # opening: the jaw turns down along the meridians (a rotation about the x axis
            # through the head centre on the midline); lateral jaw: a turn about the y axis
            out[sel] = (rq + fwd * w)[..., None] * direction(tq + side * w_side, pq - jaw * w)
    return out, (Xw, Yw, state)
