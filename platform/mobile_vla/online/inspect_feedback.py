"""What `mobile-vla data inspect` shows about fleet feedback: a raw store (its write-ahead log) and an
assembled feedback dataset (episode files with per-step weights).

    describe_feedback("$MOBILE_VLA_HOME/feedback")          # volume, robots, torn tails, new since last update
    describe_feedback_dataset("data/feedback-7", manifest)   # corrections and the loss weight they carry
"""

from __future__ import annotations

from pathlib import Path

import h5py

from mobile_vla.errors import DataError
from mobile_vla.online.assembly import group_steps, is_finished
from mobile_vla.online.cursor import load_cursor, unconsumed_records
from mobile_vla.online.wal import SEGMENTS_DIR, SegmentScan, scan_segment, segment_paths


def _success_rate(outcomes: list[bool | None]) -> float | None:
    """Share of reported successes among the episodes that reported an outcome (None: none did)."""
    reported = [o for o in outcomes if o is not None]
    return sum(reported) / len(reported) if reported else None


def _damage(scans: list[SegmentScan]) -> list[dict]:
    """Corrupt frames skipped mid-segment and torn tails, each with its segment, byte and problem."""
    found = []
    for scan in scans:
        found += [{"segment": scan.name, "at_byte": start, "problem": why} for start, _, why in scan.skipped]
        if scan.problem:
            found.append({"segment": scan.name, "at_byte": scan.valid_end, "problem": scan.problem})
    return found


def describe_feedback(root: str | Path) -> dict:
    """Volume, robots, episodes, corrections, torn tails, and how much is new since the last online update.

    Raises:
        DataError: `root` has no segments/ folder.
    """
    root = Path(root).expanduser()
    if not (root / SEGMENTS_DIR).is_dir():
        raise DataError(f"{root}: no feedback segments/ folder (is this a feedback root?)")
    segments = segment_paths(root / SEGMENTS_DIR)  # read only: a live writer's segments are not repaired
    scans = [scan_segment(path) for path in segments]
    cursor = load_cursor(root)
    episodes = group_steps(unconsumed_records(segments))
    new_keys = set(group_steps(unconsumed_records(segments, cursor)))
    finished = [steps for steps in episodes.values() if is_finished(steps)]
    outcomes = [
        next((s.meta["success"] for s in steps.values() if s.meta.get("success") is not None), None)
        for steps in finished
    ]
    steps = [s for v in episodes.values() for s in v.values()]
    return {
        "root": str(root.resolve()),
        "segments": len(scans),
        "bytes": sum(s.size for s in scans),
        "records": sum(s.records for s in scans),
        "unique_steps": len(steps),
        "torn_or_corrupt": _damage(scans),
        "robots": len({k.split("/", 1)[0] for k in episodes}),
        "episodes": len(episodes),
        "finished_episodes": len(finished),
        "success_rate": _success_rate(outcomes),
        "corrected_steps": sum(s.meta.get("action_corrected") is not None for s in steps),
        "intervention_steps": sum(bool(s.meta.get("intervention")) for s in steps),
        "new_episodes_since_last_update": len(new_keys),
        "updates": len(cursor.history),
        "last_record_time": max((float(s.meta.get("received_at", 0)) for s in steps), default=None),
    }


def describe_feedback_dataset(folder: str | Path, manifest: dict) -> dict:
    """For an assembled feedback dataset (manifest generator kind 'feedback'): robots, corrections,
    interventions and the loss weight they carry, read without loading frames.
    """
    totals = {
        "episodes": 0,
        "steps": 0,
        "corrected_steps": 0,
        "intervention_steps": 0,
        "weight_sum": 0.0,
        "zero_weight_steps": 0,
        "successes": 0,
    }
    robots = set()
    for name in manifest.get("episodes", {}):
        with h5py.File(Path(folder) / name, "r") as f:
            weight = f["weight"][()] if "weight" in f else None
            totals["episodes"] += 1
            totals["steps"] += int(f["actions"].shape[0])
            totals["corrected_steps"] += int(f["corrected"][()].sum()) if "corrected" in f else 0
            totals["intervention_steps"] += int(f["intervention"][()].sum()) if "intervention" in f else 0
            totals["weight_sum"] += float(weight.sum()) if weight is not None else 0.0
            totals["zero_weight_steps"] += int((weight == 0).sum()) if weight is not None else 0
            totals["successes"] += int(bool(f.attrs.get("success", False)))
            robots.add(str(f.attrs.get("robot_id", "?")))
    totals["robots"] = len(robots)
    return totals
