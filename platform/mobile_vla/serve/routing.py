"""Circuit breaker for the primary backend: after N failures in a row stop sending it traffic for a
while, then let one probe request through (half-open) and close again if it succeeds.

Each ingress replica keeps its own breaker: no shared state, so a replica restart costs at most
`failure_threshold` slow or failed requests before it learns again.
"""

from __future__ import annotations

import time
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"  # primary used
    OPEN = "open"  # primary skipped until the cool-down ends
    HALF_OPEN = "half_open"  # one probe in flight


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, reset_timeout_s: float = 10.0, clock=time.monotonic):
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            return BreakerState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """True when this request may go to the primary (in half-open: only the single probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        self._probe_in_flight = False
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
