"""Tasks of the evaluation flow (``flows/evaluate.py``): fit model variants to the eval-split scans
and measure NME and ARMSE (paper section 5, Table 2 analogue).

The benchmark's reference for a sample is what the dataset publishes for it: the fused surface
mesh (``surface``) and the fused landmarks (``fusion``) -- the pipeline never reads the
simulator's ground truth. Every model variant is fitted to the scan
(:func:`kernels.fitting.fit`: landmarks, then dense closest points) and the fitted mesh is
scored with :func:`kernels.metrics.nme` (fitted vs fused landmarks) and
:func:`kernels.metrics.armse` (fitted mesh vs fused mesh, radii ``r``).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from kernels.fitting import FitParams, fit
from kernels.metrics import armse, nme
from kernels.model import MorphableModel
from storage.keys import ArtifactRef
from storage.store import open_store


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvalSample(_Frozen):
    """One eval-split scan: references to its fused mesh and landmarks, and what it is."""

    subject: str
    sample: str
    surface_key: str
    fusion_key: str
    expression: str | None
    category: str | None
    age: int | None
    gender: str | None


def select_eval_samples(store: str, max_samples: int | None = None) -> list[EvalSample]:
    """Eval-split samples whose ``surface`` and ``fusion`` stages completed (newest rows)."""
    cat = open_store(store, create=False).catalog
    runs = cat.latest("stage_runs").to_pylist()
    samples = {(r["subject_id"], r["sample_id"]): r for r in cat.latest("samples").to_pylist()}
    subjects = {r["subject_id"]: r for r in cat.latest("subjects").to_pylist()}
    keys: dict[tuple, dict] = {}
    for r in runs:
        if r["stage"] in ("surface", "fusion") and r["status"] == "completed" and r["artifact_key"]:
            keys.setdefault((r["subject_id"], r["sample_id"]), {})[r["stage"]] = r["artifact_key"]
    out = []
    for (subj, samp), k in sorted(keys.items()):
        meta = subjects.get(subj, {})
        if meta.get("split") != "eval" or len(k) < 2:
            continue
        s = samples.get((subj, samp), {})
        out.append(EvalSample(subject=subj, sample=samp, surface_key=k["surface"], fusion_key=k["fusion"],
                              expression=s.get("expression"), category=s.get("category"), age=meta.get("age"),
                              gender=meta.get("gender")))
    return out[:max_samples] if max_samples else out


@functools.lru_cache(maxsize=8)
def load_model(store: str, model_id: str) -> MorphableModel:
    """The published model as a :class:`kernels.model.MorphableModel` (once per process)."""
    from storage.models import read_model

    a, _ = read_model(store, model_id)
    return MorphableModel(mean=a["mean"], shape_basis=a["shape_basis"], shape_variance=a["shape_variance"],
                          expression_basis=a["expression_basis"], expression_variance=a["expression_variance"],
                          faces=a["faces"], landmark_faces=a["landmark_faces"], landmark_bary=a["landmark_bary"],
                          parts=a["parts"], part_names=tuple(str(x) for x in a["part_names"]))


def age_group(age: int | None, groups: Sequence[Sequence[int]]) -> str:
    if age is None:
        return "unknown"
    for lo, hi in groups:
        if lo <= age <= hi:
            return f"{lo}-{hi}"
    return "other"


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@task(name="evaluate-sample", task_run_name="evaluate-{sample.subject}-{sample.sample}", cache_policy=NO_CACHE,
      persist_result=False)
def evaluate_sample(store: str, sample: EvalSample, variants: dict[str, str], radii: tuple[float, ...],
                    age_groups: tuple, fit_params: FitParams = FitParams()) -> list[dict]:
    """Fit every model variant to one scan; one row per variant (errors are rows too, never raised)."""
    st = open_store(store, create=False)
    where = f"{sample.subject}/{sample.sample}"
    base = {"subject_id": sample.subject, "sample_id": sample.sample, "expression": sample.expression,
            "category": sample.category, "age": sample.age, "age_group": age_group(sample.age, age_groups),
            "gender": sample.gender}
    try:
        m = st.artifacts.read(ArtifactRef("surface", sample.subject, sample.sample, None, sample.surface_key),
                              ["vertices", "faces"])
        lm = st.artifacts.read(ArtifactRef("fusion", sample.subject, sample.sample, None, sample.fusion_key),
                               ["landmarks"])["landmarks"]
    except Exception as exc:  # a missing/corrupt artifact fails this sample's rows only
        return [{**base, "variant": v, "error": f"{where}: {type(exc).__name__}: {exc}"} for v in variants]
    V, F = m["vertices"].astype(np.float64), m["faces"]
    rows = []
    for variant, model_id in variants.items():
        row = {**base, "variant": variant, "model_id": model_id, "error": None}
        try:
            model = load_model(store, model_id)
            r = fit(model, V, F, lm, fit_params)
            a = armse(r.vertices, model.faces, V, F, r.landmarks, lm, radii=radii)
            row.update({"nme": _finite(nme(r.landmarks, lm)), "fit_dense_rms_mm": _finite(r.dense_rms_mm),
                        "fit_landmark_rms_mm": _finite(r.landmark_rms_mm), "interocular_mm": a.interocular_mm,
                        **{f"armse_{rr:.1f}": _finite(a.armse[rr]) for rr in radii},
                        **{f"armse_{rr:.1f}_mm": _finite(a.armse[rr] * a.interocular_mm) for rr in radii}})
        except ValueError as exc:
            row["error"] = f"{where} ({variant}): {exc}"
        rows.append(row)
    return rows
