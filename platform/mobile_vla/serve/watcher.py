"""The ingress's side of hot swap: it follows the model alias too.

Every `alias_poll_s` (and at once when an answer shows a new version) the watcher reads where the
alias points and asks each policy deployment which version it serves, for the router's choice. Once
a replica serves the alias's version, the watcher loads that version's request checks (state size,
resize rule: `ModelSide`), so requests are checked against the version that answers them.

Nothing that fails here is final. A version whose checks the ingress cannot read (its files not
fetched yet, one registry error) keeps the old checks and is tried again after a capped backoff
(`SIDE_RETRY_BASE_S` doubling to `SIDE_RETRY_CAP_S`); a failed registry lookup is retried the
same way, and meanwhile the version the alias named when this node last asked stands in. Each last
error shows in `/v1/model` (`watch_error`) until the next success clears it.

The watcher also keeps the audit of alias moves (mobile_vla.tracking.audit) complete: when the
registry names a version this watcher has not checked yet, it records a `detected` move if the
alias's last audit record names another version (a move made by hand in the MLflow UI). Every
ingress replica does so; the audit's keys make it one record per move.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from mobile_vla.serve.heap import freeze_long_lived_heap
from mobile_vla.serve.metrics import registry_errors_counter
from mobile_vla.serve.model_side import ModelSide, load_model_side
from mobile_vla.serve.retry import Backoff, bound_registry_calls
from mobile_vla.serve.router import ServedVersions
from mobile_vla.serve.schemas import BackendStatus
from mobile_vla.serve.settings import IngressConfig
from mobile_vla.tracking import detect_alias_move, get_version_by_alias, remembered_alias_version

logger = logging.getLogger("ray.serve")

SIDE_RETRY_BASE_S = 1.0  # a version whose checks could not be read: tried again after this, doubling,
SIDE_RETRY_CAP_S = 60.0  # up to this
REGISTRY_RETRY_BASE_S = 1.0  # a failed alias lookup: the next one after this, doubling,
REGISTRY_RETRY_CAP_S = 60.0  # up to this


class AliasWatcher:
    """Holds the `ModelSide` requests are checked against and keeps it on the served alias version."""

    def __init__(
        self,
        settings: IngressConfig,
        versions: ServedVersions,
        backend_statuses: Callable[[], Awaitable[list[BackendStatus]]],
    ):
        bound_registry_calls()  # a registry that is down fails a call in seconds, not minutes of MLflow retries
        self.settings, self.versions, self._statuses = settings, versions, backend_statuses
        self.side: ModelSide = self._load_side(settings.model_uri)
        if settings.alias:
            versions.alias_version = self.side.version  # the builder pinned the alias's version at deploy time
        self._side_failed: str | None = None  # the version whose checks could not be read last time
        self._side_retry = Backoff(SIDE_RETRY_BASE_S, SIDE_RETRY_CAP_S)
        self._registry = Backoff(REGISTRY_RETRY_BASE_S, REGISTRY_RETRY_CAP_S)
        self._registry_errors = registry_errors_counter()
        self._audited: str | None = None  # the alias version whose audit record this watcher has checked
        self._task: asyncio.Task | None = None

    def _load_side(self, model_uri: str) -> ModelSide:
        side = load_model_side(model_uri, self.settings.alias)
        freeze_long_lived_heap()  # the preprocessing and its imports: never walked by a full collection mid-request
        return side

    @property
    def watch_error(self) -> str | None:
        """The last registry lookup or check load that failed, while no later one succeeded (operator view)."""
        errors = []
        if self._registry.last_error:
            errors.append(f"registry: {self._registry.last_error} (failures: {self._registry.failures})")
        if self._side_retry.last_error:
            errors.append(
                f"version {self._side_failed} checks: {self._side_retry.last_error} "
                f"(failures: {self._side_retry.failures}, next try in {self._side_retry.retry_in_s()} s)"
            )
        return "; ".join(errors) or None

    def ensure_running(self) -> None:
        """Starts the poll on the replica's event loop (the first request runs on it; __init__ does not)."""
        if self._task is None and self.settings.alias and self.settings.alias_poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # a replica unreachable: keep routing as before
                logger.warning("version watch failed: %s", str(exc).splitlines()[0][:200])
            try:
                await asyncio.wait_for(self.versions.changed.wait(), self.settings.alias_poll_s)
            except TimeoutError:
                pass
            self.versions.changed.clear()

    async def _alias_version(self) -> str | None:
        """Where the alias points: the registry's answer, or while it fails (and until its backoff is
        due) the version the alias named when this node last asked.
        """
        name, alias = self.side.name, self.settings.alias
        if self._registry.due():
            try:
                version = await asyncio.to_thread(get_version_by_alias, name, alias)
            except Exception as exc:
                delay = self._registry.failed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                self._registry_errors.inc()
                logger.warning(
                    "alias lookup failed (failure %d, next in %.0f s): %s", self._registry.failures, delay, exc
                )
            else:
                if self._registry.succeeded():
                    logger.info("the registry answers again: %s@%s is version %s", name, alias, version)
                if self.side.from_cache and version == self.side.version:
                    self.side = dataclasses.replace(self.side, from_cache=False)  # the registry confirms it
                if version is not None and version != self._audited:
                    await self._audit(name, alias, version)
                return version
        return await asyncio.to_thread(remembered_alias_version, name, alias)

    async def _audit(self, name: str, alias: str, version: str) -> None:
        """Records a move of the alias made outside the platform, once this watcher sees its new version."""
        try:
            move = await asyncio.to_thread(detect_alias_move, name, alias, detector="serve ingress watcher")
        except Exception as exc:  # the audit must never stop the watch: checked again at the next poll
            logger.warning("alias audit check failed (next poll tries again): %s", str(exc).splitlines()[0][:200])
            return
        self._audited = version
        if move is not None:
            logger.info(
                "recorded a move made outside the platform: %s@%s %s -> %s", name, alias, move.from_version, version
            )

    async def refresh(self) -> None:
        """One look at the registry and the replicas; moves the request checks when a replica serves the alias."""
        side, versions = self.side, self.versions
        started = time.monotonic()  # what an answer taught us after this moment beats what we read here
        target = await self._alias_version()
        if target is not None and versions.learned_at.get("alias", 0.0) < started:
            versions.alias_version = target
        for status in await self._statuses():
            if status.loaded and versions.learned_at.get(status.role, 0.0) < started:
                versions.by_role[status.role] = status.model_version
        target = versions.alias_version
        if target == side.version and self._side_failed is not None:
            self._side_failed = None  # the alias is back on the version checked now (a rollback)
            self._side_retry.succeeded()
        if not (target and target != side.version and target in versions.by_role.values()):
            return
        if target == self._side_failed and not self._side_retry.due():
            return
        uri = f"models:/{side.name}/{target}"
        try:  # only once a replica serves it: a version that fails to load never changes the checks
            self.side = await asyncio.to_thread(self._load_side, uri)
        except Exception as exc:
            if self._side_failed != target:
                self._side_retry.succeeded()  # another version: its backoff starts afresh
            self._side_failed = target
            delay = self._side_retry.failed(f"{type(exc).__name__}: {exc}"[:500])
            logger.error("ingress cannot read %s (next try in %.0f s): %s", uri, delay, self._side_retry.last_error)
            return
        if self._side_retry.succeeded():
            logger.info("ingress read %s after %s failed", uri, self._side_failed)
        self._side_failed = None
        logger.info("ingress now checks requests for %s version %s", side.name, target)
