"""The HTTP ingress (FastAPI inside Ray Serve): auth, limits, validation, image decoding, memory
tokens, routing to the primary policy with a timeout and a circuit breaker, then the fallback.

Hot swap: the ingress follows the alias too (every `alias_poll_s`) and asks each policy deployment
which version it serves. The primary gets a request only while it serves the alias's version or
the fallback does not; so when a new version needs minutes on the primary (a TensorRT engine build),
the ONNX fallback answers with the new version at once and traffic returns to the primary when it
has caught up. A version seen in an answer wakes the watcher, so no request goes back to the older
version in between. The request checks (state size, tokenizer, resize) follow the served version.

Shadow mode: after the answer is computed, a copy of the step goes to the shadow deployment in a
background task with the shadow's own recurrent state; only the agreement is recorded.

Bodies are read by hand (not by FastAPI's body parameter) so the size limit holds before a byte is
parsed and the content type is checked first; the pydantic models still document the API.
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from ray import serve

from mobile_vla.config import StrictModel
from mobile_vla.errors import DataError, MobileVLAError
from mobile_vla.serve.app import ShadowConfig
from mobile_vla.serve.deployments import DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, StepRequest, StepResult
from mobile_vla.serve.errors_http import ApiError, describe_errors, error_response, install_error_handlers
from mobile_vla.serve.schemas import (
    ActRequest,
    ActResponse,
    ErrorBody,
    FeedbackAccepted,
    FeedbackRequest,
    ModelInfo,
)

logger = logging.getLogger("ray.serve")

INGRESS_CONCURRENT_BATCHES = 2  # batches on their way to the policy at once; one can form while another runs

_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422, 429, 503)}


class IngressConfig(StrictModel):
    """Built by `build_app` from the app arguments (paths already resolved)."""

    model_uri: str
    alias: str | None = None
    tokens_file: str
    memory_secret_file: str
    feedback_dir: str
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=224 * 224)
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_S, ge=0, le=1)
    primary_timeout_s: float = Field(default=0.5, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)
    instruction_cache_size: int = Field(default=4096, ge=1)
    primary_name: str | None = None
    fallback_name: str | None = None
    alias_poll_s: float = Field(default=2.0, ge=0)
    shadow: ShadowConfig | None = None
    shadow_name: str | None = None


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


fastapi_app = FastAPI(
    title="Mobile VLA policy API",
    version="1",
    description="Velocity commands for omniwheel robots from a camera frame, an instruction and the robot state. "
    'Errors: {"error": {"code", "message"}}.',
)
install_error_handlers(fastapi_app)


async def _awaited(response):
    """A coroutine around a DeploymentResponse, so wait_for can cancel it on timeout."""
    return await response


class InstructionCache:
    """LRU of instruction -> token ids: robots repeat one instruction every step, tokenise it once.
    Also the check that an instruction fits the model's token length (never silently truncated).
    """

    def __init__(self, tokenize, max_tokens: int | None, size: int):
        self._tokenize, self._max_tokens, self._size = tokenize, max_tokens, size
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, instruction: str):
        if instruction in self._entries:
            self._entries.move_to_end(instruction)
            return self._entries[instruction]
        tokens = self._tokenize(instruction) if self._tokenize else None
        self._entries[instruction] = tokens
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return tokens


@serve.deployment(max_ongoing_requests=256, num_replicas=1, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(fastapi_app)
class PolicyIngress:
    def __init__(self, settings: dict, primary=None, fallback=None, shadow=None):
        from mobile_vla.online.feedback_store import FeedbackStore
        from mobile_vla.serve.auth import TokenVerifier
        from mobile_vla.serve.memory_token import MemoryCodec, load_or_create_secret
        from mobile_vla.serve.metrics import IngressMetrics
        from mobile_vla.serve.routing import CircuitBreaker

        self.settings = IngressConfig.model_validate(settings)
        self._auth = TokenVerifier.from_file(Path(self.settings.tokens_file))
        self._codec = MemoryCodec(load_or_create_secret(Path(self.settings.memory_secret_file)))
        self._sink = FeedbackStore(self.settings.feedback_dir)  # a FeedbackSink: durable when append returns
        self._metrics = IngressMetrics()
        self._breaker = CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_reset_s)
        self._primary, self._fallback, self._shadow = primary, fallback, shadow
        self._route_batch.set_max_batch_size(self.settings.max_batch_size)
        self._route_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._load_model_side(self.settings.model_uri)
        self._alias_version: str | None = self._side.version if self.settings.alias else None
        self._versions: dict[str, str | None] = {}  # role -> version it serves (from info() and answers)
        self._learned_at: dict[str, float] = {}  # role or "alias" -> when an answer last taught us something
        self._side_failures: dict[str, str] = {}  # version -> why the ingress could not read it
        self._watch_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._shadow_tasks: set[asyncio.Task] = set()
        self._shadow_memory: OrderedDict[str, tuple] = OrderedDict()  # robot_id -> (name, version, h, c)
        self._shadow_stats = {"compared": 0, "agreed": 0, "errors": 0, "dropped": 0, "diff_sum": 0.0, "version": None}

    def _load_model_side(self, model_uri: str) -> None:
        """What the ingress needs of the model: the resize rule, S, K and the tokenizer."""
        from mobile_vla.serve.heap import freeze_long_lived_heap
        from mobile_vla.serve.model_side import load_model_side

        side = load_model_side(model_uri, self.settings.alias)
        instructions = InstructionCache(side.tokenize_one, side.max_tokens, self.settings.instruction_cache_size)
        self._side, self._instructions = side, instructions
        freeze_long_lived_heap()  # the tokenizer and its imports: never walked by a full collection mid-request

    # -- hot swap: which version to serve, and who serves it -------------------------------------------
    def _ensure_watch(self) -> None:
        if self._watch_task is None and self.settings.alias and self.settings.alias_poll_s > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self._refresh_versions()
            except Exception as exc:  # registry or a replica unreachable: keep routing as before
                logger.warning("version watch failed: %s", str(exc).splitlines()[0][:200])
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.alias_poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _refresh_versions(self) -> None:
        from mobile_vla.tracking import get_version_by_alias

        side = self._side
        started = time.monotonic()  # what an answer taught us after this moment beats what we read here
        target = await asyncio.to_thread(get_version_by_alias, side.name, self.settings.alias)
        if target is not None and self._learned_at.get("alias", 0.0) < started:
            self._alias_version = target
        for status in await self._backend_statuses():
            if status["loaded"] and self._learned_at.get(status["role"], 0.0) < started:
                self._versions[status["role"]] = status["model_version"]
        target = self._alias_version
        if (
            target
            and target != side.version
            and target in self._versions.values()
            and target not in self._side_failures
        ):
            uri = f"models:/{side.name}/{target}"
            try:  # only once a replica serves it: a version that fails to load never changes the checks
                await asyncio.to_thread(self._load_model_side, uri)
                logger.info("ingress now checks requests for %s version %s", side.name, target)
            except Exception as exc:
                self._side_failures[target] = f"{type(exc).__name__}: {exc}"[:500]
                logger.error("ingress cannot read %s: %s", uri, self._side_failures[target])

    def _learn_version(self, role: str, version: str) -> None:
        previous = self._versions.get(role)
        if previous == version:
            return
        self._versions[role] = version
        self._learned_at[role] = time.monotonic()
        if previous is not None and self._alias_version is not None:
            # A replica moved, and replicas only move to what the alias named when they looked: newer news
            # than ours. Routing on it at once keeps the next request off the older version.
            self._alias_version = version
            self._learned_at["alias"] = time.monotonic()
        self._wake.set()  # and look at the registry now rather than at the next poll

    def _primary_is_current(self) -> bool:
        target = self._alias_version
        if target is None or self._fallback is None:
            return True
        return self._versions.get("primary") in (None, target) or self._versions.get("fallback") != target

    # -- helpers -----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self._auth.verify_header(request.headers.get("authorization")):
            raise ApiError(401, "unauthorized", "missing or invalid bearer token")

    async def _read_json(self, request: Request, model):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(
                415, "unsupported_media_type", f"content-type must be application/json, got {content_type or 'none'!r}"
            )
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body_too_large", f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            status, code, message = describe_errors(exc.errors())
            raise ApiError(status, code, message) from None

    async def _decode_image(self, text: str) -> np.ndarray:
        """base64 JPEG/PNG -> uint8 [224, 224, 3] by the saved preprocessing. The header is read
        first, so an oversized image is refused before its pixels are decoded; frames larger than
        a camera's usual VGA are decoded in a thread so the event loop keeps serving.
        """
        from PIL import Image, UnidentifiedImageError

        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_image", "image is not valid base64") from None
        try:
            image = Image.open(io.BytesIO(raw), formats=("JPEG", "PNG"))
        except UnidentifiedImageError:
            raise ApiError(400, "invalid_image", "image is not a JPEG or PNG") from None
        except Image.DecompressionBombError as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ApiError(400, "invalid_image", f"image cannot be decoded: {exc}") from None
        width, height = image.size
        if width * height > self.settings.max_image_pixels:
            raise ApiError(
                413, "image_too_large", f"image is {width}x{height}; at most {self.settings.max_image_pixels} pixels"
            )

        def decode() -> np.ndarray:
            with image:
                image.load()  # truncated or corrupt data fails here, before any resize
                return self._side.prepare_image(image.convert("RGB"))

        try:
            return decode() if width * height <= 640 * 480 else await asyncio.to_thread(decode)
        except (OSError, SyntaxError, ValueError, MobileVLAError) as exc:
            raise ApiError(400, "invalid_image", f"image cannot be decoded: {exc}") from None

    def _check_state(self, state: list[float]) -> np.ndarray:
        if len(state) != self._side.state_dim:
            raise ApiError(422, "invalid_request", f"state: expected {self._side.state_dim} floats, got {len(state)}")
        return np.asarray(state, dtype=np.float32)

    def _check_instruction(self, instruction: str) -> None:
        try:
            self._instructions.get(instruction)
        except ValueError as exc:  # too many tokens for the model: refused, never truncated
            raise ApiError(422, "invalid_request", f"instruction: {exc}") from None

    async def _run_step(self, step) -> tuple[Any, str, str]:
        """Primary (timeout + breaker), else fallback. Returns (StepResult, deployment, fallback reason or "").
        Concurrent requests are gathered into one batch by `_route_batch`: one call per batch.
        """
        outcome = await self._route_batch(step)
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome

    @serve.batch(
        max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S,
        max_concurrent_batches=INGRESS_CONCURRENT_BATCHES,
    )  # resized from the settings in __init__
    async def _route_batch(self, steps: list[StepRequest]) -> list[tuple[Any, str, str] | ApiError]:
        """Routes a batch: the primary with a timeout (one call, one breaker verdict for the batch: a
        failure only when it answered none of it), then the fallback for the robots the primary did not
        answer (the whole batch on a timeout, an error or an open breaker; only the failed robots when
        the primary answered the rest).
        """
        outcomes: list = [None] * len(steps)
        pending = list(range(len(steps)))
        reason = "absent"
        if self._primary is not None and not self._primary_is_current():
            reason = "primary_behind"  # e.g. building the new version's TensorRT engine
        elif self._primary is not None:
            if self._breaker.allow():
                response = self._primary.step_batch.remote(steps)
                try:
                    results = await asyncio.wait_for(_awaited(response), self.settings.primary_timeout_s)
                except TimeoutError:
                    response.cancel()
                    self._breaker.record_failure()
                    reason = "timeout"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._breaker.record_failure()
                    reason = "unavailable" if "BackendUnavailable" in repr(exc) else "error"
                    logger.warning("primary failed (%s): %s", reason, str(exc).splitlines()[0][:200])
                else:
                    for i, result in enumerate(results):
                        if isinstance(result, StepResult):
                            outcomes[i] = (result, self.settings.primary_name or "primary", "")
                            self._learn_version("primary", result.model_version)
                    pending = [i for i, outcome in enumerate(outcomes) if outcome is None]
                    if len(pending) == len(steps):  # a primary that answers part of a batch is not broken
                        self._breaker.record_failure()
                    else:
                        self._breaker.record_success()
                    if pending:
                        reason = "error"
                        logger.warning(
                            "primary failed (error) for %d of %d robots: %s",
                            len(pending),
                            len(steps),
                            getattr(results[pending[0]], "error", "")[:200],
                        )
            else:
                reason = "breaker_open"
            self._metrics.breaker_open.set(1 if self._breaker.state.value != "closed" else 0)
        if not pending:
            return outcomes
        if self._fallback is None:
            message = f"primary backend unavailable ({reason}) and no fallback configured"
            return [outcome or ApiError(503, "unavailable", message) for outcome in outcomes]
        self._metrics.fallbacks.inc(float(len(pending)), tags={"reason": reason})
        try:
            results = await self._fallback.step_batch.remote([steps[i] for i in pending])
        except Exception as exc:
            logger.error("fallback failed: %s", str(exc).splitlines()[0][:200])
            results = [None] * len(pending)
        for i, result in zip(pending, results):
            if isinstance(result, StepResult):
                outcomes[i] = (result, self.settings.fallback_name or "fallback", reason)
                self._learn_version("fallback", result.model_version)
            else:
                outcomes[i] = ApiError(503, "unavailable", "no backend could answer; retry later")
        return outcomes

    # -- shadow mode ---------------------------------------------------------------------------------
    def _copy_to_shadow(self, step, champion) -> None:
        """Fire and forget: the robot's answer is already computed and never waits for this."""
        config = self.settings.shadow
        if self._shadow is None or random.random() >= config.sample_rate:
            return
        if len(self._shadow_tasks) >= config.max_in_flight:
            self._shadow_stats["dropped"] += 1
            self._metrics.shadow.inc(tags={"outcome": "dropped"})
            return
        task = asyncio.get_running_loop().create_task(self._compare_in_shadow(step, champion))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare_in_shadow(self, step, champion) -> None:
        config = self.settings.shadow
        memory = self._shadow_memory.pop(step.robot_id, None)  # the shadow's own state for this robot
        name, version, h, c = memory if memory else (None, None, None, None)
        copy = dataclasses.replace(step, memory_name=name, memory_version=version, h=h, c=c)
        try:
            shadow = await self._shadow.step.remote(copy)
        except Exception as exc:
            self._shadow_stats["errors"] += 1
            self._metrics.shadow.inc(tags={"outcome": "error"})
            logger.warning("shadow failed: %s", str(exc).splitlines()[0][:200])
            return
        self._shadow_memory[step.robot_id] = (shadow.model_name, shadow.model_version, shadow.h, shadow.c)
        while len(self._shadow_memory) > config.memory_robots:
            self._shadow_memory.popitem(last=False)
        diff = float(np.abs(shadow.actions - champion.actions).mean())  # [K, 3] both
        agree = bool(np.abs(shadow.actions[0] - champion.actions[0]).max() <= config.tolerance)
        stats = self._shadow_stats
        stats["compared"] += 1
        stats["agreed"] += agree
        stats["diff_sum"] += diff
        stats["version"] = shadow.model_version
        self._metrics.shadow.inc(tags={"outcome": "agree" if agree else "disagree"})
        self._metrics.shadow_action_diff.observe(diff)

    def _shadow_summary(self) -> dict | None:
        if self._shadow is None:
            return None
        stats = self._shadow_stats
        compared = stats["compared"]
        return {
            "alias": self.settings.shadow.alias,
            "version": stats["version"],
            "compared": compared,
            "agreed": stats["agreed"],
            "errors": stats["errors"],
            "dropped": stats["dropped"],
            "agreement": stats["agreed"] / compared if compared else None,
            "mean_abs_action_diff": stats["diff_sum"] / compared if compared else None,
            "in_flight": len(self._shadow_tasks),
        }

    # -- routes ------------------------------------------------------------------------------------
    @fastapi_app.get("/healthz", responses=_ERRORS)
    async def healthz(self) -> dict:
        """Liveness: the ingress answers. No token needed."""
        return {"status": "ok"}

    @fastapi_app.get("/readyz", responses=_ERRORS)
    async def readyz(self):
        """Ready when some backend has a model loaded."""
        statuses = await self._backend_statuses()
        if any(s["loaded"] for s in statuses):
            return {"status": "ready", "backends": statuses}
        return error_response(503, "not_ready", "no backend has a model loaded yet")

    async def _backend_statuses(self) -> list[dict]:
        out = []
        for role, handle, name in (
            ("primary", self._primary, self.settings.primary_name),
            ("fallback", self._fallback, self.settings.fallback_name),
        ):
            if handle is None:
                continue
            try:
                info = await asyncio.wait_for(_awaited(handle.info.remote()), 2.0)
                detail = info.get("error")
            except Exception as exc:
                info, detail = (
                    {"loaded": False, "backend": None, "model_version": None},
                    f"no answer: {type(exc).__name__}",
                )
            out.append(
                {
                    "role": role,
                    "deployment": name or role,
                    "backend": info.get("backend"),
                    "loaded": bool(info.get("loaded")),
                    "model_version": info.get("model_version"),
                    "detail": detail,
                    "breaker": self._breaker.state.value if role == "primary" else None,
                    "pending_version": info.get("pending_version"),
                    "failed_version": info.get("failed_version"),
                    "failed_reason": info.get("failed_error"),
                }
            )
        return out

    @fastapi_app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS)
    async def model(self, request: Request):
        self._authorize(request)
        self._ensure_watch()
        statuses = await self._backend_statuses()
        active = None
        for s in statuses:
            if s["loaded"] and (s["role"] == "fallback" or (s["breaker"] == "closed" and self._primary_is_current())):
                active = s["deployment"]
                break
        side = self._side
        return ModelInfo(
            name=side.name,
            version=side.version,
            alias=side.alias,
            uri=side.uri,
            state_dim=side.state_dim,
            chunk=side.chunk,
            backends=statuses,
            active=active,
            alias_version=self._alias_version,
            shadow=self._shadow_summary(),
        )

    @fastapi_app.post("/v1/act", response_model=ActResponse, responses=_ERRORS, openapi_extra=_body_schema(ActRequest))
    async def act(self, request: Request):
        """One control step for one robot: next action chunk, confidence and the new memory token."""
        from mobile_vla.serve.memory_token import MemoryTokenError, RecurrentMemory

        start = time.perf_counter()
        backend_tag, status = "none", 500
        self._ensure_watch()
        try:
            self._authorize(request)
            body: ActRequest = await self._read_json(request, ActRequest)
            state = self._check_state(body.state)
            self._check_instruction(body.instruction)
            step = StepRequest(
                robot_id=body.robot_id,
                image=await self._decode_image(body.image),
                state=state,
                instruction=body.instruction,
            )
            if body.memory is not None:
                try:
                    memory = self._codec.decode(body.memory)
                except MemoryTokenError as exc:
                    raise ApiError(400, "invalid_memory", str(exc)) from None
                if memory.robot_id != body.robot_id:
                    raise ApiError(400, "invalid_memory", "memory token belongs to another robot_id")
                step.memory_name, step.memory_version, step.h, step.c = (
                    memory.model_name,
                    memory.model_version,
                    memory.h,
                    memory.c,
                )
            result, served_by, fallback_reason = await self._run_step(step)
            self._copy_to_shadow(step, result)
            token = self._codec.encode(
                RecurrentMemory(result.model_name, result.model_version, body.robot_id, result.h, result.c)
            )
            latency_ms = (time.perf_counter() - start) * 1000
            backend_tag, status = result.backend, 200
            if result.memory_reset:
                self._metrics.memory_resets.inc()
            self._metrics.latency_ms.observe(latency_ms, tags={"backend": result.backend})
            self._metrics.confidence.observe(result.confidence, tags={"backend": result.backend})
            logger.info(
                json.dumps(
                    {
                        "event": "act",
                        "robot_id": body.robot_id,
                        "backend": result.backend,
                        "fallback": fallback_reason or None,
                        "memory_reset": result.memory_reset,
                        "latency_ms": round(latency_ms, 2),
                    }
                )
            )
            return JSONResponse(
                {
                    "actions": result.actions.tolist(),
                    "confidence": result.confidence,
                    "memory": token,
                    "model": {"name": result.model_name, "version": result.model_version},
                    "backend": result.backend,
                    "memory_reset": result.memory_reset,
                    "latency_ms": round(latency_ms, 3),
                },
                headers={"X-Served-By": served_by, "X-Fallback-Reason": fallback_reason or "none"},
            )
        except ApiError as exc:
            status = exc.status
            logger.info(json.dumps({"event": "act_refused", "status": exc.status, "code": exc.code}))
            raise
        finally:
            self._metrics.request("/v1/act", backend_tag, status)

    @fastapi_app.post(
        "/v1/feedback",
        status_code=202,
        response_model=FeedbackAccepted,
        responses=_ERRORS,
        openapi_extra=_body_schema(FeedbackRequest),
    )
    async def feedback(self, request: Request):
        """One executed step; 202 only once the record is durably stored."""
        from mobile_vla.serve.feedback_sink import feedback_key

        status = 500
        try:
            self._authorize(request)
            body: FeedbackRequest = await self._read_json(request, FeedbackRequest)
            self._check_state(body.state)
            await self._decode_image(body.image)  # refuse what training could never read
            record = body.model_dump(mode="json")
            record["received_at"] = time.time()
            record["model"] = {"name": self._side.name, "version": self._side.version}
            try:
                await asyncio.to_thread(self._sink.append, record)
            except DataError as exc:  # what the HTTP schema lets through but the store refuses
                raise ApiError(422, "invalid_request", str(exc)) from None
            except OSError as exc:
                logger.error("feedback store failed: %s", exc)
                raise ApiError(503, "unavailable", "feedback could not be stored; retry") from None
            status = 202
            return JSONResponse({"stored": True, "key": feedback_key(record)}, status_code=202)
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self._metrics.request("/v1/feedback", "none", status)
