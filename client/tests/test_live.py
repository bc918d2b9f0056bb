"""Both clients against a real server (the platform's Serve app).

Point them at one with MOBILE_VLA_CLIENT_TEST_URL and MOBILE_VLA_CLIENT_TEST_TOKEN (a token with the
act and feedback scopes for robots `client-test-*`); without them these tests are skipped. The
platform's tests/serve/test_client_package.py starts the app and runs this file, in the platform's
environment and in a fresh virtual environment holding only this package.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from mobile_vla_client import ApiError, AsyncClient, Client

URL = os.environ.get("MOBILE_VLA_CLIENT_TEST_URL")
TOKEN = os.environ.get("MOBILE_VLA_CLIENT_TEST_TOKEN")
pytestmark = pytest.mark.skipif(not (URL and TOKEN), reason="no server: set MOBILE_VLA_CLIENT_TEST_URL and _TOKEN")
INSTRUCTION = "go to the red box"
FRAME = np.random.default_rng(3).integers(0, 255, (480, 640, 3), dtype=np.uint8)  # a camera's VGA frame


def _client(robot_id: str, **options) -> Client:
    return Client(URL, TOKEN, robot_id=robot_id, timeout_s=30, **options)


def test_act_carries_the_memory_and_feedback_is_stored():
    with _client("client-test-1") as robot:
        model = robot.model_info()
        state = [0.0] * model.state_dim
        robot.start_episode(INSTRUCTION, episode_id="ep-1")
        first = robot.act(FRAME, state)
        sent = robot.memory
        second = robot.act(FRAME, state)
        assert first.actions.shape == (model.chunk, 3) and np.isfinite(first.actions).all()
        assert 0.0 <= first.confidence <= 1.0 and first.model.version == model.version
        assert robot.memory == second.memory and robot.memory not in (None, sent) and not second.memory_reset
        assert first.round_trip_ms >= first.latency_ms > 0

        robot.memory = sent[:-4] + "AAAA"  # a token the server refuses (e.g. after a secret rotation)
        recovered = robot.act(FRAME, state)
        assert recovered.memory_reset and np.allclose(recovered.actions, first.actions, atol=1e-5)  # fresh state

        stored = robot.feedback(FRAME, state, first.action_now, episode_done=True, success=True)
        assert stored.stored and stored.key == "client-test-1/ep-1/0" and robot.step == 1


def test_refusals_name_the_status_and_the_servers_error():
    with _client("client-test-2") as robot:
        robot.start_episode(INSTRUCTION)
        with pytest.raises(ApiError) as refused:
            robot.act(FRAME, [0.0] * 65)  # more state values than any model takes
        assert refused.value.status == 422 and refused.value.code == "invalid_request"
        assert "state" in refused.value.message and "HTTP 422 invalid_request" in str(refused.value)
    with Client(URL, "not-a-token-of-this-server", robot_id="client-test-2", timeout_s=30) as stranger:
        stranger.start_episode(INSTRUCTION)
        with pytest.raises(ApiError) as unauthorized:
            stranger.act(FRAME, [0.0, 0.0, 0.0])
        assert unauthorized.value.status == 401 and unauthorized.value.code == "unauthorized"


def test_async_robots_step_together_each_with_its_own_memory():
    async def fleet():
        robots = [AsyncClient(URL, TOKEN, robot_id=f"client-test-a{i}", timeout_s=30) for i in range(4)]
        try:
            state = [0.0] * (await robots[0].model_info()).state_dim
            for robot in robots:
                robot.start_episode(INSTRUCTION)
            first = await asyncio.gather(*(robot.act(FRAME, state) for robot in robots))
            tokens = [robot.memory for robot in robots]
            second = await asyncio.gather(*(robot.act(FRAME, state) for robot in robots))
            return first, tokens, second, [robot.memory for robot in robots]
        finally:
            await asyncio.gather(*(robot.close() for robot in robots))

    first, tokens, second, after = asyncio.run(fleet())
    assert len(set(tokens)) == 4  # each robot's token is its own (signed for its robot id)
    assert all(not answer.memory_reset for answer in second) and all(a != b for a, b in zip(tokens, after))
    for one, other in zip(first[1:], first[:-1]):  # same frame, same state, fresh memory: the same chunk
        assert np.allclose(one.actions, other.actions, atol=1e-5)


def test_the_binary_wire_gets_the_json_wires_answer():
    with _client("client-test-b1", wire="binary") as binary, _client("client-test-b1") as as_json:
        state = [0.0] * binary.model_info().state_dim
        for robot in (binary, as_json):
            robot.start_episode(INSTRUCTION)
        first, same = binary.act(FRAME, state), as_json.act(FRAME, state)
        assert np.allclose(first.actions, same.actions, atol=1e-5) and first.model == same.model
        second = binary.act(FRAME, state)  # the memory token travels in X-Act-Fields
        assert not second.memory_reset and binary.memory == second.memory != first.memory
        with pytest.raises(ApiError) as refused:
            binary.act(FRAME[:, :, :3].tobytes()[:100], state)  # bytes that are no JPEG, sent as they are
        assert refused.value.status == 400 and refused.value.code == "invalid_image"
