"""Reduce flow ``build-model``: a PCA morphable model from the registrations in a store.

``pixelface model --store STORE`` (and the ``build-model/on-demand`` deployment in
``prefect.yaml``) runs :func:`build_model`:

1. **select** the newest completed registration of every sample from the catalog, with its
   expression (samples table) and split / age (subjects table): one neutral per training subject
   for the shape model, ``expression - neutral`` for the expression model (``tasks/model.py``);
   registrations of different templates are refused;
2. **gather** them into two Zarr data matrices (rows = samples) on the Dask cluster;
3. **PCA** (exact, snapshot method, out of core: ``tasks/pca.py``) of each matrix, up to
   ``model.shape_components`` / ``model.expression_components`` (fewer when the rank is lower);
4. **quality**: compactness, generalisation (eval-split registrations), specificity;
5. **publish** the model (Zarr + npz + PLY + card, ``storage/models.py``) and Prefect artifacts.

The model id is a hash of the input registration keys and the parameters: a rerun on the same
registrations finds the published model and does nothing (``reused``). Flows only wire; the
numerics are in ``kernels/`` and the store access in ``storage/``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict

from pixelface.config import BuildConfig, ModelConfig

MODEL_CODE_VERSION = "1"


class ModelSummary(BaseModel):
    """What a ``build-model`` run did (small: paths and numbers)."""

    model_config = ConfigDict(frozen=True)

    model_id: str
    path: str
    reused: bool
    n_vertices: int
    n_shape_samples: int
    n_expression_samples: int
    n_shape_components: int
    n_expression_components: int
    shape_components_99: int | None
    expression_components_99: int | None
    skipped: list[str] = []
    seconds: float = 0.0


@contextmanager
def dask_client(cfg: BuildConfig) -> Iterator:
    """A ``distributed.Client`` on ``cfg.dask_address`` or on a LocalCluster like the build's."""
    from distributed import Client

    from flows.build import dask_cluster

    with dask_cluster(cfg) as address, Client(address) as client:
        yield client


@flow(name="build-model", persist_result=False, validate_parameters=True)
def build_model(build: BuildConfig, model: ModelConfig = ModelConfig()) -> ModelSummary:
    """Build (or find) the morphable model of the registrations in ``build.store``."""
    from tasks.model import build_or_reuse_model

    from pixelface.config import with_template_hash

    t0 = time.perf_counter()
    build = with_template_hash(build)
    log = get_run_logger()
    with dask_client(build) as client:
        out = build_or_reuse_model(build.store, model, build.stages.registration, MODEL_CODE_VERSION, client)
    card = out["card"]
    summary = ModelSummary(
        model_id=out["model_id"], path=out["path"], reused=out["reused"], n_vertices=card["n_vertices"],
        n_shape_samples=card["shape"]["n_samples"], n_expression_samples=card["expression"]["n_samples"],
        n_shape_components=card["shape"]["n_components"], n_expression_components=card["expression"]["n_components"],
        shape_components_99=card["shape"]["n_components_99"],
        expression_components_99=card["expression"]["n_components_99"], skipped=card["skipped"],
        seconds=time.perf_counter() - t0)
    rows = []
    for part in ("shape", "expression"):
        c = card[part]
        rows.append({"model": part, "samples": c["n_samples"], "components": c["n_components"],
                     "for_99pct": c["n_components_99"] if c["n_components_99"] is not None else f"> {c['n_components']}",
                     "explained": round(sum(c["explained_ratio"]), 4),
                     "truncated": c["truncated_reason"] or ""})
    create_table_artifact(key="model-variance", table=rows,
                          description=f"model {summary.model_id}: components and explained variance")
    q = card.get("quality", {})
    lines = [f"# Model {summary.model_id}", "", f"`{summary.path}`", "",
             f"{summary.n_shape_samples} neutral registrations -> {summary.n_shape_components} shape components; "
             f"{summary.n_expression_samples} expression residuals -> {summary.n_expression_components} expression "
             "components.", ""]
    for key, label in (("shape_generalisation_mm", "shape generalisation (eval split, all components)"),
                       ("shape_specificity_mm", "shape specificity"),
                       ("expression_generalisation_mm", "expression generalisation (eval split)")):
        if q.get(key) is not None:
            lines.append(f"- {label}: {q[key]:.3f} mm")
    if summary.skipped:
        lines += ["", f"Skipped (no neutral registration of their subject): {', '.join(summary.skipped[:50])}"]
    create_markdown_artifact("\n".join(lines), key="model-card", description=f"model {summary.model_id}")
    log.info("model %s %s in %.1f s: %d shape / %d expression components", summary.model_id,
             "reused" if summary.reused else "built", summary.seconds, summary.n_shape_components,
             summary.n_expression_components)
    return summary


def run_model(build: BuildConfig, model: ModelConfig = ModelConfig(), api_url: str | None = None) -> ModelSummary:
    """Command-line entry: one Prefect API (``$PREFECT_API_URL`` or a temporary server), then :func:`build_model`."""
    from pathlib import Path

    from flows.prefect_env import prefect_api

    with prefect_api(Path(build.prefect_home), api_url):
        state = build_model(build=build, model=model, return_state=True)
        result = state.result(raise_on_failure=False)
    if isinstance(result, ModelSummary):
        return result
    raise result if isinstance(result, BaseException) else RuntimeError(f"build-model failed: {state.message}")
