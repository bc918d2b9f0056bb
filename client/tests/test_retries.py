"""Retry and deadline rules of both clients, over httpx's in-memory transport on a fake clock: one total
deadline per call, the server's Retry-After honoured, no retry that cannot finish in time, nothing
retried that the server may have applied, errors naming the status and the server's error body."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from mobile_vla_client import ApiError, AsyncClient, Client, NoAnswer
from mobile_vla_client.core import Call, RetryPolicy

FRAME = np.zeros((32, 32, 3), np.uint8)
STATE = [0.0, 0.0, 0.0]
ANSWER = {
    "actions": [[0.1, 0.0, 0.0], [0.2, 0.0, 0.1]],
    "confidence": 0.9,
    "memory": "m2.k.x.y",
    "model": {"name": "m", "version": "1"},
    "backend": "onnx-cpu",
    "memory_reset": False,
    "latency_ms": 5.0,
}
CODES = {429: "overloaded", 503: "unavailable", 504: "deadline_exceeded", 400: "invalid_memory", 507: "full"}


class _Server:
    """Answers each request with the next step of `script`: 200 (an answer), another status, or an exception."""

    def __init__(self, script):
        self.script, self.bodies = list(script), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.read() or b"null"))
        status, headers = self.script.pop(0)
        if isinstance(status, Exception):
            raise status
        if status in (200, 202):
            body = ANSWER if request.url.path == "/v1/act" else {"stored": True, "key": "r-1/ep/0"}
            return httpx.Response(status, json=body)
        error = {"code": CODES.get(status, "bad"), "message": "busy"}
        return httpx.Response(status, json={"error": error}, headers=headers)


def _clocked(robot, waits: list[float]):
    now = [0.0]

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    async def async_sleep(seconds: float) -> None:
        sleep(seconds)

    robot._clock = lambda: now[0]
    robot._sleep = async_sleep if isinstance(robot, AsyncClient) else sleep
    robot.start_episode("go to the red box", episode_id="ep")
    return robot


def _robot(server: _Server, **options) -> tuple[Client, list[float]]:
    waits: list[float] = []
    robot = Client("http://policy", "t" * 32, "r-1", transport=httpx.MockTransport(server), **options)
    return _clocked(robot, waits), waits


def _async_robot(server: _Server, **options) -> tuple[AsyncClient, list[float]]:
    waits: list[float] = []
    robot = AsyncClient("http://policy", "t" * 32, "r-1", transport=httpx.MockTransport(server), **options)
    return _clocked(robot, waits), waits


def test_retry_after_is_waited_when_it_fits_the_call_deadline():
    server = _Server([(429, {"Retry-After": "1"}), (200, {})])
    robot, waits = _robot(server, deadline_s=3.0)
    answer = robot.act(FRAME, STATE)
    assert answer.confidence == 0.9 and answer.actions.shape == (2, 3) and answer.action_now == (0.1, 0.0, 0.0)
    assert waits == [1.0] and len(server.bodies) == 2


def test_no_retry_when_retry_after_does_not_fit_the_deadline():
    server = _Server([(429, {"Retry-After": "2"}), (200, {})])
    robot, waits = _robot(server, deadline_s=1.0)
    with pytest.raises(ApiError) as shed:
        robot.act(FRAME, STATE)
    assert shed.value.status == 429 and shed.value.retry_after_s == 2.0
    assert waits == [] and len(server.bodies) == 1  # one try, not three
    assert "HTTP 429 overloaded: busy" in str(shed.value) and "/v1/act" in str(shed.value)


def test_a_stale_step_is_not_retried():
    server = _Server([(504, {}), (200, {})])
    robot, _ = _robot(server, deadline_s=5.0)
    with pytest.raises(ApiError) as stale:
        robot.act(FRAME, STATE)
    assert stale.value.status == 504 and stale.value.code == "deadline_exceeded" and len(server.bodies) == 1


def test_backoff_retries_stay_inside_the_call_deadline_and_send_the_budget():
    server = _Server([(503, {})] * 10)
    robot, waits = _robot(server, deadline_s=0.25, retries=5, backoff_s=0.05, send_deadline=True)
    with pytest.raises(ApiError) as unavailable:
        robot.act(FRAME, STATE)
    assert unavailable.value.status == 503
    assert sum(waits) < 0.25 and len(server.bodies) == len(waits) + 1 <= 3
    budgets = [body["deadline_ms"] for body in server.bodies]
    assert budgets[0] == 250 and budgets == sorted(budgets, reverse=True)  # what is left of the call's budget


def test_connection_errors_are_retried_then_reported_as_no_answer():
    refused = httpx.ConnectError("connection refused")
    server = _Server([(refused, {})] * 3)
    robot, waits = _robot(server, deadline_s=5.0, retries=2)
    with pytest.raises(NoAnswer) as lost:
        robot.act(FRAME, STATE)
    assert len(server.bodies) == 3 and len(waits) == 2 and lost.value.status is None
    assert "ConnectError" in str(lost.value) and robot.memory is None


def test_a_read_timeout_is_retried_for_idempotent_calls_only():
    # act and feedback are idempotent (same token -> same step; feedback keyed by robot/episode/step)
    server = _Server([(httpx.ReadTimeout("slow"), {}), (200, {})])
    robot, _ = _robot(server, deadline_s=5.0)
    assert robot.act(FRAME, STATE).memory == "m2.k.x.y"
    # a call the server may have applied is never sent twice; one that never left is
    once = Call("POST", "/v1/example", ends_at=10.0, fields={}, idempotent=False)
    policy = RetryPolicy(retries=2, backoff_s=0.01)
    assert policy.wait_before_retry(once, 0, httpx.ReadTimeout("slow"), now=0.0) is None
    assert policy.wait_before_retry(once, 0, httpx.ConnectError("refused"), now=0.0) is not None
    assert policy.wait_before_retry(once, 0, httpx.Response(502), now=0.0) is None  # a proxy may have passed it on
    assert policy.wait_before_retry(once, 0, httpx.Response(429, headers={"Retry-After": "1"}), now=0.0) == 1.0


def test_memory_is_kept_only_from_answers_and_dropped_when_refused():
    server = _Server([(200, {}), (503, {}), (200, {}), (400, {}), (200, {})])
    robot, _ = _robot(server, deadline_s=5.0)
    robot.act(FRAME, STATE)
    assert "memory" not in server.bodies[0] and robot.memory == "m2.k.x.y"
    robot.act(FRAME, STATE)  # a 503, then the retry: both carry the same token
    assert server.bodies[1]["memory"] == server.bodies[2]["memory"] == "m2.k.x.y"
    recovered = robot.act(FRAME, STATE)  # the server refuses the token: one more try without it
    assert server.bodies[3]["memory"] == "m2.k.x.y" and "memory" not in server.bodies[4]
    assert recovered.memory_reset and robot.memory == "m2.k.x.y"
    robot.start_episode("go to the blue ball")
    assert robot.memory is None and robot.step == 0


def test_the_measured_delay_and_step_cursor_are_sent_only_when_given():
    server = _Server([(200, {}), (200, {})])
    robot, _ = _robot(server, deadline_s=5.0)
    robot.act(FRAME, STATE)
    robot.act(FRAME, STATE, delay_ms=180, step=41)
    assert "delay_ms" not in server.bodies[0] and server.bodies[1]["delay_ms"] == 180.0
    assert "step" not in server.bodies[0] and server.bodies[1]["step"] == 41


def test_feedback_advances_the_step_only_once_stored_and_retries_a_full_disk():
    server = _Server([(507, {"Retry-After": "1"}), (202, {}), (422, {})])
    robot, waits = _robot(server, deadline_s=5.0)
    stored = robot.feedback(FRAME, STATE, [0.1, 0.0, 0.0], episode_done=False)
    assert stored.stored and stored.key == "r-1/ep/0" and robot.step == 1 and waits == [1.0]
    assert server.bodies[0] == server.bodies[1] and server.bodies[1]["step"] == 0  # the retry is the same key
    with pytest.raises(ApiError) as refused:
        robot.feedback(FRAME, STATE, [0.1, 0.0, 0.0])
    assert refused.value.status == 422 and robot.step == 1


def test_an_error_body_in_another_shape_is_named_with_its_status():
    def proxy(request):
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    robot = Client("http://policy", "t" * 32, "r-1", transport=httpx.MockTransport(proxy), retries=0)
    robot.start_episode("go")
    with pytest.raises(ApiError) as bad:
        robot.act(FRAME, STATE)
    assert bad.value.status == 502 and bad.value.code == "http_error" and "Bad Gateway" in str(bad.value)


def test_bad_arguments_are_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="deadline_s"):
        Client("http://policy", "t" * 32, "r-1", deadline_s=0)
    server = _Server([])
    robot, _ = _robot(server)
    with pytest.raises(ValueError, match="frame"):
        robot.act(np.zeros((8, 8), np.float32), STATE)
    with pytest.raises(ValueError, match="action_executed"):
        robot.feedback(FRAME, STATE, [0.1, 0.0])
    fresh = Client("http://policy", "t" * 32, "r-2", transport=httpx.MockTransport(server))
    with pytest.raises(ValueError, match="instruction"):
        fresh.act(FRAME, STATE)
    assert server.bodies == [] and "t" * 32 not in repr(robot)


def test_the_async_client_follows_the_same_rules():
    async def scenario():
        server = _Server([(429, {"Retry-After": "1"}), (200, {}), (400, {}), (200, {}), (429, {"Retry-After": "9"})])
        robot, waits = _async_robot(server, deadline_s=3.0)
        async with robot:
            first = await robot.act(FRAME, STATE)
            recovered = await robot.act(FRAME, STATE)
            with pytest.raises(ApiError) as shed:
                await robot.act(FRAME, STATE)
        return server, waits, first, recovered, shed.value

    server, waits, first, recovered, shed = asyncio.run(scenario())
    assert first.confidence == 0.9 and waits == [1.0]
    assert server.bodies[2]["memory"] == "m2.k.x.y" and "memory" not in server.bodies[3] and recovered.memory_reset
    assert shed.status == 429 and len(server.bodies) == 5  # Retry-After 9 s does not fit a 3 s deadline


def test_a_closed_port_is_no_answer_within_the_deadline():
    import socket

    with socket.socket() as probe:  # a port nobody listens on any more
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", "t" * 32, "r-1", deadline_s=2.0, retries=2, backoff_s=0.01) as robot:
        robot.start_episode("go")
        with pytest.raises(NoAnswer, match="ConnectError"):
            robot.act(FRAME, STATE)
