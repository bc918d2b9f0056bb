"""ChunkRunner (a thread) and AsyncChunkRunner (an asyncio loop): the same bookkeeping, checked on both
with requests the test answers by hand (no threads or timers that matter), the control-rate schedule on
a fake clock, and the asyncio runner end to end over httpx's in-memory transport with a real AsyncClient."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future

import httpx
import numpy as np
import pytest

from mobile_vla_client import ActResult, AsyncChunkRunner, AsyncClient, ChunkRunner, ModelRef, Safety


def _chunk(base: float, k: int = 5) -> np.ndarray:
    """K x 3 rows whose linear_x is base, base + 1, ... (row i identifies itself)."""
    return np.stack([np.array([base + i, 0.0, 0.0]) for i in range(k)])


def _answer(actions, anchor, version="1", level="normal", round_trip_ms=150.0):
    return ActResult(
        actions=np.asarray(actions, np.float64),
        confidence=0.9,
        memory="m",
        model=ModelRef("m", version),
        backend="onnx-cpu",
        memory_reset=False,
        latency_ms=5.0,
        round_trip_ms=round_trip_ms,
        anchor_step=anchor,
        safety=Safety(level),
    )


class _Pool:
    """Stands in for ChunkRunner's thread pool: the call is made at once, its future stays pending."""

    def __init__(self, pending: list):
        self.pending = pending

    def submit(self, fn, *args, **kwargs):
        fn(*args, **kwargs)
        self.pending.append(Future())
        return self.pending[-1]

    def shutdown(self, wait=True):
        pass


class _Robot:
    """One runner, threaded or asyncio, behind the same three calls: tick, answer request i, close.

    The fake client records each act call; the answer to request i comes when the test gives it. The
    asyncio runner lives on a loop of its own that runs only inside tick() and close(), a few turns before
    the tick so that an answered request's task has finished, as it would have between two real ticks.
    """

    def __init__(self, kind: str, frame, state, **options):
        self.kind, self.calls, self.sent, self.pending = kind, [], [], []

        def send(*action):
            self.sent.append(action)

        if kind == "thread":
            self.runner = ChunkRunner(self, frame, state, send, 5.0, **options)
            self.runner._pool = _Pool(self.pending)
        else:
            self.loop = asyncio.new_event_loop()
            self.runner = AsyncChunkRunner(self, frame, state, send, 5.0, **options)

    def act(self, frame, state, delay_ms=None, step=None):
        self.calls.append({"state": state, "delay_ms": delay_ms, "step": step})
        if self.kind == "thread":
            return None
        self.pending.append(self.loop.create_future())
        return self._answered(self.pending[-1])  # a coroutine, as AsyncClient.act gives

    @staticmethod
    async def _answered(future):
        return await future

    def tick(self):
        if self.kind == "thread":
            return self.runner.tick()

        async def turns_then_tick():
            for _ in range(3):
                await asyncio.sleep(0)
            return self.runner.tick()

        return self.loop.run_until_complete(turns_then_tick())

    def answer(self, i: int, outcome) -> None:
        future = self.pending[i]
        future.set_exception(outcome) if isinstance(outcome, BaseException) else future.set_result(outcome)

    def close(self) -> None:
        if self.kind == "thread":
            self.runner.close()
        else:  # close() waits for the request in flight: one the test left unanswered is cancelled first
            for future in self.pending:
                future.cancel()
            self.loop.run_until_complete(self.runner.close())
            self.loop.close()


KINDS = ["thread", "asyncio"]


@pytest.mark.parametrize("kind", KINDS)
def test_one_request_in_flight_with_the_step_cursor_and_delay_while_the_chunk_executes(kind):
    robot = _Robot(kind, lambda: ("frame", 20.0), lambda: [0.0, 0.0, 0.0])
    robot.tick()  # step 0: request 0 goes out with step 0; no chunk yet: stand still
    robot.answer(0, _answer(_chunk(10), anchor=0))
    robot.tick()  # step 1: the answer is taken in (row 0 overtaken), request 1 goes out with step 1
    robot.tick()  # step 2: request 1 still in flight, the chunk goes on
    assert [c["step"] for c in robot.calls] == [0, 1]
    assert robot.calls[0]["delay_ms"] == 20.0 and robot.calls[1]["delay_ms"] == 170.0  # frame age + round trip
    robot.answer(1, _answer(np.zeros((5, 3)), anchor=1, level="stop"))
    robot.tick()  # step 3: a stop answer replaces at once, no blending
    robot.answer(2, TimeoutError("no answer"))
    robot.tick()  # step 4: the failed call is counted, the next one goes out
    assert [a[0] for a in robot.sent] == [0.0, 11.0, 12.0, 0.0, 0.0]
    assert robot.runner.errors == 1 and isinstance(robot.runner.last_error, TimeoutError) and len(robot.calls) == 4
    robot.close()


@pytest.mark.parametrize("kind", KINDS)
def test_aligned_replace_blends_at_the_seam_and_a_version_change_does_not(kind):
    robot = _Robot(kind, lambda: "frame", lambda: [], blend_steps=1)
    robot.tick()  # step 0: request 0
    robot.answer(0, _answer(_chunk(10, k=8), anchor=0, version="1"))
    robot.tick()  # step 1: row 1 of chunk 10 (11); request 1 (step 1)
    robot.answer(1, _answer(_chunk(20, k=8), anchor=1, version="1"))
    robot.tick()  # step 2: chunk 20 from row 1, blended half with the old chunk's row 2: (21 + 12) / 2
    robot.tick()  # step 3: 22, past the blend; request 2 went out at step 2
    robot.answer(2, _answer(_chunk(30, k=8), anchor=2, version="2"))
    robot.tick()  # step 4: another model version: row 2 of chunk 30 (32) at once, no blend
    assert [a[0] for a in robot.sent] == [0.0, 11.0, 16.5, 22.0, 32.0]
    assert robot.runner.executor.model_version == "2"
    robot.close()


@pytest.mark.parametrize("kind", KINDS)
def test_low_confidence_stops_and_the_answer_of_a_past_episode_is_dropped(kind):
    robot = _Robot(kind, lambda: "frame", lambda: [], min_confidence=0.95)
    robot.tick()  # step 0: request 0 (confidence 0.9 < 0.95 when it comes)
    robot.answer(0, _answer(_chunk(10), anchor=0))
    robot.tick()  # step 1: zeros instead of 11; request 1
    robot.runner.reset()  # a new episode while request 1 is in flight
    robot.answer(1, _answer(_chunk(20), anchor=1))
    robot.runner.min_confidence = 0.0
    robot.tick()  # step 2: request 1's answer is ignored; request 2 goes out
    robot.answer(2, _answer(_chunk(30), anchor=2))
    robot.tick()  # step 3: request 2's chunk, row 1
    assert [a[0] for a in robot.sent] == [0.0, 0.0, 0.0, 31.0] and [c["step"] for c in robot.calls] == [0, 1, 2, 3]
    robot.close()


# -- run(): the control-rate schedule on a fake clock -----------------------------------------------------
class _Clock:
    """A fake clock that sleeping moves; a tick may cost `tick_cost_s` of it (through send)."""

    def __init__(self, tick_cost_s):
        self.now, self.waits, self.tick_cost_s = 0.0, [], list(tick_cost_s)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(round(seconds, 9))
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)
        for _ in range(10):  # the loop turns: a request answered at once finishes meanwhile
            await asyncio.sleep(0)

    def send(self, *action) -> None:
        self.now += self.tick_cost_s.pop(0) if self.tick_cost_s else 0.0


class _InstantClient:
    """Answers every act at once with a chunk anchored at its step: row i is 100 * request + i."""

    def __init__(self):
        self.steps = []

    def act(self, frame, state, delay_ms=None, step=None):
        self.steps.append(step)
        return _answer(_chunk(100.0 * len(self.steps)), anchor=step)


class _InstantAsyncClient(_InstantClient):
    async def act(self, frame, state, delay_ms=None, step=None):
        return _InstantClient.act(self, frame, state, delay_ms, step)


@pytest.mark.parametrize("kind", KINDS)
def test_run_ticks_on_the_control_schedule_and_catches_up_after_a_late_tick(kind):
    clock = _Clock([0.0, 0.35, 0.0, 0.0])  # the 2nd tick takes 0.35 s at 5 Hz (0.2 s period)
    ticks = []

    def until() -> bool:
        ticks.append(clock.now)
        if len(ticks) == 5:
            runner.stop()  # ends the loop before a 5th tick
        return False

    if kind == "thread":
        runner = ChunkRunner(_InstantClient(), lambda: "f", lambda: [], clock.send, 5.0, clock=clock, sleep=clock.sleep)
        runner.run(until)
        runner.close()
    else:
        client = _InstantAsyncClient()
        runner = AsyncChunkRunner(
            client, lambda: "f", lambda: [], clock.send, 5.0, clock=clock, sleep=clock.async_sleep
        )

        async def run_and_close():
            await runner.run(until)
            await runner.close()

        asyncio.run(run_and_close())
    assert clock.waits == [0.2, 0.0, 0.05, 0.2]  # tick 2 ran late: the next one at once, then back on 0.2 s steps
    assert ticks == pytest.approx([0.0, 0.2, 0.55, 0.6, 0.8])  # the schedule: 0, 0.2, (0.4 late), 0.6, 0.8
    assert runner.executor.step == 4


def test_the_async_runner_over_a_real_async_client_sends_the_cursor_and_executes_the_answers():
    bodies = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read())
        bodies.append(body)
        n = len(bodies)  # the n-th answer's rows are 10 n, 10 n + 1, ...
        actions = [[10.0 * n + i, 0.0, 0.0] for i in range(4)]
        answer = {
            "actions": actions,
            "confidence": 0.9,
            "memory": f"m{n}",
            "model": {"name": "m", "version": "1"},
            "backend": "onnx-cpu",
            "memory_reset": False,
            "latency_ms": 5.0,
            "anchor_step": body["step"],
        }
        return httpx.Response(200, json=answer)

    clock, sent = _Clock([]), []

    async def main():
        transport = httpx.MockTransport(server)
        async with AsyncClient("http://policy", "token", robot_id="r-1", transport=transport) as robot:
            robot.start_episode("go to the red box")
            runner = AsyncChunkRunner(
                robot,
                lambda: (np.zeros((8, 8, 3), np.uint8), 30.0),
                lambda: [0.0, 0.0, 0.0],
                lambda *a: sent.append(a[0]),
                control_hz=5.0,
                blend_steps=0,
                clock=clock,
                sleep=clock.async_sleep,
            )
            await runner.run(until=lambda: len(sent) >= 4)
            await runner.close()
            return runner

    runner = asyncio.run(main())
    # each answer arrives while the runner sleeps: taken in at the next tick, its row 0 (the step it was
    # sent at) overtaken, so the robot executes row 1 and the next request goes out at once
    assert [b["step"] for b in bodies] == [0, 1, 2, 3]
    assert all(b["delay_ms"] >= 30.0 for b in bodies) and bodies[1]["memory"] == "m1"  # frame age + round trip
    assert sent == [0.0, 11.0, 21.0, 31.0] and runner.errors == 0
