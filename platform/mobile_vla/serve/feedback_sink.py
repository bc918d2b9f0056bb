"""Where /v1/feedback records go. `FeedbackSink.append(record)` must be durable when it returns:
the API answers 202 only after that. The ingress uses `mobile_vla.online.feedback_store.FeedbackStore`
(a per-writer write-ahead log); any object with this `append` can stand in (e.g. a cloud queue).

Records are idempotent by key `robot_id/episode_id/step`: a robot that retries after a lost answer
may store a step twice, and readers keep the last copy per key.
"""

from __future__ import annotations

from typing import Any, Protocol


class FeedbackSink(Protocol):
    """Durable storage of feedback records."""

    def append(self, record: dict[str, Any]) -> None:
        """Stores one step; returns only when it is on disk (or raises: DataError for a record the
        store refuses, OSError when the disk does).
        """


def feedback_key(record: dict[str, Any]) -> str:
    """`robot_id/episode_id/step`: the key retries share."""
    return f"{record['robot_id']}/{record['episode_id']}/{record['step']}"
