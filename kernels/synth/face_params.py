"""Knobs of the synthetic face model (:mod:`kernels.synth.face`).

All lengths are millimetres, angles are degrees (the field name says so).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class FaceModelParams:
    """Parameters of the parametric head model, validated on construction.

    Attributes
    ----------
    theta_max_deg : float
        Half range of the azimuth ``theta`` of the uv parametrisation (default 125 deg:
        the mesh reaches behind the ears). Must be in [60, 170].
    phi_min_deg, phi_max_deg : float
        Elevation range of the parametrisation (defaults -70 deg = upper neck, +62 deg =
        top of the forehead). ``-85 < phi_min_deg < -40`` and ``40 < phi_max_deg < 85``.
    grid_face_density : float
        Concentration of grid columns on the face, in [0, 0.6] (default 0.3): 0 is a
        uniform azimuth spacing; 0.3 makes the spacing at theta = 0 0.7 times the uniform
        one and 1.6 times at the ends.
    identity_scale : float
        Multiplies every identity standard deviation (default 1; 0 gives every subject
        the mean shape up to age and gender). In [0, 2].
    identity_clip : float
        Identity coefficients are drawn from N(0, 1) truncated to ``[-identity_clip,
        identity_clip]`` (default 3) so that extreme draws cannot fold the surface.
    gender_scale, age_scale : float
        Multipliers of the gender and age displacement fields (default 1), in [0, 2].
    age_range : tuple of int
        Inclusive range of sampled ages in years (default (18, 80)).
    intensity_range : tuple of float
        Per-subject, per-expression intensity drawn uniformly from this range (default
        (0.75, 1.25)); must lie in (0, 1.5].
    mouth_open_deg, surprise_jaw_deg, grin_jaw_deg : float
        Jaw rotation at intensity 1 of ``mouth_open`` (15), ``surprise`` (25) and ``grin``
        (9) in degrees, in [0, 35].
    mouth_cavity_mm : float
        Depth of the mouth cavity behind the open lips at full opening (default 24 mm).
    skin_ir_range : tuple of float
        IR reflectance of the skin from the lightest (skin_tone 0) to the darkest
        (skin_tone 1) subject (default (0.8, 0.55)).
    skin_detail : float
        Standard deviation of the skin's colour detail (freckles, mottling; default 0.08):
        the RGB albedo is multiplied by ``1 + detail``, a random field drawn per subject
        (``Subject.skin_detail_seed``) on the material coordinates, so it moves with the
        skin. 0 disables it. In [0, 0.3]. The IR albedo has none (melanin, which makes
        the visible detail, absorbs little in the near infrared).
    skin_detail_wavelength_mm : tuple of float
        Range of the detail's wavelengths, mm (default (4, 12)); log-uniform.
    skin_detail_waves : int
        Plane waves summed into the detail (default 48; random directions, wavelengths
        and phases).
    """

    theta_max_deg: float = 125.0
    phi_min_deg: float = -70.0
    phi_max_deg: float = 62.0
    grid_face_density: float = 0.3
    identity_scale: float = 1.0
    identity_clip: float = 3.0
    gender_scale: float = 1.0
    age_scale: float = 1.0
    age_range: tuple = (18, 80)
    intensity_range: tuple = (0.75, 1.25)
    mouth_open_deg: float = 15.0
    surprise_jaw_deg: float = 25.0
    grin_jaw_deg: float = 9.0
    mouth_cavity_mm: float = 24.0
    skin_ir_range: tuple = (0.8, 0.55)
    skin_detail: float = 0.08
    skin_detail_wavelength_mm: tuple = (4.0, 12.0)
    skin_detail_waves: int = 48

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            for x in vals:
                if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not np.isfinite(x):
                    raise ValueError(f"FaceModelParams.{f.name}: expected finite number(s), got {v!r}")
        _in(self, "theta_max_deg", 60.0, 170.0)
        _in(self, "phi_min_deg", -85.0, -40.0)
        _in(self, "phi_max_deg", 40.0, 85.0)
        _in(self, "grid_face_density", 0.0, 0.6)
        _in(self, "identity_scale", 0.0, 2.0)
        _in(self, "identity_clip", 0.5, 5.0)
        _in(self, "gender_scale", 0.0, 2.0)
        _in(self, "age_scale", 0.0, 2.0)
        for name in ("mouth_open_deg", "surprise_jaw_deg", "grin_jaw_deg"):
            _in(self, name, 0.0, 35.0)
        _in(self, "mouth_cavity_mm", 0.0, 40.0)
        _in(self, "skin_detail", 0.0, 0.3)
        if int(self.skin_detail_waves) != self.skin_detail_waves or not 1 <= self.skin_detail_waves <= 1000:
            raise ValueError(f"FaceModelParams.skin_detail_waves: expected an integer in [1, 1000], "
                             f"got {self.skin_detail_waves!r}")
        for name in ("age_range", "intensity_range", "skin_ir_range", "skin_detail_wavelength_mm"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or len(v) != 2:
                raise ValueError(f"FaceModelParams.{name}: expected a tuple of 2 numbers, got {v!r}")
        lo, hi = self.age_range
        if int(lo) != lo or int(hi) != hi or not 18 <= lo <= hi <= 80:
            raise ValueError(f"FaceModelParams.age_range: expected integers 18 <= lo <= hi <= 80, got {self.age_range!r}")
        lo, hi = self.intensity_range
        if not 0.0 < lo <= hi <= 1.5:
            raise ValueError(f"FaceModelParams.intensity_range: expected 0 < lo <= hi <= 1.5, got {self.intensity_range!r}")
        lo, hi = self.skin_detail_wavelength_mm
        if not 0.5 <= lo <= hi <= 100.0:
            raise ValueError(f"FaceModelParams.skin_detail_wavelength_mm: expected 0.5 <= lo <= hi <= 100, "
                             f"got {self.skin_detail_wavelength_mm!r}")
        if not all(0.05 <= x <= 1.0 for x in self.skin_ir_range):
            raise ValueError(f"FaceModelParams.skin_ir_range: values must be in [0.05, 1], got {self.skin_ir_range!r}")


def _in(p: FaceModelParams, name: str, lo: float, hi: float) -> None:
    v = getattr(p, name)
    if not lo <= v <= hi:
        raise ValueError(f"FaceModelParams.{name}: must be in [{lo}, {hi}], got {v!r}")
