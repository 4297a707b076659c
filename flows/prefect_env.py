"""One Prefect API per build, handed to every Dask worker; Prefect state kept under the work folder.

In local mode Prefect starts a temporary API server in every process that needs one, and
every Dask worker process would start its own against the same SQLite file. A build
instead starts **one** API (or uses ``PREFECT_API_URL`` when it is set) and exports its URL
to the environment before the Dask cluster is created (so local worker processes inherit
it) and into Prefect's settings context (which Prefect serialises with every task, so
workers of an existing cluster use it too). Analytics are off, and ``PREFECT_HOME`` (the
SQLite database, logs, default result storage) is inside the project's work folder
unless the caller's environment sets it.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_PREFECT_HOME = Path("work/prefect")
BASE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
}


@dataclass(frozen=True)
class PrefectEnv:
    """The API a build talks to."""

    api_url: str
    home: Path
    started_server: bool
    startup_s: float
    server_pid: int | None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def environment(home: Path | None = None) -> dict[str, str]:
    """Environment variables of a build: analytics off, ``PREFECT_HOME`` under the work folder."""
    env = dict(BASE_ENV)
    env["PREFECT_HOME"] = os.environ.get("PREFECT_HOME") or str(Path(home or DEFAULT_PREFECT_HOME).resolve())
    return env


def configure_environment(home: Path | None = None) -> dict[str, str]:
    """Set :func:`environment` in ``os.environ`` (call before ``import prefect`` in an entry point)."""
    env = environment(home)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


@contextmanager
def _patched_environ(updates: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def prefect_api(home: Path | None = None, api_url: str | None = None, timeout_s: float = 60.0
                ) -> Iterator[PrefectEnv]:
    """Use ``api_url`` / ``$PREFECT_API_URL``, or start one temporary API server on 127.0.0.1.

    Inside the context, ``PREFECT_API_URL`` is set both in ``os.environ`` (inherited by
    Dask worker processes created inside it) and in Prefect's settings context.
    """
    from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                                  temporary_settings)

    env = environment(home)
    home_path = Path(env["PREFECT_HOME"])
    home_path.mkdir(parents=True, exist_ok=True)
    url = api_url or os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None
    server = None
    t0 = time.perf_counter()
    settings = {PREFECT_HOME: str(home_path), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with _patched_environ(env), temporary_settings(updates=settings):
        if url is None:
            server = _server_class()(port=free_port())
            server.start(timeout=int(timeout_s))
            url = server.api_url
        startup = time.perf_counter() - t0
        try:
            with _patched_environ({"PREFECT_API_URL": url}), temporary_settings(updates={PREFECT_API_URL: url}):
                yield PrefectEnv(url, home_path, server is not None, startup,
                                 server.server_process.pid if server is not None and server.server_process else None)
        finally:
            if server is not None:
                _drain_prefect_workers()
                server.stop()


_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(0)  # the build died before the line above\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
)
"""Runs the API server in place of itself after asking Linux to send it SIGTERM when its parent (the
build) dies: a build killed alone (``kill -9 PID``, the OOM killer) leaves no orphaned server."""


def _server_class():
    """Prefect's temporary-server class with the server started by :data:`_DIE_WITH_PARENT` on Linux.

    Prefect 3.9's ``SubprocessASGIServer`` starts ``uvicorn`` with a plain ``Popen``, so a build
    killed by ``SIGKILL`` (without its process group) left the server running forever, holding
    its port and the SQLite database (found by ``tests/test_reliability.py``). The command and
    environment below are Prefect's (``_run_uvicorn_command``, pinned version); it binds
    127.0.0.1 only.
    """
    import subprocess
    import sys

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    if not sys.platform.startswith("linux"):
        return SubprocessASGIServer

    class ChildASGIServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            return subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "-m", "uvicorn", "--app-dir",
                 str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env)

    return ChildASGIServer


def _drain_prefect_workers() -> None:
    """Send buffered logs and events before the API goes away (else "Error logging to API" at exit)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception:  # pragma: no cover - best effort at shutdown
        pass
