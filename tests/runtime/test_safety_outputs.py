"""The served backends give the safety ladder's inputs (confidence_now, novelty) from the version's own
statistics, in real ONNX Runtime and in PyTorch alike; older versions still serve, with novelty off."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mobile_vla.export.parity import parity_frames
from mobile_vla.policy.novelty import SAFETY_FILE
from mobile_vla.runtime.backends import load_backend
from mobile_vla.train.safety_calibration import calibrate_on_frames
from tests.legacy_artifacts import downgrade_to_signature_v1

INSTRUCTION = "go to the red box"


@pytest.fixture(scope="module")
def calibrated_dir(exported_dir, tmp_path_factory):
    """The tiny export plus novelty statistics of 64 MiniWorld frames, thresholds from 32 more (other rooms)."""
    target = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(exported_dir, target)
    calibrate_on_frames(target / "policy", parity_frames(64, seed=21).images, parity_frames(32, seed=31).images)
    return target


def _predict(backend, images):
    state = np.zeros((len(images), 3), np.float32)
    return backend.predict(images, state, [INSTRUCTION] * len(images))


def test_onnx_runtime_and_torch_give_the_same_safety_inputs(calibrated_dir, real_frames):
    images = real_frames[:4]
    onnx_backend = load_backend(calibrated_dir, prefer=("onnx-cpu",))
    torch_backend = load_backend(calibrated_dir, prefer=("torch",))
    onnx_out, torch_out = _predict(onnx_backend, images), _predict(torch_backend, images)
    assert onnx_backend.describe()["novelty"] is True and torch_backend.describe()["novelty"] is True
    assert onnx_out.confidence_now.shape == onnx_out.novelty.shape == (4,)
    assert np.abs(onnx_out.confidence_now - torch_out.confidence_now).max() <= 1e-4
    np.testing.assert_allclose(onnx_out.novelty, torch_out.novelty, rtol=1e-3)
    assert ((onnx_out.confidence_now >= 0) & (onnx_out.confidence_now <= 1)).all()


def test_blank_and_covered_frames_score_higher_novelty_than_scene_frames(calibrated_dir, real_frames):
    """Random-init tiny model (module fixture): the statistics come from MiniWorld frames, the probes are
    held-out MiniWorld frames (another render seed) against a black, a white and a flat grey frame."""
    backend = load_backend(calibrated_dir, prefer=("onnx-cpu",))
    scene = _predict(backend, real_frames).novelty  # [32] in distribution
    blank = np.stack([np.full((224, 224, 3), v, np.uint8) for v in (0, 255, 128)])
    odd = _predict(backend, blank).novelty
    threshold = backend.safety.thresholds.novelty_slow
    assert (odd > threshold).all(), (odd, threshold)
    assert np.mean(scene > threshold) <= 0.25, (scene, threshold)
    assert odd.min() > np.percentile(scene, 90)


def test_a_signature_version_1_export_still_serves_with_novelty_off(calibrated_dir, tmp_path, real_frames):
    old = downgrade_to_signature_v1(shutil.copytree(calibrated_dir, tmp_path / "old"))
    backend = load_backend(old, prefer=("onnx-cpu",))
    out = _predict(backend, real_frames[:2])
    assert out.actions.shape == (2, 10, 3) and np.isfinite(out.actions).all()
    assert out.novelty is None and out.confidence_now is None
    assert backend.safety is None
    assert "signature_version 1" in backend.describe()["novelty_note"]


def test_a_version_saved_without_statistics_serves_with_novelty_off(exported_dir, real_frames):
    assert not (exported_dir / "policy" / SAFETY_FILE).exists()
    backend = load_backend(exported_dir, prefer=("onnx-cpu",))
    out = _predict(backend, real_frames[:2])
    assert out.novelty is None and out.confidence_now is not None
    assert SAFETY_FILE in backend.safety_note
