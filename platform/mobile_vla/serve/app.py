"""`build_app(args)`: the Serve application (ingress + primary policy + optional fallback policy).

    serve run mobile_vla.serve.app:build_app model_uri=models:/mobile-vla-policy@champion
    serve deploy serve_configs/gpu.yaml        # import_path: mobile_vla.serve.app:build_app

The model alias is resolved here, once, to a version (`models:/NAME/V`) that every replica loads,
so every replica starts on the same version; after that each policy replica and the ingress follow
the alias themselves every `alias_poll_s` (hot swap: docs/operations.md). With `shadow` set, a
third deployment serves the shadow alias (default `@challenger`) and gets a copy of live requests
off the request path. With `canary` set, a CanaryPolicy deployment follows `@canary` and serves the
share of robots `mobile-vla rollout` sets (serve/canary.py). Replicas get the builder's platform home and
MLflow URI through their runtime_env, so they read the same store and model cache.
"""

from __future__ import annotations

import os

from ray.serve.config import BackpressureConfig

from mobile_vla.config import platform_home, validate_config
from mobile_vla.errors import ConfigError
from mobile_vla.online.feedback_store import feedback_root
from mobile_vla.serve.auth import TokenVerifier, resolve_tokens_path
from mobile_vla.serve.deploy_options import FRAME_BYTES, GRPC_LIMIT_VAR, DeploymentOverrides, grpc_message_bytes
from mobile_vla.serve.deployments import POLICY_DEPLOYMENTS, REPLICA_RESOURCES, OnnxPolicy
from mobile_vla.serve.drills import DrillConfig, drill_deployment
from mobile_vla.serve.memory_token import prepare_memory_secret
from mobile_vla.serve.routes import PolicyIngress
from mobile_vla.serve.settings import (
    ONNX,
    IngressConfig,
    PolicyUserConfig,
    ServeAppConfig,
    ShadowConfig,
    ingress_limits,
)
from mobile_vla.tracking import get_version_by_alias, resolve_model

# the app arguments, importable beside their builders
__all__ = ["FRAME_BYTES", "ServeAppConfig", "ShadowConfig", "build_app", "compose_app"]


def _replica_env(max_batch_size: int) -> dict[str, str]:
    # In Serve's throughput mode replicas call each other over gRPC, whose messages stop at 4 MiB by
    # default: 27 decoded frames. A batch of max_batch_size frames (and its answer) must fit.
    env = {
        "MOBILE_VLA_HOME": str(platform_home()),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        GRPC_LIMIT_VAR: os.environ.get(GRPC_LIMIT_VAR, str(grpc_message_bytes(max_batch_size))),
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    return env


def build_app(args: ServeAppConfig | dict | None = None):
    """The application builder of `serve run/deploy` and Serve config files: `compose_app(args)`.

    Serve calls a builder with the config's `args` only and refuses one with any other parameter.
    """
    return compose_app(args)


def compose_app(
    args: ServeAppConfig | dict | None = None,
    drill: DrillConfig | None = None,
    overrides: DeploymentOverrides | None = None,
):
    """The Serve application: ingress, primary policy, optional fallback and optional shadow.

    Args:
        args: the app arguments; a dict (from `serve run/deploy`) is validated as `ServeAppConfig`.
        drill: TEST-ONLY fault injection into the primary (`serve.drills`); never in production.
        overrides: a Serve config's section for this app (`mobile-vla serve`): its deployments' options
            merged over the code's, the replicas' environment kept (serve/deploy_options.py).

    Returns:
        The bound ingress deployment, for `serve.run` or a Serve config's `import_path`.

    Raises:
        ConfigError: bad arguments, no tokens file, a configured memory secret file that is missing,
            shadow mode without a registered model, or `overrides` naming a deployment the app lacks.
        ModelError: the model (or the shadow alias) cannot be resolved.
    """
    if not isinstance(args, ServeAppConfig):
        args = validate_config(dict(args or {}), ServeAppConfig, "serve app args")
    overrides = overrides or DeploymentOverrides()
    tokens_path = resolve_tokens_path(args.tokens_file)
    TokenVerifier.from_file(tokens_path)  # fail here, not in a replica restart loop
    secret_path = prepare_memory_secret(args.memory_secret_file)  # a configured file must exist: never made per node
    resolved = resolve_model(args.model_uri)
    pinned_uri = (
        f"models:/{resolved.name}/{resolved.version}" if args.model_uri.startswith("models:/") else str(resolved.path)
    )
    env = {"runtime_env": {"env_vars": _replica_env(args.max_batch_size)}}
    # Serve's own load shedding: past max_queued_requests a caller gets 429 + Retry-After (HTTP, from
    # the proxy) or BackPressureError (handle calls: the router answers those robots 429).
    shed = BackpressureConfig(status_code=429, retry_after_s=args.retry_after_s)
    policy_queue = {"max_queued_requests": args.policy_max_queued_requests, "backpressure_config": shed}

    policy_config = PolicyUserConfig(
        model_uri=pinned_uri,
        alias=resolved.alias,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=0.0,  # the ingress waited to fill the batch; the policy merges what queues meanwhile
        fp16=args.fp16,
        int8=args.int8,
        cpu_threads=args.cpu_threads,
        alias_poll_s=args.alias_poll_s,
    )
    ongoing = args.max_ongoing_requests or 2 * args.max_batch_size
    primary_cls = POLICY_DEPLOYMENTS[args.primary]
    primary_config = policy_config
    if drill is not None:
        primary_cls, primary_config = drill_deployment(args.primary), drill.policy_config(policy_config)
    primary_name = primary_cls.name
    primary = primary_cls.options(
        **overrides.apply(
            primary_name,
            {
                "max_ongoing_requests": ongoing,
                **policy_queue,
                "ray_actor_options": {**REPLICA_RESOURCES[args.primary], **env},
                "user_config": primary_config.model_dump(mode="json"),
            },
        )
    )
    fallback = fallback_name = None
    if args.fallback is not None:
        fallback_cls = POLICY_DEPLOYMENTS[args.fallback]
        fallback_name = "OnnxFallbackPolicy" if args.fallback == args.primary else fallback_cls.name
        fallback = fallback_cls.options(
            name=fallback_name,
            **overrides.apply(
                fallback_name,
                {
                    "max_ongoing_requests": ongoing,
                    **policy_queue,
                    "ray_actor_options": {**REPLICA_RESOURCES[args.fallback], **env},
                    "user_config": policy_config.model_dump(mode="json"),
                },
            ),
        )
    shadow = shadow_name = None
    if args.shadow is not None:
        if not args.model_uri.startswith("models:/"):
            raise ConfigError(
                f"shadow: model_uri = {args.model_uri!r}: shadow mode needs a registered model (models:/NAME@alias)"
            )
        shadow_resolved = resolve_model(
            f"models:/{resolved.name}@{args.shadow.alias}"
        )  # ModelError names a missing alias
        shadow_name = "ShadowPolicy"
        shadow_user_config = policy_config.model_copy(
            update={
                "model_uri": f"models:/{shadow_resolved.name}/{shadow_resolved.version}",
                "alias": args.shadow.alias,
            }
        )
        shadow = OnnxPolicy.options(
            name=shadow_name,
            **overrides.apply(
                shadow_name,
                {
                    "max_ongoing_requests": ongoing,
                    "ray_actor_options": {**REPLICA_RESOURCES[ONNX], **env},
                    "user_config": shadow_user_config.model_dump(mode="json"),
                },
            ),
        )
    canary = canary_name = None
    if args.canary is not None:
        canary_name = "CanaryPolicy"
        canary = _canary_deployment(args, resolved, policy_config, ongoing, env, overrides)
    settings = IngressConfig(
        model_uri=pinned_uri,
        alias=resolved.alias,
        tokens_file=str(tokens_path),
        memory_secret_file=str(secret_path),
        feedback_dir=str(feedback_root(args.feedback_dir)),  # one definition ($MOBILE_VLA_FEEDBACK_DIR on a cluster)
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        primary_timeout_s=args.primary_timeout_s,
        fallback_timeout_s=args.fallback_timeout_s,
        deadline_s=args.deadline_s,
        max_pending_requests=args.max_pending_requests,
        retry_after_s=args.retry_after_s,
        breaker_failures=args.breaker_failures,
        breaker_reset_s=args.breaker_reset_s,
        primary_name=primary_name,
        fallback_name=fallback_name,
        alias_poll_s=args.alias_poll_s,
        shadow=args.shadow,
        shadow_name=shadow_name,
        safety=args.safety,
        canary=args.canary,
        canary_name=canary_name,
    )
    # Serve admits to the ingress about what the ingress's own gate would admit: the excess is shed by
    # Serve (in its proxy, or in the replica's HTTP server behind HAProxy) before any of our code runs.
    ingress_pending, ingress_ongoing = ingress_limits(args.max_pending_requests, args.max_batch_size)
    ingress = PolicyIngress.options(
        **overrides.apply(
            PolicyIngress.name,
            {
                "ray_actor_options": {"num_cpus": 0.5, **env},
                "max_ongoing_requests": ingress_ongoing,
                "max_queued_requests": args.ingress_max_queued_requests or ingress_pending,
                "backpressure_config": shed,
            },
        )
    )
    overrides.check_names(
        {PolicyIngress.name, primary_name} | {n for n in (fallback_name, shadow_name, canary_name) if n is not None}
    )
    return ingress.bind(
        settings.model_dump(),
        primary.bind(),
        fallback.bind() if fallback else None,
        shadow.bind() if shadow else None,
        canary.bind() if canary else None,
    )


def _canary_deployment(
    args: ServeAppConfig,
    resolved,
    policy_config: PolicyUserConfig,
    ongoing: int,
    env: dict,
    overrides: DeploymentOverrides,
):
    """An ONNX policy that follows `@canary`; until the alias exists it loads the champion's version (it
    serves nobody then: the ingress routes to it only while `@canary` names another version).
    """
    if not args.model_uri.startswith("models:/"):
        raise ConfigError(
            f"canary: model_uri = {args.model_uri!r}: a canary rollout needs a registered model (models:/NAME@alias)"
        )
    version = get_version_by_alias(resolved.name, args.canary.alias) or resolved.version
    user_config = policy_config.model_copy(
        update={"model_uri": f"models:/{resolved.name}/{version}", "alias": args.canary.alias}
    )
    return OnnxPolicy.options(
        name="CanaryPolicy",
        **overrides.apply(
            "CanaryPolicy",
            {
                "max_ongoing_requests": ongoing,
                "ray_actor_options": {**REPLICA_RESOURCES[ONNX], **env},
                "user_config": user_config.model_dump(mode="json"),
            },
        ),
    )
