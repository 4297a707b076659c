"""Structured-light scanner simulator with exact per-pixel ground truth.

Renders, for every camera group of a :class:`~kernels.synth.rig.Rig`, the ``L x N``
fringe images of the IR camera, the RGB image and the 2D landmark annotation of a
triangle mesh, following the image model of ``docs/image-model.md`` line by line, and
returns the ground truth the decoder is measured against (hit points, depth, projector
coordinate, shadowing, albedo, clean modulation, RGB depth).

Rendering (one view)
--------------------
1. Cast one ray per IR pixel through its *undistorted* position (the inverse of the
   camera's Brown-Conrady model: ``kernels.camera.pixel_rays`` on every 4th pixel,
   interpolated and polished with ``kernels.camera.distort`` to 1e-10, see
   ``_camera_rays``) with Open3D's ``RaycastingScene``. The hit point is refined in
   float64 by intersecting the exact pixel ray with the plane of the hit triangle, so
   ``gt.points`` lies on the pixel's ray (``project`` returns the pixel centre to
   ~1e-7 px) and on the mesh (Open3D's float32 hit alone is off by up to ~5 um).
2. At the hit: IR albedo and the shading normal are interpolated from the vertices with
   the hit's barycentric coordinates (``primitive_uvs``); the shading normal is the
   interpolated area-weighted **vertex normal** (smooth shading, no faceting), oriented
   by the face winding (counter-clockwise seen from outside, i.e. outward normals).
   Surfaces are opaque solids: a surface lit from its back side receives no light.
3. The projector sees the hit when it projects inside the projector image, faces the
   projector (``n . l > 0``) and a second ray from the projector centre towards it hits
   nothing closer than ``|X - C_p| - shadow_eps_mm`` (Open3D ``test_occlusions``).
4. ``E_proj``, the 8-bit gamma pre-compensated patterns, read + shot noise, rounding
   and clipping exactly as in ``docs/image-model.md``; all ``L * N`` images derive from
   the per-pixel ``(rho, E_proj, x_p)`` of one cast.
5. RGB: one cast per RGB pixel, Lambertian shading under a key light, a fill light and
   ambient light fixed in the RGB camera frame (no cast shadows), display gamma, noise.
6. Landmarks: visible when inside the RGB image, not occluded (the first hit of the
   RGB ray towards the landmark is within ``landmark_tol_mm`` of it) and facing the
   camera; visible ones get the projection plus Gaussian annotator noise, invisible
   ones NaN.

Randomness: :func:`scan` derives each view's generator from the top-level seed and the
view name (``kernels.synth.seeding.derive_rng(seed, "view", name)``); inside a view the
fringe noise, the RGB noise and the annotator noise come from three independent child
streams. Same inputs and seed give bit-identical arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import open3d as o3d

from kernels._checks import as_array, as_rng
from kernels._checks import check_number as _num
from kernels.camera import Camera, distort, pixel_rays, project
from kernels.synth.rig import Group, Rig, root_entropy
from kernels.synth.seeding import derive_rng

__all__ = [
    "N_LANDMARKS",
    "IMAGE_MODEL_VERSION",
    "FringeParams",
    "PhotometryParams",
    "SceneMesh",
    "ViewGroundTruth",
    "ViewRender",
    "render_view",
    "scan",
    "pattern_radiance",
]

N_LANDMARKS = 106
IMAGE_MODEL_VERSION = 1  # version of docs/image-model.md this module implements


# -- parameters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FringeParams:
    """Fringe pattern sequence (``docs/image-model.md``, Fringe patterns).

    Attributes
    ----------
    steps : int
        ``N``, phase steps per frequency, ``>= 3`` (three samples are the minimum that
        determine the three unknowns ``A, B, phi`` of a pixel). Default 4.
    frequencies : tuple of int
        ``F``, periods across the projector width, strictly increasing positive
        integers starting at 1 (default ``(1, 8, 64)``). The first level must be 1:
        its phase spans ``2 pi`` over the whole projector, so it is unambiguous and
        anchors the temporal unwrapping of the finer levels.

    Raises
    ------
    ValueError
        E.g. ``"steps: must be >= 3, got 2"``, ``"frequencies: must be strictly
        increasing, got (1, 8, 8)"``, ``"frequencies: must start at 1 ..."``.
    """

    steps: int = 4
    frequencies: tuple[int, ...] = (1, 8, 64)

    def __post_init__(self) -> None:
        s = self.steps
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"steps: must be an integer, got {s!r}")
        if s < 3:
            raise ValueError(f"steps: must be >= 3, got {s}")
        object.__setattr__(self, "steps", int(s))
        try:
            freqs = tuple(self.frequencies)
        except TypeError:
            raise ValueError(f"frequencies: must be a sequence of integers, got {self.frequencies!r}") from None
        if not freqs:
            raise ValueError("frequencies: must not be empty")
        for f in freqs:
            if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
                raise ValueError(f"frequencies: must be integers, got {freqs!r}")
        freqs = tuple(int(f) for f in freqs)
        if any(f <= 0 for f in freqs):
            raise ValueError(f"frequencies: must be positive, got {freqs}")
        if any(b <= a for a, b in zip(freqs, freqs[1:])):
            raise ValueError(f"frequencies: must be strictly increasing, got {freqs}")
        if freqs[0] != 1:
            raise ValueError(f"frequencies: must start at 1 (the first level must be unambiguous), got {freqs}")
        object.__setattr__(self, "frequencies", freqs)

    @property
    def levels(self) -> int:
        """``L``, the number of frequencies."""
        return len(self.frequencies)


@dataclass(frozen=True)
class PhotometryParams:
    """Photometric constants of the simulated scanner; defaults model a real face scanner.

    IR / fringe camera (``docs/image-model.md``, Camera signal)

    Attributes
    ----------
    ambient : float
        ``A_amb``, ambient signal in grey levels for albedo 1 (default 40; the real
        range is 20-40).
    projector_peak : float
        ``P``, the projector's peak signal in grey levels for albedo 1 at distance
        ``reference_distance_mm`` and normal incidence (default 270). Skin (albedo
        about 0.7) facing the projector at 500 mm gets modulation ``B = 0.7*270/2 =
        95`` grey levels and peaks at ``0.7*(40+270) = 217``, below saturation; over a
        whole face the incidence angles spread it (synthetic skin, lit pixels, quartiles
        / median: left 53 / 68 / 79, middle 41 / 58 / 71, right 53 / 68 / 78; no
        saturated pixel).
    projector_gamma : float
        ``gamma_p``, the projector's display gamma (default 2.2), pre-compensated by
        8-bit pattern values.
    camera_gamma : float
        Camera response exponent (default 1.0 = linear); another value applies
        ``255 * (I/255) ** (1/camera_gamma)`` before the noise.
    read_noise : float
        ``sigma_read``, read noise standard deviation in grey levels (default 2.0).
    shot_noise_k : float
        ``k_shot``, shot-noise variance per grey level of signal (default 0.1): total
        sigma ``sqrt(2**2 + 0.1 * I)`` is 3.2 at I = 60, 3.8 at I = 108 (skin mean
        level) and 4.1 at I = 128.
    reference_distance_mm : float
        ``d0``, the distance at which ``projector_peak`` holds (default 500 mm, the
        rig's working distance).
    shadow_eps_mm : float
        A hit is shadowed when the projector ray towards it hits something closer than
        ``|X - C_p| - shadow_eps_mm`` (default 0.1 mm; guards against self-hits).

    RGB camera

    rgb_ambient : float
        Ambient light, relative radiance on a surface of albedo 1 (default 0.25).
    rgb_key : float
        Key light strength (default 0.8), Lambertian.
    rgb_key_dir : tuple of 3 float
        Direction from the surface towards the key light in the RGB camera frame
        (x right, y down, z forward; default ``(-0.5, -0.6, -1.0)``: above and to the
        image-left of the camera); normalised internally.
    rgb_fill : float
        Fill light strength (default 0.3).
    rgb_fill_dir : tuple of 3 float
        Fill light direction in the RGB camera frame (default ``(0.7, -0.1, -1.0)``).
    rgb_exposure : float
        Linear gain before encoding (default 1.0); values above 1 saturate.
    rgb_gamma : float
        Encoding gamma: ``255 * clip(L, 0, 1) ** (1/rgb_gamma)`` (default 2.2, sRGB-like).
    rgb_background : float
        Linear radiance of the background where RGB rays miss the mesh (default 0.05).
    rgb_noise : float
        Gaussian noise sigma in grey levels added to the encoded RGB values (default 2.0).

    Annotation

    annotator_noise_px : float
        Standard deviation of the Gaussian annotator noise per landmark coordinate in
        RGB pixels (default 1.0).
    landmark_tol_mm : float
        A landmark is occluded when the first hit of the RGB ray towards it is farther
        than this from it (default 1.0 mm).

    Raises
    ------
    ValueError
        Naming the offending field.

    Notes
    -----
    ``PhotometryParams().without_noise()`` sets every noise to zero (the images are
    then the clean model rounded to 8 bits and the landmarks exact projections).
    """

    ambient: float = 40.0
    projector_peak: float = 270.0
    projector_gamma: float = 2.2
    camera_gamma: float = 1.0
    read_noise: float = 2.0
    shot_noise_k: float = 0.1
    reference_distance_mm: float = 500.0
    shadow_eps_mm: float = 0.1
    rgb_ambient: float = 0.25
    rgb_key: float = 0.8
    rgb_key_dir: tuple[float, float, float] = (-0.5, -0.6, -1.0)
    rgb_fill: float = 0.3
    rgb_fill_dir: tuple[float, float, float] = (0.7, -0.1, -1.0)
    rgb_exposure: float = 1.0
    rgb_gamma: float = 2.2
    rgb_background: float = 0.05
    rgb_noise: float = 2.0
    annotator_noise_px: float = 1.0
    landmark_tol_mm: float = 1.0

    def __post_init__(self) -> None:
        s = object.__setattr__
        for name in ("ambient", "projector_peak", "read_noise", "shot_noise_k", "rgb_ambient", "rgb_key",
                     "rgb_fill", "rgb_background", "rgb_noise", "annotator_noise_px"):
            s(self, name, _num(getattr(self, name), name, 0.0))
        for name in ("projector_gamma", "camera_gamma", "reference_distance_mm", "rgb_exposure",
                     "rgb_gamma", "landmark_tol_mm", "shadow_eps_mm"):
            s(self, name, _num(getattr(self, name), name, 0.0, lo_open=True))
        for name in ("rgb_key_dir", "rgb_fill_dir"):
            v = as_array(getattr(self, name), name, (3,), finite=True)
            if np.linalg.norm(v) < 1e-9:
                raise ValueError(f"{name}: must be a non-zero direction, got {tuple(v)}")
            s(self, name, tuple(float(x) for x in v))

    def without_noise(self) -> "PhotometryParams":
        """A copy with read, shot, RGB and annotator noise set to zero."""
        return replace(self, read_noise=0.0, shot_noise_k=0.0, rgb_noise=0.0, annotator_noise_px=0.0)


# -- scene -------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SceneMesh:
    """A triangle mesh to scan, in world millimetres.

    Attributes
    ----------
    vertices : (n, 3) float64
        Vertex positions in mm (world / head frame), finite.
    faces : (m, 3) int64
        Vertex indices, counter-clockwise seen from outside (outward normals by the
        right-hand rule); ``m >= 1``.
    albedo_ir : (n,) float32
        IR albedo in [0, 1] (skin is about 0.7).
    albedo_rgb : (n, 3) float32 or None
        RGB albedo in [0, 1]; None means constant grey 0.6.
    landmarks : (106, 3) float64 or None
        The 106 landmarks in mm (on the surface), NaN rows for unknown ones; None means
        all unknown.

    Raises
    ------
    ValueError
        Naming the field: wrong shape, NaN or infinite vertices, no faces, face indices
        out of range, albedo outside [0, 1], partially NaN or infinite landmark rows.
    """

    vertices: np.ndarray
    faces: np.ndarray
    albedo_ir: np.ndarray
    albedo_rgb: np.ndarray | None = None
    landmarks: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = object.__setattr__
        V = as_array(self.vertices, "vertices", (None, 3), finite=True)
        if V.shape[0] < 3:
            raise ValueError(f"vertices: need at least 3 vertices, got {V.shape[0]}")
        F = np.asarray(self.faces)
        if F.dtype.kind not in "iu":
            raise ValueError(f"faces: must be an integer array, got dtype {F.dtype}")
        F = as_array(F, "faces", (None, 3), dtype=np.int64)
        if F.shape[0] == 0:
            raise ValueError("faces: the mesh has no faces, got shape (0, 3)")
        lo, hi = int(F.min()), int(F.max())
        if lo < 0 or hi >= V.shape[0]:
            raise ValueError(f"faces: indices must be in [0, {V.shape[0] - 1}], got range [{lo}, {hi}]")
        a_ir = as_array(self.albedo_ir, "albedo_ir", (V.shape[0],), dtype=np.float32, finite=True)
        if a_ir.size and (a_ir.min() < 0 or a_ir.max() > 1):
            raise ValueError(f"albedo_ir: values must be in [0, 1], got range [{a_ir.min()}, {a_ir.max()}]")
        a_rgb = None
        if self.albedo_rgb is not None:
            a_rgb = as_array(self.albedo_rgb, "albedo_rgb", (V.shape[0], 3), dtype=np.float32, finite=True)
            if a_rgb.min() < 0 or a_rgb.max() > 1:
                raise ValueError(f"albedo_rgb: values must be in [0, 1], got range [{a_rgb.min()}, {a_rgb.max()}]")
        if self.landmarks is None:
            lm = np.full((N_LANDMARKS, 3), np.nan)
        else:
            lm = as_array(self.landmarks, "landmarks", (N_LANDMARKS, 3))
            nan_rows = np.isnan(lm)
            if np.any(np.isinf(lm)) or np.any(nan_rows.any(axis=1) & ~nan_rows.all(axis=1)):
                raise ValueError("landmarks: rows must be finite or entirely NaN (unknown)")
        for name, arr in (("vertices", V), ("faces", F), ("albedo_ir", a_ir), ("albedo_rgb", a_rgb),
                          ("landmarks", lm)):
            if arr is not None:
                if arr is getattr(self, name):  # never freeze the caller's array
                    arr = arr.copy()
                arr.setflags(write=False)
            s(self, name, arr)


# -- results -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ViewGroundTruth:
    """Exact per-pixel ground truth of one view (IR camera pixels unless stated).

    Attributes
    ----------
    hit : (H, W) bool
        The pixel's ray hits the mesh.
    points : (H, W, 3) float64
        First hit in world mm (on the pixel's undistorted ray); NaN where no hit.
    depth : (H, W) float32
        IR camera-frame z of the hit in mm; NaN where no hit.
    projector_x : (H, W) float64
        Projector column coordinate ``x_p`` of the hit (pixel centres at integers); NaN
        where no hit or the hit is behind the projector. Defined also outside the
        projector image (see ``lit``).
    lit : (H, W) bool
        The projector sees the hit: inside the projector image, facing the projector
        and not shadowed (``s(X) = 1`` of the image model, and ``n . l > 0``).
    albedo : (H, W) float32
        IR albedo ``rho`` at the hit; NaN where no hit.
    modulation : (H, W) float32
        The clean modulation ``B = rho * E_proj / 2`` in (linear) grey levels; 0 where
        the pixel carries no fringe signal (no hit, or not lit).
    rgb_depth : (H_rgb, W_rgb) float32
        RGB camera-frame z of the first hit of each RGB pixel in mm; NaN where none.
    """

    hit: np.ndarray
    points: np.ndarray
    depth: np.ndarray
    projector_x: np.ndarray
    lit: np.ndarray
    albedo: np.ndarray
    modulation: np.ndarray
    rgb_depth: np.ndarray


@dataclass(frozen=True, eq=False)
class ViewRender:
    """What one camera group captures, plus its ground truth.

    Attributes
    ----------
    fringe : (L, N, H, W) uint8
        Fringe image of frequency index ``i`` and step ``n`` at ``fringe[i, n]``.
    rgb : (H_rgb, W_rgb, 3) uint8
        The RGB image.
    landmarks_px : (106, 2) float64
        Annotated ``(x, y)`` RGB pixel coordinates (GT projection + annotator noise);
        NaN rows where not visible.
    landmark_visible : (106,) bool
    gt : ViewGroundTruth
    """

    fringe: np.ndarray
    rgb: np.ndarray
    landmarks_px: np.ndarray
    landmark_visible: np.ndarray
    gt: ViewGroundTruth


# -- image model pieces ----------------------------------------------------------------------

def pattern_radiance(theta: np.ndarray, projector_gamma: float) -> np.ndarray:
    """Emitted relative radiance ``e`` of the 8-bit gamma pre-compensated pattern.

    ``p = 0.5 + 0.5 cos(theta)``, ``e = (round(255 * p**(1/gamma_p)) / 255) ** gamma_p``
    (``docs/image-model.md``, Fringe patterns), evaluated in float32.

    Parameters
    ----------
    theta : (...) float
        Pattern phase ``phi_f(x_p) + 2 pi n / N`` in radians. float32 input is used as
        is (keep it small, e.g. reduced modulo ``2 pi``); any other dtype is reduced
        modulo ``2 pi`` in float64 first.
    projector_gamma : float
        ``gamma_p`` (> 0).

    Returns
    -------
    (...) float32
        ``e`` in [0, 1].
    """
    g = _num(projector_gamma, "projector_gamma", 0.0, lo_open=True)
    th = np.asarray(theta)
    if th.dtype != np.float32:
        th = np.mod(th.astype(np.float64), 2.0 * np.pi).astype(np.float32)  # reduce before float32
    p = np.cos(th)
    p *= np.float32(0.5)
    p += np.float32(0.5)
    if g != 1.0:
        np.power(p, np.float32(1.0 / g), out=p)
    p *= np.float32(255.0)
    code = np.rint(p).astype(np.uint8)
    lut = ((np.arange(256, dtype=np.float64) / 255.0) ** g).astype(np.float32)
    return lut[code]


# -- internal: prepared scene, rays, surface queries --------------------------------------------

class _Hits:
    """First hits of one camera's pixel rays (only the pixels that hit)."""

    __slots__ = ("idx", "points", "normals", "fid", "w", "t", "dirs_cam")

    def __init__(self, idx, points, normals, fid, w, t, dirs_cam):
        self.idx = idx            # (k,) flat pixel indices (row-major)
        self.points = points      # (k, 3) float64 world hit points (None when not exact)
        self.normals = normals    # (k, 3) float32 unit shading normals
        self.fid = fid            # (k,) int64 ids of the hit triangles
        self.w = w                # (k, 3) float32 barycentric weights
        self.t = t                # (k,) float64 distance along the unit ray (mm)
        self.dirs_cam = dirs_cam  # (k, 3) unit camera-frame ray directions (float32 when not exact)


class _Prepared:
    """A SceneMesh with its ray-casting structure and vertex normals (built once per scan)."""

    def __init__(self, scene: SceneMesh, nthreads: int):
        self.scene = scene
        self.nthreads = nthreads
        V, F = scene.vertices, scene.faces
        self.rc = o3d.t.geometry.RaycastingScene(nthreads=nthreads)
        # Keep the buffers alive for as long as the scene (Open3D may share their memory).
        self._v32 = np.ascontiguousarray(V, dtype=np.float32)
        self._f32 = np.ascontiguousarray(F, dtype=np.uint32)
        self.rc.add_triangles(o3d.core.Tensor.from_numpy(self._v32), o3d.core.Tensor.from_numpy(self._f32))
        # Area-weighted vertex normals (the cross product's length is twice the area).
        v0 = V[F[:, 0]]
        fn = np.cross(V[F[:, 1]] - v0, V[F[:, 2]] - v0)
        vn = np.zeros_like(V)
        n = V.shape[0]
        for j in range(3):
            for c in range(3):
                vn[:, c] += np.bincount(F[:, j], weights=fn[:, c], minlength=n)
        norm = np.linalg.norm(vn, axis=1, keepdims=True)
        np.divide(vn, norm, out=vn, where=norm > 0)
        # Per-face tables: one contiguous gather per hit instead of three per quantity.
        self.face_normals = fn                                   # (m, 3) float64, |fn| = 2 area
        self.face_planes = np.concatenate([fn, np.einsum("ij,ij->i", fn, v0)[:, None]], axis=1)  # (m, 4)
        self.face_vn = vn.astype(np.float32)[F]                  # (m, 3, 3) vertex normals
        self.face_albedo_ir = scene.albedo_ir[F]                 # (m, 3)
        self.face_albedo_rgb = None if scene.albedo_rgb is None else scene.albedo_rgb[F]  # (m, 3, 3)
        self._rays: np.ndarray | None = None

    def _ray_buffer(self, n: int) -> np.ndarray:
        if self._rays is None or self._rays.shape[0] != n:
            self._rays = np.empty((n, 6), dtype=np.float32)
        return self._rays

    def cast(self, origin: np.ndarray, dirs: np.ndarray):
        """First hits of the rays ``origin + t * dirs`` (``dirs`` (k, 3), unit length)."""
        rays = np.empty((dirs.shape[0], 6), dtype=np.float32)
        rays[:, :3] = origin
        rays[:, 3:] = dirs
        return self._cast(rays)

    def _cast(self, rays: np.ndarray):
        ans = self.rc.cast_rays(o3d.core.Tensor.from_numpy(rays), nthreads=self.nthreads)
        return ans["t_hit"].numpy(), ans["primitive_ids"].numpy(), ans["primitive_uvs"].numpy()

    def cast_camera(self, cam: Camera, cache: dict | None, exact: bool) -> _Hits:
        """Cast every pixel ray of ``cam`` (undistorted pixel centres, row-major).

        ``exact``: float64 rays (1e-10 from ``pixel_rays``) and hit points refined in
        float64 (the IR ground truth); otherwise Open3D's float32 hits (RGB).
        """
        d64, d32 = _camera_rays(cam, cache, exact)
        rays = self._ray_buffer(d32.shape[0])
        rays[:, :3] = cam.center
        np.matmul(d32, cam.R.astype(np.float32), out=rays[:, 3:])  # camera -> world (R^T on rows)
        t, pid, uv = self._cast(rays)
        idx = np.flatnonzero(np.isfinite(t))
        fid, w, nrm = self.surface(pid[idx], uv[idx])
        th = t[idx].astype(np.float64)
        if not exact:  # RGB: no world points needed
            return _Hits(idx, None, nrm, fid, w, th, d32[idx])
        dc = d64[idx]
        dw = dc @ cam.R
        C = cam.center
        th = self.refine(C, dw, th, fid)
        return _Hits(idx, C + th[:, None] * dw, nrm, fid, w, th, dc)

    def occluded(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Whether anything is hit on ``origin + t * dirs`` for ``t`` in (0, 1)."""
        rays = np.empty((dirs.shape[0], 6), dtype=np.float32)
        rays[:, :3] = origin
        rays[:, 3:] = dirs
        occ = self.rc.test_occlusions(o3d.core.Tensor.from_numpy(rays), tnear=0.0, tfar=1.0,
                                      nthreads=self.nthreads)
        return occ.numpy().astype(bool)

    def surface(self, pid: np.ndarray, uv: np.ndarray):
        """Face ids, barycentric weights and unit shading normals at hits.

        The shading normal is the barycentric interpolation of the vertex normals
        (``primitive_uvs`` ``(u, v)`` weight vertices 1 and 2, ``1 - u - v`` vertex 0).
        """
        fid = pid.astype(np.int64)
        w = np.empty((pid.shape[0], 3), dtype=np.float32)
        w[:, 1:] = uv
        w[:, 0] = 1.0 - uv[:, 0] - uv[:, 1]
        nrm = self.interpolate(self.face_vn, fid, w)
        ln = np.sqrt(np.einsum("ij,ij->i", nrm, nrm))
        bad = ln < 1e-6
        if np.any(bad):  # degenerate interpolation: fall back to the triangle normal
            fn = self.face_normals[fid[bad]]
            nrm[bad] = fn / np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-300)
            ln[bad] = 1.0
        nrm /= ln[:, None]
        return fid, w, nrm

    @staticmethod
    def interpolate(table: np.ndarray, fid: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Barycentric interpolation of a per-face vertex table ((m, 3) or (m, 3, c))."""
        g = table[fid]
        if g.ndim == 2:
            out = g[:, 0] * w[:, 0]
            out += g[:, 1] * w[:, 1]
            out += g[:, 2] * w[:, 2]
            return out
        out = g[:, 0] * w[:, 0:1]
        out += g[:, 1] * w[:, 1:2]
        out += g[:, 2] * w[:, 2:3]
        return out

    def refine(self, origin: np.ndarray, dirs: np.ndarray, t: np.ndarray, fid: np.ndarray) -> np.ndarray:
        """Float64 ray-plane intersection with the hit triangles (falls back to ``t``).

        Open3D intersects in float32 (errors up to ~5 um at grazing incidence); the
        float64 solution puts the GT point on the plane of its triangle and on the exact
        float64 pixel ray.
        """
        pl = self.face_planes[fid]  # (k, 4): n, n . v0
        n = pl[:, :3]
        den = np.einsum("ij,ij->i", n, dirs)
        num = pl[:, 3] - n @ origin
        ok = np.abs(den) > 1e-9 * np.sqrt(np.einsum("ij,ij->i", n, n))
        tr = np.where(ok, num / np.where(ok, den, 1.0), t)
        # Keep the float64 solution only where it agrees with Open3D's float32 hit.
        return np.where(np.abs(tr - t) < 1e-2, tr, t)


def _camera_rays(cam: Camera, cache: dict | None, exact: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """Unit camera-frame directions through every undistorted pixel centre, row-major.

    The exact inverse of the lens model is evaluated with ``kernels.camera.pixel_rays`` on
    a coarse grid (every 4th pixel plus the last row/column) and bilinearly interpolated
    to every pixel (max error ~5e-8 in normalised units, ~1e-4 px: float32 precision).
    With ``exact`` the result is polished by fixed-point iteration on
    ``kernels.camera.distort`` to a residual below 1e-10 (~2e-7 px); if the polish does
    not converge the exact ``pixel_rays`` is used for all pixels.

    Returns
    -------
    d64 : (H*W, 3) float64 or None
        Polished directions (None unless ``exact``).
    d32 : (H*W, 3) float32
        The directions for Open3D.

    Both are read-only and cached per intrinsics in ``cache``.
    """
    key = (cam.width, cam.height, cam.K.tobytes(), cam.dist.tobytes(), bool(exact))
    if cache is not None and key in cache:
        return cache[key]
    W, H, K = cam.width, cam.height, cam.K
    ident = Camera(cam.name, W, H, K, cam.dist)  # identity pose: world frame = camera frame
    xs = np.arange(W, dtype=np.float64)
    ys = np.arange(H, dtype=np.float64)
    yd = (ys - K[1, 2]) / K[1, 1]
    xn = np.empty((H, W, 2), dtype=np.float64)
    xn[:, :, 1] = yd[:, None]
    xn[:, :, 0] = (xs[None, :] - K[0, 2] - K[0, 1] * yd[:, None]) / K[0, 0]
    xn = xn.reshape(-1, 2)
    if cam.has_distortion:
        xdt = xn  # target: distorted normalised coordinates of every pixel centre
        step = 4
        cx_ = np.unique(np.r_[np.arange(0, W, step), W - 1]).astype(np.float64)
        cy_ = np.unique(np.r_[np.arange(0, H, step), H - 1]).astype(np.float64)
        grid = np.stack(np.meshgrid(cx_, cy_), axis=-1).reshape(-1, 2)
        _, dc = pixel_rays(ident, grid)
        coarse = (dc[:, :2] / dc[:, 2:3]).reshape(cy_.size, cx_.size, 2)
        # Separable bilinear interpolation to every pixel.
        ix = np.clip(np.searchsorted(cx_, xs, side="right") - 1, 0, cx_.size - 2)
        wx = ((xs - cx_[ix]) / (cx_[ix + 1] - cx_[ix]))[None, :, None]
        rows = coarse[:, ix] * (1.0 - wx) + coarse[:, ix + 1] * wx  # (hy, W, 2)
        iy = np.clip(np.searchsorted(cy_, ys, side="right") - 1, 0, cy_.size - 2)
        wy = ((ys - cy_[iy]) / (cy_[iy + 1] - cy_[iy]))[:, None, None]
        xn = (rows[iy] * (1.0 - wy) + rows[iy + 1] * wy).reshape(-1, 2)
        if exact:
            converged = False
            prev = np.inf
            for _ in range(12):
                r = distort(xn, cam.dist)
                r -= xdt
                err = float(np.max(np.abs(r)))
                if err < 1e-10:
                    converged = True
                    break
                if not err < 0.5 * prev:
                    break
                prev = err
                xn -= r
            if not converged:
                _, d = pixel_rays(ident, np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2))
                xn = d[:, :2] / d[:, 2:3]
    d = np.empty((H * W, 3), dtype=np.float64)
    d[:, :2] = xn
    d[:, 2] = 1.0
    d /= np.sqrt(np.einsum("ij,ij->i", d, d))[:, None]
    d32 = d.astype(np.float32)
    d64 = d if exact else None
    for a in (d64, d32):
        if a is not None:
            a.setflags(write=False)
    if cache is not None:
        cache[key] = (d64, d32)
    return d64, d32


def _finalize(x: np.ndarray, read_noise: float, shot_k: float, gen: np.random.Generator | None) -> np.ndarray:
    """Add ``sqrt(read^2 + k I) * z`` noise to ``x >= 0`` in place, round and clip to uint8."""
    if gen is not None and (read_noise > 0 or shot_k > 0):
        sd = x * np.float32(shot_k)
        sd += np.float32(read_noise * read_noise)
        np.sqrt(sd, out=sd)
        sd *= gen.standard_normal(x.shape, dtype=np.float32)
        x += sd
    np.rint(x, out=x)
    np.clip(x, 0.0, 255.0, out=x)
    return x.astype(np.uint8)


# -- rendering ---------------------------------------------------------------------------------

def _check_nthreads(nthreads) -> int:
    if isinstance(nthreads, bool) or not isinstance(nthreads, (int, np.integer)) or nthreads < 0:
        raise ValueError(f"nthreads: must be an integer >= 0 (0 = automatic), got {nthreads!r}")
    return int(nthreads)


def _check_args(scene, fringe, photometry) -> None:
    if not isinstance(scene, SceneMesh):
        raise ValueError(f"scene: expected a SceneMesh, got {type(scene).__name__}")
    if not isinstance(fringe, FringeParams):
        raise ValueError(f"fringe: expected FringeParams, got {type(fringe).__name__}")
    if not isinstance(photometry, PhotometryParams):
        raise ValueError(f"photometry: expected PhotometryParams, got {type(photometry).__name__}")


def _projector_signal(prep: _Prepared, pj: Camera, hits: _Hits, ph: PhotometryParams):
    """``x_p``, ``s(X) * [n.l > 0]`` and ``E_proj`` of every hit (image model, Camera signal)."""
    X, nrm = hits.points, hits.normals
    Xp = X @ pj.R.T
    Xp += pj.t
    zp = Xp[:, 2]
    front = zp > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        xp = np.where(front, (pj.K[0, 0] * Xp[:, 0] + pj.K[0, 1] * Xp[:, 1]) / zp + pj.K[0, 2], np.nan)
        yp = np.where(front, pj.K[1, 1] * Xp[:, 1] / zp + pj.K[1, 2], np.nan)
    Cp = pj.center
    to_p = Cp - X
    dist = np.sqrt(np.einsum("ij,ij->i", to_p, to_p))
    cos_i = np.einsum("ij,ij->i", nrm, to_p) / dist
    inside = front & (xp >= -0.5) & (xp <= pj.width - 0.5) & (yp >= -0.5) & (yp <= pj.height - 0.5)
    cand = np.flatnonzero(inside & (cos_i > 0) & (dist > ph.shadow_eps_mm))
    lit = np.zeros(X.shape[0], dtype=bool)
    if cand.size:
        # s(X): rays from C_p with t = 1 at distance |X - C_p| - eps towards X.
        dc = dist[cand]
        sdir = to_p[cand]
        sdir *= ((ph.shadow_eps_mm - dc) / dc)[:, None]
        lit[cand] = ~prep.occluded(Cp, sdir)
    E = np.zeros(X.shape[0], dtype=np.float32)
    # E_proj = P max(0, n.l) (d0 / |X - C_p|)^2 s(X)
    E[lit] = ph.projector_peak * cos_i[lit] * (ph.reference_distance_mm / dist[lit]) ** 2
    return xp, lit, E


def _render_fringe(prep: _Prepared, group: Group, fringe: FringeParams, ph: PhotometryParams,
                   gen: np.random.Generator, cache: dict | None):
    ir, pj = group.ir, group.projector
    H, W = ir.height, ir.width
    hits = prep.cast_camera(ir, cache, exact=True)
    idx = hits.idx
    rho = np.clip(prep.interpolate(prep.face_albedo_ir, hits.fid, hits.w), 0.0, 1.0)
    xp, lit, E = _projector_signal(prep, pj, hits, ph)
    li = np.flatnonzero(lit)
    lit_pix = idx[li]
    bE = rho[li] * E[li]  # rho * E_proj of lit hits

    # I = rho (A_amb + E_proj e_{f,n}(x_p)), camera response, noise, 8 bit.
    base = np.zeros(H * W, dtype=np.float32)
    base[idx] = rho * np.float32(ph.ambient)
    u = (xp[li] + 0.5) / pj.width  # phi_f(x_p) = 2 pi f u
    L, N = fringe.levels, fringe.steps
    out = np.empty((L, N, H, W), dtype=np.uint8)
    fgen = gen if ph.read_noise > 0 or ph.shot_noise_k > 0 else None
    for i, f in enumerate(fringe.frequencies):
        phase = np.mod(2.0 * np.pi * f * u, 2.0 * np.pi)  # reduced in float64, then float32
        for n in range(N):
            theta = (phase + 2.0 * np.pi * n / N).astype(np.float32)
            img = base.copy()
            img[lit_pix] += bE * pattern_radiance(theta, ph.projector_gamma)
            if ph.camera_gamma != 1.0:
                img *= np.float32(1.0 / 255.0)
                np.power(img, np.float32(1.0 / ph.camera_gamma), out=img)
                img *= np.float32(255.0)
            out[i, n] = _finalize(img, ph.read_noise, ph.shot_noise_k, fgen).reshape(H, W)

    def full(values, fill, dtype, tail=()):
        a = np.full((H * W,) + tail, fill, dtype=dtype)
        a[idx] = values
        return a.reshape((H, W) + tail)

    modulation = np.zeros(H * W, dtype=np.float32)
    modulation[lit_pix] = 0.5 * bE  # B = rho E_proj / 2
    lit_full = np.zeros(H * W, dtype=bool)
    lit_full[lit_pix] = True
    gt = dict(
        hit=full(True, False, bool),
        points=full(hits.points, np.nan, np.float64, (3,)),
        depth=full(hits.t * hits.dirs_cam[:, 2], np.nan, np.float32),
        projector_x=full(xp, np.nan, np.float64),
        lit=lit_full.reshape(H, W),
        albedo=full(rho, np.nan, np.float32),
        modulation=modulation.reshape(H, W),
    )
    return out, gt


def _render_rgb(prep: _Prepared, group: Group, ph: PhotometryParams, gen: np.random.Generator,
                cache: dict | None):
    cam = group.rgb
    H, W = cam.height, cam.width
    hits = prep.cast_camera(cam, cache, exact=False)
    idx, nrm = hits.idx, hits.normals
    rgb_depth = np.full(H * W, np.nan, dtype=np.float32)
    rgb_depth[idx] = hits.t * hits.dirs_cam[:, 2]
    if prep.face_albedo_rgb is None:
        alb = np.full((idx.size, 3), 0.6, dtype=np.float32)
    else:
        alb = np.clip(prep.interpolate(prep.face_albedo_rgb, hits.fid, hits.w), 0.0, 1.0)
    shade = np.full(idx.size, ph.rgb_ambient, dtype=np.float32)
    for strength, d in ((ph.rgb_key, ph.rgb_key_dir), (ph.rgb_fill, ph.rgb_fill_dir)):
        lw = ((np.asarray(d, float) / np.linalg.norm(d)) @ cam.R).astype(np.float32)  # to world
        shade += np.float32(strength) * np.maximum(nrm @ lw, np.float32(0.0))
    lin = np.full((H * W, 3), ph.rgb_background, dtype=np.float32)
    lin[idx] = alb * shade[:, None]
    lin *= np.float32(ph.rgb_exposure)
    np.clip(lin, 0.0, 1.0, out=lin)
    np.power(lin, np.float32(1.0 / ph.rgb_gamma), out=lin)
    lin *= np.float32(255.0)
    if ph.rgb_noise > 0:
        lin += np.float32(ph.rgb_noise) * gen.standard_normal(lin.shape, dtype=np.float32)
    rgb = _finalize(lin, 0.0, 0.0, None).reshape(H, W, 3)
    return rgb, rgb_depth.reshape(H, W)


def _landmarks(prep: _Prepared, group: Group, ph: PhotometryParams, gen: np.random.Generator):
    cam = group.rgb
    lm = prep.scene.landmarks
    # Draw the annotator noise for all 106 rows so the stream does not depend on visibility.
    noise = gen.standard_normal((N_LANDMARKS, 2)) * ph.annotator_noise_px
    visible = np.zeros(N_LANDMARKS, dtype=bool)
    out = np.full((N_LANDMARKS, 2), np.nan)
    known = np.flatnonzero(np.all(np.isfinite(lm), axis=1))
    if known.size == 0:
        return out, visible
    P = lm[known]
    px, z = project(cam, P)
    inside = ((z > 0) & (px[:, 0] >= -0.5) & (px[:, 0] <= cam.width - 0.5)
              & (px[:, 1] >= -0.5) & (px[:, 1] <= cam.height - 0.5))
    C = cam.center
    v = P - C
    dist = np.linalg.norm(v, axis=1)
    d = v / np.maximum(dist, 1e-12)[:, None]
    t, pid, uv = prep.cast(C, d)
    ok = inside & np.isfinite(t) & (np.abs(t.astype(np.float64) - dist) <= ph.landmark_tol_mm)
    facing = np.zeros(known.size, dtype=bool)
    if np.any(ok):
        _, _, nrm = prep.surface(pid[ok], uv[ok])
        facing[ok] = np.einsum("ij,ij->i", nrm.astype(np.float64), d[ok]) < 0  # normal towards camera
    vis = ok & facing
    visible[known[vis]] = True
    # an annotator clicks inside the image: the noisy position stays within its pixel bounds
    lo, hi = np.array([-0.5, -0.5]), np.array([cam.width - 0.5, cam.height - 0.5])
    out[known[vis]] = np.clip(px[vis] + noise[known[vis]], lo, hi)
    return out, visible


def _render(prep: _Prepared, group: Group, fringe: FringeParams, ph: PhotometryParams, rng,
            cache: dict | None) -> ViewRender:
    gen = as_rng(rng)
    g_fringe, g_rgb, g_lm = (np.random.default_rng(s) for s in
                             np.random.SeedSequence(gen.integers(0, 2**63, size=4)).spawn(3))
    images, gt = _render_fringe(prep, group, fringe, ph, g_fringe, cache)
    rgb, rgb_depth = _render_rgb(prep, group, ph, g_rgb, cache)
    lm_px, lm_vis = _landmarks(prep, group, ph, g_lm)
    vgt = ViewGroundTruth(rgb_depth=rgb_depth, **gt)
    for a in (images, rgb, lm_px, lm_vis, *(getattr(vgt, k) for k in vgt.__dataclass_fields__)):
        a.setflags(write=False)
    return ViewRender(fringe=images, rgb=rgb, landmarks_px=lm_px, landmark_visible=lm_vis, gt=vgt)


def render_view(scene: SceneMesh, group: Group, fringe: FringeParams | None = None,
                photometry: PhotometryParams | None = None, rng=None, *, nthreads: int = 0) -> ViewRender:
    """Render what one camera group captures of ``scene``, with exact ground truth.

    Parameters
    ----------
    scene : SceneMesh
        The mesh in world mm.
    group : Group
        The (true) camera group; its IR camera renders the fringes, its RGB camera the
        colour image and the landmarks.
    fringe : FringeParams, optional
        Pattern sequence (default ``FringeParams()``).
    photometry : PhotometryParams, optional
        Photometric constants (default ``PhotometryParams()``).
    rng : numpy.random.Generator or int or None
        Randomness of the noise; fringe, RGB and annotator noise use three independent
        child streams.
    nthreads : int, keyword-only
        Threads of Open3D's ray casting (0 = automatic).

    Returns
    -------
    ViewRender
        ``fringe`` (L, N, H, W) uint8, ``rgb`` (H_rgb, W_rgb, 3) uint8, ``landmarks_px``
        (106, 2) float64, ``landmark_visible`` (106,) bool, ``gt``; all arrays read-only.

    Raises
    ------
    ValueError
        When an argument has the wrong type (the message names it).
    """
    fringe = FringeParams() if fringe is None else fringe
    photometry = PhotometryParams() if photometry is None else photometry
    _check_args(scene, fringe, photometry)
    if not isinstance(group, Group):
        raise ValueError(f"group: expected a Group, got {type(group).__name__}")
    prep = _Prepared(scene, _check_nthreads(nthreads))
    return _render(prep, group, fringe, photometry, rng, {})


def scan(scene: SceneMesh, rig: Rig, fringe: FringeParams | None = None,
         photometry: PhotometryParams | None = None, rng=None, *, nthreads: int = 0) -> dict[str, ViewRender]:
    """Render every group of the **true** rig.

    Parameters
    ----------
    scene : SceneMesh
    rig : Rig
        The true rig (:func:`kernels.synth.rig.build_rig`); calibration errors belong
        to the stored rig only and never affect the images.
    fringe : FringeParams, optional
    photometry : PhotometryParams, optional
    rng : int or numpy.random.Generator or None
        Top-level randomness. View ``name`` is rendered with
        ``kernels.synth.seeding.derive_rng(seed, "view", name)`` where ``seed`` is the
        int itself (or one draw of a Generator), so each view depends on the seed and its
        name only, not on the order or the set of groups.
    nthreads : int, keyword-only
        Threads of Open3D's ray casting (0 = automatic, 1 for one core).

    Returns
    -------
    dict of str to ViewRender
        Keyed by group name, in rig order.

    Raises
    ------
    ValueError
        When an argument has the wrong type (the message names it).
    """
    fringe = FringeParams() if fringe is None else fringe
    photometry = PhotometryParams() if photometry is None else photometry
    _check_args(scene, fringe, photometry)
    if not isinstance(rig, Rig):
        raise ValueError(f"rig: expected a Rig, got {type(rig).__name__}")
    prep = _Prepared(scene, _check_nthreads(nthreads))
    seed = root_entropy(rng)
    cache: dict = {}
    return {g.name: _render(prep, g, fringe, photometry, derive_rng(seed, "view", g.name), cache)
            for g in rig.groups}
