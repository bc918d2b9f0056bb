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

    # Ray waits a fixed 30 s for its raylet to register; on a saturated 2-core box that can time out,
    # so the session start is retried rather than failing every test that needs the cluster.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(
                num_cpus=4,  # logical slots: 2 Train workers + a driver/Tune slot on a 2-core box
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true", "PYOPENGL_PLATFORM": "egl"}},
            )
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
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


@pytest.fixture(scope="session")
def tiny_dataset(ray_cluster, tmp_path_factory):
    """~10 generated MiniWorld episodes (224x224, 5 Hz, expert-successful) with manifest.json:
    6 train, 2 val, 1 unseen_pair, 1 visual_shift. Generated once per session on the Ray cluster."""
    from mobile_vla.data.generate import GeneratorSettings, generate_dataset
    from mobile_vla.data.split_spec import SplitSpec, default_split_spec

    defaults = default_split_spec()
    fractions = {"train": 0.6, "val": 0.2, "unseen_pair": 0.1, "visual_shift": 0.1}
    splits = {name: defaults.splits[name].model_copy(update={"fraction": f}) for name, f in fractions.items()}
    spec = SplitSpec(**{**defaults.model_dump(exclude={"splits"}), "splits": splits})
    out = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(out, 10, spec, seed=0, settings=GeneratorSettings(seeds_per_task=2), progress=False)
    return out
