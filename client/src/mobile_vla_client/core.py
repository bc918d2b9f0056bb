"""The request/response core both clients share: what a call sends, when a failed try is retried, what
an answer means. No I/O here: `Client` and `AsyncClient` only send the tries this module prepares.

Why retries are safe: `act` sends the memory token of the last *answered* step and replaces it only
when an answer arrives, so repeating a request whose answer was lost computes the same step again
(replicas keep no per-robot state). `feedback` is stored under robot/episode/step and a repeat with
the same key is a duplicate the readers drop. Both are therefore retried after any transport error;
a call that is not idempotent (`Call.idempotent = False`) is retried only when the request never left
(connection refused, no pooled connection), or when the server shed it unprocessed (429, 503).

Retried answers: 429 and 503 (shed or unavailable: not computed, not stored), 502 (a proxy lost the
upstream) and, for feedback, 507 (disk full: nothing stored). Every other 4xx means the request itself
is wrong and is raised at once; a 504 means the step's deadline passed on the server: the step is
stale, so it is raised too (send the next one).

Every call has one total deadline: each try gets only what is left of it, a retry waits the server's
`Retry-After` (or a jittered exponential backoff) and is made only if that wait still fits, so an
overloaded server sees at most the load it asked for, never a blind 3x.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from mobile_vla_client.answers import ActResult, FeedbackResult
from mobile_vla_client.errors import ApiError, NoAnswer
from mobile_vla_client.wire import Frame, JsonWire, encode_jpeg

RETRY_STATUSES = frozenset({429, 502, 503})
SHED_STATUSES = frozenset({429, 503})  # not processed: retried even when the call is not idempotent
MAX_RETRY_AFTER_S = 60.0  # a larger Retry-After (or a malformed one) is not waited for: backoff instead
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request never left this machine


@dataclass(frozen=True)
class Call:
    """One API call: what to send on every try, and its total deadline (`ends_at`, on the client's clock)."""

    method: str
    path: str
    ends_at: float
    fields: dict[str, Any] | None = None  # the body's fields, without the frame
    image: bytes | None = None  # the encoded frame
    idempotent: bool = True
    retry_statuses: frozenset[int] = RETRY_STATUSES
    send_deadline: bool = False  # put what is left of the deadline in the body as `deadline_ms`

    def body(self, wire: JsonWire, left_s: float) -> tuple[bytes | None, dict[str, str]]:
        """(content, headers) of one try made with `left_s` seconds of the deadline left."""
        if self.fields is None:
            return None, {}
        fields = {**self.fields, "deadline_ms": max(1, int(left_s * 1000))} if self.send_deadline else self.fields
        return (wire if wire.takes(self.path) else JsonWire).encode(fields, self.image)


@dataclass
class RetryPolicy:
    """When a failed try is tried again, and after how long."""

    retries: int = 2  # tries after the first
    backoff_s: float = 0.05  # first backoff when the server names no Retry-After; doubles per try, jittered

    def wait_before_retry(self, call: Call, attempt: int, outcome: Any, now: float) -> float | None:
        """Seconds to wait before try `attempt + 1`, or None: `outcome` (a response or an exception) is final."""
        if isinstance(outcome, httpx.Response):
            if outcome.status_code not in call.retry_statuses:
                return None
            if not call.idempotent and outcome.status_code not in SHED_STATUSES:
                return None
            wait = retry_after_s(outcome)
        elif isinstance(outcome, httpx.TransportError):
            if not call.idempotent and not isinstance(outcome, NOT_SENT):
                return None  # it may have been applied: never twice
            wait = None
        else:
            return None
        if attempt >= self.retries:
            return None
        if wait is None:
            wait = self.backoff_s * (2**attempt) * (1 + random.random())
        return wait if now + wait < call.ends_at else None  # no time for another try: say why now


def retry_after_s(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (delay-seconds form), or None when absent or unusable."""
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds <= MAX_RETRY_AFTER_S:
        return None
    return seconds


SEND, SLEEP = "send", "sleep"  # what a driver is asked to do: one try (content, headers, timeout), or a wait
Steps = Generator[tuple[str, Any], Any, Any]


def attempts(call: Call, policy: RetryPolicy, wire: JsonWire, clock: Callable[[], float]) -> Steps:
    """The tries of one call, without I/O: yields (SEND, (method, path, content, headers, timeout_s)), answered
    with the try's outcome (an httpx.Response or the httpx.TransportError it raised), and (SLEEP, seconds).
    Returns the final answer's body, or raises what it means (ApiError, NoAnswer).
    """
    outcome: Any = None
    for attempt in range(policy.retries + 1):
        left = call.ends_at - clock()
        if left <= 0:
            break
        content, headers = call.body(wire, left)
        outcome = yield SEND, (call.method, call.path, content, headers, left)
        wait = policy.wait_before_retry(call, attempt, outcome, clock())
        if wait is None:
            break
        yield SLEEP, wait
    return outcome_of(call, outcome, wire)


def act_attempts(call: Call, policy: RetryPolicy, wire: JsonWire, clock: Callable[[], float]) -> Steps:
    """`attempts` of an act call, returning (body, memory_reset): a memory token the server refuses (secret
    rotated past its window, server replaced) is dropped and the step tried once more from a fresh memory,
    inside the same deadline, rather than stop the robot.
    """
    try:
        return (yield from attempts(call, policy, wire, clock)), False
    except ApiError as error:
        if error.code != "invalid_memory" or call.fields is None or "memory" not in call.fields:
            raise
    fresh = replace(call, fields={k: v for k, v in call.fields.items() if k != "memory"})
    return (yield from attempts(fresh, policy, wire, clock)), True


def outcome_of(call: Call, outcome: Any, wire: JsonWire) -> Any:
    """The final try's result: the answer's decoded body, or the error it means (raised)."""
    if outcome is None:
        raise NoAnswer(call.method, call.path, "the deadline passed before a try could be made")
    if isinstance(outcome, httpx.TransportError):
        raise NoAnswer(call.method, call.path, f"{type(outcome).__name__}: {outcome}") from outcome
    if outcome.status_code >= 400:
        raise error_of(call, outcome, wire)
    return wire.decode(outcome.content)


def error_of(call: Call, response: httpx.Response, wire: JsonWire) -> ApiError:
    """The ApiError of an error answer, with the server's error code and message when its body has them."""
    try:
        body = wire.decode(response.content)
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        body, code, message = response.text[:200], "http_error", response.text[:200].strip() or response.reason_phrase
    return ApiError(call.method, call.path, response.status_code, code, message, body, retry_after_s(response))


def floats(name: str, values: Sequence[float], length: int | None = None) -> list[float]:
    """A sequence of numbers -> a list of Python floats; a clear error naming `name` otherwise."""
    try:
        result = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of numbers, got {values!r}") from None
    if length is not None and len(result) != length:
        raise ValueError(f"{name}: expected {length} numbers, got {len(result)}")
    return result


@dataclass
class RobotSession:
    """One robot's side of the conversation: its id, the episode, the memory token and the feedback step."""

    robot_id: str
    jpeg_quality: int = 85
    memory: str | None = None  # the token of the last answered step; None at an episode's start
    instruction: str | None = None
    episode_id: str | None = None
    step: int = 0  # the next feedback step

    def start_episode(self, instruction: str, episode_id: str | None = None) -> str:
        """Forgets the memory: the next act starts a fresh LSTM state."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction: expected a non-empty text, got {instruction!r}")
        self.instruction, self.memory, self.step = instruction, None, 0
        self.episode_id = episode_id or uuid.uuid4().hex[:16]
        return self.episode_id

    def act_call(
        self,
        frame: Frame,
        state: Sequence[float],
        instruction: str | None,
        ends_at: float,
        send_deadline: bool,
        delay_ms: float | None = None,
        step: int | None = None,
    ) -> Call:
        instruction = instruction or self.instruction
        if not instruction:
            raise ValueError("no instruction: call start_episode(instruction) or pass instruction=")
        fields: dict[str, Any] = {"robot_id": self.robot_id, "instruction": instruction}
        fields["state"] = floats("state", state)
        if self.memory is not None:
            fields["memory"] = self.memory
        if delay_ms is not None:  # sent only when the robot measures it (servers before the field refuse it)
            fields["delay_ms"] = float(delay_ms)
        if step is not None:  # the robot's step cursor, echoed as anchor_step (ChunkExecutor)
            fields["step"] = int(step)
        image = encode_jpeg(frame, self.jpeg_quality)
        return Call("POST", "/v1/act", ends_at, fields, image, send_deadline=send_deadline)

    def accept_act(self, body: dict[str, Any], round_trip_ms: float, reset: bool) -> ActResult:
        """The typed answer; the token it carries becomes the one the next step sends."""
        answer = ActResult.from_body(body, round_trip_ms, memory_reset=reset)
        self.memory = answer.memory  # only after an answer: a retried request repeats the same step
        return answer

    def feedback_call(
        self,
        frame: Frame,
        state: Sequence[float],
        action_executed: Sequence[float],
        ends_at: float,
        *,
        action_corrected: Sequence[float] | None = None,
        intervention: bool = False,
        episode_done: bool = False,
        success: bool | None = None,
    ) -> Call:
        if self.episode_id is None or self.instruction is None:
            raise ValueError("no episode: call start_episode(instruction) first")
        fields = {
            "robot_id": self.robot_id,
            "episode_id": self.episode_id,
            "step": self.step,
            "instruction": self.instruction,
            "state": floats("state", state),
            "action_executed": floats("action_executed", action_executed, 3),
            "action_corrected": None if action_corrected is None else floats("action_corrected", action_corrected, 3),
            "intervention": bool(intervention),
            "episode_done": bool(episode_done),
            "success": success,
        }
        statuses = RETRY_STATUSES | {507}  # disk full: nothing stored, retry after Retry-After
        return Call("POST", "/v1/feedback", ends_at, fields, encode_jpeg(frame, self.jpeg_quality), True, statuses)

    def accept_feedback(self, body: dict[str, Any]) -> FeedbackResult:
        """The step is stored: the next feedback reports the next step."""
        self.step += 1
        return FeedbackResult.from_body(body)
