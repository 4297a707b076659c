"""Wrapped phase, modulation, temporal unwrapping and mask helpers (kernels/phase.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.phase import (MaskFlag, box_sum_flat, check_frequencies, level_sums, modulation_flags,
                           phase_from_sums, projector_column, projector_range_flags,
                           relative_modulation_threshold, saturation_mask, step_coefficients, unwrap_temporal,
                           wrapped_phase)

TWO_PI = 2 * np.pi


def _stack(phi, A, B, n_steps, rng=None, sigma=0.0):
    """(L, N, H, W) uint8 with I_n = A + B cos(phi + 2 pi n / N) (image-model.md convention)."""
    L = phi.shape[0]
    n = np.arange(n_steps).reshape(1, n_steps, 1, 1)
    I = A + B * np.cos(phi[:, None] + TWO_PI * n / n_steps)
    if sigma:
        I = I + sigma * rng.standard_normal(I.shape)
    return np.clip(np.rint(I), 0, 255).astype(np.uint8)


def _wrap(d):
    return (d + np.pi) % TWO_PI - np.pi


@pytest.mark.parametrize("n_steps", [3, 4, 5, 8, 12])
def test_wrapped_phase_each_n(n_steps):
    rng = np.random.default_rng(n_steps)
    phi = rng.uniform(0, TWO_PI, (2, 40, 50))
    A = rng.uniform(60, 120, (1, 1, 40, 50))
    B = rng.uniform(40, 60, (1, 1, 40, 50))
    wp = wrapped_phase(_stack(phi, A, B, n_steps), n_steps)
    assert wp.phase.shape == (2, 40, 50) and wp.phase.dtype == np.float32
    assert np.all((wp.phase >= 0) & (wp.phase < TWO_PI))
    # 8-bit rounding only: phase error ~ 0.29 / B rad
    assert np.max(np.abs(_wrap(wp.phase - phi))) < 0.03
    assert np.max(np.abs(wp.modulation - B[0])) < 1.0
    assert np.max(np.abs(wp.average - A[0])) < 0.6


def test_n4_fast_path_matches_general_path():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (4, 30, 40), dtype=np.uint8)
    C4, S4 = level_sums(img, 4)  # exact int16 fast path
    w = step_coefficients(4).astype(np.float32)
    f = img.reshape(4, -1).astype(np.float32)
    Cg, Sg = (w[:2] @ f).reshape(2, 30, 40)
    assert C4.dtype == np.int16
    np.testing.assert_allclose(C4, Cg, atol=1e-4)
    np.testing.assert_allclose(S4, Sg, atol=1e-4)
    np.testing.assert_allclose(phase_from_sums(C4, S4), phase_from_sums(Cg, Sg), atol=1e-5)


def test_phase_convention_matches_image_model():
    # I_n = A + B cos(phi + 2 pi n / N) with phi = 1.0 rad
    phi = np.full((1, 1, 1), 1.0)
    st = _stack(phi, 100.0, 80.0, 4)
    assert abs(wrapped_phase(st, 4).phase[0, 0, 0] - 1.0) < 0.01


@pytest.mark.parametrize("freqs", [(1, 8, 64), (1, 4, 16, 64)])
def test_unwrap_temporal_exact_and_flags_ambiguity(freqs):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.01, 0.99, 5000)  # fraction of the projector width (away from the level-0 wrap)
    f = np.asarray(freqs, float)
    wrapped = (TWO_PI * f[:, None] * x[None] + rng.normal(0, 0.02, (f.size, x.size))) % TWO_PI
    un = unwrap_temporal(wrapped.astype(np.float32), freqs)
    assert np.all(un.consistent)
    np.testing.assert_allclose(un.phase, TWO_PI * f[-1] * x, atol=0.1)
    # corrupt the middle level by half a period: every pixel becomes ambiguous
    bad = wrapped.copy()
    bad[1] = (bad[1] + np.pi) % TWO_PI
    un2 = unwrap_temporal(bad.astype(np.float32), freqs)
    assert not np.any(un2.consistent)
    assert np.all(un2.residual > 0.25)


def test_projector_column_inverse_of_phase_formula():
    Wp, fmax = 1280, 64
    xp = np.array([-0.4, 0.0, 639.5, 1279.4])
    phi = TWO_PI * fmax * (xp + 0.5) / Wp
    np.testing.assert_allclose(projector_column(phi, fmax, Wp), xp, atol=1e-3)


def test_masks_helpers():
    st = np.full((2, 3, 4, 5), 100, np.uint8)
    st[1, 2, 0, 0] = 255
    sat = saturation_mask(st)
    assert sat[0, 0] and sat.sum() == 1
    B = np.array([[5.0, 20.0, np.nan, 100.0]], np.float32)
    fl = modulation_flags(B, 8.0, 30.0)
    assert fl.dtype == np.uint8
    assert fl[0, 0] == MaskFlag.LOW_MODULATION | MaskFlag.LOW_RELATIVE_MODULATION
    assert fl[0, 1] == MaskFlag.LOW_RELATIVE_MODULATION
    assert fl[0, 2] == MaskFlag.LOW_MODULATION | MaskFlag.LOW_RELATIVE_MODULATION  # NaN is never valid
    assert fl[0, 3] == 0
    rel = relative_modulation_threshold(np.arange(1000, dtype=np.float32).reshape(10, 100), 99, 0.1, stride=1)
    assert abs(rel - 98.9) < 0.2
    out = projector_range_flags(np.array([-5.0, 1.0, 3.0, 1276.0, 1278.0]), 1280, margin_px=2.0)
    np.testing.assert_array_equal(out > 0, [True, True, False, False, True])


def test_box_sum_flat_interior():
    a = np.arange(30, dtype=np.float32)
    s = box_sum_flat(a, 6, 3).reshape(5, 6)
    img = a.reshape(5, 6)
    assert s[2, 2] == img[1:4, 1:4].sum()


@pytest.mark.parametrize("bad", [np.zeros((3, 4, 8, 8), np.uint16), np.zeros((3, 4, 8, 8), np.float32)])
def test_wrapped_phase_rejects_non_uint8(bad):
    with pytest.raises(ValueError, match="stack"):
        wrapped_phase(bad, 4)


def test_wrapped_phase_rejects_bad_shapes_and_counts():
    with pytest.raises(ValueError, match="stack"):
        wrapped_phase(np.zeros((4, 8, 8), np.uint8), 4)  # 3-D
    with pytest.raises(ValueError, match="n_steps"):
        wrapped_phase(np.zeros((3, 3, 8, 8), np.uint8), 4)  # fewer steps than declared
    with pytest.raises(ValueError, match="n_steps"):
        wrapped_phase(np.zeros((3, 2, 8, 8), np.uint8), 2)


@pytest.mark.parametrize("freqs", [(), (2, 8), (1, 8, 8), (1, 64, 8), (1, np.nan)])
def test_bad_frequencies(freqs):
    with pytest.raises(ValueError, match="frequencies"):
        check_frequencies(freqs)


def test_unwrap_rejects_mismatch():
    with pytest.raises(ValueError, match="wrapped"):
        unwrap_temporal(np.zeros((2, 5), np.float32), (1, 8, 64))
    with pytest.raises(ValueError, match="max_residual"):
        unwrap_temporal(np.zeros((3, 5), np.float32), (1, 8, 64), max_residual=0.5)
