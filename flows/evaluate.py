"""Evaluation flow ``evaluate``: the Table 2 analogue of paper section 5.

``pixelface evaluate --store STORE`` runs :func:`evaluate`:

1. the **model variants**: the full model (``build-model``'s, built or reused), and models whose
   shape part, expression part or both come from a seeded ``evaluate.subset_fraction`` (20%) of
   the training subjects (each built or reused the same way, on the Dask cluster);
2. one **task per eval-split scan** on Dask (``tasks/evaluate.py``): fit every variant to the fused
   mesh + fused landmarks, NME and ARMSE(r) per variant;
3. **tables** (Parquet, ``STORE/evaluations/<id>/``): ``per_sample`` (one row per scan x variant),
   ``by_variant``, ``by_age_group``, ``by_category`` (means), and the same summaries as Prefect
   table artifacts.

The evaluation id hashes the variants' model ids, the scans' keys and the parameters.
"""

from __future__ import annotations

import hashlib
import json
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait as wait_futures
from pydantic import BaseModel, ConfigDict

from pixelface.config import BuildConfig, EvaluateConfig, ModelConfig

VARIANTS = ("full", "shape-20%", "expression-20%", "both-20%")


class EvalSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    eval_id: str
    path: str
    variants: dict[str, str]
    n_samples: int
    n_failed_rows: int
    by_variant: list[dict]
    seconds: float


def _subset(subjects: list[str], fraction: float, seed: int) -> list[str]:
    import numpy as np

    subjects = sorted(subjects)
    k = min(len(subjects), max(2, int(round(fraction * len(subjects)))))
    idx = np.random.default_rng(seed).choice(len(subjects), size=k, replace=False)
    return sorted(subjects[i] for i in idx)


@flow(name="evaluate-samples", persist_result=False)
def evaluate_samples(store: str, samples: list, variants: dict[str, str], radii: tuple[float, ...],
                     age_groups: tuple, landmark_weight: float) -> list[dict]:
    """One task per eval scan (on the flow's Dask task runner)."""
    from kernels.fitting import FitParams
    from tasks.evaluate import evaluate_sample

    fit_params = FitParams(dense_landmark_weight=landmark_weight)
    futures = [evaluate_sample.submit(store, s, variants, radii, age_groups, fit_params) for s in samples]
    wait_futures(futures)
    rows = []
    for s, f in zip(samples, futures):
        st = f.state
        if st.is_completed():
            rows += f.result()
        else:
            exc = st.result(raise_on_failure=False)
            rows += [{"subject_id": s.subject, "sample_id": s.sample, "variant": v,
                      "error": f"{s.subject}/{s.sample}: {type(exc).__name__}: {exc}"} for v in variants]
    return rows


def _means(rows: list[dict], keys: tuple[str, ...], metrics: list[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("error"):
            continue
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for g, rs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        row = dict(zip(keys, g))
        row["n"] = len(rs)
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


@flow(name="evaluate", persist_result=False, validate_parameters=True)
def evaluate(build: BuildConfig, model: ModelConfig = ModelConfig(),
             evaluation: EvaluateConfig = EvaluateConfig()) -> EvalSummary:
    """Fit the model variants to the eval-split scans and publish NME / ARMSE tables."""
    import pyarrow as pa
    from distributed import Client

    from flows.build import DaskRunner, dask_cluster
    from flows.model import MODEL_CODE_VERSION
    from storage.models import publish_evaluation
    from tasks.evaluate import select_eval_samples
    from tasks.model import build_or_reuse_model, select_inputs

    from pixelface.config import with_template_hash

    t0 = time.perf_counter()
    build = with_template_hash(build)
    log = get_run_logger()
    store, reg = build.store, build.stages.registration
    samples = select_eval_samples(store, evaluation.max_samples)
    if not samples:
        raise ValueError(f"store {store}: no eval-split sample with a fused mesh (surface) and landmarks (fusion)")
    inputs = select_inputs(store, model.neutral_expression)
    subset = _subset([r.subject for r in inputs.train_neutral], evaluation.subset_fraction, evaluation.seed)
    with dask_cluster(build) as address, Client(address) as client:
        def variant(label, **kw):
            return build_or_reuse_model(store, model, reg, MODEL_CODE_VERSION, client, label=label, **kw)["model_id"]

        variants = {"full": variant("full"), "shape-20%": variant("shape-20%", shape_subjects=subset),
                    "expression-20%": variant("expression-20%", expression_subjects=subset),
                    "both-20%": variant("both-20%", shape_subjects=subset, expression_subjects=subset)}
        log.info("evaluating %d scans with variants %s (subset of %d training subjects: %s)", len(samples),
                 variants, len(subset), subset)
        runner = evaluate_samples.with_options(task_runner=DaskRunner(address=address))
        rows = runner(store, samples, variants, tuple(evaluation.radii), tuple(evaluation.age_groups),
                      evaluation.fit_landmark_weight)
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    rows = [{c: r.get(c) for c in cols} for r in rows]  # one schema for every row (failed rows: None metrics)
    radii = [f"armse_{r:.1f}" for r in evaluation.radii]
    metrics = ["nme", *radii, *[f"{r}_mm" for r in radii], "fit_dense_rms_mm"]
    by_variant = _means(rows, ("variant",), metrics)
    tables = {"per_sample": rows, "by_variant": by_variant,
              "by_age_group": _means(rows, ("variant", "age_group"), metrics),
              "by_category": _means(rows, ("variant", "category"), metrics),
              "by_expression": _means(rows, ("variant", "expression"), metrics)}
    body = json.dumps({"variants": variants, "samples": [(s.surface_key, s.fusion_key) for s in samples],
                       "params": evaluation.model_dump(mode="json")}, sort_keys=True)
    eval_id = "e" + hashlib.blake2b(body.encode(), digest_size=10).hexdigest()
    path = publish_evaluation(store, eval_id, {k: pa.Table.from_pylist(v) for k, v in tables.items()},
                              {"variants": variants, "subset_subjects": subset, "n_samples": len(samples),
                               "parameters": evaluation.model_dump(mode="json"),
                               "reference": "fused surface mesh + fused landmarks of each eval-split sample"})
    for name in ("by_variant", "by_age_group", "by_category"):
        create_table_artifact(key=f"eval-{name.replace('_', '-')}",
                              table=[{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
                                     for r in tables[name]],
                              description=f"evaluation {eval_id}: means {name.replace('_', ' ')}")
    n_bad = sum(1 for r in rows if r.get("error"))
    for r in rows:
        if r.get("error"):
            log.error("evaluation row failed: %s", r["error"])
    return EvalSummary(eval_id=eval_id, path=str(path), variants=variants, n_samples=len(samples),
                       n_failed_rows=n_bad, by_variant=by_variant, seconds=time.perf_counter() - t0)


def run_evaluate(build: BuildConfig, model: ModelConfig = ModelConfig(), evaluation: EvaluateConfig = EvaluateConfig(),
                 api_url: str | None = None) -> EvalSummary:
    """Command-line entry: one Prefect API (``$PREFECT_API_URL`` or a temporary server), then :func:`evaluate`."""
    from pathlib import Path

    from flows.prefect_env import prefect_api

    with prefect_api(Path(build.prefect_home), api_url):
        state = evaluate(build=build, model=model, evaluation=evaluation, return_state=True)
        result = state.result(raise_on_failure=False)
    if isinstance(result, EvalSummary):
        return result
    raise result if isinstance(result, BaseException) else RuntimeError(f"evaluate failed: {state.message}")
