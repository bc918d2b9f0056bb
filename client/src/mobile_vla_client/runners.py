"""The drivers of chunk execution (docs/http_api.md "Chunk execution"): a `ChunkExecutor` ticked at the
control rate with one `/v1/act` request in flight, on a thread (`ChunkRunner`, over a `Client`) or on an
asyncio event loop (`AsyncChunkRunner`, over an `AsyncClient`).

Both are one `_ChunkDriver`: what a tick does (take in an answer that has arrived, send the next request
when none is in flight, execute this step's action), what a request carries (the newest frame, the state,
`step` = the step cursor, `delay_ms` = frame age + last round trip), how an answer is taken in (a past
episode's dropped, a safety stop or a low confidence replaced by zeros at once) and when the next tick is
due. The two differ only in how a request is started (a thread pool's future, an asyncio task: both
answer `done()`, `cancelled()` and `result()`) and in how the wait between ticks is slept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mobile_vla_client.executor import ChunkExecutor


class _ChunkDriver:
    """What `ChunkRunner` and `AsyncChunkRunner` share, their arguments included (see `ChunkRunner`);
    `sleep` None: the runner's own (`time.sleep`, `asyncio.sleep`).
    """

    _default_sleep: Callable[[float], Any]

    def __init__(
        self,
        client: Any,
        frame: Callable[[], Any],
        state: Callable[[], Sequence[float]],
        send: Callable[[float, float, float], None],
        control_hz: float,
        blend_steps: int = 2,
        min_confidence: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        if not control_hz > 0:
            raise ValueError(f"control_hz: expected > 0, got {control_hz!r}")
        self.client, self.frame, self.state, self.send = client, frame, state, send
        self.period_s = 1.0 / control_hz
        self.blend_steps, self.min_confidence = blend_steps, min_confidence
        self.executor = ChunkExecutor(blend_steps)
        self.errors = 0
        self.last_answer = None
        self.last_error: BaseException | None = None
        self._generation = self._sent_generation = 0
        self._clock = clock
        self._sleep = self._default_sleep if sleep is None else sleep
        self._in_flight: Any = None  # the request's future (concurrent.futures.Future or asyncio.Task), or None
        self._sent_step = 0
        self._round_trip_ms = 0.0
        self._stop = threading.Event()  # stop() may come from another thread

    def tick(self) -> np.ndarray:
        """One control tick: take in an answer that has arrived, send the next request if none is in
        flight, execute the command for this step; returns it (float64 [3]).
        """
        self._collect()
        if self._in_flight is None:
            self._request()
        action = self.executor.tick()
        self.send(float(action[0]), float(action[1]), float(action[2]))
        return action

    def stop(self) -> None:
        """Ends `run` after the tick under way."""
        self._stop.set()

    def reset(self) -> None:
        """A new episode: no chunk (stand still until the next answer), the answer in flight ignored."""
        self.executor = ChunkExecutor(self.blend_steps, start_step=self.executor.step)
        self._generation += 1

    def _ticks(self, until: Callable[[], bool]) -> Iterator[float]:
        """Ticks at the control rate until `until()` is true or `stop()` is called; after each tick,
        yields the seconds to wait before the next (0 when a tick ran late: the schedule catches up).
        """
        next_at = self._clock()
        while not until() and not self._stop.is_set():
            self.tick()
            next_at += self.period_s
            yield max(0.0, next_at - self._clock())

    def _start(self, frame: Any, state: list[float], delay_ms: float, step: int) -> Any:
        """Starts `client.act(frame, state, delay_ms=, step=)` without waiting; its future."""
        raise NotImplementedError

    def _request(self) -> None:
        got = self.frame()
        frame, age_ms = got if isinstance(got, tuple) else (got, 0.0)
        step, delay_ms = self.executor.step, age_ms + self._round_trip_ms
        self._in_flight = self._start(frame, list(self.state()), delay_ms, step)
        self._sent_step = step  # the anchor when the server does not echo one
        self._sent_generation = self._generation

    def _collect(self) -> None:
        future = self._in_flight
        if future is None or not future.done():
            return
        self._in_flight = None
        if future.cancelled():  # cancelled from outside (e.g. the loop shutting down): nothing to take in
            return
        try:
            answer = future.result()
        except Exception as exc:  # ClientError (NoAnswer, ApiError) or a transport fault: try again next tick
            self.errors, self.last_error = self.errors + 1, exc
            return
        self.last_answer, self._round_trip_ms = answer, answer.round_trip_ms
        if self._sent_generation != self._generation:  # sent before reset(): another episode's answer
            return
        anchor = answer.anchor_step if answer.anchor_step is not None else self._sent_step
        stop = (answer.safety is not None and answer.safety.must_stop) or answer.confidence < self.min_confidence
        actions = np.zeros_like(answer.actions) if stop else answer.actions
        self.executor.accept(actions, anchor, answer.model.version, blend=not stop)


class ChunkRunner(_ChunkDriver):
    """The threaded driver: ticks a `ChunkExecutor` at `control_hz` and keeps one `/v1/act` request in
    flight on `client` (a `mobile_vla_client.Client`, called from a worker thread), sending the step
    cursor and the measured delay.

        runner = ChunkRunner(client, camera.frame, odometry, base.send_velocity, control_hz=5.0)
        runner.run(until=lambda: done)  # blocks; or call runner.tick() from the robot's own timer

    `frame()` gives the camera frame now (and optionally its age in ms as `(frame, age_ms)`); `state()`
    the robot state; `send(linear_x, linear_y, angular_z)` commands the base. A call that fails
    (`ClientError`) is counted in `errors` and the next request goes out at the next tick; the robot
    keeps executing what is left of its chunk and then stands still (`last_error` keeps the exception).
    An answer whose safety decision is stop or handover, or whose confidence is under `min_confidence`,
    replaces the chunk at once with zeros (no blending). `reset()` at a new episode drops the chunk and
    ignores the answer in flight. `clock` and `sleep` pace `run` (tests pass fakes).
    """

    _default_sleep = staticmethod(time.sleep)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-request")

    def run(self, until: Callable[[], bool]) -> None:
        """Ticks at the control rate until `until()` is true or `stop()` is called (blocks)."""
        for wait_s in self._ticks(until):
            self._sleep(wait_s)

    def close(self) -> None:
        """Stops the loop and waits for the request in flight."""
        self._stop.set()
        self._pool.shutdown(wait=True)

    def _start(self, frame: Any, state: list[float], delay_ms: float, step: int) -> Any:
        return self._pool.submit(self.client.act, frame, state, delay_ms=delay_ms, step=step)


class AsyncChunkRunner(_ChunkDriver):
    """The asyncio driver: `ChunkRunner`'s behaviour (arguments and rules as its) on an event loop, over
    an `AsyncClient`: the request in flight is a task on the loop, so many robots' runners share one loop.

        async with AsyncClient(url, token, robot_id="r-17") as robot:
            robot.start_episode("go to the red box")
            runner = AsyncChunkRunner(robot, camera.frame, odometry, base.send_velocity, control_hz=5.0)
            await runner.run(until=lambda: done)  # or runner.tick() from a loop of your own
            await runner.close()

    `tick()` must be called on the running loop (it starts the request as a task there); `frame()`,
    `state()` and `send()` are plain functions called on the loop, so they must not block (give the
    newest frame held, not wait for the next). `sleep` is awaited between ticks (default `asyncio.sleep`).
    """

    _default_sleep = staticmethod(asyncio.sleep)  # a `sleep` given must be awaitable too

    async def run(self, until: Callable[[], bool]) -> None:
        """Ticks at the control rate until `until()` is true or `stop()` is called."""
        for wait_s in self._ticks(until):
            await self._sleep(wait_s)

    async def close(self) -> None:
        """Stops the loop and waits for the request in flight (its outcome is not taken in)."""
        self._stop.set()
        if self._in_flight is not None:
            await asyncio.gather(self._in_flight, return_exceptions=True)

    def _start(self, frame: Any, state: list[float], delay_ms: float, step: int) -> Any:
        return asyncio.get_running_loop().create_task(self.client.act(frame, state, delay_ms=delay_ms, step=step))
