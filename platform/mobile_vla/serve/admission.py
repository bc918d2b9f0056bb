"""Admission control of the ingress: how much work one replica takes on, and each step's deadline.

A replica that accepts every request builds a queue: under a 10x overload every answer comes late,
none in time. So each ingress replica works on at most `limit` /v1/act requests at once (decoding,
waiting for a batch, in the model) and answers the rest at once with 429 and Retry-After, before
any decoding. Each admitted step carries a deadline (its arrival plus the robot's budget: the
request's `deadline_ms`, else the app's `deadline_s`, else the model's control period); the router
and the policy replica drop a step whose deadline has passed instead of computing it (504).
Serve's own `max_queued_requests` (app.py) bounds the queues in front of the ingress and the policy
deployments the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mobile_vla.serve.errors_http import overloaded


class AdmissionGate:
    """At most `limit` requests inside at once; the next one is shed with 429 + Retry-After.

    Args:
        limit: requests admitted at once (one ingress replica, one event loop: no lock needed).
        retry_after_s: the Retry-After a shed request gets.
    """

    def __init__(self, limit: int, retry_after_s: float):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit, self.retry_after_s = limit, retry_after_s
        self.inside = 0
        self.shed = 0  # requests refused so far

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """The block runs as one admitted request; raises ApiError 429 when `limit` are inside."""
        if self.inside >= self.limit:
            self.shed += 1
            raise overloaded(
                f"this ingress replica is working on {self.inside} requests (limit {self.limit}); retry later",
                self.retry_after_s,
            )
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1


def step_budget_s(deadline_ms: int | None, default_deadline_s: float | None, control_hz: float) -> float:
    """A step's time budget from its arrival: the request's own, else the app's, else one control period."""
    if deadline_ms is not None:
        return deadline_ms / 1000.0
    if default_deadline_s is not None:
        return default_deadline_s
    return 1.0 / control_hz
