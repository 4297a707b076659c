"""End to end against real processes: `prefect server start`, `dask scheduler` and `dask worker`
on 127.0.0.1 (started here, stopped by PID), a `pixelface build` run in a subprocess, and
assertions through the Prefect REST API: one flow run per subject, each with its QC artifact."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait(check, what: str, timeout: float = 120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up in {timeout} s")


@pytest.fixture
def services(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    api_port, sched_port = _port(), _port()
    api = f"http://127.0.0.1:{api_port}/api"
    procs = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name, args, extra_env=None):
        out = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(args, cwd=tmp_path, env={**env, **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    try:
        start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)])
        start("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
                            "--no-dashboard"])
        address = f"tcp://127.0.0.1:{sched_port}"
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, "prefect server")
        start("worker", [str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                         "--no-dashboard", "--host", "127.0.0.1", "--local-directory", str(tmp_path / "dask")],
              {"PREFECT_API_URL": api, "PYTHONPATH": str(ROOT)})
        yield api, address, env
    finally:
        for p in reversed(procs):  # stop exactly what we started, by PID
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_build_against_real_server_and_cluster(services, tmp_path):
    from flows.synthesize import synthesize
    from pixelface.config import load_config

    api, address, env = services
    cfg = load_config(overrides={"synth": {"subjects": 2, "expressions": 1, "mesh_vertices": 20000,
                                           "rig": {"width": 128, "height": 96}}})
    raw = tmp_path / "raw"
    synthesize(cfg.synth, raw, tmp_path / "gt")
    store = tmp_path / "store"
    conf = tmp_path / "build.yaml"  # tiny views: a 3000-vertex surface instead of 100k
    conf.write_text("build:\n  stages:\n    surface:\n      target_vertices: 3000\n"
                    "    registration:\n      template:\n        n_vertices: 2000\n")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "build", "--raw", str(raw), "--store", str(store),
                        "--dask-address", address, "--quiet", "--json", "--config", str(conf)], cwd=ROOT,
                       env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["computed"] == 2 * (3 * 5 + 3)

    runs = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["build-subject"]}}})
    by_name = {}
    for fr in runs:
        by_name.setdefault(fr["name"], []).append(fr)
    assert sorted(by_name) == ["S0000", "S0001"] and all(len(v) == 1 for v in by_name.values())
    for name, (fr,) in by_name.items():
        assert fr["state_type"] == "COMPLETED" and f"build-{summary['build_id']}" in fr["tags"]
        arts = _post(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}})
        qc = [a for a in arts if a["type"] == "table" and a["key"].startswith(f"qc-{name.lower()}-")]
        assert len(qc) == 1
        table = json.loads(qc[0]["data"]) if isinstance(qc[0]["data"], str) else qc[0]["data"]
        assert len(table) == 3 * 5 + 3 and {row["stage"] for row in table} == {
            "decode", "depth", "texture", "mesh", "landmarks", "fusion", "surface", "registration"}
        tasks = _post(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [fr["id"]]}}})
        names = {t["name"] for t in tasks}
        assert f"sample-{name}-neutral" in names  # one task per sample runs its views' stages
    ds = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["build-dataset"]}}})
    assert len(ds) == 1 and ds[0]["state_type"] == "COMPLETED"
    arts = _post(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [ds[0]["id"]]}}})
    assert {"build-progress", "build-summary"} <= {a["key"] for a in arts}
    prog = [a for a in arts if a["key"] == "build-progress"][0]
    assert float(prog["data"]) == 100.0


def test_deploy_and_run_through_a_process_worker(services, tmp_path):
    """docs/orchestration.md steps 4-5: `prefect deploy --all` from prefect.yaml, a process worker,
    `prefect deployment run build-dataset/nightly`; the run builds every subject."""
    from flows.synthesize import synthesize
    from pixelface.config import load_config

    api, address, env = services
    env = {**env, "PREFECT_API_URL": api, "PIXELFACE_ROOT": str(ROOT)}
    cfg = load_config(overrides={"synth": {"subjects": 2, "expressions": 1, "mesh_vertices": 20000,
                                           "rig": {"width": 128, "height": 96}}})
    raw, store = tmp_path / "raw", tmp_path / "store"
    synthesize(cfg.synth, raw, tmp_path / "gt")

    def prefect(*args):
        r = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    prefect("work-pool", "create", "pixelface-local", "--type", "process")
    prefect("deploy", "--all")
    deps = _post(f"{api}/deployments/filter", {})
    assert sorted(d["name"] for d in deps) == ["after-model", "nightly", "on-demand", "qc"]
    assert {d["work_pool_name"] for d in deps} == {"pixelface-local"}

    log = open(tmp_path / "logs" / "process-worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "pixelface-local"], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        params = json.dumps({"raw": str(raw), "store": str(store), "dask_address": address,
                             "prefect_home": env["PREFECT_HOME"], "stages": {"surface": {"target_vertices": 3000},
                                                         "registration": {"template": {"n_vertices": 2000}}}})
        prefect("deployment", "run", "build-dataset/nightly", "--param", f"config={params}")

        def done():
            runs = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["build-dataset"]}}})
            states = [r["state_type"] for r in runs]
            assert "FAILED" not in states and "CRASHED" not in states, states
            return states == ["COMPLETED"]

        _wait(done, "the deployment's flow run", timeout=300)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    subjects = _post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["build-subject"]}}})
    assert sorted((r["name"], r["state_type"]) for r in subjects) == [("S0000", "COMPLETED"), ("S0001", "COMPLETED")]
    assert (store / "tables" / "stage_runs").is_dir()
