"""``make demo``: the longest real chain that exists, on the embedded default dataset.

Today: synthesise a small dataset (``pixelface/demo.yaml``: 8 subjects x 6 expressions,
640x512 cameras), build it with the orchestrated pipeline (Prefect flows on a Dask
LocalCluster: per view decode -> depth -> texture -> per-view mesh -> landmark lifting,
then per sample fusion and the surface mesh, into a Zarr + Parquet store), build it a second time to show that every stage is cached, and
print a summary of the stage-run table. Later stages append themselves here as they land.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flows.synthesize import synthesize
from pixelface.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "pixelface" / "demo.yaml"


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def _stage_summary(store_url: str) -> dict:
    """Per stage: rows by status and the median of each QC metric (latest run of each stage)."""
    import numpy as np

    from storage.store import open_store

    rows = open_store(store_url, create=False).catalog.latest("stage_runs").to_pylist()
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["stage"], {"rows": 0, "status": {}, "qc": {}})
        s["rows"] += 1
        s["status"][r["status"]] = s["status"].get(r["status"], 0) + 1
        for k, v in (r.get("qc") or {}).items() if isinstance(r.get("qc"), dict) else (r.get("qc") or []):
            s["qc"].setdefault(k, []).append(v)
    for s in out.values():
        s["qc"] = {k: round(float(np.median(v)), 4) for k, v in s["qc"].items()}
    return out


def run_demo(work: Path, quiet: bool = False, config: Path | None = None) -> int:
    """Run the demo chain in ``work``; returns the exit status (1 if any sample failed)."""
    work = Path(work).resolve()
    raw_root, gt_root, store = work / "raw", work / "raw-gt", work / "store"
    cfg = load_config(config or DEMO_CONFIG, {"build": {
        "raw": str(raw_root), "store": str(store), "prefect_home": str(work / "prefect"),
        "dask_local_directory": str(work / "dask")}})
    workers = max(1, min(os.cpu_count() or 1, cfg.synth.subjects))
    t0 = time.perf_counter()
    _say(quiet, f"[1/3] synthesising {cfg.synth.subjects} subjects x {cfg.synth.expressions} expressions "
                f"at {cfg.synth.rig.width}x{cfg.synth.rig.height} into {raw_root} ({workers} processes)")
    synth = synthesize(cfg.synth, raw_root, gt_root, workers=workers, overwrite=True,
                       on_subject=lambda sid, n: _say(quiet, f"      {sid}: {n} samples"))
    t_synth = time.perf_counter() - t0

    from flows.prefect_env import configure_environment

    configure_environment(Path(cfg.build.prefect_home))
    from flows.build import run_build

    def on_subject(s):
        _say(quiet, f"      {s.subject}: {s.computed} computed, {s.cached} cached, "
                    f"{'ok' if s.ok else str(s.failed) + ' failed'}")

    _say(quiet, f"[2/3] building {store} (Prefect flow run per subject on a Dask LocalCluster)")
    t1 = time.perf_counter()
    first = run_build(cfg.build, on_subject=on_subject)
    t_build = time.perf_counter() - t1
    _say(quiet, "[3/3] rebuilding: every stage must come from the cache")
    t2 = time.perf_counter()
    second = run_build(cfg.build, on_subject=on_subject)
    t_rebuild = time.perf_counter() - t2

    totals1, totals2 = first.totals(), second.totals()
    out = {
        "raw": str(raw_root), "ground_truth": str(gt_root), "store": str(store),
        "subjects": len(synth.subjects), "eval_subjects": list(synth.eval_subjects),
        "samples": synth.samples, "views": synth.views,
        "synth_s": round(t_synth, 1), "build_s": round(t_build, 1), "cached_rebuild_s": round(t_rebuild, 1),
        "build": {k: round(v, 3) for k, v in totals1.items()},
        "rebuild": {k: round(v, 3) for k, v in totals2.items()},
        "stages": _stage_summary(str(store)),
    }
    (work / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    _say(quiet, json.dumps(out, indent=1))
    _say(quiet, f"summary written to {work / 'summary.json'}; Prefect home {cfg.build.prefect_home}")
    return 0 if not first.failed and not second.failed else 1
