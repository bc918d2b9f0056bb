"""Settings of the Serve application: the app arguments (`ServeAppConfig`, what `serve deploy` configs
and `build_app` take), and what `build_app` derives from them for the ingress (`IngressConfig`) and
for each policy deployment (`PolicyUserConfig`, its Serve `user_config`).

A policy deployment kind (`primary`, `fallback`) names a family of the runtime's one backend table
(`mobile_vla.runtime.BACKEND_NAMES`): `onnx` loads `onnx-cuda` or `onnx-cpu`, whichever works here.
The torch backend is the reference for tests, never a deployment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mobile_vla.config import StrictModel
from mobile_vla.runtime import BACKEND_NAMES, BACKENDS
from mobile_vla.tracking.registry import CHALLENGER, CHAMPION, DEFAULT_MODEL_NAME

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_ALIAS_POLL_S = 2.0
DEFAULT_FALLBACK_TIMEOUT_S = 1.0
DEFAULT_RETRY_AFTER_S = 1.0
INGRESS_OTHER_REQUESTS = 8  # ingress slots beyond the /v1/act limit: health, model info, feedback
DEFAULT_POLICY_MAX_QUEUED = 64
DEFAULT_MAX_IMAGE_PIXELS = 2048 * 2048  # 12 MiB as RGB; larger camera frames are downscaled on the robot


TENSORRT, ONNX = "tensorrt", "onnx"  # deployment kinds: the GPU plan, the portable graph
POLICY_BACKENDS: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name in BACKEND_NAMES if name.split("-")[0] == kind) for kind in (TENSORRT, ONNX)
}  # deployment kind -> the runtime backends it may load, fastest first


def needs_gpu(kind: str) -> bool:
    """A deployment kind needs a GPU node when none of its backends runs without one (runtime's table)."""
    return all(BACKENDS[name].gpu for name in POLICY_BACKENDS[kind])


PolicyKind = Literal[tuple(POLICY_BACKENDS)]
FallbackKind = Literal[tuple(kind for kind in POLICY_BACKENDS if not needs_gpu(kind))]  # runs on any node


class ShadowConfig(StrictModel):
    """Shadow mode: the `alias` version answers a copy of live requests; only agreement is recorded."""

    alias: str = Field(default=CHALLENGER, min_length=1, description="registry alias the shadow serves and follows")
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


class CanaryConfig(StrictModel):
    """Canary rollout (serve/canary.py): the `alias` version serves the share of robots the rollout sets
    (a registered-model tag), sticky by robot id; a sample of its steps is mirrored to the champion.
    """

    alias: str = Field(default="canary", min_length=1, description="registry alias the canary serves and follows")
    mirror_rate: float = Field(
        default=0.5, ge=0, le=1, description="share of canary steps also sent to the champion (divergence KPI)"
    )
    max_in_flight: int = Field(default=32, ge=1, description="mirrored steps waiting; more are dropped, never queued")


class SafetyConfig(StrictModel):
    """The safety ladder of /v1/act answers (serve/safety.py; docs/operations.md "Safe stop").

    Thresholds left at None come from the served version's calibration (policy/safety_calibration.json,
    computed on its validation split at training time); a version without one has the confidence and
    novelty rules off unless set here. Staleness thresholds default to the model's control period
    (slow) and the chunk's horizon, K control periods (stop).
    """

    enabled: bool = Field(default=True, description="false: every answer is `normal` (no scaling, no stops)")
    slow_factor: float = Field(default=0.5, gt=0, lt=1, description="`slow` scales every velocity by this")
    confidence_slow: float | None = Field(
        default=None, ge=0, le=1, description="slow below this executed-step confidence (None: calibrated)"
    )
    confidence_stop: float | None = Field(
        default=None, ge=0, le=1, description="stop below this executed-step confidence (None: calibrated)"
    )
    novelty_slow: float | None = Field(default=None, gt=0, description="slow above this novelty (None: calibrated)")
    novelty_stop: float | None = Field(default=None, gt=0, description="stop above this novelty (None: calibrated)")
    stale_slow_ms: float | None = Field(
        default=None, gt=0, description="slow when the step is older than this (None: one control period)"
    )
    stale_stop_ms: float | None = Field(
        default=None, gt=0, description="stop when the step is older than this (None: the chunk's horizon)"
    )
    handover_after_stops: int = Field(
        default=10,
        ge=0,
        description="after this many `stop` answers in a row the robot is handed to an operator (0: never)",
    )

    @model_validator(mode="after")
    def _ordered(self):
        pairs = (
            ("confidence_stop", self.confidence_stop, "confidence_slow", self.confidence_slow, "<="),
            ("novelty_stop", self.novelty_stop, "novelty_slow", self.novelty_slow, ">="),
            ("stale_stop_ms", self.stale_stop_ms, "stale_slow_ms", self.stale_slow_ms, ">="),
        )
        for stop_name, stop, slow_name, slow, relation in pairs:
            if stop is None or slow is None:
                continue
            if (relation == "<=" and stop > slow) or (relation == ">=" and stop < slow):
                raise ValueError(f"safety.{stop_name} = {stop} must be {relation} safety.{slow_name} = {slow}")
        return self


class ServeAppConfig(StrictModel):
    """Arguments of the application (`args:` in a Serve config file, or key=value for `serve run`)."""

    model_uri: str = Field(
        default=f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION}",
        description="models:/NAME@alias, models:/NAME/V or a folder",
    )
    primary: PolicyKind = Field(default=ONNX, description="tensorrt on GPU nodes, onnx on CPU-only machines")
    fallback: FallbackKind | None = Field(
        default=None, description="deployment used when the primary fails, is slow or absent"
    )
    tokens_file: str | None = Field(
        default=None, description="API tokens, one per line; default env MOBILE_VLA_TOKENS_FILE"
    )
    memory_secret_file: str | None = Field(
        default=None,
        description="HMAC secret of memory tokens; default env MOBILE_VLA_MEMORY_SECRET_FILE, "
        "else $MOBILE_VLA_HOME/serve/memory_secret",
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
    int8: bool = Field(
        default=False, description="the int8 ONNX graph (export --int8): ONNX Runtime policies only, not with fp16"
    )
    cpu_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="ONNX Runtime threads per policy replica (0: one per core); match the replica's num_cpus",
    )
    primary_timeout_s: float = Field(default=0.5, gt=0, le=30)
    fallback_timeout_s: float = Field(
        default=DEFAULT_FALLBACK_TIMEOUT_S, gt=0, le=30, description="then the robots get 503"
    )
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        le=60,
        description="a step's default time budget from its arrival (None: the model's control period, "
        "1 / control_hz); a request may set its own with deadline_ms. Past it the step is dropped (504).",
    )
    max_pending_requests: int | None = Field(
        default=None,
        ge=1,
        description="/v1/act requests one ingress replica works on at once; more get 429 with Retry-After "
        "(default 2 x max_batch_size). The ingress deployment's max_ongoing_requests follows it "
        f"(+{INGRESS_OTHER_REQUESTS} for other routes), so Serve sheds the excess before the ingress runs",
    )
    ingress_max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description="requests Serve holds for a busy ingress replica (in its proxy, or in the replica behind "
        "HAProxy); more get Serve's own 429 with Retry-After. Default: the ingress's max_pending_requests. "
        "Ray's direct ingress counts every arriving request as queued until it takes a slot, so a burst of "
        "robots arriving together needs that many queue slots even when the replica has free ones (with 8, "
        "16 robots arriving at once got Serve's 429)",
    )
    policy_max_queued_requests: int = Field(
        default=DEFAULT_POLICY_MAX_QUEUED,
        ge=1,
        description="batch calls queued for busy policy replicas (per deployment handle); more are shed (429)",
    )
    retry_after_s: float = Field(default=DEFAULT_RETRY_AFTER_S, gt=0, le=3600, description="Retry-After of a 429")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=224 * 224)
    alias_poll_s: float = Field(
        default=DEFAULT_ALIAS_POLL_S,
        ge=0,
        le=3600,
        description="how often replicas check where the alias points (hot swap); 0: never",
    )
    shadow: ShadowConfig | None = Field(
        default=None, description="copy live requests to a challenger (off the request path)"
    )
    safety: SafetyConfig = Field(
        default_factory=SafetyConfig, description="the safe-stop ladder of /v1/act answers (thresholds, slow factor)"
    )
    canary: CanaryConfig | None = Field(
        default=None, description="serve @canary to a share of robots set by `mobile-vla rollout` (sticky by robot id)"
    )

    @model_validator(mode="after")
    def _one_precision(self):
        if self.int8 and self.fp16:
            raise ValueError("int8 = true and fp16 = true: choose one precision")
        if self.int8 and TENSORRT in (self.primary, self.fallback):
            raise ValueError(
                f"int8 = true with a {TENSORRT} policy: TensorRT has no int8 plans; serve int8 with primary: onnx"
            )
        return self

    @model_validator(mode="after")
    def _batches_fit(self):
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests = {self.max_ongoing_requests} < max_batch_size = {self.max_batch_size}: "
                "batches could never fill"
            )
        return self


def ingress_limits(max_pending_requests: int | None, max_batch_size: int) -> tuple[int, int]:
    """(/v1/act requests one ingress replica admits at once, the ingress deployment's max_ongoing_requests)."""
    pending = max_pending_requests or 2 * max_batch_size
    return pending, pending + INGRESS_OTHER_REQUESTS


class IngressConfig(StrictModel):
    """Built by `build_app` from the app arguments (paths already resolved)."""

    model_uri: str
    alias: str | None = None
    tokens_file: str
    memory_secret_file: str
    feedback_dir: str
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=DEFAULT_MAX_IMAGE_PIXELS, ge=224 * 224)
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_S, ge=0, le=1)
    primary_timeout_s: float = Field(default=0.5, gt=0)
    fallback_timeout_s: float = Field(default=DEFAULT_FALLBACK_TIMEOUT_S, gt=0)
    deadline_s: float | None = Field(default=None, gt=0)  # None: the served model's control period
    max_pending_requests: int | None = Field(default=None, ge=1)  # None: 2 x max_batch_size
    retry_after_s: float = Field(default=DEFAULT_RETRY_AFTER_S, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)
    primary_name: str | None = None
    fallback_name: str | None = None
    alias_poll_s: float = Field(default=DEFAULT_ALIAS_POLL_S, ge=0)
    shadow: ShadowConfig | None = None
    shadow_name: str | None = None
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    canary: CanaryConfig | None = None
    canary_name: str | None = None


class PolicyUserConfig(StrictModel):
    """A policy deployment's Serve `user_config`: which model it serves and how it batches."""

    model_uri: str = Field(description="models:/NAME/VERSION (or a local model folder)")
    alias: str | None = None
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_S, ge=0, le=1)
    fp16: bool = False
    int8: bool = False
    cpu_threads: int = Field(
        default=1, ge=0, le=256, description="ONNX Runtime intra-op threads (0: one per core); idle threads never spin"
    )
    alias_poll_s: float = Field(
        default=DEFAULT_ALIAS_POLL_S,
        ge=0,
        le=3600,
        description="how often the replica checks where `alias` points; 0: only user_config changes the model",
    )
