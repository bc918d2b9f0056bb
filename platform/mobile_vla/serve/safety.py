"""The safe-stop ladder: every /v1/act answer carries a `safety` decision, and its actions follow it.

    limits = effective_thresholds(settings.safety, result.thresholds, control_hz=5.0, chunk=8)
    decision = decide(SafetyInputs(confidence_now=0.4, novelty=3.1, stale_ms=None, previous_stops=0), limits, 10)
    decision.level -> "normal" | "slow" | "stop" | "handover";  decision.reasons -> ["novel_frame", ...]

Three rules, each giving normal, slow or stop; the answer takes the most severe:
- `low_confidence`: the executed step's (k=0) confidence below `confidence_slow` / `confidence_stop`;
- `novel_frame`: the frame's novelty (policy/novelty.py) above `novelty_slow` / `novelty_stop`;
- `stale`: the step's age above `stale_slow_ms` / `stale_stop_ms`. The age is the robot's measured delay
  (`delay_ms` of the request) plus the time the step spent in the server; a request without
  `delay_ms` is never stale.
Then `handover`: the robot has been stopped `handover_after_stops` answers in a row (the count rides
in the signed memory token, so replicas stay stateless); reason `consecutive_stops`.

What the answer does at each level: `slow` multiplies every velocity of the chunk by `slow_factor`,
`stop` and `handover` answer zero velocities (the chunk stays zero: a robot that executes the chunk
while waiting for the next answer stands still). `normal` leaves the actions untouched.
Thresholds: the serve config's when set, else the served version's calibration, else the rule is
off (staleness: one control period to slow, the chunk's horizon to stop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mobile_vla.policy.novelty import SafetyThresholds
from mobile_vla.serve.settings import SafetyConfig

NORMAL, SLOW, STOP, HANDOVER = "normal", "slow", "stop", "handover"
LEVELS = (NORMAL, SLOW, STOP, HANDOVER)  # in rising severity
LOW_CONFIDENCE, NOVEL_FRAME, STALE, CONSECUTIVE_STOPS = "low_confidence", "novel_frame", "stale", "consecutive_stops"
REASONS = (LOW_CONFIDENCE, NOVEL_FRAME, STALE, CONSECUTIVE_STOPS)


@dataclass(frozen=True)
class SafetyLimits:
    """The thresholds in force for one answer (None: that rule is off)."""

    confidence_slow: float | None = None
    confidence_stop: float | None = None
    novelty_slow: float | None = None
    novelty_stop: float | None = None
    stale_slow_ms: float | None = None
    stale_stop_ms: float | None = None


@dataclass(frozen=True)
class SafetyInputs:
    """What one answer is judged on."""

    confidence_now: float  # the executed step's confidence
    novelty: float | None  # None: novelty off for this version
    stale_ms: float | None  # None: the request carried no delay
    previous_stops: int = 0  # consecutive stops before this answer (memory token)


@dataclass(frozen=True)
class SafetyDecision:
    """The level, the rules that raised it (most severe first), and the consecutive-stop count to carry on."""

    level: str
    reasons: list[str] = field(default_factory=list)
    stops: int = 0


def effective_thresholds(
    config: SafetyConfig, calibrated: SafetyThresholds | None, control_hz: float, chunk: int
) -> SafetyLimits:
    """The serve config's thresholds over the version's calibrated ones; staleness from the control rate."""
    calibrated = calibrated or SafetyThresholds()

    def pick(name: str) -> float | None:
        value = getattr(config, name)
        return value if value is not None else getattr(calibrated, name)

    period_ms = 1000.0 / control_hz
    stale_slow = config.stale_slow_ms if config.stale_slow_ms is not None else period_ms
    stale_stop = config.stale_stop_ms if config.stale_stop_ms is not None else max(chunk * period_ms, stale_slow)
    return SafetyLimits(
        confidence_slow=pick("confidence_slow"),
        confidence_stop=pick("confidence_stop"),
        novelty_slow=pick("novelty_slow"),
        novelty_stop=pick("novelty_stop"),
        stale_slow_ms=stale_slow,
        stale_stop_ms=stale_stop,
    )


def _above(value: float | None, slow: float | None, stop: float | None) -> str:
    """The level of a rule that fires when `value` rises above its thresholds."""
    if value is None or (slow is None and stop is None):
        return NORMAL
    if not math.isfinite(value):  # a broken score is never read as "in distribution"
        return STOP
    if stop is not None and value > stop:
        return STOP
    if slow is not None and value > slow:
        return SLOW
    return NORMAL


def _below(value: float, slow: float | None, stop: float | None) -> str:
    """The level of a rule that fires when `value` falls below its thresholds."""
    if slow is None and stop is None:
        return NORMAL
    if not math.isfinite(value):
        return STOP
    if stop is not None and value < stop:
        return STOP
    if slow is not None and value < slow:
        return SLOW
    return NORMAL


def decide(inputs: SafetyInputs, limits: SafetyLimits, handover_after_stops: int) -> SafetyDecision:
    """The ladder's decision for one answer (module docstring)."""
    rules = {
        LOW_CONFIDENCE: _below(inputs.confidence_now, limits.confidence_slow, limits.confidence_stop),
        NOVEL_FRAME: _above(inputs.novelty, limits.novelty_slow, limits.novelty_stop),
        STALE: _above(inputs.stale_ms, limits.stale_slow_ms, limits.stale_stop_ms),
    }
    fired = sorted((r for r, level in rules.items() if level != NORMAL), key=lambda r: -LEVELS.index(rules[r]))
    level = max((rules[r] for r in fired), key=LEVELS.index, default=NORMAL)
    if level != STOP:
        return SafetyDecision(level, fired, stops=0)
    stops = inputs.previous_stops + 1
    if handover_after_stops and stops >= handover_after_stops:
        return SafetyDecision(HANDOVER, [CONSECUTIVE_STOPS, *fired], stops=stops)
    return SafetyDecision(STOP, fired, stops=stops)


def speed_factor(level: str, slow_factor: float) -> float:
    """What the level multiplies the chunk's velocities by."""
    return {NORMAL: 1.0, SLOW: slow_factor}.get(level, 0.0)


def apply_level(actions: np.ndarray, level: str, slow_factor: float) -> np.ndarray:
    """Actions [K, 3] (m/s, m/s, rad/s) as the level allows: untouched, scaled, or zero."""
    actions = np.asarray(actions, dtype=np.float32)
    factor = speed_factor(level, slow_factor)
    if factor == 0.0:
        return np.zeros_like(actions)  # not actions * 0: no -0.0 on the wire
    return actions * np.float32(factor)
