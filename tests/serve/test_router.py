"""The ingress's batch router without an HTTP server: typed replica exceptions across the Ray boundary,
and what each kind of replica answer does to routing and the breaker."""

from __future__ import annotations

import asyncio
from unittest.mock import MagicMock

import numpy as np
import pytest
from ray.exceptions import RayTaskError

from mobile_vla.serve.errors_http import ApiError
from mobile_vla.serve.router import BatchRouter, BreakerState, ServedVersions, raised_by_replica
from mobile_vla.serve.schemas import BackendUnavailable, StepFailure, StepRequest, StepResult
from mobile_vla.serve.settings import IngressConfig


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


def test_serve_delivers_a_replica_exception_as_its_own_class(ray_cluster):
    """Ray 2.x as installed: what the ingress catches when a policy replica raises BackendUnavailable."""
    from ray import serve

    from tests.local_processes import free_port

    @serve.deployment
    class NoModel:
        async def step_batch(self, steps):
            raise BackendUnavailable("NoModel has no model loaded")

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(NoModel.bind(), name="typed-errors", route_prefix=None)
    try:
        with pytest.raises(RayTaskError) as caught:
            handle.step_batch.remote([]).result()
        assert isinstance(caught.value, BackendUnavailable) and raised_by_replica(caught.value, BackendUnavailable)
    finally:
        serve.delete("typed-errors")
        serve.shutdown()
