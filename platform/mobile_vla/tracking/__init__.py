"""MLflow: the tracking store, runs, registered model versions and aliases."""

from mobile_vla.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_MODEL_NAME,
    PREVIOUS_CHAMPION,
    ResolvedModel,
    attach_artifacts,
    get_version_by_alias,
    get_version_metrics,
    get_version_tags,
    log_version_metrics,
    register_policy,
    resolve_model,
    set_alias,
    set_version_tags,
)
from mobile_vla.tracking.store import configure_mlflow, get_or_create_experiment, tracking_uri

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_MODEL_NAME",
    "PREVIOUS_CHAMPION",
    "ResolvedModel",
    "attach_artifacts",
    "configure_mlflow",
    "get_or_create_experiment",
    "get_version_by_alias",
    "get_version_metrics",
    "get_version_tags",
    "log_version_metrics",
    "register_policy",
    "resolve_model",
    "set_alias",
    "set_version_tags",
    "tracking_uri",
]
