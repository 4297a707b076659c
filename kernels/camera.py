"""Pinhole camera with Brown-Conrady distortion, shared by the simulator and the decoder.

Conventions (see ``docs/conventions.md``)
-----------------------------------------
* Units are millimetres; frames are right-handed.
* ``x_cam = R @ x_world + t`` (world -> camera). The camera looks down its +z axis,
  its +x axis points along image columns and +y along image rows (down in the image).
* Pixel coordinates are ``(x, y)`` = (column, row); the centre of pixel ``[row, col]``
  is at ``(col, row)``. Images are row-major arrays indexed ``[y, x]``.
* Distortion follows OpenCV's order ``(k1, k2, p1, p2, k3)`` applied to normalised
  coordinates ``(x/z, y/z)``.
* A projector is a ``Camera`` whose distortion is zero (the decoder relies on this to
  build planes of constant phase in closed form).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kernels._checks import as_array, check_positive


@dataclass(frozen=True)
class Camera:
    """An ideal pinhole camera plus Brown-Conrady lens distortion.

    Attributes
    ----------
    name : str
        Identifier (e.g. ``"middle/ir"``).
    width, height : int
        Image size in pixels.
    K : (3, 3) float64
        Intrinsic matrix ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels.
    dist : (5,) float64
        Distortion ``(k1, k2, p1, p2, k3)``; zeros for no distortion.
    R : (3, 3) float64
        World -> camera rotation (orthonormal, det +1).
    t : (3,) float64
        World -> camera translation in mm.
    """

    name: str
    width: int
    height: int
    K: np.ndarray
    dist: np.ndarray = field(default_factory=lambda: np.zeros(5))
    R: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"camera {self.name!r}: width/height must be > 0, got {self.width}x{self.height}")
        K = as_array(self.K, f"camera {self.name!r} K", (3, 3), finite=True)
        if K[2, 2] != 1.0 or K[2, 0] != 0 or K[2, 1] != 0 or K[1, 0] != 0:
            raise ValueError(f"camera {self.name!r} K: last row must be [0, 0, 1] and K[1,0] must be 0, got {K.tolist()}")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"camera {self.name!r} K: focal lengths must be > 0 (not invertible), got fx={K[0, 0]}, fy={K[1, 1]}")
        dist = as_array(self.dist, f"camera {self.name!r} dist", (5,), finite=True)
        R = as_array(self.R, f"camera {self.name!r} R", (3, 3), finite=True)
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-6) or np.linalg.det(R) <= 0:
            raise ValueError(f"camera {self.name!r} R: not a rotation matrix (R R^T != I or det <= 0)")
        t = as_array(self.t, f"camera {self.name!r} t", (3,), finite=True)
        for k, v in (("K", K), ("dist", dist), ("R", R), ("t", t)):
            v.setflags(write=False)
            object.__setattr__(self, k, v)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))

    # -- derived quantities -------------------------------------------------------------
    @property
    def center(self) -> np.ndarray:
        """(3,) float64: optical centre in world coordinates (mm)."""
        return -self.R.T @ self.t

    @property
    def has_distortion(self) -> bool:
        return bool(np.any(self.dist != 0))

    def with_pose(self, R: np.ndarray, t: np.ndarray) -> "Camera":
        """Return a copy with a new world -> camera pose."""
        return Camera(self.name, self.width, self.height, self.K, self.dist, R, t)

    def scaled(self, width: int, height: int) -> "Camera":
        """Return the same camera at another resolution (same field of view)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0, 0] *= sx
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 1] *= sy
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return Camera(self.name, width, height, K, self.dist, self.R, self.t)

    def to_dict(self) -> dict:
        """JSON-serialisable description (lists of floats)."""
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "K": self.K.tolist(),
            "dist": self.dist.tolist(),
            "R": self.R.tolist(),
            "t": self.t.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing or malformed fields."""
        missing = [k for k in ("name", "width", "height", "K", "dist", "R", "t") if k not in d]
        if missing:
            raise ValueError(f"camera description misses field(s) {missing}")
        return cls(d["name"], d["width"], d["height"], np.asarray(d["K"], float),
                   np.asarray(d["dist"], float), np.asarray(d["R"], float), np.asarray(d["t"], float))


# -- free functions -------------------------------------------------------------------------

def world_to_camera(cam: Camera, points: np.ndarray) -> np.ndarray:
    """Transform world points into the camera frame.

    Parameters
    ----------
    cam : Camera
    points : (n, 3) float64
        World points in mm.

    Returns
    -------
    (n, 3) float64
        Camera-frame points in mm (z is the depth along the optical axis).
    """
    p = as_array(points, "points", (None, 3))
    return p @ cam.R.T + cam.t


def distort(xn: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Apply Brown-Conrady distortion to normalised coordinates.

    Parameters
    ----------
    xn : (n, 2) float64
        Undistorted normalised coordinates ``(x/z, y/z)``.
    dist : (5,) float64
        ``(k1, k2, p1, p2, k3)``.

    Returns
    -------
    (n, 2) float64
        Distorted normalised coordinates.
    """
    xn = as_array(xn, "xn", (None, 2))
    k1, k2, p1, p2, k3 = as_array(dist, "dist", (5,))
    x, y = xn[:, 0], xn[:, 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return np.stack([xd, yd], axis=1)


def undistort(xd: np.ndarray, dist: np.ndarray, iterations: int = 20, tol: float = 1e-12) -> np.ndarray:
    """Invert :func:`distort` by fixed-point iteration with a Newton polish.

    Parameters
    ----------
    xd : (n, 2) float64
        Distorted normalised coordinates.
    dist : (5,) float64
        ``(k1, k2, p1, p2, k3)``.
    iterations : int
        Maximum number of iterations.
    tol : float
        Stop when the largest update is below ``tol`` (normalised units).

    Returns
    -------
    (n, 2) float64
        Undistorted normalised coordinates; for the lens distortions of this project the
        residual ``distort(result) - xd`` is below 1e-10 (about 1e-7 px).
    """
    xd = as_array(xd, "xd", (None, 2))
    dist = as_array(dist, "dist", (5,))
    if not np.any(dist):
        return xd.copy()
    k1, k2, p1, p2, k3 = (float(v) for v in dist)
    x = xd.copy()
    u, v = x[:, 0].copy(), x[:, 1].copy()
    x0, y0 = x[:, 0].copy(), x[:, 1].copy()
    # scalar factors, grouped as numpy groups the expressions below (same rounding)
    c2k2, c3k3, c2p1, c2p2, c6p1, c6p2 = 2.0 * k2, 3.0 * k3, 2.0 * p1, 2.0 * p2, 6.0 * p1, 6.0 * p2
    for _ in range(int(iterations)):
        # Newton step on f(x) = distort(x) - xd with the analytic 2x2 Jacobian:
        #   radial = 1 + r2 (k1 + r2 (k2 + r2 k3)),  drad = d radial / d r2
        #   fx = u radial + 2 p1 u v + p2 (r2 + 2 u^2) - xd,  fy = v radial + p1 (r2 + 2 v^2) + 2 p2 u v - yd
        #   j11 = radial + 2 u^2 drad + 2 p1 v + 6 p2 u,  j12 = j21 = 2 u v drad + 2 p1 u + 2 p2 v
        #   j22 = radial + 2 v^2 drad + 6 p1 v + 2 p2 u
        # (in-place on a few buffers; every product and sum in the order of the plain formulas)
        uu = u * u
        vv = v * v
        r2 = uu + vv
        radial = r2 * k3
        radial += k2
        radial *= r2
        radial += k1
        radial *= r2
        radial += 1.0
        drad = r2 * c3k3
        drad += c2k2
        drad *= r2
        drad += k1
        uv2 = 2.0 * u
        uv2 *= v                                  # 2 u v
        t = 2.0 * uu
        t += r2
        t *= p2                                   # p2 (r2 + 2 u^2)
        fx = u * radial
        fx += (c2p1 * u) * v
        fx += t
        fx -= x0
        t = 2.0 * vv
        t += r2
        t *= p1                                   # p1 (r2 + 2 v^2)
        fy = v * radial
        fy += t
        fy += (c2p2 * u) * v
        fy -= y0
        j11 = 2.0 * uu
        j11 *= drad
        j11 += radial
        j11 += c2p1 * v
        j11 += c6p2 * u
        j12 = uv2 * drad
        j12 += c2p1 * u
        j12 += c2p2 * v
        j22 = 2.0 * vv
        j22 *= drad
        j22 += radial
        j22 += c6p1 * v
        j22 += c2p2 * u
        det = j11 * j22
        det -= j12 * j12
        dx = j22 * fx
        dx -= j12 * fy
        dx /= det
        dy = j11 * fy
        dy -= j12 * fx
        dy /= det
        u -= dx
        v -= dy
        if max(np.max(np.abs(dx), initial=0.0), np.max(np.abs(dy), initial=0.0)) < tol:
            break
    x[:, 0] = u
    x[:, 1] = v
    return x


def project(cam: Camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points to distorted pixel coordinates.

    Parameters
    ----------
    cam : Camera
    points : (n, 3) float64
        World points in mm.

    Returns
    -------
    pixels : (n, 2) float64
        ``(x, y)`` = (column, row) pixel coordinates; NaN where the point is not in
        front of the camera (z <= 0).
    depth : (n,) float64
        Camera-frame z in mm.
    """
    pc = world_to_camera(cam, points)
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xn = pc[:, :2] / z[:, None]
    xn[z <= 0] = np.nan
    xd = distort(xn, cam.dist) if cam.has_distortion else xn
    K = cam.K
    px = np.empty_like(xd)
    px[:, 0] = K[0, 0] * xd[:, 0] + K[0, 1] * xd[:, 1] + K[0, 2]
    px[:, 1] = K[1, 1] * xd[:, 1] + K[1, 2]
    return px, z


def pixels_to_normalized(cam: Camera, pixels: np.ndarray) -> np.ndarray:
    """Undistorted normalised coordinates ``(x/z, y/z)`` of pixel positions.

    Parameters
    ----------
    cam : Camera
    pixels : (n, 2) float64
        ``(x, y)`` pixel coordinates.

    Returns
    -------
    (n, 2) float64
    """
    px = as_array(pixels, "pixels", (None, 2))
    K = cam.K
    yd = (px[:, 1] - K[1, 2]) / K[1, 1]
    xd = (px[:, 0] - K[0, 2] - K[0, 1] * yd) / K[0, 0]
    xdn = np.stack([xd, yd], axis=1)
    return undistort(xdn, cam.dist) if cam.has_distortion else xdn


def pixel_rays(cam: Camera, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-frame rays through pixel positions (distortion removed).

    Parameters
    ----------
    cam : Camera
    pixels : (n, 2) float64
        ``(x, y)`` pixel coordinates.

    Returns
    -------
    origin : (3,) float64
        The camera centre in world mm.
    directions : (n, 3) float64
        Unit ray directions in the world frame.
    """
    xn = pixels_to_normalized(cam, pixels)
    d_cam = np.concatenate([xn, np.ones((xn.shape[0], 1))], axis=1)
    d_cam /= np.linalg.norm(d_cam, axis=1, keepdims=True)
    return cam.center, d_cam @ cam.R  # R^T applied to row vectors


def pixel_grid(width: int, height: int) -> np.ndarray:
    """All pixel centres of a ``height x width`` image as ``(height*width, 2)`` ``(x, y)``, row-major."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)


# -- per-intrinsics tables, shared by the decoder and the RGB products -----------------------

_GRID_CACHE_SIZE = 4
_grid_cache: "OrderedDict[bytes, np.ndarray]" = OrderedDict()
_grid_lock = threading.Lock()
_cache_clearers: dict[str, Callable[[], int]] = {}


def intrinsics_key(cam: Camera) -> bytes:
    """Digest (SHA-256) of the values the undistorted pixel grid depends on: image size, ``K``
    and ``dist`` (not the name, not the pose)."""
    h = hashlib.sha256(np.array([cam.width, cam.height], np.int64).tobytes())
    h.update(np.ascontiguousarray(cam.K, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(cam.dist, dtype=np.float64).tobytes())
    return h.digest()


def undistorted_pixel_grid(cam: Camera) -> np.ndarray:
    """Undistorted normalised coordinates of every pixel centre of ``cam``, cached per intrinsics.

    The same values as ``pixels_to_normalized(cam, pixel_grid(cam.width, cam.height))``. They
    depend only on the image size, ``K`` and ``dist`` (:func:`intrinsics_key`), not on the pose,
    so the views of a rig that share a lens model, and the calibrations of later sessions of
    that rig (whose drift moves only the poses), reuse one table. A small LRU (the last 4
    intrinsics, ~21 MB each at 1280 x 1024) shared by :mod:`kernels.triangulate` (ray tables)
    and :mod:`kernels.texture` (IR rays in the RGB camera); emptied by :func:`clear_caches`.

    Parameters
    ----------
    cam : Camera

    Returns
    -------
    (H*W, 2) float64
        Row-major ``(x_n, y_n)``; read-only (shared).
    """
    if not isinstance(cam, Camera):
        raise ValueError(f"cam: expected a kernels.camera.Camera, got {type(cam).__name__}")
    key = intrinsics_key(cam)
    with _grid_lock:
        hit = _grid_cache.get(key)
        if hit is not None:
            _grid_cache.move_to_end(key)
            return hit
    xn = pixels_to_normalized(cam, pixel_grid(cam.width, cam.height))
    xn.setflags(write=False)
    with _grid_lock:
        xn = _grid_cache.setdefault(key, xn)   # another thread may have built it meanwhile
        _grid_cache.move_to_end(key)
        while len(_grid_cache) > _GRID_CACHE_SIZE:
            _grid_cache.popitem(last=False)
    return xn


def _clear_grid_cache() -> int:
    with _grid_lock:
        n = len(_grid_cache)
        _grid_cache.clear()
    return n


def register_cache(name: str, clear: Callable[[], int]) -> None:
    """Register a module's calibration cache with :func:`clear_caches` (``clear()`` empties
    it and returns the number of entries dropped)."""
    _cache_clearers[name] = clear


def clear_caches(keep_intrinsics: bool = False) -> int:
    """Forget every cached calibration table of the kernels (as before a worker's first sample).

    Empties the per-calibration caches of the modules that registered one
    (:func:`kernels.triangulate.ray_table`, the IR -> RGB rays of :mod:`kernels.texture`) and,
    unless ``keep_intrinsics``, the per-intrinsics undistorted pixel grids
    (:func:`undistorted_pixel_grid`). ``keep_intrinsics=True`` models a calibration of a new
    session of a known rig (new poses, same lenses). Thread-safe; results never change, only
    the time to get them.

    Returns
    -------
    int
        Number of entries dropped.
    """
    n = sum(clear() for clear in list(_cache_clearers.values()))
    if not keep_intrinsics:
        n += _clear_grid_cache()
    return n


def look_at(position, target, up=(0.0, 1.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """World -> camera pose of a camera at ``position`` looking at ``target``.

    The camera's +z points at the target, +y (image down) is as close as possible to
    ``-up``.

    Parameters
    ----------
    position, target : (3,) float64
        World points in mm; must differ.
    up : (3,) float64
        World up direction; must not be parallel to the viewing direction.

    Returns
    -------
    R : (3, 3) float64
    t : (3,) float64
    """
    c = as_array(position, "position", (3,), finite=True)
    tg = as_array(target, "target", (3,), finite=True)
    u = as_array(up, "up", (3,), finite=True)
    z = tg - c
    n = np.linalg.norm(z)
    check_positive(n, "distance between position and target")
    z /= n
    x = np.cross(-u, z)  # image +x = (image +y) x (+z), right-handed
    nx = np.linalg.norm(x)
    if nx < 1e-9:
        raise ValueError("up: parallel to the viewing direction")
    x /= nx
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ c


def rotation_about_axis(axis, angle_rad: float) -> np.ndarray:
    """(3, 3) rotation by ``angle_rad`` about the unit vector ``axis`` (Rodrigues)."""
    a = as_array(axis, "axis", (3,), finite=True)
    a = a / check_positive(np.linalg.norm(a), "|axis|")
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * (K @ K)
