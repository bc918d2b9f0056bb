"""The HTTP ingress (FastAPI inside Ray Serve): auth, limits, validation, image decoding, memory
tokens, routing to the primary policy with a timeout and a circuit breaker, then the fallback.

Bodies are read by hand (not by FastAPI's body parameter) so the size limit holds before a byte is
parsed and the content type is checked first; the pydantic models still document the API.
"""


import asyncio
import base64
import binascii
import io
import json
import logging
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
from mobile_vla.errors import MobileVLAError
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

_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422, 429, 503)}


class IngressSettings(StrictModel):
    """Built by `build_app` from the app arguments (paths already resolved)."""

    model_uri: str
    alias: str | None = None
    tokens_file: str
    memory_secret_file: str
    feedback_dir: str
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=224 * 224)
    primary_timeout_s: float = Field(default=0.5, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)
    instruction_cache_size: int = Field(default=4096, ge=1)
    primary_name: str | None = None
    fallback_name: str | None = None


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


fastapi_app = FastAPI(
    title="Mobile VLA policy API",
    version="1",
    description="Velocity commands for omniwheel robots from a camera frame, an instruction and the robot state. "
    "Errors: {\"error\": {\"code\", \"message\"}}.",
)
install_error_handlers(fastapi_app)


async def _awaited(response):
    """A coroutine around a DeploymentResponse, so wait_for can cancel it on timeout."""
    return await response


class InstructionCache:
    """LRU of instruction -> token ids: robots repeat one instruction every step, tokenise it once.
    Also the check that an instruction fits the model's token length (never silently truncated)."""

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
    def __init__(self, settings: dict, primary=None, fallback=None):
        from mobile_vla.serve.auth import TokenVerifier
        from mobile_vla.serve.feedback_sink import JsonlFeedbackSink
        from mobile_vla.serve.memory_token import MemoryCodec, load_or_create_secret
        from mobile_vla.serve.metrics import IngressMetrics
        from mobile_vla.serve.routing import CircuitBreaker

        self.settings = IngressSettings.model_validate(settings)
        self._auth = TokenVerifier.from_file(Path(self.settings.tokens_file))
        self._codec = MemoryCodec(load_or_create_secret(Path(self.settings.memory_secret_file)))
        self._sink = JsonlFeedbackSink(self.settings.feedback_dir)
        self._metrics = IngressMetrics()
        self._breaker = CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_reset_s)
        self._primary, self._fallback = primary, fallback
        self._load_model_side(self.settings.model_uri)

    def _load_model_side(self, model_uri: str) -> None:
        """What the ingress needs of the model: the resize rule, S, K and the tokenizer."""
        from mobile_vla.serve.model_side import load_model_side

        side = load_model_side(model_uri, self.settings.alias)
        self._side = side
        self._instructions = InstructionCache(side.tokenize_one, side.max_tokens, self.settings.instruction_cache_size)

    # -- helpers -----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self._auth.verify_header(request.headers.get("authorization")):
            raise ApiError(401, "unauthorized", "missing or invalid bearer token")

    async def _read_json(self, request: Request, model):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", f"content-type must be application/json, got {content_type or 'none'!r}")
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
        a camera's usual VGA are decoded in a thread so the event loop keeps serving."""
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
            raise ApiError(413, "image_too_large", f"image is {width}x{height}; at most {self.settings.max_image_pixels} pixels")

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
        """Primary (timeout + breaker), else fallback. Returns (StepResult, deployment, fallback reason or "")."""
        reason = "absent"
        if self._primary is not None:
            if self._breaker.allow():
                response = self._primary.step.remote(step)
                try:
                    result = await asyncio.wait_for(_awaited(response), self.settings.primary_timeout_s)
                except asyncio.TimeoutError:
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
                    self._breaker.record_success()
                    self._metrics.breaker_open.set(0)
                    return result, self.settings.primary_name or "primary", ""
            else:
                reason = "breaker_open"
            self._metrics.breaker_open.set(1 if self._breaker.state.value != "closed" else 0)
        if self._fallback is None:
            raise ApiError(503, "unavailable", f"primary backend unavailable ({reason}) and no fallback configured")
        self._metrics.fallbacks.inc(tags={"reason": reason})
        try:
            return await self._fallback.step.remote(step), self.settings.fallback_name or "fallback", reason
        except Exception as exc:
            logger.error("fallback failed: %s", str(exc).splitlines()[0][:200])
            raise ApiError(503, "unavailable", "no backend could answer; retry later") from None

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
        for role, handle, name in (("primary", self._primary, self.settings.primary_name),
                                   ("fallback", self._fallback, self.settings.fallback_name)):
            if handle is None:
                continue
            try:
                info = await asyncio.wait_for(handle.info.remote(), 2.0)
                detail = info.get("error")
            except Exception as exc:
                info, detail = {"loaded": False, "backend": None, "model_version": None}, f"no answer: {type(exc).__name__}"
            out.append({
                "role": role, "deployment": name or role, "backend": info.get("backend"), "loaded": bool(info.get("loaded")),
                "model_version": info.get("model_version"), "detail": detail,
                "breaker": self._breaker.state.value if role == "primary" else None,
            })
        return out

    @fastapi_app.get("/v1/model", response_model=ModelInfo, responses=_ERRORS)
    async def model(self, request: Request):
        self._authorize(request)
        statuses = await self._backend_statuses()
        active = None
        for s in statuses:
            if s["loaded"] and (s["role"] == "fallback" or s["breaker"] == "closed"):
                active = s["deployment"]
                break
        side = self._side
        return ModelInfo(name=side.name, version=side.version, alias=side.alias, uri=side.uri,
                         state_dim=side.state_dim, chunk=side.chunk, backends=statuses, active=active)

    @fastapi_app.post("/v1/act", response_model=ActResponse, responses=_ERRORS, openapi_extra=_body_schema(ActRequest))
    async def act(self, request: Request):
        """One control step for one robot: next action chunk, confidence and the new memory token."""
        from mobile_vla.serve.deployments import StepRequest
        from mobile_vla.serve.memory_token import MemoryTokenError, RecurrentMemory

        start = time.perf_counter()
        backend_tag, status = "none", 500
        try:
            self._authorize(request)
            body: ActRequest = await self._read_json(request, ActRequest)
            state = self._check_state(body.state)
            self._check_instruction(body.instruction)
            step = StepRequest(robot_id=body.robot_id, image=await self._decode_image(body.image), state=state,
                               instruction=body.instruction)
            if body.memory is not None:
                try:
                    memory = self._codec.decode(body.memory)
                except MemoryTokenError as exc:
                    raise ApiError(400, "invalid_memory", str(exc)) from None
                if memory.robot_id != body.robot_id:
                    raise ApiError(400, "invalid_memory", "memory token belongs to another robot_id")
                step.memory_name, step.memory_version, step.h, step.c = (
                    memory.model_name, memory.model_version, memory.h, memory.c)
            result, served_by, fallback_reason = await self._run_step(step)
            token = self._codec.encode(RecurrentMemory(result.model_name, result.model_version, body.robot_id,
                                                       result.h, result.c))
            latency_ms = (time.perf_counter() - start) * 1000
            backend_tag, status = result.backend, 200
            if result.memory_reset:
                self._metrics.memory_resets.inc()
            self._metrics.latency_ms.observe(latency_ms, tags={"backend": result.backend})
            self._metrics.confidence.observe(result.confidence, tags={"backend": result.backend})
            logger.info(json.dumps({"event": "act", "robot_id": body.robot_id, "backend": result.backend,
                                    "fallback": fallback_reason or None, "memory_reset": result.memory_reset,
                                    "latency_ms": round(latency_ms, 2)}))
            return JSONResponse({
                "actions": result.actions.tolist(), "confidence": result.confidence, "memory": token,
                "model": {"name": result.model_name, "version": result.model_version},
                "backend": result.backend, "memory_reset": result.memory_reset, "latency_ms": round(latency_ms, 3),
            }, headers={"X-Served-By": served_by, "X-Fallback-Reason": fallback_reason or "none"})
        except ApiError as exc:
            status = exc.status
            logger.info(json.dumps({"event": "act_refused", "status": exc.status, "code": exc.code}))
            raise
        finally:
            self._metrics.request("/v1/act", backend_tag, status)

    @fastapi_app.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted, responses=_ERRORS,
                      openapi_extra=_body_schema(FeedbackRequest))
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
