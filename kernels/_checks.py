"""Input validation helpers shared by every kernel.

Kernels validate once, at entry, and raise ``ValueError`` naming the parameter
and what was received. These helpers keep the messages uniform.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_array(
    x,
    name: str,
    shape: Sequence[int | None] | None = None,
    dtype=np.float64,
    finite: bool = False,
) -> np.ndarray:
    """Coerce ``x`` to a C-ordered array and check its shape.

    Parameters
    ----------
    x : array_like
        The value received.
    name : str
        Parameter name used in the error message.
    shape : sequence of int or None, optional
        Expected shape; ``None`` entries match any length. ``None`` skips the check.
    dtype : numpy dtype, optional
        Target dtype (``None`` keeps the input dtype).
    finite : bool
        When true, NaN or infinite entries are rejected.

    Returns
    -------
    numpy.ndarray
        A C-contiguous array (a copy only when needed).

    Raises
    ------
    ValueError
        When the shape, dtype conversion or finiteness check fails.
    """
    try:
        arr = np.asarray(x, dtype=dtype, order="C")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert to an array of {dtype}: {exc}") from None
    if shape is not None:
        check_shape(arr, name, shape)
    if finite and arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name}: contains {bad} NaN or infinite value(s)")
    return arr


def check_shape(arr: np.ndarray, name: str, shape: Sequence[int | None]) -> None:
    """Raise ``ValueError`` unless ``arr.shape`` matches ``shape`` (``None`` = any)."""
    ok = arr.ndim == len(shape) and all(
        want is None or have == want for have, want in zip(arr.shape, shape)
    )
    if not ok:
        pretty = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {pretty}, got {tuple(arr.shape)}")


def check_positive(value: float, name: str) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    return v


def as_rng(rng) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` from a Generator, an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise ValueError(f"rng: expected a numpy Generator, an int seed or None, got {type(rng).__name__}")


def check_number(value, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """Return ``float(value)`` if it is finite and within ``[lo, hi]`` (open ends on request).

    Raises
    ------
    ValueError
        Naming ``name``: not a number, not finite, or out of range.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {value!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def check_int(value, name: str, minimum: int = 1) -> int:
    """Return ``int(value)`` for an integer (not bool) >= ``minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_point_pairs(src, dst, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate corresponding point sets for a rigid / similarity fit.

    Returns ``src`` (n, 3), ``dst`` (n, 3) float64 and weights (n,) (ones when ``None``).

    Raises
    ------
    ValueError
        Shapes differ, n < 3, non-finite values, negative weights or a zero weight sum.
    """
    src = as_array(src, "src", (None, 3), finite=True)
    dst = as_array(dst, "dst", (src.shape[0], 3), finite=True)
    if src.shape[0] < 3:
        raise ValueError(f"src: need at least 3 point pairs, got {src.shape[0]}")
    w = np.ones(src.shape[0]) if weights is None else as_array(weights, "weights", (src.shape[0],), finite=True)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights: must be >= 0 with a positive sum")
    return src, dst, w
