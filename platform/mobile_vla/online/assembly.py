"""Feedback steps -> training episodes: one episode file per finished (robot_id, episode_id), labelled
with the operator's correction where there is one, with per-step loss weights, plus a manifest.

    episodes = group_steps(records)                       # episode key -> {step: last stored copy}
    ready, waiting = ready_episodes(episodes, stale_after_s=3600.0, now=time.time())
    names, summary = write_feedback_dataset(out_dir, ready, FeedbackWeights(), source_root=root)

Steps of one episode may land in several segments (any replica serves any robot): grouping is by
(robot_id, episode_id), ordered by step, keeping the latest-received copy of a retried step.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from pydantic import Field
from rich.progress import track

from mobile_vla.config import StrictModel
from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import build_manifest, split_names
from mobile_vla.online.cursor import Cursor
from mobile_vla.online.wal import StoredRecord

log = logging.getLogger(__name__)

Steps = dict[int, StoredRecord]  # step index -> the stored copy used for it


class FeedbackWeights(StrictModel):
    """Per-step loss weights. Uncorrected steps of failed episodes get 0 by default: imitating what
    led to a failure teaches the failure; those frames still serve as history for the steps after.
    """

    corrected: float = Field(4.0, ge=0)  # operator gave action_corrected, or took over (intervention)
    success: float = Field(1.0, ge=0)  # uncorrected steps of successful episodes
    unknown_outcome: float = Field(0.5, ge=0)  # uncorrected steps, success not reported
    failure: float = Field(0.0, ge=0)  # uncorrected steps of failed episodes


@dataclass
class FeedbackSummary:
    """What one assembly wrote: episodes, steps, corrections, and what it had to drop or skip."""

    episodes: int = 0
    steps: int = 0
    corrected_steps: int = 0
    intervention_steps: int = 0
    dropped_steps: int = 0  # undecodable images (should have been refused at the API)
    skipped_episodes: list[str] = field(default_factory=list)


@dataclass
class AssembleResult:
    """The episode files written, the episodes still waiting, and the cursor to commit once used."""

    out_dir: Path
    episodes: list[str]  # file names written
    waiting: list[str]  # episode keys not finished yet
    cursor: Cursor
    summary: FeedbackSummary


def group_steps(records: Iterable[StoredRecord]) -> dict[str, Steps]:
    """Episode key -> {step: latest-received stored copy} (a retry may sit in another replica's segment)."""
    episodes: dict[str, Steps] = {}
    for stored in records:
        steps = episodes.setdefault(stored.episode_key, {})
        step = int(stored.meta["step"])
        earlier = steps.get(step)
        if earlier is None or float(stored.meta["received_at"]) >= float(earlier.meta["received_at"]):
            steps[step] = stored
    return episodes


def is_finished(steps: Steps) -> bool:
    """Whether the robot reported the episode's end (`episode_done` on any step)."""
    return any(s.meta.get("episode_done") for s in steps.values())


def ready_episodes(
    episodes: dict[str, Steps], stale_after_s: float | None, now: float
) -> tuple[dict[str, Steps], list[str]]:
    """(episodes to assemble, keys still waiting): finished ones, and unfinished ones whose last step is
    older than `stale_after_s` (None: unfinished episodes always wait).
    """
    ready, waiting = {}, []
    for key, steps in episodes.items():
        last_seen = max(float(s.meta.get("received_at", 0.0)) for s in steps.values())
        stale = stale_after_s is not None and now - last_seen > stale_after_s
        if is_finished(steps) or stale:
            ready[key] = steps
        else:
            waiting.append(key)
    return ready, waiting


def write_feedback_dataset(
    out_dir: Path,
    ready: dict[str, Steps],
    weights: FeedbackWeights,
    *,
    source_root: Path,
    control_hz: float = 5.0,
    val_fraction: float = 0.0,
    progress: bool = False,
) -> tuple[list[str], FeedbackSummary]:
    """Writes one episode file per ready episode and, when any was written, the manifest (train/val
    split by `val_fraction`). Returns the file names and a summary.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names, summary = [], FeedbackSummary()
    keys = sorted(ready)
    if progress:
        keys = track(keys, description="assembling feedback episodes", transient=True)
    for key in keys:
        name = write_feedback_episode(out_dir, key, ready[key], weights, control_hz, summary)
        if name:
            names.append(name)
    if names:
        splits = (
            split_names(names, {"train": 1 - val_fraction, "val": val_fraction}) if val_fraction else {"train": names}
        )
        splits = {k: v for k, v in splits.items() if v}
        generator = {"kind": "feedback", "root": str(source_root), "weights": weights.model_dump()}
        build_manifest(out_dir, splits, generator=generator)
    return names, summary


def _decode_image(data: bytes, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H, W, 3]; resized to `size` (H, W) when given and different."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)  # [H, W, 3]


def _model_version(stored: StoredRecord) -> str | None:
    """The version that drove the step: serving's `model: {name, version}`, or a flat `model_version`."""
    model = stored.meta.get("model")
    version = model.get("version") if isinstance(model, dict) else stored.meta.get("model_version")
    return str(version) if version is not None else None


def _decodable_steps(key: str, ordered: list[StoredRecord], summary: FeedbackSummary):
    """(frames, kept records): steps whose image decodes, every frame at the first frame's size."""
    frames, kept = [], []
    size = None
    for stored in ordered:
        try:
            frame = _decode_image(stored.image, size)
        except Exception as exc:  # PIL raises many kinds for bad bytes
            log.warning("feedback %s step %s: undecodable image (%s); step dropped", key, stored.meta["step"], exc)
            summary.dropped_steps += 1
            continue
        size = size or frame.shape[:2]
        frames.append(frame)
        kept.append(stored)
    return frames, kept


def write_feedback_episode(
    out_dir: Path,
    key: str,
    steps: Steps,
    weights: FeedbackWeights,
    control_hz: float,
    summary: FeedbackSummary,
) -> str | None:
    """Writes `fb_<robot>_<episode>.h5` (standard keys plus weight, intervention, corrected,
    action_executed, step) and counts it in `summary`. Returns its name, or None when skipped.
    """
    ordered = [steps[i] for i in sorted(steps)]
    success = next((s.meta["success"] for s in reversed(ordered) if s.meta.get("success") is not None), None)
    frames, kept = _decodable_steps(key, ordered, summary)
    state_dims = {len(s.meta["state"]) for s in kept}
    if not kept or len(state_dims) > 1:
        why = "no decodable frames" if not kept else f"state lengths differ between steps: {sorted(state_dims)}"
        log.warning("feedback %s: skipped (%s)", key, why)
        summary.skipped_episodes.append(f"{key}: {why}")
        return None

    executed = np.array([s.meta["action_executed"] for s in kept], dtype=np.float32)  # [T, 3]
    corrected = np.array([s.meta.get("action_corrected") is not None for s in kept])  # [T]
    intervention = np.array([bool(s.meta.get("intervention")) for s in kept])  # [T]
    labels = np.array(
        [
            s.meta["action_corrected"] if s.meta.get("action_corrected") is not None else s.meta["action_executed"]
            for s in kept
        ],
        dtype=np.float32,
    )  # [T, 3]
    base = {True: weights.success, False: weights.failure, None: weights.unknown_outcome}[success]
    step_weight = np.where(corrected | intervention, weights.corrected, base).astype(np.float32)  # [T]
    state = np.array([s.meta["state"] for s in kept], dtype=np.float32) if state_dims != {0} else None  # [T, S]
    robot_id, episode_id = key.split("/", 1)
    step_ids = [int(s.meta["step"]) for s in kept]
    attrs = {
        "instruction": kept[0].meta["instruction"],
        "episode_id": f"feedback-{robot_id}-{episode_id}",
        "source": "feedback",
        "success": bool(success),
        "success_reported": success is not None,
        "control_hz": float(control_hz),
        "schema_version": SCHEMA_VERSION,
        "robot_id": robot_id,
        "feedback_episode_id": episode_id,
        "finished": any(s.meta.get("episode_done") for s in kept),
        "missing_steps": int(step_ids[-1] - step_ids[0] + 1 - len(step_ids)),
        "corrected_steps": int(corrected.sum()),
        "intervention_steps": int(intervention.sum()),
        "model_versions": json.dumps(sorted({v for v in map(_model_version, kept) if v})),
    }
    name = f"fb_{robot_id}_{episode_id}.h5"
    tmp = out_dir / f".{name}.assembling.h5"
    # write_episode validates and writes the standard keys; the feedback arrays are added before the
    # file gets its real name, so a crash never leaves an episode without its weights.
    write_episode(tmp, Episode(np.stack(frames), labels, state, attrs))  # images [T, H, W, 3]
    with h5py.File(tmp, "a") as f:
        f.create_dataset("weight", data=step_weight)
        f.create_dataset("intervention", data=intervention.astype(np.uint8))
        f.create_dataset("corrected", data=corrected.astype(np.uint8))
        f.create_dataset("action_executed", data=executed)
        f.create_dataset("step", data=np.array(step_ids, dtype=np.int64))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out_dir / name)
    summary.episodes += 1
    summary.steps += len(kept)
    summary.corrected_steps += int(corrected.sum())
    summary.intervention_steps += int(intervention.sum())
    return name
