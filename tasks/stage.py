"""Stages, chains of stages, and the one Prefect task per chain unit (a view, or a sample).

A **stage** is declared as a :class:`StageSpec` (name, code version, level, raw input or
not, and three plain functions: ``load`` inputs, call the ``kernel``, ``pack`` its result
into arrays + QC metrics). Stages are not Prefect tasks: a :class:`Chain` lists stages with
their upstream stages, and :func:`chain_task` turns a chain into **one** Prefect task that
runs every stage of one *unit* in process (``docs/architecture.md``, "Chains"):

* a view-level chain unit (``Target.view`` set) runs the chain's view-level stages of that view;
* a sample-level chain unit (``Target.view=None``) runs the view-level stages of every view
  of the sample, then the sample-level stages (which may take the view-level outputs of all
  views as inputs: role ``<stage>/<view>``).

Inside a unit, the raw view is read once (:class:`RawViews`) and each stage's output arrays
stay in memory for its dependants; nothing computed in the unit is read back from Zarr.
Bookkeeping stays **per stage**:

* **content key** (:func:`storage.keys.artifact_key`): stage, version, the stage's own
  parameters, the keys of its inputs (a raw view is keyed by a hash of its bytes);
* **per-stage reuse**: a stage whose artifact is in the store with the same key *and* was
  written from the same input writes (``input_write_ids`` in its manifest) is not run
  (outcome ``cached``); otherwise it runs (``computed``) and its dependants see a new write id,
  so they run too. A stage that raises is ``failed`` and only its dependants are
  ``upstream_failed``; the unit's other stages still run;
* **Prefect cache key** of the unit (:func:`unit_cache_key`): every stage key of the unit plus
  the write ids of inputs from *other* units (passed in as records, so no IO), computed
  without reading anything; if one of the unit's artifacts is gone (a ``stat``), the stale
  cache record is dropped so the unit runs. A hit shows as ``Cached`` and runs nothing;
* **results**: a :class:`UnitRecord` (one :class:`StageRecord` per stage: key, write id,
  outcome, QC, timings), persisted as JSON next to the store (``STORE/_prefect/results``),
  never kept in memory, never arrays or pickles. A unit with a failed stage returns a
  ``Failed`` state carrying its record (so it is never cached, and the flow still sees
  which stages completed);
* **retries**: transient IO errors (:func:`is_transient`) are retried per stage, in process;
  bad input (:class:`storage.raw.RawFormatError`, kernel ``ValueError``) fails at once.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
from prefect import task
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict

from storage.keys import ArtifactRef, artifact_key, canonical, hash_bytes, params_hash, raw_view_key
from storage.raw import RawDataset
from storage.store import PREFECT_RESULTS_DIR, Store, open_store, vet_cache_record

STAGE_RETRIES = 2
STAGE_RETRY_DELAY_S = 1.0
NON_TRANSIENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                           FileExistsError)
NON_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
Outcome = Literal["computed", "cached", "failed", "upstream_failed"]
log_default = logging.getLogger("pixelface.tasks")


# -- records ---------------------------------------------------------------------------------------

class Target(BaseModel):
    """One unit of work: raw root, store, (subject, sample) and one ``view`` or, with ``view=None``, all ``views``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    raw: str
    store: str
    subject: str
    sample: str
    view: str | None = None
    views: tuple[str, ...] = ()
    """Views of the sample (a sample unit runs the view-level stages of each)."""
    raw_keys: dict[str, str] = {}
    """View -> hash of the raw view's bytes, computed once by the planner; a missing entry is
    hashed where needed."""

    @property
    def where(self) -> str:
        return f"{self.subject}/{self.sample}" + (f"/{self.view}" if self.view else "")

    @property
    def unit_views(self) -> tuple[str, ...]:
        return (self.view,) if self.view else tuple(self.views)


class StageRecord(BaseModel):
    """One stage of one view (or sample) in one unit: references and QC, never arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    subject: str
    sample: str
    view: str | None
    key: str | None
    write_id: str | None = None
    input_keys: dict[str, str] = {}
    param_hash: str | None = None
    code_version: str | None = None
    outcome: Outcome
    error: str | None = None
    qc: dict[str, float] = {}
    kernel_cpu_s: float = 0.0
    load_cpu_s: float = 0.0
    write_cpu_s: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.subject, self.sample, self.view, self.key)

    @property
    def ok(self) -> bool:
        return self.outcome in ("computed", "cached")


class UnitRecord(BaseModel):
    """What a chain unit task returns (and Prefect persists as JSON): one record per stage, in run order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chain: str
    subject: str
    sample: str
    view: str | None
    stages: tuple[StageRecord, ...]
    cpu_s: float = 0.0
    """Thread CPU of the whole unit body (kernels + loads + writes + bookkeeping)."""

    @property
    def failed(self) -> list[StageRecord]:
        return [s for s in self.stages if not s.ok]


# -- declarations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    """Declaration of one stage.

    Attributes
    ----------
    name, version : str
        Stage name (store folder, ``StageParams`` field) and code version (bump when the output changes).
    level : {"view", "sample"}
    raw : bool
        Whether the stage reads the raw view (its key then includes the raw bytes' hash).
    load : callable(src: Sources, params) -> dict
        The kernel's keyword arguments, from ``src.raw`` (the unit's raw views, read once) and
        ``src.arrays(role, names)`` (upstream outputs: in memory when computed in this unit).
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


@dataclass(frozen=True)
class Step:
    """A stage in a chain and the stages it reads (by name; roles are the stage names,
    ``<stage>/<view>`` for a sample-level stage reading a view-level one)."""

    spec: StageSpec
    deps: tuple[str, ...] = ()
    external: tuple[str, ...] = ()
    """Optional inputs from other units (a sample-level role, e.g. ``start``: another sample's
    registration): a node reads one only when the unit's ``upstream`` has it, and its key then
    includes that input's key."""


@dataclass(frozen=True)
class Chain:
    """Stages in dependency order, run by one Prefect task per unit (:func:`chain_task`)."""

    name: str
    steps: tuple[Step, ...]

    def __post_init__(self):
        seen: dict[str, Step] = {}
        for st in self.steps:
            for d in st.deps:
                if d not in seen:
                    raise ValueError(f"chain {self.name}: stage {st.spec.name!r} depends on {d!r}, "
                                     "which is not an earlier stage")
                if st.spec.level == "view" and seen[d].spec.level == "sample":
                    raise ValueError(f"chain {self.name}: view stage {st.spec.name!r} cannot read sample "
                                     f"stage {d!r}")
            seen[st.spec.name] = st

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.spec.name for s in self.steps)

    def downstream(self, stage: str) -> set[str]:
        """``stage`` and every stage reading it, directly or not."""
        out = {stage}
        for st in self.steps:
            if out & set(st.deps):
                out.add(st.spec.name)
        return out


@dataclass(frozen=True)
class Node:
    """One stage instance in a unit: a step at one view (``None``: the sample) and its inputs."""

    step: Step
    view: str | None
    inputs: tuple[tuple[str, tuple[str, str | None]], ...]
    """(role, (stage, view)) of each upstream node."""

    @property
    def id(self) -> tuple[str, str | None]:
        return (self.step.spec.name, self.view)


def expand(chain: Chain, target: Target) -> list[Node]:
    """The stage instances of one unit, in run order."""
    views = target.unit_views
    level = {s.spec.name: s.spec.level for s in chain.steps}
    nodes = []
    for st in chain.steps:
        if st.spec.level == "view":
            for v in views:
                nodes.append(Node(st, v, tuple((d, (d, v)) for d in st.deps)))
        elif target.view is None:
            ins = []
            for d in st.deps:
                ins += [(f"{d}/{v}", (d, v)) for v in views] if level[d] == "view" else [(d, (d, None))]
            nodes.append(Node(st, None, tuple(ins)))
    return nodes


# -- per-process handles ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def store_handle(url: str) -> Store:
    """One store handle per process and URL (opening reads the store marker)."""
    return open_store(url, create=False)


@functools.lru_cache(maxsize=16)
def raw_dataset(root: str) -> RawDataset:
    """One validating raw reader per process and root (opening reads ``raw-format.json``)."""
    return RawDataset(Path(root))


class RawViews:
    """The raw views of one unit, each file read (and validated) at most once."""

    def __init__(self, target: Target):
        self.target = target
        self.ds = raw_dataset(target.raw)
        self._memo: dict[tuple, Any] = {}

    def _get(self, key: tuple, fn: Callable[[], Any]):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def sample_meta(self):
        t = self.target
        return self._get(("sample",), lambda: self.ds.sample(t.subject, t.sample))

    def view(self, view: str):
        """The whole view (every file read and validated): :class:`storage.raw.RawView`."""
        t = self.target
        v = self._get(("view", view), lambda: self.ds.read_view(t.subject, t.sample, view, self.sample_meta()))
        self._memo.setdefault(("calibration", view), v.calibration)
        self._memo.setdefault(("rgb", view), v.rgb)
        self._memo.setdefault(("landmarks", view), (v.landmarks_px, v.landmark_visible))
        return v

    def calibration(self, view: str):
        t = self.target
        return self._get(("calibration", view), lambda: self.ds.calibration(t.subject, t.sample, view))

    def rgb(self, view: str) -> np.ndarray:
        t = self.target
        return self._get(("rgb", view), lambda: self.ds.rgb(t.subject, t.sample, view, self.calibration(view)))

    def landmarks(self, view: str) -> tuple[np.ndarray, np.ndarray]:
        t = self.target
        cal = self.calibration(view)
        return self._get(("landmarks", view), lambda: self.ds.landmarks(t.subject, t.sample, view, cal.rgb.width,
                                                                        cal.rgb.height))


@dataclass
class Sources:
    """What a stage's ``load`` sees: the unit's raw views and its inputs' arrays."""

    raw: RawViews
    view: str | None
    _inputs: Mapping[str, StageRecord]
    _memory: Mapping[tuple, dict[str, np.ndarray]]
    _store: Store
    _node_ids: Mapping[str, tuple]
    reads: list = field(default_factory=list)

    def has(self, role: str) -> bool:
        """Whether input ``role`` is given (an optional input from another unit, :attr:`Step.external`)."""
        return role in self._inputs

    def arrays(self, role: str, names: list[str]) -> dict[str, np.ndarray]:
        """Arrays of input ``role``: from memory when computed in this unit, else from the store."""
        mem = self._memory.get(self._node_ids.get(role))
        if mem is not None and all(n in mem for n in names):
            return {n: mem[n] for n in names}
        rec = self._inputs[role]
        self.reads.append(role)
        return self._store.artifacts.read(rec.ref, names)

    def array_names(self, role: str) -> set[str]:
        """Names of the arrays input ``role`` has (for optional arrays, e.g. fused colours)."""
        mem = self._memory.get(self._node_ids.get(role))
        if mem is not None:
            return set(mem)
        m = self._store.artifacts.manifest(self._inputs[role].ref)
        return set(m.arrays) if m is not None else set()


# -- keys ------------------------------------------------------------------------------------------

def _raw_key(target: Target, view: str) -> str:
    return target.raw_keys.get(view) or raw_view_key(Path(target.raw), target.subject, target.sample, view)


def _stage_params(params: Any, name: str) -> Any:
    return getattr(params, name) if hasattr(params, name) else (params or {}).get(name)


def plan_keys(chain: Chain, target: Target, params: Any, upstream: Mapping[str, StageRecord] | None = None
              ) -> list[tuple[Node, dict[str, str], str]]:
    """(node, input keys, artifact key) of every node of a unit (pure: no IO beyond hashing unplanned raw views).

    ``upstream`` maps (``<stage>`` or ``<stage>/<view>``) to records of other units this unit reads.
    """
    upstream = upstream or {}
    keys: dict[tuple, str] = {}
    out = []
    for node in expand(chain, target):
        extra = tuple((r, (r, None)) for r in node.step.external if r in upstream and node.view is None)
        if extra:
            node = dataclasses.replace(node, inputs=node.inputs + extra)
        spec = node.step.spec
        ins = {"raw": _raw_key(target, node.view)} if spec.raw and node.view else {}
        for role, nid in node.inputs:
            ins[role] = keys[nid] if nid in keys else upstream[_role_of(nid)].key
        key = artifact_key(spec.name, spec.version, _stage_params(params, spec.name), ins)
        keys[node.id] = key
        out.append((node, ins, key))
    return out


def _role_of(nid: tuple[str, str | None]) -> str:
    return nid[0] if nid[1] is None else f"{nid[0]}/{nid[1]}"


def _ref(target: Target, node: Node, key: str) -> ArtifactRef:
    return ArtifactRef(node.step.spec.name, target.subject, target.sample, node.view, key)


def unit_cache_key(chain: Chain, target: Target, params: Any, upstream: Mapping[str, StageRecord] | None = None
                   ) -> tuple[str, list[ArtifactRef]]:
    """Prefect cache key of a unit and the artifacts a cache hit stands for.

    The key hashes every stage key of the unit and the write ids of its inputs from other
    units (taken from their records: no store reads).
    """
    planned = plan_keys(chain, target, params, upstream)
    ext = sorted((r, rec.write_id or "") for r, rec in (upstream or {}).items())
    body = repr(([(n.id, k) for n, _, k in planned], ext)).encode()
    return f"{chain.name}-{hash_bytes(body)}", [_ref(target, n, k) for n, _, k in planned]


# -- running a unit --------------------------------------------------------------------------------

def is_transient(exc: BaseException) -> bool:
    """IO hiccups worth a retry (OSError other than missing/permission, timeouts), nothing else."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in NON_TRANSIENT_ERRNOS:
        return False   # a full disk, an exceeded quota or a read-only file system stays so
    return isinstance(exc, OSError) and not isinstance(exc, NON_TRANSIENT_OS_ERRORS)


def transient_only(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of the bookkeeping tasks (see :func:`is_transient`)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # pragma: no cover - an unreadable failure is not worth a retry
        return False
    return isinstance(exc, BaseException) and is_transient(exc)


def _message(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def run_chain(chain: Chain, target: Target, params: Any, upstream: Mapping[str, StageRecord] | None = None, *,
              store: Store | None = None, logger: logging.Logger | logging.LoggerAdapter | None = None,
              retry_delay_s: float = STAGE_RETRY_DELAY_S) -> UnitRecord:
    """Body of every chain unit task (also callable without Prefect: tests, notebooks)."""
    c_unit = time.thread_time()
    store = store or store_handle(target.store)
    log = logger or log_default
    upstream = dict(upstream or {})
    raw = RawViews(target)
    memory: dict[tuple, dict[str, np.ndarray]] = {}
    done: dict[tuple, StageRecord] = {}
    records = []
    for node, keys, key in plan_keys(chain, target, params, upstream):
        spec = node.step.spec
        started = datetime.now(timezone.utc)
        common = dict(stage=spec.name, subject=target.subject, sample=target.sample, view=node.view, key=key,
                      input_keys=keys, param_hash=params_hash(_stage_params(params, spec.name)),
                      code_version=spec.version)
        inputs = {role: done.get(nid) or upstream.get(_role_of(nid)) for role, nid in node.inputs}
        bad = sorted(r for r, rec in inputs.items() if rec is None or not rec.ok)
        if bad:
            rec = StageRecord(**{**common, "key": None}, outcome="upstream_failed", started_at=started,
                              finished_at=started, error=f"not run: upstream stage(s) {bad} failed")
        else:
            for attempt in range(STAGE_RETRIES + 1):
                try:
                    rec = _run_node(spec, node, target, params, store, raw, memory, done, inputs, keys, key, common,
                                    started, log)
                    break
                except Exception as exc:
                    if attempt < STAGE_RETRIES and is_transient(exc):
                        log.warning("retrying %s %s after %s", spec.name, target.where, _message(exc))
                        time.sleep(retry_delay_s)
                        continue
                    rec = StageRecord(**{**common, "key": None}, outcome="failed", error=_message(exc),
                                      started_at=started, finished_at=datetime.now(timezone.utc))
                    log.error("FAILED %s %s/%s: %s", spec.name, target.where, node.view or "_sample", rec.error)
                    break
        done[node.id] = rec
        records.append(rec)
    return UnitRecord(chain=chain.name, subject=target.subject, sample=target.sample, view=target.view,
                      stages=tuple(records), cpu_s=time.thread_time() - c_unit)


def _run_node(spec, node, target, params, store, raw, memory, done, inputs, keys, key, common, started, log
              ) -> StageRecord:
    ref = _ref(target, node, key)
    wids = {"raw": keys["raw"]} if "raw" in keys else {}
    wids.update({role: rec.write_id for role, rec in sorted(inputs.items())})
    m = store.artifacts.manifest(ref)
    if m is not None and m.attrs.get("input_write_ids") == wids:
        log.debug("cached %s %s key=%s (artifact exists)", spec.name, ref.where(), key[:12])
        return StageRecord(**common, write_id=m.write_id, outcome="cached", qc=m.attrs.get("qc", {}),
                           started_at=started, finished_at=datetime.now(timezone.utc))
    c0 = time.thread_time()
    src = Sources(raw, node.view, inputs, memory, store, dict(node.inputs))
    kwargs = spec.load(src, _stage_params(params, spec.name))
    c1 = time.thread_time()
    result = spec.kernel(_stage_params(params, spec.name), **kwargs)
    c2 = time.thread_time()
    arrays, qc = spec.pack(result)
    qc = {k: float(v) for k, v in qc.items()}
    attrs = {"stage": spec.name, "version": spec.version, "params": canonical(_stage_params(params, spec.name)),
             "input_keys": keys, "input_write_ids": wids, "qc": qc, "kernel_cpu_s": c2 - c1}
    w = store.artifacts.write(ref, arrays, attrs, mode="replace" if m is not None else "create")
    c3 = time.thread_time()
    memory[node.id] = arrays
    log.debug("computed %s %s key=%s (kernel %.3f s CPU)%s", spec.name, ref.where(), key[:12], c2 - c1,
              " [replaced stale artifact]" if m else "")
    return StageRecord(**common, write_id=w.manifest.write_id, outcome="computed", qc=qc, kernel_cpu_s=c2 - c1,
                       load_cpu_s=c1 - c0, write_cpu_s=c3 - c2, started_at=started,
                       finished_at=datetime.now(timezone.utc))


# -- the Prefect task --------------------------------------------------------------------------------

def _drop_stale_record(ctx, pkey: str) -> None:
    """An artifact of the unit is gone (deleted, or never written): a cache record for it must not hit."""
    try:
        storage = ctx.result_store.result_storage
        base = getattr(storage, "basepath", None)
        if base:
            (Path(base).expanduser() / pkey).unlink(missing_ok=True)
    except Exception:  # pragma: no cover - best effort; the unit then reads the stale record
        log_default.warning("could not drop stale cache record %s", pkey)


def _vet_record(ctx, pkey: str) -> None:
    """Quarantine the unit's cache record when it is not a JSON ``UnitRecord`` (see :func:`storage.store.vet_cache_record`)."""
    storage = getattr(getattr(ctx, "result_store", None), "result_storage", None)
    base = getattr(storage, "basepath", None)
    if not base:
        return
    why = vet_cache_record(Path(base).expanduser() / pkey)
    if why:
        log_default.error("%s", why)


def _manifest_present(store: Store, ref: ArtifactRef) -> bool:
    return store.artifacts.exists(ref)


def chain_task(chain: Chain):
    """The Prefect task running ``chain`` for one unit (run name ``<chain>-<subject>-<sample>[-<view>]``)."""
    def cache_key_fn(ctx, p) -> str:
        pkey, refs = unit_cache_key(chain, p["target"], p["params"], p.get("upstream"))
        if ctx is not None:
            store = store_handle(p["target"].store)
            if not all(_manifest_present(store, r) for r in refs):
                _drop_stale_record(ctx, pkey)
            else:
                _vet_record(ctx, pkey)
        return pkey

    def fn(target: Target, params: Any, upstream: dict[str, StageRecord] | None = None) -> UnitRecord:
        log = get_run_logger()
        t0 = time.perf_counter()
        rec = run_chain(chain, target, params, upstream, logger=log)
        n = {k: sum(s.outcome == k for s in rec.stages) for k in ("computed", "cached", "failed",
                                                                  "upstream_failed")}
        kernel = sum(s.kernel_cpu_s for s in rec.stages)
        text = (f"{chain.name} {target.where}: {len(rec.stages)} stages: {n['computed']} computed, "
                f"{n['cached']} cached, {n['failed']} failed, {n['upstream_failed']} upstream_failed "
                f"in {time.perf_counter() - t0:.2f} s (kernel CPU {kernel:.2f} s, unit CPU {rec.cpu_s:.2f} s)")
        if rec.failed:
            return Failed(message=text + "; " + "; ".join(f"{s.stage} {s.view or '_sample'}: {s.error}"
                                                          for s in rec.failed if s.outcome == "failed"), data=rec)
        log.info(text)
        return rec

    fn.__name__ = f"{chain.name}_chain"
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"Prefect task running chain {chain.name!r} ({', '.join(chain.stage_names)}); see tasks.stage."
    return task(fn, name=f"{chain.name}-chain", task_run_name=_run_name(chain), cache_key_fn=cache_key_fn,
                persist_result=True, result_serializer="json", cache_result_in_memory=False, retries=0)


def _run_name(chain: Chain) -> Callable[[], str]:
    def name() -> str:
        t: Target = task_run.parameters["target"]
        return f"{chain.name}-{t.subject}-{t.sample}" + (f"-{t.view}" if t.view else "")
    return name


def with_store_results(t, store_url: str):
    """``t`` with its cache records kept in ``STORE/_prefect/results`` (shared by every worker)."""

    if "://" in store_url and not store_url.startswith("file://"):
        return t  # remote stores: Prefect's configured default result storage
    base = Path(store_url.removeprefix("file://")).resolve() / PREFECT_RESULTS_DIR
    base.mkdir(parents=True, exist_ok=True)
    return t.with_options(result_storage=base)


def new_id() -> str:
    return uuid.uuid4().hex

