"""A tiny, independent analytic fringe renderer for decoder tests (docs/image-model.md).

It renders the structured-light images of analytic surfaces (a plane or a sphere) seen
by one IR camera and lit by one projector, following the image model page line by line:
absolute phase ``phi_f(x_p) = 2 pi f (x_p + 0.5) / W_p``, 8-bit gamma pre-compensated
patterns, ``E_proj = P max(0, n.l) (d0/|X - C_p|)^2 s(X)``, ``I = rho (A_amb + E_proj e)``,
read + shot noise, rounding and clipping to uint8. It shares no code with the decoder
(only ``kernels.camera`` for rays and projection) nor with the project's simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.camera import Camera, look_at, pixel_grid, pixel_rays, project


@dataclass(frozen=True)
class Pair:
    """An IR camera, a projector and an RGB camera of one synthetic group."""

    ir: Camera
    projector: Camera
    rgb: Camera


def make_group(width: int = 320, height: int = 256, *, distortion: bool = True, proj_width: int = 1024,
               proj_height: int = 768, rgb_width: int | None = None, rgb_height: int | None = None,
               baseline: float = 180.0, distance: float = 500.0, target=(0.0, 0.0, 0.0)) -> Pair:
    """A frontal group looking at ``target`` from ``+z`` (world frame of conventions.md).

    The IR camera sits at ``x = -baseline/2``, the projector at ``+baseline/2`` and the RGB
    camera between them, 40 mm above; all look at ``target``. Horizontal fields of view:
    IR/RGB about 36 degrees, projector about 40 degrees.
    """
    tz = np.asarray(target, float)
    up = (0.0, 1.0, 0.0)

    def cam(name, pos, w, h, hfov_deg, dist):
        R, t = look_at(np.asarray(pos, float), tz, up)
        fx = 0.5 * w / np.tan(np.radians(hfov_deg) / 2)
        K = np.array([[fx, 0, (w - 1) / 2 + 0.37], [0, fx, (h - 1) / 2 - 0.21], [0, 0, 1.0]])
        return Camera(name, w, h, K, np.asarray(dist, float), R, t)

    d_ir = (-0.12, 0.09, 0.0012, -0.0008, 0.0) if distortion else (0, 0, 0, 0, 0)
    d_rgb = (0.08, -0.05, -0.0006, 0.0009, 0.0) if distortion else (0, 0, 0, 0, 0)
    ir = cam("test/ir", tz + [-baseline / 2, 0, distance], width, height, 36.0, d_ir)
    pj = cam("test/projector", tz + [baseline / 2, 0, distance], proj_width, proj_height, 40.0, (0, 0, 0, 0, 0))
    rw = rgb_width or width
    rh = rgb_height or height
    rgb = cam("test/rgb", tz + [0.0, 40.0, distance], rw, rh, 36.0, d_rgb)
    return Pair(ir, pj, rgb)


@dataclass(frozen=True)
class Photometry:
    """Image-model photometric constants (defaults of docs/image-model.md)."""

    peak: float = 230.0          # P, grey levels for rho = 1 at d0
    ambient: float = 40.0        # A_amb
    d0: float = 500.0            # working distance, mm
    gamma_p: float = 2.2         # projector gamma (pre-compensated by the patterns)
    sigma_read: float = 0.0      # read noise, grey levels
    k_shot: float = 0.0          # shot-noise factor (variance per grey level)


@dataclass(frozen=True)
class Plane:
    point: tuple = (0.0, 0.0, 0.0)
    normal: tuple = (0.0, 0.0, 1.0)

    def intersect(self, o, d):
        n = np.asarray(self.normal, float)
        n = n / np.linalg.norm(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((np.asarray(self.point, float) - o) @ n) / (d @ n)
        t[~(t > 0)] = np.nan
        nrm = np.broadcast_to(n, d.shape).copy()
        return t, nrm


@dataclass(frozen=True)
class Sphere:
    center: tuple = (0.0, 0.0, -60.0)
    radius: float = 100.0

    def intersect(self, o, d):
        c = np.asarray(self.center, float)
        oc = o - c
        bq = d @ oc
        disc = bq * bq - (oc @ oc - self.radius ** 2)
        with np.errstate(invalid="ignore"):
            t = -bq - np.sqrt(disc)
        t[~(disc >= 0) | ~(t > 0)] = np.nan
        X = o + t[:, None] * d
        nrm = (X - c) / self.radius
        return t, nrm


def pattern(x_p, f, n, N, W_p, gamma_p):
    """Emitted relative radiance e_{f,n}(x_p) with 8-bit gamma pre-compensation."""
    phi = 2 * np.pi * f * (x_p + 0.5) / W_p
    p = 0.5 + 0.5 * np.cos(phi + 2 * np.pi * n / N)
    return (np.round(255 * p ** (1 / gamma_p)) / 255) ** gamma_p


@dataclass(frozen=True)
class Rendered:
    stack: np.ndarray            # (L, N, H, W) uint8
    points: np.ndarray           # (H, W, 3) float64 world, NaN where the ray misses
    projector_x: np.ndarray      # (H, W) float64
    lit: np.ndarray              # (H, W) bool: projector sees the point (s(X) = 1)
    albedo: np.ndarray           # (H, W) float64
    modulation: np.ndarray       # (H, W) float64, B = rho E_proj / 2 (grey levels)
    extra: dict = field(default_factory=dict)


def render(group: Pair, surface, frequencies=(1, 8, 64), n_steps: int = 4, *, albedo=0.8,
           photometry: Photometry = Photometry(), shadow_rows=None, rng=None) -> Rendered:
    """Render the fringe stack of ``surface`` per docs/image-model.md.

    Parameters
    ----------
    group : Pair
    surface : Plane or Sphere
    frequencies, n_steps : fringe settings
    albedo : float or callable(X (n, 3)) -> (n,)
        IR albedo in [0, 1].
    shadow_rows : (float, float), optional
        Projector rows ``[y0, y1]`` blocked by a thin horizontal rod in front of the
        projector: points projecting there are in projector shadow (``s = 0``).
    rng : numpy Generator or int, optional
        Noise source (noise only when ``sigma_read`` or ``k_shot`` > 0).
    """
    ir, pj = group.ir, group.projector
    H, W = ir.height, ir.width
    o, d = pixel_rays(ir, pixel_grid(W, H))
    t, nrm = surface.intersect(o, d)
    hit = np.isfinite(t)
    X = o + np.where(hit, t, 0)[:, None] * d
    X[~hit] = np.nan
    xy_p, z_p = project(pj, np.where(hit[:, None], X, 0.0))
    x_p, y_p = xy_p[:, 0], xy_p[:, 1]
    inside = hit & (z_p > 0) & (x_p >= -0.5) & (x_p <= pj.width - 0.5) & (y_p >= -0.5) & (y_p <= pj.height - 0.5)
    if shadow_rows is not None:
        inside &= ~((y_p >= shadow_rows[0]) & (y_p <= shadow_rows[1]))
    Cp = pj.center
    v = Cp - np.where(hit[:, None], X, 0.0)
    dist = np.linalg.norm(v, axis=1)
    lvec = v / np.where(dist > 0, dist, 1)[:, None]
    ph = photometry
    cosi = np.maximum(0.0, np.einsum("ij,ij->i", nrm, lvec))
    lit = inside & (cosi > 0)
    E = np.where(lit, ph.peak * cosi * (ph.d0 / np.where(dist > 0, dist, 1)) ** 2, 0.0)
    if callable(albedo):
        rho = np.where(hit, albedo(np.where(hit[:, None], X, 0.0)), 0.0)
    else:
        rho = np.where(hit, float(albedo), 0.0)
    gen = np.random.default_rng(rng)
    L, N = len(frequencies), n_steps
    stack = np.empty((L, N, H, W), np.uint8)
    xs = np.where(lit, x_p, 0.0)
    for i, f in enumerate(frequencies):
        for n in range(N):
            e = pattern(xs, f, n, N, pj.width, ph.gamma_p)
            clean = rho * (ph.ambient + E * e)
            if ph.sigma_read > 0 or ph.k_shot > 0:
                sd = np.sqrt(ph.sigma_read ** 2 + ph.k_shot * clean)
                clean = clean + sd * gen.standard_normal(clean.shape)
            stack[i, n] = np.clip(np.round(clean), 0, 255).astype(np.uint8).reshape(H, W)
    xpo = np.where(hit, x_p, np.nan)
    return Rendered(stack, X.reshape(H, W, 3), xpo.reshape(H, W), lit.reshape(H, W), rho.reshape(H, W),
                    (rho * E / 2).reshape(H, W))
