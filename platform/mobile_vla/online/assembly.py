"""Feedback steps -> training episodes: one episode file per finished (robot_id, episode_id), labelled
with the operator's correction where there is one, with per-step loss weights, plus a manifest.

    episodes = group_steps(records)                       # episode key -> {step: last stored copy}
    ready, waiting = ready_episodes(episodes, stale_after_s=3600.0, now=time.time())
    names, summary = write_feedback_dataset(out_dir, ready, FeedbackWeights(), source_root=root)

Steps of one episode may land in several segments (any replica serves any robot): grouping is by
(robot_id, episode_id), ordered by step, keeping the latest-received copy of a retried step.

An episode training could not use (an instruction the model cannot tokenise or with a NUL, a value
beyond float32, a frame over the pixel budget, mismatched state lengths, no decodable frame) is
quarantined: its reason and step metadata go to `<root>/quarantine/episodes/<robot>_<episode>.json`,
the summary lists it, and the job goes on (its records count as consumed, so it never blocks again).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from pydantic import Field
from rich.progress import track

from mobile_vla.config import StrictModel
from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import build_manifest, split_names
from mobile_vla.errors import DataError
from mobile_vla.online.cursor import Cursor
from mobile_vla.online.feedback_record import FrameBudgetError, decode_frame
from mobile_vla.online.wal import QUARANTINE_DIR, StoredRecord, write_durably

log = logging.getLogger(__name__)

Steps = dict[int, StoredRecord]  # step index -> the stored copy used for it
InstructionCheck = Callable[[str], object]  # raises DataError for an instruction the model cannot take
QUARANTINED_EPISODES_DIR = "episodes"  # under the feedback root's quarantine/


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
    skipped_episodes: list[str] = field(default_factory=list)  # "robot/episode: why", one per quarantined one
    quarantined: dict[str, str] = field(default_factory=dict)  # episode key -> why


@dataclass
class AssembleResult:
    """The episode files written, the episodes still waiting, and the cursor to commit once used."""

    out_dir: Path
    episodes: list[str]  # file names written
    waiting: list[str]  # episode keys not finished yet
    cursor: Cursor  # every ready episode consumed (quarantined ones included)
    summary: FeedbackSummary
    quarantine_cursor: Cursor | None = None  # only the quarantined ones consumed (None: none were)


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
    check_instruction: InstructionCheck | None = None,
) -> tuple[list[str], FeedbackSummary]:
    """Writes one episode file per ready episode and, when any was written, the manifest (train/val
    split by `val_fraction`). An episode that fails a check is quarantined instead (module docstring);
    `check_instruction` (e.g. the champion's tokenizer) refuses instructions the model cannot take.
    Returns the file names and a summary.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names, summary = [], FeedbackSummary()
    keys = sorted(ready)
    if progress:
        keys = track(keys, description="assembling feedback episodes", transient=True)
    for key in keys:
        try:
            name = write_feedback_episode(out_dir, key, ready[key], weights, control_hz, summary, check_instruction)
        except DataError as exc:
            quarantine_episode(source_root, key, ready[key], str(exc), summary)
            continue
        names.append(name)
    if names:
        splits = (
            split_names(names, {"train": 1 - val_fraction, "val": val_fraction}) if val_fraction else {"train": names}
        )
        splits = {k: v for k, v in splits.items() if v}
        generator = {"kind": "feedback", "root": str(source_root), "weights": weights.model_dump()}
        build_manifest(out_dir, splits, generator=generator)
    return names, summary


def quarantine_episode(source_root: Path, key: str, steps: Steps, reason: str, summary: FeedbackSummary) -> Path:
    """Records why `key` was not assembled, with each step's meta and where its frame sits, in
    `<root>/quarantine/episodes/` (fsynced); lists it in `summary`. Returns the file written.
    """
    robot_id, episode_id = key.split("/", 1)
    path = source_root / QUARANTINE_DIR / QUARANTINED_EPISODES_DIR / f"{robot_id}_{episode_id}.json"
    entry = {
        "key": key,
        "reason": reason,
        "steps": [
            {"meta": s.meta, "segment": s.segment, "offset": s.offset, "image_bytes": len(s.image)}
            for s in (steps[i] for i in sorted(steps))
        ],
    }
    write_durably(path, json.dumps(entry, indent=1, default=repr).encode("utf-8"))
    log.warning("feedback %s: quarantined (%s)", key, reason)
    summary.skipped_episodes.append(f"{key}: {reason}")
    summary.quarantined[key] = reason
    return path


def _model_version(stored: StoredRecord) -> str | None:
    """The version that drove the step: serving's `model: {name, version}`, or a flat `model_version`."""
    model = stored.meta.get("model")
    version = model.get("version") if isinstance(model, dict) else stored.meta.get("model_version")
    return str(version) if version is not None else None


def _decodable_steps(key: str, ordered: list[StoredRecord], summary: FeedbackSummary):
    """(frames, kept records): steps whose image decodes, every frame uint8 [224, 224, 3].

    Raises:
        FrameBudgetError: a frame over the pixel budget (the episode is quarantined).
    """
    frames, kept = [], []
    for stored in ordered:
        try:
            frame = decode_frame(stored.image)  # [224, 224, 3]
        except FrameBudgetError:
            raise
        except DataError as exc:
            log.warning("feedback %s step %s: undecodable image (%s); step dropped", key, stored.meta["step"], exc)
            summary.dropped_steps += 1
            continue
        frames.append(frame)
        kept.append(stored)
    return frames, kept


def _float32_rows(name: str, rows: list) -> np.ndarray:
    """Rows as float32, refusing what float32 cannot hold (1e39 becomes inf) or what is not a number."""
    try:
        array = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{name}: not a table of numbers") from None
    if not np.isfinite(array).all() or (np.abs(array) > np.finfo(np.float32).max).any():
        raise DataError(f"{name}: values beyond float32 (non-finite or > 3.4e38)")
    return array.astype(np.float32)


def _check_steps(ordered: list[StoredRecord], check_instruction: InstructionCheck | None) -> None:
    """DataError naming the first thing in the episode that training could not use."""
    for stored in ordered:
        meta = stored.meta
        instruction = meta.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip() or "\x00" in instruction:
            raise DataError(f"step {meta.get('step')}: instruction {str(instruction)[:60]!r}: empty or has a NUL")
        if check_instruction is not None:
            check_instruction(instruction)  # DataError: e.g. more tokens than the model takes
        for name in ("state", "action_executed", "action_corrected"):
            value = meta.get(name)
            if value is not None and not isinstance(value, list):
                raise DataError(f"step {meta.get('step')}: {name} = {value!r}: expected a list of numbers")
            if value is not None:
                _float32_rows(f"step {meta.get('step')}: {name}", [value])


def write_feedback_episode(
    out_dir: Path,
    key: str,
    steps: Steps,
    weights: FeedbackWeights,
    control_hz: float,
    summary: FeedbackSummary,
    check_instruction: InstructionCheck | None = None,
) -> str:
    """Writes `fb_<robot>_<episode>.h5` (standard keys plus weight, intervention, corrected,
    action_executed, step) and counts it in `summary`. Returns its name.

    Raises:
        DataError: the episode cannot be used (the caller quarantines it); nothing was written.
    """
    ordered = [steps[i] for i in sorted(steps)]
    _check_steps(ordered, check_instruction)
    success = next((s.meta["success"] for s in reversed(ordered) if s.meta.get("success") is not None), None)
    frames, kept = _decodable_steps(key, ordered, summary)
    state_dims = {len(s.meta["state"]) for s in kept}
    if not kept:
        raise DataError("no decodable frames")
    if len(state_dims) > 1:
        raise DataError(f"state lengths differ between steps: {sorted(state_dims)}")

    executed = _float32_rows("action_executed", [s.meta["action_executed"] for s in kept])  # [T, 3]
    corrected = np.array([s.meta.get("action_corrected") is not None for s in kept])  # [T]
    intervention = np.array([bool(s.meta.get("intervention")) for s in kept])  # [T]
    labels = _float32_rows(
        "actions",
        [
            s.meta["action_corrected"] if s.meta.get("action_corrected") is not None else s.meta["action_executed"]
            for s in kept
        ],
    )  # [T, 3]
    base = {True: weights.success, False: weights.failure, None: weights.unknown_outcome}[success]
    step_weight = np.where(corrected | intervention, weights.corrected, base).astype(np.float32)  # [T]
    state = _float32_rows("state", [s.meta["state"] for s in kept]) if state_dims != {0} else None  # [T, S]
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
    try:
        write_episode(tmp, Episode(np.stack(frames), labels, state, attrs))  # images [T, H, W, 3]
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
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
