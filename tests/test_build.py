"""Build flows on a small synthetic dataset: artifacts, catalog, caching, invalidation, failures.

One session-scoped Prefect test harness and one in-process Dask cluster (2 workers,
``processes=False``) serve every test; each test builds a fresh copy of the raw data into
its own store.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storage.store import open_store

VIEW_STAGES = ("decode", "depth", "texture", "mesh", "landmarks")
SAMPLE_STAGES = ("fusion", "surface", "registration")
STAGES = VIEW_STAGES + SAMPLE_STAGES
_TAIL = {"fusion", "surface", "registration"}
DOWNSTREAM = {"decode": set(STAGES), "depth": {"depth", "texture", "landmarks"} | _TAIL,
              "texture": {"texture", "landmarks"} | _TAIL, "mesh": {"mesh"},
              "landmarks": {"landmarks"} | _TAIL, "fusion": set(_TAIL),
              "surface": {"surface", "registration"}, "registration": {"registration"}}
TEMPLATE_VERTICES = 2000
N_VIEWS = 3  # views per sample


def _code_versions() -> dict[str, str]:
    from tasks.view_stages import SAMPLE_CHAIN

    return {st.spec.name: st.spec.version for st in SAMPLE_CHAIN.steps}


CODE_VERSIONS = _code_versions()


def stage_count(n_samples: int, stages=STAGES) -> int:
    """Stage instances of ``n_samples`` samples: view-level stages once per view, sample-level once."""
    return n_samples * sum(N_VIEWS if s in VIEW_STAGES else 1 for s in stages)


def stage_params(**kw):
    """Stage parameters of the tests: a small surface mesh (the tiny test views fuse to ~20k points)
    and a small registration template."""
    from kernels.meshing import MeshingParams
    from pixelface.config import RegistrationStageParams, StageParams, TemplateConfig

    return StageParams(**{"surface": MeshingParams(target_vertices=3000),
                          "registration": RegistrationStageParams(template=TemplateConfig(n_vertices=TEMPLATE_VERTICES)),
                          **kw})
IGNORED = {"row_id", "build_id", "recorded_at", "flow_run_id", "started_at", "finished_at", "duration_s",
           "kernel_cpu_s", "outcome"}


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        yield c.scheduler_address


@pytest.fixture(scope="session")
def raw_master(tmp_path_factory):
    from flows.synthesize import synthesize
    from pixelface.config import load_config

    cfg = load_config(overrides={"synth": {"subjects": 2, "expressions": 2, "mesh_vertices": 20000,
                                           "rig": {"width": 160, "height": 128}}})
    root = tmp_path_factory.mktemp("raw") / "raw"
    synthesize(cfg.synth, root, root.parent / "gt")
    return root


@pytest.fixture
def raw(raw_master, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(raw_master, dst)
    return dst


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count kernel calls (workers are threads of this process)."""
    import tasks.decode
    import tasks.sample_stages
    import tasks.view_stages

    calls = Counter()

    def counting(mod, name, stage):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            calls[stage] += 1
            return fn(*a, **k)

        monkeypatch.setattr(mod, name, wrapper)

    counting(tasks.decode, "decode_view", "decode")
    counting(tasks.view_stages, "depth_image", "depth")
    counting(tasks.view_stages, "texture_map", "texture")
    counting(tasks.view_stages, "grid_mesh", "mesh")
    counting(tasks.view_stages, "lift_landmarks", "landmarks")
    counting(tasks.sample_stages, "fuse_views", "fusion")
    counting(tasks.sample_stages, "mesh_point_cloud", "surface")
    counting(tasks.sample_stages, "register", "registration")
    return calls


def config(raw, store, cluster, **kw):
    from pixelface.config import BuildConfig

    kw.setdefault("stages", stage_params())
    return BuildConfig(raw=str(raw), store=str(store), dask_address=cluster, **kw)


def build(cfg, expect_failed: bool = False):
    """Run the dataset flow; its run is Failed exactly when some sample failed (the summary travels along)."""
    from flows.build import DatasetSummary, build_dataset

    state = build_dataset(config=cfg, return_state=True)
    assert state.is_failed() == expect_failed, state.message
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, DatasetSummary)
    return summary


def outcomes(summary_store: str, build_id: str) -> dict[tuple, str]:
    t = open_store(summary_store, create=False).catalog.read("stage_runs")
    return {(r["subject_id"], r["sample_id"], r["view_id"], r["stage"]): r["outcome"]
            for r in t.to_pylist() if r["build_id"] == build_id}


def subject_runs(summary):
    """The subject flow runs of a build and their task runs (through the Prefect API)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [s.flow_run_id for s in summary.subjects]
    with get_client(sync_client=True) as client:
        return ([client.read_flow_run(i) for i in ids],
                client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))))


def task_states(summary) -> dict[str, str]:
    """Task run name -> state name of the subject flow runs of a build."""
    return {t.name: t.state.name for t in subject_runs(summary)[1]}


def test_task_context_matches_prefects(harness):
    """``flows.build._task_context`` is Prefect's ``serialize_context`` with the settings as objects."""
    import uuid

    from prefect import flow, tags, task
    from prefect.context import SettingsContext, hydrated_context, serialize_context

    from flows.build import _task_context

    @task
    def noop(x):
        return x

    @flow
    def probe():
        rid = uuid.uuid4()
        ours = _task_context(noop, rid, {"x": set()})
        theirs = serialize_context(asset_ctx_kwargs={"task": noop, "task_run_id": rid, "task_inputs": {"x": set()},
                                                     "copy_to_child_ctx": True})
        return ours, theirs

    with tags("t1"):
        ours, theirs = probe()
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k != "settings_context"} == \
        {k: v for k, v in theirs.items() if k != "settings_context"}
    assert ours["tags_context"]["current_tags"] == {"t1"}
    assert SettingsContext(**ours["settings_context"]).settings == SettingsContext(**theirs["settings_context"]).settings
    with hydrated_context(ours):  # what the worker does with it
        from prefect.settings import get_current_settings

        assert get_current_settings() == SettingsContext(**theirs["settings_context"]).settings


def flow_states(summary) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {s.subject: client.read_flow_run(s.flow_run_id).state.type.value for s in summary.subjects}


def write_ids(store) -> dict:
    st = open_store(store, create=False)
    return {r: st.artifacts.manifest(r).write_id for r in st.artifacts.list()}


def comparable(store) -> list[dict]:
    t = open_store(store, create=False).catalog.latest("stage_runs")
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in t.to_pylist()]


def test_build_then_identical_rebuild_is_all_cached(harness, cluster, raw, tmp_path, kernel_calls):
    store = tmp_path / "store"
    s1 = build(config(raw, store, cluster))
    assert s1.failed == 0 and len(s1.subjects) == 2
    n_samples, n_views = 2 * 2, 2 * 2 * 3
    n_stages = stage_count(n_samples)
    assert s1.totals()["computed"] == n_stages
    assert kernel_calls == {s: n_views if s in VIEW_STAGES else n_samples for s in STAGES}
    st = open_store(store, create=False)
    # layout: arrays/<subject>/<sample>/<view>/<stage>/<key>.zarr with a manifest
    refs = st.artifacts.list()
    assert len(refs) == n_stages
    for r in refs:
        assert (r.view is None) == (r.stage in SAMPLE_STAGES)
        assert (store / "arrays" / r.subject / r.sample / (r.view or "_sample") / r.stage / f"{r.key}.zarr"
                / "pixelface.json").is_file()
    dec = [r for r in refs if r.stage == "decode"][0]
    got = st.artifacts.read(dec)
    assert got["points"].shape == (128, 160, 3) and got["points"].dtype == np.float32
    assert np.isfinite(got["points"]).any()
    lm = st.artifacts.read([r for r in refs if r.stage == "landmarks"][0])
    assert lm["points"].shape == (106, 3)
    fu = st.artifacts.read([r for r in refs if r.stage == "fusion"][0])
    n = fu["points"].shape[0]
    assert n > 1000 and fu["normals"].shape == (n, 3) and fu["confidence"].shape == (n,)
    assert fu["colours"].shape == (n, 3) and fu["landmarks"].shape == (106, 3)
    assert fu["transforms"].shape == (3, 4, 4) and np.allclose(fu["transforms"][1], np.eye(4))  # middle = pivot
    su = st.artifacts.read([r for r in refs if r.stage == "surface"][0])
    assert abs(len(su["vertices"]) - 3000) < 100 and su["faces"].dtype == np.int32
    # catalog rows
    cat = st.catalog
    assert cat.read("subjects").num_rows == 2 and cat.read("samples").num_rows == 4
    runs = cat.read("stage_runs").to_pylist()
    assert len(runs) == n_stages
    assert {r["status"] for r in runs} == {"completed"} and {r["outcome"] for r in runs} == {"computed"}
    for r in runs:
        assert len(r["artifact_key"]) == 40 and r["param_hash"] and r["code_version"] == CODE_VERSIONS[r["stage"]]
        assert r["duration_s"] >= 0
        if r["stage"] in VIEW_STAGES:
            assert dict(r["input_keys"]).keys() >= {"raw"} and r["view_id"]
        else:
            assert r["view_id"] is None and "raw" not in dict(r["input_keys"])
    assert all(dict(r["qc"]).get("valid_fraction", 0) > 0.05 for r in runs if r["stage"] == "decode")
    fqc = [dict(r["qc"]) for r in runs if r["stage"] == "fusion"]
    assert all(q["n_landmarks"] > 50 and q["left_converged"] == 1 and q["right_converged"] == 1
               and q["n_points"] > 1000 for q in fqc)
    sqc = [dict(r["qc"]) for r in runs if r["stage"] == "surface"]
    assert all(q["min_angle_30_fraction"] > 0.9 and q["n_vertices"] > 2900 and "holes" in q for q in sqc)
    rg = st.artifacts.read([r for r in refs if r.stage == "registration"][0])
    nt = rg["vertices"].shape[0]
    assert abs(nt - TEMPLATE_VERTICES) <= 0.05 * TEMPLATE_VERTICES and rg["vertices"].dtype == np.float32
    assert rg["distance"].shape == (nt,) and rg["valid"].dtype == bool and rg["landmarks"].shape == (106, 3)
    rqc = [dict(r["qc"]) for r in runs if r["stage"] == "registration"]
    assert all(q["mean_distance_mm"] < 0.5 and q["valid_fraction"] > 0.5 and q["n_flipped"] == 0 for q in rqc), rqc
    assert all(n == 1 for n in (cat.n_parts("subjects"), cat.n_parts("samples"), cat.n_parts("stage_runs")))
    before, rows_before = write_ids(store), comparable(store)

    kernel_calls.clear()
    s2 = build(config(raw, store, cluster))
    assert s2.failed == 0 and s2.totals()["cached"] == n_stages
    assert not kernel_calls  # no kernel ran
    units = {n: st for n, st in task_states(s2).items() if n.startswith("sample-")}
    assert len(units) == 4 and set(units.values()) == {"Cached"}  # one Prefect task per sample, a cache hit
    runs, tasks = subject_runs(s2)
    task_tags = [t.tags for t in tasks]
    assert sorted(r.name for r in runs) == ["S0000", "S0001"]  # named after the subject (created up front)
    assert all({"pixelface", f"build-{s2.build_id}"} <= set(r.tags) for r in runs)
    assert task_tags and all(t == [] for t in task_tags)  # no tag concurrency lookups per task run
    assert set(outcomes(str(store), s2.build_id).values()) == {"cached"}
    assert write_ids(store) == before  # nothing rewritten
    assert comparable(store) == rows_before  # identical catalog apart from run ids / times / outcome
    assert cat.read("stage_runs").num_rows == 2 * n_stages  # history kept

    # Cache records planted in the store are never handed to Prefect's deserializer (it would follow
    # the serializer the record names: pickle, or a JSON decoder of the record's choosing)
    marker = tmp_path / "unpickled"
    records = sorted((store / "_prefect" / "results").glob("sample-*"))
    assert len(records) == 4
    _plant_records(records[:3], marker)
    kernel_calls.clear()
    s3 = build(config(raw, store, cluster))
    assert not marker.exists()
    assert s3.failed == 0 and s3.totals()["cached"] == n_stages and not kernel_calls  # stages reused from the store
    states = sorted(st for n, st in task_states(s3).items() if n.startswith("sample-"))
    assert states == ["Cached", "Completed", "Completed", "Completed"]
    for r in records[:3]:
        assert len(list(r.parent.glob(r.name + ".rejected-*"))) == 1
        assert json.loads(r.read_text())["metadata"]["serializer"]["type"] == "json"  # rewritten by the run
    assert write_ids(store) == before


class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _plant_records(paths, marker) -> None:
    """Replace three unit cache records: a pickle record whose loading would create ``marker``, a JSON
    record naming a foreign decoder, and a JSON record naming a foreign class."""
    import base64
    import pickle

    good = json.loads(paths[0].read_text())
    meta = good["metadata"]
    paths[0].write_text(json.dumps({"metadata": {**meta, "serializer": {"type": "pickle", "picklelib": "pickle",
                                                                        "picklelib_version": None}},
                                    "result": base64.b64encode(pickle.dumps(_Touch(marker))).decode()}))
    evil = {**meta["serializer"], "object_decoder": "builtins.print"}
    paths[1].write_text(json.dumps({**json.loads(paths[1].read_text()), "metadata": {**meta, "serializer": evil}}))
    rec = json.loads(paths[2].read_text())
    rec["result"] = json.dumps({"__class__": "subprocess.Popen", "data": {"args": ["touch", str(marker)]}})
    paths[2].write_text(json.dumps(rec))


def test_parameter_change_and_deletion_recompute_only_downstream(harness, cluster, raw, tmp_path, kernel_calls):
    from kernels.texture import TextureParams

    store = tmp_path / "store"
    build(config(raw, store, cluster, subjects=["S0000"]))
    n_samples, n_views = 2, 2 * 3

    # one stage parameter: texture and its dependants only
    kernel_calls.clear()
    s = build(config(raw, store, cluster, subjects=["S0000"],
                     stages=stage_params(texture=TextureParams(occlusion_tol_mm=1.5))))
    got = outcomes(str(store), s.build_id)
    for (_, _, _, stage), outcome in got.items():
        assert outcome == ("computed" if stage in DOWNSTREAM["texture"] else "cached"), (stage, outcome)
    assert kernel_calls == {"texture": n_views, "landmarks": n_views, "fusion": n_samples, "surface": n_samples,
                            "registration": n_samples}

    # delete one artifact: it and its dependants (of that view only, plus the other sample's
    # registration, which starts from the neutral registration) are rebuilt
    st = open_store(store, create=False)
    victim = [r for r in st.artifacts.list(sample="neutral", stage="depth") if r.view == "left"][0]
    old_ids = write_ids(store)
    assert st.artifacts.delete(victim)
    kernel_calls.clear()
    s = build(config(raw, store, cluster, subjects=["S0000"],
                     stages=stage_params(texture=TextureParams(occlusion_tol_mm=1.5))))
    got = outcomes(str(store), s.build_id)
    for (subj, sample, view, stage), outcome in got.items():
        hit = (sample == "neutral" and view in ("left", None) and stage in DOWNSTREAM["depth"]) or stage == "registration"
        assert outcome == ("computed" if hit else "cached"), (sample, view, stage, outcome)
    assert kernel_calls == {"depth": 1, "texture": 1, "landmarks": 1, "fusion": 1, "surface": 1, "registration": 2}
    assert st.artifacts.exists(victim) and write_ids(store)[victim] != old_ids[victim]


def _corrupt(raw: Path):
    png = raw / "S0000" / "neutral" / "left" / "fringe_f1_n2.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    (raw / "S0000" / "mouth_open" / "middle" / "calibration.json").unlink()
    lm = raw / "S0001" / "neutral" / "right" / "landmarks.csv"
    lm.write_text("\n".join(lm.read_text().splitlines()[:-3]) + "\n")


def test_corrupt_samples_fail_clearly_others_complete(harness, cluster, raw, tmp_path):
    _corrupt(raw)
    store = tmp_path / "store"
    s = build(config(raw, store, cluster), expect_failed=True)
    assert s.failed > 0 and len(s.subjects) == 2
    assert flow_states(s) == {"S0000": "FAILED", "S0001": "FAILED"}  # a subject with a failed sample is not green
    units = task_states(s)
    assert units["sample-S0001-mouth_open"] == "Completed" and units["sample-S0000-neutral"] == "Failed"
    rows = open_store(store, create=False).catalog.read("stage_runs").to_pylist()
    failed = {(r["subject_id"], r["sample_id"], r["view_id"]) for r in rows if r["status"] == "failed"}
    assert failed == {("S0000", "neutral", "left"), ("S0000", "mouth_open", "middle"), ("S0001", "neutral", "right"),
                      ("S0000", "neutral", None), ("S0000", "mouth_open", None), ("S0001", "neutral", None)}
    errors = {(r["subject_id"], r["sample_id"], r["view_id"]): r["error"] for r in rows
              if r["outcome"] == "failed"}
    assert "fringe_f1_n2.png" in errors[("S0000", "neutral", "left")]
    assert "not a readable image" in errors[("S0000", "neutral", "left")]
    assert "calibration.json" in errors[("S0000", "mouth_open", "middle")] and "missing file" in \
        errors[("S0000", "mouth_open", "middle")]
    assert "expected 106 landmark rows" in errors[("S0001", "neutral", "right")]
    assert all(r["stage"] == "decode" for r in rows if r["outcome"] == "failed")
    assert {r["stage"] for r in rows if r["outcome"] == "upstream_failed"} == set(STAGES) - {"decode"}
    # a sample with a failed view decode: its fusion (and surface) are upstream_failed, not run
    up = {(r["subject_id"], r["sample_id"], r["stage"]) for r in rows if r["outcome"] == "upstream_failed"
          and r["stage"] in SAMPLE_STAGES}
    assert up == {(s, smp, st) for s, smp in (("S0000", "neutral"), ("S0000", "mouth_open"), ("S0001", "neutral"))
                  for st in SAMPLE_STAGES}
    ok = [r for r in rows if r["status"] == "completed"]
    assert len(ok) == (12 - 3) * len(VIEW_STAGES) + 1 * len(SAMPLE_STAGES)
    samples = {(r["subject_id"], r["sample_id"]): r["status"]
               for r in open_store(store, create=False).catalog.read("samples").to_pylist()}
    assert samples == {("S0000", "neutral"): "failed", ("S0000", "mouth_open"): "failed",
                       ("S0001", "neutral"): "failed", ("S0001", "mouth_open"): "completed"}


def test_cli_exit_code_says_partial_failure(harness, cluster, raw, tmp_path, capsys):
    from flows.cli import main as cli_main

    def main(a):
        return cli_main(["build", *a])

    (raw / "S0001" / "neutral" / "right" / "calibration.json").unlink()
    store = tmp_path / "store"
    conf = tmp_path / "stages.yaml"  # the tiny test views need a small surface mesh
    conf.write_text("build:\n  stages:\n    surface:\n      target_vertices: 3000\n")
    args = ["--raw", str(raw), "--store", str(store), "--dask-address", cluster, "--quiet", "--json",
            "--prefect-home", str(tmp_path / "prefect"), "--config", str(conf)]
    assert main(args + ["--subjects", "S0000"]) == 0
    assert main(args) == 1
    assert main(["--raw", str(tmp_path / "nope"), "--store", str(store)]) == 2
    out = capsys.readouterr()
    assert '"failed_subjects": ["S0001"]' in out.out and "no such folder" in out.err


def test_chain_unit_shares_arrays_in_memory_and_reuses_per_stage(raw, kernel_calls, monkeypatch):
    """A unit without Prefect (``run_chain``): computed arrays feed dependants from memory; per-stage
    reuse picks out the changed stage and its dependants; keys do not depend on the unit's grain."""
    from kernels.texture import TextureParams
    from storage.store import memory_store
    from tasks.stage import Target, run_chain, unit_cache_key
    from tasks.view_stages import SAMPLE_CHAIN, VIEW_CHAIN

    st = memory_store()
    reads, read = [], st.artifacts.read
    monkeypatch.setattr(st.artifacts, "read", lambda ref, names=None: reads.append(ref.stage) or read(ref, names))
    views = ("left", "middle", "right")
    t = Target(raw=str(raw), store="memory", subject="S0000", sample="neutral", views=views)
    rec = run_chain(SAMPLE_CHAIN, t, stage_params(), store=st)
    assert [(s.stage, s.outcome) for s in rec.stages] == [(n, "computed") for n in STAGES
                                                          for _ in (views if n in VIEW_STAGES else (None,))]
    assert kernel_calls == {s: 3 if s in VIEW_STAGES else 1 for s in STAGES} and not reads  # nothing read back
    assert all(s.write_id and s.kernel_cpu_s > 0 for s in rec.stages)

    kernel_calls.clear()
    changed = stage_params(texture=TextureParams(occlusion_tol_mm=1.5))
    assert unit_cache_key(SAMPLE_CHAIN, t, changed)[0] != unit_cache_key(SAMPLE_CHAIN, t, stage_params())[0]
    rec = run_chain(SAMPLE_CHAIN, t, changed, store=st)
    assert {(s.stage, s.outcome) for s in rec.stages} == {
        (n, "computed" if n in DOWNSTREAM["texture"] else "cached") for n in STAGES}
    assert kernel_calls == {"texture": 3, "landmarks": 3, "fusion": 1, "surface": 1, "registration": 1}
    assert set(reads) == {"decode", "depth"}  # only inputs of the rerun stages that were not computed here

    kernel_calls.clear()
    one = run_chain(VIEW_CHAIN, Target(raw=str(raw), store="memory", subject="S0000", sample="neutral",
                                       view="left"), changed, store=st)
    assert [s.outcome for s in one.stages] == ["cached"] * len(VIEW_STAGES) and not kernel_calls
    assert {s.key for s in one.stages} <= {s.key for s in rec.stages}


def test_subject_runs_are_created_in_order_and_503_is_retried_quickly(monkeypatch):
    """``_create_subject_runs``: one run per subject in order; a 503 (SQLite busy on the server) is
    retried after tens of ms with Prefect's own 2 s retry off; other errors fail only their subject."""
    import time as _time

    import httpx
    import prefect.client.orchestration as po
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    import flows.build as fb
    from pixelface.config import BuildConfig, BuildOptions

    calls, sleeps = [], []

    def status(code):
        req = httpx.Request("POST", "http://127.0.0.1/api/flow_runs/")
        return httpx.HTTPStatusError(f"{code}", request=req, response=httpx.Response(code, request=req))

    class Client:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def create_flow_run(self, flow, parameters, name, tags, state):
            assert PREFECT_CLIENT_MAX_RETRIES.value() == 0  # our retries, not the client's 2 s ones
            calls.append(name)
            if name == "S0001" and calls.count(name) <= 2:
                raise status(503)
            if name == "S0002":
                raise status(422)
            return f"run-{name}"

    class Runner:
        def serialize_parameters(self, p):
            return {"subject": p["subject"]}

    monkeypatch.setattr(po, "get_client", lambda sync_client=True: Client())
    class Clock:  # flows.build's view of the time module: sleeps recorded, not slept
        sleep = staticmethod(sleeps.append)

        def __getattr__(self, name):
            return getattr(_time, name)

    monkeypatch.setattr(fb, "time", Clock())
    opts = BuildOptions.from_config(BuildConfig(), "b")
    out = fb._create_subject_runs(Runner(), SettingsContext.get(), ["S0000", "S0001", "S0002", "S0003"], opts, ["t"])
    assert calls == ["S0000", "S0001", "S0001", "S0001", "S0002", "S0003"]
    assert sleeps == list(fb.CREATE_RUN_RETRY_S[:2]) and max(sleeps) < 0.1
    assert out["S0000"] == "run-S0000" and out["S0001"] == "run-S0001" and out["S0003"] == "run-S0003"
    assert isinstance(out["S0002"], httpx.HTTPStatusError)


def test_register_from_neutral_starts_expressions_from_the_neutral_registration(harness, cluster, raw, tmp_path):
    """``register_from_neutral`` (the default): the neutral sample runs first; the other samples' registration reads
    its registration as input ``start`` (key, catalog, qc), a rebuild is all cached, and without the
    option the same store computes the mean-face registrations under other keys."""
    store = tmp_path / "store"
    s1 = build(config(raw, store, cluster, register_from_neutral=True))
    assert s1.failed == 0 and s1.totals()["computed"] == stage_count(4)
    st = open_store(store, create=False)
    regs = {(r["subject_id"], r["sample_id"]): r for r in st.catalog.read("stage_runs").to_pylist()
            if r["stage"] == "registration"}
    assert len(regs) == 4
    for (subject, sample), r in regs.items():
        keys, qc = dict(r["input_keys"]), dict(r["qc"])
        if sample == "neutral":
            assert "start" not in keys and qc["start"] == 0.0
        else:
            assert keys["start"] == regs[(subject, "neutral")]["artifact_key"] and qc["start"] == 1.0
            assert 0 < qc["start_rigid_rmse_mm"] < 1.0 and qc["mean_distance_mm"] < 0.5
            assert qc["n_flipped"] == 0  # counted against the template, as the untangling restores
            # the photometric stage 2c ran from the fused colours and the neutral's detail
            assert qc["texture_rounds"] == 1 and qc["texture_matched_fraction"] > 0.3, qc
    for r in st.artifacts.list():
        if r.stage == "registration":
            d = st.artifacts.read(r, ["detail"])["detail"]
            assert d.dtype == np.float32 and np.isfinite(d).mean() > 0.5 and 0.005 < np.nanstd(d) < 0.2
    s2 = build(config(raw, store, cluster, register_from_neutral=True))
    assert s2.totals()["cached"] == stage_count(4) and s2.totals()["computed"] == 0
    s3 = build(config(raw, store, cluster, register_from_neutral=False))  # off: only the expressions' registrations
    assert s3.totals()["computed"] == 2 and s3.totals()["cached"] == stage_count(4) - 2
    refs = [r for r in st.artifacts.list() if r.stage == "registration" and r.sample != "neutral"]
    assert len(refs) == 4  # two subjects x (from neutral, from the template)
    by_subject: dict[str, list] = {}
    for r in refs:
        by_subject.setdefault(r.subject, []).append(st.artifacts.read(r, ["vertices"])["vertices"])
    for a, b in by_subject.values():
        assert np.abs(a - b).max() > 0.05  # the start changed the result
