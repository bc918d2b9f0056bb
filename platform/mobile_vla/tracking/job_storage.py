"""A Ray job's results must outlive the job: the check train, tune and online-update run before they write.

`ray job submit --working-dir .` runs the entrypoint inside Ray's unpacked copy of the upload,
`<session>/runtime_resources/working_dir_files/<package>/`, which Ray deletes once no job uses it (and
with the session). With no MOBILE_VLA_HOME the platform home is `./.mobile_vla` in there, so the embedded
MLflow store, the registered model's files and the checkpoints would vanish with the copy while the job
prints `models:/NAME/VERSION` as if they were kept. Such a job is refused before it starts:

    check_job_storage([cfg.run.storage_place()], mlflow=cfg.mlflow.enabled)   # a no-op outside a Ray job

What marks a job driver: Ray 2.60's job supervisor starts the entrypoint with `RAY_JOB_CONFIG_JSON_ENV_VAR`
(the job's runtime env and metadata, whose `job_submission_id` names the job) and `RAY_ADDRESS`, and strips
`RAY_JOB_ID` (ray/dashboard/modules/job/job_supervisor.py, `_get_driver_env_vars`). RAY_ADDRESS alone
would not do: a laptop that exports it to reach a cluster is no job. A `local://` working dir is used in
place, outside runtime_resources, and is never refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mobile_vla.errors import ConfigError
from mobile_vla.tracking.store import embedded_paths, is_embedded, tracking_uri

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint only
HOME_ENV = "MOBILE_VLA_HOME"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
WORKING_DIR_COPIES = ("runtime_resources", "working_dir_files")  # <session>/runtime_resources/working_dir_files/<pkg>


@dataclass(frozen=True)
class Place:
    """Somewhere a command keeps results: what it is, where (a path or URI), and the setting that moves it."""

    what: str  # e.g. "run.storage_path"
    location: str  # a path, or a URI (sqlite:///..., file://..., s3://..., http://...)
    setting: str  # e.g. "run.storage_path", MOBILE_VLA_HOME


def configured_place(key: str, configured: str | None, location: str) -> Place:
    """A config key's place: moved by the key when the config sets it, else by MOBILE_VLA_HOME (its default)."""
    return Place(key, location, key if configured else HOME_ENV)


def in_ray_job() -> bool:
    """Whether this process is the entrypoint (driver) of a job submitted to Ray's job server."""
    return JOB_CONFIG_ENV in os.environ


def local_path(location: str) -> Path | None:
    """The absolute local path a path or URI names (a bare path, sqlite:///, file://); None for a server or
    bucket. Relative paths are resolved against the working directory, as the writer resolves them.
    """
    if location.startswith("sqlite:"):
        # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy); sqlite:// alone is in memory
        name = location.removeprefix("sqlite:").removeprefix("///").split("?", 1)[0]
        raw = None if name in ("", "//", ":memory:") else name
    elif location.startswith("file:"):
        raw = urlparse(location).path or None
    else:
        raw = None if "://" in location else location
    return Path(raw).expanduser().resolve() if raw else None


def working_dir_copy(path: Path) -> Path | None:
    """The folder of Ray's runtime_resources/working_dir_files/ that holds `path`, or None."""
    parts = path.parts
    for index in range(len(parts) - 2):
        if parts[index : index + 2] == WORKING_DIR_COPIES:
            return Path(*parts[: index + 3])
    return None


def mlflow_places() -> list[Place]:
    """Where this process's MLflow client keeps runs and models: the tracking store and, when it is the
    embedded SQLite store, the artifact folder under the platform home.
    """
    home_or_uri = TRACKING_ENV if os.environ.get(TRACKING_ENV) else HOME_ENV
    places = [Place("the MLflow store", tracking_uri(), home_or_uri)]
    if is_embedded():
        places.append(Place("the MLflow artifacts", str(embedded_paths()[1]), HOME_ENV))
    return places


def _submission_id() -> str:
    try:
        metadata = json.loads(os.environ[JOB_CONFIG_ENV]).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return str(metadata.get("job_submission_id") or "?")


def _setting(name: str) -> str:
    return f"{name}, unset" if name == HOME_ENV and not os.environ.get(HOME_ENV) else name


def check_job_storage(places: Sequence[Place] = (), *, mlflow: bool = True) -> None:
    """Refuses a Ray job whose results would land in Ray's temporary copy of its working dir.

    Outside a Ray job (a laptop, CI, `mobile-vla train` on a head node) it does nothing.

    Args:
        places: what the command keeps besides MLflow (checkpoints, a work folder).
        mlflow: also check where the MLflow client writes (False when the command logs nothing).

    Raises:
        ConfigError: naming the job, each doomed place with its location and setting, and the fix.
    """
    if not in_ray_job():
        return
    doomed = []
    for place in [*(mlflow_places() if mlflow else []), *places]:
        path = local_path(place.location)
        copy = working_dir_copy(path) if path is not None else None
        if copy is not None:
            doomed.append((place, path, copy))
    if not doomed:
        return
    copy = doomed[0][2]
    shown = [(place, path.relative_to(copy) if path.is_relative_to(copy) else path) for place, path, _ in doomed]
    listing = ", ".join(f"{place.what} {path} ({_setting(place.setting)})" for place, path in shown)
    raise ConfigError(
        f"Ray job {_submission_id()}: {listing} would be written inside Ray's temporary copy of the job's "
        f"working dir, {copy}, which Ray deletes: nothing the job registers or checkpoints would remain. "
        f"Set {HOME_ENV} to a folder every node shares and {TRACKING_ENV} to the cluster's MLflow server, in "
        "the env_vars of the job's --runtime-env file (e.g. clusters/runtime_env.yaml) or in the nodes' "
        f"environment before `ray start`; for a throwaway try, {HOME_ENV}=/tmp/mobile-vla-try"
    )
