"""The safe-stop ladder's decision logic (serve/safety.py), level by level, and the serve config's checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from mobile_vla.policy.novelty import SafetyThresholds
from mobile_vla.serve.safety import (
    CONSECUTIVE_STOPS,
    HANDOVER,
    LOW_CONFIDENCE,
    NORMAL,
    NOVEL_FRAME,
    SLOW,
    STALE,
    STOP,
    SafetyInputs,
    SafetyLimits,
    apply_level,
    decide,
    effective_thresholds,
)
from mobile_vla.serve.settings import SafetyConfig, ServeAppConfig

LIMITS = SafetyLimits(
    confidence_slow=0.5,
    confidence_stop=0.2,
    novelty_slow=2.0,
    novelty_stop=4.0,
    stale_slow_ms=200.0,
    stale_stop_ms=1600.0,
)


def _decide(confidence=0.9, novelty=1.0, stale_ms=None, previous_stops=0, handover_after=3):
    return decide(SafetyInputs(confidence, novelty, stale_ms, previous_stops), LIMITS, handover_after)


def test_in_distribution_confident_fresh_step_is_normal():
    decision = _decide()
    assert (decision.level, decision.reasons, decision.stops) == (NORMAL, [], 0)


@pytest.mark.parametrize(
    ("inputs", "level", "reasons"),
    [
        ({"confidence": 0.4}, SLOW, [LOW_CONFIDENCE]),
        ({"confidence": 0.1}, STOP, [LOW_CONFIDENCE]),
        ({"novelty": 3.0}, SLOW, [NOVEL_FRAME]),
        ({"novelty": 9.0}, STOP, [NOVEL_FRAME]),
        ({"stale_ms": 300.0}, SLOW, [STALE]),
        ({"stale_ms": 2000.0}, STOP, [STALE]),
        ({"novelty": 3.0, "confidence": 0.1}, STOP, [LOW_CONFIDENCE, NOVEL_FRAME]),  # most severe first
        ({"novelty": 3.0, "stale_ms": 300.0}, SLOW, [NOVEL_FRAME, STALE]),
    ],
)
def test_each_rule_slows_then_stops_and_the_most_severe_wins(inputs, level, reasons):
    decision = _decide(**inputs)
    assert decision.level == level
    assert decision.reasons == reasons


def test_thresholds_are_strict_and_missing_inputs_never_fire():
    assert _decide(confidence=0.5, novelty=2.0, stale_ms=200.0).level == NORMAL  # at the threshold: normal
    assert _decide(novelty=None, stale_ms=None).level == NORMAL  # novelty off, request without delay_ms


def test_a_non_finite_score_stops_instead_of_passing():
    assert _decide(novelty=math.nan).level == STOP
    assert _decide(confidence=math.nan).level == STOP


def test_consecutive_stops_hand_over_and_a_good_step_resets_the_count():
    first = _decide(novelty=9.0, previous_stops=0)
    assert (first.level, first.stops) == (STOP, 1)
    third = _decide(novelty=9.0, previous_stops=2)
    assert (third.level, third.stops) == (HANDOVER, 3)
    assert third.reasons == [CONSECUTIVE_STOPS, NOVEL_FRAME]
    slow = _decide(novelty=3.0, previous_stops=5)  # a slow answer is not a stop: the count restarts
    assert (slow.level, slow.stops) == (SLOW, 0)
    never = _decide(novelty=9.0, previous_stops=50, handover_after=0)  # 0: never hand over
    assert (never.level, never.stops) == (STOP, 51)


def test_levels_scale_or_zero_the_chunk():
    chunk = np.array([[0.4, -0.2, 1.0], [0.3, 0.1, -0.5]], np.float32)
    np.testing.assert_array_equal(apply_level(chunk, NORMAL, 0.5), chunk)
    np.testing.assert_allclose(apply_level(chunk, SLOW, 0.5), chunk * 0.5)
    for level in (STOP, HANDOVER):
        zero = apply_level(chunk, level, 0.5)
        assert zero.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
        assert not np.signbit(zero).any()  # no -0.0 on the wire


def test_config_overrides_calibration_and_staleness_follows_the_control_rate():
    calibrated = SafetyThresholds(novelty_slow=1.5, novelty_stop=3.0, confidence_slow=0.3, confidence_stop=0.15)
    limits = effective_thresholds(SafetyConfig(novelty_slow=2.5), calibrated, control_hz=5.0, chunk=8)
    assert limits.novelty_slow == 2.5  # the serve config wins
    assert (limits.novelty_stop, limits.confidence_slow, limits.confidence_stop) == (3.0, 0.3, 0.15)
    assert (limits.stale_slow_ms, limits.stale_stop_ms) == (200.0, 1600.0)  # one period, the chunk's horizon
    uncalibrated = effective_thresholds(SafetyConfig(), None, control_hz=10.0, chunk=4)
    assert uncalibrated.novelty_slow is None and uncalibrated.confidence_slow is None
    assert (uncalibrated.stale_slow_ms, uncalibrated.stale_stop_ms) == (100.0, 400.0)


def test_serve_config_refuses_thresholds_in_the_wrong_order():
    with pytest.raises(ValidationError, match="safety.novelty_stop = 1.0 must be >= safety.novelty_slow = 2.0"):
        ServeAppConfig.model_validate({"safety": {"novelty_slow": 2.0, "novelty_stop": 1.0}})
    with pytest.raises(ValidationError, match="slow_factor"):
        ServeAppConfig.model_validate({"safety": {"slow_factor": 1.5}})
    assert ServeAppConfig.model_validate({"safety": {"confidence_slow": 0.4}}).safety.confidence_slow == 0.4
