"""decode_view on analytic scenes rendered by tests/_fringe.py (docs/image-model.md)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.decode import DecodeParams, decode_view
from kernels.phase import MaskFlag
from tests._fringe import Photometry, Plane, Sphere, make_group, render

W, H = 320, 256
F = (1, 8, 64)


@pytest.fixture(scope="module")
def group():
    return make_group(W, H, distortion=True)


@pytest.mark.parametrize("n_steps", [3, 4, 5, 8, 12])
def test_plane_each_n(group, n_steps):
    r = render(group, Plane(normal=(0.15, 0.1, 1.0)), F, n_steps, photometry=Photometry(sigma_read=0.5), rng=n_steps)
    dv = decode_view(r.stack, group.ir, group.projector, F, n_steps)
    v = dv.valid
    assert v.sum() > 0.9 * v.size
    err = np.linalg.norm(dv.points[v] - r.points[v], axis=1)
    assert err.max() < 0.05, err.max()
    # masked pixels are NaN (never zero), valid confidence in [0, 1]
    assert np.all(np.isnan(dv.points[~v])) and np.all(np.isnan(dv.depth[~v]))
    assert np.all((dv.confidence[v] >= 0) & (dv.confidence[v] <= 1)) and np.all(np.isnan(dv.confidence[~v]))
    assert np.array_equal(v, dv.flags == 0)


@pytest.mark.parametrize("distortion", [False, True])
def test_distortion_on_and_off(distortion):
    g = make_group(W, H, distortion=distortion)
    r = render(g, Sphere(), F, 4, photometry=Photometry(sigma_read=2.0, k_shot=0.1), rng=3)
    dv = decode_view(r.stack, g.ir, g.projector, F, 4)
    v = dv.valid
    assert v.sum() > 0.8 * (r.modulation > 15).sum()
    err = np.linalg.norm(dv.points[v] - r.points[v], axis=1)
    assert np.sqrt(np.mean(err ** 2)) < 0.1
    # a decoder that ignored the lens distortion would be off by millimetres in the corners
    assert np.percentile(err, 99.9) < 1.0


def test_four_levels_twelve_steps(group):
    f4 = (1, 4, 16, 64)
    r = render(group, Sphere(), f4, 12, photometry=Photometry(sigma_read=2.0, k_shot=0.1), rng=4)
    dv = decode_view(r.stack, group.ir, group.projector, f4, 12)
    v = dv.valid
    assert v.sum() > 0.8 * (r.modulation > 15).sum()
    period = group.projector.width / 64
    k = np.rint((dv.projector_x[v] - r.projector_x[v]) / period)
    assert np.count_nonzero(k) == 0


def test_dark_patch_and_projector_shadow_are_masked(group):
    def albedo(X):
        dark = (X[:, 0] > 20) & (X[:, 0] < 60) & (X[:, 1] > -40) & (X[:, 1] < 0)
        return np.where(dark, 0.03, 0.8)

    r = render(group, Plane(), F, 4, albedo=albedo, shadow_rows=(300.0, 340.0),
               photometry=Photometry(sigma_read=2.0, k_shot=0.1), rng=5)
    dv = decode_view(r.stack, group.ir, group.projector, F, 4)
    dark = r.albedo < 0.1
    shadow = ~r.lit & np.isfinite(r.projector_x)
    assert dark.sum() > 100 and shadow.sum() > 100
    for region in (dark, shadow):
        assert not np.any(dv.valid[region])
        assert np.all(np.isnan(dv.points[region]))
        assert np.all(dv.flags[region] & (MaskFlag.LOW_MODULATION | MaskFlag.LOW_RELATIVE_MODULATION))
    lit = r.lit & ~dark
    assert dv.valid[lit].mean() > 0.95


def test_saturation_flag(group):
    r = render(group, Plane(), F, 4, albedo=1.0, photometry=Photometry(peak=400.0), rng=6)
    dv = decode_view(r.stack, group.ir, group.projector, F, 4)
    sat = (r.stack == 255).any(axis=(0, 1))
    assert sat.sum() > 100
    assert np.all(dv.flags[sat] & MaskFlag.SATURATED) and not np.any(dv.valid[sat])


def test_group_frame_equals_world_frame_transformed(group):
    r = render(group, Plane(), F, 4, rng=7)
    dw = decode_view(r.stack, group.ir, group.projector, F, 4)
    di = decode_view(r.stack, group.ir, group.projector, F, 4, frame="ir")
    v = dw.valid
    back = (di.points[v] - group.ir.t) @ group.ir.R  # IR -> world
    assert np.max(np.abs(back - dw.points[v])) < 2e-3


def test_bad_inputs(group):
    st = render(group, Plane(), F, 4).stack
    args = (group.ir, group.projector, F, 4)
    with pytest.raises(ValueError, match="stack"):
        decode_view(st.astype(np.uint16), *args)
    with pytest.raises(ValueError, match="stack"):
        decode_view(st.astype(np.float32), *args)
    with pytest.raises(ValueError, match="stack"):
        decode_view(st[0], *args)  # wrong number of dimensions
    with pytest.raises(ValueError, match="stack"):
        decode_view(st[:, :3], *args)  # fewer steps than declared
    with pytest.raises(ValueError, match="stack"):
        decode_view(st[:2], *args)  # fewer frequencies than declared
    with pytest.raises(ValueError, match="stack"):
        decode_view(st[:, :, :100], *args)  # not the IR camera's size
    with pytest.raises(ValueError, match="n_steps"):
        decode_view(st, group.ir, group.projector, F, 2)
    with pytest.raises(ValueError, match="frequencies"):
        decode_view(st, group.ir, group.projector, (2, 8, 64), 4)
    with pytest.raises(ValueError, match="params"):
        decode_view(st, *args, params={"min_modulation": 3})
    with pytest.raises(ValueError, match="min_modulation"):
        DecodeParams(min_modulation=0)


# -- fused (numba) path against the numpy reference path --------------------------------------

def _assert_views_match(a, b):
    assert np.array_equal(a.flags, b.flags)
    assert np.array_equal(a.modulation, b.modulation)
    assert a.relative_threshold == b.relative_threshold
    v = a.valid
    for name in ("points", "depth", "projector_x", "confidence"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.array_equal(np.isnan(x), np.isnan(y)), name
    # only the wrapped phase differs (polynomial atan2, <= 4e-7 rad): ~1e-4 projector px
    assert np.max(np.abs(a.projector_x[v] - b.projector_x[v])) < 2e-3
    assert np.max(np.abs(a.points[v] - b.points[v])) < 5e-3
    assert np.max(np.abs(a.confidence[v] - b.confidence[v])) < 1e-5


@pytest.mark.parametrize("frame", ["world", "ir"])
@pytest.mark.parametrize("scene", ["sphere", "dark_patch"])
def test_numba_engine_matches_numpy(group, frame, scene):
    pytest.importorskip("numba")
    if scene == "sphere":
        r = render(group, Sphere(), F, 4, photometry=Photometry(sigma_read=3.0, k_shot=0.1), rng=11)
    else:
        def albedo(X):
            dark = (X[:, 0] > 20) & (X[:, 0] < 60) & (X[:, 1] > -40) & (X[:, 1] < 0)
            return np.where(dark, 0.03, 0.8)
        r = render(group, Plane(normal=(0.1, -0.2, 1.0)), F, 4, albedo=albedo, shadow_rows=(300.0, 340.0),
                   photometry=Photometry(sigma_read=3.0, k_shot=0.1, peak=300.0), rng=12)  # dark, shadow, saturated
    a = decode_view(r.stack, group.ir, group.projector, F, 4, frame=frame, engine="numpy")
    b = decode_view(r.stack, group.ir, group.projector, F, 4, frame=frame, engine="numba")
    assert a.valid.sum() > 1000
    _assert_views_match(a, b)


def test_numba_engine_params_and_levels(group):
    pytest.importorskip("numba")
    f4 = (1, 4, 16, 64)
    r = render(group, Sphere(), f4, 4, photometry=Photometry(sigma_read=3.0, k_shot=0.1), rng=13)
    for params in (DecodeParams(), DecodeParams(smooth_filter=1, edge_jump=0.0),
                   DecodeParams(edge_step=0.0, relative_modulation=0.0, min_bin_snr=40.0)):
        a = decode_view(r.stack, group.ir, group.projector, f4, 4, params, engine="numpy")
        b = decode_view(r.stack, group.ir, group.projector, f4, 4, params, engine="numba")
        _assert_views_match(a, b)


def test_engine_argument(group):
    r = render(group, Sphere(), F, 3, rng=14)
    with pytest.raises(ValueError, match="engine"):
        decode_view(r.stack, group.ir, group.projector, F, 3, engine="fast")
    with pytest.raises(ValueError, match="engine"):  # the fused path covers N = 4 only
        decode_view(r.stack, group.ir, group.projector, F, 3, engine="numba")
    # "auto" falls back to numpy for N != 4
    a = decode_view(r.stack, group.ir, group.projector, F, 3)
    b = decode_view(r.stack, group.ir, group.projector, F, 3, engine="numpy")
    assert np.array_equal(a.points, b.points, equal_nan=True)
