"""Build flows: one flow run per subject on a shared Dask cluster; a dataset flow that drives them.

* :func:`build_subject` (flow ``build-subject``, run named after the subject) plans the
  subject from its raw metadata, fans its views and samples out as stage tasks on a
  ``DaskTaskRunner``, waits, records one ``stage_runs`` row per stage per view in the
  catalog, and publishes a QC table artifact. A failed stage fails only its view's
  dependants; every other sample completes.
* :func:`build_dataset` (flow ``build-dataset``) lists the subjects, starts a
  ``LocalCluster`` sized to the machine (or connects to ``dask_address``), and runs
  ``build_subject`` for many subjects concurrently, each as its **own top-level flow run**
  (tagged ``build-<id>``), so a dataset of thousands of subjects is thousands of small
  flow runs, never thousands of tasks (nor one wrapper task run per subflow) in one flow run. It
  updates a progress artifact as subjects finish, compacts the catalog and writes a
  markdown summary.
* :func:`run_build` is the command-line entry: one Prefect API for the whole build
  (:mod:`flows.prefect_env`), then ``build_dataset``.

Flows only wire: no numerics, no direct store access (tasks do that through ``storage/``).
"""

from __future__ import annotations

import contextvars
import os
import re
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext, get_run_context
from prefect.futures import wait as wait_futures
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, ConfigDict

from pixelface.config import BuildConfig, BuildOptions
from tasks.catalog import (RunRow, SubjectPlan, compact_catalog, list_subjects, plan_subject, prepare_store,
                           record_subject)
from tasks.decode import decode_task
from tasks.view_stages import depth_task, landmarks_task, mesh_task, texture_task
from tasks.stage import StageRecord, Target, with_store_results

VIEW_STAGES: tuple[tuple[str, object, tuple[str, ...]], ...] = (
    ("decode", decode_task, ()),
    ("depth", depth_task, ("decode",)),
    ("texture", texture_task, ("decode", "depth")),
    ("mesh", mesh_task, ("decode",)),
    ("landmarks", landmarks_task, ("decode", "texture")),
)
"""Per-view stages in dependency order: (name = StageParams field, task, upstream stage names)."""

_on_subject: contextvars.ContextVar[Callable[["SubjectSummary"], None] | None] = \
    contextvars.ContextVar("pixelface_on_subject", default=None)


class SubjectSummary(BaseModel):
    """What a subject flow run did."""

    model_config = ConfigDict(frozen=True)

    subject: str
    flow_run_id: str | None = None
    samples: int = 0
    stages: int = 0
    computed: int = 0
    reused: int = 0
    cached: int = 0
    failed: int = 0
    errors: list[str] = []
    kernel_cpu_s: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.errors


class DatasetSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    build_id: str
    store: str
    subjects: list[SubjectSummary]
    seconds: float
    dask_address: str | None = None

    @property
    def failed(self) -> int:
        return sum(s.failed + (1 if s.errors and not s.failed else 0) for s in self.subjects)

    def totals(self) -> dict[str, float]:
        keys = ("stages", "computed", "reused", "cached", "failed")
        out = {k: sum(getattr(s, k) for s in self.subjects) for k in keys}
        out["kernel_cpu_s"] = sum(s.kernel_cpu_s for s in self.subjects)
        return out


def artifact_slug(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) unique per id."""
    import hashlib

    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]
    return f"{base}-{hashlib.blake2b(text.encode(), digest_size=3).hexdigest()}"


def _row(name: str, target: Target, state, upstream_failed: list[str]) -> RunRow:
    view = target.view
    if state.is_completed():
        rec: StageRecord = state.result()
        cached = state.name == "Cached"
        return RunRow(subject_id=rec.subject, sample_id=rec.sample, view_id=rec.view, stage=rec.stage,
                      artifact_key=rec.key, input_keys=rec.input_keys, param_hash=rec.param_hash,
                      code_version=rec.code_version, status="completed",
                      outcome="cached" if cached else rec.outcome,
                      started_at=state.timestamp if cached else rec.started_at,
                      finished_at=state.timestamp if cached else rec.finished_at,
                      duration_s=0.0 if cached else (rec.finished_at - rec.started_at).total_seconds(),
                      kernel_cpu_s=0.0 if cached else rec.kernel_cpu_s, qc=rec.qc)
    if upstream_failed:
        return RunRow(subject_id=target.subject, sample_id=target.sample, view_id=view, stage=name,
                      artifact_key=None, status="failed", outcome="upstream_failed",
                      error=f"not run: upstream stage(s) {upstream_failed} failed",
                      finished_at=datetime.now(timezone.utc))
    exc = state.result(raise_on_failure=False)
    msg = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else (state.message or state.name)
    return RunRow(subject_id=target.subject, sample_id=target.sample, view_id=view, stage=name, artifact_key=None,
                  status="failed", outcome="failed", error=" ".join(msg.split()),
                  finished_at=state.timestamp or datetime.now(timezone.utc))


@flow(name="build-subject", flow_run_name="{subject}", task_runner=DaskTaskRunner(), persist_result=False,
      validate_parameters=True)
def build_subject(subject: str, options: BuildOptions) -> SubjectSummary:
    """Build every stage of every view of one subject's samples (one flow run per subject)."""
    t0 = time.perf_counter()
    log = get_run_logger()
    flow_run_id = str(get_run_context().flow_run.id)
    build_id = options.build_id or flow_run_id
    if not options.build_id:  # run on its own, not from build_dataset
        prepare_store(options.store)
    plan: SubjectPlan = plan_subject(options.raw, subject)
    stage_tasks = {name: with_store_results(t, options.store) for name, t, _ in VIEW_STAGES}
    submitted = []
    for s in plan.samples:
        if s.error:
            log.error("sample %s/%s not built: %s", subject, s.sample, s.error)
            continue
        for view in s.views:
            target = Target(raw=options.raw, store=options.store, subject=subject, sample=s.sample, view=view,
                            raw_key=s.raw_keys.get(view))
            futs = {}
            for name, _, deps in VIEW_STAGES:
                inputs = {d: futs[d] for d in deps} or None
                futs[name] = stage_tasks[name].submit(target, getattr(options.stages, name), inputs)
                submitted.append((name, target, futs[name], deps))
    wait_futures([f for _, _, f, _ in submitted])
    rows, failed = [], set()
    for name, target, fut, deps in submitted:
        up = [d for d in deps if (target.sample, target.view, d) in failed]
        row = _row(name, target, fut.state, up)
        if row.status == "failed":
            failed.add((target.sample, target.view, name))
            log.error("FAILED %s %s: %s", name, target.where, row.error)
        elif row.outcome == "cached":
            log.info("cached %s %s key=%s", name, target.where, row.artifact_key[:12])
        rows.append(row)
    record_subject(options.store, build_id, flow_run_id, plan, rows)
    count = {k: sum(r.outcome == k for r in rows) for k in ("computed", "reused", "cached")}
    n_failed = sum(r.status == "failed" for r in rows) + sum(s.error is not None for s in plan.samples)
    create_table_artifact(
        key=f"qc-{artifact_slug(subject)}",
        table=[{"sample": r.sample_id, "view": r.view_id or "", "stage": r.stage, "outcome": r.outcome,
                "key": (r.artifact_key or "")[:12], "error": r.error or "",
                **{k: round(v, 4) for k, v in sorted(r.qc.items())}} for r in rows],
        description=f"QC of subject {subject} (build {build_id}): {count['computed']} computed, "
                    f"{count['reused']} reused, {count['cached']} cached, {n_failed} failed")
    summary = SubjectSummary(subject=subject, flow_run_id=flow_run_id, samples=len(plan.samples), stages=len(rows),
                             failed=n_failed, kernel_cpu_s=sum(r.kernel_cpu_s for r in rows),
                             errors=[f"{r.sample_id}/{r.view_id or '_sample'}/{r.stage}: {r.error}" for r in rows
                                     if r.outcome == "failed"] + [f"{s.sample}: {s.error}" for s in plan.samples
                                                                  if s.error],
                             seconds=time.perf_counter() - t0, **count)
    log.info("subject %s: %d stages: %d computed, %d reused (store), %d cached, %d failed", subject,
             summary.stages, summary.computed, summary.reused, summary.cached, summary.failed)
    return summary


@contextmanager
def dask_cluster(cfg: BuildConfig) -> Iterator[str]:
    """The scheduler address: ``cfg.dask_address``, or a LocalCluster sized to the machine."""
    if cfg.dask_address:
        yield cfg.dask_address
        return
    from distributed import LocalCluster

    n = cfg.workers or max(1, os.cpu_count() or 1)
    Path(cfg.dask_local_directory).mkdir(parents=True, exist_ok=True)
    one_thread = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with LocalCluster(n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True,
                      host="127.0.0.1", dashboard_address=None, local_directory=cfg.dask_local_directory,
                      env=one_thread) as cluster:
        yield cluster.scheduler_address


def _top_level(fn, *args, **kwargs):
    """Call ``fn`` with no parent flow/task run in context, so a flow called from it is a top-level run."""
    FlowRunContext.__var__.set(None)
    TaskRunContext.__var__.set(None)
    return fn(*args, **kwargs)


def _run_subject(subject: str, options: BuildOptions, address: str, run_tags: list[str]) -> SubjectSummary:
    t0 = time.perf_counter()
    runner = build_subject.with_options(task_runner=DaskTaskRunner(address=address))
    with tags(*run_tags):
        state = runner(subject=subject, options=options, return_state=True)
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    msg = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(state.message)
    return SubjectSummary(subject=subject, errors=[" ".join(msg.split())], seconds=time.perf_counter() - t0)


@flow(name="build-dataset", persist_result=False, validate_parameters=True)
def build_dataset(config: BuildConfig, build_id: str | None = None) -> DatasetSummary:
    """Build many subjects concurrently on one Dask cluster (one flow run per subject)."""
    t0 = time.perf_counter()
    log = get_run_logger()
    build_id = build_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    subjects = list_subjects(config.raw, config.subjects)
    removed = prepare_store(config.store)
    if removed:
        log.info("removed %d leftovers of interrupted writes", len(removed))
    options = BuildOptions.from_config(config, build_id)
    progress_id = create_progress_artifact(progress=0.0, key="build-progress",
                                           description=f"build {build_id}: 0 of {len(subjects)} subjects")
    done: list[SubjectSummary] = []
    notify = _on_subject.get()
    with dask_cluster(config) as address:
        log.info("build %s: %d subjects on Dask %s -> %s", build_id, len(subjects), address, config.store)
        n_workers = config.workers or (os.cpu_count() or 1)
        in_flight = config.max_concurrent_subjects or max(2, 2 * n_workers)
        run_tags = ["pixelface", f"build-{build_id}"]
        with ThreadPoolExecutor(max_workers=min(in_flight, max(1, len(subjects))),
                                thread_name_prefix="subject") as pool:
            pending = {pool.submit(contextvars.copy_context().run, _top_level, _run_subject, s, options, address,
                                   run_tags): s for s in subjects}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    subject = pending.pop(f)
                    try:
                        summary = f.result()
                    except Exception as exc:  # the flow machinery itself failed for this subject
                        summary = SubjectSummary(subject=subject, errors=[f"{type(exc).__name__}: {exc}"])
                    done.append(summary)
                    if notify:
                        notify(summary)
                    update_progress_artifact(progress_id, 100.0 * len(done) / max(1, len(subjects)),
                                             description=f"build {build_id}: {len(done)} of {len(subjects)} "
                                                         "subjects")
    compact_catalog(config.store)
    summary = DatasetSummary(build_id=build_id, store=config.store, subjects=sorted(done, key=lambda s: s.subject),
                             seconds=time.perf_counter() - t0, dask_address=config.dask_address)
    tot = summary.totals()
    bad = [s for s in summary.subjects if not s.ok]
    lines = [f"# Build {build_id}", "", f"{len(subjects)} subjects, {int(tot['stages'])} stage runs in "
             f"{summary.seconds:.1f} s: {int(tot['computed'])} computed, {int(tot['reused'])} reused, "
             f"{int(tot['cached'])} cached, {int(tot['failed'])} failed; kernel CPU {tot['kernel_cpu_s']:.1f} s.",
             "", f"Store: `{config.store}`", ""]
    if bad:
        lines += ["## Failures", ""] + [f"- **{s.subject}**: {e}" for s in bad for e in s.errors[:20]]
    create_markdown_artifact("\n".join(lines), key="build-summary", description=f"build {build_id}")
    log.info("build %s done in %.1f s: %s", build_id, summary.seconds, tot)
    return summary


def run_build(config: BuildConfig, *, on_subject: Callable[[SubjectSummary], None] | None = None,
              api_url: str | None = None) -> DatasetSummary:
    """Command-line entry: one Prefect API for the build (``$PREFECT_API_URL`` or a temporary server),
    then :func:`build_dataset`. Raises like the flow; sample failures are in the summary."""
    from flows.prefect_env import prefect_api
    token = _on_subject.set(on_subject)
    try:
        with prefect_api(Path(config.prefect_home), api_url):
            return build_dataset(config=config)
    finally:
        _on_subject.reset(token)
