"""Where /v1/feedback records go. `FeedbackSink.append(record)` must be durable when it returns:
the API answers 202 only after that. The durable store of issue 8 replaces `JsonlFeedbackSink`.

The default writes one JSON line per step to `<root>/<robot_id>.jsonl` with O_APPEND, one write()
per line and fsync (plus a directory fsync when the file is new). Records are idempotent by key
`robot_id/episode_id/step`: a robot that retries after a lost answer may write a line twice, and
readers keep the last line per key (`read_feedback`)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Protocol


class FeedbackSink(Protocol):
    def append(self, record: dict[str, Any]) -> None:
        """Stores one step; returns only when it is on disk (or raises)."""


def feedback_key(record: dict[str, Any]) -> str:
    return f"{record['robot_id']}/{record['episode_id']}/{record['step']}"


class JsonlFeedbackSink:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock_for(self, robot_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(robot_id, threading.Lock())

    def path_for(self, robot_id: str) -> Path:
        if not robot_id or "/" in robot_id or robot_id.startswith("."):
            raise ValueError(f"robot_id {robot_id!r} cannot name a file")
        return self.root / f"{robot_id}.jsonl"

    def append(self, record: dict[str, Any]) -> None:
        path = self.path_for(record["robot_id"])
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with self._lock_for(record["robot_id"]):
            is_new = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"{path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)
            if is_new:
                dir_fd = os.open(self.root, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)


def read_feedback(root: str | Path) -> Iterator[dict[str, Any]]:
    """All records under root, one per key (the last write wins), skipping a torn final line."""
    for path in sorted(Path(root).glob("*.jsonl")):
        latest: dict[str, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # only a crash mid-write leaves one, always the last line
            latest[feedback_key(record)] = record
        yield from latest.values()
