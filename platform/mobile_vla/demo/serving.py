"""The demo's serving step: @champion behind Ray Serve on 127.0.0.1, ready for the robots.

    serving = start_serving(cfg, cluster)      # waits for /readyz; says which version and backend answer
    serving.url, serving.token                 # what a robot needs (token: first line of serving.tokens_file)
    wait_for_version(serving, "2")             # after a promotion: until the replicas serve it

A Serve already running on the cluster is joined on its port; otherwise Serve starts on --port (or a
free one) and `cluster.serve_started` tells `stop_cluster` to shut it down again.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from ray import serve
from ray.serve.context import _get_global_client

from mobile_vla.demo.cluster import Cluster
from mobile_vla.demo.settings import APP_NAME, REGISTERED_MODEL, DemoConfig
from mobile_vla.errors import ConfigError, ResourceError
from mobile_vla.serve.app import ServeAppConfig, build_app
from mobile_vla.serve.auth import create_tokens_file
from mobile_vla.tracking.registry import CHAMPION

SIMULATED_STEP_DEADLINE_S = 30.0  # a step's server-side budget: the robot clients' own timeout


@dataclass
class Serving:
    """Where the demo's server answers, its API token, and the version and backend it serves."""

    url: str
    token: str
    tokens_file: Path
    model_version: str | None = None
    backend: str | None = None


def start_serving(cfg: DemoConfig, cluster: Cluster, max_wait_s: float = 300.0) -> Serving:
    """@champion behind Ray Serve on 127.0.0.1 (ONNX Runtime on the CPU), ready when /readyz says so."""
    running = _get_global_client(raise_if_no_controller_running=False)
    if running is not None:  # Serve already up on this cluster: join it on its port
        port = running.http_config.port
    else:
        port = cfg.port if cfg.port and _port_is_free(cfg.port) else _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cluster.serve_started = True
    tokens_file = cfg.resolved_home() / "serve" / "tokens"
    token = _api_token(tokens_file)
    args = ServeAppConfig(
        model_uri=f"models:/{REGISTERED_MODEL}@{CHAMPION}",
        primary="onnx",
        tokens_file=str(tokens_file),
        feedback_dir=str(cfg.feedback_dir()),
        max_batch_size=max(8, cfg.robots),
        batch_wait_timeout_s=0.005,
        primary_timeout_s=10.0,
        # Simulated robots step in lockstep and wait for every answer, so no step goes stale: the default
        # budget (one control period) would drop steps (504) whenever a loaded 2-core box queues a batch.
        deadline_s=SIMULATED_STEP_DEADLINE_S,
    )
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start: name why, not Serve's generic line
        raise ResourceError(
            f"Ray Serve app {APP_NAME!r} did not deploy: {_deployment_failures(exc)} "
            "(replica logs: /tmp/ray/session_latest/logs/serve/)"
        ) from exc
    serving = Serving(url=f"http://127.0.0.1:{port}", token=token, tokens_file=tokens_file)
    _wait_until_ready(serving, max_wait_s)
    return serving


def _wait_until_ready(serving: Serving, max_wait_s: float) -> None:
    """Polls /readyz, then fills in the version and backend that /v1/model says are active."""
    deadline = time.monotonic() + max_wait_s
    with httpx.Client(base_url=serving.url, timeout=10.0) as http:
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ResourceError(f"{serving.url}/readyz: not ready after {max_wait_s:.0f} s")
            time.sleep(1.0)
        _note_served_model(serving, http)


def wait_for_version(serving: Serving, version: str, max_wait_s: float = 300.0) -> float:
    """Waits until the server answers with `version` (the replicas follow @champion on their own, every
    `alias_poll_s`): /v1/model names it and its active backend serves it. Returns the seconds waited.

    Raises:
        ResourceError: still another version after `max_wait_s`.
    """
    started = time.monotonic()
    with httpx.Client(base_url=serving.url, timeout=10.0) as http:
        while True:
            active = _note_served_model(serving, http)
            if serving.model_version == version and active and active["model_version"] == version:
                return time.monotonic() - started
            if time.monotonic() - started > max_wait_s:
                raise ResourceError(
                    f"{serving.url}/v1/model: still version {serving.model_version} "
                    f"({active and active['model_version']} active) {max_wait_s:.0f} s after @champion "
                    f"moved to {version}"
                )
            time.sleep(1.0)


def _note_served_model(serving: Serving, http: httpx.Client) -> dict | None:
    """Fills in the version and backend /v1/model says answer now; returns the active backend's status."""
    answer = http.get("/v1/model", headers={"Authorization": f"Bearer {serving.token}"})
    if answer.status_code != 200:
        raise ResourceError(f"{serving.url}/v1/model: HTTP {answer.status_code}: {answer.text[:500]}")
    info = answer.json()
    serving.model_version = info["version"]
    active = [b for b in info["backends"] if b["deployment"] == info["active"]]
    serving.backend = active[0]["backend"] if active else None
    return active[0] if active else None


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api_token(path: Path) -> str:
    """The first token of the tokens file, created (with a new token) when there is none."""
    if not path.exists():
        return create_tokens_file(path)
    for line in path.read_text().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.split()[0]  # the token; robots=/scopes= may follow on its line
    raise ConfigError(f"{path}: tokens file holds no tokens")


def _deployment_failures(exc: Exception) -> str:
    """The last line of each failed deployment's message (the replica's exception), else `exc`."""
    try:
        app = serve.status().applications.get(APP_NAME)
        reasons = [
            f"{name}: {[line for line in d.message.splitlines() if line.strip()][-1]}"
            for name, d in (app.deployments.items() if app else [])
            if d.message.strip()
        ]
    except Exception:
        reasons = []
    return "; ".join(reasons) or str(exc).splitlines()[0]
