"""Training-time safety calibration on a generated MiniWorld dataset: statistics of the train split,
thresholds from the val split, saved in the version's policy/ folder and scored on held-out splits.

The model is the tiny preset with random weights (a trained one would take minutes here): its novelty
separates blank frames through the pixel-layout part of the vision feature. It does NOT separate the
visual-shift split: seen here (2026-12-07), the one visual_shift episode's median novelty was 0.54
against 0.99 for val, so the split's share over the threshold is printed, not asserted. Whether a
trained model separates it is the benchmark's question (benchmarks/safe_stop.py), not this test's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobile_vla.data.manifest import load_manifest
from mobile_vla.policy import load_policy
from mobile_vla.policy.novelty import SAFETY_FILE, load_safety_calibration
from mobile_vla.train.safety_calibration import calibrate_policy_dir, frame_safety_inputs, split_safety_inputs

pytestmark = pytest.mark.slow  # the session's generated dataset (Ray) plus a few hundred tiny model steps


def test_calibration_is_saved_with_the_version_and_flags_blank_and_shifted_frames(
    tiny_dataset, make_policy_dir, tmp_path
):
    root = make_policy_dir(tmp_path)
    calibration = calibrate_policy_dir(root / "policy", tiny_dataset, "train", "val")
    saved = json.loads((root / "policy" / SAFETY_FILE).read_text())
    assert saved["source"]["train_split"] == "train" and saved["source"]["val_split"] == "val"
    assert saved["source"]["train_frames"] > 100 and saved["source"]["val_frames"] > 20
    loaded = load_safety_calibration(root / "policy")
    assert loaded.thresholds == calibration.thresholds
    t = calibration.thresholds
    assert 0 < t.novelty_slow < t.novelty_stop and 0 < t.confidence_stop < t.confidence_slow <= 1

    model, preprocessing = load_policy(root)
    score = calibration.stats.score
    val, _ = split_safety_inputs(model, preprocessing, tiny_dataset, "val")
    shift, _ = split_safety_inputs(model, preprocessing, tiny_dataset, "visual_shift")
    blank, _ = frame_safety_inputs(
        model, preprocessing, np.stack([np.full((224, 224, 3), v, np.uint8) for v in (0, 255)]), "go to the red box"
    )
    assert np.mean(score(val) > t.novelty_slow) <= 0.02  # the 99th percentile of val, by construction
    assert (score(blank) > t.novelty_slow).all()
    print(
        f"novelty_slow {t.novelty_slow:.2f}; val median {np.median(score(val)):.2f}; visual_shift median "
        f"{np.median(score(shift)):.2f}, share over novelty_slow {np.mean(score(shift) > t.novelty_slow):.2f}; "
        f"blank {score(blank).round(2).tolist()}; splits {sorted(load_manifest(tiny_dataset)['splits'])}"
    )
