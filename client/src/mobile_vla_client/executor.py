"""Chunk execution on the robot: run the current action chunk at the control rate while the next
request is in flight (docs/http_api.md "Chunk execution").

The core, `ChunkExecutor`, does no I/O and reads no clock: it holds the chunk being executed, indexed
by control step, and answers "which action now?" for a step cursor that the caller advances once per
control tick. A new answer is taken in with `accept(actions, anchor_step, model_version)`:

- **skip**: `actions[i]` is for step `anchor_step + i` (the server echoes the request's `step` as
  `anchor_step`); rows for steps the robot has already passed while the request was in flight are
  dropped (overtaken);
- **aligned replace**: the remaining rows replace the current chunk from the current step on;
- **blend**: over the first `blend_steps` steps after the seam the command moves linearly from the
  old chunk's to the new chunk's (weight of the new one (j + 1) / (blend_steps + 1) at the j-th step),
  where the old chunk still has a row for that step;
- **model-version change**: a chunk of another model version replaces without blending (two models'
  plans do not mix), and so does a chunk accepted with `blend=False` (e.g. a safety stop: zeros at once).

A chunk all of whose rows are overtaken, or one anchored before the chunk being executed (an answer
that arrived out of order), is ignored. Past the end of its chunk the robot gets zeros (stand still):
`exhausted` says so.

`ChunkRunner` is the thin threaded driver: one request in flight at a time on a `Client`, the executor
ticked at `control_hz`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

ACTION_DIM = 3  # linear_x m/s, linear_y m/s, angular_z rad/s


@dataclass(frozen=True)
class Accepted:
    """What `ChunkExecutor.accept` did with an answer."""

    used: bool  # the chunk replaced the current one (False: ignored, see `reason`)
    skipped: int  # rows already overtaken when it arrived (steps anchor_step .. step - 1)
    blended: int  # steps after the seam whose command mixes the old chunk's and the new one's
    reason: str  # replaced | version_change | no_blend | first | overtaken | out_of_order


class ChunkExecutor:
    """The action for each control step from the latest action chunk (pure: no clock, no I/O).

        executor = ChunkExecutor(blend_steps=2)
        executor.accept(answer.actions, answer.anchor_step, answer.model.version)  # when an answer arrives
        action = executor.tick()  # once per control tick: float64 [3] for the step `executor.step`, then step += 1

    `step` is the robot's step cursor: the step the next `tick()` executes. Send it as the request's
    `step` when the frame is taken (`Client.act(..., step=executor.step)`).
    """

    def __init__(self, blend_steps: int = 2, start_step: int = 0) -> None:
        if isinstance(blend_steps, bool) or not isinstance(blend_steps, int) or blend_steps < 0:
            raise ValueError(f"blend_steps: expected a whole number >= 0, got {blend_steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step: expected a whole number >= 0, got {start_step!r}")
        self.blend_steps = blend_steps
        self.step = start_step
        self._chunk = np.zeros((0, ACTION_DIM))  # float64 [R, 3]: row r is for step self._first + r
        self._first = start_step
        self._anchor: int | None = None  # anchor_step of the chunk being executed
        self._version: str | None = None
        self._blend_until = start_step  # steps < this mix self._old in
        self._old = np.zeros((0, ACTION_DIM))  # float64 [R', 3]: the previous chunk from self._first
        self.last_seam_step: int | None = None  # the first step executed from the latest accepted chunk

    @property
    def model_version(self) -> str | None:
        """The model version of the chunk being executed (None before the first, or when not given)."""
        return self._version

    @property
    def exhausted(self) -> bool:
        """No row of the current chunk is left for the current step: `tick()` gives zeros (stand still)."""
        return not 0 <= self.step - self._first < len(self._chunk)

    def remaining(self) -> int:
        """Rows of the current chunk left from the current step on."""
        return max(0, self._first + len(self._chunk) - self.step)

    def accept(
        self,
        actions: Sequence[Sequence[float]] | np.ndarray,
        anchor_step: int,
        model_version: str | None = None,
        blend: bool = True,
    ) -> Accepted:
        """Takes in an answer's chunk, `actions[i]` for step `anchor_step + i`; see the module docstring."""
        chunk = np.asarray(actions, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM or not len(chunk):
            raise ValueError(f"actions: expected K x {ACTION_DIM} with K >= 1, got shape {list(chunk.shape)}")
        if not np.isfinite(chunk).all():
            raise ValueError("actions: not all finite")
        anchor = int(anchor_step)
        if anchor > self.step:
            raise ValueError(f"anchor_step {anchor} is ahead of the step cursor {self.step}: send the cursor as `step`")
        skipped = max(0, self.step - anchor)
        if self._anchor is not None and anchor < self._anchor:
            return Accepted(False, skipped, 0, "out_of_order")
        if skipped >= len(chunk):
            return Accepted(False, skipped, 0, "overtaken")
        version = None if model_version is None else str(model_version)
        first_chunk = self._anchor is None
        changed = not first_chunk and version is not None and self._version is not None and version != self._version
        old = self._rows_from(self.step)  # [R', 3]: what the old chunk still had for steps >= self.step
        if first_chunk:
            reason = "first"
        elif changed:
            reason = "version_change"
        elif not blend:
            reason = "no_blend"
        else:
            reason = "replaced"
        mixing = reason == "replaced"
        blended = min(self.blend_steps, len(chunk) - skipped, len(old)) if mixing else 0
        self._old = old if blended else np.zeros((0, ACTION_DIM))
        self._chunk, self._first = chunk[skipped:], self.step
        self._anchor, self._version = anchor, version if version is not None else self._version
        self._blend_until = self.step + blended
        self.last_seam_step = self.step
        return Accepted(True, skipped, blended, reason)

    def action_at(self, step: int) -> np.ndarray:
        """The command for `step` from the current chunk (blended near the seam), float64 [3]; zeros
        outside it. Does not move the cursor.
        """
        r = step - self._first
        if not 0 <= r < len(self._chunk):
            return np.zeros(ACTION_DIM)
        action = self._chunk[r]
        if step < self._blend_until and r < len(self._old):
            weight = (r + 1) / (self.blend_steps + 1)  # of the new chunk
            action = weight * action + (1.0 - weight) * self._old[r]
        return action.copy()

    def tick(self) -> np.ndarray:
        """The command to execute now (float64 [3]), and the cursor moves to the next step."""
        action = self.action_at(self.step)
        self.step += 1
        return action

    def _rows_from(self, step: int) -> np.ndarray:
        """The rows of the current chunk, as executed (blend included), for steps `step`, `step + 1`, ..."""
        r = max(0, step - self._first)
        return np.array([self.action_at(self._first + i) for i in range(r, len(self._chunk))]).reshape(-1, ACTION_DIM)


class ChunkRunner:
    """The threaded driver: ticks a `ChunkExecutor` at `control_hz` and keeps one `/v1/act` request in
    flight on `client` (a `mobile_vla_client.Client`), sending the step cursor and the measured delay.

        runner = ChunkRunner(client, camera.frame, odometry, base.send_velocity, control_hz=5.0)
        runner.run(until=lambda: done)  # blocks; or run_for(steps)

    `frame()` gives the camera frame now (and optionally its age in ms as `(frame, age_ms)`); `state()`
    the robot state; `send(linear_x, linear_y, angular_z)` commands the base. A call that fails
    (`ClientError`) is counted in `errors` and the next request goes out at the next tick; the robot
    keeps executing what is left of its chunk and then stands still (`last_error` keeps the exception).
    An answer whose safety decision is stop or handover, or whose confidence is under `min_confidence`,
    replaces the chunk at once with zeros (no blending). `reset()` at a new episode drops the chunk and
    ignores the answer in flight.
    """

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
        sleep: Callable[[float], None] = time.sleep,
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
        self._clock, self._sleep = clock, sleep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-request")
        self._in_flight: Future | None = None
        self._sent_step = 0
        self._round_trip_ms = 0.0
        self._stop = threading.Event()

    def tick(self) -> np.ndarray:
        """One control tick: take in an answer that has arrived, send the next request if none is in
        flight, execute the command for this step; returns it.
        """
        self._collect()
        if self._in_flight is None:
            self._request()
        action = self.executor.tick()
        self.send(float(action[0]), float(action[1]), float(action[2]))
        return action

    def run(self, until: Callable[[], bool]) -> None:
        """Ticks at the control rate until `until()` is true or `stop()` is called."""
        next_at = self._clock()
        while not until() and not self._stop.is_set():
            self.tick()
            next_at += self.period_s
            self._sleep(max(0.0, next_at - self._clock()))

    def stop(self) -> None:
        self._stop.set()

    def reset(self) -> None:
        """A new episode: no chunk (stand still until the next answer), the answer in flight ignored."""
        self.executor = ChunkExecutor(self.blend_steps, start_step=self.executor.step)
        self._generation += 1

    def close(self) -> None:
        """Stops the loop and waits for the request in flight."""
        self._stop.set()
        self._pool.shutdown(wait=True)

    def _request(self) -> None:
        got = self.frame()
        frame, age_ms = got if isinstance(got, tuple) else (got, 0.0)
        step, delay_ms = self.executor.step, age_ms + self._round_trip_ms
        state = list(self.state())
        self._in_flight = self._pool.submit(self.client.act, frame, state, delay_ms=delay_ms, step=step)
        self._sent_step = step  # the anchor when the server does not echo one
        self._sent_generation = self._generation

    def _collect(self) -> None:
        future = self._in_flight
        if future is None or not future.done():
            return
        self._in_flight = None
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
