"""Benchmark: expression scans registered from the same subject's neutral registration.

Usage::

    python -m benchmarks.reg_from_neutral --size small --json out.json            # 22 expressions x B000-B002
    python -m benchmarks.reg_from_neutral --size full --json out.json \\
        --expressions neutral,grin,surprise,cheek_blow                             # 20k template, 100k scan
    python -m benchmarks.reg_from_neutral --size small --json out.json --robustness  # + missing data, landmarks

Per subject (``benchmarks.registration._subject``: B000, B001, ...), the neutral scan is
registered from the mean-face template (:func:`kernels.registration.register`, default
parameters, with its scan texture so that it carries ``detail``); then every other
expression scan three times: **baseline** (from the mean face, as the paper does; the
pipeline with ``--no-register-from-neutral``), **from_neutral_geometry** (``start_vertices``
= that neutral registration, default :class:`kernels.registration.StartParams`, no scan
texture: stage 2c does not run) and **from_neutral** (the same with the scan's colours and
the neutral's ``detail``: the photometric stage 2c runs, as in the pipeline). Scans and
errors as in ``benchmarks.registration`` (:func:`~benchmarks.registration.synthetic_scan`
with its colours, :func:`~benchmarks.registration.evaluate`: the correspondence error
against the simulator's dense GT over the observed face region).

The JSON holds ``rows`` (subject, expression, method, ``corr_mm``, ``p95_mm``,
``surface_mm``, per-part errors, ``flipped``, ``degenerate``, ``time_s``, the start's QC) and
``summary[method]``: the mean over all rows, per-expression means over subjects, the
ratios of grin / surprise / cheek_blow / mouth_open to neutral, the mean time of the
non-neutral registrations. The neutral rows are shared (both methods use the same neutral
registration). ``--robustness`` adds the missing-data (10 % hole) and landmark-noise
(2 px + 5 wrong) cases of ``benchmarks.registration`` re-run from the neutral start.

The process pins itself to one core; BLAS / OpenMP threads are set to 1 before numpy loads.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.registration import (  # noqa: E402
    SIZES, _pin_one_core, _subject, evaluate, missing_data_scan, px_to_mm, synthetic_scan, wrong_landmarks,
)

PARTS = ("forehead", "eyes", "nose", "cheeks", "mouth", "chin_jaw")
RATIOS = ("grin", "surprise", "cheek_blow", "mouth_open")
METHODS = ("baseline", "from_neutral_geometry", "from_neutral")
MISSING_CASES = (("smile", 1), ("brow_lower", 2), ("kiss", 0), ("grin", 1), ("surprise", 2))
LANDMARK_CASES = (("smile", 1), ("eyes_closed", 2), ("mouth_left", 0), ("grin", 1), ("surprise", 2))


def _row(T, r, sc, dt: float) -> dict:
    ev = evaluate(T, r.vertices, sc)
    out = {"corr_mm": ev["corr_mean_mm"], "p95_mm": ev["corr_p95_mm"], "surface_mm": ev["surface_mm"],
           "flipped": int(r.qc["n_flipped"]), "degenerate": int(r.qc["n_degenerate"]), "time_s": dt,
           "jaw_deg": float(r.qc["jaw_angle_deg"]), "start": float(r.qc["start"]),
           "start_rigid_rmse_mm": float(r.qc["start_rigid_rmse_mm"]), "texture_s": float(r.qc["texture_s"]),
           "texture_matched_fraction": float(r.qc["texture_matched_fraction"])}
    for p in PARTS:
        out[p] = ev.get(f"corr_{p}_mm")
    return out


def sweep(size: str, n_subjects: int, expressions: list[str]) -> dict:
    """Baseline and from-neutral registrations of ``expressions`` for subjects B000.. (see module doc)."""
    from kernels.nicp import prepare_template
    from kernels.photometric import ScanTexture
    from kernels.registration import RegistrationParams, StartParams, register
    from kernels.template import default_template

    nt, ns = SIZES[size]
    T = default_template(nt)
    params = RegistrationParams()
    prep = prepare_template(T, params.nicp)
    out = {"size": size, "template_vertices": int(T.n_vertices), "scan_vertices_target": ns,
           "start_params": repr(StartParams()), "rows": []}
    for k in range(n_subjects):
        subj = _subject(k)
        sc = synthetic_scan(subj, "neutral", ns, rng=k)
        t0 = time.perf_counter()
        rn = register(prep, sc["vertices"], sc["faces"], sc["landmarks"], params,
                      scan_texture=ScanTexture(sc["vertices"], sc["colours"], params.photometric))
        base_n = _row(T, rn, sc, time.perf_counter() - t0)
        for m in METHODS:
            out["rows"].append({"subject": subj.subject_id, "expression": "neutral", "method": m, **base_n})
        for e in expressions:
            if e == "neutral":
                continue
            sc = synthetic_scan(subj, e, ns, rng=k)
            res = {}
            for m in METHODS:
                t0 = time.perf_counter()
                kw = {}
                if m != "baseline":
                    kw["start_vertices"] = rn.vertices
                if m == "from_neutral":     # the scan texture is built inside the timed span
                    kw["scan_texture"] = ScanTexture(sc["vertices"], sc["colours"], params.photometric)
                    kw["start_detail"] = rn.detail
                r = register(prep, sc["vertices"], sc["faces"], sc["landmarks"], params, **kw)
                res[m] = _row(T, r, sc, time.perf_counter() - t0)
                out["rows"].append({"subject": subj.subject_id, "expression": e, "method": m, **res[m]})
            print(f"{subj.subject_id} {e:18s} " + "  ".join(f"{m} {res[m]['corr_mm']:.3f} mm "
                                                          f"({res[m]['time_s']:.1f} s)" for m in METHODS), flush=True)
    out["summary"] = summarise(out["rows"])
    return out


def summarise(rows: list[dict]) -> dict:
    """Per method: mean over all rows, per-expression means, ratios to neutral, extremes, mean time."""
    summ = {}
    for m in METHODS:
        rm = [r for r in rows if r["method"] == m]
        exprs = list(dict.fromkeys(r["expression"] for r in rm))
        per = {e: float(np.mean([r["corr_mm"] for r in rm if r["expression"] == e])) for e in exprs}
        non_neutral = [r for r in rm if r["expression"] != "neutral"]
        summ[m] = {
            "mean_all_mm": float(np.mean([r["corr_mm"] for r in rm])),
            "p95_mean_mm": float(np.mean([r["p95_mm"] for r in rm])),
            "per_expression_mm": per,
            "ratio_to_neutral": {e: per[e] / per["neutral"] for e in RATIOS if e in per},
            "surface_max_mm": float(max(r["surface_mm"] for r in rm)),
            "flipped_max": int(max(r["flipped"] for r in rm)),
            "degenerate_max": int(max(r["degenerate"] for r in rm)),
            "time_mean_s": float(np.mean([r["time_s"] for r in non_neutral])) if non_neutral else float("nan"),
            "texture_s_mean": float(np.mean([r["texture_s"] for r in non_neutral])) if non_neutral else float("nan"),
            "parts_mm": {e: {p: float(np.mean([r[p] for r in rm if r["expression"] == e and r[p] is not None]))
                             for p in PARTS} for e in ("neutral", *RATIOS) if e in per},
        }
    return summ


def robustness(size: str) -> dict:
    """Missing data (10 % hole) and 2 px landmark noise + 5 wrong landmarks, from the neutral start.

    Ratios are against the same expression registered from the same start with complete data /
    clean landmarks; the start is the neutral registration of the complete, clean neutral scan.
    Every registration has its scan texture (stage 2c runs, as in the pipeline).
    """
    from kernels.nicp import prepare_template
    from kernels.photometric import ScanTexture
    from kernels.registration import RegistrationParams, register
    from kernels.template import default_template

    nt, ns = SIZES[size]
    T = default_template(nt)
    params = RegistrationParams()
    prep = prepare_template(T, params.nicp)
    starts: dict = {}

    def tex(sc):
        return ScanTexture(sc["vertices"], sc["colours"], params.photometric)

    def start(k):
        if k not in starts:
            sc = synthetic_scan(_subject(k), "neutral", ns, rng=k)
            rn = register(prep, sc["vertices"], sc["faces"], sc["landmarks"], params, scan_texture=tex(sc))
            starts[k] = {"start_vertices": rn.vertices, "start_detail": rn.detail}
        return starts[k]

    res = {"missing": [], "landmarks": []}
    for e, k in MISSING_CASES:
        subj = _subject(k)
        full = synthetic_scan(subj, e, ns, rng=k)
        holed = missing_data_scan(subj, e, ns, rng=k)
        r_f = register(prep, full["vertices"], full["faces"], full["landmarks"], params, scan_texture=tex(full),
                       **start(k))
        r_h = register(prep, holed["vertices"], holed["faces"], holed["landmarks"], params, scan_texture=tex(holed),
                       **start(k))
        ev_f, ev_h = evaluate(T, r_f.vertices, full), evaluate(T, r_h.vertices, holed)
        keep = ev_h["_region"] & ev_f["_region"]
        res["missing"].append({"expression": e, "subject": subj.subject_id,
                               "ratio": float(ev_h["_err"][keep].mean() / ev_f["_err"][keep].mean()),
                               "flipped": int(r_h.qc["n_flipped"]), "surface_mm": ev_h["surface_mm"]})
    px = px_to_mm()
    for e, k in LANDMARK_CASES:
        subj = _subject(k)
        sc = synthetic_scan(subj, e, ns, rng=k)
        r0 = register(prep, sc["vertices"], sc["faces"], sc["landmarks"], params, scan_texture=tex(sc), **start(k))
        g = np.random.default_rng(1000 + k)
        L = sc["landmarks"].copy()
        L[:, :2] += g.normal(0.0, 2.0 * px, (L.shape[0], 2))
        Lw, _ = wrong_landmarks(L, 5, rng=2000 + k)
        r1 = register(prep, sc["vertices"], sc["faces"], Lw, params, scan_texture=tex(sc), **start(k))
        e0, e1 = evaluate(T, r0.vertices, sc), evaluate(T, r1.vertices, sc)
        res["landmarks"].append({"expression": e, "subject": subj.subject_id, "clean_mm": e0["corr_mean_mm"],
                                 "noisy_mm": e1["corr_mean_mm"], "ratio": e1["corr_mean_mm"] / e0["corr_mean_mm"],
                                 "flipped": int(r1.qc["n_flipped"])})
    res["missing_ratio_max"] = max(c["ratio"] for c in res["missing"])
    res["landmark_ratio_max"] = max(c["ratio"] for c in res["landmarks"])
    return res


def _table(summ: dict) -> str:
    lines = [f"{'method':22s} {'all':>6s} {'neutral':>8s} " + " ".join(f"{e:>10s}" for e in RATIOS)
             + "   ratios " + " ".join(f"{e[:8]:>8s}" for e in RATIOS) + "  time"]
    for m, s in summ.items():
        per, rat = s["per_expression_mm"], s["ratio_to_neutral"]
        lines.append(f"{m:22s} {s['mean_all_mm']:6.3f} {per['neutral']:8.3f} "
                     + " ".join(f"{per[e]:10.3f}" if e in per else f"{'-':>10s}" for e in RATIOS) + "          "
                     + " ".join(f"{rat[e]:8.2f}" if e in rat else f"{'-':>8s}" for e in RATIOS)
                     + f"  {s['time_mean_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    from kernels.synth.face import expression_names

    p = argparse.ArgumentParser(prog="python -m benchmarks.reg_from_neutral", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--subjects", type=int, default=3, help="subjects B000.. (default 3)")
    p.add_argument("--expressions", default="all", help="comma-separated names or 'all' (default; 22)")
    p.add_argument("--robustness", action="store_true", help="also missing data and landmark noise, from neutral")
    a = p.parse_args(argv)
    names = list(expression_names())
    exprs = names if a.expressions == "all" else [e.strip() for e in a.expressions.split(",") if e.strip()]
    unknown = [e for e in exprs if e not in names]
    if unknown:
        p.error(f"--expressions: unknown {unknown} (known: {', '.join(names)})")
    if a.subjects < 1:
        p.error("--subjects: must be >= 1")
    _pin_one_core()
    t0 = time.perf_counter()
    res = sweep(a.size, a.subjects, exprs)
    if a.robustness:
        res["robustness"] = robustness(a.size)
        print(json.dumps({k: v for k, v in res["robustness"].items() if k.endswith("_max")}))
    res["total_s"] = time.perf_counter() - t0
    print(_table(res["summary"]), flush=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
