"""Ray / plane triangulation of IR pixels against the projector's planes of constant column.

Paper section 3.1 ("Multi-View Scanning"; "3D Point Cloud to Depth": structured light and
triangulation). A decoded projector column ``x_p`` defines, in projector coordinates
(no distortion, ``K_p = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]``), the plane through the
projector centre

    fx * X + s * Y - (x_p - cx) * Z = 0          (image-model.md; s = 0 in practice)

The IR pixel's undistorted ray ``X_ir = lam * d``, ``d = (x_n, y_n, 1)`` (``lam`` is the
IR-frame depth z) maps to the projector frame as ``X_p = lam * R_pi d + t_pi`` with
``R_pi = R_p R_ir^T``, ``t_pi = t_p - R_pi t_ir``. With ``a = fx (R_pi d)_x + s (R_pi d)_y``,
``b = (R_pi d)_z``, ``c0 = fx t_x + s t_y`` and ``c1 = t_z`` (``t = t_pi``), the closed form is

    lam = (u c1 - c0) / (a - u b),   u = x_p - cx.

The per-pixel quantities ``d`` (undistorted), ``a``, ``b`` and the world ray direction do
not depend on the images: :func:`ray_table` computes them once per calibration and keeps
them in a small read-only cache keyed by the calibration's bytes (the undistorted pixel grid,
which depends only on the intrinsics, comes from :func:`kernels.camera.undistorted_pixel_grid`;
:func:`kernels.camera.clear_caches` empties both).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
import threading

import numpy as np

from kernels.camera import Camera, register_cache, undistorted_pixel_grid

_CACHE_SIZE = 8
_cache: "OrderedDict[bytes, RayTable]" = OrderedDict()
_cache_lock = threading.Lock()


def _clear_cache() -> int:
    with _cache_lock:
        n = len(_cache)
        _cache.clear()
    return n


register_cache("kernels.triangulate.ray_table", _clear_cache)


def check_camera(cam, name: str, *, projector: bool = False) -> Camera:
    """Validate a calibration entry used for triangulation.

    Parameters
    ----------
    cam : Camera
    name : str
        Parameter name for error messages (``"ir"``, ``"projector"``, ``"rgb"``).
    projector : bool
        When true, the lens must have zero distortion (image-model.md).

    Returns
    -------
    Camera

    Raises
    ------
    ValueError
        Not a :class:`~kernels.camera.Camera`; ``K`` not finite or not invertible
        (``fx``, ``fy`` <= 0 or ``det K`` ~ 0); ``R`` not a rotation; a projector with
        distortion.
    """
    if not isinstance(cam, Camera):
        raise ValueError(f"{name}: expected a kernels.camera.Camera, got {type(cam).__name__}")
    K = np.asarray(cam.K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)):
        raise ValueError(f"{name}: K must be a finite (3, 3) matrix, got {K.tolist()}")
    if not (K[0, 0] > 0 and K[1, 1] > 0) or abs(np.linalg.det(K)) < 1e-9:
        raise ValueError(f"{name}: intrinsic matrix K is not invertible (fx={K[0, 0]}, fy={K[1, 1]}, "
                         f"det={np.linalg.det(K):.3g})")
    R = np.asarray(cam.R, dtype=np.float64)
    if R.shape != (3, 3) or not np.all(np.isfinite(R)) or not np.allclose(R @ R.T, np.eye(3), atol=1e-6) \
            or np.linalg.det(R) <= 0:
        raise ValueError(f"{name}: R is not a rotation matrix")
    t = np.asarray(cam.t, dtype=np.float64)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise ValueError(f"{name}: t must be a finite (3,) vector")
    if projector and np.any(np.asarray(cam.dist) != 0):
        raise ValueError(f"{name}: a projector must have zero distortion, got dist={np.asarray(cam.dist).tolist()}")
    return cam


def _camera_key(cam: Camera) -> bytes:
    parts = [cam.name.encode(), np.array([cam.width, cam.height], np.int64).tobytes()]
    for a in (cam.K, cam.dist, cam.R, cam.t):
        parts.append(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return b"|".join(parts)


@dataclass(frozen=True)
class RayTable:
    """Per-IR-pixel ray quantities for one (IR camera, projector) calibration.

    All arrays are read-only, flat over the IR pixels in row-major order (``HW = H * W``).

    Attributes
    ----------
    height, width : int
        IR image size.
    ray_ir : (3, HW) float32
        Undistorted IR-frame ray ``d = (x_n, y_n, 1)`` (z = 1, so the ray parameter is depth).
    ray_world : (3, HW) float32
        ``R_ir^T d``: the same ray in the world frame.
    inv_norm : (HW,) float32
        ``1 / |d|``.
    a, b : (HW,) float32
        ``a = fx (R_pi d)_x + s (R_pi d)_y``, ``b = (R_pi d)_z`` (see the module docstring).
    c0, c1 : float
        ``fx t_x + s t_y`` and ``t_z`` of ``t_pi`` (mm).
    fx_p, s_p, cx_p : float
        Projector intrinsics used by the plane.
    origin_world : (3,) float64
        IR camera centre in the world frame (mm).
    epipole_x : float
        Projector column of the plane through the IR centre (``inf`` when none).
    b_min, b_max : float
        Range of ``b`` over the image (used by :meth:`in_front_of_projector`).
    """

    height: int
    width: int
    ray_ir: np.ndarray
    ray_world: np.ndarray
    inv_norm: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c0: float
    c1: float
    fx_p: float
    s_p: float
    cx_p: float
    origin_world: np.ndarray
    epipole_x: float
    b_min: float
    b_max: float

    def in_front_of_projector(self, z_near: float, z_far: float) -> bool:
        """True when every IR ray point at depth ``z_near..z_far`` lies in front of the projector.

        The projector-frame depth ``lam * b + c1`` is bilinear in ``(lam, b)``, so its
        minimum over the box is at a corner; when it is positive the per-pixel test can
        be skipped.
        """
        corners = [z * bb + self.c1 for z in (z_near, z_far) for bb in (self.b_min, self.b_max)]
        return min(corners) > 0


def _build_ray_table(ir: Camera, projector: Camera) -> RayTable:
    H, W = ir.height, ir.width
    xn = undistorted_pixel_grid(ir)  # (HW, 2) float64, distortion removed (cached per intrinsics)
    d = np.empty((3, H * W), np.float64)
    d[0], d[1], d[2] = xn[:, 0], xn[:, 1], 1.0
    R_pi = projector.R @ ir.R.T
    t_pi = projector.t - R_pi @ ir.t
    fx, s, cx = projector.K[0, 0], projector.K[0, 1], projector.K[0, 2]
    dp = R_pi @ d
    a = fx * dp[0] + s * dp[1]
    b = dp[2]
    c0 = float(fx * t_pi[0] + s * t_pi[1])
    c1 = float(t_pi[2])
    epi = cx + c0 / c1 if c1 != 0 else np.inf
    arrays = dict(
        ray_ir=d.astype(np.float32),
        ray_world=(ir.R.T @ d).astype(np.float32),
        inv_norm=(1.0 / np.sqrt(np.einsum("ij,ij->j", d, d))).astype(np.float32),
        a=a.astype(np.float32),
        b=b.astype(np.float32),
        origin_world=np.asarray(ir.center, np.float64).copy(),
    )
    for v in arrays.values():
        v.setflags(write=False)
    return RayTable(H, W, c0=c0, c1=c1, fx_p=float(fx), s_p=float(s), cx_p=float(cx),
                    epipole_x=float(epi), b_min=float(b.min()), b_max=float(b.max()), **arrays)


def ray_table(ir: Camera, projector: Camera) -> RayTable:
    """Per-pixel undistorted rays and plane coefficients, cached per calibration.

    The cache holds the last 8 tables, keyed by the exact bytes of both cameras
    (name, size, K, dist, R, t); its arrays are read-only, so sharing is safe.

    Parameters
    ----------
    ir : Camera
        The IR camera (with distortion).
    projector : Camera
        The projector of the same group (no distortion).

    Returns
    -------
    RayTable

    Raises
    ------
    ValueError
        Invalid camera (see :func:`check_camera`), zero baseline, or a degenerate
        geometry where the IR camera centre lies on the plane of a projector column
        inside the projector image (every ray of that column would lie in its plane).
    """
    check_camera(ir, "ir")
    check_camera(projector, "projector", projector=True)
    key = _camera_key(ir) + b"#" + _camera_key(projector)
    with _cache_lock:
        tab = _cache.get(key)
        if tab is not None:
            _cache.move_to_end(key)
            return tab
    baseline = np.linalg.norm(ir.center - projector.center)
    if not baseline > 1e-6:
        raise ValueError(f"projector: zero baseline between the IR camera and the projector ({baseline:.3g} mm)")
    tab = _build_ray_table(ir, projector)
    # plane value at the IR centre is c0 - u c1; it vanishes at the epipole column.
    margin = 0.5
    if -0.5 - margin <= tab.epipole_x <= projector.width - 0.5 + margin or abs(tab.c0) + abs(tab.c1) * projector.width < 1e-9:
        raise ValueError(
            f"projector: degenerate calibration, the IR camera centre lies on the plane of projector column "
            f"{tab.epipole_x:.1f} (inside the projector image 0..{projector.width - 1}); rays there are parallel "
            "to their planes")
    with _cache_lock:
        _cache[key] = tab
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return tab


def triangulate_flat(flat_index, projector_x, table: RayTable, *, frame: str = "world",
                     min_sin_angle: float = 0.05, depth_range: tuple[float, float] = (50.0, 5000.0)):
    """Triangulate selected IR pixels (compressed form used by the decoder).

    Parameters
    ----------
    flat_index : (n,) int
        Row-major IR pixel indices ``row * W + col``.
    projector_x : (n,) float32
        Decoded projector column of each pixel.
    table : RayTable
        From :func:`ray_table`.
    frame : {"world", "ir"}
        Output frame: the stored world frame, or the IR camera frame (the group's own frame).
    min_sin_angle : float
        Rays making a smaller sine with their plane are rejected (ill-conditioned).
    depth_range : (float, float)
        Accepted IR-frame depth ``z`` in mm; the point must also be in front of the projector.

    Returns
    -------
    points : (n, 3) float32
        mm, NaN where rejected.
    sin_angle : (n,) float32
        ``|sin|`` of the angle between the ray and the plane.
    ok : (n,) bool
    """
    idx = np.asarray(flat_index)
    u = np.asarray(projector_x, dtype=np.float32) - np.float32(table.cx_p)
    a = table.a[idx]
    b = table.b[idx]
    den = a - u * b
    num = u * np.float32(table.c1) - np.float32(table.c0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = num / den
        # sin of the ray/plane angle: |n . d| / (|n| |d|), n = (fx, s, -u) in projector coordinates
        nn = np.sqrt(u * u + np.float32(table.fx_p ** 2 + table.s_p ** 2))
        sin_angle = np.abs(den) / nn * table.inv_norm[idx]
        zp = lam * b + np.float32(table.c1)  # projector-frame depth
        ok = (sin_angle >= np.float32(min_sin_angle)) & (lam >= np.float32(depth_range[0])) \
            & (lam <= np.float32(depth_range[1])) & (zp > 0)
    lam[~ok] = np.nan
    rays = table.ray_world if frame == "world" else table.ray_ir
    pts = np.empty((idx.size, 3), np.float32)
    for j in range(3):
        np.multiply(rays[j][idx], lam, out=pts[:, j])
    if frame == "world":
        pts += table.origin_world.astype(np.float32)
    return pts, sin_angle, ok


@dataclass(frozen=True)
class Triangulation:
    """Organised triangulation result.

    Attributes
    ----------
    points : (H, W, 3) float32
        Points in mm (world or IR frame), NaN where invalid.
    valid : (H, W) bool
    sin_angle : (H, W) float32
        Sine of the ray/plane angle, NaN where the pixel had no projector column.
    """

    points: np.ndarray
    valid: np.ndarray
    sin_angle: np.ndarray


def triangulate(projector_x, ir: Camera, projector: Camera, *, frame: str = "world",
                min_sin_angle: float = 0.05, depth_range: tuple[float, float] = (50.0, 5000.0)) -> Triangulation:
    """Intersect every IR pixel's undistorted ray with its projector plane (closed form).

    Paper section 3.1 (structured light and triangulation [25]); plane
    ``fx_p X - (x_p - cx_p) Z = 0`` in projector coordinates (image-model.md).

    Parameters
    ----------
    projector_x : (H, W) float
        Decoded projector column per IR pixel, NaN where unknown.
    ir : Camera
        IR camera, ``(H, W) == (ir.height, ir.width)``.
    projector : Camera
        Projector of the same group (zero distortion).
    frame : {"world", "ir"}
        Output frame: the calibration's world frame, or the IR camera frame.
    min_sin_angle : float
        Minimum ``|sin|`` of the ray/plane angle (default 0.05, about 3 degrees).
    depth_range : (float, float)
        Accepted IR-frame depth in mm.

    Returns
    -------
    Triangulation

    Raises
    ------
    ValueError
        Wrong ``projector_x`` shape; invalid or degenerate calibration (``ir``,
        ``projector``, see :func:`ray_table`); unknown ``frame``; bad ``depth_range``.
    """
    _check_frame_range(frame, min_sin_angle, depth_range)
    tab = ray_table(ir, projector)
    xp = np.asarray(projector_x, dtype=np.float32)
    if xp.shape != (ir.height, ir.width):
        raise ValueError(f"projector_x: expected shape ({ir.height}, {ir.width}) (the IR image), got {xp.shape}")
    flat = xp.reshape(-1)
    idx = np.flatnonzero(np.isfinite(flat))
    pts, sin_a, ok = triangulate_flat(idx, flat[idx], tab, frame=frame, min_sin_angle=min_sin_angle,
                                      depth_range=depth_range)
    H, W = xp.shape
    points = np.full((H * W, 3), np.nan, np.float32)
    points[idx] = pts
    valid = np.zeros(H * W, bool)
    valid[idx] = ok
    sa = np.full(H * W, np.nan, np.float32)
    sa[idx] = sin_a
    return Triangulation(points.reshape(H, W, 3), valid.reshape(H, W), sa.reshape(H, W))


def _check_frame_range(frame, min_sin_angle, depth_range):
    if frame not in ("world", "ir"):
        raise ValueError(f"frame: expected 'world' or 'ir', got {frame!r}")
    if not (0 <= float(min_sin_angle) < 1):
        raise ValueError(f"min_sin_angle: must be in [0, 1), got {min_sin_angle}")
    lo, hi = (float(v) for v in depth_range)
    if not (0 <= lo < hi):
        raise ValueError(f"depth_range: expected 0 <= near < far, got {depth_range}")


def point_confidence(modulation, sin_angle, modulation_ref: float = 50.0, sin_angle_ref: float = 0.34):
    """Per-point confidence in ``[0, 1]`` from the modulation and the ray/plane angle.

    The depth noise of a point scales as ``sigma_phi / sin(theta)`` with
    ``sigma_phi ~ 1 / B``; the confidence is the ratio of a reference noise to the
    predicted one, capped at 1:

        conf = clip((B / B_ref) * (sin(theta) / sin_ref), 0, 1)

    so ``conf = 1`` for skin facing the projector (``B >= B_ref`` at the rig's nominal
    triangulation angle, ``sin_ref = 0.34`` ~ 20 degrees), ``0.5`` where the expected
    noise is twice the reference.

    Parameters
    ----------
    modulation : (...) float32
        ``B`` in grey levels.
    sin_angle : (...) float32
        From :func:`triangulate`.
    modulation_ref, sin_angle_ref : float
        References (> 0).

    Returns
    -------
    (...) float32
        NaN where either input is NaN.
    """
    b = np.asarray(modulation, dtype=np.float32)
    s = np.asarray(sin_angle, dtype=np.float32)
    c = b * s
    c *= np.float32(1.0 / (modulation_ref * sin_angle_ref))
    np.clip(c, 0.0, 1.0, out=c)
    return c
