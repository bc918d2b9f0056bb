"""The safety ladder's training-time half: novelty statistics of the training frames and thresholds
calibrated on the validation split, written into the model version's `policy/` folder.

    calibration = calibrate_policy_dir(model_dir / "policy", data_dir, "train", "val")

Each split is read as non-overlapping windows (stride W, no augmentation) and run through the policy
the way serving runs it: one `step_with_safety` per frame, from a fresh memory at the window's start,
so the executed step's confidence is the one a robot would get. Padding frames are left out. At most
`max_windows` windows per split (evenly spread) keep this to seconds on the tiny preset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mobile_vla.policy.checkpoint import load_policy
from mobile_vla.policy.novelty import DEFAULT_RANK, SafetyCalibration, fit_novelty_stats
from mobile_vla.policy.text import TOKEN_KEYS
from mobile_vla.train.windows import WindowDataset

log = logging.getLogger(__name__)

DEFAULT_MAX_WINDOWS = 256
BATCH_WINDOWS = 16


def split_safety_inputs(
    model, preprocessing, data_dir: str | Path, split: str, max_windows: int = DEFAULT_MAX_WINDOWS
) -> tuple[np.ndarray, np.ndarray]:
    """(vision features [N, F], the executed step's confidence [N]) of the split's real frames."""
    dataset = WindowDataset(data_dir, split, preprocessing, augment=False, stride=preprocessing.window)
    count = len(dataset)
    ids = np.unique(np.linspace(0, count - 1, min(count, max_windows)).astype(int))
    features, confidences = [], []
    for first in range(0, len(ids), BATCH_WINDOWS):
        samples = [dataset[int(i)] for i in ids[first : first + BATCH_WINDOWS]]
        batch = {key: np.stack([s[key] for s in samples]) for key in ("images", "state", "frame_mask", *TOKEN_KEYS)}
        vision, confidence = _window_steps(model, batch)  # [B, T, F], [B, T]
        keep = batch["frame_mask"] > 0  # [B, T]
        features.append(vision[keep])
        confidences.append(confidence[keep])
    return np.concatenate(features), np.concatenate(confidences)


def _window_steps(model, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    # images [B, T, H, W, C], state [B, T, S], tokens [B, L] -> vision [B, T, F], confidence_now [B, T]
    images = torch.from_numpy(batch["images"])
    state = torch.from_numpy(batch["state"])
    tokens = {key: torch.from_numpy(batch[key]) for key in TOKEN_KEYS}
    memory, vision, confidence = None, [], []
    with torch.inference_mode():
        clip_text = model.encode_instruction(tokens["clip_input_ids"])
        for t in range(images.shape[1]):
            out = model.step_with_safety(images[:, t], state[:, t], tokens, memory, clip_text)
            memory = out.memory
            vision.append(out.vision_features.float())
            confidence.append(out.confidence_now.float())
    return torch.stack(vision, dim=1).numpy(), torch.stack(confidence, dim=1).numpy()


def frame_safety_inputs(model, preprocessing, frames: np.ndarray, instruction: str) -> tuple[np.ndarray, np.ndarray]:
    """(vision features [N, F], confidence_now [N]) of single frames uint8 [N, H, W, 3], each from a fresh
    memory with zero state (episode starts): for frames with no episode around them (sample models, tests).
    """
    tokens = preprocessing.tokenize([instruction])
    features, confidences = [], []
    with torch.inference_mode():
        for first in range(0, len(frames), BATCH_WINDOWS):
            images = torch.from_numpy(np.ascontiguousarray(frames[first : first + BATCH_WINDOWS]))  # [B, H, W, 3]
            batch = images.shape[0]
            rows = {key: torch.from_numpy(np.repeat(tokens[key], batch, axis=0)) for key in TOKEN_KEYS}
            out = model.step_with_safety(images, torch.zeros(batch, preprocessing.state_dim), rows)
            features.append(out.vision_features.float().numpy())
            confidences.append(out.confidence_now.float().numpy())
    return np.concatenate(features), np.concatenate(confidences)


def calibrate_on_frames(
    policy_dir: str | Path,
    train_frames: np.ndarray,
    val_frames: np.ndarray,
    instruction: str = "go to the red box",
    source: dict | None = None,
    rank: int = DEFAULT_RANK,
) -> SafetyCalibration:
    """`calibrate_policy_dir` on loose frames (`frame_safety_inputs`) instead of a dataset's splits."""
    model, preprocessing = load_policy(policy_dir)
    model = model.float().eval()
    train_features, _ = frame_safety_inputs(model, preprocessing, train_frames, instruction)
    val_features, val_confidence = frame_safety_inputs(model, preprocessing, val_frames, instruction)
    calibration = SafetyCalibration.calibrate(
        fit_novelty_stats(train_features, rank=rank), val_features, val_confidence, source=source
    )
    calibration.save(policy_dir)
    return calibration


def calibrate_policy_dir(
    policy_dir: str | Path,
    data_dir: str | Path,
    train_split: str,
    val_split: str,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    rank: int = DEFAULT_RANK,
) -> SafetyCalibration:
    """Fits the novelty statistics on `train_split`, calibrates thresholds on `val_split`, and saves
    them as `policy_dir/safety_calibration.json` (the model version then serves with novelty on).
    """
    model, preprocessing = load_policy(policy_dir)
    model = model.float().eval()
    train_features, _ = split_safety_inputs(model, preprocessing, data_dir, train_split, max_windows)
    val_features, val_confidence = split_safety_inputs(model, preprocessing, data_dir, val_split, max_windows)
    stats = fit_novelty_stats(train_features, rank=rank)
    calibration = SafetyCalibration.calibrate(
        stats,
        val_features,
        val_confidence,
        source={"data": str(data_dir), "train_split": train_split, "val_split": val_split},
    )
    calibration.save(policy_dir)
    log.info("safety calibration: %s", calibration.thresholds)
    return calibration
