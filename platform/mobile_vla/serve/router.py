"""Which policy deployment answers each robot: the ingress's batch router.

Concurrent requests are gathered into one batch (`@serve.batch`), sent to the primary with one
timeout, then the robots the primary did not answer go to the fallback (the whole batch on a
timeout, an error or an open breaker; only the failed robots when the primary answered the rest),
which has its own timeout. Each step carries a deadline: a step that waited in a queue (this batch
queue, a policy replica's) past its deadline is shed, never computed: 429 with Retry-After like any
other step the service had no room for; a step whose deadline passed while the primary failed is
dropped before the fallback (504). A policy queue that is full sheds the batch (429 with Retry-After,
no fallback: moving an overload onto the slower fallback only spreads it). A circuit breaker stops sending the
primary traffic after N failed batches in a row, for a while, then lets one probe batch through
(half-open) and closes again if it succeeds. Only the primary's own faults count: not a robot's
bad input (422), not a shed or expired step, not a timeout while the primary answered other calls
(that call waited in its queue); a probe that ends without a verdict frees the probe slot. Each ingress replica
keeps its own breaker: no shared state, so a replica restart costs at most `breaker_failures` slow or
failed batches before it learns again.

Hot swap: the primary gets a batch only while it serves the alias's version or the fallback does not
(`ServedVersions.primary_is_current`); so while a new version needs minutes on the primary (a
TensorRT engine build), the ONNX fallback answers with the new version at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum
from typing import NamedTuple

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from mobile_vla.serve.errors_http import ApiError, overloaded
from mobile_vla.serve.metrics import IngressMetrics
from mobile_vla.serve.schemas import BackendStatus, BackendUnavailable, StepFailure, StepRequest, StepResult
from mobile_vla.serve.settings import DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, IngressConfig

logger = logging.getLogger("ray.serve")

INGRESS_CONCURRENT_BATCHES = 2  # batches on their way to the policy at once; one can form while another runs
INFO_TIMEOUT_S = 2.0  # a replica that does not say what it serves within this counts as not loaded


class BreakerState(StrEnum):
    """The primary's circuit breaker state."""

    CLOSED = "closed"  # primary used
    OPEN = "open"  # primary skipped until the cool-down ends
    HALF_OPEN = "half_open"  # one probe in flight


class CircuitBreaker:
    """Counts the primary's consecutive failures; `allow()` says whether the next batch may go to it."""

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

    def abandon(self) -> None:
        """The call `allow()` let through ended with no verdict on the primary (cancelled, shed, queued,
        or every robot's deadline passed): a half-open probe slot opens again for the next batch.
        """
        self._probe_in_flight = False

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


def raised_by_replica(exc: BaseException, cls: type[BaseException]) -> bool:
    """Whether `exc`, raised by awaiting a Serve handle call, is the replica's `cls` exception.

    Ray re-raises a replica's exception as a RayTaskError that is also an instance of the cause's
    class (`RayTaskError.as_instanceof_cause`, on both the actor and the gRPC path); where that class
    cannot be subclassed it stays a plain RayTaskError whose `.cause` is the original.
    """
    return isinstance(exc, cls) or (isinstance(exc, RayTaskError) and isinstance(exc.cause, cls))


async def _awaited(response):
    """A coroutine around a DeploymentResponse, so wait_for can cancel it on timeout."""
    return await response


def _deadline_exceeded() -> ApiError:
    return ApiError(504, "deadline_exceeded", "the step's deadline passed before the model ran it; send the next step")


QUEUED_PAST_DEADLINE = "the step waited past its deadline in a queue (overload); shed, not computed"


class ServedVersions:
    """What the ingress knows of versions: where the alias points and what each role serves.

    Learnt from the registry and the replicas' info() (the watcher's poll) and from every answer
    (`learn`): a replica only moves to what the alias named when it looked, newer news than a poll.
    """

    def __init__(self, alias_version: str | None = None):
        self.alias_version = alias_version  # None: not following an alias
        self.by_role: dict[str, str | None] = {}  # "primary" / "fallback" -> version it serves
        self.learned_at: dict[str, float] = {}  # role or "alias" -> when an answer last taught us something
        self.changed = asyncio.Event()  # an answer showed a new version: look at the registry now

    def learn(self, role: str, version: str) -> None:
        previous = self.by_role.get(role)
        if previous == version:
            return
        self.by_role[role] = version
        self.learned_at[role] = time.monotonic()
        if previous is not None and self.alias_version is not None:
            # Routing on it at once keeps the next request off the older version.
            self.alias_version = version
            self.learned_at["alias"] = time.monotonic()
        self.changed.set()

    def primary_is_current(self, has_fallback: bool) -> bool:
        """False while the fallback serves the alias's version and the primary does not yet."""
        target = self.alias_version
        if target is None or not has_fallback:
            return True
        return self.by_role.get("primary") in (None, target) or self.by_role.get("fallback") != target


class Routed(NamedTuple):
    """A robot's answer and who gave it."""

    result: StepResult
    served_by: str  # deployment name
    fallback_reason: str  # "" when the primary answered


class BatchRouter:
    """Routes each robot's step to the primary or the fallback, one call per gathered batch."""

    def __init__(self, settings: IngressConfig, primary, fallback, metrics: IngressMetrics, versions: ServedVersions):
        self.settings = settings
        self._primary, self._fallback = primary, fallback
        self._metrics = metrics
        self.versions = versions
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self._primary_answers = 0  # primary calls answered: progress while a call waits means it was queued
        self._route_batch.set_max_batch_size(settings.max_batch_size)
        self._route_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    @property
    def primary_is_current(self) -> bool:
        return self.versions.primary_is_current(self._fallback is not None)

    async def route(self, step: StepRequest) -> Routed:
        """Primary (timeout + breaker), else fallback; raises ApiError when neither answers (503) or the
        robot's request is refused by the model (422).
        """
        outcome = await self._route_batch(step)
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome

    @serve.batch(
        max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S,
        max_concurrent_batches=INGRESS_CONCURRENT_BATCHES,
    )  # resized from the settings in __init__
    async def _route_batch(self, steps: list[StepRequest]) -> list[Routed | ApiError]:
        """One primary call (one breaker verdict for the batch: a failure only when it answered none of
        it), then the fallback for the robots the primary did not answer. Steps whose deadline passed
        waited in this queue are shed (429) before any call, as is a batch a full policy queue refuses;
        neither counts against the primary.
        """
        outcomes: list[Routed | ApiError | None] = [None] * len(steps)
        self._drop_expired(steps, outcomes, overloaded(QUEUED_PAST_DEADLINE, self.settings.retry_after_s))
        reason = "absent"
        if not any(outcome is None for outcome in outcomes):
            return outcomes
        if self._primary is not None and not self.primary_is_current:
            reason = "primary_behind"  # e.g. building the new version's TensorRT engine
        elif self._primary is not None:
            reason = await self._try_primary(steps, outcomes)
        self._drop_expired(steps, outcomes, _deadline_exceeded())  # the fallback only for robots still in time
        pending = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if not pending:
            return outcomes
        if self._fallback is None:
            message = f"primary backend unavailable ({reason}) and no fallback configured"
            return [outcome or ApiError(503, "unavailable", message) for outcome in outcomes]
        self._metrics.fallbacks.inc(float(len(pending)), tags={"reason": reason})
        results = await self._call_fallback([steps[i] for i in pending])
        name = self.settings.fallback_name or "fallback"
        for i, result in zip(pending, results, strict=True):
            outcome = result if isinstance(result, ApiError) else self._outcome(result, "fallback", name, reason)
            outcomes[i] = outcome or ApiError(503, "unavailable", "no backend could answer; retry later")
        return outcomes

    def _drop_expired(self, steps: list[StepRequest], outcomes: list, refusal: ApiError) -> None:
        """`refusal` for every unanswered step whose deadline has passed: its answer would come too late."""
        now = time.time()
        for i, step in enumerate(steps):
            if outcomes[i] is None and step.expired(now):
                outcomes[i] = refusal

    async def _call_fallback(self, steps: list[StepRequest]) -> list:
        """The fallback's answers, with its own timeout: 429 when its queue is full, failures otherwise."""
        response = self._fallback.step_batch.remote(steps)
        try:
            return await asyncio.wait_for(_awaited(response), self.settings.fallback_timeout_s)
        except TimeoutError:
            response.cancel()
            logger.error("fallback timed out after %.2f s", self.settings.fallback_timeout_s)
            return [StepFailure("fallback timed out")] * len(steps)
        except Exception as exc:
            if raised_by_replica(exc, BackPressureError):
                shed = overloaded("the fallback's queue is full; retry later", self.settings.retry_after_s)
                return [shed] * len(steps)
            logger.error("fallback failed: %s", str(exc).splitlines()[0][:200])
            return [StepFailure("fallback failed")] * len(steps)

    async def _try_primary(self, steps: list[StepRequest], outcomes: list) -> str:
        """Fills `outcomes` with what the primary answered; returns why the rest go to the fallback.

        Only the primary's own faults count for the breaker: an error, a batch it answered none of,
        or a timeout while it answered nothing else. A timeout while it answered other calls means
        this one waited in its queue (load, not a fault), and a shed call (its queue full) is a 429.
        """
        if not self.breaker.allow():
            self._metrics.breaker_open.set(1)
            return "breaker_open"
        sent = [i for i, outcome in enumerate(outcomes) if outcome is None]
        answered_before = self._primary_answers
        response = self._primary.step_batch.remote([steps[i] for i in sent])
        reason, verdict = "error", False
        try:
            results = await asyncio.wait_for(_awaited(response), self.settings.primary_timeout_s)
        except TimeoutError:
            response.cancel()
            if self._primary_answers != answered_before:
                reason = "queued"  # it answered other calls meanwhile: this one waited behind them
            else:
                self.breaker.record_failure()
                verdict, reason = True, "timeout"
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            if raised_by_replica(exc, BackPressureError):
                shed = overloaded("the primary's queue is full; retry later", self.settings.retry_after_s)
                for i in sent:
                    outcomes[i] = shed
                reason = "overloaded"
            else:
                self.breaker.record_failure()
                verdict = True
                reason = "unavailable" if raised_by_replica(exc, BackendUnavailable) else "error"
                logger.warning("primary failed (%s): %s", reason, str(exc).splitlines()[0][:200])
        else:
            self._take_primary_answers(sent, results, outcomes)
            verdict = True
        finally:
            if not verdict:  # cancelled, shed or queued: no word on the primary's health; free a probe slot
                self.breaker.abandon()
        self._metrics.breaker_open.set(1 if self.breaker.state is not BreakerState.CLOSED else 0)
        return reason

    def _take_primary_answers(self, sent: list[int], results: list, outcomes: list) -> None:
        """The primary's answers into `outcomes`, and the breaker's verdict on them."""
        self._primary_answers += 1
        name = self.settings.primary_name or "primary"
        for i, result in zip(sent, results, strict=True):
            outcomes[i] = self._outcome(result, "primary", name, "")
        failed = [r for r in results if isinstance(r, StepFailure) and not (r.refused or r.expired)]
        if failed and len(failed) == len(sent):  # a primary that answers part of a batch is not broken
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        if failed:
            logger.warning(
                "primary failed (error) for %d of %d robots: %s", len(failed), len(sent), failed[0].error[:200]
            )

    def _outcome(self, result, role: str, name: str, reason: str) -> Routed | ApiError | None:
        """A replica's answer for one robot: routed, refused (422), or None (failed: try elsewhere)."""
        if isinstance(result, StepResult):
            self.versions.learn(role, result.model_version)
            return Routed(result, name, reason)
        if isinstance(result, StepFailure) and result.refused:
            return ApiError(422, "invalid_request", result.error)
        if isinstance(result, StepFailure) and result.expired:  # it waited in the replica's queue: shed
            return overloaded(QUEUED_PAST_DEADLINE, self.settings.retry_after_s)
        return None

    async def backend_statuses(self) -> list[BackendStatus]:
        """What each policy deployment serves now, from its info() (not loaded when it does not answer)."""
        out = []
        for role, handle, name in (
            ("primary", self._primary, self.settings.primary_name),
            ("fallback", self._fallback, self.settings.fallback_name),
        ):
            if handle is None:
                continue
            try:
                info = await asyncio.wait_for(_awaited(handle.info.remote()), INFO_TIMEOUT_S)
                detail = info.get("error")
            except Exception as exc:
                info, detail = {}, f"no answer: {type(exc).__name__}"
            out.append(
                BackendStatus(
                    role=role,
                    deployment=name or role,
                    backend=info.get("backend"),
                    loaded=bool(info.get("loaded")),
                    model_version=info.get("model_version"),
                    detail=detail,
                    breaker=self.breaker.state.value if role == "primary" else None,
                    pending_version=info.get("pending_version"),
                    failed_version=info.get("failed_version"),
                    failed_reason=info.get("failed_error"),
                    from_cache=bool(info.get("from_cache")),
                    registry_error=info.get("registry_error"),
                )
            )
        return out
