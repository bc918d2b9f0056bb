"""Wilson interval and SPL against known numbers."""

from __future__ import annotations

import math

import pytest

from mobile_vla.sim.success import failure_auroc, mean_or_nan, spl, wilson_interval


@pytest.mark.parametrize(
    "successes, trials, low, high",
    [
        (8, 10, 0.4902, 0.9433),  # textbook example (Newcombe 1998 style tables)
        (50, 100, 0.4038, 0.5962),
        (0, 10, 0.0, 0.2775),  # upper end z^2 / (n + z^2): never a zero-width interval at 0%
        (10, 10, 0.7225, 1.0),  # lower end n / (n + z^2)
        (180, 200, 0.8506, 0.9343),
    ],
)
def test_wilson_known_values(successes, trials, low, high):
    got_low, got_high = wilson_interval(successes, trials)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)
    assert got_low <= successes / trials <= got_high


def test_wilson_narrows_with_more_trials_and_handles_no_trials():
    low_50, high_50 = wilson_interval(35, 50)
    low_200, high_200 = wilson_interval(140, 200)
    assert high_200 - low_200 < high_50 - low_50
    assert 0.12 < (high_50 - low_50) / 2 < 0.14  # 50 seeds: about +-13 points at 70%
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_spl_known_values():
    # success at the expert's length, success with a path twice as long, failure
    assert spl([True, True, False], [10.0, 10.0, 10.0], [10.0, 20.0, 5.0]) == pytest.approx(0.5)
    # a path shorter than the expert's (cut a corner) counts as 1, never more
    assert spl([True], [4.0], [3.0]) == pytest.approx(1.0)
    assert spl([True, False], [2.0, 2.0], [8.0, 2.0]) == pytest.approx(0.125)
    assert spl([True], [0.0], [0.0]) == 1.0  # started at the target
    assert math.isnan(spl([], [], []))
    with pytest.raises(ValueError, match="outcomes"):
        spl([True], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="negative"):
        spl([True], [-1.0], [1.0])


def test_mean_or_nan_skips_missing_values():
    assert mean_or_nan([0.2, float("nan"), 0.4, None]) == pytest.approx(0.3)
    assert math.isnan(mean_or_nan([float("nan")]))


def test_failure_auroc_on_a_hand_example():
    # successes 0.9, 0.7, 0.5; failures 0.6, 0.2, 0.5. Of the 9 (failure, success) pairs the failure is
    # less confident in 0.2 < all three (3), 0.6 < 0.9 and 0.7 (2), 0.5 < 0.9, 0.7 (2) and ties 0.5 (1/2):
    # (3 + 2 + 2 + 0.5) / 9
    confidence = [0.9, 0.6, 0.7, 0.2, 0.5, 0.5]
    failed = [False, True, False, True, False, True]
    assert failure_auroc(confidence, failed) == pytest.approx(7.5 / 9)
    assert failure_auroc([0.9, 0.8, 0.3], [False, False, True]) == 1.0  # every failure below every success
    assert failure_auroc([0.1, 0.2, 0.9], [False, False, True]) == 0.0  # confidence points the wrong way
    assert failure_auroc([0.5, 0.5], [False, True]) == 0.5  # no separation: chance


def test_failure_auroc_is_nan_without_both_classes_or_confidence():
    assert math.isnan(failure_auroc([0.4, 0.9], [False, False]))  # no failure
    assert math.isnan(failure_auroc([0.4, 0.9], [True, True]))  # no success
    assert math.isnan(failure_auroc([math.nan, math.nan], [False, True]))  # no confidence (the expert)
    assert failure_auroc([math.nan, 0.2, 0.8], [True, True, False]) == 1.0  # episodes without one left out
    assert math.isnan(failure_auroc([], []))
    with pytest.raises(ValueError, match="2 confidences, 1 outcomes"):
        failure_auroc([0.1, 0.2], [True])
