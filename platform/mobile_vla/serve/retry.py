"""Retrying what failed against the model registry: a capped exponential backoff, and MLflow's own HTTP
retries bounded in serving processes.

MLflow retries a failed HTTP call 7 times with a backoff that reaches 2 minutes, so one call to a
registry that is down blocks for minutes: a replica could neither start from its cache nor keep its
alias poll honest. `bound_registry_calls` makes one call give up within seconds in a serving process
(an operator's environment still wins), and `Backoff` spaces the platform's own retries instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

# one registry call in a serving process: 1 retry after about a second, 10 s timeout per attempt
REGISTRY_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def bound_registry_calls() -> None:
    """Sets `REGISTRY_HTTP_ENV` in this process where the environment does not set them already."""
    for key, value in REGISTRY_HTTP_ENV.items():
        os.environ.setdefault(key, value)


@dataclass
class Backoff:
    """Consecutive failures of one thing and when to try it again: `base_s` after the first failure,
    doubled after each further one, never more than `cap_s`; a success clears it all.
    """

    base_s: float
    cap_s: float
    failures: int = 0
    last_error: str | None = None
    retry_at: float = 0.0  # time.monotonic() from which another try is due

    def failed(self, error: str) -> float:
        """Records a failure; returns the seconds until the next try is due."""
        self.failures += 1
        self.last_error = error[:1000]
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures - 1))
        self.retry_at = time.monotonic() + delay
        return delay

    def succeeded(self) -> bool:
        """Clears the failures; returns whether there were any (the first success after an outage)."""
        had = self.failures > 0
        self.failures, self.last_error, self.retry_at = 0, None, 0.0
        return had

    def due(self) -> bool:
        """Whether the next try may run now."""
        return time.monotonic() >= self.retry_at

    def retry_in_s(self) -> float | None:
        """Seconds until the next try (None: nothing failed)."""
        return round(max(0.0, self.retry_at - time.monotonic()), 1) if self.failures else None
