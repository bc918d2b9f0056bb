"""Jobs submitted the way an operator does from a laptop: `ray job submit` against a `ray start` head.

The head is a real `ray start --head` in its own temp dir, bound to loopback, with token auth on,
and it is torn down by ending the processes this module started: never `ray stop`, which kills
every Ray process on the machine, including the shared in-process test cluster and other users'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.local_processes import free_port

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV_FILE = REPO / "clusters" / "runtime_env.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
REPORT_PREFIX = "CLUSTER_CHECK "

pytestmark = pytest.mark.slow  # a second Ray cluster (`ray start --head`) and jobs submitted to it


@dataclasses.dataclass
class RayHead:
    address: str  # the job server (dashboard), http://127.0.0.1:PORT
    dashboard_port: int
    env: dict  # what every `ray` CLI call against this head needs (token auth)
    token: str
    tmp: Path


def wait_for_job_server(head: RayHead, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            answer = httpx.get(
                f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"}, timeout=2
            )
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the job server did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop_head(process: subprocess.Popen) -> None:
    """Ends `ray start --block` (it shuts its node down on SIGTERM), then anything it left behind."""
    import psutil

    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    _, alive = psutil.wait_procs(started, timeout=10)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray puts unix sockets under it (108-character limit).
    tmp = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,  # instead of ~/.ray/auth_token, which the shared test cluster uses
        "RAY_TMPDIR": str(tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        # `ray start --block` drains its node for up to 30 s on SIGTERM (Ray 2.60, for Serve proxies on
        # Kubernetes) and waits the whole 30 s whenever a worker lease is held: 0 = shut down at once.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # The job entrypoint's `python` is whatever the node's PATH gives: here, this venv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: a test that ran earlier in this process
    # would otherwise point every job on this head at its own store instead of the job's home.
    env.pop("MLFLOW_TRACKING_URI", None)
    dashboard_port = free_port()
    command = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--num-cpus", "2", "--temp-dir", str(tmp),
        # Fixed defaults (10001, 52365, ...) would collide with any other Ray on this machine.
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
    ]  # fmt: skip
    log = tmp / "ray_start.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command, env=env, cwd=tmp, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", dashboard_port, env, token, tmp)
    try:
        wait_for_job_server(head, process, log)
        yield head
    finally:
        stop_head(process)
        shutil.rmtree(tmp, ignore_errors=True)


def job_status(head: RayHead, submission_id: str) -> str | None:
    import httpx

    answer = httpx.get(
        f"{head.address}/api/jobs/{submission_id}",
        headers={"Authorization": f"Bearer {head.token}"},
        timeout=30,
    )
    if answer.status_code == 404:  # the submission itself failed
        return None
    answer.raise_for_status()
    return answer.json()["status"]


def submit(head: RayHead, entrypoint: list[str], env_vars: dict | None = None, timeout_s: float = 120):
    """`ray job submit` with the committed runtime env (plus test env vars): (process, status, logs)."""
    runtime_env = yaml.safe_load(RUNTIME_ENV_FILE.read_text())
    runtime_env.setdefault("env_vars", {}).update(env_vars or {})
    submission_id = f"test-{uuid.uuid4().hex[:8]}"
    runtime_env_file = head.tmp / f"{submission_id}.yaml"
    runtime_env_file.write_text(yaml.safe_dump(runtime_env))
    for _ in range(20):
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", head.address, "--submission-id", submission_id,
             "--working-dir", ".", "--runtime-env", str(runtime_env_file), "--", *entrypoint],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        # The job server answers before the head's agent has registered (slow under load).
        if "No available agent to submit job" not in submitted.stderr + submitted.stdout:
            break
        time.sleep(3)
    status = job_status(head, submission_id)
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", head.address, submission_id],
        cwd=REPO, env=head.env, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return submitted, status, logs


def local_subpackages() -> list[str]:
    package = REPO / "platform" / "mobile_vla"
    return sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file())


def test_head_requires_the_token_and_binds_loopback_only(ray_head):
    import httpx
    import psutil

    jobs_url = f"{ray_head.address}/api/jobs/"
    assert httpx.get(jobs_url, timeout=10).status_code == 401
    assert httpx.get(jobs_url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code in (401, 403)
    assert httpx.get(jobs_url, headers={"Authorization": f"Bearer {ray_head.token}"}, timeout=10).status_code == 200
    listening = {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == ray_head.dashboard_port
    }
    assert listening == {"127.0.0.1"}


def test_cluster_check_job_runs_the_shipped_package(ray_head):
    import mobile_vla

    shared = ray_head.tmp / "shared_storage"
    submitted, status, logs = submit(ray_head, ["python", "jobs/cluster_check.py", "--storage-path", str(shared)])
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert status == "SUCCEEDED", logs[-3000:]

    lines = [line for line in logs.splitlines() if line.startswith(REPORT_PREFIX)]
    assert lines, logs[-3000:]
    report = json.loads(lines[-1][len(REPORT_PREFIX) :])
    assert report["problems"] == []
    driver = report["driver"]
    assert driver["mobile_vla_version"] == mobile_vla.__version__
    # Imported from the runtime env's py_module, not from this checkout (installed editable here).
    assert not Path(driver["mobile_vla_path"]).is_relative_to(REPO)
    assert Path(driver["mobile_vla_path"]).is_relative_to(ray_head.tmp)
    assert driver["subpackages"] == local_subpackages()  # the excludes dropped no part of the package
    assert report["cluster_resources"]["CPU"] == 2
    [node] = report["nodes"]
    assert node["mobile_vla_path"] == driver["mobile_vla_path"]
    assert node["storage_marker"] is not None and node["storage_marker"].startswith("written by")
    assert report["storage_path"] == str(shared)
    assert not list((shared / ".cluster_check").iterdir())  # the marker is cleaned up


@pytest.mark.skipif(
    not (REPO / "jobs" / "train.py").is_file(),
    reason="jobs/train.py is not written yet (training stage)",
)
def test_train_job_submits_and_logs_to_mlflow(ray_head, tiny_dataset, tmp_path):
    home = tmp_path / "home"
    submitted, status, logs = submit(
        ray_head,
        # One Train worker: the 2-CPU head must keep a CPU for the Ray Data pipeline (train's preflight).
        # One epoch of two steps: what is proved is the submission path (runtime env, entrypoint, the job's
        # MLflow store), not learning (tests/train/test_training.py's runs prove that).
        [
            "python",
            "jobs/train.py",
            "--config",
            "jobs/configs/tiny.yaml",
            f"data.path={tiny_dataset}",
            "scaling.num_workers=1",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
        ],
        env_vars={"MOBILE_VLA_HOME": str(home)},
        timeout_s=420,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert status == "SUCCEEDED", logs[-3000:]
    assert (home / "mlflow.db").is_file(), "the training job logged nothing to the platform's MLflow store"
