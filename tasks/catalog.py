"""Per-subject bookkeeping tasks: plan a subject from its raw metadata, record its rows, compact tables."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from storage.raw import RawDataset, RawFormatError
from storage.store import open_store
from tasks.stage import STAGE_RETRIES, STAGE_RETRY_DELAY_S, transient_only


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplePlan(_Frozen):
    """One sample to build (or why it cannot be)."""

    sample: str
    views: tuple[str, ...] = ()
    expression: str | None = None
    category: str | None = None
    width: int | None = None
    height: int | None = None
    raw_keys: dict[str, str] = {}
    error: str | None = None


class SubjectPlan(_Frozen):
    """A subject's metadata and samples, read from the raw root (or why they cannot be)."""

    subject: str
    gender: str = "unknown"
    age: int | None = None
    split: str = ""
    samples: tuple[SamplePlan, ...] = ()
    error: str | None = None
    """Set when the subject itself is unreadable (bad ``subject.json``, ...): nothing of it is built."""


class RunRow(_Frozen):
    """One ``stage_runs`` row (see :data:`storage.catalog.SCHEMAS`)."""

    subject_id: str
    sample_id: str
    view_id: str | None
    stage: str
    artifact_key: str | None
    input_keys: dict[str, str] = {}
    param_hash: str | None = None
    code_version: str | None = None
    status: Literal["completed", "failed"]
    outcome: Literal["computed", "reused", "cached", "failed", "upstream_failed"]
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    kernel_cpu_s: float = 0.0
    qc: dict[str, float] = {}


def list_subjects(raw: str, only: list[str] | None = None) -> list[str]:
    """Subject ids of the raw root (all, or those of ``only`` in that order; unknown ids raise)."""
    from storage.ids import check_id

    for s in only or ():
        check_id(s, "subject")
    have = RawDataset(Path(raw)).subjects()
    if not only:
        return have
    unknown = [s for s in only if s not in set(have)]
    if unknown:
        raise ValueError(f"subject(s) {unknown} not found in {raw}")
    return list(dict.fromkeys(only))


@task(name="plan-subject", task_run_name="plan-{subject}", cache_policy=NO_CACHE, persist_result=False,
      retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAY_S, retry_condition_fn=transient_only)
def plan_subject(raw: str, subject: str, store: str | None = None) -> SubjectPlan:
    """Read ``subject.json`` and every ``sample.json``; a bad sample is planned as failed, not raised.

    The raw view keys come from the store's memo of unchanged files (:mod:`storage.rawkeys`) when
    ``store`` is given, else from hashing the files."""
    from storage.rawkeys import RawKeyMemo

    ds = RawDataset(Path(raw))
    try:
        meta = ds.subject(subject)
        sample_ids = ds.samples(subject)
    except RawFormatError as exc:
        return SubjectPlan(subject=subject, error=f"{type(exc).__name__}: {exc}")
    memo = RawKeyMemo(store, raw, subject)
    samples = []
    for sid in sample_ids:
        try:
            sm = ds.sample(subject, sid)
        except RawFormatError as exc:
            samples.append(SamplePlan(sample=sid, error=f"{type(exc).__name__}: {exc}"))
            continue
        samples.append(SamplePlan(sample=sid, views=tuple(sm.views), expression=sm.expression,
                                  category=sm.category, width=sm.width, height=sm.height,
                                  raw_keys={v: memo.key(sid, v) for v in sm.views}))
    memo.save()
    return SubjectPlan(subject=subject, gender=meta.gender, age=meta.age, split=meta.split, samples=tuple(samples))


@task(name="record-subject", task_run_name="record-{plan.subject}", cache_policy=NO_CACHE, persist_result=False,
      retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAY_S, retry_condition_fn=transient_only)
def record_subject(store: str, build_id: str, flow_run_id: str | None, plan: SubjectPlan,
                   rows: list[RunRow]) -> int:
    """Append the subject's ``subjects``, ``samples`` and ``stage_runs`` rows (one part file per table)."""
    cat = open_store(store, create=False).catalog
    failed_by_sample: dict[str, int] = {}
    for r in rows:
        failed_by_sample[r.sample_id] = failed_by_sample.get(r.sample_id, 0) + (r.status == "failed")
    samples = []
    for s in plan.samples:
        n_failed = failed_by_sample.get(s.sample, 0) + (s.error is not None)
        samples.append(dict(build_id=build_id, subject_id=plan.subject, sample_id=s.sample,
                            expression=s.expression, category=s.category, views=list(s.views), width=s.width,
                            height=s.height, raw_keys=s.raw_keys, status="failed" if n_failed else "completed",
                            n_failed=n_failed))
    extra = [RunRow(subject_id=plan.subject, sample_id=s.sample, view_id=None, stage="plan", artifact_key=None,
                    status="failed", outcome="failed", error=s.error, finished_at=datetime.now(timezone.utc))
             for s in plan.samples if s.error]
    if plan.error:
        extra.append(RunRow(subject_id=plan.subject, sample_id="", view_id=None, stage="plan", artifact_key=None,
                            status="failed", outcome="failed", error=plan.error,
                            finished_at=datetime.now(timezone.utc)))
    run_rows = [dict(build_id=build_id, flow_run_id=flow_run_id, **r.model_dump()) for r in [*rows, *extra]]
    n_bad = sum(s["status"] == "failed" for s in samples)
    error = plan.error or (f"{n_bad} of {len(samples)} samples failed" if n_bad else None)
    cat.append("subjects", [dict(build_id=build_id, subject_id=plan.subject, gender=plan.gender, age=plan.age,
                                 split=plan.split, n_samples=len(plan.samples),
                                 status="failed" if error else "completed", error=error)])
    if samples:
        cat.append("samples", samples)
    return cat.append("stage_runs", run_rows)


@task(name="compact-catalog", cache_policy=NO_CACHE, persist_result=False,
      retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAY_S, retry_condition_fn=transient_only)
def compact_catalog(store: str) -> dict[str, int]:
    """Merge each table's part files into one (safe while others append)."""
    cat = open_store(store, create=False).catalog
    return {t: cat.compact(t) for t in ("subjects", "samples", "stage_runs")}


@task(name="prepare-store", cache_policy=NO_CACHE, persist_result=False,
      retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAY_S, retry_condition_fn=transient_only)
def prepare_store(store: str) -> list[str]:
    """Create the store if needed and remove leftovers of interrupted writes (of dead writers)."""
    return open_store(store).clean_partial()
