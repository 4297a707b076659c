"""Fused per-pixel loops of :func:`kernels.decode.decode_view` (numba, one core, float32).

The numpy path of :mod:`kernels.decode` makes ~150 passes over the band of rows holding
the face; these loops read the stack twice (saturation / modulation, then the phases)
and work on one pair of rows (one row of 2x2 bins) at a time, in cache. Every operation
mirrors the numpy path in float32 and in the same order, so the two agree bit for bit
except for the wrapped phase: ``atan2`` here is a branch-free polynomial
(:func:`atan2_f32`, max error 3.1e-7 rad against float64 ``arctan2`` over all integer
quadrature sums of the decoder and 4 M random inputs; numpy's float32 ``arctan2``: 3.4e-7),
so only a pixel whose residual or second difference lies within ~1e-7 periods of a
threshold could flip (none did in the tests and the benchmark: identical flags).
``tests/test_decode_view.py`` compares the two paths.

Performance notes (numba 0.68, LLVM): a loop is vectorised only when it indexes its
arrays with its bare induction variable (a runtime offset adds a negative-index select per
access) and touches few arrays (each written array needs runtime alias checks against
every other one, and LLVM gives up beyond a small budget). Hence the many small loops on
views below; the first fused version (one loop per step, ~15 arrays) was slower than numpy.

Only ``N = 4`` steps, ``L >= 2`` levels, 2 x 2 coarse bins and even image sizes are handled
here (the default rig); other configurations use the numpy path. Kernels are compiled on
first use and cached on disk (``cache=True``: numba's ``__pycache__`` next to this file,
else the user cache dir or ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_f32 = np.float32

# atan(t) = t P(t^2) on [0, 1]: Lawson-iterated least squares (near minimax), degree 15 (odd);
# float32 evaluation error <= 1.3e-7 rad, the whole atan2 <= 3.1e-7 rad (docs/decoding.md)
_A0 = _f32(0.9999993443489075)
_A1 = _f32(-0.33329859375953674)
_A2 = _f32(0.19946564733982086)
_A3 = _f32(-0.13908624649047852)
_A4 = _f32(0.09642184525728226)
_A5 = _f32(-0.05591215565800667)
_A6 = _f32(0.02186284214258194)
_A7 = _f32(-0.004054535645991564)
_HALF_PI = _f32(np.pi / 2)
_PI = _f32(np.pi)
_NAN = _f32(np.nan)
_INF = _f32(np.inf)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def atan2_f32(y, x):
    """float32 ``atan2(y, x)`` in ``[-pi, pi]`` (``atan2(0, 0) = 0``, ``atan2(+0, x < 0) = pi``)."""
    ax = abs(x)
    ay = abs(y)
    mx = max(ax, ay)
    mn = min(ax, ay)
    t = mn / mx  # NaN for (0, 0): replaced below (selects only, so loops vectorise)
    t2 = t * t
    p = _A7 * t2 + _A6
    p = p * t2 + _A5
    p = p * t2 + _A4
    p = p * t2 + _A3
    p = p * t2 + _A2
    p = p * t2 + _A1
    p = p * t2 + _A0
    a = t * p
    a = _HALF_PI - a if ay > ax else a
    a = _PI - a if x < _f32(0.0) else a
    a = -a if y < _f32(0.0) else a
    return a if mx > _f32(0.0) else _f32(0.0)


@njit(cache=True, nogil=True, error_model="numpy")
def finest_modulation(i0, i1, i2, i3, modulation):
    """Finest-level ``B = 2 |C + iS| / 4`` (N = 4: ``C = I0 - I2``, ``S = I1 - I3``, exact)."""
    for q in range(i0.size):
        c = _f32(i0[q]) - _f32(i2[q])
        s = _f32(i1[q]) - _f32(i3[q])
        m = c * c
        m += s * s
        modulation[q] = math.sqrt(m) * _f32(0.5)


@njit(cache=True, nogil=True, error_model="numpy")
def early_flags_rows(image_max, modulation, flags, H, W, min_mod, rel):
    """Flags of steps (1)-(3): SATURATED (``image_max == 255``), LOW_MODULATION,
    LOW_RELATIVE_MODULATION (when ``rel > 0``). Returns the first and last+1 row holding a
    pixel with no flag (``(0, 0)`` when none)."""
    r0 = H
    r1 = 0
    for r in range(H):
        acc = 0
        for c in range(W):
            p = r * W + c
            m = modulation[p]
            f = np.uint8(4) if image_max[p] == 255 else np.uint8(0)
            f |= np.uint8(1) if m < min_mod else np.uint8(0)
            f |= np.uint8(2) if (rel > _f32(0.0)) & (m < rel) else np.uint8(0)
            flags[p] = f
            acc += 1 if f == 0 else 0
        if acc > 0:
            if r < r0:
                r0 = r
            r1 = r + 1
    if r1 == 0:
        return 0, 0
    return r0, r1


@njit(cache=True, nogil=True, error_model="numpy")
def fill_nan_outside(r0, r1, W, points, conf, xp, depth):
    """NaN in every float output outside the band of rows ``[r0, r1)``."""
    HW = conf.shape[0]
    nan = _NAN
    for lo, hi in ((0, r0 * W), (r1 * W, HW)):
        for p in range(lo, hi):
            points[p, 0] = nan
            points[p, 1] = nan
            points[p, 2] = nan
            conf[p] = nan
            xp[p] = nan
            depth[p] = nan


# Small loops on views, each writing one array and indexing with its bare induction
# variable: LLVM vectorises those (a loop touching many arrays exceeds its budget of
# runtime alias checks, and a runtime offset adds a negative-index select per access).

@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _diff_u8(a, b, out):
    for k in range(out.shape[0]):
        out[k] = _f32(a[k]) - _f32(b[k])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _passed_f32(flags, out):
    for k in range(out.shape[0]):
        out[k] = _f32(1.0) if flags[k] == 0 else _f32(0.0)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _mul_inplace(a, b):
    for k in range(a.shape[0]):
        a[k] *= b[k]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _mul(a, b, out):
    for k in range(out.shape[0]):
        out[k] = a[k] * b[k]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _abs2(c, s, out):
    for k in range(out.shape[0]):
        out[k] = c[k] * c[k] + s[k] * s[k]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _bin4(a0, a1, b0, b1, out):
    """2x2 sums in the numpy path's order: (a[r, c] + a[r+1, c]) + (a[r, c+1] + a[r+1, c+1])."""
    for k in range(out.shape[0]):
        out[k] = (a0[k] + b0[k]) + (a1[k] + b1[k])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _phase_periods(s, c, out):
    inv2pi = _f32(-1.0 / (2.0 * np.pi))
    for k in range(out.shape[0]):
        out[k] = atan2_f32(s[k], c[k]) * inv2pi


@njit(cache=True, nogil=True, error_model="numpy")
def unwrap_band(planes, n_levels, W, r0, r1, modulation, flags, ratios, scale_u, off_u, lo_u, hi_u,
                max_resid, snr2, rho, u, st):
    """Steps (4a)-(4b) on the band of rows ``[r0, r1)`` (even start and height, even W).

    Coarse levels on 2x2 bins (signal and coherence guards, hierarchical unwrapping),
    then the finest level per pixel. Writes ``u = x_p - cx_p`` (NaN for pixels that failed
    (1)-(3)) and ``st`` bits: 1 passed (1)-(3), 2 ``ok_u`` (survives the unwrapping), 8
    UNWRAP_INCONSISTENT, 16 OUT_OF_PROJECTOR, 32 weak bin (-> LOW_MODULATION).
    ``ratios[i] = f_i / f_{i-1}``; ``u = Phi * scale_u - off_u`` (``Phi`` in periods).
    """
    hb = r1 - r0
    L = n_levels
    nbx = W // 2
    o = r0 * W
    f32 = np.float32
    qA = np.empty(W, f32)
    qB = np.empty(W, f32)
    cA = np.empty(W, f32)
    cB = np.empty(W, f32)
    sA = np.empty(W, f32)
    sB = np.empty(W, f32)
    tA = np.empty(W, f32)
    tB = np.empty(W, f32)
    cnt = np.empty(nbx, f32)
    bs = np.empty(nbx, f32)
    cc = np.empty(nbx, f32)
    ss = np.empty(nbx, f32)
    m2 = np.empty(nbx, f32)
    ph = np.empty(nbx, f32)
    bPsi = np.empty(nbx, f32)
    bres = np.empty(nbx, f32)
    code = np.empty(nbx, np.uint8)
    PsiR = np.empty(W, f32)
    codeR = np.empty(W, np.uint8)
    psi = np.empty(W, f32)
    res = np.empty(W, f32)
    fi = (L - 1) * 4
    rf = ratios[L - 1]
    for br in range(hb // 2):
        ra = o + 2 * br * W        # flat index of the bin row's first pixel row
        rb = ra + W
        fA = flags[ra: ra + W]
        fB = flags[rb: rb + W]
        _passed_f32(fA, qA)
        _passed_f32(fB, qB)
        _bin4(qA[0::2], qA[1::2], qB[0::2], qB[1::2], cnt)           # surviving pixels per bin
        # signal of the bin: (sum of B over surviving pixels)^2 >= snr^2 * count
        _mul(modulation[ra: ra + W], qA, tA)
        _mul(modulation[rb: rb + W], qB, tB)
        _bin4(tA[0::2], tA[1::2], tB[0::2], tB[1::2], bs)
        for j in range(nbx):
            v = bs[j] * bs[j]
            code[j] = np.uint8(32) if v < cnt[j] * snr2 else np.uint8(0)
        for j in range(nbx):
            bres[j] = _f32(0.0)
        for i in range(L - 1):
            k0 = 4 * i
            _diff_u8(planes[k0, ra: ra + W], planes[k0 + 2, ra: ra + W], cA)
            _diff_u8(planes[k0, rb: rb + W], planes[k0 + 2, rb: rb + W], cB)
            _diff_u8(planes[k0 + 1, ra: ra + W], planes[k0 + 3, ra: ra + W], sA)
            _diff_u8(planes[k0 + 1, rb: rb + W], planes[k0 + 3, rb: rb + W], sB)
            last = i == L - 2
            if last:
                # the level selecting the finest order: surviving pixels only (exact in float32)
                _mul_inplace(cA, qA)
                _mul_inplace(cB, qB)
                _mul_inplace(sA, qA)
                _mul_inplace(sB, qB)
                _abs2(cA, sA, tA)
                _abs2(cB, sB, tB)
                _bin4(tA[0::2], tA[1::2], tB[0::2], tB[1::2], m2)
            _bin4(cA[0::2], cA[1::2], cB[0::2], cB[1::2], cc)
            _bin4(sA[0::2], sA[1::2], sB[0::2], sB[1::2], ss)
            _phase_periods(ss, cc, ph)
            if last:
                # coherence guard: |sum z|^2 >= rho n sum |z|^2
                for j in range(nbx):
                    inc = cc[j] * cc[j] + ss[j] * ss[j] < (m2[j] * cnt[j]) * rho
                    code[j] |= np.uint8(8) if inc else np.uint8(0)
            if i == 0:
                for j in range(nbx):
                    p = ph[j]
                    bPsi[j] = p + _f32(1.0) if p < _f32(0.0) else p
            else:
                r = ratios[i]
                for j in range(nbx):
                    ke = bPsi[j] * r
                    ke -= ph[j]
                    k = np.rint(ke)
                    ke -= k
                    bres[j] = max(bres[j], abs(ke))
                for j in range(nbx):
                    ke = bPsi[j] * r
                    ke -= ph[j]
                    bPsi[j] = np.rint(ke) + ph[j]
        for j in range(nbx):
            code[j] |= np.uint8(8) if bres[j] > max_resid else np.uint8(0)
        # nearest upsampling of the bins to the pixel row
        PsiR[0::2] = bPsi
        PsiR[1::2] = bPsi
        codeR[0::2] = code
        codeR[1::2] = code
        # -- finest level at full resolution on the two pixel rows of the bin row
        for rr in range(2):
            rp = ra + rr * W
            _diff_u8(planes[fi, rp: rp + W], planes[fi + 2, rp: rp + W], cA)
            _diff_u8(planes[fi + 1, rp: rp + W], planes[fi + 3, rp: rp + W], sA)
            _phase_periods(sA, cA, psi)
            for c in range(W):
                ke = PsiR[c] * rf
                ke -= psi[c]
                k = np.rint(ke)
                ke -= k
                res[c] = abs(ke)
            ur = u[rp - o: rp - o + W]
            for c in range(W):
                ke = PsiR[c] * rf
                ke -= psi[c]
                uu = (np.rint(ke) + psi[c]) * scale_u
                uu -= off_u
                ur[c] = uu
            _finest_status(res, ur, codeR, flags[rp: rp + W], max_resid, lo_u, hi_u, st[rp - o: rp - o + W])
            _nan_unless_passed(flags[rp: rp + W], ur)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _finest_status(res, u, code, flags, max_resid, lo_u, hi_u, st):
    for c in range(st.shape[0]):
        uu = u[c]
        cd = code[c]
        bad = (res[c] > max_resid) | ((cd & 8) != 0)
        outp = (uu < lo_u) | (uu > hi_u)
        weak = (cd & 32) != 0
        s = np.uint8(1) | (np.uint8(8) if bad else np.uint8(0)) | (np.uint8(16) if outp else np.uint8(0)) \
            | (np.uint8(32) if weak else np.uint8(0)) | (np.uint8(0) if (bad | outp | weak) else np.uint8(2))
        st[c] = s if flags[c] == 0 else np.uint8(0)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _nan_unless_passed(flags, u):
    for c in range(u.shape[0]):
        u[c] = u[c] if flags[c] == 0 else _NAN


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _edge_at(u, ok, i, c, r, W, h, step_thr, jump_thr):
    """DISCONTINUITY test of band pixel ``i`` (row ``r``, column ``c``); thresholds are
    ``inf`` when a test is disabled (comparisons then never hold)."""
    e = False
    oki = ok[i]
    if c >= 1:
        e |= oki & ok[i - 1] & (abs(u[i] - u[i - 1]) > step_thr)
    if c + 1 < W:
        e |= oki & ok[i + 1] & (abs(u[i + 1] - u[i]) > step_thr)
    if r >= 1:
        e |= oki & ok[i - W] & (abs(u[i] - u[i - W]) > step_thr)
    if r + 1 < h:
        e |= oki & ok[i + W] & (abs(u[i + W] - u[i]) > step_thr)
    if c >= 1 and c + 1 < W:
        d2 = u[i + 1] + u[i - 1]
        d2 -= u[i]
        d2 -= u[i]
        e |= oki & ok[i - 1] & ok[i + 1] & (abs(d2) > jump_thr)
    if r >= 1 and r + 1 < h:
        d2 = u[i + W] + u[i - W]
        d2 -= u[i]
        d2 -= u[i]
        e |= oki & ok[i - W] & ok[i + W] & (abs(d2) > jump_thr)
    return e


@njit(cache=True, nogil=True, error_model="numpy")
def edges_band(u, st, W, step_thr, jump_thr, edge):
    """Step (4c) on the band (``h = n / W`` rows): DISCONTINUITY where a second difference
    (along the row or the column) exceeds ``jump_thr`` (centre pixel) or a first difference
    to a 4-neighbour exceeds ``step_thr`` (both pixels), over pixels that survive the
    unwrapping (``st & 2``); ``inf`` disables a test. Links never cross a row end (as the
    numpy path)."""
    n = u.shape[0]
    h = n // W
    ok = np.empty(n, np.bool_)
    for i in range(n):
        ok[i] = (st[i] & 2) != 0
    for r in range(h):
        b = r * W
        if r == 0 or r == h - 1 or W < 3:
            for c in range(W):
                edge[b + c] = 1 if _edge_at(u, ok, b + c, c, r, W, h, step_thr, jump_thr) else 0
            continue
        edge[b] = 1 if _edge_at(u, ok, b, 0, r, W, h, step_thr, jump_thr) else 0
        edge[b + W - 1] = 1 if _edge_at(u, ok, b + W - 1, W - 1, r, W, h, step_thr, jump_thr) else 0
        _edge_row(u[b + 1: b + W - 1], u[b: b + W - 2], u[b + 2: b + W], u[b + 1 - W: b - 1],
                  u[b + 1 + W: b + 2 * W - 1], ok[b + 1: b + W - 1], ok[b: b + W - 2], ok[b + 2: b + W],
                  ok[b + 1 - W: b - 1], ok[b + 1 + W: b + 2 * W - 1], step_thr, jump_thr, edge[b + 1: b + W - 1])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _edge_row(uc, ul, ur, uu, ud, oc, ol, orr, ou, od, step_thr, jump_thr, edge):
    """Interior pixels of one band row: all six tests, branch-free, on shifted views."""
    for k in range(uc.shape[0]):
        ui = uc[k]
        a = ul[k]
        b = ur[k]
        c = uu[k]
        d = ud[k]
        e = (ol[k] & (abs(ui - a) > step_thr)) | (orr[k] & (abs(b - ui) > step_thr)) \
            | (ou[k] & (abs(ui - c) > step_thr)) | (od[k] & (abs(d - ui) > step_thr))
        dh = b + a
        dh -= ui
        dh -= ui
        dv = d + c
        dv -= ui
        dv -= ui
        e |= (ol[k] & orr[k] & (abs(dh) > jump_thr)) | (ou[k] & od[k] & (abs(dv) > jump_thr))
        edge[k] = 1 if (oc[k] & e) else 0


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _smooth_run(xc, xl, xr, tau, out):
    third = _f32(1.0 / 3.0)
    for k in range(xc.shape[0]):
        xi = xc[k]
        sm = (xl[k] + xr[k]) + xi
        sm *= third
        out[k] = sm if abs(sm - xi) <= tau else xi


@njit(cache=True, nogil=True, error_model="numpy")
def smooth_band(u, st, W, tau, smooth, x, y):
    """Step (4d): ``x = u`` where ``ok_u`` else NaN, then (when ``smooth``) the guarded 3-tap
    means along the flat band (horizontal, then vertical) exactly as the numpy path.
    Returns the array holding the result (``x`` or ``y``)."""
    n = u.shape[0]
    nan = _NAN
    for i in range(n):
        x[i] = u[i] if (st[i] & 2) != 0 else nan
    if not smooth:
        return x
    third = _f32(1.0 / 3.0)
    for stp in (1, W):
        if n <= 2 * stp:
            continue
        for i in range(stp):  # band ends: the numpy path's (3 x) / 3
            for q in (i, n - 1 - i):
                xq = x[q]
                sm = (xq * _f32(3.0)) * third
                y[q] = sm if abs(sm - xq) <= tau else xq
        _smooth_run(x[stp: n - stp], x[: n - 2 * stp], x[2 * stp:], tau, y[stp: n - stp])
        x, y = y, x
    return x


@njit(cache=True, nogil=True, error_model="numpy")
def _tri_core(u, a, b, inv_norm, c0, c1, fnorm2, lam, sa):
    for i in range(u.shape[0]):
        uu = u[i]
        den = uu * b[i]
        den = a[i] - den
        lm = uu * c1
        lm -= c0
        lm /= den
        s = uu * uu
        s += fnorm2
        s = math.sqrt(s)
        s = abs(den) / s
        s *= inv_norm[i]
        lam[i] = lm
        sa[i] = s


@njit(cache=True, nogil=True, error_model="numpy")
def _tri_flags(lam, sa, b, st, edge, min_sin, zmin, zmax, check_front, c1, flags):
    for i in range(lam.shape[0]):
        lm = lam[i]
        s = st[i]
        tri = (sa[i] < min_sin) | (lm < zmin) | (lm > zmax) | ~(abs(lm) < _INF)
        if check_front:
            tri |= ~(lm * b[i] + c1 > _f32(0.0))
        add = np.uint8(s & 24)  # UNWRAP_INCONSISTENT | OUT_OF_PROJECTOR
        add |= np.uint8(1) if (s & 32) != 0 else np.uint8(0)
        add |= np.uint8(64) if edge[i] != 0 else np.uint8(0)
        add |= np.uint8(32) if (tri & ((s & 2) != 0)) else np.uint8(0)
        flags[i] |= add  # st = 0 for pixels rejected in (1)-(3): they keep their early flags


@njit(cache=True, nogil=True, error_model="numpy")
def _masked(v, flags, out):
    nan = _NAN
    for i in range(v.shape[0]):
        out[i] = v[i] if flags[i] == 0 else nan


@njit(cache=True, nogil=True, error_model="numpy")
def _points(r0, r1, r2, lam, o0, o1, o2, points):
    for i in range(lam.shape[0]):
        lm = lam[i]
        points[i, 0] = r0[i] * lm + o0
        points[i, 1] = r1[i] * lm + o1
        points[i, 2] = r2[i] * lm + o2


@njit(cache=True, nogil=True, error_model="numpy")
def _conf(modulation, sa, scale, lam, conf):
    for i in range(sa.shape[0]):
        cv = modulation[i] * sa[i]
        cv *= scale
        cv = _f32(1.0) if cv > _f32(1.0) else cv
        conf[i] = cv + lam[i] * _f32(0.0)  # NaN where lam is NaN (invalid); exact otherwise


@njit(cache=True, nogil=True, error_model="numpy")
def _add_const(v, c, out):
    for i in range(v.shape[0]):
        out[i] = v[i] + c


def triangulate_band(u, st, edge, modulation, flags, a_tab, b_tab, inv_norm, rays, origin, c0, c1, fnorm2,
                     min_sin, zmin, zmax, check_front, conf_scale, cx, points, conf, xp, depth):
    """Steps (5)-(6) on band slices (all arguments are the band's rows, 0-based): closed-form
    triangulation of ``u`` (smoothed, NaN where not ``ok_u``), the late flags, and the
    organised outputs. Every loop touches few arrays and indexes them with its bare
    induction variable: otherwise LLVM does not vectorise it (negative-index wraparound
    and its budget of runtime alias checks)."""
    n = u.shape[0]
    lam = np.empty(n, np.float32)
    sa = np.empty(n, np.float32)
    _tri_core(u, a_tab, b_tab, inv_norm, c0, c1, fnorm2, lam, sa)
    _tri_flags(lam, sa, b_tab, st, edge, min_sin, zmin, zmax, check_front, c1, flags)
    _masked(lam, flags, depth)
    _points(rays[0], rays[1], rays[2], depth, origin[0], origin[1], origin[2], points)
    _conf(modulation, sa, conf_scale, depth, conf)
    _add_const(u, cx, lam)
    _masked(lam, flags, xp)
