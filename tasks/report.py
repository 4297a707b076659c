"""Tasks of the QC report (``flows/report.py``): gather what a store holds, draw PNG plots, write one
static ``index.html`` next to them.

Three steps, each a Prefect task (and a plain function through ``.fn``):

* :func:`gather_report` reads everything through ``storage/`` (read-only): the catalog (every
  ``stage_runs`` row for the build list, the newest row per subject/sample/view/stage for the QC),
  the model card and faces (:func:`storage.models.read_model`), the evaluation tables
  (:func:`storage.models.read_evaluation`) and three registration artifacts (best, median and
  worst sample by ``mean_distance_mm``) -> :class:`ReportData`;
* :func:`render_plots` draws the PNGs with matplotlib's Agg canvas (``matplotlib.figure.Figure``,
  no pyplot state, safe in threads); a plot that cannot be drawn is reported in the page, the
  others are still drawn;
* :func:`write_html` writes ``index.html`` (inline CSS, no script, relative links to the PNGs).

A section whose data is absent (no model, no evaluation, no registration) says so and what
produces it. Which model and evaluation: the ones asked for, else the newest evaluation and the
model of its ``full`` variant, else the newest model labelled ``full``, else the newest model.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.keys import ArtifactRef
from storage.store import open_store

VARIANT_ORDER = ("full", "shape-20%", "expression-20%", "both-20%")
"""Model variants of the evaluation flow, in the order of the paper's Table 2."""
STAGE_ORDER = ("plan", "decode", "depth", "texture", "mesh", "landmarks", "fusion", "surface", "registration")
OUTCOME_ORDER = ("computed", "cached", "reused", "failed", "upstream_failed")
OUTCOME_COLOURS = {"computed": "#2e7d32", "cached": "#1565c0", "reused": "#64b5f6", "failed": "#c62828",
                   "upstream_failed": "#ef6c00"}
CATEGORY_ORDER = ("neutral", "positive", "negative")
PLOT_NAMES = ("variance", "model_quality", "nme", "armse_variant", "armse_age", "armse_category",
              "armse_expression", "outcomes", "qc_decode", "qc_fusion", "qc_surface", "qc_registration",
              "heatmaps")
"""Every PNG the report can write (``<name>.png``); stale ones of an earlier report are removed."""
MAX_LISTED = 300
"""At most this many failed rows are listed (the count of the others is given)."""
DPI = 110

_ARMSE = re.compile(r"^armse_(\d+(?:\.\d+)?)$")
_FUSION_VIEW_QC = re.compile(r"^(?P<view>.+)_(?P<what>rmse_mm|fitness)$")


# -- data --------------------------------------------------------------------------------------

@dataclass
class HeatMesh:
    """One registered mesh with its per-vertex distance to the scan (mm)."""

    pick: str
    subject: str
    sample: str
    expression: str | None
    mean_distance_mm: float
    vertices: np.ndarray
    distance: np.ndarray
    valid: np.ndarray
    faces: np.ndarray | None


@dataclass
class ReportData:
    """Everything the report shows, gathered from one store."""

    store: str
    made_at: datetime
    all_runs: list[dict]
    runs: list[dict]
    """Newest ``stage_runs`` row per subject/sample/view/stage (``qc`` as a dict)."""
    subjects: list[dict]
    samples: list[dict]
    model_id: str | None = None
    model_card: dict | None = None
    model_note: str = ""
    n_model_vertices: int | None = None
    eval_id: str | None = None
    eval_card: dict | None = None
    eval_tables: dict[str, list[dict]] = field(default_factory=dict)
    eval_note: str = ""
    heat: list[HeatMesh] = field(default_factory=list)
    heat_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def build_ids(self) -> list[str]:
        """Build ids of every ``stage_runs`` row, oldest first."""
        seen: dict[str, None] = {}
        for r in self.all_runs:
            seen.setdefault(r["build_id"], None)
        return list(seen)


def _qc(value: Any) -> dict[str, float]:
    if not value:
        return {}
    items = value.items() if isinstance(value, dict) else value
    return {str(k): float(v) for k, v in items if v is not None}


def _row(r: dict) -> dict:
    return {**r, "qc": _qc(r.get("qc"))}


def _pick_model(store: str, model_id: str | None, eval_card: dict | None) -> tuple[str | None, dict, dict, str]:
    """(model id, arrays, card, note): the asked model, else the evaluation's ``full`` variant, else the newest
    model labelled ``full``, else the newest model; ``None`` and a note when the store has none."""
    from storage.models import list_models, read_model

    ids = list_models(store)
    if model_id is not None:
        if model_id not in ids:
            raise FileNotFoundError(f"store {store}: no model {model_id!r} (published models: {ids or 'none'})")
        return (model_id, *read_model(store, model_id), "")
    if not ids:
        return None, {}, {}, "No model in this store yet: run `pixelface model --store STORE` after the build."
    full = (eval_card or {}).get("variants", {}).get("full")
    if full in ids:
        return (full, *read_model(store, full), "")
    for i in reversed(ids):  # newest first; the reduced variants of an evaluation are labelled otherwise
        arrays, card = read_model(store, i)
        if card.get("label", "full") == "full":
            return i, arrays, card, ""
    return (ids[-1], *read_model(store, ids[-1]), "")


def _pick_registrations(runs: list[dict]) -> list[tuple[str, dict]]:
    """(pick, row) for the best, median and worst completed registration by ``mean_distance_mm``."""
    regs = [r for r in runs if r["stage"] == "registration" and r["status"] == "completed" and r["artifact_key"]
            and math.isfinite(r["qc"].get("mean_distance_mm", math.nan))]
    if not regs:
        return []
    regs.sort(key=lambda r: (r["qc"]["mean_distance_mm"], r["subject_id"], r["sample_id"]))
    picks = {"best": 0, "median": (len(regs) - 1) // 2, "worst": len(regs) - 1}
    out, used = [], set()
    for name, i in picks.items():
        if i not in used:
            used.add(i)
            out.append((name, regs[i]))
    return out


@task(name="gather-report", cache_policy=NO_CACHE, persist_result=False)
def gather_report(store: str, model_id: str | None = None, eval_id: str | None = None) -> ReportData:
    """Read what the report shows from ``store`` (read-only).

    Raises
    ------
    FileNotFoundError
        No store at ``store``, or an explicitly named model / evaluation is not in it.
    """
    from storage.models import list_evaluations, read_evaluation

    st = open_store(store, create=False, read_only=True)
    cat = st.catalog
    data = ReportData(store=str(st.url), made_at=datetime.now(timezone.utc),
                      all_runs=cat.read("stage_runs").to_pylist(),
                      runs=[_row(r) for r in cat.latest("stage_runs").to_pylist()],
                      subjects=cat.latest("subjects").to_pylist(), samples=cat.latest("samples").to_pylist())
    # evaluation first: its `full` variant names the model to show
    if eval_id is not None or list_evaluations(store):
        if eval_id is not None and eval_id not in list_evaluations(store):
            raise FileNotFoundError(f"store {store}: no evaluation {eval_id!r} "
                                    f"(published evaluations: {list_evaluations(store) or 'none'})")
        tables, card = read_evaluation(store, eval_id)
        data.eval_id, data.eval_card = card["eval_id"], card
        data.eval_tables = {k: t.to_pylist() for k, t in tables.items()}
    else:
        data.eval_note = ("No evaluation in this store yet: run `pixelface evaluate --store STORE` after the "
                          "model.")
    mid, arrays, card, note = _pick_model(store, model_id, data.eval_card)
    faces = None
    if mid is None:
        data.model_note = note
    else:
        data.model_id, data.model_card = mid, card
        faces = np.asarray(arrays["faces"], dtype=np.int64) if "faces" in arrays else None
        data.n_model_vertices = int(np.asarray(arrays["mean"]).reshape(-1, 3).shape[0]) if "mean" in arrays else None
        del arrays
    samples = {(s["subject_id"], s["sample_id"]): s for s in data.samples}
    picks = _pick_registrations(data.runs)
    if not picks:
        data.heat_note = ("No completed registration with a mean_distance_mm QC value in the catalog: the heat maps "
                          "need the registration stage of `pixelface build`.")
    for pick, r in picks:
        ref = ArtifactRef("registration", r["subject_id"], r["sample_id"], None, r["artifact_key"])
        where = f"{r['subject_id']}/{r['sample_id']}"
        try:
            m = st.artifacts.manifest(ref)
            if m is None:
                raise FileNotFoundError(f"artifact {ref.key[:12]} is not in the store")
            names = [n for n in ("vertices", "distance", "valid") if n in m.arrays]
            a = st.artifacts.read(ref, names)
            V = np.asarray(a["vertices"], dtype=np.float64)
            d = np.asarray(a["distance"], dtype=np.float64)
        except (OSError, KeyError, ValueError) as exc:
            data.notes.append(f"heat map of {where} ({pick}): cannot read the registration: {type(exc).__name__}: "
                              f"{exc}")
            continue
        valid = np.asarray(a["valid"], dtype=bool) if "valid" in a else np.ones(len(V), bool)
        valid = valid & np.isfinite(d)
        F = faces if faces is not None and data.n_model_vertices == len(V) else None
        data.heat.append(HeatMesh(pick=pick, subject=r["subject_id"], sample=r["sample_id"],
                                  expression=samples.get((r["subject_id"], r["sample_id"]), {}).get("expression"),
                                  mean_distance_mm=float(r["qc"]["mean_distance_mm"]), vertices=V, distance=d,
                                  valid=valid, faces=F))
    if data.heat and all(h.faces is None for h in data.heat):
        data.heat_note = ("No model with the registrations' topology: the heat maps show the registered vertices as "
                          "points (a model's faces draw them as surfaces).")
    return data


# -- evaluation helpers ----------------------------------------------------------------------------

def radii_of(rows: Iterable[dict]) -> list[float]:
    """The ARMSE radii present as ``armse_<r>`` columns, ascending."""
    found = set()
    for r in rows:
        for k in r:
            m = _ARMSE.match(k)
            if m:
                found.add(float(m.group(1)))
    return sorted(found)


def _rkey(r: float, mm: bool = False) -> str:
    return f"armse_{r:.1f}" + ("_mm" if mm else "")


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _variant_sort(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(n for n in names if n is not None))
    return sorted(names, key=lambda n: (VARIANT_ORDER.index(n) if n in VARIANT_ORDER else len(VARIANT_ORDER), n))


def _age_sort(g: Any) -> tuple:
    m = re.match(r"^(\d+)", str(g))
    return (0, int(m.group(1)), "") if m else (1, 0, str(g))


def _category_sort(c: Any) -> tuple:
    return (CATEGORY_ORDER.index(c), "") if c in CATEGORY_ORDER else (len(CATEGORY_ORDER), str(c))


def group_means(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Mean of each metric over rows without ``error``, per value of ``keys`` (with the count ``n``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("error"):
            continue
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for g, rs in groups.items():
        row = dict(zip(keys, g))
        row["n"] = len(rs)
        for m in metrics:
            vals = [v for v in (_finite(r.get(m)) for r in rs) if v is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


def _summary(data: ReportData, name: str, keys: Sequence[str]) -> list[dict]:
    """A published summary table, or the same means computed from ``per_sample``."""
    rows = data.eval_tables.get(name)
    if rows:
        return rows
    per = data.eval_tables.get("per_sample", [])
    radii = radii_of(per)
    metrics = ["nme", *[_rkey(r) for r in radii], *[_rkey(r, True) for r in radii]]
    return group_means(per, keys, metrics)


def full_variant(data: ReportData) -> str | None:
    """The variant the breakdowns are drawn for (``full`` when evaluated)."""
    names = _variant_sort(r.get("variant") for r in data.eval_tables.get("per_sample", []) +
                          data.eval_tables.get("by_variant", []))
    return "full" if "full" in names else (names[0] if names else None)


def table2(data: ReportData) -> tuple[list[str], list[dict]]:
    """Metric columns (``nme``, ``armse_<r>``) and one row per variant (Table 2 analogue)."""
    rows = _summary(data, "by_variant", ("variant",))
    radii = radii_of(rows) or radii_of(data.eval_tables.get("per_sample", []))
    cols = ["nme", *[_rkey(r) for r in radii]]
    by = {r.get("variant"): r for r in rows}
    return cols, [by[v] for v in _variant_sort(by)]


# -- plotting ------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig, out_dir: Path, name: str) -> str:
    fname = f"{name}.png"
    tmp = out_dir / f".{fname}.tmp"
    fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    os.replace(tmp, out_dir / fname)
    return fname


def _int_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_variance(data: ReportData, out_dir: Path) -> str | None:
    """Cumulative explained variance of the shape and expression models, with the target line."""
    card = data.model_card
    if not card:
        return None
    target = float(card.get("parameters", {}).get("variance_target", 0.99))
    parts = [(p, card.get(p) or {}) for p in ("shape", "expression")]
    parts = [(p, c) for p, c in parts if c.get("explained_ratio")]
    if not parts:
        return None
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    for (part, c), col in zip(parts, _colours(2)):
        ratio = np.asarray(c["explained_ratio"], dtype=float)
        k = np.arange(1, len(ratio) + 1)
        cum = np.cumsum(ratio)
        n99 = c.get("n_components_99")
        lab = f"{part}: {len(ratio)} comp., {100 * cum[-1]:.2f}%, " + \
            (f"{n99} for {100 * target:g}%" if n99 else f"> {len(ratio)} for {100 * target:g}%")
        ax1.plot(k, 100 * cum, "-o", ms=2.5, color=col, label=lab)
        if n99:
            ax1.axvline(n99, color=col, ls=":", lw=1)
            ax1.annotate(f"{n99}", (n99, 100 * target), textcoords="offset points", xytext=(3, -12), color=col)
        var = np.asarray(c.get("variances_mm2") or [], dtype=float)
        if var.size:
            ax2.semilogy(np.arange(1, var.size + 1), var, "-o", ms=2.5, color=col, label=part)
    ax1.axhline(100 * target, color="k", ls="--", lw=1, label=f"{100 * target:g}% of the variance")
    ax1.set(xlabel="number of components", ylabel="cumulative explained variance (%)",
            title="Variance explained (cumulative)")
    ax1.set_ylim(top=100.5)
    ax1.xaxis.set_major_locator(_int_locator())
    ax2.xaxis.set_major_locator(_int_locator())
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.set(xlabel="component", ylabel="variance (mm²)", title="Variance per component")
    ax2.grid(alpha=0.3, which="both")
    if ax2.lines:
        ax2.legend(fontsize=8)
    return _save(fig, out_dir, "variance")


def quality_curves(quality: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, x, y) of the list-valued entries of a model card's ``quality`` (curves vs components)."""
    out = []
    for key, v in sorted((quality or {}).items()):
        if isinstance(v, list) and len(v) >= 2 and all(_finite(x) is not None for x in v):
            out.append((key, np.arange(1, len(v) + 1, dtype=float), np.asarray(v, dtype=float)))
        elif isinstance(v, dict):
            lists = {k: x for k, x in v.items() if isinstance(x, list) and len(x) >= 2
                     and all(_finite(y) is not None for y in x)}
            xk = next((k for k in ("components", "n_components", "k") if k in lists), None)
            if xk is None:
                continue
            for yk, y in lists.items():
                if yk != xk and len(y) == len(lists[xk]):
                    out.append((f"{key} {yk}", np.asarray(lists[xk], float), np.asarray(y, float)))
    return out


def plot_model_quality(data: ReportData, out_dir: Path) -> str | None:
    """Curves of the model card's quality entries (generalisation / specificity vs components)."""
    curves = quality_curves((data.model_card or {}).get("quality", {}))
    if not curves:
        return None
    fig = _figure(6.5, 4)
    ax = fig.subplots()
    for (name, x, y), col in zip(curves, _colours(len(curves))):
        ax.plot(x, y, "-o", ms=3, color=col, label=name)
    ax.set(xlabel="number of components", ylabel="value (mm where named _mm)", title="Model quality")
    ax.xaxis.set_major_locator(_int_locator())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "model_quality")


def plot_nme(data: ReportData, out_dir: Path) -> str | None:
    """Mean NME per variant (bars) with every scan's NME (dots)."""
    per = [r for r in data.eval_tables.get("per_sample", [])
           if not r.get("error") and _finite(r.get("nme")) is not None]
    means = {r["variant"]: _finite(r.get("nme")) for r in _summary(data, "by_variant", ("variant",))}
    variants = _variant_sort([*means, *(r["variant"] for r in per)])
    if not variants:
        return None
    fig = _figure(6.5, 3.8)
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for i, (v, col) in enumerate(zip(variants, _colours(len(variants)))):
        if means.get(v) is not None:
            ax.bar(i, means[v], color=col, alpha=0.45, width=0.6)
        ys = [r["nme"] for r in per if r["variant"] == v]
        if ys:
            ax.plot(i + rng.uniform(-0.18, 0.18, len(ys)), ys, "o", ms=3, color=col, alpha=0.8)
    ax.set_xticks(range(len(variants)), [f"{v}\nmean {fmt(means.get(v))}" for v in variants])
    ax.set(ylabel="NME (landmark error / GT box size)", title="NME per model variant (bar: mean, dots: scans)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_dir, "nme")


def _armse_curves(rows: list[dict], label_key: str, labels: list, radii: list[float], title: str, out_dir: Path,
                  name: str) -> str | None:
    if not rows or not radii or not labels:
        return None
    have_mm = any(_finite(r.get(_rkey(radii[0], True))) is not None for r in rows)
    fig = _figure(10 if have_mm else 6, 4)
    axes = fig.subplots(1, 2 if have_mm else 1)
    axes = list(np.atleast_1d(axes))
    by = {r.get(label_key): r for r in rows}
    for ax, mm in zip(axes, (False, True)):
        for lab, col in zip(labels, _colours(len(labels))):
            r = by.get(lab)
            if r is None:
                continue
            y = [_finite(r.get(_rkey(x, mm))) for x in radii]
            y = [np.nan if v is None else v for v in y]
            n = r.get("n")
            ax.plot(radii, y, "-o", ms=4, color=col, label=f"{lab}" + (f" (n={n})" if n is not None else ""))
        ax.set(xlabel="crop radius r (interocular distance = 1)",
               ylabel="ARMSE (mm)" if mm else "ARMSE (interocular units)")
        ax.set_xticks(radii)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out_dir, name)


def plot_armse_variant(data: ReportData, out_dir: Path) -> str | None:
    rows = _summary(data, "by_variant", ("variant",))
    return _armse_curves(rows, "variant", _variant_sort(r.get("variant") for r in rows), radii_of(rows),
                         "ARMSE vs crop radius, per model variant", out_dir, "armse_variant")


def _breakdown(data: ReportData, table: str, key: str) -> tuple[list[dict], str | None]:
    v = full_variant(data)
    rows = [r for r in _summary(data, table, ("variant", key)) if r.get("variant") == v]
    return rows, v


def plot_armse_age(data: ReportData, out_dir: Path) -> str | None:
    rows, v = _breakdown(data, "by_age_group", "age_group")
    labels = sorted({r.get("age_group") for r in rows}, key=_age_sort)
    return _armse_curves(rows, "age_group", labels, radii_of(rows), f"ARMSE vs r per age group ({v} model)",
                         out_dir, "armse_age")


def plot_armse_category(data: ReportData, out_dir: Path) -> str | None:
    rows, v = _breakdown(data, "by_category", "category")
    labels = sorted({r.get("category") for r in rows}, key=_category_sort)
    return _armse_curves(rows, "category", labels, radii_of(rows),
                         f"ARMSE vs r per expression category ({v} model)", out_dir, "armse_category")


def plot_armse_expression(data: ReportData, out_dir: Path) -> str | None:
    """ARMSE at the largest radius per expression (full model), sorted."""
    rows, v = _breakdown(data, "by_expression", "expression")
    radii = radii_of(rows)
    if not rows or not radii:
        return None
    k = _rkey(radii[-1])
    pts = sorted(((str(r.get("expression")), _finite(r.get(k))) for r in rows if _finite(r.get(k)) is not None),
                 key=lambda t: t[1])
    if not pts:
        return None
    cat = {s.get("expression"): s.get("category") for s in data.samples}
    colours = dict(zip(CATEGORY_ORDER, _colours(3)))
    fig = _figure(6.5, max(3.0, 0.8 + 0.28 * len(pts)))
    ax = fig.subplots()
    ax.barh(range(len(pts)), [p[1] for p in pts], color=[colours.get(cat.get(p[0]), "grey") for p in pts])
    ax.set_yticks(range(len(pts)), [p[0] for p in pts], fontsize=8)
    ax.set(xlabel=f"ARMSE at r = {radii[-1]:.1f} (interocular units)", title=f"ARMSE per expression ({v} model)")
    ax.grid(alpha=0.3, axis="x")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=n) for n, c in colours.items()], fontsize=8, loc="lower right")
    return _save(fig, out_dir, "armse_expression")


def outcome_counts(runs: list[dict]) -> dict[str, dict[str, int]]:
    """stage -> outcome -> number of rows, stages in pipeline order."""
    counts: dict[str, dict[str, int]] = {}
    for r in runs:
        c = counts.setdefault(r["stage"], {})
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    order = sorted(counts, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    return {s: counts[s] for s in order}


def plot_outcomes(data: ReportData, out_dir: Path) -> str | None:
    counts = outcome_counts(data.runs)
    if not counts:
        return None
    stages = list(counts)[::-1]
    fig = _figure(7, max(3.0, 0.9 + 0.35 * len(stages)))
    ax = fig.subplots()
    left = np.zeros(len(stages))
    for o in OUTCOME_ORDER:
        w = np.array([counts[s].get(o, 0) for s in stages], float)
        if w.any():
            ax.barh(stages, w, left=left, color=OUTCOME_COLOURS[o], label=o)
            left += w
    ax.set(xlabel="rows (newest run per subject/sample/view/stage)", title="Stage outcomes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out_dir, "outcomes")


def qc_values(runs: list[dict], stage: str, key: str) -> list[float]:
    """Finite values of QC ``key`` of the completed newest rows of ``stage``."""
    out = []
    for r in runs:
        if r["stage"] == stage and r["status"] == "completed":
            v = r["qc"].get(key)
            if v is not None and math.isfinite(v):
                out.append(float(v))
    return out


def _hist(ax, values: list[float], title: str, xlabel: str, integer: bool = False) -> None:
    if not values:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(title=title)
        return
    v = np.asarray(values)
    if integer:
        lo, hi = int(v.min()), int(v.max())
        bins = np.arange(lo - 0.5, hi + 1.5) if hi - lo <= 40 else 30
    else:
        bins = min(30, max(5, int(np.sqrt(v.size)) * 2))
    ax.hist(v, bins=bins, color="#4c72b0", alpha=0.85, edgecolor="white", linewidth=0.6)
    ax.yaxis.set_major_locator(_int_locator())
    if integer:
        ax.xaxis.set_major_locator(_int_locator())
    med = float(np.median(v))
    ax.axvline(med, color="k", ls="--", lw=1)
    ax.set(title=f"{title}\nmedian {med:.4g}, n = {v.size}", xlabel=xlabel, ylabel="rows")
    ax.grid(alpha=0.3)


def _strip(ax, groups: dict[str, list[float]], title: str, ylabel: str) -> None:
    names = [g for g in sorted(groups) if groups[g]]
    if not names:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(title=title)
        return
    ax.boxplot([groups[g] for g in names], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, (g, col) in enumerate(zip(names, _colours(len(names))), start=1):
        ax.plot(i + rng.uniform(-0.15, 0.15, len(groups[g])), groups[g], "o", ms=3, alpha=0.7, color=col)
    ax.set_xticks(range(1, len(names) + 1), [f"{g}\n(n={len(groups[g])})" for g in names])
    ax.set(title=title, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")


def plot_qc_decode(data: ReportData, out_dir: Path) -> str | None:
    by_view: dict[str, list[float]] = {}
    conf: dict[str, list[float]] = {}
    for r in data.runs:
        if r["stage"] == "decode" and r["status"] == "completed":
            v = r["view_id"] or "?"
            if "valid_fraction" in r["qc"]:
                by_view.setdefault(v, []).append(r["qc"]["valid_fraction"])
            if "mean_confidence" in r["qc"]:
                conf.setdefault(v, []).append(r["qc"]["mean_confidence"])
    if not by_view and not conf:
        return None
    fig = _figure(10, 3.8)
    a1, a2 = fig.subplots(1, 2)
    _strip(a1, by_view, "decode: valid pixel fraction per view", "valid fraction")
    _strip(a2, conf, "decode: mean confidence of valid pixels", "confidence")
    return _save(fig, out_dir, "qc_decode")


def plot_qc_fusion(data: ReportData, out_dir: Path) -> str | None:
    rmse: dict[str, list[float]] = {}
    fit: dict[str, list[float]] = {}
    for r in data.runs:
        if r["stage"] != "fusion" or r["status"] != "completed":
            continue
        for k, v in r["qc"].items():
            m = _FUSION_VIEW_QC.match(k)
            if m and math.isfinite(v):
                (rmse if m["what"] == "rmse_mm" else fit).setdefault(m["view"], []).append(v)
    if not rmse and not fit:
        return None
    fig = _figure(10, 3.8)
    a1, a2 = fig.subplots(1, 2)
    _strip(a1, rmse, "fusion: ICP inlier RMSE per side view", "RMSE (mm)")
    _strip(a2, fit, "fusion: ICP fitness per side view", "fitness (inlier fraction)")
    return _save(fig, out_dir, "qc_fusion")


def _stage_hists(data: ReportData, out_dir: Path, stage: str, panels: Sequence[tuple[str, str, str, bool]],
                 name: str) -> str | None:
    vals = [qc_values(data.runs, stage, k) for k, *_ in panels]
    if not any(vals):
        return None
    fig = _figure(3.6 * len(panels), 3.6)
    for ax, v, (_, title, xlabel, integer) in zip(fig.subplots(1, len(panels)), vals, panels):
        _hist(ax, v, title, xlabel, integer)
    return _save(fig, out_dir, name)


def plot_qc_surface(data: ReportData, out_dir: Path) -> str | None:
    return _stage_hists(data, out_dir, "surface", [
        ("min_angle_30_fraction", "surface: triangles with min angle >= 30°", "fraction", False),
        ("holes", "surface: holes", "holes per mesh", True),
        ("n_vertices", "surface: vertices", "vertices", False)], "qc_surface")


def plot_qc_registration(data: ReportData, out_dir: Path) -> str | None:
    return _stage_hists(data, out_dir, "registration", [
        ("mean_distance_mm", "registration: mean distance to scan", "mm", False),
        ("valid_fraction", "registration: valid vertex fraction", "fraction", False),
        ("n_flipped", "registration: flipped triangles", "triangles", True)], "qc_registration")


def _project(V: np.ndarray) -> np.ndarray:
    """Frontal orthographic projection (head frame: +x subject's left = image right, +y up)."""
    return V[:, :2]


def _shade(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """(m,) brightness in [0.35, 1] of each face lit from the viewer's upper left (head frame)."""
    n = np.cross(V[F[:, 1]] - V[F[:, 0]], V[F[:, 2]] - V[F[:, 0]])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    light = np.array([-0.35, 0.45, 1.0]) / np.linalg.norm([-0.35, 0.45, 1.0])
    return 0.35 + 0.65 * np.abs(n @ light)


def plot_heatmaps(data: ReportData, out_dir: Path) -> str | None:
    """Per-vertex registration distance (mm) on the best, median and worst registered meshes."""
    if not data.heat:
        return None
    import matplotlib
    from matplotlib.collections import PolyCollection
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ok = np.concatenate([h.distance[h.valid] for h in data.heat])
    vmax = float(np.percentile(ok, 98)) if ok.size else 1.0
    norm = Normalize(0.0, vmax if vmax > 0 else 1.0)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0", over="#ffee00")
    n = len(data.heat)
    fig = _figure(3.6 * n + 0.8, 4.6)
    axes = list(np.atleast_1d(fig.subplots(1, n)))
    for ax, h in zip(axes, data.heat):
        P = _project(h.vertices)
        z = h.vertices[:, 2]
        if h.faces is not None and len(h.faces):
            F = h.faces
            val = h.distance[F].mean(axis=1)
            val[~h.valid[F].all(axis=1)] = np.nan
            order = np.argsort(z[F].mean(axis=1), kind="stable")  # painter: far (small z) first
            F, val = F[order], val[order]
            rgba = cmap(norm(np.ma.masked_invalid(val)))
            rgba[:, :3] *= _shade(h.vertices, F)[:, None]  # Lambert shading keeps the shape readable
            ax.add_collection(PolyCollection(P[F], facecolors=rgba, edgecolors=rgba, linewidths=0.15,
                                             antialiased=False))
        else:
            order = np.argsort(z, kind="stable")
            d = np.where(h.valid, h.distance, np.nan)[order]
            ax.scatter(P[order, 0], P[order, 1], c=d, cmap=cmap, norm=norm, s=2, linewidths=0, plotnonfinite=True)
        ax.set_xlim(P[:, 0].min(), P[:, 0].max())
        ax.set_ylim(P[:, 1].min(), P[:, 1].max())
        ax.set_aspect("equal")
        ax.set_axis_off()
        expr = f" ({h.expression})" if h.expression else ""
        ax.set_title(f"{h.pick}: {h.subject}/{h.sample}{expr}\nmean {h.mean_distance_mm:.3f} mm", fontsize=9)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.85, extend="max")
    cb.set_label("distance to the scan (mm)")
    fig.suptitle("Registration residual on the registered mesh (frontal view; grey: no valid correspondence)",
                 fontsize=10)
    return _save(fig, out_dir, "heatmaps")


PLOTTERS: dict[str, Callable[[ReportData, Path], str | None]] = {
    "variance": plot_variance, "model_quality": plot_model_quality, "nme": plot_nme,
    "armse_variant": plot_armse_variant, "armse_age": plot_armse_age, "armse_category": plot_armse_category,
    "armse_expression": plot_armse_expression, "outcomes": plot_outcomes, "qc_decode": plot_qc_decode,
    "qc_fusion": plot_qc_fusion, "qc_surface": plot_qc_surface, "qc_registration": plot_qc_registration,
    "heatmaps": plot_heatmaps}


@dataclass
class Plots:
    """PNG file names by plot name, and the plots that could not be drawn (name -> message)."""

    files: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@task(name="render-report-plots", cache_policy=NO_CACHE, persist_result=False)
def render_plots(data: ReportData, out_dir: str | os.PathLike) -> Plots:
    """Draw every plot whose data is present into ``out_dir`` (created); remove stale report PNGs.

    A plot that raises is recorded in :attr:`Plots.errors` (the page shows the message) and the
    other plots are still drawn.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = Plots()
    for name, fn in PLOTTERS.items():
        try:
            f = fn(data, out)
        except Exception as exc:  # one bad plot must not cost the rest of the report
            plots.errors[name] = f"{type(exc).__name__}: {exc}"
            f = None
        if f is not None:
            plots.files[name] = f
    for name in PLOT_NAMES:
        if name not in plots.files:
            (out / f"{name}.png").unlink(missing_ok=True)
    return plots


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px;line-height:1.4}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;
vertical-align:top}th{background:#f2f2f2}td.l,th.l{text-align:left}td.best{background:#e8f5e9}
td.err{text-align:left;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
max-width:640px}
figure{margin:12px 0 20px}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}
.missing{background:#fff8e1;border-left:4px solid #ffb300;padding:8px 12px}
.bad{background:#ffebee;border-left:4px solid #c62828;padding:8px 12px}
code{background:#f4f4f4;padding:1px 4px}nav a{margin-right:12px}.meta td{text-align:left}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def fmt(v: Any) -> str:
    """How a metric value is printed in the tables (4 significant digits; '-' when missing)."""
    f = _finite(v)
    return "-" if f is None else f"{f:.4g}"


def _table(head: Sequence[str] | None, rows: Iterable[Sequence[Any]], left: int = 1, cls: str = "",
           ident: str = "") -> str:
    """An HTML table (the first ``left`` columns left-aligned); a cell given as ``(html, css class)`` is
    inserted as is, any other cell is escaped text."""
    attrs = (f' id="{ident}"' if ident else "") + (f' class="{cls}"' if cls else "")
    align = ' class="l"'
    out = [f"<table{attrs}>"]
    if head is not None:
        out.append("<tr>" + "".join(f"<th{align if i < left else ''}>{_e(h)}</th>" for i, h in enumerate(head))
                   + "</tr>")
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            if isinstance(c, tuple):
                cells.append(f'<td class="{c[1]}">{c[0]}</td>')
            else:
                cells.append(f"<td{align if i < left else ''}>{_e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure_html(plots: Plots, name: str, caption: str) -> str:
    if name in plots.files:
        return (f"<figure><img src=\"{_e(plots.files[name])}\" alt=\"{_e(caption)}\">"
                f"<figcaption>{_e(caption)}</figcaption></figure>")
    if name in plots.errors:
        return f"<p class=\"bad\">The plot <code>{_e(name)}</code> could not be drawn: {_e(plots.errors[name])}</p>"
    return ""


def _missing(text: str) -> str:
    return f"<p class=\"missing\">{_e(text)}</p>"


def _section_model(data: ReportData, plots: Plots) -> str:
    out = ["<h2 id=\"model\">Morphable model</h2>"]
    c = data.model_card
    if not c:
        return "\n".join(out + [_missing(data.model_note)])
    out.append(f"<p>Model <code>{_e(data.model_id)}</code> ({_e(c.get('label', ''))}), "
               f"{_e(c.get('n_vertices', data.n_model_vertices))} vertices, published {_e(c.get('published_at'))}.</p>")
    rows = []
    for part in ("shape", "expression"):
        p = c.get(part) or {}
        ratio = p.get("explained_ratio") or []
        n99 = p.get("n_components_99")
        rows.append([part, p.get("n_samples", "-"), p.get("n_components", len(ratio)),
                     n99 if n99 is not None else f"> {len(ratio)}",
                     f"{100 * sum(ratio):.2f}%" if ratio else "-", p.get("truncated_reason") or ""])
    out.append(_table(["part", "samples", "components", "for 99%", "explained", "truncated"], rows))
    out.append(_figure_html(plots, "variance", "Cumulative variance explained (dashed: 99% target; dotted: the "
                                               "component count reaching it) and variance per component."))
    q = c.get("quality") or {}
    scalars = [(k, v) for k, v in sorted(q.items()) if _finite(v) is not None]
    if scalars:
        out.append("<h3>Model quality</h3>")
        out.append(_table(["measure", "value"], [[k, fmt(v)] for k, v in scalars]))
    out.append(_figure_html(plots, "model_quality", "Model quality curves from the model card."))
    if c.get("skipped"):
        out.append(f"<p>{len(c['skipped'])} expression sample(s) skipped (no neutral registration of their "
                   f"subject): {_e(', '.join(c['skipped'][:40]))}{' ...' if len(c['skipped']) > 40 else ''}</p>")
    return "\n".join(out)


def _section_eval(data: ReportData, plots: Plots) -> str:
    out = ["<h2 id=\"evaluation\">Benchmark: 3DMM fitting (Table 2 analogue)</h2>"]
    if data.eval_card is None:
        return "\n".join(out + [_missing(data.eval_note)])
    card = data.eval_card
    out.append(f"<p>Evaluation <code>{_e(data.eval_id)}</code>, {_e(card.get('n_samples'))} eval-split scans, "
               f"published {_e(card.get('published_at'))}. Reference: {_e(card.get('reference', ''))}. NME is "
               "dimensionless (landmark error over the GT landmarks' box size); ARMSE is in interocular units "
               "(interocular distance = 1) at crop radius r. Best value per column in bold.</p>")
    cols, rows = table2(data)
    best = {}
    for col in cols:
        vals = [_finite(r.get(col)) for r in rows]
        vals = [v for v in vals if v is not None]
        best[col] = min(vals) if vals else None
    head = ["variant", "model", "n", "NME", *[f"ARMSE r={c.split('_', 1)[1]}" for c in cols[1:]]]
    body = []
    variants = card.get("variants", {})
    for r in rows:
        line: list[Any] = [r.get("variant"), variants.get(r.get("variant"), ""), r.get("n", "")]
        for col in cols:
            v = _finite(r.get(col))
            if v is not None and best[col] is not None and v == best[col]:
                line.append((f"<b>{_e(fmt(v))}</b>", "best"))
            else:
                line.append(fmt(v))
        body.append(line)
    out.append(_table(head, body, left=2, ident="table2") if rows else
               _missing("The evaluation has no successful row: see the errors below."))
    out.append(_figure_html(plots, "nme", "NME per model variant."))
    out.append(_figure_html(plots, "armse_variant", "ARMSE vs crop radius per model variant (left: interocular "
                                                    "units, right: mm)."))
    out.append(_figure_html(plots, "armse_age", "ARMSE vs crop radius per age group."))
    out.append(_figure_html(plots, "armse_category", "ARMSE vs crop radius per expression category."))
    out.append(_figure_html(plots, "armse_expression", "ARMSE at the largest radius per expression."))
    errs = [r for r in data.eval_tables.get("per_sample", []) if r.get("error")]
    out.append(f"<h3 id=\"eval-errors\">Evaluation rows with an error ({len(errs)})</h3>")
    if errs:
        out.append(_table(["subject", "sample", "variant", "error"],
                          [[r.get("subject_id"), r.get("sample_id"), r.get("variant"),
                            (_e(r.get("error")), "err")] for r in errs[:MAX_LISTED]], left=3))
        if len(errs) > MAX_LISTED:
            out.append(f"<p>... and {len(errs) - MAX_LISTED} more.</p>")
    else:
        out.append("<p>None.</p>")
    return "\n".join(out)


def _qc_stats(data: ReportData) -> list[list[Any]]:
    keys = [("decode", "valid_fraction"), ("decode", "mean_confidence"), ("fusion", "*_rmse_mm"),
            ("fusion", "*_fitness"), ("surface", "min_angle_30_fraction"), ("surface", "holes"),
            ("surface", "n_vertices"), ("registration", "mean_distance_mm"), ("registration", "p95_distance_mm"),
            ("registration", "valid_fraction"), ("registration", "n_flipped")]
    rows = []
    for stage, key in keys:
        if key.startswith("*"):
            suffix = key[1:]
            vals = [v for r in data.runs if r["stage"] == stage and r["status"] == "completed"
                    for k, v in r["qc"].items() if k.endswith(suffix) and math.isfinite(v)]
        else:
            vals = qc_values(data.runs, stage, key)
        if vals:
            a = np.asarray(vals)
            rows.append([stage, key, a.size, fmt(a.min()), fmt(np.median(a)), fmt(np.percentile(a, 95)),
                         fmt(a.max())])
    return rows


def _section_qc(data: ReportData, plots: Plots) -> str:
    out = ["<h2 id=\"qc\">Pipeline QC</h2>"]
    if not data.runs:
        return "\n".join(out + [_missing("The catalog has no stage_runs rows: run `pixelface build` first.")])
    counts = outcome_counts(data.runs)
    present = [o for o in OUTCOME_ORDER if any(o in c for c in counts.values())]
    out.append("<p>Newest run of every subject/sample/view/stage.</p>")
    out.append(_table(["stage", *present, "total"],
                      [[s, *[c.get(o, 0) for o in present], sum(c.values())] for s, c in counts.items()]))
    out.append(_figure_html(plots, "outcomes", "Outcome of the newest run of each stage."))
    stats = _qc_stats(data)
    if stats:
        out.append(_table(["stage", "QC", "n", "min", "median", "p95", "max"], stats, left=2))
    for name, cap in (("qc_decode", "Decode: share of valid pixels and confidence per view."),
                      ("qc_fusion", "Fusion: ICP inlier RMSE (mm) and fitness of every side view against the "
                                    "pivot."),
                      ("qc_surface", "Surface mesh quality."),
                      ("qc_registration", "Registration residual (dashed: median).")):
        out.append(_figure_html(plots, name, cap))
    for stage in ("decode", "fusion", "surface", "registration"):
        if stage not in counts:
            out.append(_missing(f"No {stage} rows in the catalog."))
    return "\n".join(out)


def _section_heat(data: ReportData, plots: Plots) -> str:
    out = ["<h2 id=\"heatmaps\">Registration error heat maps</h2>"]
    if data.heat_note:
        out.append(_missing(data.heat_note))
    if data.heat:
        out.append(_figure_html(plots, "heatmaps", (
            "Per-vertex distance (mm) from the registered template to the scan, on the best, median and worst "
            "sample by mean distance (frontal orthographic view, shaded to show the shape; the colour bar is "
            "the unshaded colour).")))
        out.append(_table(["pick", "subject", "sample", "expression", "mean distance (mm)", "vertices"],
                          [[h.pick, h.subject, h.sample, h.expression or "", fmt(h.mean_distance_mm),
                            len(h.vertices)] for h in data.heat], left=4))
    return "\n".join(out)


def failed_rows(data: ReportData) -> list[dict]:
    """Newest ``stage_runs`` rows with status failed: the failing stages first, then their dependants."""
    bad = [r for r in data.runs if r["status"] == "failed"]
    def stage_rank(stage: str) -> int:
        return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)

    return sorted(bad, key=lambda r: (r["outcome"] != "failed", r["subject_id"], r["sample_id"],
                                      r["view_id"] or "", stage_rank(r["stage"]), r["stage"]))


def _section_failures(data: ReportData) -> str:
    bad = failed_rows(data)
    out = [f"<h2 id=\"failures\">Failures ({len(bad)})</h2>"]
    if not bad:
        out.append("<p>No failed stage in the newest runs.</p>")
        return "\n".join(out)
    n_up = sum(r["outcome"] == "upstream_failed" for r in bad)
    out.append(f"<p>{len(bad) - n_up} failed stage run(s) and {n_up} not run because an input failed.</p>")
    out.append(_table(["subject", "sample", "view", "stage", "outcome", "build", "error"],
                      [[r["subject_id"], r["sample_id"], r["view_id"] or "", r["stage"], r["outcome"], r["build_id"],
                        (_e(r.get("error") or ""), "err")] for r in bad[:MAX_LISTED]], left=6))
    if len(bad) > MAX_LISTED:
        out.append(f"<p>... and {len(bad) - MAX_LISTED} more.</p>")
    return "\n".join(out)


def _builds(data: ReportData) -> list[list[Any]]:
    info: dict[str, dict] = {}
    for r in data.all_runs:
        b = info.setdefault(r["build_id"], {"rows": 0, "first": r["recorded_at"], "last": r["recorded_at"],
                                            "computed": 0, "cached": 0, "failed": 0})
        b["rows"] += 1
        b["first"], b["last"] = min(b["first"], r["recorded_at"]), max(b["last"], r["recorded_at"])
        o = r["outcome"]
        key = "cached" if o in ("cached", "reused") else "failed" if o in ("failed", "upstream_failed") else o
        if key in b:
            b[key] += 1
    return [[bid, b["rows"], b["computed"], b["cached"], b["failed"], _when(b["first"]), _when(b["last"])]
            for bid, b in info.items()]


def _when(t: Any) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(t, datetime) else str(t)


@task(name="write-report-html", cache_policy=NO_CACHE, persist_result=False)
def write_html(data: ReportData, plots: Plots, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/index.html`` (atomically) for ``data`` and the drawn ``plots``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, int] = {}
    for s in data.subjects:
        splits[s.get("split") or "?"] = splits.get(s.get("split") or "?", 0) + 1
    meta = [["store", data.store], ["made", _when(data.made_at)],
            ["builds", ", ".join(data.build_ids) or "none"],
            ["model", data.model_id or "none"], ["evaluation", data.eval_id or "none"],
            ["subjects", f"{len(data.subjects)} ({', '.join(f'{k}: {v}' for k, v in sorted(splits.items()))})"
             if data.subjects else "0"],
            ["samples", len(data.samples)], ["stage runs (newest per stage)", len(data.runs)]]
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>pixelface QC report: {_e(Path(data.store).name)}</title>",
             f"<style>{CSS}</style></head><body>", "<h1>pixelface QC report</h1>",
             _table(None, meta, left=2, cls="meta", ident="meta"),
             "<nav><a href=\"#model\">model</a><a href=\"#evaluation\">benchmark</a><a href=\"#qc\">pipeline QC</a>"
             "<a href=\"#heatmaps\">heat maps</a><a href=\"#failures\">failures</a></nav>"]
    missing = [t for t in (data.model_note, data.eval_note) if t]
    if missing:
        parts.append("<p class=\"missing\"><b>Missing:</b> " + " ".join(_e(t) for t in missing) + "</p>")
    if data.all_runs:
        parts.append("<h2 id=\"builds\">Builds</h2>")
        parts.append(_table(["build", "rows", "computed", "cached", "failed", "first row", "last row"],
                            _builds(data)))
    parts += [_section_model(data, plots), _section_eval(data, plots), _section_qc(data, plots),
              _section_heat(data, plots), _section_failures(data)]
    if data.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in data.notes) + "</ul>")
    parts.append(f"<p style=\"color:#888\">Made {_e(_when(data.made_at))} by <code>pixelface report</code>.</p>")
    parts.append("</body></html>")
    path = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text("\n".join(p for p in parts if p) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
