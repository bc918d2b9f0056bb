"""`build_app(args)`: the Serve application (ingress + primary policy + optional fallback policy).

    serve run mobile_vla.serve.app:build_app model_uri=models:/mobile-vla-policy@champion
    serve deploy serve_configs/gpu.yaml        # import_path: mobile_vla.serve.app:build_app

The model alias is resolved here, once, to a version (`models:/NAME/V`) that every replica loads,
so every replica starts on the same version; after that each policy replica and the ingress follow
the alias themselves every `alias_poll_s` (hot swap: docs/operations.md). With `shadow` set, a
third deployment serves the shadow alias (default `@challenger`) and gets a copy of live requests
off the request path. Replicas get the builder's platform home and
MLflow URI through their runtime_env, so they read the same store and model cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mobile_vla.config import StrictModel, platform_home, validate_config
from mobile_vla.errors import ConfigError
from mobile_vla.policy.config import IMAGE_SIZE
from mobile_vla.serve.deployments import DEFAULT_ALIAS_POLL_S, DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, FaultConfig


class ShadowConfig(StrictModel):
    """Shadow mode: the `alias` version answers a copy of live requests; only agreement is recorded."""

    alias: str = Field(default="challenger", min_length=1, description="registry alias the shadow serves and follows")
    sample_rate: float = Field(default=1.0, gt=0, le=1, description="share of /v1/act requests copied to the shadow")
    tolerance: float = Field(
        default=0.05, gt=0, description="agree when the first actions differ by at most this (m/s, rad/s)"
    )
    max_in_flight: int = Field(
        default=64, ge=1, description="copies waiting for the shadow; more are dropped, never queued"
    )
    memory_robots: int = Field(
        default=10_000, ge=1, description="robots whose shadow recurrent state the ingress keeps"
    )


class ServeAppConfig(StrictModel):
    """Arguments of the application (`args:` in a Serve config file, or key=value for `serve run`)."""

    model_uri: str = Field(
        default="models:/mobile-vla-policy@champion", description="models:/NAME@alias, models:/NAME/V or a folder"
    )
    primary: Literal["tensorrt", "onnx"] = Field(
        default="onnx", description="tensorrt on GPU nodes, onnx on CPU-only machines"
    )
    fallback: Literal["onnx"] | None = Field(
        default=None, description="deployment used when the primary fails, is slow or absent"
    )
    tokens_file: str | None = Field(
        default=None, description="API tokens, one per line; default env MOBILE_VLA_TOKENS_FILE"
    )
    memory_secret_file: str | None = Field(
        default=None,
        description="HMAC secret of memory tokens; default env MOBILE_VLA_MEMORY_SECRET_FILE, else $MOBILE_VLA_HOME/serve/memory_secret",
    )
    feedback_dir: str | None = Field(
        default=None, description="feedback write-ahead log (FeedbackStore root); default $MOBILE_VLA_HOME/feedback"
    )
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_S, ge=0, le=1)
    max_ongoing_requests: int | None = Field(
        default=None, ge=1, description="per policy replica; default 2 x max_batch_size"
    )
    fp16: bool = False
    cpu_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="ONNX Runtime threads per policy replica (0: one per core); match the replica's num_cpus",
    )
    primary_timeout_s: float = Field(default=0.5, gt=0, le=30)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=224 * 224)
    alias_poll_s: float = Field(
        default=DEFAULT_ALIAS_POLL_S,
        ge=0,
        le=3600,
        description="how often replicas check where the alias points (hot swap); 0: never",
    )
    shadow: ShadowConfig | None = Field(
        default=None, description="copy live requests to a challenger (off the request path)"
    )
    primary_prepare_delay_s: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="TEST-ONLY: the primary's pause before a new version, standing in for an engine build",
    )
    primary_faults: list[FaultConfig] = Field(
        default_factory=list,
        description="TEST-ONLY: make the primary fail or stall on purpose for robots named drill-*",
    )

    @model_validator(mode="after")
    def _batches_fit(self):
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests = {self.max_ongoing_requests} < max_batch_size = {self.max_batch_size}: "
                "batches could never fill"
            )
        return self


FRAME_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3  # one decoded uint8 frame, what the ingress sends a policy replica per robot


def _replica_env(max_batch_size: int) -> dict[str, str]:
    # In Serve's throughput mode replicas call each other over gRPC, whose messages stop at 4 MiB by
    # default: 27 decoded frames. A batch of max_batch_size frames (and its answer) must fit.
    grpc_bytes = max(4 * 1024 * 1024, 2 * max_batch_size * (FRAME_BYTES + 16 * 1024))
    env = {
        "MOBILE_VLA_HOME": str(platform_home()),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": os.environ.get(
            "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", str(grpc_bytes)
        ),
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    return env


def build_app(args: ServeAppConfig | dict | None = None):
    """Typed builder used by `serve run/deploy` (dict args) and by code and tests (ServeAppConfig)."""
    from mobile_vla.serve.auth import TokenVerifier, resolve_tokens_path
    from mobile_vla.serve.deployments import POLICY_CLASSES, OnnxPolicy, PolicyUserConfig
    from mobile_vla.serve.ingress import IngressConfig, PolicyIngress
    from mobile_vla.serve.memory_token import load_or_create_secret, resolve_secret_path
    from mobile_vla.tracking import resolve_model

    if not isinstance(args, ServeAppConfig):
        args = validate_config(dict(args or {}), ServeAppConfig, "serve app args")
    tokens_path = resolve_tokens_path(args.tokens_file)
    TokenVerifier.from_file(tokens_path)  # fail here, not in a replica restart loop
    secret_path = resolve_secret_path(args.memory_secret_file)
    load_or_create_secret(secret_path)
    resolved = resolve_model(args.model_uri)
    pinned_uri = (
        f"models:/{resolved.name}/{resolved.version}" if args.model_uri.startswith("models:/") else str(resolved.path)
    )
    env = {"runtime_env": {"env_vars": _replica_env(args.max_batch_size)}}

    policy_config = PolicyUserConfig(
        model_uri=pinned_uri,
        alias=resolved.alias,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=0.0,  # the ingress waited to fill the batch; the policy merges what queues meanwhile
        fp16=args.fp16,
        cpu_threads=args.cpu_threads,
        alias_poll_s=args.alias_poll_s,
    )
    ongoing = args.max_ongoing_requests or 2 * args.max_batch_size
    primary_cls = POLICY_CLASSES[args.primary]
    primary_resources = {"num_gpus": 1, "num_cpus": 1} if args.primary == "tensorrt" else {"num_cpus": 1}
    primary = primary_cls.options(
        max_ongoing_requests=ongoing,
        ray_actor_options={**primary_resources, **env},
        user_config=policy_config.model_copy(
            update={"faults": args.primary_faults, "prepare_delay_s": args.primary_prepare_delay_s}
        ).model_dump(mode="json"),
    )
    primary_name = primary_cls.name
    fallback = fallback_name = None
    if args.fallback is not None:
        fallback_name = "OnnxFallbackPolicy" if primary_cls is OnnxPolicy else OnnxPolicy.name
        fallback = OnnxPolicy.options(
            name=fallback_name,
            max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": 1, **env},
            user_config=policy_config.model_dump(mode="json"),
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
        shadow = OnnxPolicy.options(
            name=shadow_name,
            max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": 1, **env},
            user_config=policy_config.model_copy(
                update={
                    "model_uri": f"models:/{shadow_resolved.name}/{shadow_resolved.version}",
                    "alias": args.shadow.alias,
                }
            ).model_dump(mode="json"),
        )
    settings = IngressConfig(
        model_uri=pinned_uri,
        alias=resolved.alias,
        tokens_file=str(tokens_path),
        memory_secret_file=str(secret_path),
        feedback_dir=str(
            Path(args.feedback_dir).expanduser().resolve() if args.feedback_dir else platform_home() / "feedback"
        ),
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        primary_timeout_s=args.primary_timeout_s,
        breaker_failures=args.breaker_failures,
        breaker_reset_s=args.breaker_reset_s,
        primary_name=primary_name,
        fallback_name=fallback_name,
        alias_poll_s=args.alias_poll_s,
        shadow=args.shadow,
        shadow_name=shadow_name,
    )
    ingress = PolicyIngress.options(ray_actor_options={"num_cpus": 0.5, **env})
    return ingress.bind(
        settings.model_dump(), primary.bind(), fallback.bind() if fallback else None, shadow.bind() if shadow else None
    )
