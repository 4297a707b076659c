"""Stage ``decode`` (per view): raw fringe stack + calibration -> organised point cloud.

Reads the whole view through the validating raw reader (a corrupt view fails here, at once,
with the reader's subject / sample / view / file message), calls
:func:`kernels.decode.decode_view`, stores ``points`` (H, W, 3) float32 mm (world frame,
NaN where invalid), ``depth`` (H, W) float32 IR-frame depth (mm), ``confidence`` (H, W)
float32, ``flags`` (H, W) uint8 and ``modulation`` (H, W) float32.
"""

from __future__ import annotations

import numpy as np

from kernels.decode import DecodeParams, decode_view
from tasks.stage import Sources, StageSpec

VERSION = "1"


def _load(src: Sources, params: DecodeParams) -> dict:
    meta = src.raw.sample_meta()
    v = src.raw.view(src.view)  # reads and validates every file of the view, once per unit
    return dict(stack=v.fringe, ir=v.calibration.ir, projector=v.calibration.projector,
                frequencies=meta.fringe.frequencies, n_steps=meta.fringe.steps)


def _kernel(params: DecodeParams, **kw):
    return decode_view(kw["stack"], kw["ir"], kw["projector"], kw["frequencies"], kw["n_steps"], params)


def _pack(d) -> tuple[dict, dict]:
    arrays = {"points": d.points, "depth": d.depth, "confidence": d.confidence, "flags": d.flags,
              "modulation": d.modulation}
    conf = d.confidence[d.valid]
    qc = {"valid_fraction": d.valid_fraction, "n_points": float(d.valid.sum()),
          "mean_confidence": float(conf.mean()) if conf.size else float("nan"),
          "relative_threshold": d.relative_threshold}
    return arrays, {k: v for k, v in qc.items() if np.isfinite(v)}


SPEC = StageSpec(name="decode", version=VERSION, level="view", raw=True, load=_load, kernel=_kernel, pack=_pack)
