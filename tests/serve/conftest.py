"""Serve fixtures: one tiny random-weight policy, registered in MLflow and exported to ONNX by the
export module, in a platform home of its own; the Serve app tests deploy it on the shared cluster."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

from tests.local_processes import free_port, wait_until  # noqa: F401  (wait_until: re-exported for the serve tests)


@contextlib.contextmanager
def home_env(home: Path):
    """MOBILE_VLA_HOME pointed at `home` (and no MLFLOW_TRACKING_URI) for the block, then restored."""
    saved = {k: os.environ.get(k) for k in ("MOBILE_VLA_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["MOBILE_VLA_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield home
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def use_home():
    """`with use_home(path):` runs a block with MOBILE_VLA_HOME = path (restored afterwards)."""
    return home_env


@pytest.fixture(scope="session")
def serve_home(tmp_path_factory) -> Path:
    """A platform home holding the tiny model (champion), an API token file and the memory secret."""
    from mobile_vla.serve.auth import create_tokens_file
    from mobile_vla.serve.sample_model import register_random_policy

    home = tmp_path_factory.mktemp("serve-home")
    with home_env(home):
        # the legacy exporter: a quarter of dynamo's export time; the session's exported_dir keeps dynamo's
        register_random_policy(preset="tiny", alias="champion", exporter="legacy")
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home


class AppClient:
    """HTTP on 127.0.0.1 to one deployed app, plus its policy deployments' info() over Serve handles."""

    def __init__(self, app_name: str, url: str, token: str, home: Path):
        import httpx

        self.app_name, self.url, self.token, self.home = app_name, url, token, home
        self.http = httpx.Client(base_url=url, timeout=60)
        self.auth = {"Authorization": f"Bearer {token}"}

    def act(self, image: str, robot_id="r-1", memory=None, instruction="go to the red box", state=(0.1, 0.0, -0.2)):
        body = {"robot_id": robot_id, "instruction": instruction, "image": image, "state": list(state)}
        if memory is not None:
            body["memory"] = memory
        return self.http.post("/v1/act", json=body, headers=self.auth)

    def model(self) -> dict:
        response = self.http.get("/v1/model", headers=self.auth)
        assert response.status_code == 200, response.text
        return response.json()

    def policy_info(self, deployment: str) -> dict:
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=self.app_name).info.remote().result()


def two_version_home(home: Path, use_home, serve_home: Path, name: str = "mobile-vla-policy") -> Path:
    """`home` holding v1 @champion and v2 (actions offset by 0.1, no alias): copies of the session's
    exported tiny model, so that a test can tell which version answered."""
    from mobile_vla.serve.sample_model import register_version_copy
    from mobile_vla.tracking import resolve_model

    with use_home(serve_home):
        exported = resolve_model(f"models:/{name}/1").path
    with use_home(home):
        assert register_version_copy(exported, name, alias="champion") == "1"
        assert register_version_copy(exported, name, action_offset=0.1) == "2"
    return home


_KEPT_SERVE: dict[str, int] = {}  # {"port": the HTTP port of the Serve that serve_on_loopback started}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def serve_on_loopback() -> int:
    """Serve's controller and HTTP proxy on 127.0.0.1 on the shared cluster, started once and kept for the
    next app (a start and a shutdown cost seconds of a 2-core box per module); returns the proxy's port.
    Started again (on a new port) when a test shut it down; a Serve started elsewhere, on a port not
    known here, is shut down first, as `serve.start` would silently keep its port."""
    from ray import serve

    port = _KEPT_SERVE.get("port")
    if port is not None and serve.status().proxies and _listening(port):
        return port
    serve.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _KEPT_SERVE["port"] = port
    return port


def stop_kept_serve() -> None:
    """Shuts down the Serve that serve_on_loopback kept, if any (its controller and proxy spend CPU)."""
    if _KEPT_SERVE.pop("port", None) is not None:
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="package", autouse=True)
def _serve_stopped_after_the_package():
    """Serve kept between this package's modules (serve_on_loopback) stops when the package's tests end."""
    yield
    stop_kept_serve()


@contextlib.contextmanager
def deployed_app(app_name: str, home: Path, args, drill=None, ingress_options: dict | None = None):
    """`compose_app(args, drill)` run under `home` on the shared cluster's Serve (serve_on_loopback: the
    controller and proxy are kept between apps, one app at a time at route "/"); deleted afterwards.

    `ingress_options` (e.g. `num_replicas`) override PolicyIngress's deployment options, as a Serve
    config's `deployments:` entry for PolicyIngress does in production (serve_configs/gpu.yaml);
    `serve.run` takes no such override, so the deployment `compose_app` builds on is swapped for the block.
    """
    from ray import serve

    from mobile_vla.serve import app as serve_app

    port = serve_on_loopback()
    with home_env(home), pytest.MonkeyPatch.context() as patch:
        if ingress_options:
            patch.setattr(serve_app, "PolicyIngress", serve_app.PolicyIngress.options(**ingress_options))
        serve.run(serve_app.compose_app(args, drill=drill), name=app_name, route_prefix="/")
    client = AppClient(app_name, f"http://127.0.0.1:{port}", (home / "token").read_text(), home)
    try:
        yield client
    finally:
        client.http.close()
        serve.delete(app_name)
