"""`Client` (blocking) and `AsyncClient` (asyncio): one robot's connection to the policy server.

    with Client("http://127.0.0.1:8000", token, robot_id="r-17") as robot:
        robot.start_episode("go to the red box")
        answer = robot.act(frame, state=[0.0, 0.0, 0.0])   # frame: uint8 [H, W, 3], PIL image or JPEG bytes
        send_velocity(*answer.action_now)

    async with AsyncClient(url, token, robot_id="r-17") as robot:
        robot.start_episode("go to the red box")
        answer = await robot.act(frame, state=[0.0, 0.0, 0.0])

Both build their requests and read their answers with the same core (`mobile_vla_client.core`); they
differ only in how a try is sent and how a retry waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

from mobile_vla_client.answers import ActResult, FeedbackResult, ModelSummary
from mobile_vla_client.core import SLEEP, Call, RetryPolicy, RobotSession, Steps, act_attempts, attempts
from mobile_vla_client.wire import Frame, wire_named


class _ClientBase:
    """What both clients hold: the robot's session, the retry policy, the wire format and the deadlines."""

    _clock = staticmethod(time.monotonic)  # the deadlines' clock (tests replace it, and the retry wait)

    def __init__(
        self,
        base_url: str,
        token: str,
        robot_id: str,
        *,
        timeout_s: float = 1.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        jpeg_quality: int = 85,
        deadline_s: float | None = None,
        send_deadline: bool = False,
        wire: str = "json",
    ):
        deadline_s = timeout_s if deadline_s is None else deadline_s
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not 1 <= jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {jpeg_quality!r}")
        self.session = RobotSession(robot_id, jpeg_quality)
        self.policy = RetryPolicy(retries, backoff_s)
        self.wire = wire_named(wire)()  # how bodies go on the wire: "json" (base64 frame) or "binary"
        self.deadline_s = deadline_s  # total per call, retries included
        self.send_deadline = send_deadline
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    # -- the robot's session -------------------------------------------------------------------------
    @property
    def robot_id(self) -> str:
        return self.session.robot_id

    @property
    def memory(self) -> str | None:
        """The memory token the next act sends (None: a fresh memory)."""
        return self.session.memory

    @memory.setter
    def memory(self, token: str | None) -> None:
        self.session.memory = token

    @property
    def instruction(self) -> str | None:
        return self.session.instruction

    @property
    def episode_id(self) -> str | None:
        return self.session.episode_id

    @property
    def step(self) -> int:
        """The step the next feedback reports."""
        return self.session.step

    def start_episode(self, instruction: str, episode_id: str | None = None) -> str:
        """A new episode (id returned): forgets the memory token, so the next act starts a fresh memory."""
        return self.session.start_episode(instruction, episode_id)

    def __repr__(self) -> str:  # never show the token
        name = type(self).__name__
        return f"{name}(robot_id={self.robot_id!r}, episode_id={self.episode_id!r}, step={self.step})"

    # -- calls ---------------------------------------------------------------------------------------
    def _ends_at(self, deadline_s: float | None) -> float:
        return self._clock() + (self.deadline_s if deadline_s is None else deadline_s)

    def _act_steps(self, frame: Frame, state, instruction, deadline_s, delay_ms, step=None) -> Steps:
        ends_at = self._ends_at(deadline_s)
        call = self.session.act_call(frame, state, instruction, ends_at, self.send_deadline, delay_ms, step)
        return act_attempts(call, self.policy, self.wire, self._clock)

    def _feedback_steps(self, frame: Frame, state, action_executed, options: dict[str, Any]) -> Steps:
        deadline_s = options.pop("deadline_s", None)
        call = self.session.feedback_call(frame, state, action_executed, self._ends_at(deadline_s), **options)
        return attempts(call, self.policy, self.wire, self._clock)

    def _model_steps(self, deadline_s: float | None) -> Steps:
        return attempts(Call("GET", "/v1/model", self._ends_at(deadline_s)), self.policy, self.wire, self._clock)


class Client(_ClientBase):
    """One robot's blocking client: keeps its memory token and feedback step, retries only what is safe.

    Args:
        base_url: the server, e.g. `http://127.0.0.1:8000`.
        token: the API token (Bearer); never logged or shown in repr.
        robot_id: letters, digits, `.`, `_`, `-` (at most 64); the token must cover it.
        timeout_s: the default total deadline of a call, retries included (when `deadline_s` is not given).
        retries: tries after the first, made only while the call's deadline allows.
        backoff_s: first wait before a retry when the server names no Retry-After (doubles, jittered).
        jpeg_quality: JPEG quality of the frames sent.
        deadline_s: the total deadline of a call; a call may pass its own.
        send_deadline: send what is left of the deadline as `deadline_ms`, so the server drops a step
            nobody waits for any more instead of computing it.
        wire: "json" (default: the frame as base64 in a JSON body) or "binary" (`/v1/act` in the binary
            form v1: the JPEG bytes as the body, no base64; servers before it answer 415).
        transport: an httpx transport (tests: `httpx.MockTransport`).
    """

    _sleep = staticmethod(time.sleep)

    def __init__(self, base_url: str, token: str, robot_id: str, *, transport: httpx.BaseTransport | None = None, **kw):
        super().__init__(base_url, token, robot_id, **kw)
        self._http = httpx.Client(base_url=self._base_url, headers=self._headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def act(
        self,
        frame: Frame,
        state: Sequence[float],
        instruction: str | None = None,
        deadline_s: float | None = None,
        delay_ms: float | None = None,
        step: int | None = None,
    ) -> ActResult:
        """One control step: the next action chunk for `frame` and `state`; keeps the answer's memory token.

        `instruction` defaults to the episode's; `deadline_s` (default the client's) bounds the whole call;
        `delay_ms`, the robot's measured delay (frame age + last round trip), lets the server's safety
        ladder slow or stop a step that is too old (sent only when given); `step`, the robot's step cursor
        (the control step the frame was taken at), comes back as the answer's `anchor_step` (ChunkExecutor).
        Raises ApiError (the server refused, or stayed unavailable) or NoAnswer (nothing within the deadline).
        """
        started = time.perf_counter()
        body, reset = self._run(self._act_steps(frame, state, instruction, deadline_s, delay_ms, step))
        return self.session.accept_act(body, (time.perf_counter() - started) * 1000, reset)

    def feedback(
        self, frame: Frame, state: Sequence[float], action_executed: Sequence[float], **options: Any
    ) -> FeedbackResult:
        """Reports the step just executed (`action_corrected`, `intervention`, `episode_done`, `success`,
        `deadline_s` as keywords); the step counter advances once the server has stored it (202).
        """
        return self.session.accept_feedback(self._run(self._feedback_steps(frame, state, action_executed, options)))

    def model_info(self, deadline_s: float | None = None) -> ModelSummary:
        """The served model: name, version, state length, chunk length and what `state` is."""
        return ModelSummary.from_body(self._run(self._model_steps(deadline_s)))

    def _run(self, steps: Steps) -> Any:
        """Makes the tries and waits `steps` (core.attempts) asks for; what it returns."""
        reply: Any = None
        while True:
            try:
                kind, value = steps.send(reply)
            except StopIteration as done:
                return done.value
            reply = self._sleep(value) if kind == SLEEP else self._try(*value)

    def _try(self, method: str, path: str, content: bytes | None, headers: dict, timeout_s: float) -> Any:
        try:
            return self._http.request(method, path, content=content, headers=headers, timeout=timeout_s)
        except httpx.TransportError as exc:
            return exc


class AsyncClient(_ClientBase):
    """One robot's asyncio client: the same calls as `Client`, awaited (arguments as `Client`'s).

    Many robots in one process: one AsyncClient per robot, their calls gathered on one event loop.
    """

    _sleep = staticmethod(asyncio.sleep)

    def __init__(
        self, base_url: str, token: str, robot_id: str, *, transport: httpx.AsyncBaseTransport | None = None, **kw
    ):
        super().__init__(base_url, token, robot_id, **kw)
        self._http = httpx.AsyncClient(base_url=self._base_url, headers=self._headers, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def act(
        self,
        frame: Frame,
        state: Sequence[float],
        instruction: str | None = None,
        deadline_s: float | None = None,
        delay_ms: float | None = None,
        step: int | None = None,
    ) -> ActResult:
        """One control step (see `Client.act`)."""
        started = time.perf_counter()
        body, reset = await self._run(self._act_steps(frame, state, instruction, deadline_s, delay_ms, step))
        return self.session.accept_act(body, (time.perf_counter() - started) * 1000, reset)

    async def feedback(
        self, frame: Frame, state: Sequence[float], action_executed: Sequence[float], **options: Any
    ) -> FeedbackResult:
        """Reports the step just executed (see `Client.feedback`)."""
        steps = self._feedback_steps(frame, state, action_executed, options)
        return self.session.accept_feedback(await self._run(steps))

    async def model_info(self, deadline_s: float | None = None) -> ModelSummary:
        """The served model (see `Client.model_info`)."""
        return ModelSummary.from_body(await self._run(self._model_steps(deadline_s)))

    async def _run(self, steps: Steps) -> Any:
        """Makes the tries and waits `steps` (core.attempts) asks for, awaited; what it returns."""
        reply: Any = None
        while True:
            try:
                kind, value = steps.send(reply)
            except StopIteration as done:
                return done.value
            reply = await (self._sleep(value) if kind == SLEEP else self._try(*value))

    async def _try(self, method: str, path: str, content: bytes | None, headers: dict, timeout_s: float) -> Any:
        try:
            return await self._http.request(method, path, content=content, headers=headers, timeout=timeout_s)
        except httpx.TransportError as exc:
            return exc
