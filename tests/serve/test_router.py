"""The ingress's batch router without an HTTP server: typed replica exceptions across the Ray boundary,
and what each kind of replica answer does to routing and the breaker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from unittest.mock import MagicMock

import numpy as np
import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from mobile_vla.serve.errors_http import ApiError
from mobile_vla.serve.router import BatchRouter, BreakerState, CircuitBreaker, ServedVersions, raised_by_replica
from mobile_vla.serve.schemas import BackendUnavailable, StepFailure, StepRequest, StepResult
from mobile_vla.serve.settings import IngressConfig
from tests.serve.conftest import serve_on_loopback


class _Response:
    """Stands in for a DeploymentResponse: awaitable once, cancellable."""

    def __init__(self, answer):
        self._answer = answer

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        return self._answer()

    def cancel(self) -> None:
        pass


class _Method:
    def __init__(self, answer):
        self._answer, self.calls = answer, 0

    def remote(self, *args):
        self.calls += 1
        return _Response(lambda: self._answer(*args))


class _Handle:
    """A policy deployment handle whose `step_batch` answers with `answer(steps)`."""

    def __init__(self, answer):
        self.step_batch = _Method(answer)
        self.info = _Method(lambda: {"loaded": True, "backend": "onnx-cpu", "model_version": "1"})


def _step(robot_id: str) -> StepRequest:
    return StepRequest(robot_id, np.zeros((224, 224, 3), np.uint8), np.zeros(3, np.float32), "go")


def _result(steps, version="1") -> list[StepResult]:
    zeros = np.zeros((1, 4), np.float32)
    return [
        StepResult(np.zeros((10, 3), np.float32), 0.5, zeros, zeros, "m", version, "onnx-cpu", False) for _ in steps
    ]


def _remote_error(cause: Exception) -> Exception:
    """What awaiting a handle raises when the replica raised `cause` (Ray 2.x: a dual-class instance)."""
    return RayTaskError("step_batch", "Traceback ...", cause).as_instanceof_cause()


def _route_all(router: BatchRouter, *groups: list[str]) -> list[list]:
    """Each group of robots as one batch, the groups one after another, on one event loop. The batch
    is what `@serve.batch` would gather (its queue runs only inside a Serve replica)."""
    route_batch = type(router)._route_batch.__wrapped__

    async def run():
        return [await route_batch(router, [_step(r) for r in robots]) for robots in groups]

    return asyncio.run(run())


def _router(primary, fallback, failures=3) -> BatchRouter:
    settings = IngressConfig(
        model_uri="models:/m/1",
        tokens_file="t",
        memory_secret_file="s",
        feedback_dir="f",
        primary_name="OnnxPolicy",
        fallback_name="OnnxFallbackPolicy" if fallback else None,
        breaker_failures=failures,
        batch_wait_timeout_s=0.05,
    )
    return BatchRouter(settings, primary, fallback, MagicMock(), ServedVersions())


def test_replica_exceptions_are_recognised_by_type_not_by_text():
    wrapped = _remote_error(BackendUnavailable("OnnxPolicy has no model loaded"))
    assert isinstance(wrapped, RayTaskError) and raised_by_replica(wrapped, BackendUnavailable)
    assert not raised_by_replica(_remote_error(RuntimeError("BackendUnavailable in the text only")), BackendUnavailable)
    plain = RayTaskError("step_batch", "Traceback ...", BackendUnavailable("x"))  # when no dual class can be made
    assert not isinstance(plain, BackendUnavailable) and raised_by_replica(plain, BackendUnavailable)


def test_a_replica_without_a_model_sends_the_batch_to_the_fallback_as_unavailable():
    def no_model(steps):
        raise _remote_error(BackendUnavailable("OnnxPolicy has no model loaded"))

    def broken(steps):
        raise _remote_error(RuntimeError("BackendUnavailable, said a log line"))

    router = _router(_Handle(no_model), _Handle(_result))
    [outcomes] = _route_all(router, ["a", "b"])
    assert [(o.served_by, o.fallback_reason) for o in outcomes] == [("OnnxFallbackPolicy", "unavailable")] * 2
    router = _router(_Handle(broken), _Handle(_result))
    assert {o.fallback_reason for o in _route_all(router, ["a"])[0]} == {"error"}


def test_refused_robots_get_422_and_do_not_count_against_the_primary():
    def refuse_long(steps):
        return [
            StepFailure("instruction has 40 tokens", refused=True) if s.robot_id.startswith("long") else r
            for s, r in zip(steps, _result(steps), strict=True)
        ]

    fallback = _Handle(_result)
    router = _router(_Handle(refuse_long), fallback, failures=1)
    # the second batch: every robot refused, still not a primary failure
    outcomes, only_refused = _route_all(router, ["long-1", "ok-1", "ok-2"], ["long-2"])
    assert isinstance(outcomes[0], ApiError) and (outcomes[0].status, outcomes[0].code) == (422, "invalid_request")
    assert [o.served_by for o in outcomes[1:]] == ["OnnxPolicy", "OnnxPolicy"]
    assert isinstance(only_refused[0], ApiError) and only_refused[0].status == 422
    assert router.breaker.state is BreakerState.CLOSED and fallback.step_batch.calls == 0


@pytest.mark.parametrize("fallback", [False, True])
def test_a_failed_robot_goes_to_the_fallback_or_gets_503(fallback):
    def fail_one(steps):
        return [StepFailure("boom") if s.robot_id == "bad" else r for s, r in zip(steps, _result(steps), strict=True)]

    router = _router(_Handle(fail_one), _Handle(_result) if fallback else None)
    [[bad, good]] = _route_all(router, ["bad", "good"])
    assert good.served_by == "OnnxPolicy"
    if fallback:
        assert (bad.served_by, bad.fallback_reason) == ("OnnxFallbackPolicy", "error")
    else:
        assert isinstance(bad, ApiError) and bad.status == 503


@pytest.mark.slow  # starts Serve and deploys an app: ~12 s on a loaded 2-core box
def test_serve_delivers_a_replica_exception_as_its_own_class(ray_cluster):
    """Ray 2.x as installed: what the ingress catches when a policy replica raises BackendUnavailable."""
    from ray import serve

    @serve.deployment
    class NoModel:
        async def step_batch(self, steps):
            raise BackendUnavailable("NoModel has no model loaded")

    serve_on_loopback()
    handle = serve.run(NoModel.bind(), name="typed-errors", route_prefix=None)
    try:
        with pytest.raises(RayTaskError) as caught:
            handle.step_batch.remote([]).result()
        assert isinstance(caught.value, BackendUnavailable) and raised_by_replica(caught.value, BackendUnavailable)
    finally:
        serve.delete("typed-errors")


# -- issue 16: deadlines, shedding, only the primary's own faults count -----------------------------
class _Hanging:
    """A policy handle whose step_batch calls wait until the test says, or answer at once when `ready`."""

    def __init__(self):
        self.calls, self.ready, self.cancelled = 0, False, 0
        self.step_batch = self

    def remote(self, steps):
        self.calls += 1
        owner, stalls = self, not self.ready  # decided when the call is made

        class _Waiting:
            def __await__(self):
                return self._run().__await__()

            async def _run(self):
                if stalls:
                    await asyncio.Event().wait()  # never set: a stalled replica
                return _result(steps)

            def cancel(self):
                owner.cancelled += 1

        return _Waiting()


def _timed(router: BatchRouter, **limits) -> BatchRouter:
    router.settings = router.settings.model_copy(update=limits)
    return router


def _run_batches(router: BatchRouter, scenario):
    route_batch = type(router)._route_batch.__wrapped__
    return asyncio.run(scenario(lambda robots: route_batch(router, [_step(r) for r in robots])))


def test_a_cancelled_half_open_probe_frees_the_probe_slot():
    now = [0.0]
    primary = _Hanging()
    router = _router(primary, _Handle(_result), failures=1)
    router.breaker = CircuitBreaker(1, reset_timeout_s=10.0, clock=lambda: now[0])
    router.breaker.record_failure()
    now[0] = 11.0  # cool-down over: the next batch is the probe

    async def scenario(batch):
        probe = asyncio.create_task(batch(["probe"]))
        while primary.calls == 0:
            await asyncio.sleep(0)
        probe.cancel()  # e.g. the robot disconnected while the probe ran
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        primary.ready = True
        return await batch(["after"])

    [after] = _run_batches(router, scenario)
    assert primary.cancelled == 1  # the probe's call was cancelled with it
    assert after.served_by == "OnnxPolicy" and router.breaker.state is BreakerState.CLOSED


def test_a_timeout_while_the_primary_answers_others_is_queueing_not_a_fault():
    primary = _Hanging()
    router = _timed(_router(primary, _Handle(_result), failures=1), primary_timeout_s=0.2)

    async def scenario(batch):
        stuck = asyncio.create_task(batch(["waits-in-queue"]))
        while primary.calls == 0:
            await asyncio.sleep(0)
        primary.ready = True  # the primary keeps answering: the first call only waited behind others
        answered = await batch(["answered"])
        return await stuck, answered

    [queued], [answered] = _run_batches(router, scenario)
    assert answered.served_by == "OnnxPolicy"
    assert (queued.served_by, queued.fallback_reason) == ("OnnxFallbackPolicy", "queued")
    assert router.breaker.state is BreakerState.CLOSED  # load is not a primary fault

    lone = _timed(_router(_Hanging(), _Handle(_result), failures=1), primary_timeout_s=0.2)
    [[stalled]] = _route_all(lone, ["stalled"])  # it answered nothing meanwhile: a fault
    assert stalled.fallback_reason == "timeout" and lone.breaker.state is BreakerState.OPEN


def test_a_full_policy_queue_sheds_with_429_and_retry_after_not_the_fallback():
    def shed(steps):
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64, status_code=429, retry_after_s=1)

    fallback = _Handle(_result)
    router = _timed(_router(_Handle(shed), fallback, failures=1), retry_after_s=2.5)
    [outcomes] = _route_all(router, ["a", "b"])
    assert all(isinstance(o, ApiError) and (o.status, o.code) == (429, "overloaded") for o in outcomes)
    assert outcomes[0].headers == {"Retry-After": "3"}
    assert fallback.step_batch.calls == 0 and router.breaker.state is BreakerState.CLOSED


def test_a_step_that_waited_past_its_deadline_is_shed_with_429_not_computed():
    # Overload's excess gets 429 + Retry-After wherever it waited: a step late in the batch queue or in
    # a policy replica's queue is shed like one refused at the door, not answered 504
    primary, fallback = _Handle(_result), _Handle(_result)
    router = _timed(_router(primary, fallback, failures=1), retry_after_s=2.0)
    late = _step("late")
    late.deadline = time.time() - 0.01
    [[outcome]] = [asyncio.run(type(router)._route_batch.__wrapped__(router, [late]))]
    assert isinstance(outcome, ApiError) and (outcome.status, outcome.code) == (429, "overloaded")
    assert outcome.headers == {"Retry-After": "2"}
    assert primary.step_batch.calls == fallback.step_batch.calls == 0

    def expired_in_replica(steps):  # the replica dropped them: its queue was longer than their budget
        return [StepFailure("deadline passed", expired=True) for _ in steps]

    router = _router(_Handle(expired_in_replica), fallback, failures=1)
    [[dropped]] = _route_all(router, ["a"])
    assert isinstance(dropped, ApiError) and (dropped.status, dropped.code) == (429, "overloaded")
    assert "Retry-After" in dropped.headers
    assert router.breaker.state is BreakerState.CLOSED and fallback.step_batch.calls == 0


def test_a_step_whose_deadline_passed_while_the_primary_failed_gets_504_not_the_fallback():
    def slow_failure(steps):
        time.sleep(0.05)  # the budget runs out while the primary fails (not a timing assertion)
        raise _remote_error(RuntimeError("primary down"))

    fallback = _Handle(_result)
    router = _router(_Handle(slow_failure), fallback, failures=5)
    step = _step("a")
    step.deadline = time.time() + 0.02
    [[outcome]] = [asyncio.run(type(router)._route_batch.__wrapped__(router, [step]))]
    assert isinstance(outcome, ApiError) and (outcome.status, outcome.code) == (504, "deadline_exceeded")
    assert fallback.step_batch.calls == 0


def test_the_fallback_call_has_its_own_timeout():
    def broken(steps):
        raise _remote_error(RuntimeError("primary down"))

    stalled_fallback = _Hanging()
    router = _timed(_router(_Handle(broken), stalled_fallback), fallback_timeout_s=0.2)
    [[outcome]] = _route_all(router, ["a"])
    assert isinstance(outcome, ApiError) and (outcome.status, outcome.code) == (503, "unavailable")
    assert stalled_fallback.cancelled == 1
