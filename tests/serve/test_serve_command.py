"""`mobile-vla serve --config serve_configs/local.yaml`, as the quickstart runs it: its own local Ray,
Serve's throughput mode, the shipped config, the tiny champion; a robot drives it over loopback, Ray's
own `serve status` and `serve run` work against it, and Ctrl-C or SIGTERM stops it cleanly. A config
whose deployments set ray_actor_options, deployed as the command deploys it, keeps the replicas'
environment."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from tests.local_processes import free_port, stop_process_group
from tests.serve.conftest import stop_kept_serve

ROOT = Path(__file__).resolve().parents[2]
SERVE_CLI = str(Path(sys.executable).parent / "serve")  # Ray's own `serve` console script
GRPC = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"

pytestmark = pytest.mark.slow  # `mobile-vla serve` as a process with its own Ray cluster


def _frame() -> str:
    pixels = np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def _listeners(port: int) -> list[str]:
    """Local addresses listening on `port` (from `ss`), e.g. ['127.0.0.1:8000']."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def _serve_env(serve_home: Path) -> dict[str, str]:
    """The environment of `mobile-vla serve` and of Ray's CLI beside it (token auth, as field-notes.md says)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        MOBILE_VLA_HOME=str(serve_home),
        MOBILE_VLA_TOKENS_FILE=str(serve_home / "tokens"),
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start_serve(
    serve_home: Path, tmp_path: Path, port: int, dashboard_port: int | None = None
) -> tuple[subprocess.Popen, Path]:
    """`mobile-vla serve` on the shipped local config, in its own session, output in a log file."""
    env = _serve_env(serve_home)
    dashboard = ["--dashboard-port", str(dashboard_port or free_port())]
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mobile_vla.cli",
                "serve",
                "--config",
                str(ROOT / "serve_configs" / "local.yaml"),
                "--port",
                str(port),
                *dashboard,
            ],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


def _wait_until_serving(process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 420
    while "Ctrl-C to stop" not in log.read_text():
        assert process.poll() is None, f"mobile-vla serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not serving after 420 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _ray_cli(args: list[str], serve_home: Path, timeout_s: float = 300) -> str:
    """Ray's `serve` CLI with `args`; its stdout (the test fails with its output if it fails)."""
    done = subprocess.run(
        [SERVE_CLI, *args], env=_serve_env(serve_home), capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, f"serve {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_serve_command_answers_on_loopback_and_stops_on_ctrl_c(serve_home, tmp_path):
    port, dashboard_port = free_port(), free_port()
    process, log = _start_serve(serve_home, tmp_path, port, dashboard_port)
    try:
        _wait_until_serving(process, log)
        text = log.read_text()
        assert f"http://127.0.0.1:{port}/v1/act" in text
        assert all(address.startswith("127.0.0.1:") for address in _listeners(port)), _listeners(port)
        assert all(address.startswith("127.0.0.1:") for address in _listeners(dashboard_port)), "no dashboard"

        # Ray's own CLI sees it: `serve status` through the dashboard on loopback
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        status = yaml.safe_load(_ray_cli(["status", "--address", dashboard], serve_home))
        assert status["applications"]["mobile-vla"]["status"] == "RUNNING", status

        token = (serve_home / "token").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            body = {
                "robot_id": "cli-1",
                "instruction": "go to the red box",
                "image": _frame(),
                "state": [0.1, 0.0, 0.0],
                # this test checks wiring, not latency: a step may wait for a replica still warming up
                # (the first ORT run, the redeploy below) on a loaded CI box; the control period's default
                # deadline would shed it with 429 (the 2026-12-07 CI failure)
                "deadline_ms": 30_000,
            }
            first = http.post("/v1/act", json=body, headers={"Authorization": f"Bearer {token}"})
            assert first.status_code == 200, first.text
            answer = first.json()
            assert answer["backend"] == "onnx-cpu" and len(answer["actions"][0]) == 3
            again = http.post(
                "/v1/act", json={**body, "memory": answer["memory"]}, headers={"Authorization": f"Bearer {token}"}
            )
            assert again.status_code == 200 and again.json()["memory_reset"] is False
            assert http.post("/v1/act", json=body).status_code == 401

            # `serve run` of the import path against the same cluster redeploys the app with other args
            gcs = re.search(r"local Ray at (\S+);", text).group(1)
            args = ["model_uri=models:/mobile-vla-policy@champion", "max_batch_size=4", "primary_timeout_s=2"]
            _ray_cli(
                ["run", "mobile_vla.serve.app:build_app", *args, "--name", "mobile-vla"]
                + ["--address", gcs, "--non-blocking"],
                serve_home,
            )
            assert http.get("/healthz").json() == {"status": "ok"}
            rerun = http.post("/v1/act", json=body, headers={"Authorization": f"Bearer {token}"})
            assert rerun.status_code == 200, rerun.text
    finally:
        if process.poll() is None:
            stop_process_group(process, signal.SIGINT, timeout_s=120)
    assert process.returncode == 130, log.read_text()[-2000:]
    assert "interrupted" in log.read_text()


def test_serve_command_stops_cleanly_on_sigterm(serve_home, tmp_path):
    """SIGTERM to the command's own process (as a service manager sends it, not to its group): Serve and
    the local Ray shut down, no process it started survives, the port is free."""
    port = free_port()
    process, log = _start_serve(serve_home, tmp_path, port)
    try:
        _wait_until_serving(process, log)
        descendants = psutil.Process(process.pid).children(recursive=True)
        names = {p.name() for p in descendants}
        assert "raylet" in names and "gcs_server" in names, names  # the local Ray this command owns
        assert _listeners(port), "nothing listens on the serving port"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            stop_process_group(process, signal.SIGKILL, timeout_s=30)
    text = log.read_text()
    assert process.returncode == 130 and "interrupted" in text, text[-2000:]
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert _listeners(port) == []


def test_config_actor_options_keep_the_replicas_environment(ray_cluster, serve_home, use_home, tmp_path, monkeypatch):
    """A copy of serve_configs/local.yaml whose deployments set ray_actor_options (as gpu.yaml's do),
    deployed the way `mobile-vla serve` deploys a config: the replicas run with the config's resources AND
    the environment the code sizes for max_batch_size (Serve's own override would drop it)."""
    import ray
    from ray import serve

    from mobile_vla.serve.app import _replica_env
    from mobile_vla.serve.commands import load_serve_config
    from mobile_vla.serve.launch import deploy_config, wait_until_running

    monkeypatch.delenv(GRPC, raising=False)
    data = yaml.safe_load((ROOT / "serve_configs" / "local.yaml").read_text())
    app = data["applications"][0]
    app["name"] = "actor-options"
    app["args"].update(max_batch_size=40, tokens_file=str(serve_home / "tokens"))  # 40 frames: past gRPC's 4 MiB
    app["deployments"] = [
        {"name": "PolicyIngress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        {"name": "OnnxPolicy", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    ]
    path = tmp_path / "actor_options.yaml"
    path.write_text(yaml.safe_dump(data))
    expected = _replica_env(40)[GRPC]
    assert int(expected) > 4 * 1024 * 1024
    stop_kept_serve()  # deploy_config starts Serve with the config's own options, as the command does
    with use_home(serve_home):
        names = deploy_config(load_serve_config(path, port=free_port()), str(path))
    try:
        wait_until_running(names, str(path), timeout_s=300)
        for deployment, cpus in (("OnnxPolicy", 0.5), ("PolicyIngress", 0.25)):
            [named] = [
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::actor-options#{deployment}#")
            ]
            replica = ray.get_actor(named["name"], namespace=named["namespace"])
            seen = ray.get(
                replica.__ray_call__.remote(
                    lambda self: (os.environ.get(GRPC), ray.get_runtime_context().get_assigned_resources())
                )
            )
            assert seen[0] == expected, (deployment, seen)
            assert seen[1].get("CPU") == cpus, (deployment, seen)
    finally:
        serve.delete("actor-options")
        serve.shutdown()
