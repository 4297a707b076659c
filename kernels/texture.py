"""Texture mapping: project a view's points into its RGB camera and sample their colour.

Paper section 3.1 ("3D Face Landmarks Annotation": "For each vertex in the point clouds,
we apply texture mapping [46] to calculate the corresponding coordinates on the 2D
images"). :func:`project_to_rgb` gives, for every IR pixel with a point, its distorted
RGB pixel position and RGB-camera depth; :func:`texture_map` samples the RGB image
bilinearly there, except for points outside the image or hidden from the RGB camera by
other points of the view (z-buffer test against the view's depth image in the RGB
camera, :func:`kernels.depth.depth_image`).

Occlusion tolerance: a point at RGB depth ``z`` projecting to pixel ``q`` is visible when
``z <= D(round(q)) + occlusion_tol_mm + occlusion_tol_px * z / f_rgb``, where ``D`` is the
view's depth image (or when ``D`` is unknown there: the rim of a patch, which the depth
image does not cover). The per-pixel term covers the depth change over the (at most 0.71
px) distance between ``q`` and the pixel centre on surfaces tilted up to ~80 degrees;
occluders on a face (nose over cheek, ears) are many millimetres in front.

Work is restricted to the band of IR rows that hold points (contiguous slices, no
gather/scatter); per-pixel quantities that depend only on the calibration (the IR ray
expressed in the RGB camera frame) are cached per (IR, RGB) calibration, read-only (the
undistorted IR pixel grid per IR intrinsics, :func:`kernels.camera.undistorted_pixel_grid`;
:func:`kernels.camera.clear_caches` empties both).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kernels.camera import Camera, register_cache, undistorted_pixel_grid
from kernels.triangulate import _camera_key, check_camera

try:  # fused loops (optional; the numpy code below is the reference, bit-identical)
    from kernels import _fast_products as _fast
except ImportError:  # pragma: no cover - numba not installed
    _fast = None


def _use_fast(engine: str) -> bool:
    if engine not in ("auto", "numba", "numpy"):
        raise ValueError(f"engine: expected 'auto', 'numba' or 'numpy', got {engine!r}")
    if engine == "numba" and _fast is None:
        raise ValueError("engine: 'numba' requested but numba is not installed")
    return engine != "numpy" and _fast is not None

_f32 = np.float32
_CACHE_SIZE = 8
_cache: "OrderedDict[bytes, tuple]" = OrderedDict()
_lock = threading.Lock()


def _clear_cache() -> int:
    with _lock:
        n = len(_cache)
        _cache.clear()
    return n


register_cache("kernels.texture.ray_in_rgb", _clear_cache)


def _ray_in_rgb(ir: Camera, rgb: Camera):
    """(3, HW) float32 IR rays (z = 1 in the IR frame) rotated into the RGB frame, and the
    IR centre in RGB coordinates (cached, read-only)."""
    key = _camera_key(ir) + b"#" + _camera_key(rgb)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    xn = undistorted_pixel_grid(ir)   # shared with the decoder's ray table (per intrinsics)
    d = np.empty((3, xn.shape[0]))
    d[0], d[1], d[2] = xn[:, 0], xn[:, 1], 1.0
    R = rgb.R @ ir.R.T
    m = (R @ d).astype(np.float32)
    o = rgb.R @ ir.center + rgb.t
    m.setflags(write=False)
    val = (m, o)
    with _lock:
        _cache[key] = val
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return val


@dataclass(frozen=True)
class RGBProjection:
    """Where the points of one view land in its RGB camera.

    Attributes
    ----------
    x, y : (H, W) float32
        Distorted RGB pixel coordinates (column, row) of each IR pixel's point; NaN where
        there is no point or it is behind the RGB camera.
    z : (H, W) float32
        RGB-camera depth of the point in mm (NaN likewise).
    rows : (int, int)
        The band ``[r0, r1)`` of IR rows outside which everything is NaN.
    rgb_size : (int, int)
        ``(height, width)`` of the RGB image.
    focal_px : float
        RGB focal length ``fx`` (pixels).
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    rows: tuple[int, int]
    rgb_size: tuple[int, int]
    focal_px: float


def _row_band(valid2d: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(valid2d.any(axis=1))
    return (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)


def project_to_rgb(depth, ir: Camera, rgb: Camera, *, engine: str = "auto") -> RGBProjection:
    """Project every point of an organised view into the RGB camera (with distortion).

    The point of IR pixel ``p`` is ``C_ir + z_p R_ir^T (x_n, y_n, 1)`` (``z_p`` its IR
    depth, ``(x_n, y_n)`` the undistorted pixel ray), exactly as
    :func:`kernels.decode.decode_view` builds it; in the RGB frame it is
    ``z_p m_p + o`` with the cached per-pixel ``m_p`` and the IR centre ``o``.

    Parameters
    ----------
    depth : (H, W) float32
        IR-frame depth in mm (``DecodedView.depth``), NaN where there is no point.
    ir : Camera
        The IR camera the view was decoded with.
    rgb : Camera
        The group's RGB camera (same calibration / world frame).
    engine : {"auto", "numba", "numpy"}
        The fused loops of :mod:`kernels._fast_products` (default when numba is
        installed) or the vectorised numpy path; both give the same result.

    Returns
    -------
    RGBProjection

    Raises
    ------
    ValueError
        ``depth`` not ``(ir.height, ir.width)``; invalid cameras.
    """
    check_camera(ir, "ir")
    check_camera(rgb, "rgb")
    z_ir = np.asarray(depth, dtype=np.float32)
    H, W = ir.height, ir.width
    if z_ir.shape != (H, W):
        raise ValueError(f"depth: expected shape ({H}, {W}) (the IR image), got {z_ir.shape}")
    m, o = _ray_in_rgb(ir, rgb)
    valid = np.isfinite(z_ir)
    r0, r1 = _row_band(valid)
    band = slice(r0 * W, r1 * W)
    lam = z_ir.reshape(-1)[band]
    if _use_fast(engine):
        K, dist = rgb.K, np.asarray(rgb.dist, np.float64)
        k1, k2, p1, p2, k3 = (float(v) for v in dist)
        f = np.float32
        o32 = o.astype(f)
        lam = np.ascontiguousarray(lam)
        out = []
        for _ in range(3):
            full = np.empty(H * W, f)
            full[: r0 * W] = np.nan
            full[r1 * W:] = np.nan
            out.append(full)
        ms = (m[0][band], m[1][band], m[2][band])
        args = (f(o32[0]), f(o32[1]), f(o32[2]), bool(np.any(dist != 0)), f(k1), f(k2), f(k3), f(p1), f(p2),
                f(2 * p1), f(2 * p2), bool(k3), bool(p1 or p2), f(K[0, 0]), f(K[0, 1]), f(K[0, 2]), f(K[1, 1]),
                f(K[1, 2]))
        _fast.project_xy(*ms, lam, *args, False, out[0][band])
        _fast.project_xy(*ms, lam, *args, True, out[1][band])
        _fast.project_z(ms[2], lam, o32[2], out[2][band])
        return RGBProjection(out[0].reshape(H, W), out[1].reshape(H, W), out[2].reshape(H, W), (r0, r1),
                             (rgb.height, rgb.width), float(K[0, 0]))
    # camera coordinates in the RGB frame
    X = m[0][band] * lam
    X += _f32(o[0])
    Y = m[1][band] * lam
    Y += _f32(o[1])
    Z = m[2][band] * lam
    Z += _f32(o[2])
    with np.errstate(divide="ignore", invalid="ignore"):
        iz = np.reciprocal(Z)
        iz[~(Z > 0)] = np.nan
    X *= iz
    Y *= iz  # normalised, undistorted
    K, dist = rgb.K, rgb.dist
    if np.any(dist != 0):
        k1, k2, p1, p2, k3 = (float(v) for v in dist)
        x2 = X * X
        y2 = Y * Y
        xy = X * Y
        r2 = x2 + y2
        rad = r2 * _f32(k3) if k3 else None
        if rad is not None:
            rad += _f32(k2)
            rad *= r2
        else:
            rad = r2 * _f32(k2)
        rad += _f32(k1)
        rad *= r2
        rad += _f32(1.0)
        # xd = x rad + 2 p1 x y + p2 (r2 + 2 x^2); yd = y rad + p1 (r2 + 2 y^2) + 2 p2 x y
        xd = X * rad
        yd = Y * rad
        if p1 or p2:
            t = xy * _f32(2 * p1)
            xd += t
            t = x2 * _f32(2.0)
            t += r2
            t *= _f32(p2)
            xd += t
            t = y2 * _f32(2.0)
            t += r2
            t *= _f32(p1)
            yd += t
            t = xy * _f32(2 * p2)
            yd += t
        X, Y = xd, yd
    out = []
    for _ in range(3):
        full = np.empty(H * W, np.float32)
        full[: r0 * W] = np.nan
        full[r1 * W:] = np.nan
        out.append(full)
    px = np.multiply(X, _f32(K[0, 0]), out=out[0][band])
    if K[0, 1] != 0:
        px += Y * _f32(K[0, 1])
    px += _f32(K[0, 2])
    py = np.multiply(Y, _f32(K[1, 1]), out=out[1][band])
    py += _f32(K[1, 2])
    zb = out[2][band]
    np.multiply(iz, 0, out=zb)
    zb += Z  # NaN where behind the camera
    return RGBProjection(out[0].reshape(H, W), out[1].reshape(H, W), out[2].reshape(H, W), (r0, r1),
                         (rgb.height, rgb.width), float(K[0, 0]))


def check_rgb_image(image, name: str = "rgb_image") -> np.ndarray:
    """Validate an RGB image: ``(h, w, 3)`` uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected shape (h, w, 3), got {img.shape}")
    return img


def sample_bilinear_rgb(image, x, y):
    """Bilinear colour of an RGB image at sub-pixel positions.

    Parameters
    ----------
    image : (h, w, 3) uint8
    x, y : (n,) float32
        Pixel coordinates (column, row); pixel centres at integers. Positions outside
        ``[-0.5, w - 0.5] x [-0.5, h - 0.5]`` or NaN give NaN; within the outer half
        pixel the border pixels are replicated.

    Returns
    -------
    (n, 3) float32
        Colour in ``[0, 1]`` (grey level / 255).
    """
    img = check_rgb_image(image, "image")
    h, w, _ = img.shape
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x, y: shapes differ, {x.shape} vs {y.shape}")
    with np.errstate(invalid="ignore"):
        inside = (x >= _f32(-0.5)) & (x <= _f32(w - 0.5)) & (y >= _f32(-0.5)) & (y <= _f32(h - 0.5))
    out = np.full((x.size, 3), np.nan, np.float32)
    idx = np.flatnonzero(inside)
    cols = _sample_inside(img, x[idx], y[idx])
    for c in range(3):
        out[idx, c] = cols[c]
    return out


def _sample_inside(img: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Bilinear sample of an (h, w, 3) uint8 image at positions inside it.

    Returns three float32 channels in [0, 1]. The 4 corners x 3 channels are gathered as
    bytes straight from the interleaved image (``take`` on the flat buffer shifted by the
    channel), so the image is never converted.
    """
    h, w, _ = img.shape
    flat = img.reshape(-1)
    xs = np.clip(x, _f32(0.0), _f32(max(w - 1, 0)))
    ys = np.clip(y, _f32(0.0), _f32(max(h - 1, 0)))
    x0 = xs.astype(np.int32)
    y0 = ys.astype(np.int32)
    if w > 1:
        np.minimum(x0, w - 2, out=x0)
    if h > 1:
        np.minimum(y0, h - 2, out=y0)
    fx = xs - x0  # in [0, 1]
    fy = ys - y0
    i00 = y0.astype(np.intp)
    i00 *= w
    i00 += x0
    i00 *= 3
    dx = 3 if w > 1 else 0
    dy = 3 * w if h > 1 else 0
    idx = [i00, i00 + dx, i00 + dy, i00 + (dx + dy)]
    w11 = fx * fy
    w01 = fx - w11
    w10 = fy - w11
    w00 = _f32(1.0) - fx
    w00 -= w10
    for wi in (w00, w01, w10, w11):
        wi *= _f32(1.0 / 255.0)
    weights = (w00, w01, w10, w11)
    chans = []
    t = np.empty(x.size, np.float32)
    for c in range(3):
        src = flat[c:]
        acc = None
        for ii, wi in zip(idx, weights):
            v = np.take(src, ii)
            if acc is None:
                acc = np.multiply(v, wi, dtype=np.float32)
            else:
                np.multiply(v, wi, out=t, dtype=np.float32)
                acc += t
        chans.append(acc)
    return chans


@dataclass(frozen=True)
class Texture:
    """Per-point colour of one view.

    Attributes
    ----------
    colors : (H, W, 3) float32
        RGB in ``[0, 1]``; NaN where the point has no colour.
    visible : (H, W) bool
        The point projects inside the RGB image and is not occluded there.
    """

    colors: np.ndarray
    visible: np.ndarray


def visibility(projection: RGBProjection, rgb_depth, occlusion_tol_mm: float = 1.0,
               occlusion_tol_px: float = 2.0, *, engine: str = "auto") -> np.ndarray:
    """Which points are seen by the RGB camera (inside the image and not occluded).

    Parameters
    ----------
    projection : RGBProjection
    rgb_depth : (h, w) float32
        The view's depth image in the RGB camera (:func:`kernels.depth.depth_image`).
    occlusion_tol_mm, occlusion_tol_px : float
        Tolerance ``tol_mm + tol_px * z / f_rgb`` (see the module docstring).
    engine : {"auto", "numba", "numpy"}
        The fused loop of :mod:`kernels._fast_products` (default when numba is
        installed) or the vectorised numpy path; both give the same result.

    Returns
    -------
    (H, W) bool
    """
    if not isinstance(projection, RGBProjection):
        raise ValueError(f"projection: expected an RGBProjection, got {type(projection).__name__}")
    D = np.asarray(rgb_depth, dtype=np.float32)
    h, w = projection.rgb_size
    if D.shape != (h, w):
        raise ValueError(f"rgb_depth: expected shape ({h}, {w}) (the RGB image), got {D.shape}")
    H, W = projection.x.shape
    r0, r1 = projection.rows
    band = slice(r0 * W, r1 * W)
    if _use_fast(engine):
        out = np.zeros(H * W, bool)
        _fast.visibility_band(projection.x.reshape(-1)[band], projection.y.reshape(-1)[band],
                              projection.z.reshape(-1)[band], np.ascontiguousarray(D).reshape(-1), h, w,
                              _f32(occlusion_tol_px / projection.focal_px), _f32(occlusion_tol_mm), out[band])
        return out.reshape(H, W)
    # the points of the view only (compressed): ~half of the band's pixels
    idx = np.flatnonzero(np.isfinite(projection.z.reshape(-1)[band]))
    idx += r0 * W
    x = projection.x.reshape(-1)[idx]
    y = projection.y.reshape(-1)[idx]
    z = projection.z.reshape(-1)[idx]
    with np.errstate(invalid="ignore"):
        cx = np.rint(x)
        cy = np.rint(y)
        inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    sel = np.flatnonzero(inside)
    lin = cy[sel].astype(np.intp)
    lin *= w
    lin += cx[sel].astype(np.intp)
    d = D.reshape(-1)[lin]
    zs = z[sel]
    tol = zs * _f32(occlusion_tol_px / projection.focal_px)
    tol += _f32(occlusion_tol_mm)
    tol += d
    with np.errstate(invalid="ignore"):
        vis = ~(zs > tol)  # no depth at that pixel (patch rim): nothing known in front
    out = np.zeros(H * W, bool)
    out[idx[sel[vis]]] = True
    return out.reshape(H, W)


@dataclass(frozen=True)
class TextureParams:
    """Occlusion tolerances of :func:`texture_map` (the stage's parameters).

    Attributes
    ----------
    occlusion_tol_mm : float
        A point is occluded in the RGB camera when it lies more than this (mm, >= 0)
        behind the RGB depth image at its projection (default 1.0).
    occlusion_tol_px : float
        Search radius in RGB pixels (>= 0) for that depth test (default 2.0).
    """

    occlusion_tol_mm: float = 1.0
    occlusion_tol_px: float = 2.0

    def __post_init__(self):
        for name in ("occlusion_tol_mm", "occlusion_tol_px"):
            v = float(getattr(self, name))
            if not v >= 0:
                raise ValueError(f"TextureParams.{name}: must be >= 0, got {v}")


def texture_map(projection: RGBProjection, rgb_image, rgb_depth, *, occlusion_tol_mm: float = 1.0,
                occlusion_tol_px: float = 2.0, visible=None, engine: str = "auto") -> Texture:
    """Colour every point of a view from its RGB image (bilinear), NaN when unseen.

    Paper section 3.1 (texture mapping [46]).

    Parameters
    ----------
    projection : RGBProjection
        From :func:`project_to_rgb`.
    rgb_image : (h, w, 3) uint8
        The group's RGB image.
    rgb_depth : (h, w) float32
        The view's depth image in the RGB camera (the z-buffer for the occlusion test).
    occlusion_tol_mm, occlusion_tol_px : float
        Occlusion tolerance (module docstring); defaults 1 mm + 2 footprints.
    visible : (H, W) bool, optional
        The result of :func:`visibility` with the same tolerances, when already computed.
    engine : {"auto", "numba", "numpy"}
        As in :func:`visibility` (same result either way).

    Returns
    -------
    Texture

    Raises
    ------
    ValueError
        Wrong image dtype / shape, ``rgb_depth`` or ``visible`` of the wrong shape.
    """
    img = check_rgb_image(rgb_image)
    if not isinstance(projection, RGBProjection):
        raise ValueError(f"projection: expected an RGBProjection, got {type(projection).__name__}")
    h, w = projection.rgb_size
    if img.shape[:2] != (h, w):
        raise ValueError(f"rgb_image: expected shape ({h}, {w}, 3) (the RGB camera), got {img.shape}")
    H, W = projection.x.shape
    if visible is None:
        vis = visibility(projection, rgb_depth, occlusion_tol_mm, occlusion_tol_px, engine=engine)
    else:
        vis = np.asarray(visible)
        if vis.shape != (H, W) or vis.dtype != np.bool_:
            raise ValueError(f"visible: expected a ({H}, {W}) bool array, got {vis.dtype} {vis.shape}")
    r0, r1 = projection.rows
    band = slice(r0 * W, r1 * W)
    if _use_fast(engine):
        colors = np.empty((H * W, 3), np.float32)
        colors[: r0 * W] = np.nan
        colors[r1 * W:] = np.nan
        _fast.texture_band(projection.x.reshape(-1)[band], projection.y.reshape(-1)[band],
                           np.ascontiguousarray(vis).reshape(-1)[band], np.ascontiguousarray(img).reshape(-1), h, w,
                           colors[band])
        return Texture(colors.reshape(H, W, 3), vis)
    idx = np.flatnonzero(vis.reshape(-1)[band])
    idx += r0 * W
    chans = _sample_inside(img, projection.x.reshape(-1)[idx], projection.y.reshape(-1)[idx])
    colors = np.full((H * W, 3), np.nan, np.float32)
    for c in range(3):
        colors[:, c][idx] = chans[c]
    return Texture(colors.reshape(H, W, 3), vis)
