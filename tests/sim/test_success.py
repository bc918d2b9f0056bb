"""Wilson interval and SPL against known numbers."""

from __future__ import annotations

import math

import pytest

from mobile_vla.sim.success import mean_or_nan, spl, wilson_interval


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
