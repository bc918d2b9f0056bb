"""Shared fixtures: one local Ray cluster per test session, a fresh MLflow SQLite store per test.

Fresh stores are copies of one empty store that the platform's own code migrates once per session
(`mlflow_store_template`): MLflow's migrations take ~10 s per new SQLite file on 2 cores. A test
marked `unseeded_home` gets an empty home instead (a store created from nothing, or none at all).

One tiny policy, saved and exported once per session (dynamo exporter, fp32 + fp16, parity on
MiniWorld frames), shared by the export, runtime and serve tests; tests that damage files work on a copy.
Stage-specific fixtures live in the stage's own tests/<stage>/conftest.py. Heavy libraries (torch,
Ray, MLflow, MiniWorld) are imported inside the fixtures that use them: a run of light tests does not
load them. `make test-fast` deselects the modules marked `slow` (minutes each on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TEST_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYOPENGL_PLATFORM": "egl",  # MiniWorld renders headless
    "TOKENIZERS_PARALLELISM": "false",
}


def pytest_configure(config):
    """The environment every test (and every process a test starts) runs with, unless already set."""
    for key, value in TEST_ENV.items():
        os.environ.setdefault(key, value)
    config.addinivalue_line(
        "markers",
        "unseeded_home: platform_home starts empty, without a copy of the session's migrated MLflow store",
    )


# How the platform opens its embedded store: configure_mlflow(), then its first query
# (get_or_create_experiment's lookup). Opening a new SQLite file runs MLflow's migrations.
OPEN_EMBEDDED_STORE = """
import mlflow
from mobile_vla.tracking.store import DEFAULT_EXPERIMENT, configure_mlflow
configure_mlflow()
assert mlflow.get_experiment_by_name(DEFAULT_EXPERIMENT) is None
"""


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty embedded MLflow store (mlflow.db), migrated once per session by the platform's own
    code with the installed MLflow, in a child process (this one keeps no connection to it)."""
    home = tmp_path_factory.mktemp("mlflow-store-template")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MOBILE_VLA_HOME"] = str(home)
    subprocess.run([sys.executable, "-c", OPEN_EMBEDDED_STORE], env=env, check=True, timeout=600)
    db = home / "mlflow.db"
    assert db.is_file(), f"the platform created no store at {db}"
    return db


def seed_mlflow_store(template: Path) -> Path:
    """Copies the migrated empty store to where the platform opens its embedded store (per the current
    MOBILE_VLA_HOME); returns that path. The folder must exist and hold no store yet."""
    from mobile_vla.tracking.store import embedded_paths

    db, _ = embedded_paths()
    assert not db.exists(), f"{db} already holds a store"
    shutil.copyfile(template, db)
    return db


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the whole test session (loopback only), started the way the
    platform starts one (`ensure_ray`, which retries a start that timed out on a busy box)."""
    import ray

    from mobile_vla.ray_session import ensure_ray

    # 4 logical slots: 2 Train workers + a driver/Tune slot on a 2-core box
    ensure_ray(env_vars={"PYOPENGL_PLATFORM": "egl"}, num_cpus=4, loopback=True)
    yield ray
    # Left running until the session ends (pytest_sessionfinish): later tests reuse it.


@pytest.fixture()
def platform_home(tmp_path, monkeypatch, request):
    """An isolated platform home (MLflow SQLite store, artifacts, results) for one test, holding a
    copy of the session's migrated empty store unless the test is marked `unseeded_home`."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MOBILE_VLA_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if request.node.get_closest_marker("unseeded_home") is None:
        seed_mlflow_store(request.getfixturevalue("mlflow_store_template"))
    return home


def pytest_sessionfinish(session, exitstatus):
    """Stops the session's Ray cluster, if a test started one (Ray is not imported otherwise)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(ray_cluster, tmp_path_factory):
    """~10 generated MiniWorld episodes (224x224, 5 Hz, expert-successful) with manifest.json:
    6 train, 2 val, 1 unseen_pair, 1 visual_shift. Generated once per session on the Ray cluster."""
    from mobile_vla.sim.generate import GeneratorConfig, generate_dataset
    from mobile_vla.sim.split_spec import SplitSpec, default_split_spec

    defaults = default_split_spec()
    fractions = {"train": 0.6, "val": 0.2, "unseen_pair": 0.1, "visual_shift": 0.1}
    splits = {name: defaults.splits[name].model_copy(update={"fraction": f}) for name, f in fractions.items()}
    spec = SplitSpec(**{**defaults.model_dump(exclude={"splits"}), "splits": splits})
    out = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(out, 10, spec, seed=0, settings=GeneratorConfig(seeds_per_task=2), progress=False)
    return out


# the scaling the shared test policy is saved with (tests/runtime/test_backends.py checks answers against it)
TEST_POLICY_SCALING = {
    "action_low": [-0.2, -0.3, -1.0],
    "action_high": [0.6, 0.3, 1.0],
    "state_mean": [0.1, 0.0, 0.0],
    "state_std": [0.2, 0.1, 0.5],
}


def _make_policy_dir(root: Path, seed: int = 0, freeze: bool = False) -> Path:
    """A saved tiny policy with real preprocessing (tokenizer included) in root/policy/."""
    from mobile_vla.policy import presets, save_random_policy

    config = presets.tiny().replace(freeze_kosmos=freeze, freeze_clip=freeze)
    # the head starts near zero; a spread makes its outputs vary so parity means something
    save_random_policy(config, root, seed=seed, head_std=0.2, scaling=TEST_POLICY_SCALING)
    return root


@pytest.fixture(scope="session")
def exported_dir(tmp_path_factory) -> Path:
    from mobile_vla.export.onnx_export import export_model

    root = _make_policy_dir(tmp_path_factory.mktemp("tiny-export"))
    export_model(root, fp16=True)  # the defaults users get: dynamo exporter, MiniWorld frames
    return root


@pytest.fixture()
def exported_copy(exported_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(exported_dir, target)
    return target


@pytest.fixture(scope="session")
def real_frames(exported_dir) -> np.ndarray:
    """MiniWorld frames with a different seed from the export's own parity check."""
    from mobile_vla.export.parity import parity_frames

    return parity_frames(32, seed=11).images


@pytest.fixture(scope="session")
def make_policy_dir():
    """make_policy_dir(root) -> root, holding a saved tiny policy (no onnx/)."""
    return _make_policy_dir


@pytest.fixture(scope="session")
def frames_dataset(tmp_path_factory) -> Path:
    """A one-episode dataset folder: frames for export's parity check without rendering MiniWorld."""
    from mobile_vla.data.episodes import Episode, write_episode

    folder = tmp_path_factory.mktemp("frames-dataset")
    rng = np.random.default_rng(0)
    images = np.full((8, 224, 224, 3), 90, np.uint8)
    for t in range(8):  # floor, wall, two boxes moving across: structured frames, not noise
        images[t, 120:] = (60, 60, 70)
        images[t, 90:140, 40 + 6 * t : 70 + 6 * t] = (200, 30, 30)
        images[t, 80:150, 150 - 5 * t : 190 - 5 * t] = (30, 30, 200)
    write_episode(
        folder / "ep0.h5",
        Episode(
            images=images,
            actions=rng.normal(size=(8, 3)).astype(np.float32),
            state=np.zeros((8, 3), np.float32),
            attrs={
                "instruction": "go to the red box",
                "episode_id": "ep0",
                "source": "test",
                "success": True,
                "control_hz": 5.0,
                "schema_version": 1,
            },
        ),
    )
    return folder
