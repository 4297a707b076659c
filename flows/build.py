"""Build flows: one flow run per subject on a shared Dask cluster; a dataset flow that drives them.

* :func:`build_subject` (flow ``build-subject``, run named after the subject) plans the
  subject from its raw metadata, submits **one task per sample** (a chain unit running every
  stage of its views in process, :mod:`tasks.stage`) on a ``DaskTaskRunner``, waits, records
  one ``stage_runs`` row per stage per view in the catalog, and publishes a QC table artifact.
  A failed stage fails only its view's dependants; every other sample completes, and the
  subject's flow run ends ``Failed``.
* :func:`build_dataset` (flow ``build-dataset``) lists the subjects, starts a
  ``LocalCluster`` sized to the machine (or connects to ``dask_address``), and runs
  ``build_subject`` for many subjects concurrently, each as its **own top-level flow run**
  (tagged ``build-<id>``, all created ``Pending`` before the first one starts), so a dataset
  of thousands of subjects is thousands of small flow runs, never thousands of tasks (nor one
  wrapper task run per subflow) in one flow run. It updates a progress artifact as subjects
  finish, compacts the catalog and writes a markdown summary.
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

from distributed import Client as DaskClient
from distributed import Future as DaskFuture
from distributed import WorkerPlugin
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.context import FlowRunContext, TagsContext, TaskRunContext, get_run_context
from prefect.futures import wait as wait_futures
from prefect.states import Failed
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture
from pydantic import BaseModel, ConfigDict

from pixelface.config import BuildConfig, BuildOptions, with_template_hash
from tasks.catalog import (RunRow, SubjectPlan, compact_catalog, list_subjects, plan_subject, prepare_store,
                           record_subject)
from tasks.stage import Chain, StageRecord, Target, UnitRecord, chain_task, expand, with_store_results
from tasks.view_stages import SAMPLE_CHAIN, VIEW_CHAIN

UNIT: str = "sample"
"""Granularity of the Prefect work: ``"sample"`` (one task per sample running every stage of its
views; measured best, ``docs/orchestration.md``) or ``"view"`` (one task per view)."""

class DaskRunner(DaskTaskRunner):
    """``DaskTaskRunner`` that submits Prefect tasks with less driver and worker CPU.

    Same as prefect-dask 0.3's ``PrefectDaskClient.submit`` (task run id, dependencies,
    serialised run context, ``run_task_sync`` on the worker), except for these, measured by
    ``benchmarks/pipeline.py`` (``docs/orchestration.md``):

    * ``pure=False``: prefect-dask submits with Dask's default ``pure=True``, so Dask tokenises
      (pickles and hashes) every call's arguments, task object included, only to derive a key
      that is unique anyway (each call carries a fresh task run id): ~45 ms of driver CPU per task.
    * one Dask client per build (:func:`shared_dask_client`), not one per subject flow run:
      each new client costs a connection and ``add_client`` on the scheduler (~0.1 s of CPU in
      the driver, where a LocalCluster's scheduler runs);
    * the settings travel as the ``Settings`` object, not as a dict: Prefect serialises its
      whole settings model (``SettingsContext.serialize``, ~30 ms) for every task, and the worker
      re-validates that dict (~45 ms); pickling the object and reusing it costs ~1 ms on each side.
      Everything else of the context is Prefect's own ``serialize_context``.
    """

    @property
    def client(self):
        """The build's shared client for this address (:func:`shared_dask_client`), else prefect-dask's own."""
        shared = _shared_client.get()
        if not self._client and shared is not None and self.address == shared[0]:
            self._client = shared[1]   # not entered in this runner's exit stack: the build closes it
        return super().client

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        parameters = self._optimize_futures(parameters)
        wait_for = self._optimize_futures(wait_for) if wait_for else None
        task_run_id = uuid.uuid4()
        deps = {k: collect_task_run_inputs_sync(v, future_cls=DaskFuture) for k, v in parameters.items()}
        if dependencies:
            deps = {k: v.union(dependencies.get(k, set())) for k, v in deps.items()}
        context = _task_context(task, task_run_id, deps)
        future = DaskClient.submit(self.client, _run_prefect_task, key=f"{task.name}-{task_run_id.hex}", pure=False,
                                   task=task, task_run_id=task_run_id, parameters=parameters, wait_for=wait_for,
                                   return_type="state", dependencies=deps, context=context)
        return PrefectDaskFuture(wrapped_future=future, task_run_id=task_run_id)


def _task_context(task, task_run_id, deps) -> dict:
    """Prefect 3.9's ``serialize_context`` for a task about to be submitted, with the settings as objects.

    Same keys and values as ``prefect.context.serialize_context(asset_ctx_kwargs=...)`` except
    ``settings_context``, which holds the ``Profile`` and ``Settings`` objects themselves
    (``SettingsContext(**...)`` on the worker accepts them as they are);
    ``tests/test_build.py::test_task_context_matches_prefects`` compares the two.
    """
    import prefect.context as pc

    engine, task_run, tags_ctx = pc.EngineContext.get(), pc.TaskRunContext.get(), pc.TagsContext.get()
    settings = pc.SettingsContext.get()
    deployment_id, deployment_params = pc._deployment_id.get(), pc._deployment_parameters.get()
    return {
        "flow_run_context": engine.serialize() if engine else {},
        "task_run_context": task_run.serialize() if task_run else {},
        "tags_context": tags_ctx.serialize() if tags_ctx else {},
        "settings_context": {"profile": settings.profile, "settings": settings.settings} if settings else {},
        "asset_context": pc.AssetContext.from_task_and_inputs(task=task, task_run_id=task_run_id, task_inputs=deps,
                                                              copy_to_child_ctx=True).serialize(),
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": deployment_params,
    }


def _run_prefect_task(**kwargs):
    """What a Dask worker runs for a Prefect task (as prefect-dask's wrapper)."""
    import asyncio

    from prefect.task_engine import run_task_async, run_task_sync

    if kwargs["task"].isasync:
        return asyncio.run(run_task_async(**kwargs))
    return run_task_sync(**kwargs)


def limit_kernel_threads(n: int = 1) -> None:
    """Run kernels on ``n`` threads in this process: Open3D's TBB pool and the BLAS/OpenMP pools.

    A Dask worker runs one task per thread, so its kernels must not spread over every core
    (oversubscription). Open3D 0.20 parallelises with oneTBB and ignores ``OMP_NUM_THREADS``;
    its ICP then sums in a thread-dependent order and the fused transforms differed in the last
    bits from run to run (found by ``tests/test_reliability.py``). One thread makes them
    bitwise reproducible.
    """
    import open3d
    from threadpoolctl import threadpool_limits

    open3d.utility.set_max_threads(n)
    threadpool_limits(n)


class KernelThreads(WorkerPlugin):
    """Worker plugin: :func:`limit_kernel_threads` on every worker of the cluster, present and future
    (a worker restarted by its nanny gets it too)."""

    name = "pixelface-kernel-threads"

    def setup(self, worker):
        limit_kernel_threads(1)


_shared_client: contextvars.ContextVar[tuple[str, DaskClient] | None] = \
    contextvars.ContextVar("pixelface_dask_client", default=None)


@contextmanager
def shared_dask_client(address: str) -> Iterator[DaskClient]:
    """One Dask client for ``address``, used by every :class:`DaskRunner` in this context (the
    subject flow runs of a build run in threads started with a copy of it). Registers
    :class:`KernelThreads` with the scheduler (idempotent)."""
    with DaskClient(address, timeout=60) as client:
        client.register_plugin(KernelThreads())
        token = _shared_client.set((address, client))
        try:
            yield client
        finally:
            _shared_client.reset(token)


CHAINS: dict[str, Chain] = {"sample": SAMPLE_CHAIN, "view": VIEW_CHAIN}
UNIT_TASKS = {name: chain_task(c) for name, c in CHAINS.items()}

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
    load_cpu_s: float = 0.0
    write_cpu_s: float = 0.0
    unit_cpu_s: float = 0.0
    units: int = 0
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
        for k in ("kernel_cpu_s", "load_cpu_s", "write_cpu_s", "unit_cpu_s", "units"):
            out[k] = sum(getattr(s, k) for s in self.subjects)
        return out


def artifact_slug(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) unique per id."""
    import hashlib

    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]
    return f"{base}-{hashlib.blake2b(text.encode(), digest_size=3).hexdigest()}"


def _target(options: BuildOptions, subject: str, s, view: str | None = None) -> Target:
    return Target(raw=options.raw, store=options.store, subject=subject, sample=s.sample, views=s.views,
                  raw_keys=s.raw_keys, view=view)


def _neutral_start(state, log, subject: str) -> dict[str, StageRecord] | None:
    """``{"start": record}`` of the neutral unit's registration, or ``None`` (then from the template)."""
    rec = state.result(raise_on_failure=False)
    reg = next((r for r in rec.stages if r.stage == "registration"), None) if isinstance(rec, UnitRecord) else None
    if reg is None or not reg.ok:
        log.warning("subject %s: the neutral sample has no registration: every sample registered from the "
                    "template", subject)
        return None
    return {"start": reg}


def _rows(chain: Chain, target: Target, params, state) -> list[RunRow]:
    """One ``stage_runs`` row per stage of a finished unit (``Cached``: every stage ``cached``)."""
    rec = state.result(raise_on_failure=False)
    if isinstance(rec, UnitRecord):
        cached = state.name == "Cached"
        out = []
        for s in rec.stages:
            ok = s.outcome in ("computed", "cached")
            out.append(RunRow(
                subject_id=s.subject, sample_id=s.sample, view_id=s.view, stage=s.stage, artifact_key=s.key,
                input_keys=s.input_keys, param_hash=s.param_hash, code_version=s.code_version,
                status="completed" if ok else "failed", outcome="cached" if cached and ok else s.outcome,
                error=s.error, started_at=state.timestamp if cached else s.started_at,
                finished_at=state.timestamp if cached else s.finished_at,
                duration_s=0.0 if cached or s.started_at is None else (s.finished_at - s.started_at).total_seconds(),
                kernel_cpu_s=0.0 if cached else s.kernel_cpu_s, qc=s.qc))
        return out
    # the unit itself failed (not a stage): every stage of it is failed with that message
    msg = _message(rec, state)
    now = state.timestamp or datetime.now(timezone.utc)
    return [RunRow(subject_id=target.subject, sample_id=target.sample, view_id=n.view, stage=n.step.spec.name,
                   artifact_key=None, status="failed", outcome="failed", error=msg, finished_at=now)
            for n in expand(chain, target)]


def _message(exc, state) -> str:
    msg = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else (state.message or state.name)
    return " ".join(str(msg).split())


def _unit_cpu(state) -> tuple[int, float, float, float]:
    rec = state.result(raise_on_failure=False)
    if not isinstance(rec, UnitRecord) or state.name == "Cached":
        return 1, 0.0, 0.0, 0.0
    return (1, rec.cpu_s, sum(s.load_cpu_s for s in rec.stages), sum(s.write_cpu_s for s in rec.stages))


@flow(name="build-subject", flow_run_name="{subject}", task_runner=DaskRunner(), persist_result=False,
      validate_parameters=True)
def build_subject(subject: str, options: BuildOptions, unit: str | None = None):
    """Build every stage of every view of one subject's samples (one flow run per subject).

    One Prefect task per sample (``unit="sample"``, the default :data:`UNIT`) or per view
    (``unit="view"``); each runs its stages in process and reports one record per stage.
    The flow run ends ``Failed`` (carrying the :class:`SubjectSummary`) when a sample failed.

    Its task runs carry no tags (the flow run keeps the build's): Prefect 3.9 asks the API for
    tag concurrency slots before every task run that has tags, one database write each, even
    when no limit exists (``docs/orchestration.md``).
    """
    with TagsContext(current_tags=set()):
        return _build_subject(subject, options, unit)


def _build_subject(subject: str, options: BuildOptions, unit: str | None):
    t0 = time.perf_counter()
    log = get_run_logger()
    flow_run_id = str(get_run_context().flow_run.id)
    build_id = options.build_id or flow_run_id
    if not options.build_id:  # run on its own, not from build_dataset
        prepare_store(options.store)
    unit = unit or UNIT
    chain = CHAINS[unit]
    plan: SubjectPlan = plan_subject(options.raw, subject, options.store)
    if plan.error:  # the subject itself is unreadable: record why, build nothing of it
        log.error("subject %s not built: %s", subject, plan.error)
        record_subject(options.store, build_id, flow_run_id, plan, [])
        summary = SubjectSummary(subject=subject, flow_run_id=flow_run_id, failed=1, errors=[plan.error],
                                 seconds=time.perf_counter() - t0)
        return Failed(message=f"subject {subject}: {plan.error}", data=summary)
    unit_task = with_store_results(UNIT_TASKS[unit], options.store)
    submitted = []
    samples = [s for s in plan.samples if not s.error]
    for s in plan.samples:
        if s.error:
            log.error("sample %s/%s not built: %s", subject, s.sample, s.error)
    upstream = None
    if options.register_from_neutral and unit == "sample":
        neutral = next((s for s in samples if s.expression == options.neutral_expression), None)
        if neutral is None:
            log.warning("subject %s: no %r sample: every sample registered from the template", subject,
                        options.neutral_expression)
        else:  # the neutral sample first; its registration is where the others' start
            samples.remove(neutral)
            target = _target(options, subject, neutral)
            fut = unit_task.submit(target, options.stages)
            submitted.append((target, fut))
            fut.wait()
            upstream = _neutral_start(fut.state, log, subject)
    for s in samples:
        for target in ([_target(options, subject, s)] if unit == "sample"
                       else [_target(options, subject, s, v) for v in s.views]):
            submitted.append((target, unit_task.submit(target, options.stages, upstream)))
    wait_futures([f for _, f in submitted])
    rows, cpu = [], [0, 0.0, 0.0, 0.0]
    for target, fut in submitted:
        rows += _rows(chain, target, options.stages, fut.state)
        cpu = [a + b for a, b in zip(cpu, _unit_cpu(fut.state))]
    for r in rows:
        if r.outcome == "failed":
            log.error("FAILED %s %s/%s/%s: %s", r.stage, r.subject_id, r.sample_id, r.view_id or "_sample", r.error)
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
                             units=cpu[0], unit_cpu_s=cpu[1], load_cpu_s=cpu[2], write_cpu_s=cpu[3],
                             seconds=time.perf_counter() - t0, **count)
    text = (f"subject {subject}: {summary.stages} stages in {summary.units} {unit} tasks: {summary.computed} "
            f"computed, {summary.cached} cached, {summary.failed} failed")
    if not summary.ok:
        bad = sorted({r.sample_id for r in rows if r.status == "failed"} | {s.sample for s in plan.samples if s.error})
        return Failed(message=f"{text}; failed samples: {bad}", data=summary)
    log.info(text)
    return summary


DASK_CONFIG = {"distributed.admin.low-level-log-length": 50, "distributed.worker.profile.enabled": False,
               "distributed.admin.tick.interval": "500ms", "distributed.admin.system-monitor.interval": "2s",
               "distributed.worker.memory.monitor-interval": "500ms"}
"""Dask settings of a build.

Dask's statistical profiler samples every worker thread's stack every 10 ms for the
dashboard's profile page: ~2 s of CPU per worker in a 75 s build (the workers' event loop
threads, ``benchmarks/pipeline.py``), taken from the kernels on a busy machine. Off here;
``py-spy`` does the same from outside when needed.

Dask's timers wake every process many times a second whether or not work runs: the event-loop
health tick every 20 ms, the system monitor (psutil) every 0.5 s, the worker's memory monitor
every 0.1 s. An idle 2-worker LocalCluster took 0.47 s of worker CPU and 0.49 s of driver CPU
(scheduler and nannies) per 15 s; with a 0.5 s tick, a 2 s system monitor and a 0.5 s memory
monitor, 0.10 s and 0.15 s. The price: the dashboard's system plots update every 2 s, an
event loop blocked for less than 0.5 s goes unnoticed (Dask warns only above 3 s anyway), and a
worker over its memory limit is paused or restarted up to 0.5 s later.

Every Dask comm keeps its last ``low-level-log-length`` messages
(default 1000) for debugging, and a ``compute-task`` message carries the pickled Prefect task with
its whole run context (tens of kB): the LocalCluster's scheduler, which runs in the driver, grew
by ~0.3 MB per subject until those logs filled (``benchmarks/orchestration_scale.py``). Also
the scheduler's transition and event logs and the workers' logs. Set for the driver (scheduler,
nannies and clients) and handed to LocalCluster workers; an external scheduler and its workers
take them from the environment: ``DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH=50``,
``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False``, ``DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=500ms``,
``DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s`` and
``DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=500ms``."""


@contextmanager
def dask_cluster(cfg: BuildConfig) -> Iterator[str]:
    """The scheduler address: ``cfg.dask_address``, or a LocalCluster sized to the machine."""
    import dask

    with dask.config.set(DASK_CONFIG):
        with _cluster(cfg) as address:
            yield address


@contextmanager
def _cluster(cfg: BuildConfig) -> Iterator[str]:
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


def _subject_runner(address: str, heartbeat_s: int | None):
    """The subject flow bound to the build's cluster, and the Prefect settings its runs use (the heartbeat
    interval of ``BuildConfig.subject_heartbeat_s``); made once per build: ``Flow.with_options``
    rebuilds the parameter schema, ~20 ms each."""
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    ctx = SettingsContext.get()
    settings = ctx.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: heartbeat_s})
    return build_subject.with_options(task_runner=DaskRunner(address=address)), \
        SettingsContext(profile=ctx.profile, settings=settings)


CREATE_RUN_RETRY_S = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0)
"""Waits between attempts to create a subject flow run that the API answered with 503."""


def _create_subject_runs(runner, settings, subjects: list[str], options: BuildOptions,
                         run_tags: list[str]) -> dict[str, object]:
    """Create every subject's flow run (``Pending``, named after the subject, with the build's tags) before
    any of them starts: subject -> ``FlowRun``, or the exception that prevented it.

    Prefect 3.9's server creates a flow run in a deferred SQLite transaction that reads, then
    writes: when another write commits in between, SQLite refuses the upgrade at once ("database
    is locked", no busy wait), the API answers 503 and Prefect's client retries after ~2 s.
    Created by their own threads while other subjects ran, most creations took that retry
    (``docs/orchestration.md``). Created here one after another before any subject starts, they
    collide only with the build's own background writes (logs, events), and a 503 is retried
    after :data:`CREATE_RUN_RETRY_S` (20 ms first) instead of 2 s. About 30 ms per subject; the
    dashboard then shows every subject of the build from the start.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES
    from prefect.states import Pending

    once = SettingsContext(profile=settings.profile,
                           settings=settings.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0}))
    out: dict[str, object] = {}
    with once, get_client(sync_client=True) as client:
        for subject in subjects:
            params = runner.serialize_parameters({"subject": subject, "options": options})
            for wait_s in (*CREATE_RUN_RETRY_S, None):
                try:
                    out[subject] = client.create_flow_run(runner, parameters=params, name=subject,
                                                          tags=run_tags, state=Pending())
                    break
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 503 or wait_s is None:
                        out[subject] = exc
                        break
                    time.sleep(wait_s)
                except Exception as exc:  # the API refused or is gone: this subject fails, the others run
                    out[subject] = exc
                    break
    return out


def _run_subject(subject: str, options: BuildOptions, runner, settings, flow_run) -> SubjectSummary:
    from prefect.flow_engine import run_flow

    t0 = time.perf_counter()
    try:
        if isinstance(flow_run, BaseException):
            raise flow_run
        with settings.model_copy():
            state = run_flow(runner, flow_run=flow_run, parameters={"subject": subject, "options": options},
                             return_type="state")
    except Exception as exc:  # the flow run could not be created or started
        return SubjectSummary(subject=subject, errors=[_message(exc, None)], seconds=time.perf_counter() - t0)
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, SubjectSummary):  # the flow ran and some samples failed
        return exc
    return SubjectSummary(subject=subject, errors=[_message(exc, state)], seconds=time.perf_counter() - t0)


@flow(name="build-dataset", persist_result=False, validate_parameters=True)
def build_dataset(config: BuildConfig, build_id: str | None = None) -> DatasetSummary:
    """Build many subjects concurrently on one Dask cluster (one flow run per subject)."""
    t0 = time.perf_counter()
    log = get_run_logger()
    build_id = build_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    config = with_template_hash(config)   # a user template's file hash joins the registration key
    subjects = list_subjects(config.raw, config.subjects)
    removed = prepare_store(config.store)
    if removed:
        log.info("removed %d leftovers of interrupted writes", len(removed))
    options = BuildOptions.from_config(config, build_id)
    progress_id = create_progress_artifact(progress=0.0, key="build-progress",
                                           description=f"build {build_id}: 0 of {len(subjects)} subjects")
    done: list[SubjectSummary] = []
    notify = _on_subject.get()
    with dask_cluster(config) as address, shared_dask_client(address):
        log.info("build %s: %d subjects on Dask %s -> %s", build_id, len(subjects), address, config.store)
        n_workers = config.workers or (os.cpu_count() or 1)
        in_flight = config.max_concurrent_subjects or max(2, 2 * n_workers)
        run_tags = ["pixelface", f"build-{build_id}"]
        runner, settings = _subject_runner(address, config.subject_heartbeat_s)
        flow_runs = _create_subject_runs(runner, settings, subjects, options, run_tags)
        with ThreadPoolExecutor(max_workers=min(in_flight, max(1, len(subjects))),
                                thread_name_prefix="subject") as pool:
            pending = {pool.submit(contextvars.copy_context().run, _top_level, _run_subject, s, options, runner,
                                   settings, flow_runs[s]): s for s in subjects}
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
    gone = prepare_store(config.store)  # garbage of writers that died during this build (a lost worker)
    if gone:
        log.info("removed %d leftovers of writes interrupted during this build", len(gone))
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
    if bad:  # not green on the dashboard; the summary still travels with the state
        return Failed(message=f"build {build_id}: {len(bad)} of {len(subjects)} subjects had failures: "
                              f"{[s.subject for s in bad][:20]}", data=summary)
    return summary


def run_build(config: BuildConfig, *, on_subject: Callable[[SubjectSummary], None] | None = None,
              api_url: str | None = None) -> DatasetSummary:
    """Command-line entry: one Prefect API for the build (``$PREFECT_API_URL`` or a temporary server),
    then :func:`build_dataset`. Returns the summary whether or not some samples failed (the flow run
    is then ``Failed``); raises when the build itself could not run."""
    from flows.prefect_env import prefect_api
    token = _on_subject.set(on_subject)
    try:
        with prefect_api(Path(config.prefect_home), api_url):
            state = build_dataset(config=config, return_state=True)
            result = state.result(raise_on_failure=False)
    finally:
        _on_subject.reset(token)
    if isinstance(result, DatasetSummary):
        return result
    raise result if isinstance(result, BaseException) else RuntimeError(f"build failed: {state.message}")
