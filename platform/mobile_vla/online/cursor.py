"""The feedback watermark: what earlier online updates already consumed, kept in `<root>/cursor.json`.

    cursor = load_cursor(root)
    records = unconsumed_records(segment_paths(segments_dir), cursor)   # what is new since then
    cursor = advance_cursor(segment_paths(segments_dir), cursor, {"robot-1/ep-7"})
    commit_cursor(root, cursor, {"challenger": "12"})     # once the update that used them has finished

Steps of different episodes interleave in a segment, so the watermark is two things: per segment, the
byte offset before which every record belongs to a consumed episode; plus the consumed episodes that
still have records after those offsets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mobile_vla.errors import DataError
from mobile_vla.online.wal import StoredRecord, fsync_dir, make_dirs, read_segment

CURSOR_NAME = "cursor.json"
HISTORY_KEPT = 100  # updates remembered in cursor.json's history


@dataclass
class Cursor:
    """Per segment, the byte offset before which every record belongs to a consumed episode; plus the
    consumed episodes that still have records after those offsets (steps interleave across episodes).
    """

    offsets: dict[str, int] = field(default_factory=dict)
    consumed: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def load_cursor(root: Path) -> Cursor:
    """The committed watermark under `root` (an empty one when none was committed yet).

    Raises:
        DataError: cursor.json exists but cannot be read.
    """
    path = root / CURSOR_NAME
    if not path.is_file():
        return Cursor()
    try:
        data = json.loads(path.read_text())
        return Cursor(
            offsets=dict(data["offsets"]), consumed=list(data["consumed"]), history=list(data.get("history", []))
        )
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable feedback cursor ({exc}); fix or remove it to reprocess all") from None


def commit_cursor(root: Path, cursor: Cursor, note: dict | None = None) -> None:
    """Atomically records that the episodes behind `cursor` were used (tmp + fsync + rename).

    Args:
        root: the feedback root.
        cursor: the watermark to commit (from `advance_cursor`).
        note: what the update did (version, decision, ...), appended to the history with the time.
    """
    path = root / CURSOR_NAME
    history = (cursor.history + [{"time": time.time(), **(note or {})}])[-HISTORY_KEPT:]
    data = {"offsets": cursor.offsets, "consumed": cursor.consumed, "history": history}
    tmp = path.with_name(f".{CURSOR_NAME}.{os.getpid()}.tmp")
    make_dirs(root)
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(root)


def unconsumed_records(segments: list[Path], cursor: Cursor | None = None) -> Iterator[StoredRecord]:
    """Every valid record of `segments` (after `cursor`'s watermark when given), segment by segment."""
    offsets = cursor.offsets if cursor else {}
    consumed = set(cursor.consumed) if cursor else set()
    for path in segments:
        for stored in read_segment(path, offsets.get(path.name, 0)):
            if stored.episode_key not in consumed:
                yield stored


def advance_cursor(segments: list[Path], cursor: Cursor, newly_consumed: set[str]) -> Cursor:
    """The watermark once `newly_consumed` episode keys are used too: each segment's offset moves past
    the leading run of consumed records; consumed episodes with records after it stay listed; segments
    no longer on disk (retired) are forgotten.
    """
    consumed = set(cursor.consumed) | newly_consumed
    present = {path.name for path in segments}  # retired segments drop out of the watermark
    offsets = {name: offset for name, offset in cursor.offsets.items() if name in present}
    still_referenced = set()
    for path in segments:
        moving = True
        for stored in read_segment(path, cursor.offsets.get(path.name, 0)):
            if moving and stored.episode_key in consumed:
                offsets[path.name] = stored.end
            else:
                moving = False
                if stored.episode_key in consumed:
                    still_referenced.add(stored.episode_key)
    return Cursor(offsets=offsets, consumed=sorted(still_referenced), history=cursor.history)
