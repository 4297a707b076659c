"""Reliability of `pixelface build` (issue 8): crash safety, worker loss, concurrent builds, determinism.

Every test builds one small synthetic dataset (3 subjects x 2 expressions, 128x96 views, shared by
the module) with real processes: `pixelface build` subprocesses (each in its own process group,
SIGKILLed as a whole), a `prefect server`, a `dask scheduler` and 2 `dask worker` processes on
127.0.0.1, started here and stopped by PID. Stores are compared with the module's reference build
generically (every artifact key and array digest, whatever the stages are), after re-hashing every
stored array (a corrupt artifact fails the comparison). Security checks of the store and the code
are in ``tests/test_security.py``.

"No duplicate catalog rows" (:func:`check_catalog`): reruns and concurrent builds legitimately
add rows, one set per build, so for the ``stage_runs`` table

* every ``row_id`` is stored once (after the final compaction: one file per table);
* within one ``build_id``, a stage instance (subject, sample, view, stage) has at most one row, and
  a subject's rows are all there or none (a killed build recorded some subjects completely and the
  others not at all);
* the latest view (:meth:`Catalog.latest`) has exactly one row per stage instance of the dataset,
  ``completed``, with the artifact key that is in the store;
* ``subjects`` / ``samples``: at most one row per subject / sample per build.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from storage.artifacts import array_digest
from storage.store import open_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUBJECTS, EXPRESSIONS, WIDTH, HEIGHT, SEED = 3, 2, 128, 96, 1
BUILD_YAML = ("build:\n  stages:\n    surface:\n      target_vertices: 1000\n"  # tiny views: small meshes
              "    registration:\n      template:\n        n_vertices: 1000\n")
MANIFESTS = "arrays/*/*/*/*/*.zarr/pixelface.json"


# -- helpers -------------------------------------------------------------------------------------

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


def base_env(home: Path, api: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return env


def build_cmd(raw: Path, store: Path, conf: Path, *extra: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "flows.cli", "build", "--raw", str(raw), "--store", str(store),
            "--config", str(conf), "--quiet", "--json", *extra]


def start(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """A build in its own session (process group), output to ``log``."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(p: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """Wait for a build; its JSON summary (the last line of its output)."""
    try:
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


def tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_group(p: subprocess.Popen) -> list[int]:
    """SIGKILL the build's whole process group; every process of its tree must be gone."""
    import psutil

    procs = tree(p.pid)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    gone, alive = psutil.wait_procs(procs, timeout=15)
    assert not [q for q in alive if q.status() != psutil.STATUS_ZOMBIE], f"survivors: {alive}"
    return [q.pid for q in procs]


def n_artifacts(store: Path) -> int:
    return sum(1 for _ in store.glob(MANIFESTS))


def n_parts(store: Path, table: str = "stage_runs") -> int:
    return sum(1 for _ in (store / "tables" / table).glob("part-*.parquet"))


def snapshot(store: Path) -> dict[tuple, dict[str, str]]:
    """(subject, sample, view|_sample, stage, key) -> {array: digest} of every visible artifact,
    after reading every array back and checking it against its manifest's digest."""
    st = open_store(store, create=False, read_only=True)
    out = {}
    for ref in st.artifacts.list():
        m = st.artifacts.manifest(ref)
        arrays = st.artifacts.read(ref)
        assert set(arrays) == set(m.arrays), ref
        for name, a in arrays.items():
            assert array_digest(a) == m.arrays[name].digest, f"corrupt array {name} of {ref}"
        out[(ref.subject, ref.sample, ref.scope, ref.stage, ref.key)] = {n: s.digest for n, s in m.arrays.items()}
    return out


def assert_no_partial(store: Path) -> list[str]:
    """Every artifact folder in the layout is complete (has its manifest); returns the staging entries
    (writes in progress or of dead writers: never visible to readers)."""
    for d in store.glob("arrays/*/*/*/*/*"):
        assert d.name.endswith(".zarr") and (d / "pixelface.json").is_file(), f"partial artifact visible: {d}"
    for f in store.glob("tables/*/*"):
        assert f.name.startswith(("part-", "compacted-", ".tmp-")), f
    staging = store / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def leftovers(store: Path) -> list[str]:
    """Garbage of interrupted writes: staging entries and temporary catalog files."""
    return assert_no_partial(store) + [f.name for f in store.glob("tables/*/.tmp-*")]


def check_catalog(store: Path, reference: dict, complete: bool = True) -> dict:
    """The catalog invariants of the module docstring; ``complete``: the latest view covers the dataset."""
    cat = open_store(store, create=False, read_only=True).catalog
    runs = cat.read("stage_runs").to_pylist()
    assert len({r["row_id"] for r in runs}) == len(runs)
    by_subject = defaultdict(set)  # the dataset's stage instances, per subject
    for subject, sample, scope, stage, _ in reference:
        by_subject[subject].add((sample, None if scope == "_sample" else scope, stage))
    per_build = defaultdict(lambda: defaultdict(list))
    for r in runs:
        per_build[r["build_id"]][r["subject_id"]].append((r["sample_id"], r["view_id"], r["stage"]))
    for build, subjects in per_build.items():
        for subject, rows in subjects.items():
            dup = [k for k, n in Counter(rows).items() if n > 1]
            assert not dup, f"build {build} recorded {dup} more than once"
            assert set(rows) == by_subject[subject], f"build {build}: partial record of subject {subject}"
    for table, key in (("subjects", ("subject_id",)), ("samples", ("subject_id", "sample_id"))):
        rows = [(r["build_id"], *(r[k] for k in key)) for r in cat.read(table).to_pylist()]
        assert len(rows) == len(set(rows)), f"duplicate {table} rows"
    latest = cat.latest("stage_runs").to_pylist()
    if complete:
        assert {r["status"] for r in latest} == {"completed"}
        got = {(r["subject_id"], r["sample_id"], r["view_id"] or "_sample", r["stage"], r["artifact_key"])
               for r in latest}
        assert got == set(reference), "latest stage runs do not match the store's artifacts"
    return {"builds": len(per_build), "rows": len(runs)}


def raw_file_rows(store: Path, table: str = "stage_runs") -> tuple[int, int]:
    """(files, rows) stored for ``table``, counting every file (duplicates would show here)."""
    files = sorted((store / "tables" / table).glob("*.parquet"))
    ids = [i for f in files for i in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)), f"{table}: a row is stored twice"
    return len(files), len(ids)


# -- module fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def raw(work) -> Path:
    from flows.synthesize import synthesize
    from pixelface.config import load_config

    cfg = load_config(overrides={"synth": {"subjects": SUBJECTS, "expressions": EXPRESSIONS, "seed": SEED,
                                           "mesh_vertices": 20000, "rig": {"width": WIDTH, "height": HEIGHT}}})
    synthesize(cfg.synth, work / "raw", work / "gt")
    (work / "build.yaml").write_text(BUILD_YAML)
    return work / "raw"


@pytest.fixture(scope="module")
def conf(raw, work) -> Path:
    return work / "build.yaml"


@pytest.fixture(scope="module")
def services(work):
    """A Prefect server, a Dask scheduler and 2 single-threaded Dask workers (with nannies), all on 127.0.0.1."""
    env = base_env(work / "prefect-services")
    api_port, sched_port = _port(), _port()
    api = f"http://127.0.0.1:{api_port}/api"
    address = f"tcp://127.0.0.1:{sched_port}"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs = []

    def launch(name, args, extra=None):
        procs.append(subprocess.Popen(args, cwd=work, env={**env, **(extra or {})}, stdout=open(logs / f"{name}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))

    try:
        launch("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)])
        launch("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
                             "--no-dashboard"])
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "prefect server")
        launch("workers", [str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
                           "--host", "127.0.0.1", "--local-directory", str(work / "dask")],
               {"PREFECT_API_URL": api, "OMP_NUM_THREADS": "1"})
        yield api, address
    finally:
        for p in reversed(procs):  # exactly what we started, by PID
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _client(address: str):
    from distributed import Client

    return Client(address, timeout=30)


@pytest.fixture(scope="module")
def reference(raw, conf, services, work):
    """The uninterrupted build every other build must equal: external scheduler, 2 workers."""
    api, address = services
    with _client(address) as c:
        c.wait_for_workers(2, timeout=120)
    store, log = work / "ref-store", work / "logs" / "reference.log"
    summary = finish(start(build_cmd(raw, store, conf, "--dask-address", address), base_env(work / "ph-ref", api),
                           work / "ref-cwd", log), log)
    assert summary["failed"] == 0 and summary["computed"] == summary["stages"] > 0
    snap = snapshot(store)
    assert len(snap) == summary["stages"]
    assert {k[0] for k in snap} == {f"S{i:04d}" for i in range(SUBJECTS)}
    return store, snap


# -- 2. crash safety -----------------------------------------------------------------------------

def test_sigkill_at_several_points_then_rerun_equals_uninterrupted_build(raw, conf, reference, services, work):
    """`pixelface build` with its own LocalCluster (2 workers) is SIGKILLed three times at growing
    progress and rerun each time; the final store equals the reference.

    Run 0 (the default: a temporary Prefect API started by the build) loses only its driver
    process, as with the OOM killer: the API server and the workers must exit by themselves. Runs
    1 and 2 (against the external API) lose their whole process group. The final run uses run 0's
    Prefect home again (its SQLite database was open when killed).
    """
    import psutil

    _, ref = reference
    api, _ = services
    total = len(ref)
    store = work / "crash-store"
    cmd = build_cmd(raw, store, conf, "--workers", "2")
    own_api, ext_api = base_env(work / "ph-crash"), base_env(work / "ph-crash-ext", api)
    points = [  # (what, environment, kill only the driver?, trigger): kill as soon as the trigger holds
        ("first artifact committed", own_api, True, lambda a0, p0: n_artifacts(store) >= 1),
        ("half of the artifacts", ext_api, False, lambda a0, p0: n_artifacts(store) >= max(a0 + 1, total // 2)),
        ("first subject's rows recorded in this run", ext_api, False, lambda a0, p0: n_parts(store) > p0),
    ]
    hits = []
    for i, (what, env, driver_only, trigger) in enumerate(points):
        a0, p0 = n_artifacts(store), n_parts(store)
        log = work / "logs" / f"crash-{i}.log"
        p = start(cmd, env, work / "crash-cwd", log)
        t0 = time.monotonic()
        while not trigger(a0, p0) and p.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.02)
        assert p.poll() is None, f"run {i} ended before '{what}':\n" + log.read_text()[-3000:]
        if driver_only:
            procs = tree(p.pid)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
            _, alive = psutil.wait_procs(procs, timeout=30)  # orphans would keep running (and writing)
            alive = [q for q in alive if q.status() != psutil.STATUS_ZOMBIE]
            for q in alive:  # do not leak them into the rest of the session
                os.kill(q.pid, signal.SIGKILL)
            assert not alive, f"the build's processes outlived it: {[q.cmdline()[:4] for q in alive]}"
        else:
            procs = kill_group(p)
        staging = assert_no_partial(store)
        seen = snapshot(store)
        # what a reader sees after the crash is part of the final result, bit for bit
        assert set(seen) <= set(ref) and all(seen[k] == ref[k] for k in seen)
        state = check_catalog(store, ref, complete=False)
        hits.append({"point": what, "processes": len(procs), "artifacts": len(seen), "staging": len(staging),
                     "stage_run_parts": n_parts(store), **state})
    committed = n_artifacts(store)
    log = work / "logs" / "crash-final.log"
    summary = finish(start(cmd, own_api, work / "crash-cwd", log), log)
    assert summary["failed"] == 0 and summary["stages"] == total
    # everything the killed runs committed is kept (cached), everything else computed once
    assert 0 < summary["cached"] == committed and summary["computed"] == total - committed
    assert snapshot(store) == ref
    assert leftovers(store) == []  # garbage of the killed writers removed, nothing partial left
    state = check_catalog(store, ref)
    assert state["builds"] >= 2  # the killed runs' complete subject records are kept, once each
    assert raw_file_rows(store) == (1, state["rows"])  # one compacted file, every row once
    print("kill points:", json.dumps(hits))


# -- 3. worker loss ------------------------------------------------------------------------------

def test_worker_killed_mid_build_build_completes_identically(raw, conf, reference, services, work):
    """SIGKILL the Dask worker process that is running a sample task (its nanny starts a new one);
    the task runs again elsewhere and the build completes with the reference's artifacts."""
    _, ref = reference
    api, address = services
    store, log = work / "wl-store", work / "logs" / "worker-loss.log"
    with _client(address) as client:
        client.wait_for_workers(2, timeout=120)
        pids = client.run(os.getpid)
        p = start(build_cmd(raw, store, conf, "--dask-address", address), base_env(work / "ph-wl", api),
                  work / "wl-cwd", log)
        victim, t0 = None, time.monotonic()
        while victim is None and p.poll() is None and time.monotonic() - t0 < 240:
            busy = {w: ks for w, ks in client.processing().items() if ks}
            if busy and n_artifacts(store) >= 1:  # mid-build: a unit has started writing
                victim = sorted(busy)[0]
            else:
                time.sleep(0.02)
        assert victim is not None, "no worker was ever busy:\n" + log.read_text()[-3000:]
        os.kill(pids[victim], signal.SIGKILL)
        done_at_kill = n_artifacts(store)
        summary = finish(p, log)
        client.wait_for_workers(2, timeout=120)  # the nanny replaced it
        assert pids[victim] not in client.run(os.getpid).values()
    assert done_at_kill < len(ref)
    assert summary["failed"] == 0 and summary["stages"] == len(ref)
    assert snapshot(store) == ref
    assert leftovers(store) == []
    check_catalog(store, ref)


# -- 4. concurrent builds ------------------------------------------------------------------------

def test_two_concurrent_builds_with_overlapping_subjects(raw, conf, reference, services, work):
    """Two `pixelface build` processes on one store, each with its own 1-worker LocalCluster,
    started together and both beginning with the shared subject (so both compute its first sample
    at the same time and commit the same keys): both finish, the store equals the reference, and
    each build recorded each of its stage runs exactly once."""
    _, ref = reference
    api, _ = services
    store = work / "cc-store"
    subjects = {"a": ["S0001", "S0000"], "b": ["S0001", "S0002"]}
    procs = {}
    for name, subj in subjects.items():
        log = work / "logs" / f"concurrent-{name}.log"
        procs[name] = (start(build_cmd(raw, store, conf, "--workers", "1", "--subjects", *subj),
                             base_env(work / f"ph-cc-{name}", api), work / f"cc-cwd-{name}", log), log)
    summaries = {name: finish(p, log) for name, (p, log) in procs.items()}
    for name, s in summaries.items():
        assert s["failed"] == 0
        assert s["stages"] == sum(1 for k in ref if k[0] in subjects[name])
    assert snapshot(store) == ref
    assert leftovers(store) == []
    state = check_catalog(store, ref)
    assert state["builds"] == 2
    runs = open_store(store, create=False, read_only=True).catalog.read("stage_runs").to_pylist()
    shared = Counter((r["sample_id"], r["view_id"], r["stage"]) for r in runs
                     if r["subject_id"] == "S0001" and r["outcome"] == "computed")
    print(f"stage instances of S0001 computed by both builds at once: {sum(n == 2 for n in shared.values())} "
          f"of {len(shared)}")


# -- 5. determinism ------------------------------------------------------------------------------

def test_one_worker_build_equals_two_worker_build_and_binds_localhost(raw, conf, reference, work):
    """A second, independent build of one subject (1 LocalCluster worker, its own temporary Prefect
    API) has the reference's (2 external workers) artifact keys and array digests for that subject;
    while it runs, every socket its processes listen on is on 127.0.0.1."""
    import psutil

    _, ref = reference
    subject = "S0002"
    ref = {k: v for k, v in ref.items() if k[0] == subject}
    store, log = work / "det-store", work / "logs" / "determinism.log"
    p = start(build_cmd(raw, store, conf, "--workers", "1", "--subjects", subject), base_env(work / "ph-det"),
              work / "det-cwd", log)
    listening, t0 = {}, time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 240:
        for q in tree(p.pid):
            try:
                for c in q.net_connections("inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listening[(q.pid, c.laddr.port)] = c.laddr.ip
            except psutil.NoSuchProcess:
                pass
        if n_artifacts(store) >= 1 and len({pid for pid, _ in listening}) >= 3:
            break  # driver (scheduler), API server and the worker are all up
        time.sleep(0.1)
    summary = finish(p, log)
    assert summary["failed"] == 0
    assert snapshot(store) == ref
    assert len({pid for pid, _ in listening}) >= 3 and set(listening.values()) == {"127.0.0.1"}, listening


def test_same_sample_twice_in_process_same_digests_as_reference(raw, conf, reference):
    """No Prefect, no Dask: one sample's chain run twice into two memory stores gives the same arrays,
    and the same as the reference build (other processes, other workers), with the kernel threads
    of a build's workers (:func:`flows.build.limit_kernel_threads`)."""
    from flows.build import limit_kernel_threads
    from pixelface.config import load_config
    from storage.store import memory_store
    from tasks.stage import Target, run_chain
    from tasks.view_stages import SAMPLE_CHAIN

    _, ref = reference
    subject, sample = "S0002", "neutral"
    views = tuple(sorted({k[2] for k in ref if k[:2] == (subject, sample) and k[2] != "_sample"}))
    limit_kernel_threads(1)
    got = []
    for _ in range(2):
        st = memory_store()
        rec = run_chain(SAMPLE_CHAIN, Target(raw=str(raw), store="memory", subject=subject, sample=sample,
                                             views=views), load_config(conf).build.stages, store=st)
        assert not rec.failed
        got.append({(r.subject, r.sample, r.scope, r.stage, r.key): {n: s.digest for n, s in
                                                                     st.artifacts.manifest(r).arrays.items()}
                    for r in st.artifacts.list()})
    assert got[0] == got[1]
    assert got[0] == {k: v for k, v in ref.items() if k[:2] == (subject, sample)}


# -- publishing a folder (raw samples, models, evaluations) ----------------------------------------

def test_publish_dir_replaces_a_folder_without_a_gap_and_survives_a_concurrent_publisher(tmp_path):
    """A reader polling the published folder while it is replaced 200 times always finds a complete
    folder (atomic exchange), and two threads publishing the same folder both succeed."""
    import threading
    import uuid

    from storage._publish import exchange, publish_dir

    final = tmp_path / "sample"

    def make(tag: str) -> Path:
        tmp = tmp_path / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        (tmp / "a.bin").write_bytes(tag.encode() * 100)
        (tmp / "done.json").write_text(json.dumps({"tag": tag}))
        return tmp

    publish_dir(make("v0"), final)
    seen, stop = Counter(), threading.Event()

    def reader():  # opens the folder once, then reads both files of that folder
        while not stop.is_set():
            try:
                fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                seen["missing"] += 1
                continue
            try:
                def rd(name):
                    with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:
                        return f.read()

                tag = json.loads(rd("done.json"))["tag"]
                seen["ok" if rd("a.bin") == tag.encode() * 100 else "mixed"] += 1
            except (FileNotFoundError, json.JSONDecodeError):
                seen["replaced while reading"] += 1  # the old folder, being removed after the swap
            finally:
                os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            publish_dir(make(f"v{i + 1}"), final)
    finally:
        stop.set()
        t.join()
    assert seen["mixed"] == 0 and seen["ok"] > 0
    if exchange(make("x"), make("y")):  # the system swaps atomically: never a moment without the folder
        assert seen["missing"] == 0, seen
    writers = [threading.Thread(target=publish_dir, args=(make(f"w{i}"), final)) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert json.loads((final / "done.json").read_text())["tag"] in ("w0", "w1")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")) == ["sample"]
