"""The robot client's retry rules (issue 16): one total deadline per call, the server's Retry-After
honoured, no retry that cannot finish in time; over httpx's in-memory transport, on a fake clock."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from mobile_vla.client import ApiError, RobotClient

FRAME = np.zeros((32, 32, 3), np.uint8)
ANSWER = {
    "actions": [[0.1, 0.0, 0.0]],
    "confidence": 0.9,
    "memory": "m1.x.y",
    "model": {"name": "m", "version": "1"},
    "backend": "onnx-cpu",
    "memory_reset": False,
    "latency_ms": 5.0,
}


class _Server:
    """Answers each POST with the next (status, headers) in `script` (200 = a normal answer)."""

    def __init__(self, script):
        self.script, self.bodies = list(script), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(request.read())
        status, headers = self.script.pop(0)
        if status == 200:
            return httpx.Response(200, json=ANSWER)
        body = {"error": {"code": "overloaded" if status == 429 else "unavailable", "message": "busy"}}
        return httpx.Response(status, json=body, headers=headers)


def _robot(server: _Server, **options) -> tuple[RobotClient, list[float]]:
    now, waits = [0.0], []
    robot = RobotClient("http://policy", "t" * 32, "r-1", transport=httpx.MockTransport(server), **options)

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    robot._clock, robot._sleep = (lambda: now[0]), sleep
    robot.start_episode("go to the red box")
    return robot, waits


def test_retry_after_is_waited_when_it_fits_the_call_deadline():
    server = _Server([(429, {"Retry-After": "1"}), (200, {})])
    robot, waits = _robot(server, deadline_s=3.0)
    assert robot.act(FRAME, [0.0, 0.0, 0.0]).confidence == 0.9
    assert waits == [1.0] and len(server.bodies) == 2


def test_no_retry_when_retry_after_does_not_fit_the_deadline():
    server = _Server([(429, {"Retry-After": "2"}), (200, {})])
    robot, waits = _robot(server, deadline_s=1.0)
    with pytest.raises(ApiError) as shed:
        robot.act(FRAME, [0.0, 0.0, 0.0])
    assert shed.value.status == 429 and waits == [] and len(server.bodies) == 1  # one try, not three


def test_a_stale_step_is_not_retried():
    server = _Server([(504, {}), (200, {})])
    robot, _ = _robot(server, deadline_s=5.0)
    with pytest.raises(ApiError) as stale:
        robot.act(FRAME, [0.0, 0.0, 0.0])
    assert stale.value.status == 504 and len(server.bodies) == 1


def test_backoff_retries_stay_inside_the_call_deadline_and_send_the_budget():
    server = _Server([(503, {})] * 10)
    robot, waits = _robot(server, deadline_s=0.25, retries=5, backoff_s=0.05, send_deadline=True)
    with pytest.raises(ApiError):
        robot.act(FRAME, [0.0, 0.0, 0.0])
    assert sum(waits) < 0.25 and len(server.bodies) == len(waits) + 1 <= 3
    budgets = [json.loads(body)["deadline_ms"] for body in server.bodies]
    assert budgets[0] == 250 and budgets == sorted(budgets, reverse=True)  # what is left of the call's budget


def test_deadline_must_be_positive():
    with pytest.raises(ValueError):
        RobotClient("http://policy", "t" * 32, "r-1", deadline_s=0)
