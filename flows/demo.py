"""``make demo``: the longest real chain that exists, on the embedded default dataset.

Today: synthesise a small dataset (``pixelface/demo.yaml``: 8 subjects x 6 expressions,
640x512 cameras), re-read every view through the validating raw reader, and write and
print a summary. Later stages append themselves here as they land.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from flows.synthesize import synthesize
from pixelface.config import load_config
from storage.raw import RawDataset

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "pixelface" / "demo.yaml"


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def run_demo(work: Path, quiet: bool = False, config: Path | None = None) -> int:
    """Run the demo chain in ``work``; returns the exit status."""
    cfg = load_config(config or DEMO_CONFIG)
    work = Path(work)
    raw_root, gt_root = work / "raw", work / "raw-gt"
    workers = max(1, min(os.cpu_count() or 1, cfg.synth.subjects))
    t0 = time.perf_counter()
    _say(quiet, f"[1/2] synthesising {cfg.synth.subjects} subjects x {cfg.synth.expressions} expressions "
                f"at {cfg.synth.rig.width}x{cfg.synth.rig.height} into {raw_root} ({workers} processes)")
    summary = synthesize(cfg.synth, raw_root, gt_root, workers=workers, overwrite=True,
                         on_subject=lambda sid, n: _say(quiet, f"      {sid}: {n} samples"))
    t_synth = time.perf_counter() - t0

    _say(quiet, "[2/2] re-reading every view through the validating raw reader")
    ds = RawDataset(raw_root)
    rows = []
    for sid in ds.subjects():
        meta_s = ds.subject(sid)
        for sample in ds.samples(sid):
            meta = ds.sample(sid, sample)
            for view in meta.views:
                v = ds.read_view(sid, sample, view, meta)
                bright = v.fringe.max(axis=(0, 1)).astype(np.int16) - v.fringe.min(axis=(0, 1))
                rows.append({"subject": sid, "split": meta_s.split, "sample": sample, "view": view,
                             "landmarks_visible": int(v.landmark_visible.sum()),
                             "fringe_pixels_fraction": round(float(np.mean(bright > 40)), 4)})
    out = {
        "raw": str(raw_root), "ground_truth": str(gt_root),
        "subjects": len(summary.subjects), "eval_subjects": list(summary.eval_subjects),
        "samples": summary.samples, "views": len(rows),
        "synth_seconds": round(t_synth, 1),
        "mean_landmarks_visible_per_view": {v: round(float(np.mean([r["landmarks_visible"] for r in rows
                                                                    if r["view"] == v])), 1)
                                            for v in sorted({r["view"] for r in rows})},
        "mean_fringe_pixel_fraction": round(float(np.mean([r["fringe_pixels_fraction"] for r in rows])), 4),
    }
    (work / "summary.json").write_text(json.dumps({"summary": out, "views": rows}, indent=1) + "\n")
    _say(quiet, json.dumps(out, indent=1))
    _say(quiet, f"summary written to {work / 'summary.json'}")
    return 0
