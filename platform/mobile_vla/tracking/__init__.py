"""MLflow: the tracking store, runs, registered model versions, aliases and the audit of their moves."""

from mobile_vla.tracking.audit import AliasMove, alias_history, detect_alias_move, set_alias
from mobile_vla.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_MODEL_NAME,
    PREVIOUS_CHAMPION,
    RegistryUnreachable,
    ResolvedModel,
    attach_artifacts,
    cache_problems,
    get_version_by_alias,
    get_version_metrics,
    get_version_tags,
    log_version_metrics,
    register_policy,
    remembered_alias_version,
    resolve_model,
    set_version_tags,
)
from mobile_vla.tracking.store import configure_mlflow, get_or_create_experiment, tracking_uri

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_MODEL_NAME",
    "PREVIOUS_CHAMPION",
    "AliasMove",
    "RegistryUnreachable",
    "ResolvedModel",
    "alias_history",
    "attach_artifacts",
    "cache_problems",
    "configure_mlflow",
    "detect_alias_move",
    "get_or_create_experiment",
    "get_version_by_alias",
    "get_version_metrics",
    "get_version_tags",
    "log_version_metrics",
    "register_policy",
    "remembered_alias_version",
    "resolve_model",
    "set_alias",
    "set_version_tags",
    "tracking_uri",
]
