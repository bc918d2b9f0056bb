"""Shared fixtures: one local Ray cluster per test session, a fresh MLflow SQLite store per test.

Stage-specific fixtures live in the stage's own tests/<stage>/conftest.py.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster shared by the whole test session (loopback only)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,  # logical slots: 2 Train workers + a driver/Tune slot on a 2-core box
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYOPENGL_PLATFORM": "egl"}},
        )
    yield ray
    # Left running until the interpreter exits: later tests reuse it.


@pytest.fixture()
def platform_home(tmp_path, monkeypatch):
    """An isolated platform home (MLflow SQLite store, artifacts, results) for one test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MOBILE_VLA_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
