"""Fused per-pixel loops of the per-view products (numba, one core, float32).

Counterparts of the numpy paths of :mod:`kernels.texture` (visibility, bilinear colour)
and :mod:`kernels.depth` (splatting with a z-buffer, pinhole filling). They perform the
same float32 operations in the same order, so their results are bit-identical to the
numpy paths (the z-buffer keeps the minimum, which does not depend on the order of the
writes); ``tests/test_decode_products.py`` compares them. Compiled on first use and cached
on disk (``cache=True``).
"""

from __future__ import annotations


import numpy as np
from numba import njit

_f32 = np.float32
_NAN = _f32(np.nan)


@njit(cache=True, nogil=True, error_model="numpy")
def visibility_band(x, y, z, D, h, w, tol_px_over_f, tol_mm, out):
    """``out[i]`` = point ``i`` (finite ``z``) projects inside the image and
    ``not z > D(round(q)) + tol_mm + z tol_px / f`` (see :func:`kernels.texture.visibility`)."""
    for i in range(x.shape[0]):
        zi = z[i]
        vis = False
        if zi == zi:
            cx = np.rint(x[i])
            cy = np.rint(y[i])
            if (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1):
                d = D[np.intp(cy) * w + np.intp(cx)]
                tol = zi * tol_px_over_f
                tol += tol_mm
                tol += d
                vis = not (zi > tol)
        out[i] = vis


@njit(cache=True, nogil=True, error_model="numpy")
def texture_band(x, y, vis, img, h, w, colors):
    """Bilinear colour (``/ 255``) of the visible points, NaN elsewhere; the float32
    operations of :func:`kernels.texture._sample_inside`."""
    nan = _NAN
    inv = np.float64(_f32(1.0 / 255.0))
    wmax = _f32(max(w - 1, 0))
    hmax = _f32(max(h - 1, 0))
    dx = 3 if w > 1 else 0
    dy = 3 * w if h > 1 else 0
    for i in range(x.shape[0]):
        if not vis[i]:
            colors[i, 0] = nan
            colors[i, 1] = nan
            colors[i, 2] = nan
            continue
        xs = min(max(x[i], _f32(0.0)), wmax)
        ys = min(max(y[i], _f32(0.0)), hmax)
        x0 = np.int32(xs)
        y0 = np.int32(ys)
        if w > 1:
            x0 = min(x0, np.int32(w - 2))
        if h > 1:
            y0 = min(y0, np.int32(h - 2))
        # float64 weights, as numpy promotes (float32 - int32) to float64, rounded to float32
        fx = np.float64(xs) - np.float64(x0)
        fy = np.float64(ys) - np.float64(y0)
        i00 = (np.intp(y0) * w + np.intp(x0)) * 3
        w11 = fx * fy
        w01 = fx - w11
        w10 = fy - w11
        w00 = 1.0 - fx
        w00 -= w10
        w00 = _f32(w00 * inv)
        w01 = _f32(w01 * inv)
        w10 = _f32(w10 * inv)
        w11 = _f32(w11 * inv)
        for c in range(3):
            acc = _f32(img[i00 + c]) * w00
            acc += _f32(img[i00 + dx + c]) * w01
            acc += _f32(img[i00 + dy + c]) * w10
            acc += _f32(img[i00 + dx + dy + c]) * w11
            colors[i, c] = acc


@njit(cache=True, nogil=True, error_model="numpy")
def splat_band(X, Y, Z, Zi, W, h, w, k2, lim, out):
    """Step 2 of :func:`kernels.depth.depth_image` on a flat band of IR rows: first-order
    depth at the nearest RGB pixel centre of every interior point whose cell contains it,
    z-buffered into ``out`` (``fmin``: NaN = empty). ``k2 = 2 max_step_px / f_ir``.
    Row views indexed from 0 (no negative-index selects on the neighbours)."""
    n = X.shape[0]
    for r in range(1, n // W - 1):
        b = r * W
        _splat_row(X[b - W: b], X[b: b + W], X[b + W: b + 2 * W], Y[b - W: b], Y[b: b + W], Y[b + W: b + 2 * W],
                   Z[b - W: b], Z[b: b + W], Z[b + W: b + 2 * W], Zi[b - W: b], Zi[b: b + W], Zi[b + W: b + 2 * W],
                   h, w, k2, lim, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _splat_row(Xu, Xc, Xd, Yu, Yc, Yd, Zu, Zc, Zd, Iu, Ic, Id, h, w, k2, lim, out):
    for c in range(1, Xc.shape[0] - 1):
        zc0 = Ic[c]
        if not (zc0 == zc0):
            continue
        thr = zc0 * k2
        if not ((abs(Ic[c + 1] - Ic[c - 1]) <= thr) & (abs(Id[c] - Iu[c]) <= thr)):
            continue
        qxc = Xc[c + 1] - Xc[c - 1]
        qyc = Yc[c + 1] - Yc[c - 1]
        qxr = Xd[c] - Xu[c]
        qyr = Yd[c] - Yu[c]
        det = qxc * qyr
        det -= qxr * qyc
        xc = Xc[c]
        yc = Yc[c]
        cx = np.rint(xc)
        cy = np.rint(yc)
        dx = cx - xc
        dy = cy - yc
        sx = qyr * dx
        sx -= qxr * dy
        sy = qxc * dy
        sy -= qyc * dx
        det = _f32(2.0) / det
        sx *= det
        sy *= det
        if not ((abs(sx) <= lim) & (abs(sy) <= lim)):
            continue
        if not ((cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)):
            continue
        zc = Zc[c + 1] - Zc[c - 1]
        zc *= sx
        zr = Zd[c] - Zu[c]
        zr *= sy
        zc += zr
        zc *= _f32(0.5)
        zc += Zc[c]
        if not (zc == zc):
            continue  # fmin ignores NaN
        lin = np.intp(cy) * w + np.intp(cx)
        cur = out[lin]
        if not (cur <= zc):  # empty (NaN) or farther: the nearest surface wins
            out[lin] = zc


@njit(cache=True, nogil=True, error_model="numpy")
def _fill_row(up, mid, dn, l1, lim2, dst):
    nfill = 0
    for c in range(1, mid.shape[0] - 1):
        if mid[c] == mid[c]:
            continue
        # neighbour pairs: left/right, up/down (float32 test, as numpy with a Python float
        # limit), up-left/down-right, up-right/down-left (float64 test, numpy float64 limit)
        a0 = mid[c - 1]
        b0 = mid[c + 1]
        a1 = up[c]
        b1 = dn[c]
        a2 = up[c - 1]
        b2 = dn[c + 1]
        a3 = up[c + 1]
        b3 = dn[c - 1]
        if not ((a0 == a0) & (b0 == b0) | (a1 == a1) & (b1 == b1) | (a2 == a2) & (b2 == b2)
                | (a3 == a3) & (b3 == b3)):
            continue  # background: no known pair (the common case)
        acc = 0.0
        cnt = 0
        if abs(a0 - b0) <= l1 * min(a0, b0):
            acc += np.float64(_f32(0.5) * (a0 + b0))
            cnt += 1
        if abs(a1 - b1) <= l1 * min(a1, b1):
            acc += np.float64(_f32(0.5) * (a1 + b1))
            cnt += 1
        if np.float64(abs(a2 - b2)) <= lim2 * np.float64(min(a2, b2)):
            acc += np.float64(_f32(0.5) * (a2 + b2))
            cnt += 1
        if np.float64(abs(a3 - b3)) <= lim2 * np.float64(min(a3, b3)):
            acc += np.float64(_f32(0.5) * (a3 + b3))
            cnt += 1
        if cnt > 0:
            dst[c] = _f32(acc / cnt)
            nfill += 1
    return nfill


@njit(cache=True, nogil=True, error_model="numpy")
def fill_pinholes_pass(src, dst, h, w, r0, r1, k):
    """One pass of :func:`kernels.depth._fill_pinholes` on rows ``[r0, r1)``: ``dst`` (a copy
    of ``src``) gets, at each NaN pixel of ``src`` with a known and continuous neighbour
    pair (left/right, up/down, diagonals), the mean of those pairs (float64 as the numpy
    path). Returns the number of filled pixels."""
    lim1 = k
    lim2 = k * np.sqrt(2.0)
    nfill = 0
    for r in range(r0 + 1, r1 - 1):
        b = r * w
        nfill += _fill_row(src[b - w: b], src[b: b + w], src[b + w: b + 2 * w], _f32(lim1), lim2, dst[b: b + w])
    return nfill


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _project_one(m0, m1, m2, lam, o0, o1, o2, has_dist, k1, k2, k3, p1, p2, p1x2, p2x2, has_k3, has_p):
    """RGB-normalised distorted coordinates of one point, the float32 operations of
    :func:`kernels.texture.project_to_rgb` in the same order (scalars only, so that the
    loops calling it vectorise)."""
    X = m0 * lam
    X += o0
    Y = m1 * lam
    Y += o1
    Z = m2 * lam
    Z += o2
    iz = _f32(1.0) / Z
    iz = iz if Z > _f32(0.0) else _NAN
    X *= iz
    Y *= iz
    if has_dist:
        x2 = X * X
        y2 = Y * Y
        xy = X * Y
        r2 = x2 + y2
        if has_k3:
            rad = r2 * k3
            rad += k2
            rad *= r2
        else:
            rad = r2 * k2
        rad += k1
        rad *= r2
        rad += _f32(1.0)
        xd = X * rad
        yd = Y * rad
        if has_p:
            t = xy * p1x2
            xd += t
            t = x2 * _f32(2.0)
            t += r2
            t *= p2
            xd += t
            t = y2 * _f32(2.0)
            t += r2
            t *= p1
            yd += t
            t = xy * p2x2
            yd += t
        X = xd
        Y = yd
    return X, Y


@njit(cache=True, nogil=True, error_model="numpy")
def project_xy(m0, m1, m2, lam, o0, o1, o2, has_dist, k1, k2, k3, p1, p2, p1x2, p2x2, has_k3, has_p,
               fx, s, cx, fy, cy, row, out):
    """RGB column ``fx x + s y + cx`` (``row = False``) or row ``fy y + cy`` (``row = True``)."""
    if row:
        for i in range(lam.shape[0]):
            X, Y = _project_one(m0[i], m1[i], m2[i], lam[i], o0, o1, o2, has_dist, k1, k2, k3, p1, p2, p1x2,
                                p2x2, has_k3, has_p)
            py = Y * fy
            py += cy
            out[i] = py
    elif s != _f32(0.0):
        for i in range(lam.shape[0]):
            X, Y = _project_one(m0[i], m1[i], m2[i], lam[i], o0, o1, o2, has_dist, k1, k2, k3, p1, p2, p1x2,
                                p2x2, has_k3, has_p)
            px = X * fx
            px += Y * s
            px += cx
            out[i] = px
    else:
        for i in range(lam.shape[0]):
            X, Y = _project_one(m0[i], m1[i], m2[i], lam[i], o0, o1, o2, has_dist, k1, k2, k3, p1, p2, p1x2,
                                p2x2, has_k3, has_p)
            px = X * fx
            px += cx
            out[i] = px


@njit(cache=True, nogil=True, error_model="numpy")
def project_z(m2, lam, o2, out):
    """RGB depth ``z`` (NaN where behind the camera: ``iz * 0 + Z`` as the numpy path)."""
    for i in range(lam.shape[0]):
        Z = m2[i] * lam[i]
        Z += o2
        iz = _f32(1.0) / Z
        iz = iz if Z > _f32(0.0) else _NAN
        zb = iz * _f32(0.0)
        zb += Z
        out[i] = zb


@njit(cache=True, nogil=True, error_model="numpy")
def landmark_candidates(x, y, vis, M, h, w, offset, out):
    """Band indices (``+ offset``) of visible points whose rounded RGB pixel lies inside the
    image and in the mask ``M`` (flat ``(h * w,)`` bool); returns their count (``out`` holds
    them in increasing order, as :func:`kernels.landmarks._candidates`)."""
    k = 0
    for i in range(x.shape[0]):
        if not vis[i]:
            continue
        cx = np.rint(x[i])
        cy = np.rint(y[i])
        if (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1):
            if M[np.intp(cy) * w + np.intp(cx)]:
                out[k] = i + offset
                k += 1
    return k
