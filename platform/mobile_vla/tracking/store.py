"""Where MLflow keeps things: the tracking URI, experiments, and the embedded SQLite default.

`MLFLOW_TRACKING_URI` wins (a shared `mlflow server` on a cluster). Without it the platform keeps a
SQLite store and an artifact folder under the platform home, so a laptop needs no server: MLflow 3
refuses a plain file store.
"""

from __future__ import annotations

import os
from pathlib import Path

from mobile_vla.config import platform_home

DEFAULT_EXPERIMENT = "mobile-vla"


def embedded_paths() -> tuple[Path, Path]:
    """The embedded store's SQLite file and artifact folder under the platform home."""
    home = platform_home()
    return home / "mlflow.db", home / "mlartifacts"


def tracking_uri() -> str:
    """The URI every process of a job should use (pass it to Ray workers via runtime_env)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db, _ = embedded_paths()
    return f"sqlite:///{db}"


def is_embedded(uri: str | None = None) -> bool:
    """Whether `uri` (default: this process's tracking URI) is the embedded SQLite store."""
    return (uri or tracking_uri()).startswith("sqlite:")


def configure_mlflow() -> str:
    """Points this process's MLflow client (tracking and registry) at the platform's store."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    if is_embedded(uri):
        db, artifacts = embedded_paths()
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts.mkdir(parents=True, exist_ok=True)
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # set_tracking_uri() also exports MLFLOW_TRACKING_URI for child processes. Keep the environment
    # as the user left it: an exported value would win over MOBILE_VLA_HOME for the rest of this
    # process (a later home pointing at an old store) and leak into every Ray worker started after.
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
    return uri


def mlflow_client():
    """An `MlflowClient` on the platform's store (tracking and registry)."""
    from mlflow import MlflowClient  # deferred, as in configure_mlflow: the CLI's --help must not load MLflow

    configure_mlflow()
    return MlflowClient()


def get_or_create_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Experiment id; with the embedded store its artifacts go under the platform home, not ./mlruns."""
    import mlflow

    configure_mlflow()
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    artifact_location = None
    if is_embedded():
        _, artifacts = embedded_paths()
        artifact_location = (artifacts / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process (Tune trials, Train ranks)
        existing = mlflow.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


# The UI server's environment. MLflow 3's server also starts a job runner (GenAI jobs, seven huey
# consumer processes each importing MLflow) by default; the platform submits no MLflow jobs.
UI_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ui_command(host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The `mlflow server` line that opens the UI on the embedded store (loopback only). One worker by
    default: a UI for one person on a laptop (mlflow's default, 4, is four processes each importing MLflow).
    """
    db, artifacts = embedded_paths()
    return [
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--default-artifact-root",
        artifacts.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
