"""The ingress's side of hot swap: it follows the model alias too.

Every `alias_poll_s` (and at once when an answer shows a new version) the watcher reads where the
alias points and asks each policy deployment which version it serves, for the router's choice. Once
a replica serves the alias's version, the watcher loads that version's request checks (state size,
resize rule: `ModelSide`), so requests are checked against the version that answers them. A version
whose files the ingress cannot read is remembered and never retried; the old checks stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from mobile_vla.serve.heap import freeze_long_lived_heap
from mobile_vla.serve.model_side import ModelSide, load_model_side
from mobile_vla.serve.router import ServedVersions
from mobile_vla.serve.schemas import BackendStatus
from mobile_vla.serve.settings import IngressConfig
from mobile_vla.tracking import get_version_by_alias

logger = logging.getLogger("ray.serve")


class AliasWatcher:
    """Holds the `ModelSide` requests are checked against and keeps it on the served alias version."""

    def __init__(
        self,
        settings: IngressConfig,
        versions: ServedVersions,
        backend_statuses: Callable[[], Awaitable[list[BackendStatus]]],
    ):
        self.settings, self.versions, self._statuses = settings, versions, backend_statuses
        self.side: ModelSide = self._load_side(settings.model_uri)
        if settings.alias:
            versions.alias_version = self.side.version  # the builder pinned the alias's version at deploy time
        self._unreadable: dict[str, str] = {}  # version -> why the ingress could not read it
        self._task: asyncio.Task | None = None

    def _load_side(self, model_uri: str) -> ModelSide:
        side = load_model_side(model_uri, self.settings.alias)
        freeze_long_lived_heap()  # the preprocessing and its imports: never walked by a full collection mid-request
        return side

    def ensure_running(self) -> None:
        """Starts the poll on the replica's event loop (the first request runs on it; __init__ does not)."""
        if self._task is None and self.settings.alias and self.settings.alias_poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # registry or a replica unreachable: keep routing as before
                logger.warning("version watch failed: %s", str(exc).splitlines()[0][:200])
            try:
                await asyncio.wait_for(self.versions.changed.wait(), self.settings.alias_poll_s)
            except TimeoutError:
                pass
            self.versions.changed.clear()

    async def refresh(self) -> None:
        """One look at the registry and the replicas; moves the request checks when a replica serves the alias."""
        side, versions = self.side, self.versions
        started = time.monotonic()  # what an answer taught us after this moment beats what we read here
        target = await asyncio.to_thread(get_version_by_alias, side.name, self.settings.alias)
        if target is not None and versions.learned_at.get("alias", 0.0) < started:
            versions.alias_version = target
        for status in await self._statuses():
            if status.loaded and versions.learned_at.get(status.role, 0.0) < started:
                versions.by_role[status.role] = status.model_version
        target = versions.alias_version
        if target and target != side.version and target in versions.by_role.values() and target not in self._unreadable:
            uri = f"models:/{side.name}/{target}"
            try:  # only once a replica serves it: a version that fails to load never changes the checks
                self.side = await asyncio.to_thread(self._load_side, uri)
                logger.info("ingress now checks requests for %s version %s", side.name, target)
            except Exception as exc:
                self._unreadable[target] = f"{type(exc).__name__}: {exc}"[:500]
                logger.error("ingress cannot read %s: %s", uri, self._unreadable[target])
