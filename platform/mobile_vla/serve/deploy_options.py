"""A Serve config's per-deployment options merged over the options the app's code sets, so that a config
cannot drop what the code gives its replicas.

Ray 2.60's own `serve deploy` REPLACES a deployment's `ray_actor_options` whole when the config sets them:
the `runtime_env` env_vars the code passes (MOBILE_VLA_HOME, MLFLOW_TRACKING_URI, the gRPC message limit
sized for `max_batch_size` frames) vanish, and only the application's `runtime_env` is merged in.
`mobile-vla serve` builds the app itself and merges instead (`DeploymentOverrides.apply`):

    options     = code's options, then the config entry's (num_replicas, autoscaling_config, ...)
    ray_actor_options = code's keys, then the config entry's (num_cpus, num_gpus, ...)
    runtime_env = the app's runtime_env, then the code's, then the config entry's (Serve's precedence),
                  with env_vars merged key by key in the same order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mobile_vla.errors import ConfigError
from mobile_vla.policy.config import IMAGE_SIZE

GRPC_LIMIT_VAR = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
GRPC_DEFAULT_BYTES = 4 * 1024 * 1024  # gRPC's (and Serve's) default: 27 decoded frames
FRAME_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3  # one decoded uint8 frame, what the ingress sends a policy replica per robot


def grpc_message_bytes(max_batch_size: int) -> int:
    """The replica-to-replica gRPC message limit a batch of `max_batch_size` frames (and its answer) needs
    in Serve's throughput mode, where replicas call each other over gRPC.
    """
    return max(GRPC_DEFAULT_BYTES, 2 * max_batch_size * (FRAME_BYTES + 16 * 1024))


def grpc_limit_shortfall(max_batch_size: int, environ: dict[str, str]) -> str | None:
    """Why a replica started with `environ` cannot take a full batch over gRPC, or None when it can."""
    needed = grpc_message_bytes(max_batch_size)
    value = environ.get(GRPC_LIMIT_VAR)
    try:
        limit = int(value) if value else GRPC_DEFAULT_BYTES
    except ValueError:
        return f"{GRPC_LIMIT_VAR} = {value!r} is no number of bytes (max_batch_size {max_batch_size} needs {needed})"
    if limit >= needed:
        return None
    return (
        f"{GRPC_LIMIT_VAR} = {limit} bytes in this replica's environment, below the {needed} a batch of "
        f"max_batch_size = {max_batch_size} frames needs: in Serve's throughput mode larger batches fail. "
        "Set it in the Serve config's application runtime_env env_vars (a deployment's ray_actor_options "
        "replace the code's under `serve deploy`)"
    )


def _merged_runtime_env(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win field by field; env_vars are merged key by key (later wins)."""
    merged: dict[str, Any] = {}
    env_vars: dict[str, str] = {}
    for layer in layers:
        layer = dict(layer or {})
        env_vars.update(layer.pop("env_vars", None) or {})
        merged.update(layer)
    if env_vars:
        merged["env_vars"] = env_vars
    return merged


def merge_deployment_options(
    code: dict[str, Any], config: dict[str, Any] | None = None, app_runtime_env: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The options a deployment runs with: `config` (a Serve config's `deployments:` entry, as a dict of
    the options it sets) over `code` (what the app's builder passes to `.options()`), with
    `ray_actor_options` merged key by key and `runtime_env` merged as the module docstring says.
    """
    config = {k: v for k, v in (config or {}).items() if k != "name"}
    code_actor = dict(code.get("ray_actor_options") or {})
    config_actor = dict(config.pop("ray_actor_options", None) or {})
    runtime_env = _merged_runtime_env(
        app_runtime_env, code_actor.pop("runtime_env", None), config_actor.pop("runtime_env", None)
    )
    actor = {**code_actor, **config_actor}
    if runtime_env:
        actor["runtime_env"] = runtime_env
    merged = {**code, **config}
    if actor:
        merged["ray_actor_options"] = actor
    return merged


@dataclass(frozen=True)
class DeploymentOverrides:
    """One application's section of a Serve config: its `deployments:` entries and its `runtime_env`."""

    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # deployment name -> options set
    runtime_env: dict[str, Any] = field(default_factory=dict)
    source: str = "serve config"  # names the config in errors

    def apply(self, name: str, code: dict[str, Any]) -> dict[str, Any]:
        """The options of deployment `name`: the config's over the code's `code`."""
        return merge_deployment_options(code, self.deployments.get(name), self.runtime_env)

    def check_names(self, built: set[str]) -> None:
        """Raises ConfigError when the config names a deployment the app does not build."""
        unknown = sorted(set(self.deployments) - built)
        if unknown:
            raise ConfigError(
                f"{self.source}: deployments: {', '.join(unknown)} is not a deployment of this application "
                f"(it has {', '.join(sorted(built))})"
            )
