"""`mobile-vla serve --config serve_configs/local.yaml`, as the quickstart runs it: its own local Ray,
Serve's throughput mode, the shipped config, the tiny champion; a robot drives it over loopback, and
Ctrl-C or SIGTERM stops it cleanly."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.local_processes import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[2]

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


def _start_serve(serve_home: Path, tmp_path: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """`mobile-vla serve` on the shipped local config, in its own session, output in a log file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        MOBILE_VLA_HOME=str(serve_home),
        MOBILE_VLA_TOKENS_FILE=str(serve_home / "tokens"),
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
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
        time.sleep(2)


def test_serve_command_answers_on_loopback_and_stops_on_ctrl_c(serve_home, tmp_path):
    port = free_port()
    process, log = _start_serve(serve_home, tmp_path, port)
    try:
        _wait_until_serving(process, log)
        text = log.read_text()
        assert f"http://127.0.0.1:{port}/v1/act" in text
        assert all(address.startswith("127.0.0.1:") for address in _listeners(port)), _listeners(port)

        token = (serve_home / "token").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            body = {
                "robot_id": "cli-1",
                "instruction": "go to the red box",
                "image": _frame(),
                "state": [0.1, 0.0, 0.0],
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
