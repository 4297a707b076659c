"""The one pattern every stage task follows: key, reuse or compute, write, return a small record.

A stage is declared as a :class:`StageSpec` (name, code version, level, raw input or not,
and three plain functions: ``load`` inputs from the store, call the ``kernel``, ``pack``
its result into arrays + QC metrics). :func:`stage_task` turns a spec into a Prefect task:

* **content key** (:func:`storage.keys.artifact_key`): stage, version, the stage's own
  parameters, the keys of its inputs (a raw view is keyed by a hash of its bytes);
* **Prefect cache key** (:func:`cache_key`): the content key plus the *write ids* of the
  input artifacts, so a rebuilt input (deleted, then recomputed) invalidates its
  dependants; when the artifact itself has disappeared from the store, the stale cache
  record is dropped, so the task runs again. A hit shows as ``Cached`` and runs nothing;
* **results**: a :class:`StageRecord` (key, QC, timings), persisted as JSON next to the
  store (``STORE/_prefect/results``), never kept in memory, never arrays or pickles;
* **retries** only for transient IO errors (:func:`transient_only`); bad input
  (:class:`storage.raw.RawFormatError`, kernel ``ValueError``) fails at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict

from storage.keys import ArtifactRef, artifact_key, canonical, hash_bytes, params_hash, raw_view_key
from storage.store import PREFECT_RESULTS_DIR, Store, open_store

STAGE_RETRIES = 2
STAGE_RETRY_DELAY_S = 1.0
NON_TRANSIENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                           FileExistsError)


class Target(BaseModel):
    """Where a stage runs: raw root, store, and (subject, sample, view); ``view=None`` for sample-level stages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    raw: str
    store: str
    subject: str
    sample: str
    view: str | None = None
    raw_key: str | None = None
    """Hash of the raw view's bytes when the planner already computed it (saves re-reading the view
    in every stage's cache key); ``None``: hash the files here."""

    @property
    def where(self) -> str:
        return f"{self.subject}/{self.sample}/{self.view or '_sample'}"


class StageRecord(BaseModel):
    """What a stage task returns (and Prefect persists as JSON): references and QC, never arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    subject: str
    sample: str
    view: str | None
    key: str
    input_keys: dict[str, str]
    param_hash: str
    code_version: str
    outcome: Literal["computed", "reused"]
    qc: dict[str, float]
    kernel_cpu_s: float
    started_at: datetime
    finished_at: datetime

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.subject, self.sample, self.view, self.key)


@dataclass(frozen=True)
class StageSpec:
    """Declaration of one stage.

    Attributes
    ----------
    name, version : str
        Stage name (store folder) and code version (bump when the output changes).
    level : {"view", "sample"}
    raw : bool
        Whether the stage reads the raw view (its key then includes the raw bytes' hash).
    load : callable(store, target, inputs: dict[str, StageRecord], params) -> dict
        Read inputs (from ``storage`` only) into the kernel's keyword arguments.
    kernel : callable(params, **kwargs) -> result
        The numerical work (a ``kernels/`` function); its CPU time is measured.
    pack : callable(result) -> (dict[str, ndarray], dict[str, float])
        Arrays to store and QC metrics.
    """

    name: str
    version: str
    level: Literal["view", "sample"]
    raw: bool
    load: Callable[..., dict]
    kernel: Callable[..., Any]
    pack: Callable[[Any], tuple[dict, dict]]


def input_keys(spec: StageSpec, target: Target, inputs: Mapping[str, StageRecord]) -> dict[str, str]:
    """Role -> key of every input: ``raw`` (hash of the view's bytes) and upstream artifacts."""
    keys = {}
    if spec.raw:
        keys["raw"] = target.raw_key or raw_view_key(Path(target.raw), target.subject, target.sample, target.view)
    for role, rec in sorted(inputs.items()):
        keys[role] = rec.key
    return keys


def input_write_ids(store: Store, keys: Mapping[str, str], inputs: Mapping[str, StageRecord]) -> dict[str, str]:
    """Role -> write id of each input as it is now (raw: its key). Missing inputs read ``missing``."""
    out = {"raw": keys["raw"]} if "raw" in keys else {}
    for role, rec in sorted(inputs.items()):
        m = store.artifacts.manifest(rec.ref)
        out[role] = m.write_id if m is not None else "missing"
    return out


def _ref(spec: StageSpec, target: Target, key: str) -> ArtifactRef:
    return ArtifactRef(spec.name, target.subject, target.sample, target.view if spec.level == "view" else None, key)


def cache_key(spec: StageSpec, ctx: TaskRunContext | None, parameters: Mapping[str, Any]) -> str:
    """The Prefect cache key of a stage call (see the module docstring)."""
    target: Target = parameters["target"]
    inputs = parameters.get("inputs") or {}
    keys = input_keys(spec, target, inputs)
    key = artifact_key(spec.name, spec.version, parameters["params"], keys)
    store = open_store(target.store, create=False)
    wids = input_write_ids(store, keys, inputs)
    pkey = f"{spec.name}-{hash_bytes(key.encode(), repr(sorted(wids.items())).encode())}"
    if ctx is not None and not store.artifacts.exists(_ref(spec, target, key)):
        _drop_stale_record(ctx, pkey)
    return pkey


def _drop_stale_record(ctx: TaskRunContext, pkey: str) -> None:
    """The artifact is gone (deleted, or never written): a cache record for it must not hit."""
    rs = ctx.result_store
    try:
        if not rs.exists(pkey):
            return
        storage = rs.result_storage
        base = getattr(storage, "basepath", None)
        if base:
            (Path(base).expanduser() / pkey).unlink(missing_ok=True)
    except Exception:  # pragma: no cover - best effort; the task then reads the stale record
        logging.getLogger("pixelface.tasks").warning("could not drop stale cache record %s", pkey)


def transient_only(task, task_run, state) -> bool:
    """Retry condition: retry IO hiccups (OSError other than missing/permission, timeouts), nothing else."""
    exc = state.data
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, NON_TRANSIENT_OS_ERRORS)


def run_stage(spec: StageSpec, target: Target, params: Any, inputs: Mapping[str, StageRecord] | None = None,
              *, store: Store | None = None, logger: logging.Logger | logging.LoggerAdapter | None = None
              ) -> StageRecord:
    """Body of every stage task (also callable without Prefect, e.g. from tests or a notebook)."""
    inputs = dict(inputs or {})
    started = datetime.now(timezone.utc)
    store = store or open_store(target.store, create=False)
    keys = input_keys(spec, target, inputs)
    key = artifact_key(spec.name, spec.version, params, keys)
    ref = _ref(spec, target, key)
    wids = input_write_ids(store, keys, inputs)
    missing = [r for r, w in wids.items() if w == "missing"]
    if missing:
        raise FileNotFoundError(f"{spec.name} {target.where}: input artifact(s) {missing} are missing from the "
                                "store (deleted during the build?)")
    log = logger or logging.getLogger("pixelface.tasks")
    common = dict(stage=spec.name, subject=target.subject, sample=target.sample, view=ref.view, key=key,
                  input_keys=keys, param_hash=params_hash(params), code_version=spec.version)
    m = store.artifacts.manifest(ref)
    if m is not None and m.attrs.get("input_write_ids") == wids:
        log.info("reused %s %s key=%s (artifact exists, kernel not run)", spec.name, target.where, key[:12])
        return StageRecord(**common, outcome="reused", qc=m.attrs.get("qc", {}), kernel_cpu_s=0.0,
                           started_at=started, finished_at=datetime.now(timezone.utc))
    kwargs = spec.load(store, target, inputs, params)
    c0, t0 = time.thread_time(), time.perf_counter()
    result = spec.kernel(params, **kwargs)
    kernel_cpu, kernel_wall = time.thread_time() - c0, time.perf_counter() - t0
    arrays, qc = spec.pack(result)
    qc = {k: float(v) for k, v in qc.items()}
    attrs = {"stage": spec.name, "version": spec.version, "params": canonical(params), "input_keys": keys,
             "input_write_ids": wids, "qc": qc, "kernel_cpu_s": kernel_cpu}
    store.artifacts.write(ref, arrays, attrs, mode="replace" if m is not None else "create")
    log.info("computed %s %s key=%s in %.3f s (kernel %.3f s)%s", spec.name, target.where, key[:12],
             time.perf_counter() - t0, kernel_wall, " [replaced stale artifact]" if m else "")
    return StageRecord(**common, outcome="computed", qc=qc, kernel_cpu_s=kernel_cpu, started_at=started,
                       finished_at=datetime.now(timezone.utc))


def stage_task(spec: StageSpec):
    """Build the Prefect task of ``spec`` (``task_run_name`` carries subject/sample/view)."""

    def fn(target: Target, params: Any, inputs: dict[str, StageRecord] | None = None) -> StageRecord:
        return run_stage(spec, target, params, inputs, logger=get_run_logger())

    fn.__name__ = f"{spec.name}_task"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"Prefect task of stage {spec.name!r} (version {spec.version}); see tasks.stage."
    name = "{target.subject}-{target.sample}-" + ("{target.view}" if spec.level == "view" else "sample")
    return task(fn, name=spec.name, task_run_name=f"{spec.name}-{name}",
                cache_key_fn=lambda ctx, p: cache_key(spec, ctx, p),
                persist_result=True, result_serializer="json", cache_result_in_memory=False,
                retries=STAGE_RETRIES, retry_delay_seconds=STAGE_RETRY_DELAY_S, retry_condition_fn=transient_only)


def with_store_results(t, store_url: str):
    """``t`` with its cache records kept in ``STORE/_prefect/results`` (shared by every worker)."""

    if "://" in store_url and not store_url.startswith("file://"):
        return t  # remote stores: Prefect's configured default result storage
    base = Path(store_url.removeprefix("file://")).resolve() / PREFECT_RESULTS_DIR
    base.mkdir(parents=True, exist_ok=True)
    return t.with_options(result_storage=base)


def new_id() -> str:
    return uuid.uuid4().hex
