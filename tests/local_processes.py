"""Helpers for tests that start servers as child processes on loopback, or wait on what they do.

`free_port()` hands out ports the kernel never gives away by itself: a port picked by binding port 0
is an ephemeral one, and between closing the probe and the server's bind, Ray's own processes (which
open ephemeral sockets all the time) can take it ("Failed to bind to address 127.0.0.1:PORT"). Ports
here come from below the kernel's ephemeral range and above Ray's worker ports, each at most once per
session, and each is checked free by binding it first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)  # Linux's default, for systems without the /proc file
RAY_WORKER_PORTS_END = 19999  # Ray's default --max-worker-port: its workers bind 10002..19999
PORTS_PER_SESSION_SLICE = 500  # concurrent pytest sessions start at different offsets (by pid)


def ephemeral_port_range() -> tuple[int, int]:
    """(low, high), inclusive: the ports the kernel hands out for `bind(0)` and outgoing connections."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return low, high


def assignable_ports() -> list[int]:
    """Ports no one is handed by accident: above Ray's worker ports and outside the ephemeral range."""
    low, high = ephemeral_port_range()
    return [p for p in range(RAY_WORKER_PORTS_END + 1, 65536) if not low <= p <= high]


class _PortAllocator:
    """Walks `assignable_ports()` from a per-process offset; never returns the same port twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: list[int] | None = None
        self._next = 0

    def take(self) -> int:
        with self._lock:
            if self._ports is None:
                self._ports = assignable_ports()
                if not self._ports:
                    raise RuntimeError(f"no TCP ports outside the ephemeral range {ephemeral_port_range()}")
                self._next = (os.getpid() * PORTS_PER_SESSION_SLICE) % len(self._ports)
            for _ in range(len(self._ports)):
                port = self._ports[self._next % len(self._ports)]
                self._next += 1
                if _bindable(port):
                    return port
        raise RuntimeError("every assignable TCP port on 127.0.0.1 is taken")


def _bindable(port: int) -> bool:
    """True when nothing on 127.0.0.1 (or the wildcard address) holds `port` right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_ALLOCATOR = _PortAllocator()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, outside the kernel's ephemeral range (so no
    other process's outgoing socket takes it before our server binds it), never handed out twice."""
    return _ALLOCATOR.take()


def stop_process_group(process: subprocess.Popen, first: signal.Signals, timeout_s: float) -> None:
    """Sends `first` to the process's group (started with start_new_session=True), waits up to
    `timeout_s`, then SIGKILLs the group."""
    os.killpg(process.pid, first)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(check, timeout_s: float, every_s: float = 0.2, what: str = "condition"):
    """Polls `check()` until it returns something truthy (and returns that), or fails the test.

    Use it instead of a fixed sleep: it is as fast as the system allows and as patient as `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


# MLflow 3's server also starts a job runner (GenAI jobs and periodic tasks) with seven huey consumer
# processes, each importing MLflow: on 2 cores they took the CPU the server needed to answer /health
# (147 s for the registry test, loaded). Nothing here submits MLflow jobs.
MLFLOW_SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextlib.contextmanager
def mlflow_server(backend: Path | str, artifacts: Path, port: int, log: Path | None = None, timeout_s: float = 180):
    """A real `mlflow server` on 127.0.0.1:`port` over `backend` (a Path: that SQLite file; a str: a
    backend-store URI as given, e.g. PostgreSQL's), serving artifacts from `artifacts`; its output goes
    to `log` (shown if it exits early) or nowhere; yields its URL once /health answers; stopped (SIGTERM,
    then SIGKILL) when the block ends. The same address can be served again later (a registry that
    comes back)."""
    backend_uri = f"sqlite:///{backend}" if isinstance(backend, Path) else backend
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend_uri]
    command += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port)]
    output = log.open("w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [*command, "--workers", "1"],
        stdout=output,
        stderr=subprocess.STDOUT,
        env={**os.environ, **MLFLOW_SERVER_ENV},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if process.poll() is not None:
            shown = f": {log.read_text()}" if log is not None else ""
            pytest.fail(f"mlflow server exited with {process.returncode}{shown}")
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, timeout_s, every_s=0.5, what=f"mlflow server on {backend_uri.split(':')[0]} answering")
        yield url
    finally:
        stop_process_group(process, signal.SIGTERM, 30)
        if log is not None:
            output.close()
