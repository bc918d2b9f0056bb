"""Novelty statistics and the safety calibration file (policy/novelty.py): fit, score, save, load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobile_vla.errors import ModelError
from mobile_vla.policy.novelty import (
    SAFETY_FILE,
    SafetyCalibration,
    fit_novelty_stats,
    load_safety_calibration,
)


def _correlated(rng, n, width=16, rank=3):
    """Features on a low-dimensional subspace plus a little noise: what pooled backbone features look like."""
    basis = rng.normal(size=(rank, width))
    return rng.normal(size=(n, rank)) @ basis * 3.0 + rng.normal(size=(n, width)) * 0.1 + 5.0


def test_in_distribution_scores_about_one_and_off_subspace_points_score_high():
    rng = np.random.default_rng(0)
    train = _correlated(rng, 2000)
    stats = fit_novelty_stats(train, rank=8, shrinkage=0.0)  # the plain low-rank Gaussian
    held_out = _correlated(np.random.default_rng(0), 2000)[:500] + rng.normal(size=(500, 16)) * 0.01
    assert 0.5 < float(np.median(stats.score(held_out))) < 2.0
    # a point at the mean shifted off the subspace the training features span: far under the Mahalanobis metric
    off = stats.mean + rng.normal(size=(1, 16)) * 2.0
    assert stats.score(off)[0] > 50 * np.percentile(stats.score(held_out), 99)
    shrunk = fit_novelty_stats(train, rank=8)  # shrinkage lowers every score, keeps the separation
    assert shrunk.score(off)[0] > 10 * np.percentile(shrunk.score(held_out), 99)


def test_calibration_thresholds_come_from_validation_percentiles():
    rng = np.random.default_rng(1)
    stats = fit_novelty_stats(_correlated(rng, 1000), rank=4)
    val = _correlated(np.random.default_rng(1), 1000)
    confidence = np.linspace(0.0, 1.0, 1001)
    calibration = SafetyCalibration.calibrate(stats, val, confidence)
    t = calibration.thresholds
    assert t.novelty_slow == pytest.approx(float(np.percentile(stats.score(val), 99)))
    assert t.novelty_stop == pytest.approx(2 * t.novelty_slow)
    assert t.confidence_slow == pytest.approx(0.01)
    assert t.confidence_stop == pytest.approx(0.005)
    assert calibration.source["val_frames"] == 1000


def test_saved_calibration_loads_back_and_scores_the_same(tmp_path):
    rng = np.random.default_rng(2)
    stats = fit_novelty_stats(_correlated(rng, 300), rank=4)
    calibration = SafetyCalibration.calibrate(stats, _correlated(rng, 100), rng.uniform(size=100), source={"x": 1})
    calibration.save(tmp_path)
    loaded = load_safety_calibration(tmp_path)
    probe = _correlated(rng, 10)
    np.testing.assert_allclose(loaded.stats.score(probe), stats.score(probe), rtol=1e-6)
    assert loaded.thresholds == calibration.thresholds
    assert loaded.source["x"] == 1


def test_a_version_without_the_file_has_no_calibration_and_a_damaged_file_is_refused(tmp_path):
    assert load_safety_calibration(tmp_path) is None
    (tmp_path / SAFETY_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_safety_calibration(tmp_path)
    (tmp_path / SAFETY_FILE).write_text(json.dumps({"format_version": 1, "thresholds": {}, "novelty": {"mean": [1]}}))
    with pytest.raises(ModelError, match="novelty statistics unreadable"):
        load_safety_calibration(tmp_path)


def test_bad_feature_shapes_are_refused_with_the_shape():
    stats = fit_novelty_stats(np.random.default_rng(3).normal(size=(50, 8)))
    with pytest.raises(ModelError, match=r"shape \[2, 5\].*width 8"):
        stats.score(np.zeros((2, 5)))
    with pytest.raises(ModelError, match="NaN or inf"):
        fit_novelty_stats(np.full((4, 3), np.nan))
