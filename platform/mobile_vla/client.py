"""Robot-side client of the HTTP API: keeps the memory token, JPEG-encodes frames, retries safely.

    from mobile_vla.client import RobotClient
    with RobotClient("http://127.0.0.1:8000", token, robot_id="r-17") as robot:
        robot.start_episode("go to the red box")
        answer = robot.act(frame, state=[0.0, 0.0, 0.0])   # frame: uint8 [H, W, 3] or PIL image
        send_velocity(*answer.actions[0])

Why retries are safe: `act` sends the memory token of the last *answered* step and only replaces it
when an answer arrives, so repeating a request whose answer was lost gives the same step again.
`feedback` carries robot_id/episode_id/step, the key the server stores records under, so a repeat
is a duplicate, not a second step. Only connection errors, 429, 502 and 503 are retried; a 4xx
means the request itself is wrong and is raised at once (`ApiError`), and a 504 (the step's
deadline passed on the server) is raised too: that step is stale, send the next one.

Every call has one total deadline (`deadline_s`, default `timeout_s`): each try gets only what is
left of it, a retry waits the server's `Retry-After` (or a jittered backoff) and is made only if that
wait still fits, so an overloaded server sees at most the load it asked for, never a blind 3x.
With `send_deadline=True` the remaining budget also goes to the server as `deadline_ms`, so it
drops the step instead of computing an answer nobody waits for.
"""

from __future__ import annotations

import base64
import io
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

RETRY_STATUSES = (429, 502, 503)
MAX_RETRY_AFTER_S = 60.0  # a larger Retry-After (or a malformed one) is not waited for


class ApiError(RuntimeError):
    """The server refused the request (4xx) or stayed unavailable after the retries."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class ActAnswer:
    """One /v1/act answer, plus the round trip the robot measured."""

    actions: list[list[float]]  # K x [linear_x, linear_y, angular_z]; actions[0] is for now
    confidence: float
    backend: str
    model: dict[str, str]
    memory_reset: bool
    latency_ms: float
    round_trip_ms: float
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def encode_jpeg(frame: Any, quality: int = 85) -> str:
    """uint8 [H, W, 3] array or PIL image -> base64 JPEG text."""
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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


class RobotClient:
    """One robot's connection: keeps its memory token and episode step, retries only what is safe."""

    _clock = staticmethod(time.monotonic)  # the call deadlines' clock and the retry wait (tests replace them)
    _sleep = staticmethod(time.sleep)

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
        transport: httpx.BaseTransport | None = None,
    ):
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.robot_id = robot_id
        self.retries, self.backoff_s, self.jpeg_quality = retries, backoff_s, jpeg_quality
        self.deadline_s = deadline_s if deadline_s is not None else timeout_s  # total per call, retries included
        self.send_deadline = send_deadline
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout_s,
            transport=transport,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.memory: str | None = None
        self.instruction: str | None = None
        self.episode_id: str | None = None
        self.step = 0

    def __enter__(self) -> RobotClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:  # never show the token
        return f"RobotClient(robot_id={self.robot_id!r}, episode_id={self.episode_id!r}, step={self.step})"

    # -- episodes --------------------------------------------------------------------------------
    def start_episode(self, instruction: str, episode_id: str | None = None) -> str:
        """Forgets the memory: the next act starts a fresh LSTM state."""
        self.instruction, self.memory, self.step = instruction, None, 0
        self.episode_id = episode_id or uuid.uuid4().hex[:16]
        return self.episode_id

    def act(
        self, frame: Any, state: Sequence[float], instruction: str | None = None, deadline_s: float | None = None
    ) -> ActAnswer:
        """One control step; `deadline_s` (default the client's) bounds the whole call, retries included."""
        instruction = instruction or self.instruction
        if not instruction:
            raise ValueError("no instruction: call start_episode(instruction) or pass instruction=")
        body = {
            "robot_id": self.robot_id,
            "instruction": instruction,
            "image": encode_jpeg(frame, self.jpeg_quality),
            "state": [float(v) for v in state],
        }
        if self.memory is not None:
            body["memory"] = self.memory
        start = time.perf_counter()
        ends_at = self._clock() + (deadline_s if deadline_s is not None else self.deadline_s)
        try:
            data = self._post("/v1/act", body, ends_at)
        except ApiError as exc:
            if exc.code != "invalid_memory" or "memory" not in body:
                raise
            # The server no longer accepts our token (secret rotated, server replaced): start the
            # episode's memory afresh rather than stop the robot, and say so in memory_reset.
            del body["memory"]
            data = {**self._post("/v1/act", body, ends_at), "memory_reset": True}
        self.memory = data["memory"]  # only after an answer: a retried request repeats the same step
        return ActAnswer(
            data["actions"],
            data["confidence"],
            data["backend"],
            data["model"],
            data["memory_reset"],
            data["latency_ms"],
            (time.perf_counter() - start) * 1000,
            data,
        )

    def feedback(
        self,
        frame: Any,
        state: Sequence[float],
        action_executed: Sequence[float],
        *,
        action_corrected: Sequence[float] | None = None,
        intervention: bool = False,
        episode_done: bool = False,
        success: bool | None = None,
    ) -> dict:
        """Reports the step just executed; advances the step counter once it is stored (202)."""
        if self.episode_id is None or self.instruction is None:
            raise ValueError("no episode: call start_episode(instruction) first")
        body = {
            "robot_id": self.robot_id,
            "episode_id": self.episode_id,
            "step": self.step,
            "instruction": self.instruction,
            "image": encode_jpeg(frame, self.jpeg_quality),
            "state": [float(v) for v in state],
            "action_executed": [float(v) for v in action_executed],
            "action_corrected": [float(v) for v in action_corrected] if action_corrected is not None else None,
            "intervention": intervention,
            "episode_done": episode_done,
            "success": success,
        }
        answer = self._post("/v1/feedback", body, self._clock() + self.deadline_s)
        self.step += 1
        return answer

    def model_info(self) -> dict:
        response = self._http.get("/v1/model")
        return self._check(response)

    # -- transport -------------------------------------------------------------------------------
    def _post(self, path: str, body: dict, ends_at: float) -> dict:
        """POST with retries inside one total deadline (`ends_at`, on `self._clock`)."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            left = ends_at - self._clock()
            if left <= 0:
                break
            if self.send_deadline and path == "/v1/act":
                body = {**body, "deadline_ms": max(1, int(left * 1000))}
            try:
                response = self._http.post(path, json=body, timeout=left)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last, wait = exc, self._backoff(attempt)
            else:
                if response.status_code not in RETRY_STATUSES:
                    return self._check(response)
                last = self._error(response)
                wait = retry_after_s(response)
                if wait is None:
                    wait = self._backoff(attempt)
            if attempt == self.retries or self._clock() + wait >= ends_at:
                break  # no time for another try: say why now rather than after the deadline
            self._sleep(wait)
        if isinstance(last, ApiError):
            raise last
        reason = last or "call deadline passed"
        raise ApiError(0, "unreachable", f"{path}: no answer within the call's deadline ({reason})")

    def _backoff(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt) * (1 + random.random())

    @staticmethod
    def _error(response: httpx.Response) -> ApiError:
        try:
            error = response.json()["error"]
            return ApiError(response.status_code, error["code"], error["message"])
        except Exception:
            return ApiError(response.status_code, "http_error", response.text[:200])

    def _check(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise self._error(response)
        return response.json()
