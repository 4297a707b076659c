"""One-call decoding of a view: wrapped phase -> unwrapping -> masks -> triangulation.

Paper section 3.1 ("Multi-View Scanning": N-step phase shifting gives a point cloud with
pixel-wise resolution). :func:`decode_view` chains the kernels of :mod:`kernels.phase`
and :mod:`kernels.triangulate` in a fused, vectorised float32 form: the full-image
passes are limited to the quadrature sums, the saturation test and the finest-level
modulation; everything else runs on the contiguous band of rows that holds surviving
pixels (contiguous 1-D slices; gathers, scatters and 2-D strided views are avoided
because they cost more than the work they would save), the coarse levels on 2x2 bins.
With numba installed, the default rig's configuration (N = 4) runs the same algorithm
as fused loops (:mod:`kernels._fast_decode`, ``engine="auto"``); the numpy code here is
the reference the tests compare it with. Every threshold lives in :class:`DecodeParams`; see ``docs/decoding.md`` for the
algorithm, the reason codes and why each default was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kernels.camera import Camera
from kernels.phase import (MaskFlag, check_frequencies, check_stack, level_sums,
                           relative_modulation_threshold)
from kernels.triangulate import _check_frame_range, ray_table

try:  # the fused loops (optional: the numpy path below is the reference)
    from kernels import _fast_decode as _fast
except ImportError:  # pragma: no cover - numba not installed
    _fast = None

_TWO_PI32 = np.float32(2.0 * np.pi)


@dataclass(frozen=True)
class DecodeParams:
    """Thresholds of :func:`decode_view` (defaults tuned on the default rig, see docs/decoding.md).

    Attributes
    ----------
    min_modulation : float
        Absolute threshold ``B_min`` (grey levels) on the finest-level modulation of the
        pixel (default 8: the phase noise there is ~0.3 rad, ~0.7 mm before smoothing;
        the fringe order of such pixels is protected by ``min_bin_snr``, not by this
        threshold). Under the image model ``B`` is the same at every frequency.
    relative_modulation : float
        Relative threshold as a fraction of the view's ``modulation_percentile``
        percentile of ``B`` (default 0.08; 0 disables it).
    modulation_percentile : float
        Percentile of the finest-level ``B`` over the view (default 99).
    percentile_stride : int
        The percentile is estimated on every ``stride``-th pixel (default 16).
    max_unwrap_residual : float
        Maximum ``|k_est - round(k_est)|`` (periods) at any unwrapping level (default
        0.25): a wrong order then needs a level error of more than 0.75 period.
    projector_margin_px : float
        Decoded columns closer than this to the projector border are rejected (default 2).
    min_sin_angle : float
        Minimum sine of the ray / projector-plane angle (default 0.05, ~2.9 degrees).
    depth_range : (float, float)
        Accepted IR-frame depth in mm (default 100..2000).
    confidence_modulation : float
        ``B_ref`` of :func:`kernels.triangulate.point_confidence` (default 50 grey levels).
    confidence_sin_angle : float
        ``sin_ref`` of the confidence (default 0.34, ~20 degrees: the rig's nominal angle).
    coarse_bin : int
        1 or 2 (default): the coarse levels (all but the finest) are decoded on 2x2 bins
        (sums of the quadrature sums: a complex box filter). Only the fringe order of the
        finest level depends on them; binning halves their phase noise, which makes the
        order ~2x more robust at low modulation, and divides their cost by 4.
    coarse_agreement : float
        Coherence guard of the bins of the last coarse level (the one that selects the
        finest fringe order): a bin whose surviving pixels' phasors ``z`` give
        ``|sum z|^2 < coarse_agreement * n * sum |z|^2`` is rejected
        (``UNWRAP_INCONSISTENT``). The ratio is 1 for equal phasors, ~0.99 for the noise
        and modulation gradients of a smooth surface, and drops when the bin straddles
        a depth discontinuity: two phases, or a dim pixel next to bright ones whose
        phase it would inherit (default 0.9).
    min_bin_snr : float
        A bin's coarse phases are trusted only when the sum of the modulation of its
        surviving pixels is at least ``min_bin_snr * sqrt(n)`` (grey levels, default
        22): then their phase noise is below ~0.1 rad at the default camera noise
        (sigma ~ 3-4 grey levels), so a wrong fringe order (an error of more than 0.75
        period after the x8 frequency step) is a > 5.7 sigma event. Failing pixels are
        ``LOW_MODULATION``.
    smooth_filter : int
        Odd box size of the mean of the decoded projector column over valid neighbours
        (default 3; 1 disables): divides the depth noise by up to ``smooth_filter``.
        Pixels whose window holds an invalid pixel or deviates from the pixel's own
        value by more than ``smooth_max_dev_px`` (a depth discontinuity) keep their
        unsmoothed value.
    smooth_max_dev_px : float
        Deviation threshold of the smoothing in projector pixels (default 1.5: about 3x
        the raw noise at the lowest accepted modulation, and a bound on the bias the mean
        can add next to a small depth step).
    edge_jump : float
        A pixel whose projector column has a second difference (along a row or a column,
        over surviving pixels) above ``edge_jump`` finest periods (default 0.4, i.e. 8
        projector pixels for ``W_p / f_max = 20``) is ``DISCONTINUITY``: on a continuous
        surface the column is locally linear in the pixel position (second difference ~
        noise, < 1 px), while a pixel decoded a whole period off, or a depth step, gives
        a second difference of the order of a period. 0 disables.
    edge_step : float
        Two surviving 4-neighbours whose columns differ by more than ``edge_step``
        periods (default 0.75) are both ``DISCONTINUITY`` (also where a second
        difference cannot be formed, e.g. at a silhouette); neighbouring columns differ
        by 0.7 px at the default full resolution, ~3 px at 320 x 256. 0 disables.
    """

    min_modulation: float = 8.0
    relative_modulation: float = 0.08
    modulation_percentile: float = 99.0
    percentile_stride: int = 16
    max_unwrap_residual: float = 0.25
    projector_margin_px: float = 2.0
    min_sin_angle: float = 0.05
    depth_range: tuple[float, float] = (100.0, 2000.0)
    confidence_modulation: float = 50.0
    confidence_sin_angle: float = 0.34
    coarse_bin: int = 2
    coarse_agreement: float = 0.9
    min_bin_snr: float = 22.0
    edge_jump: float = 0.4
    edge_step: float = 0.75
    smooth_filter: int = 3
    smooth_max_dev_px: float = 1.5

    def __post_init__(self):
        for name in ("min_modulation", "confidence_modulation", "confidence_sin_angle"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"DecodeParams.{name}: must be a finite number > 0, got {v}")
        if not (0 <= self.relative_modulation <= 1):
            raise ValueError(f"DecodeParams.relative_modulation: must be in [0, 1], got {self.relative_modulation}")
        if not (0 < self.modulation_percentile <= 100):
            raise ValueError(f"DecodeParams.modulation_percentile: must be in (0, 100], got {self.modulation_percentile}")
        if int(self.percentile_stride) < 1:
            raise ValueError(f"DecodeParams.percentile_stride: must be >= 1, got {self.percentile_stride}")
        if not (0 < self.max_unwrap_residual < 0.5):
            raise ValueError(f"DecodeParams.max_unwrap_residual: must be in (0, 0.5), got {self.max_unwrap_residual}")
        if not (self.projector_margin_px >= 0):
            raise ValueError(f"DecodeParams.projector_margin_px: must be >= 0, got {self.projector_margin_px}")
        _check_frame_range("world", self.min_sin_angle, self.depth_range)
        if self.coarse_bin not in (1, 2) or isinstance(self.coarse_bin, bool):
            raise ValueError(f"DecodeParams.coarse_bin: must be 1 or 2, got {self.coarse_bin!r}")
        if not (self.min_bin_snr >= 0):
            raise ValueError(f"DecodeParams.min_bin_snr: must be >= 0, got {self.min_bin_snr}")
        if not (0 <= self.coarse_agreement < 1):
            raise ValueError(f"DecodeParams.coarse_agreement: must be in [0, 1), got {self.coarse_agreement}")
        for name in ("edge_jump", "edge_step"):
            if not (getattr(self, name) >= 0):
                raise ValueError(f"DecodeParams.{name}: must be >= 0, got {getattr(self, name)}")
        v = self.smooth_filter
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or v % 2 == 0:
            raise ValueError(f"DecodeParams.smooth_filter: must be an odd integer >= 1, got {v!r}")
        if not (self.smooth_max_dev_px > 0):
            raise ValueError(f"DecodeParams.smooth_max_dev_px: must be > 0, got {self.smooth_max_dev_px}")


def _bin2(a: np.ndarray, W2: int) -> np.ndarray:
    """2x2 sums of a (h, W) image with even h (columns beyond ``W2`` are ignored)."""
    rows = a[0::2, :W2] + a[1::2, :W2]
    return rows[:, 0::2] + rows[:, 1::2]


def _unbin2(a: np.ndarray, W: int) -> np.ndarray:
    """Nearest upsampling of 2x2 bins back to (2 h, W) (an odd last column repeats its bin)."""
    up = np.repeat(np.repeat(a, 2, axis=1), 2, axis=0)
    if up.shape[1] < W:
        up = np.concatenate([up, up[:, -1:]], axis=1)
    return up


@dataclass(frozen=True)
class DecodedView:
    """Organised result of :func:`decode_view` (one IR camera).

    Attributes
    ----------
    points : (H, W, 3) float32
        Triangulated points in mm (world frame of the calibration, or IR frame), NaN
        where ``flags != 0``.
    valid : (H, W) bool
        ``flags == 0``.
    confidence : (H, W) float32
        In ``[0, 1]`` (:func:`kernels.triangulate.point_confidence`), NaN where invalid.
    flags : (H, W) uint8
        :class:`kernels.phase.MaskFlag` bits, 0 = valid.
    projector_x : (H, W) float32
        Decoded projector column, NaN where invalid.
    depth : (H, W) float32
        IR-frame depth ``z`` of each point in mm (the ray parameter of the
        triangulation; the point is ``C_ir + z R_ir^T (x_n, y_n, 1)``), NaN where invalid.
    modulation : (H, W) float32
        Finest-frequency modulation ``B`` (grey levels) of every pixel (a measurement,
        defined for masked pixels too).
    relative_threshold : float
        The relative modulation threshold used (grey levels).
    """

    points: np.ndarray
    valid: np.ndarray
    confidence: np.ndarray
    flags: np.ndarray
    projector_x: np.ndarray
    depth: np.ndarray
    modulation: np.ndarray
    relative_threshold: float

    @property
    def valid_fraction(self) -> float:
        """Fraction of the IR pixels with a point."""
        return float(self.valid.mean())


def decode_view(stack, ir: Camera, projector: Camera, frequencies: Sequence[float], n_steps: int,
                params: DecodeParams = DecodeParams(), *, frame: str = "world",
                engine: str = "auto") -> DecodedView:
    """Decode one view's fringe stack into an organised point cloud.

    Paper section 3.1 ("Multi-View Scanning", N-step phase shifting). Steps
    (``docs/decoding.md``): (1) saturation over all ``L x N`` images; (2) per-level
    quadrature sums (N = 4: exact int16 fast path); (3) finest-level modulation,
    absolute and relative thresholds; (4) on the band of rows holding surviving pixels:
    (a) coarse levels on 2x2 bins with a signal and a coherence guard, hierarchical
    temporal unwrapping; (b) the finest wrapped phase (``atan2``) and its fringe order
    with the consistency check; projector column and range check; (c) discontinuity
    check; (d) guarded 3-tap smoothing of the projector column; (5) closed-form ray /
    plane triangulation with the cached per-calibration ray table; (6) confidence and
    the organised outputs (NaN where invalid).

    Parameters
    ----------
    stack : (L, N, H, W) uint8
        Fringe images of the IR camera, ``stack[i, n]`` = frequency ``i``, step ``n``.
    ir : Camera
        The IR camera (``H x W``).
    projector : Camera
        The group's projector; ``projector.width`` is ``W_p`` of the phase formula.
    frequencies : sequence of float, length L
        Increasing, starting at 1.
    n_steps : int
        ``N >= 3`` phase steps per frequency.
    params : DecodeParams
    frame : {"world", "ir"}
        Frame of the output points.
    engine : {"auto", "numba", "numpy"}
        ``"numba"``: the fused loops of :mod:`kernels._fast_decode` (N = 4, L >= 2,
        ``coarse_bin = 2``, even image size; same flags and values as the numpy path
        except for the polynomial ``atan2``, max error 3.1e-7 rad); ``"numpy"``: the
        vectorised reference path; ``"auto"`` (default): numba when it applies.

    Returns
    -------
    DecodedView

    Raises
    ------
    ValueError
        ``stack`` of the wrong dtype / shape / counts / size; invalid ``frequencies`` or
        ``n_steps``; invalid or degenerate calibration (``ir``, ``projector``); bad ``frame``.
    """
    f = check_frequencies(frequencies)
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 3:
        raise ValueError(f"n_steps: expected an int >= 3, got {n_steps!r}")
    if not isinstance(params, DecodeParams):
        raise ValueError(f"params: expected a DecodeParams, got {type(params).__name__}")
    _check_frame_range(frame, params.min_sin_angle, params.depth_range)
    tab = ray_table(ir, projector)
    st = check_stack(stack, "stack", n_levels=f.size, n_steps=int(n_steps), shape_hw=(ir.height, ir.width))
    L, N, H, W = st.shape
    if engine not in ("auto", "numba", "numpy"):
        raise ValueError(f"engine: expected 'auto', 'numba' or 'numpy', got {engine!r}")
    fast_ok = _fast is not None and N == 4 and L >= 2 and params.coarse_bin == 2 and H % 2 == 0 and W % 2 == 0
    if engine == "numba" and not fast_ok:
        raise ValueError("engine: 'numba' needs numba, n_steps = 4, >= 2 frequencies, coarse_bin = 2 and an even "
                         f"image size (got N={N}, L={L}, coarse_bin={params.coarse_bin}, {H}x{W})")
    if engine != "numpy" and fast_ok:
        return _decode_view_fast(st, tab, projector.width, f, params, frame)
    HW = H * W
    Wp = projector.width
    f32 = np.float32

    # (1) saturation: any of the L*N images at 255
    sat = st.reshape(L * N, HW).max(axis=0) == 255

    # (2) quadrature sums of every level, full image (int16 for N = 4, float32 otherwise)
    sums = [(c.reshape(HW), s.reshape(HW)) for c, s in (level_sums(st[i], N) for i in range(L))]

    # (3) finest-level modulation B = 2 |C + iS| / N; absolute and relative thresholds.
    # Only the finest level is tested: under the image model B is the same at every
    # frequency (projector blur could only lower the finest); the unwrap check guards the rest.
    Cf = sums[-1][0].astype(f32)
    Sf = sums[-1][1].astype(f32)
    modulation = Cf * Cf
    tmp = Sf * Sf
    modulation += tmp
    np.sqrt(modulation, out=modulation)
    modulation *= f32(2.0 / N)
    rel = relative_modulation_threshold(modulation, params.modulation_percentile, params.relative_modulation,
                                        params.percentile_stride)
    flags = sat.view(np.uint8) * np.uint8(MaskFlag.SATURATED)
    flags |= (modulation < f32(params.min_modulation)).view(np.uint8)  # MaskFlag.LOW_MODULATION == 1
    if rel > 0:
        flags |= (modulation < f32(rel)).view(np.uint8) * np.uint8(MaskFlag.LOW_RELATIVE_MODULATION)
    passed = flags == 0

    # (4) the band of rows holding surviving pixels: contiguous slices, no gather / scatter.
    # With coarse binning the band starts on an even row and has an even height.
    rows = np.flatnonzero(passed.reshape(H, W).any(axis=1))
    r0, r1 = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)
    nb = params.coarse_bin if (L > 1 and H >= 2 and W >= 2) else 1
    if nb == 2 and r1 > r0:
        r0 -= r0 % 2
        r1 = min(r1 + (r1 - r0) % 2, H)
        if (r1 - r0) % 2:  # odd image height and the band reaches both ends
            nb = 1
    band = slice(r0 * W, r1 * W)
    hb = r1 - r0
    n = hb * W

    # (4a) coarse levels 0..L-2: wrapped phase (in periods, psi = -atan2(S, C) / 2 pi, the
    # image-model convention phi = atan2(-S, C)), 2x2 binned (complex sums), hierarchical
    # temporal unwrapping at the binned resolution, phasor-agreement guard per bin.
    coarse_bad = None
    coarse_weak = None
    if L > 1:
        W2 = W // 2 * 2
        if nb == 2:
            pb = passed[band].reshape(hb, W).astype(f32)
            count = _bin2(pb, W2)                                # surviving pixels per bin
            # signal of the bin: sum of B over its surviving pixels; its coarse phase noise
            # is ~ sigma_I sqrt(n) / sum B, so require sum B >= min_bin_snr sqrt(n)
            bsum = _bin2(modulation[band].reshape(hb, W) * pb, W2)
            bsum *= bsum
            weak = bsum < count * f32(params.min_bin_snr ** 2)
        Psi = None
        resid_c = None
        for i in range(L - 1):
            c = sums[i][0][band].reshape(hb, W)
            s = sums[i][1][band].reshape(hb, W)
            if nb == 2 and i < L - 2:
                # levels below the last coarse one tolerate mixing (their order step has a
                # margin of half a coarse period): plain bins of all pixels, binned first
                # (exact in int16 for N = 4) and converted at a quarter of the size
                c = _bin2(c, W2).astype(f32)
                s = _bin2(s, W2).astype(f32)
            else:
                c = c.astype(f32)
                s = s.astype(f32)
                if nb == 2:
                    c *= pb                                      # surviving pixels only
                    s *= pb
                    m2 = c * c
                    m2 += s * s
                    m2 = _bin2(m2, W2)                           # sum |z|^2
                    c = _bin2(c, W2)                             # sum z (modulation weighted)
                    s = _bin2(s, W2)
            p = np.arctan2(s, c)
            p *= f32(-1.0 / (2.0 * np.pi))  # (-0.5, 0.5] periods
            if nb == 2 and i == L - 2:
                # coherence guard on the level that selects the finest fringe order:
                # |sum z|^2 >= rho n sum |z|^2 holds when the surviving pixels of the bin
                # agree in phase and modulation; a bin across a depth discontinuity (two
                # phases, or a dim pixel next to bright ones whose phase it would inherit)
                # fails and its pixels are UNWRAP_INCONSISTENT
                c *= c
                s *= s
                c += s
                m2 *= count
                m2 *= f32(params.coarse_agreement)
                bad = c < m2
                coarse_bad = bad if coarse_bad is None else (coarse_bad | bad)
            if i == 0:
                p += p < 0  # level 0 (f = 1) is absolute: [0, 1) periods
                Psi = p
                continue
            k_est = Psi * f32(f[i] / f[i - 1])
            k_est -= p
            k = np.rint(k_est)
            k_est -= k
            np.abs(k_est, out=k_est)
            resid_c = k_est if resid_c is None else np.maximum(resid_c, k_est, out=resid_c)
            k += p
            Psi = k
        if resid_c is not None:
            bad = resid_c > f32(params.max_unwrap_residual)
            coarse_bad = bad if coarse_bad is None else (coarse_bad | bad)
        if nb == 2:
            Psi = _unbin2(Psi, W)
            coarse_bad = _unbin2(coarse_bad, W) if coarse_bad is not None else None
            coarse_weak = _unbin2(weak, W).reshape(n)
        Psi = Psi.reshape(n)
        coarse_bad = coarse_bad.reshape(n) if coarse_bad is not None else None

    # (4b) finest level at full resolution, its fringe order from the coarse phase
    psi = np.arctan2(Sf[band], Cf[band])
    psi *= f32(-1.0 / (2.0 * np.pi))
    if L > 1:
        k_est = Psi
        k_est *= f32(f[-1] / f[-2])
        k_est -= psi
        k = np.rint(k_est)
        k_est -= k
        np.abs(k_est, out=k_est)
        unwrap_bad = k_est > f32(params.max_unwrap_residual)
        if coarse_bad is not None:
            unwrap_bad |= coarse_bad
        k += psi
        u = k
    else:
        psi += psi < 0
        u = psi
        unwrap_bad = np.zeros(n, bool)
    # projector column x_p = Phi W_p / (2 pi f_max) - 0.5; u = x_p - cx_p
    u *= f32(Wp / f[-1])
    u -= f32(0.5 + tab.cx_p)
    m = params.projector_margin_px
    out_p = u < f32(-0.5 + m - tab.cx_p)
    out_p |= u > f32(Wp - 0.5 - m - tab.cx_p)

    # (4c) discontinuities. Second differences along rows and columns (linear ramps
    # cancel, whatever the resolution or the surface tilt) above edge_jump periods mark the
    # centre pixel; first differences to a surviving 4-neighbour above edge_step periods
    # mark both pixels. A wrong fringe order can only hide at such places.
    ok_u = passed[band] & ~unwrap_bad & ~out_p
    if coarse_weak is not None:
        ok_u &= ~coarse_weak
    edge = np.zeros(n, bool)
    if (params.edge_jump > 0 or params.edge_step > 0) and n > 2 * W:
        period = Wp / f[-1]
        for st in (1, W):
            okp = ok_u[st:] & ok_u[:-st]                  # both ends of the link survive
            if st == 1:
                okp[W - 1::W] = False                       # no link from a row's end to the next row
            if params.edge_step > 0:
                d = np.abs(u[st:] - u[:-st]) > f32(params.edge_step * period)
                d &= okp
                edge[:-st] |= d
                edge[st:] |= d
            if params.edge_jump > 0:
                d2 = u[2 * st:] + u[:-2 * st]
                d2 -= u[st:-st]
                d2 -= u[st:-st]
                d = np.abs(d2, out=d2) > f32(params.edge_jump * period)
                d &= okp[st:]
                d &= okp[:-st]
                edge[st:-st] |= d

    # (4d) smoothing of the projector column: separable 3-tap means (horizontal, then
    # vertical), each applied only where both neighbours survive and the mean stays within
    # smooth_max_dev_px of the centre (else the centre is kept): symmetric, so unbiased on
    # linear ramps, and never across a gap or a step (docs/decoding.md)
    if params.smooth_filter > 1:
        tau = f32(params.smooth_max_dev_px)
        with np.errstate(divide="ignore", invalid="ignore"):
            nm = ok_u.astype(f32)
            nm /= nm                                         # 1 or NaN
        x = u * nm
        with np.errstate(invalid="ignore"):
            for st in (1, W):
                if n <= 2 * st:
                    continue
                sm = np.empty_like(x)
                np.add(x[:-2 * st], x[2 * st:], out=sm[st:-st])
                sm[st:-st] += x[st:-st]
                sm[:st] = x[:st] * f32(3.0)
                sm[-st:] = x[-st:] * f32(3.0)
                sm *= f32(1.0 / 3.0)
                d = np.abs(sm - x)
                np.copyto(sm, x, where=~(d <= tau))
                x = sm
        u = x  # NaN where ok_u is False: those pixels are rejected already

    # (5) closed-form ray / plane triangulation (kernels.triangulate.triangulate_flat, in place)
    b = tab.b.reshape(HW)[band]
    den = u * b
    np.subtract(tab.a.reshape(HW)[band], den, out=den)  # a - u b
    lam = u * f32(tab.c1)
    lam -= f32(tab.c0)
    zmin, zmax = (f32(v) for v in params.depth_range)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam /= den                                       # IR-frame depth z
        sin_a = u * u
        sin_a += f32(tab.fx_p ** 2 + tab.s_p ** 2)
        np.sqrt(sin_a, out=sin_a)
        np.abs(den, out=den)
        np.divide(den, sin_a, out=sin_a)
        sin_a *= tab.inv_norm.reshape(HW)[band]          # |n.d| / (|n| |d|)
        tri_bad = sin_a < f32(params.min_sin_angle)
        tri_bad |= lam < zmin
        tri_bad |= lam > zmax
        if not tab.in_front_of_projector(float(zmin), float(zmax)):
            zp = np.multiply(lam, b, out=den)
            zp += f32(tab.c1)
            tri_bad |= ~(zp > 0)
        tri_bad |= ~np.isfinite(lam)
        tri_bad &= ok_u  # pixels rejected by the unwrapping keep only their own flags

    sub = unwrap_bad.view(np.uint8) * np.uint8(MaskFlag.UNWRAP_INCONSISTENT)
    if L > 1 and coarse_weak is not None:
        sub |= coarse_weak.view(np.uint8)  # MaskFlag.LOW_MODULATION == 1
    sub |= edge.view(np.uint8) * np.uint8(MaskFlag.DISCONTINUITY)
    sub |= out_p.view(np.uint8) * np.uint8(MaskFlag.OUT_OF_PROJECTOR)
    sub |= tri_bad.view(np.uint8) * np.uint8(MaskFlag.TRIANGULATION)
    sub *= passed[band].view(np.uint8)  # pixels rejected in (1)-(3) keep only their early flags
    fb = flags[band]
    fb |= sub
    valid = flags == 0

    # NaN where invalid, without a boolean scatter: nanmask = valid / valid -> 1 or NaN (0/0)
    with np.errstate(divide="ignore", invalid="ignore"):
        nanmask = valid[band].astype(f32)
        nanmask /= nanmask
    lam *= nanmask

    # (6) organised outputs
    points = np.empty((HW, 3), f32)
    points[: r0 * W] = np.nan
    points[r1 * W:] = np.nan
    rays = tab.ray_world if frame == "world" else tab.ray_ir
    origin = tab.origin_world if frame == "world" else np.zeros(3)
    pb = points[band]
    for j in range(3):
        t = np.multiply(rays[j].reshape(HW)[band], lam, out=den)
        np.add(t, f32(origin[j]), out=pb[:, j])
    conf = np.empty(HW, f32)
    conf[: r0 * W] = np.nan
    conf[r1 * W:] = np.nan
    cb = np.multiply(modulation[band], sin_a, out=conf[band])
    cb *= f32(1.0 / (params.confidence_modulation * params.confidence_sin_angle))
    np.minimum(cb, f32(1.0), out=cb)
    cb *= nanmask
    xp_img = np.empty(HW, f32)
    xp_img[: r0 * W] = np.nan
    xp_img[r1 * W:] = np.nan
    xb = np.add(u, f32(tab.cx_p), out=xp_img[band])
    xb *= nanmask
    depth = np.empty(HW, f32)
    depth[: r0 * W] = np.nan
    depth[r1 * W:] = np.nan
    depth[band] = lam
    return DecodedView(points.reshape(H, W, 3), valid.reshape(H, W), conf.reshape(H, W), flags.reshape(H, W),
                       xp_img.reshape(H, W), depth.reshape(H, W), modulation.reshape(H, W), float(rel))


def _decode_view_fast(st, tab, Wp: int, f: np.ndarray, params: DecodeParams, frame: str) -> DecodedView:
    """:func:`decode_view` with the fused loops of :mod:`kernels._fast_decode` (N = 4, L >= 2,
    2x2 coarse bins, even H and W; inputs validated by the caller)."""
    L, N, H, W = st.shape
    HW = H * W
    f32 = np.float32
    planes = st.reshape(L * N, HW)
    image_max = planes.max(axis=0)  # saturation: any of the L*N images at 255 (vectorised)
    modulation = np.empty(HW, f32)
    _fast.finest_modulation(planes[-4], planes[-3], planes[-2], planes[-1], modulation)
    rel = relative_modulation_threshold(modulation, params.modulation_percentile, params.relative_modulation,
                                        params.percentile_stride)
    flags = np.empty(HW, np.uint8)
    r0, r1 = _fast.early_flags_rows(image_max, modulation, flags, H, W, f32(params.min_modulation), f32(rel))
    if r1 > r0:  # even-aligned band (H is even)
        r0 -= r0 % 2
        r1 = min(r1 + (r1 - r0) % 2, H)
    ratios = np.ones(L, f32)
    ratios[1:] = (f[1:] / f[:-1]).astype(f32)
    period = Wp / f[-1]
    m = params.projector_margin_px
    cx = tab.cx_p
    zmin, zmax = (float(v) for v in params.depth_range)
    rays = tab.ray_world if frame == "world" else tab.ray_ir
    origin = (tab.origin_world if frame == "world" else np.zeros(3)).astype(f32)
    points = np.empty((HW, 3), f32)
    conf = np.empty(HW, f32)
    xp = np.empty(HW, f32)
    depth = np.empty(HW, f32)
    _fast.fill_nan_outside(r0, r1, W, points, conf, xp, depth)
    n = (r1 - r0) * W
    if n > 0:
        u = np.empty(n, f32)
        stt = np.empty(n, np.uint8)
        _fast.unwrap_band(planes, L, W, r0, r1, modulation, flags, ratios, f32(Wp / f[-1]), f32(0.5 + cx),
                          f32(-0.5 + m - cx), f32(Wp - 0.5 - m - cx), f32(params.max_unwrap_residual),
                          f32(params.min_bin_snr ** 2), f32(params.coarse_agreement), u, stt)
        edge = np.zeros(n, np.uint8)
        if (params.edge_jump > 0 or params.edge_step > 0) and n > 2 * W:
            _fast.edges_band(u, stt, W, f32(params.edge_step * period if params.edge_step > 0 else np.inf),
                             f32(params.edge_jump * period if params.edge_jump > 0 else np.inf), edge)
        x = _fast.smooth_band(u, stt, W, f32(params.smooth_max_dev_px), bool(params.smooth_filter > 1),
                              np.empty(n, f32), np.empty(n, f32))
        band = slice(r0 * W, r1 * W)
        rays = rays.reshape(3, HW)
        _fast.triangulate_band(
            x, stt, edge, modulation[band], flags[band], tab.a.reshape(HW)[band], tab.b.reshape(HW)[band],
            tab.inv_norm.reshape(HW)[band], (rays[0][band], rays[1][band], rays[2][band]), origin, f32(tab.c0), f32(tab.c1), f32(tab.fx_p ** 2 + tab.s_p ** 2),
            f32(params.min_sin_angle), f32(zmin), f32(zmax), bool(not tab.in_front_of_projector(zmin, zmax)),
            f32(1.0 / (params.confidence_modulation * params.confidence_sin_angle)), f32(cx),
            points[band], conf[band], xp[band], depth[band])
    valid = flags == 0
    return DecodedView(points.reshape(H, W, 3), valid.reshape(H, W), conf.reshape(H, W), flags.reshape(H, W),
                       xp.reshape(H, W), depth.reshape(H, W), modulation.reshape(H, W), float(rel))
