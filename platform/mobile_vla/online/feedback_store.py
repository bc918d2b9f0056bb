"""Durable fleet feedback: a write-ahead log of /v1/feedback steps, assembled into episodes for training.

    store = FeedbackStore("$MOBILE_VLA_HOME/feedback")
    store.append(record)                      # durable when it returns: the API may answer 202
    result = store.assemble_episodes("data/feedback-7")   # complete episodes -> episode files + manifest
    store.commit_cursor(result.cursor)        # once the update that used them has finished
    store.retire(keep_consumed_s=0)           # delete segments the committed cursor has passed

Layout under root:
    segments/<host>-<pid>-<tag>-<seq>.wal   one append-only file per writer process (never shared)
    cursor.json                              what earlier updates already consumed (the watermark)
    quarantine/*.torn                        torn tails cut off dead writers' segments, kept for forensics
    quarantine/episodes/*.json               episodes assembly refused (why, and each step's meta)

Disk use: unconsumed records, plus each live writer's open segment (at most `segment_max_bytes`),
plus consumed segments younger than `keep_consumed_s`. A full disk answers `StorageFullError`
(the API's 507) and leaves nothing behind.

This is the face; each job has its own module: `feedback_record` (checking a step), `wal` (framing,
segments, group-committed fsyncs, torn-tail repair), `cursor` (the watermark), `assembly` (episode
files with corrected labels and weights), `inspect_feedback` (what `data inspect` shows).

Why per-writer segments: Serve replicas are separate processes; one file per writer needs no
cross-process locking on the hot path, and a crash can only tear the file of the writer that crashed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mobile_vla.config import platform_home
from mobile_vla.online.assembly import (
    AssembleResult,
    FeedbackWeights,
    InstructionCheck,
    Steps,
    group_steps,
    ready_episodes,
    write_feedback_dataset,
)
from mobile_vla.online.cursor import Cursor, advance_cursor, commit_cursor, load_cursor, unconsumed_records
from mobile_vla.online.feedback_record import normalise_record
from mobile_vla.online.inspect_feedback import describe_feedback
from mobile_vla.online.wal import (
    QUARANTINE_DIR,
    SEGMENTS_DIR,
    SegmentScan,
    SegmentWriter,
    StorageFullError,
    StoredRecord,
    encode_frame,
    repair_segments,
    retire_segments,
    scan_segment,
    segment_paths,
)

# Also importable from here: the weights and result of assembly, `describe_feedback` (data inspect),
# and the error a full disk raises (the API maps it to 507).
__all__ = [
    "AssembleResult",
    "Cursor",
    "FeedbackStore",
    "FeedbackWeights",
    "StorageFullError",
    "describe_feedback",
    "feedback_root",
]

DEFAULT_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
FEEDBACK_DIR_ENV = "MOBILE_VLA_FEEDBACK_DIR"  # a cluster sets it once, to its shared storage (clusters/gpu.yaml)


def feedback_root(explicit: str | Path | None = None) -> Path:
    """Where fleet feedback lives, for serving, `collect` and the online update alike: `explicit` when
    given, else `$MOBILE_VLA_FEEDBACK_DIR`, else `$MOBILE_VLA_HOME/feedback`. Absolute.
    """
    chosen = explicit or os.environ.get(FEEDBACK_DIR_ENV)
    return Path(chosen).expanduser().resolve() if chosen else platform_home() / "feedback"


class FeedbackStore:
    """Satisfies `mobile_vla.serve.feedback_sink.FeedbackSink`: `append(record)` returns once durable.

    Thread-safe within a process; one instance per process (each owns its own segment files). Opening
    a store repairs the torn tails of dead writers' segments unless `repair` is false (reading only
    each segment's last frame: a start does not re-read the log).
    """

    def __init__(
        self, root: str | Path, segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES, repair: bool = True
    ) -> None:
        self.root = Path(root).expanduser()
        self.segments_dir = self.root / SEGMENTS_DIR
        self._writer = SegmentWriter(self.root, self.segments_dir, segment_max_bytes)
        if repair and self.segments_dir.is_dir():
            self.repair()

    # -- appending ------------------------------------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> None:
        """Stores one step; returns only when it is fsynced.

        Raises:
            DataError: a bad record (the message names the field).
            StorageFullError: the disk or quota is full (nothing stored; retry once space is freed).
            OSError: the disk refused otherwise (then nothing is acknowledged).
        """
        meta, image = normalise_record(record)
        self._writer.append(encode_frame(meta, image))

    def close(self) -> None:
        """Syncs to disk and closes this process's open segment."""
        self._writer.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- recovery and reading -------------------------------------------------------------------------
    def segment_paths(self) -> list[Path]:
        """Every segment file of every writer, in name order."""
        return segment_paths(self.segments_dir)

    def repair(self) -> list[SegmentScan]:
        """Cuts torn tails off dead writers' segments into quarantine/; returns what was cut."""
        return repair_segments(self.segments_dir, self.root / QUARANTINE_DIR)

    def scan(self) -> list[SegmentScan]:
        """Per segment: size, valid bytes, records, and why reading stopped early (if it did)."""
        return [scan_segment(path) for path in self.segment_paths()]

    def replay(self, cursor: Cursor | None = None) -> Iterator[StoredRecord]:
        """Every valid record (after `cursor`'s watermark when given), segment by segment."""
        return unconsumed_records(self.segment_paths(), cursor)

    # -- the watermark --------------------------------------------------------------------------------
    def load_cursor(self) -> Cursor:
        """The committed watermark (empty when no update has committed yet)."""
        return load_cursor(self.root)

    def commit_cursor(self, cursor: Cursor, note: dict | None = None) -> None:
        """Atomically records that the episodes behind `cursor` were used; `note` goes to its history."""
        commit_cursor(self.root, cursor, note)

    def advance_cursor(self, cursor: Cursor, keys: set[str]) -> Cursor:
        """The watermark once the episodes `keys` are consumed too (commit it with `commit_cursor`)."""
        return advance_cursor(self.segment_paths(), cursor, keys)

    def retire(self, keep_consumed_s: float = 0.0) -> list[str]:
        """Deletes closed segments the committed cursor has passed whose last write is older than
        `keep_consumed_s`; returns their names. Segments of live writers are kept.
        """
        return retire_segments(self.segments_dir, self.load_cursor().offsets, keep_consumed_s)

    # -- assembly -------------------------------------------------------------------------------------
    def pending_episodes(self, cursor: Cursor | None = None) -> dict[str, Steps]:
        """Episode key -> {step: last stored copy}, for records not consumed by an earlier update."""
        return group_steps(self.replay(cursor))

    def assemble_episodes(
        self,
        out_dir: str | Path,
        weights: FeedbackWeights | None = None,
        since_last_update: bool = True,
        stale_after_s: float | None = 3600.0,
        control_hz: float = 5.0,
        val_fraction: float = 0.0,
        progress: bool = False,
        check_instruction: InstructionCheck | None = None,
    ) -> AssembleResult:
        """Writes one episode file per finished (robot_id, episode_id), labelled with the operator's
        correction where there is one, plus per-step `weight`, `intervention`, `corrected` and
        `action_executed` arrays, and a manifest. Unfinished episodes wait unless their last step is
        older than `stale_after_s`. Episodes training could not use are quarantined (listed in the
        summary; `check_instruction` refuses instructions the model cannot take). Returns the cursor
        to commit once the files have been used, and one that consumes only the quarantined episodes.
        """
        weights = weights or FeedbackWeights()
        cursor = self.load_cursor() if since_last_update else Cursor()
        ready, waiting = ready_episodes(self.pending_episodes(cursor), stale_after_s, time.time())
        out_dir = Path(out_dir)
        names, summary = write_feedback_dataset(
            out_dir,
            ready,
            weights,
            source_root=self.root,
            control_hz=control_hz,
            val_fraction=val_fraction,
            progress=progress,
            check_instruction=check_instruction,
        )
        segments = self.segment_paths()
        new_cursor = advance_cursor(segments, cursor, set(ready))
        quarantine_cursor = advance_cursor(segments, cursor, set(summary.quarantined)) if summary.quarantined else None
        return AssembleResult(out_dir, names, waiting, new_cursor, summary, quarantine_cursor)
