"""Typed answers of the HTTP API (docs/http_api.md), built from the server's JSON.

Fields the server may add later (the API adds fields, never renames them) are read when present and
are None otherwise; the whole body stays in `raw`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelRef:
    """The model version that computed an answer."""

    name: str
    version: str


STOP_LEVELS = ("stop", "handover")  # safety levels whose actions are zero: stand still


@dataclass(frozen=True)
class Safety:
    """The server's safety decision for this step (the answer's `safety`, docs/http_api.md).

    `level`: normal (execute), slow (the actions are already scaled by `speed_factor`), stop (zero
    actions: stand still) or handover (stand still and call an operator); `reasons`: the rules that
    raised it, most severe first. The rest of the server's decision is in `raw`.
    """

    level: str
    reasons: tuple[str, ...] = ()
    speed_factor: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def must_stop(self) -> bool:
        """Stand still: the level is stop or handover."""
        return self.level in STOP_LEVELS

    @classmethod
    def parse(cls, value: Any) -> Safety | None:
        """From `{"level": ..., "reasons": [...], "speed_factor": ...}` (or a bare level); None when absent."""
        if value is None:
            return None
        if not isinstance(value, dict):
            return cls(str(value))
        reasons = tuple(str(r) for r in value.get("reasons") or ())
        return cls(str(value["level"]), reasons, _optional(float, value.get("speed_factor")), value)


@dataclass(frozen=True, eq=False)
class ActResult:
    """One `/v1/act` answer, plus the round trip the robot measured (retries included)."""

    actions: np.ndarray  # float64 [K, 3], as sent: K x (linear_x m/s, linear_y m/s, angular_z rad/s); row 0: now
    confidence: float  # [0, 1]
    memory: str  # the token the next step sends (the client keeps it)
    model: ModelRef
    backend: str  # tensorrt | onnx-cuda | onnx-cpu | torch
    memory_reset: bool  # the step ran from a fresh memory (a token of another model version, or one refused)
    latency_ms: float  # the server's own time for the step
    round_trip_ms: float  # what the robot waited, retries included
    anchor_step: int | None = None  # fleet fields, when the server sends them
    queue_ms: float | None = None
    compute_ms: float | None = None
    safety: Safety | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def action_now(self) -> tuple[float, float, float]:
        """actions[0] as three Python floats (what a ROS Twist takes)."""
        linear_x, linear_y, angular_z = (float(v) for v in self.actions[0])
        return linear_x, linear_y, angular_z

    @classmethod
    def from_body(cls, body: dict[str, Any], round_trip_ms: float, memory_reset: bool = False) -> ActResult:
        """From an answer's JSON; `memory_reset` forces the flag (the client dropped a refused token)."""
        actions = np.asarray(body["actions"], dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] != 3:
            raise ValueError(f"actions: expected K x 3, got shape {list(actions.shape)}")
        model = body["model"]
        return cls(
            actions=actions,
            confidence=float(body["confidence"]),
            memory=str(body["memory"]),
            model=ModelRef(str(model["name"]), str(model["version"])),
            backend=str(body["backend"]),
            memory_reset=bool(body["memory_reset"]) or memory_reset,
            latency_ms=float(body["latency_ms"]),
            round_trip_ms=round_trip_ms,
            anchor_step=_optional(int, body.get("anchor_step")),
            queue_ms=_optional(float, body.get("queue_ms")),
            compute_ms=_optional(float, body.get("compute_ms")),
            safety=Safety.parse(body.get("safety")),
            raw=body,
        )


@dataclass(frozen=True)
class FeedbackResult:
    """A `/v1/feedback` answer: the step is durably stored under `key` (robot/episode/step)."""

    stored: bool
    key: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> FeedbackResult:
        return cls(bool(body["stored"]), str(body["key"]))


@dataclass(frozen=True)
class ModelSummary:
    """What a robot needs to know of the served model (`GET /v1/model`); operator details stay in `raw`."""

    name: str
    version: str
    state_dim: int  # the length of `state`
    chunk: int  # K, the rows of `actions`
    state_input: str  # what `state` is: previous_command | measured_velocity | none
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ModelSummary:
        return cls(
            name=str(body["name"]),
            version=str(body["version"]),
            state_dim=int(body["state_dim"]),
            chunk=int(body["chunk"]),
            state_input=str(body.get("state_input") or "previous_command"),  # servers before the field: the command
            raw=body,
        )


def _optional(kind, value):
    return None if value is None else kind(value)
