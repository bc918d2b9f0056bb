"""HTTP API v1 bodies (design.md): strict pydantic models, so unknown fields, NaN/inf and wrong
types are refused with 422 before any work is done. Shape checks that need the model (state length
S) happen in the ingress.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_INSTRUCTION_CHARS = 512
MAX_STATE_DIM = 64

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
RobotId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Instruction = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_INSTRUCTION_CHARS)]
Velocity = Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ActRequest(StrictBody):
    robot_id: RobotId = Field(description="Robot name: letters, digits, '.', '_', '-' (max 64).")
    instruction: Instruction
    image: str = Field(description="Base64 JPEG or PNG of the current camera frame, any size.", min_length=1)
    state: Annotated[list[FiniteFloat], Field(max_length=MAX_STATE_DIM)] = Field(
        description="Robot state, S floats (S from /v1/model)."
    )
    memory: str | None = Field(default=None, description="Token from the previous answer; omit at episode start.")


class ModelRef(BaseModel):
    name: str
    version: str


class ActResponse(BaseModel):
    actions: list[list[float]] = Field(description="K x [linear_x, linear_y, angular_z]; actions[0] is for now.")
    confidence: float
    memory: str
    model: ModelRef
    backend: Literal["tensorrt", "onnx-cuda", "onnx-cpu", "torch"]
    memory_reset: bool
    latency_ms: float


class FeedbackRequest(StrictBody):
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
    stored: bool = True
    key: str = Field(description="robot_id/episode_id/step: retries with the same key are duplicates.")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class BackendStatus(BaseModel):
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


class ShadowSummary(BaseModel):
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


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None
    uri: str
    state_dim: int
    chunk: int
    backends: list[BackendStatus]
    active: str | None = Field(
        description="Backend that answers now: primary if its breaker is closed, it is loaded "
        "and it serves the alias's version."
    )
    alias_version: str | None = Field(
        default=None, description="Version the alias points to, as this ingress saw last."
    )
    shadow: ShadowSummary | None = None
