"""Serve fixtures: one tiny random-weight policy, registered in MLflow and exported to ONNX by the
export module, in a platform home of its own; the Serve app tests deploy it on the shared cluster."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest


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
        register_random_policy(preset="tiny", alias="champion")
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home
