"""The registry layer against a real MLflow SQLite store (and a real `mlflow server` over HTTP)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mobile_vla.errors import ModelError
from tests.local_processes import free_port, mlflow_server


def make_model_dir(root: Path, marker: str) -> Path:
    model = root / f"model-{marker}"
    (model / "policy").mkdir(parents=True)
    (model / "policy" / "config.json").write_text(json.dumps({"kind": "policy", "marker": marker}))
    return model


def start_run():
    import mlflow

    from mobile_vla.tracking import get_or_create_experiment

    exp = get_or_create_experiment("registry-test")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_param("p", 1)
    return run.info.run_id


def exercise_registry(tmp_path: Path) -> None:
    from mobile_vla import tracking

    v1 = tracking.register_policy(make_model_dir(tmp_path, "a"), start_run(), name="reg-test")
    v2 = tracking.register_policy(make_model_dir(tmp_path, "b"), start_run(), name="reg-test", alias="challenger")
    assert (v1, v2) == ("1", "2")
    assert tracking.get_version_by_alias("reg-test", "challenger") == "2"
    assert tracking.get_version_by_alias("reg-test", "champion") is None

    tracking.set_alias("reg-test", "champion", v1)
    champ = tracking.resolve_model("models:/reg-test@champion")
    assert champ.version == "1" and champ.alias == "champion"
    assert json.loads((champ.path / "policy" / "config.json").read_text())["marker"] == "a"
    assert tracking.resolve_model("models:/reg-test/2").path != champ.path

    # Export adds onnx/ to the same version; an already-cached copy picks it up on the next resolve.
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "signature.json").write_text("{}")
    tracking.attach_artifacts("reg-test", v1, onnx_dir, "onnx")
    again = tracking.resolve_model("models:/reg-test@champion")
    assert (again.path / "onnx" / "signature.json").is_file()
    assert (again.path / "policy" / "config.json").is_file()

    tracking.log_version_metrics("reg-test", v1, {"mae": 0.125, "success": 0.5})
    assert tracking.get_version_metrics("reg-test", v1) == {"mae": 0.125, "success": 0.5}

    with pytest.raises(ModelError, match="has no alias 'nope'"):
        tracking.resolve_model("models:/reg-test@nope")
    with pytest.raises(ModelError, match="expected models:/NAME@alias"):
        tracking.resolve_model("models:/")
    with pytest.raises(ModelError, match="no such folder"):
        tracking.resolve_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="no policy/ folder"):
        tracking.register_policy(tmp_path, start_run(), name="reg-test")


@pytest.mark.unseeded_home  # the platform creates its store from nothing (other homes get a copy)
def test_registry_on_embedded_sqlite_store(platform_home, tmp_path):
    exercise_registry(tmp_path)
    assert (platform_home / "mlflow.db").is_file()
    assert not Path("mlruns").exists() or Path("mlruns").stat().st_mtime < time.time() - 60


@pytest.mark.slow  # an `mlflow server` process: it takes a while to answer on 2 cores
@pytest.mark.unseeded_home  # asserts that no embedded store is created
def test_registry_through_an_mlflow_server(platform_home, tmp_path, monkeypatch):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with mlflow_server(server_dir / "mlflow.db", server_dir / "artifacts", free_port()) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        exercise_registry(tmp_path)
        assert not (platform_home / "mlflow.db").exists()  # everything went to the server
