"""N-step phase shifting: wrapped phase, modulation, temporal unwrapping and pixel masks.

Inverts the fringe model of ``docs/image-model.md`` (paper, section 3.1 "Multi-View
Scanning": N-step phase shifting). For every frequency ``f`` of the increasing list
``F = (1, f_1, ..., f_{L-1})`` the camera records ``N >= 3`` equally spaced steps

    I_n = A + B cos(phi + 2 pi n / N),   n = 0..N-1

and ``phi_f(x_p) = 2 pi f (x_p + 0.5) / W_p`` encodes the projector column ``x_p``.

Functions here are pure and work on whole images (``(L, N, H, W)`` uint8 stacks) or, for
the unwrapping and the flags, on arrays of any shape (e.g. the compressed valid pixels
that :func:`kernels.decode.decode_view` uses). Bit flags of the per-pixel reason code
are :class:`MaskFlag`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kernels._checks import check_positive

TWO_PI = 2.0 * np.pi
_TWO_PI32 = np.float32(TWO_PI)


class MaskFlag(enum.IntFlag):
    """Per-pixel reason codes (``uint8`` bit flags); ``0`` means the pixel is valid.

    Flags are evaluated in pipeline order by :func:`kernels.decode.decode_view`; a pixel
    rejected by an early test (modulation, saturation) is not evaluated by the later
    ones, so exactly the early flags are set for it.
    """

    OK = 0
    #: modulation ``B`` (finest frequency, or any frequency) below the absolute threshold
    LOW_MODULATION = 1
    #: modulation below ``fraction x`` a high percentile of the view's modulation
    LOW_RELATIVE_MODULATION = 2
    #: at least one of the ``L x N`` fringe images reads 255 at this pixel
    SATURATED = 4
    #: temporal unwrapping ambiguous: ``|k_est - round(k_est)|`` above the threshold at some level
    UNWRAP_INCONSISTENT = 8
    #: decoded projector column outside ``[-0.5 + margin, W_p - 0.5 - margin]``
    OUT_OF_PROJECTOR = 16
    #: ray nearly parallel to its projector plane, or point behind / outside the depth range
    TRIANGULATION = 32
    #: the projector column jumps to a 4-neighbour by more than ``edge_jump`` periods (depth discontinuity)
    DISCONTINUITY = 64


# -- validation ------------------------------------------------------------------------------

def check_frequencies(frequencies: Sequence[float], name: str = "frequencies") -> np.ndarray:
    """Validate a temporal-unwrapping frequency list.

    Parameters
    ----------
    frequencies : sequence of float, length L >= 1
        Periods across the projector width, strictly increasing, the first one ``1``.
    name : str
        Parameter name for error messages.

    Returns
    -------
    (L,) float64

    Raises
    ------
    ValueError
        When the list is empty, not finite, not strictly increasing, or does not start at 1.
    """
    try:
        f = np.asarray(frequencies, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a sequence of numbers, got {frequencies!r} ({exc})") from None
    if f.ndim != 1 or f.size < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence, got shape {f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError(f"{name}: must be finite and > 0, got {f.tolist()}")
    if f[0] != 1.0:
        raise ValueError(f"{name}: must start at 1 (one period across the projector), got {f.tolist()}")
    if np.any(np.diff(f) <= 0):
        raise ValueError(f"{name}: must be strictly increasing, got {f.tolist()}")
    return f


def check_stack(stack, name: str = "stack", n_levels: int | None = None, n_steps: int | None = None,
                shape_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a fringe stack: ``(L, N, H, W)`` uint8 with the declared ``L``, ``N`` and size.

    Parameters
    ----------
    stack : (L, N, H, W) uint8
        The fringe images, ``stack[i, n]`` = frequency index ``i``, step ``n``.
    name : str
        Parameter name for error messages.
    n_levels, n_steps : int, optional
        Declared number of frequencies and of phase steps (``N >= 3``).
    shape_hw : (int, int), optional
        Declared image size ``(H, W)`` (the IR camera's).

    Returns
    -------
    (L, N, H, W) uint8, C-contiguous (a copy only when the input is not contiguous).

    Raises
    ------
    ValueError
        On a wrong dtype (uint16 or float instead of uint8), a wrong number of dimensions,
        or a shape that disagrees with the declared counts or size.
    """
    arr = np.asarray(stack)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8 (8-bit fringe images), got {arr.dtype}")
    if arr.ndim != 4:
        raise ValueError(f"{name}: expected shape (L, N, H, W) = (frequencies, steps, rows, columns), "
                         f"got {arr.ndim}-D shape {arr.shape}")
    L, N, H, W = arr.shape
    if n_levels is not None and L != n_levels:
        raise ValueError(f"{name}: {L} frequency level(s) in the stack but {n_levels} declared (shape {arr.shape})")
    if n_steps is not None and N != n_steps:
        raise ValueError(f"{name}: {N} phase step(s) in the stack but n_steps={n_steps} declared (shape {arr.shape})")
    if N < 3:
        raise ValueError(f"{name}: N-step phase shifting needs N >= 3 steps, got N={N} (shape {arr.shape})")
    if shape_hw is not None and (H, W) != tuple(shape_hw):
        raise ValueError(f"{name}: images are {H}x{W} (HxW) but the camera is {shape_hw[0]}x{shape_hw[1]}")
    if H < 1 or W < 1 or L < 1:
        raise ValueError(f"{name}: empty stack, shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _check_n_steps(n_steps) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise ValueError(f"n_steps: expected an int >= 3, got {n_steps!r}")
    if n_steps < 3:
        raise ValueError(f"n_steps: N-step phase shifting needs n_steps >= 3, got {n_steps}")
    return int(n_steps)


# -- wrapped phase ----------------------------------------------------------------------------

def step_coefficients(n_steps: int) -> np.ndarray:
    """Least-squares weights of the N equally spaced steps.

    Parameters
    ----------
    n_steps : int
        ``N >= 3``.

    Returns
    -------
    (3, N) float64
        Rows ``cos(2 pi n / N)``, ``sin(2 pi n / N)`` and ``1 / N``. With
        ``C = w[0] @ I`` and ``S = w[1] @ I`` the least-squares fit of
        ``I_n = A + B cos(phi + 2 pi n / N)`` is ``phi = atan2(-S, C)``,
        ``B = 2 sqrt(C^2 + S^2) / N`` and ``A = w[2] @ I`` (the normal equations are
        diagonal for equally spaced steps).
    """
    N = _check_n_steps(n_steps)
    d = TWO_PI * np.arange(N) / N
    return np.stack([np.cos(d), np.sin(d), np.full(N, 1.0 / N)])


def level_sums(images: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The quadrature sums ``C = sum_n I_n cos(d_n)``, ``S = sum_n I_n sin(d_n)`` of one level.

    Parameters
    ----------
    images : (N, H, W) uint8
        The ``N`` steps of one frequency (already validated).
    n_steps : int
        ``N``.

    Returns
    -------
    C, S : (H, W) float32 or int16
        int16 on the exact fast path for ``N = 4`` (``C = I0 - I2``, ``S = I1 - I3``),
        float32 otherwise; both paths agree to float32 rounding.
    """
    N = n_steps
    if N == 4:  # fast path: the weights are exactly (1, 0, -1, 0) and (0, 1, 0, -1)
        C = np.subtract(images[0], images[2], dtype=np.int16)
        S = np.subtract(images[1], images[3], dtype=np.int16)
        return C, S
    H, W = images.shape[1:]
    w = step_coefficients(N)[:2].astype(np.float32)
    f = images.reshape(N, H * W).astype(np.float32)
    cs = w @ f  # (2, HW): one pass, BLAS
    return cs[0].reshape(H, W), cs[1].reshape(H, W)


def phase_from_sums(C: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Wrapped phase in ``[0, 2 pi)`` from the quadrature sums (float32).

    Parameters
    ----------
    C, S : (...) float32 or int16
        Outputs of :func:`level_sums` (any shape, e.g. compressed valid pixels).

    Returns
    -------
    (...) float32
        ``phi = atan2(-S, C) mod 2 pi`` (image-model convention ``I_n = A + B cos(phi + 2 pi n/N)``).
    """
    C = np.asarray(C, dtype=np.float32)
    S = np.asarray(S, dtype=np.float32)
    phi = np.arctan2(np.negative(S), C)
    phi += _TWO_PI32 * (phi < 0)
    # float32 rounding of (tiny negative + 2 pi) can give exactly 2 pi: fold it back
    phi[phi >= _TWO_PI32] = 0.0
    return phi


@dataclass(frozen=True)
class WrappedPhase:
    """Per-level fit of ``I_n = A + B cos(phi + 2 pi n / N)``.

    Attributes
    ----------
    phase : (L, H, W) float32
        Wrapped phase in ``[0, 2 pi)`` rad.
    average : (L, H, W) float32
        ``A`` in grey levels.
    modulation : (L, H, W) float32
        ``B >= 0`` in grey levels.
    """

    phase: np.ndarray
    average: np.ndarray
    modulation: np.ndarray


def wrapped_phase(stack, n_steps: int) -> WrappedPhase:
    """Wrapped phase, average intensity and modulation of every level of a fringe stack.

    Least squares over the ``N`` equally spaced steps (paper section 3.1, N-step phase
    shifting; ``docs/image-model.md``): ``C = sum I_n cos(2 pi n/N)``,
    ``S = sum I_n sin(2 pi n/N)``, ``phi = atan2(-S, C)``, ``B = 2 |C + iS| / N``,
    ``A = mean_n I_n``.

    Parameters
    ----------
    stack : (L, N, H, W) uint8
        ``stack[i, n]`` is the image of frequency index ``i`` and step ``n``.
    n_steps : int
        Declared ``N >= 3``; must equal ``stack.shape[1]``.

    Returns
    -------
    WrappedPhase
        float32 arrays of shape ``(L, H, W)``; all pixels are evaluated (no masking).

    Raises
    ------
    ValueError
        ``stack`` not uint8 / not 4-D / ``N`` different from ``n_steps``; ``n_steps < 3``.
    """
    N = _check_n_steps(n_steps)
    st = check_stack(stack, "stack", n_steps=N)
    L, _, H, W = st.shape
    phase = np.empty((L, H, W), np.float32)
    avg = np.empty((L, H, W), np.float32)
    mod = np.empty((L, H, W), np.float32)
    for i in range(L):
        C, S = level_sums(st[i], N)
        C = C.astype(np.float32, copy=False)
        S = S.astype(np.float32, copy=False)
        phase[i] = phase_from_sums(C, S)
        mod[i] = np.hypot(C, S) * np.float32(2.0 / N)
        avg[i] = st[i].reshape(N, H * W).sum(axis=0, dtype=np.float32).reshape(H, W) * np.float32(1.0 / N)
    return WrappedPhase(phase, avg, mod)


# -- temporal unwrapping ---------------------------------------------------------------------

@dataclass(frozen=True)
class UnwrappedPhase:
    """Result of hierarchical temporal unwrapping.

    Attributes
    ----------
    phase : (...) float32
        Absolute phase of the finest frequency ``f_{L-1}`` in rad, in about
        ``[0, 2 pi f_{L-1})``.
    residual : (...) float32
        Largest ``|k_est - round(k_est)|`` over the levels (fraction of a period, in
        ``[0, 0.5]``); ``0`` for a single level.
    consistent : (...) bool
        ``residual <= max_residual``.
    """

    phase: np.ndarray
    residual: np.ndarray
    consistent: np.ndarray


def unwrap_temporal(wrapped, frequencies: Sequence[float], max_residual: float = 0.25) -> UnwrappedPhase:
    """Hierarchical temporal phase unwrapping through an increasing frequency list.

    Level 0 (``f_0 = 1``) is already absolute. For each next level with ratio
    ``r = f_l / f_{l-1}`` the fringe order is ``k = round(k_est)``,
    ``k_est = (r Phi_{l-1} - phi_l) / (2 pi)``, and ``Phi_l = phi_l + 2 pi k``. A pixel
    whose ``|k_est - k|`` exceeds ``max_residual`` (in periods) at some level is
    ambiguous: the levels disagree by more than noise can explain.

    Parameters
    ----------
    wrapped : (L, ...) float32
        Wrapped phases in ``[0, 2 pi)`` for each frequency (any trailing shape; NaN
        propagates).
    frequencies : sequence of float, length L
        Strictly increasing, starting at 1 (e.g. ``(1, 8, 64)`` or ``(1, 4, 16, 64)``).
    max_residual : float
        Ambiguity threshold in periods, in ``(0, 0.5)``. An order error needs a level
        error of more than ``1 - max_residual`` periods to go undetected.

    Returns
    -------
    UnwrappedPhase

    Raises
    ------
    ValueError
        Invalid ``frequencies``, a first axis that does not match them, or
        ``max_residual`` outside ``(0, 0.5)``.
    """
    f = check_frequencies(frequencies)
    w = np.asarray(wrapped, dtype=np.float32)
    if w.ndim < 1 or w.shape[0] != f.size:
        raise ValueError(f"wrapped: expected first axis of length {f.size} (one per frequency), got shape {w.shape}")
    mr = check_positive(max_residual, "max_residual")
    if mr >= 0.5:
        raise ValueError(f"max_residual: must be < 0.5 period, got {max_residual}")
    Phi = w[0].copy()
    resid = np.zeros(w.shape[1:], np.float32)
    inv2pi = np.float32(1.0 / TWO_PI)
    for lvl in range(1, f.size):
        r = np.float32(f[lvl] / f[lvl - 1])
        k_est = Phi * r
        k_est -= w[lvl]
        k_est *= inv2pi
        k = np.rint(k_est)
        e = np.abs(k_est - k)
        np.maximum(resid, e, out=resid)
        Phi = w[lvl] + _TWO_PI32 * k
    with np.errstate(invalid="ignore"):
        consistent = resid <= np.float32(mr)
    return UnwrappedPhase(Phi, resid, consistent)


def projector_column(phase, f_max: float, projector_width: int) -> np.ndarray:
    """Projector column from the absolute phase of the finest frequency.

    ``x_p = Phi W_p / (2 pi f_max) - 0.5`` (inverse of ``phi_f(x_p)`` in ``docs/image-model.md``).

    Parameters
    ----------
    phase : (...) float32
        Absolute phase in rad.
    f_max : float
        The finest frequency (periods across the projector).
    projector_width : int
        ``W_p`` in projector pixels.

    Returns
    -------
    (...) float32
        ``x_p`` in projector pixels (pixel centres at integers).
    """
    check_positive(f_max, "f_max")
    check_positive(projector_width, "projector_width")
    p = np.asarray(phase, dtype=np.float32)
    return p * np.float32(projector_width / (TWO_PI * f_max)) - np.float32(0.5)


# -- smoothing ----------------------------------------------------------------------------------

def box_sum_flat(a: np.ndarray, width: int, size: int = 3) -> np.ndarray:
    """Box sum over ``size x size`` neighbourhoods of a row-major image stored flat.

    Used to average quadrature sums (a complex box filter: the phase of the summed
    phasors is the modulation-weighted mean phase) and projector columns. Only
    contiguous 1-D slices are used (fast); the price is that the first and last
    ``size // 2`` rows get partial sums and the horizontal window wraps from the end of
    one row to the start of the next: callers must not rely on those border values
    (the image borders, background in a face scan).

    Parameters
    ----------
    a : (h * width,) float32
        The image, flat, row-major (NaN propagates).
    width : int
        Row length.
    size : int
        Odd window size ``>= 1``.

    Returns
    -------
    (h * width,) float32
        Unnormalised sums (a new array).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size: must be an odd integer >= 1, got {size}")
    a = np.asarray(a)
    r = size // 2
    if r == 0:
        return a.copy()
    n = a.size
    if n <= 2 * r * width:
        return a * np.float32(size * size)
    h = a.copy()
    for k in range(1, r + 1):
        h[k:] += a[:-k]
        h[:-k] += a[k:]
    v = h.copy()
    for k in range(1, r + 1):
        kw = k * width
        v[kw:] += h[:-kw]
        v[:-kw] += h[kw:]
    return v


# -- masks ------------------------------------------------------------------------------------

def saturation_mask(stack) -> np.ndarray:
    """Pixels where any image of the stack is saturated (255).

    Parameters
    ----------
    stack : (L, N, H, W) uint8

    Returns
    -------
    (H, W) bool
    """
    st = check_stack(stack, "stack")
    L, N, H, W = st.shape
    return (st.reshape(L * N, H * W).max(axis=0) == 255).reshape(H, W)


def relative_modulation_threshold(modulation, percentile: float = 99.0, fraction: float = 0.1,
                                  stride: int = 16) -> float:
    """Relative modulation threshold ``fraction * percentile(B)`` of a view.

    Parameters
    ----------
    modulation : (H, W) float32
        ``B`` in grey levels (NaN ignored).
    percentile : float
        In ``(0, 100]``; a high percentile represents well-lit skin.
    fraction : float
        In ``[0, 1]``; ``0`` disables the relative test.
    stride : int
        The percentile (nearest rank) is estimated on every ``stride``-th pixel in flat
        order: with the default 16 that is 82 k samples of a 1280 x 1024 view, accurate to
        a fraction of a grey level and several times faster than the full percentile.

    Returns
    -------
    float
        The threshold in grey levels (``0.0`` when ``fraction`` is 0 or there is no finite pixel).

    Raises
    ------
    ValueError
        ``percentile``, ``fraction`` or ``stride`` out of range.
    """
    if not (0 < percentile <= 100):
        raise ValueError(f"percentile: must be in (0, 100], got {percentile}")
    if not (0 <= fraction <= 1):
        raise ValueError(f"fraction: must be in [0, 1], got {fraction}")
    if int(stride) < 1:
        raise ValueError(f"stride: must be >= 1, got {stride}")
    if fraction == 0:
        return 0.0
    sub = np.asarray(modulation, dtype=np.float32).reshape(-1)[:: int(stride)]
    if not np.all(np.isfinite(sub)):
        sub = sub[np.isfinite(sub)]
    else:
        sub = sub.copy()
    if sub.size == 0:
        return 0.0
    k = int(round(percentile / 100.0 * (sub.size - 1)))
    sub.partition(k)
    return float(fraction * sub[k])


def modulation_flags(modulation, min_modulation: float, relative_threshold: float = 0.0) -> np.ndarray:
    """Flag low modulation (absolute and relative).

    Parameters
    ----------
    modulation : (...) float32
        ``B`` in grey levels.
    min_modulation : float
        Absolute threshold (grey levels).
    relative_threshold : float
        Output of :func:`relative_modulation_threshold` (grey levels).

    Returns
    -------
    (...) uint8
        :attr:`MaskFlag.LOW_MODULATION` | :attr:`MaskFlag.LOW_RELATIVE_MODULATION` bits.
    """
    b = np.asarray(modulation, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        out = (~(b >= np.float32(min_modulation))).astype(np.uint8) * np.uint8(MaskFlag.LOW_MODULATION)
        out |= (~(b >= np.float32(relative_threshold))).astype(np.uint8) * np.uint8(MaskFlag.LOW_RELATIVE_MODULATION)
    return out


def projector_range_flags(x_p, projector_width: int, margin_px: float = 2.0) -> np.ndarray:
    """Flag projector columns outside the projector's image.

    Parameters
    ----------
    x_p : (...) float32
        Decoded projector column.
    projector_width : int
        ``W_p``.
    margin_px : float
        Columns within ``margin_px`` of the border are rejected too: there the level-0
        phase is near its wrap (0 / 2 pi) and noise can flip the whole order.

    Returns
    -------
    (...) uint8
        :attr:`MaskFlag.OUT_OF_PROJECTOR` where out of range (or NaN).
    """
    x = np.asarray(x_p, dtype=np.float32)
    lo, hi = np.float32(-0.5 + margin_px), np.float32(projector_width - 0.5 - margin_px)
    with np.errstate(invalid="ignore"):
        ok = (x >= lo) & (x <= hi)
    return (~ok).astype(np.uint8) * np.uint8(MaskFlag.OUT_OF_PROJECTOR)
