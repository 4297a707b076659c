"""Depth image of a view aligned to its RGB camera (paper section 3.1, "3D Point Cloud to Depth").

"Each vertex has the corresponding coordinate in the 2D image so that the depth
information can be projected to 2D depth image." Plain splatting of the points to their
nearest RGB pixel leaves pinholes and is biased by the sub-pixel offset (on a surface
tilted by 45 degrees a 0.5 px offset is a ~0.1 mm depth error at full resolution), so
the depth image here is the view's grid mesh (:mod:`kernels.gridmesh` continuity rule)
evaluated at the RGB pixel centres, to first order:

1. Every point ``p`` of the organised cloud has its RGB position ``q(p)`` and RGB depth
   ``Z(p)`` (:func:`kernels.texture.project_to_rgb`). Central differences on the IR grid
   give the Jacobian ``J = dq/dp`` and ``dZ/dp``; they exist only where both neighbours
   in a direction are present and continuous (the depth step over the two pixels is at
   most ``2 * max_step_px`` footprints), so the outermost pixel ring of every surface
   patch is not splatted.
2. The nearest RGB pixel centre ``c = round(q(p))`` maps back to the IR grid position
   ``p + s``, ``s = J^-1 (c - q(p))``. When ``|s_x|, |s_y| <= 0.5 + cell_slack`` (``c``
   lies in ``p``'s own grid cell, so about one point claims each pixel) the pixel gets
   ``Z(p) + dZ/dp . s`` (the mesh's depth there to second order), z-buffered with
   ``numpy.fmin.at`` (the nearest surface wins).
3. Pixels that no cell claimed where the RGB camera samples the surface more densely
   than the IR grid (pinholes) are filled with the mean of their left/right (else
   up/down) neighbours when both exist and are continuous: linear interpolation, again
   second-order accurate. Nothing is extrapolated beyond the surface.

Output: float32 RGB-camera ``z`` in mm, NaN where unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels._checks import check_positive
from kernels.texture import RGBProjection, _use_fast

try:  # fused loops (optional; the numpy code below is the reference, bit-identical)
    from kernels import _fast_products as _fast
except ImportError:  # pragma: no cover - numba not installed
    _fast = None

_f32 = np.float32


@dataclass(frozen=True)
class DepthParams:
    """Parameters of :func:`depth_image`.

    Attributes
    ----------
    max_step_px : float
        Continuity rule of :mod:`kernels.gridmesh` (pixel footprints per pixel, default 6).
    cell_slack : float
        Extra half-width (IR pixels) of the cell test of step 2 (default 0.05): a little
        overlap between neighbouring cells so that rounding never opens a pinhole.
    fill_holes : bool
        Run step 3 (default True).
    """

    max_step_px: float = 6.0
    cell_slack: float = 0.05
    fill_holes: bool = True

    def __post_init__(self):
        check_positive(self.max_step_px, "DepthParams.max_step_px")
        if not (0 <= self.cell_slack <= 0.5):
            raise ValueError(f"DepthParams.cell_slack: must be in [0, 0.5], got {self.cell_slack}")


def depth_image(projection: RGBProjection, ir_depth, ir_focal_px: float,
                params: DepthParams = DepthParams(), *, engine: str = "auto") -> np.ndarray:
    """Render a view's depth image in its RGB camera.

    Parameters
    ----------
    projection : RGBProjection
        Of the view's points (:func:`kernels.texture.project_to_rgb`).
    ir_depth : (H, W) float32
        IR-frame depth of the points (``DecodedView.depth``), for the continuity rule.
    ir_focal_px : float
        IR focal length ``fx`` (pixels).
    params : DepthParams
    engine : {"auto", "numba", "numpy"}
        The fused loops of :mod:`kernels._fast_products` (default when numba is
        installed) or the vectorised numpy path; both give the same image.

    Returns
    -------
    (h, w) float32
        RGB-camera depth ``z`` in mm at every RGB pixel, NaN where unknown.

    Raises
    ------
    ValueError
        ``projection`` of the wrong type, ``ir_depth`` not matching it, bad focal length.
    """
    if not isinstance(projection, RGBProjection):
        raise ValueError(f"projection: expected an RGBProjection, got {type(projection).__name__}")
    if not isinstance(params, DepthParams):
        raise ValueError(f"params: expected DepthParams, got {type(params).__name__}")
    zi_full = np.asarray(ir_depth, dtype=np.float32)
    H, W = projection.x.shape
    if zi_full.shape != (H, W):
        raise ValueError(f"ir_depth: expected shape ({H}, {W}) (as the projection), got {zi_full.shape}")
    check_positive(ir_focal_px, "ir_focal_px")
    h, w = projection.rgb_size
    out = np.full(h * w, np.nan, np.float32)
    r0, r1 = projection.rows
    fast = _use_fast(engine)
    if r1 - r0 >= 3 and W >= 3:
        if fast:
            band = slice(r0 * W, r1 * W)
            _fast.splat_band(projection.x.reshape(-1)[band], projection.y.reshape(-1)[band],
                             projection.z.reshape(-1)[band], np.ascontiguousarray(zi_full).reshape(-1)[band], W, h, w,
                             _f32(2.0 * params.max_step_px / float(ir_focal_px)), _f32(0.5 + params.cell_slack), out)
        else:
            _splat(projection, zi_full, float(ir_focal_px), params, out)
    D = out.reshape(h, w)
    if params.fill_holes:
        D = _fill_pinholes(D, projection.focal_px, params.max_step_px, fast=fast)
    return D


def _splat(projection, zi_full, f_ir, params, out):
    H, W = projection.x.shape
    h, w = projection.rgb_size
    r0, r1 = projection.rows
    band = slice(r0 * W, r1 * W)
    X = projection.x.reshape(-1)[band]
    Y = projection.y.reshape(-1)[band]
    Z = projection.z.reshape(-1)[band]
    Zi = zi_full.reshape(-1)[band]
    n = X.size
    # interior pixels as one contiguous range of the flat band; neighbours are shifted
    # ranges (contiguous 1-D slices are ~3x faster than 2-D views in numpy)
    c = slice(W + 1, n - W - 1)
    l, r = slice(W, n - W - 2), slice(W + 2, n - W)
    u, d = slice(1, n - 2 * W - 1), slice(2 * W + 1, n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # continuity over two pixels (central differences): |Zi[+1] - Zi[-1]| <= 2 k Zi / f
        thr = Zi[c] * _f32(2.0 * params.max_step_px / f_ir)
        t = Zi[r] - Zi[l]
        np.abs(t, out=t)
        ok = t <= thr
        np.subtract(Zi[d], Zi[u], out=t)
        np.abs(t, out=t)
        ok &= t <= thr
        ok[W - 1::W] = False                    # column 0: its left neighbour wraps
        ok[W - 2::W] = False                    # column W-1
        # Jacobian (central differences x 2; the factor cancels in J^-1 dZ)
        qxc = X[r] - X[l]
        qyc = Y[r] - Y[l]
        qxr = X[d] - X[u]
        qyr = Y[d] - Y[u]
        det = qxc * qyr
        det -= np.multiply(qxr, qyc, out=t)
        xc = X[c]
        yc = Y[c]
        cx = np.rint(xc)
        cy = np.rint(yc)
        dx = cx - xc
        dy = cy - yc
        # s = J^-1 (dx, dy), J = [[qxc, qxr], [qyc, qyr]] / 2
        sx = qyr * dx
        sx -= np.multiply(qxr, dy, out=t)
        sy = qxc * dy
        sy -= np.multiply(qyc, dx, out=t)
        np.divide(_f32(2.0), det, out=det)
        sx *= det
        sy *= det
        lim = _f32(0.5 + params.cell_slack)
        ok &= np.abs(sx, out=t) <= lim
        ok &= np.abs(sy, out=t) <= lim
        ok &= (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        # Z at the pixel centre: Z + (dZ/dp) s, dZ/dp = (Z[r] - Z[l], Z[d] - Z[u]) / 2
        zc = Z[r] - Z[l]
        zc *= sx
        zr = np.subtract(Z[d], Z[u], out=sx)
        zr *= sy
        zc += zr
        zc *= _f32(0.5)
        zc += Z[c]
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return
    lin = cy[idx].astype(np.intp)
    lin *= w
    lin += cx[idx].astype(np.intp)
    np.fmin.at(out, lin, zc[idx])  # z-buffer; fmin ignores the NaN of empty pixels


def _fill_pinholes(D, f_rgb, max_step_px, iterations=2, fast=False):
    """Fill NaN pixels lying between two known, continuous neighbours (linear interpolation).

    The four neighbour pairs through a pixel (left/right, up/down and the two diagonals)
    are tried; the pixel gets the mean of the pairs whose two ends are known and
    continuous (depth step at most ``2 * max_step_px`` footprints, diagonals x sqrt 2).
    Each iteration works on the compressed list of candidate pixels only.
    """
    h, w = D.shape
    if h < 3 or w < 3:
        return D
    rows = np.flatnonzero(np.isfinite(D).any(axis=1))
    if rows.size == 0:
        return D
    r0, r1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, h)
    if r1 - r0 < 3:
        return D
    k = 2.0 * max_step_px / f_rgb
    if fast:
        src = D.reshape(-1)
        for _ in range(int(iterations)):
            dst = src.copy()
            if _fast.fill_pinholes_pass(src, dst, h, w, r0, r1, k) == 0:
                break
            src = dst
        return src.reshape(h, w)  # D itself when nothing was filled (a fresh array of depth_image)
    Dn = D.copy()
    flat = Dn.reshape(-1)
    offs = ((-1, 1), (-w, w), (-w - 1, w + 1), (-w + 1, w - 1))
    base = r0 * w
    nb = (r1 - r0) * w
    c = slice(w + 1, nb - w - 1)
    for _ in range(int(iterations)):
        known = np.isfinite(flat[base: base + nb])
        kc = known[c]
        pair = known[w: nb - w - 2] & known[w + 2: nb - w]          # left & right
        pair |= known[1: nb - 2 * w - 1] & known[2 * w + 1: nb - 1]  # up & down
        pair |= known[0: nb - 2 * w - 2] & known[2 * w + 2: nb]      # up-left & down-right
        pair |= known[2: nb - 2 * w] & known[2 * w: nb - 2]          # up-right & down-left
        pair &= ~kc
        pair[w - 1::w] = False  # columns 0 and w-1: neighbours wrap around rows
        pair[w - 2::w] = False
        idx = np.flatnonzero(pair)
        if idx.size == 0:
            break
        idx += base + w + 1
        acc = np.zeros(idx.size, np.float64)
        cnt = np.zeros(idx.size, np.int32)
        for (oa, ob), diag in zip(offs, (False, False, True, True)):
            a = flat[idx + oa]
            b = flat[idx + ob]
            lim = k * (np.sqrt(2.0) if diag else 1.0)
            with np.errstate(invalid="ignore"):
                ok = np.abs(a - b) <= lim * np.minimum(a, b)
            acc[ok] += 0.5 * (a[ok] + b[ok])
            cnt[ok] += 1
        good = cnt > 0
        if not good.any():
            break
        flat[idx[good]] = (acc[good] / cnt[good]).astype(np.float32)
    return Dn
