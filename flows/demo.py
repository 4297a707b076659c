"""``make demo``: the whole chain on the embedded default dataset.

Synthesise a small dataset (``pixelface/demo.yaml``: 8 subjects x 6 expressions plus 16
subjects in the neutral expression only, 640x512 cameras), build it with the orchestrated
pipeline (Prefect flows on a Dask LocalCluster: per view decode -> depth -> texture ->
per-view mesh -> landmark lifting, then per sample fusion, the surface mesh and the
registration to the template, into a Zarr + Parquet store), build it a second time to show
that every stage is cached, build the PCA model, evaluate it (NME / ARMSE of the model
variants fitted to the eval split), write the HTML report, and print where everything is.
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
    extra = f" + {cfg.synth.neutral_subjects} neutral-only subjects" if cfg.synth.neutral_subjects else ""
    _say(quiet, f"[1/6] synthesising {cfg.synth.subjects} subjects x {cfg.synth.expressions} expressions{extra} "
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

    from flows.prefect_env import prefect_api

    with prefect_api(Path(cfg.build.prefect_home)):   # one API server for every flow of the demo
        _say(quiet, f"[2/6] building {store} (Prefect flow run per subject on a Dask LocalCluster)")
        t1 = time.perf_counter()
        first = run_build(cfg.build, on_subject=on_subject)
        t_build = time.perf_counter() - t1
        _say(quiet, "[3/6] rebuilding: every stage must come from the cache")
        t2 = time.perf_counter()
        second = run_build(cfg.build, on_subject=on_subject)
        t_rebuild = time.perf_counter() - t2

        from flows.evaluate import run_evaluate
        from flows.model import run_model
        from flows.report import write_report

        _say(quiet, "[4/6] building the morphable model from the registrations (PCA on Dask)")
        t3 = time.perf_counter()
        model = run_model(cfg.build, cfg.model)
        t_model = time.perf_counter() - t3
        _say(quiet, f"      model {model.model_id}: {model.n_shape_components} shape / {model.n_expression_components} "
                    f"expression components")
        _say(quiet, "[5/6] evaluating: model variants fitted to the eval-split scans")
        t4 = time.perf_counter()
        ev = run_evaluate(cfg.build, cfg.model, cfg.evaluate)
        t_eval = time.perf_counter() - t4
        for r in ev.by_variant:
            _say(quiet, f"      {r['variant']:<15} NME {r['nme']:.4f}  ARMSE(1.0) {r.get('armse_1.0') or float('nan'):.4f}")
        _say(quiet, "[6/6] writing the QC report")
        t5 = time.perf_counter()
        report = write_report(str(store), work / "report", model_id=ev.variants.get("full"), eval_id=ev.eval_id)
        t_report = time.perf_counter() - t5

    totals1, totals2 = first.totals(), second.totals()
    out = {
        "raw": str(raw_root), "ground_truth": str(gt_root), "store": str(store), "report": str(report),
        "model": model.path, "evaluation": ev.path,
        "subjects": len(synth.subjects), "eval_subjects": list(synth.eval_subjects),
        "samples": synth.samples, "views": synth.views,
        "synth_s": round(t_synth, 1), "build_s": round(t_build, 1), "cached_rebuild_s": round(t_rebuild, 1),
        "model_s": round(t_model, 1), "evaluate_s": round(t_eval, 1), "report_s": round(t_report, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "build": {k: round(v, 3) for k, v in totals1.items()},
        "rebuild": {k: round(v, 3) for k, v in totals2.items()},
        "model_summary": model.model_dump(mode="json"),
        "evaluation_by_variant": ev.by_variant,
        "stages": _stage_summary(str(store)),
    }
    (work / "summary.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    _say(quiet, json.dumps({k: v for k, v in out.items() if k not in ("stages", "model_summary")}, indent=1,
                           default=str))
    _say(quiet, f"store:   {store}\nreport:  {report}\nsummary: {work / 'summary.json'}\n"
                f"Prefect home {cfg.build.prefect_home}")
    return 0 if not first.failed and not second.failed and not ev.n_failed_rows else 1
