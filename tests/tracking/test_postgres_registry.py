"""The registry on PostgreSQL (issue 19, item 8): a local PostgreSQL 15 started from the installed
server binaries, an `mlflow server` backed by it, and the registry, promotion-gate and alias-polling
flows run against that server, as on a cluster's shared tracking server."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.local_processes import free_port, mlflow_server
from tests.tracking.test_registry import exercise_registry, make_model_dir, start_run

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))  # Debian's postgresql-NN layout: initdb, pg_ctl
pytestmark = [
    pytest.mark.slow,  # a database and an `mlflow server` (migrations on PostgreSQL): about a minute on 2 cores
    pytest.mark.unseeded_home,
    pytest.mark.skipif(not PG_BIN, reason="no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"),
]


def _as_postgres(command: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the `postgres` system user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture()
def postgres_url():
    """postgresql+psycopg2://mlflow@127.0.0.1:PORT/mlflow on a fresh cluster (trust auth, loopback only)."""
    bin_dir = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="mobile-vla-pg-", dir="/tmp"))  # readable by the postgres user
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"]), **run)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w"]
    subprocess.run(_as_postgres([*pg_ctl, "-o", options, "start"]), **run)
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"], **run)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"  # bare postgresql:// wants psycopg 3
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "fast", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def server_on_postgres(postgres_url, platform_home, tmp_path, monkeypatch):  # after platform_home: it unsets the URI
    """An `mlflow server` whose backend store is the PostgreSQL database; MLFLOW_TRACKING_URI points at it."""
    log = tmp_path / "mlflow-server.log"
    with mlflow_server(postgres_url, tmp_path / "artifacts", free_port(), log=log, timeout_s=240) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url


def test_registry_promotion_and_alias_polling_on_postgresql(server_on_postgres, platform_home, tmp_path):
    from mlflow import MlflowClient

    from mobile_vla import tracking
    from mobile_vla.tracking.audit import DETECTED, detect_alias_move
    from mobile_vla.tracking.lifecycle import GateConfig, promote

    exercise_registry(tmp_path)  # register, aliases, resolve + cache, attach artifacts, metrics, errors
    assert not (platform_home / "mlflow.db").exists()  # everything went to the server (and PostgreSQL)

    gate = GateConfig(min_episodes=100, max_offline_mae_regression=None)
    metrics = {"closed_loop.success_rate": 0.8, "closed_loop.episodes": 200}
    version = tracking.register_policy(make_model_dir(tmp_path, "c"), start_run(), name="reg-test")
    tracking.log_version_metrics("reg-test", version, metrics)
    tracking.log_version_metrics("reg-test", "1", {"closed_loop.success_rate": 0.3, "closed_loop.episodes": 200})
    decision = promote("reg-test", version=version, gate=gate)  # against champion v1 (exercise_registry)
    assert decision.promoted and tracking.get_version_by_alias("reg-test", "champion") == version
    assert tracking.get_version_tags("reg-test", version)["promotion.decision"] == "promoted"
    assert "**promoted**" in MlflowClient().get_model_version("reg-test", version).description  # the model card

    # A move made outside the platform (as the MLflow UI does), then what the serving watcher's poll does.
    MlflowClient().set_registered_model_alias("reg-test", "champion", "1")
    assert tracking.get_version_by_alias("reg-test", "champion") == "1"
    detected = detect_alias_move("reg-test", "champion", detector="test poll")
    assert detected is not None and detected.actor == DETECTED and detected.to_version == "1"
    assert detect_alias_move("reg-test", "champion", detector="test poll") is None  # recorded once
    history = tracking.alias_history("reg-test", "champion")
    assert [m.to_version for m in history[:2]] == ["1", version]
