"""`/readyz` answers from a short-lived copy of the backends' status, so a probe costs no RPCs.

A load balancer (or anyone, the route needs no token) may call `/readyz` many times a second; each
fresh status costs one `info()` call per policy deployment. `CachedStatus` keeps the last answer for
`ttl_s` and lets concurrent callers share one fetch in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

DEFAULT_READINESS_TTL_S = 1.0

T = TypeVar("T")


class CachedStatus(Generic[T]):
    """`await get()`: the value of `fetch()`, fetched again only when the last one is `ttl_s` old.

    Args:
        fetch: the costly coroutine (e.g. the router's backend statuses).
        ttl_s: how long an answer is reused.
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[T]],
        ttl_s: float = DEFAULT_READINESS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch, self._ttl_s, self._clock = fetch, ttl_s, clock
        self._value: T | None = None
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        """The cached value while fresh, else one new fetch shared by every caller waiting for it."""
        if self._fresh():
            return self._value
        async with self._lock:
            if not self._fresh():  # another caller may have fetched while this one waited
                self._value = await self._fetch()
                self._fetched_at = self._clock()
            return self._value

    def _fresh(self) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at < self._ttl_s
