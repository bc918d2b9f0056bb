"""Every wire type of serving, in one place.

HTTP API v1 bodies (design.md): strict pydantic models, so unknown fields, NaN/inf and wrong types
are refused with 422 before any work is done; answers are built from these models too. Shape checks
that need the model (state length S) happen in the ingress, the instruction's token count in the
policy replica (the one place that tokenises).

Between the ingress and the policy replicas (Serve handle calls): `StepRequest` per robot, answered
by `StepResult` or `StepFailure` in its slot, and `BackendUnavailable` raised by a replica with no
model loaded (Ray re-raises it in the ingress as an instance of the same class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from mobile_vla.policy.novelty import SafetyThresholds
from mobile_vla.runtime import BACKEND_NAMES

MAX_INSTRUCTION_CHARS = 512
MAX_STATE_DIM = 64
FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e38: a larger JSON number becomes inf in the model
MAX_DEADLINE_MS = 60_000
MAX_DELAY_MS = 600_000
SafetyLevel = Literal["normal", "slow", "stop", "handover"]  # = serve.safety.LEVELS
SafetyReason = Literal["low_confidence", "novel_frame", "stale", "consecutive_stops"]  # = serve.safety.REASONS


def _float32_range(value: float) -> float:
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value!r} is outside the float32 range (|x| <= {FLOAT32_MAX:.7g})")
    return value


# Every float of a request body: finite as JSON AND as float32 (1e39 is a finite Python float but inf in float32).
FiniteFloat = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_float32_range)]
RobotId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Instruction = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_INSTRUCTION_CHARS)]
Velocity = Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]


class StrictBody(BaseModel):
    """A request body: unknown fields and NaN/inf are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ActFields(StrictBody):
    """The fields of one control step besides the frame: the JSON object of the binary form's `X-Act-Fields`
    header (docs/http_api.md "Binary wire format"), and `ActRequest` without `image`.
    """

    robot_id: RobotId = Field(description="Robot name: letters, digits, '.', '_', '-' (max 64).")
    instruction: Instruction
    state: Annotated[list[FiniteFloat], Field(max_length=MAX_STATE_DIM)] = Field(
        description="Robot state, S floats (S from /v1/model)."
    )
    memory: str | None = Field(default=None, description="Token from the previous answer; omit at episode start.")
    deadline_ms: Annotated[int, Field(ge=1, le=MAX_DEADLINE_MS)] | None = Field(
        default=None,
        description="Time budget of this step from its arrival, in ms; default: the model's control period "
        "(1 / control_hz) or the app's `deadline_s`. A step whose deadline passes before the model runs "
        "it is not computed: 429 overloaded when it waited in a queue, 504 deadline_exceeded when the "
        "primary failed meanwhile.",
    )
    delay_ms: Annotated[float, Field(ge=0, le=MAX_DELAY_MS, allow_inf_nan=False)] | None = Field(
        default=None,
        description="The robot's measured delay for this step, in ms: how old the camera frame was when the "
        "request left the robot plus its last measured round trip. The safety ladder adds the time the step "
        "spent in the server and slows or stops a step that is too old; without it a step is never stale.",
    )
    step: Annotated[int, Field(ge=0, le=10_000_000)] | None = Field(
        default=None,
        description="The robot's step cursor: the control step this frame was taken at. Echoed as the answer's "
        "`anchor_step` (the step `actions[0]` is for), so a robot that kept moving while the request was in "
        "flight knows which actions it has already overtaken.",
    )


class ActRequest(ActFields):
    """One control step of one robot (`POST /v1/act`, JSON form)."""

    image: str = Field(description="Base64 JPEG or PNG of the current camera frame, any size.", min_length=1)


class SafetyDecision(BaseModel):
    """What the robot may do with this answer (docs/http_api.md "Safety")."""

    level: SafetyLevel = Field(
        description="normal: execute; slow: the actions are already scaled by speed_factor; stop: the actions "
        "are zero, stand still; handover: zero actions, stand still and call an operator."
    )
    reasons: list[SafetyReason] = Field(description="The rules that raised the level, most severe first; [] if normal.")
    speed_factor: float = Field(description="What the chunk's velocities were multiplied by: 1, slow_factor or 0.")
    confidence_now: float = Field(description="Confidence of the executed step (actions[0]).")
    novelty: float | None = Field(
        description="How unlike the training frames this frame is (about 1 in distribution); null: novelty off."
    )
    stale_ms: float | None = Field(description="The step's age (delay_ms + time in the server); null without delay_ms.")


class ModelRef(BaseModel):
    """The model version that computed an answer."""

    name: str
    version: str


class ActResponse(BaseModel):
    """The next action chunk, its confidence and the memory token for the next step."""

    actions: list[list[float]] = Field(description="K x [linear_x, linear_y, angular_z]; actions[0] is for now.")
    confidence: float
    memory: str
    model: ModelRef
    backend: Literal[BACKEND_NAMES]
    memory_reset: bool
    latency_ms: float
    queue_ms: float = Field(description="The rest of latency_ms: parsing, decoding, waiting in queues.")
    compute_ms: float = Field(description="The model call that computed this step (its whole batch), in ms.")
    anchor_step: int | None = Field(description="The request's `step`: `actions[0]` is for this step; null without it.")
    safety: SafetyDecision


class FeedbackRequest(StrictBody):
    """One executed step, with the correction if a person intervened (`POST /v1/feedback`)."""

    robot_id: RobotId
    episode_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    step: Annotated[int, Field(ge=0, le=10_000_000)]
    instruction: Instruction
    image: str = Field(min_length=1)
    state: Annotated[list[FiniteFloat], Field(max_length=MAX_STATE_DIM)]
    action_executed: Velocity
    action_corrected: Velocity | None = None
    intervention: bool = False
    episode_done: bool = False
    success: bool | None = None


class FeedbackAccepted(BaseModel):
    """The step is durably stored."""

    stored: bool = True
    key: str = Field(description="robot_id/episode_id/step: retries with the same key are duplicates.")


class Health(BaseModel):
    """The ingress answers (`GET /healthz`)."""

    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    """A code a robot can branch on, and a message for people."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class BackendStatus(BaseModel):
    """What one policy deployment serves now."""

    role: Literal["primary", "fallback"]
    deployment: str
    backend: str | None
    loaded: bool
    model_version: str | None
    breaker: str | None = None
    detail: str | None = None
    pending_version: str | None = Field(
        default=None, description="Version being prepared/loaded beside the served one."
    )
    failed_version: str | None = Field(
        default=None, description="Last version that failed to load (the old one kept serving)."
    )
    failed_reason: str | None = None
    from_cache: bool = Field(
        default=False, description="Serves a version loaded from its local cache while the registry was unreachable."
    )
    registry_error: str | None = Field(
        default=None, description="Its last failed alias check (registry unreachable); cleared by the next success."
    )


class Readiness(BaseModel):
    """Some backend has a model loaded (`GET /readyz`); `backends` only for an operator token."""

    status: Literal["ready"] = "ready"
    backends: list[BackendStatus] | None = None


class ShadowSummary(BaseModel):
    """Running agreement of the shadow with the champion, as this ingress replica saw it."""

    alias: str
    version: str | None
    compared: int
    agreed: int
    errors: int
    dropped: int
    agreement: float | None = Field(
        description="Share of compared steps whose first actions agree within the tolerance."
    )
    mean_abs_action_diff: float | None
    in_flight: int


class SafetyInfo(BaseModel):
    """The safety ladder for the served version: on or off, whether novelty runs, and the thresholds in force."""

    enabled: bool
    novelty: bool = Field(description="Whether answers carry a novelty score (the version has training statistics).")
    note: str = Field(description="Why novelty is on or off for this version.")
    thresholds: dict[str, float | None] = Field(description="The thresholds in force (serve config over calibration).")
    slow_factor: float
    handover_after_stops: int


class ModelSummary(BaseModel):
    """What a robot needs to know of the served model (`GET /v1/model` without the operator scope).

    A field robots need belongs here; `ModelInfo` adds what only operators see.
    """

    name: str
    version: str
    state_dim: int
    chunk: int
    # what to send as `state` (signature.json preprocessing.state_input): "previous_command" = the command
    # executed at the previous step, "measured_velocity" = the velocity the base realised then, "none" = zeros
    state_input: str = "previous_command"
    safety: SafetyInfo | None = None


class ModelInfo(ModelSummary):
    """The served model and the state of each backend (`GET /v1/model` with the operator scope)."""

    alias: str | None
    uri: str
    backends: list[BackendStatus]
    active: str | None = Field(
        description="Backend that answers now: primary if its breaker is closed, it is loaded "
        "and it serves the alias's version."
    )
    alias_version: str | None = Field(
        default=None, description="Version the alias points to, as this ingress saw last."
    )
    from_cache: bool = Field(
        default=False, description="The ingress read these request checks from its local cache (registry down)."
    )
    watch_error: str | None = Field(
        default=None,
        description="The ingress's last failed alias lookup or request-check load, retried with backoff; "
        "cleared by the next success.",
    )
    shadow: ShadowSummary | None = None


# -- between the ingress and the policy replicas ---------------------------------------------------
class BackendUnavailable(RuntimeError):
    """A policy replica has no model loaded (e.g. no TensorRT plan for this GPU): use the fallback."""


@dataclass
class StepRequest:
    """One robot's step, already validated and decoded by the ingress."""

    robot_id: str
    image: np.ndarray  # uint8 [H, W, C] = [224, 224, 3]
    state: np.ndarray  # float32 [S], raw (the backend normalises)
    instruction: str
    memory_version: str | None = None  # model version the memory belongs to
    memory_name: str | None = None
    h: np.ndarray | None = None  # float32 [layers, hidden]
    c: np.ndarray | None = None
    deadline: float | None = None  # wall clock (time.time()) after which the step is dropped, not computed
    safety_stops: int = 0  # consecutive safety stops before this step (from the memory token; ingress only)

    def expired(self, now: float) -> bool:
        """Whether the step's deadline has passed at wall-clock time `now`."""
        return self.deadline is not None and now >= self.deadline


@dataclass
class StepResult:
    """One robot's answer from a policy replica."""

    actions: np.ndarray  # float32 [K, 3], de-normalised
    confidence: float
    h: np.ndarray  # float32 [layers, hidden]
    c: np.ndarray
    model_name: str
    model_version: str
    backend: str
    memory_reset: bool
    confidence_now: float | None = None  # the executed step's; None from a signature version 1 export
    novelty: float | None = None  # None: novelty off for this version
    thresholds: SafetyThresholds | None = None  # the version's calibrated ones (None: uncalibrated)
    compute_ms: float = 0.0  # the backend call of the batch this step ran in


@dataclass
class StepFailure:
    """In the slot of a robot whose step failed while the rest of its batch was answered.

    `refused`: the request itself is wrong for this model (e.g. an instruction with more tokens than
    the model takes, a state that overflows once normalised): the robot gets 422, no other backend is
    tried and the replica is not at fault. `expired`: the step's deadline passed before the model
    ran it (it waited in the replica's queue), so it was shed (429); not the replica's fault either.
    Neither: the model failed for this robot (e.g. a non-finite output): the fallback is tried for it alone, else 503.
    """

    error: str
    refused: bool = False
    expired: bool = False
