"""The HTTP ingress (FastAPI inside Ray Serve): the routes of API v1 and what each does per request.

`/v1/act`: auth, body limits and validation, image decoding and the memory token here; then the
batch router (`router`) sends the step to the primary or the fallback, the shadow mirror (`shadow`)
gets a copy, and the answer is built from `schemas.ActResponse`. The instruction's token count is
checked where the one tokenisation happens: the policy replica (a refused instruction is a 422).
The request checks follow the version the alias serves (`watcher`).
"""

# No `from __future__ import annotations` here: Serve's class-based ingress rebuilds the route
# signatures and needs real annotations (a string `Request` becomes a required query parameter).
import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from mobile_vla.errors import DataError
from mobile_vla.online.feedback_store import FeedbackStore, StorageFullError
from mobile_vla.serve.admission import AdmissionGate, step_budget_s
from mobile_vla.serve.auth import TokenVerifier
from mobile_vla.serve.canary import CanaryRoute, FleetKpis, RolloutStatus
from mobile_vla.serve.errors_http import ApiError, error_response, install_error_handlers, retry_after
from mobile_vla.serve.feedback_sink import feedback_key
from mobile_vla.serve.memory_token import MemoryCodec, MemoryTokenError, RecurrentMemory
from mobile_vla.serve.metrics import IngressMetrics, VersionMetrics
from mobile_vla.serve.readiness import CachedStatus
from mobile_vla.serve.request_checks import (
    FIELDS_HEADER,
    ActInput,
    authorize,
    check_state,
    decode_image,
    permit,
    read_act,
    read_json,
)
from mobile_vla.serve.router import BatchRouter, BreakerState, ServedVersions
from mobile_vla.serve.safety import NORMAL, SafetyInputs, apply_level, decide, effective_thresholds, speed_factor
from mobile_vla.serve.safety import SafetyDecision as Decision
from mobile_vla.serve.schemas import (
    ActFields,
    ActRequest,
    ActResponse,
    ErrorBody,
    FeedbackAccepted,
    FeedbackRequest,
    Health,
    ModelInfo,
    ModelRef,
    ModelSummary,
    Readiness,
    SafetyDecision,
    SafetyInfo,
    StepRequest,
    StepResult,
)
from mobile_vla.serve.settings import IngressConfig, ingress_limits
from mobile_vla.serve.shadow import ShadowMirror
from mobile_vla.serve.watcher import AliasWatcher

logger = logging.getLogger("ray.serve")

_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 413, 415, 422, 429, 503, 504)}


def _body_schema(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _act_schema() -> dict:
    """`/v1/act`'s two wire forms: JSON (`ActRequest`) and the binary form v1 (frame bytes + `X-Act-Fields`)."""
    frame = {"schema": {"type": "string", "format": "binary"}}
    fields = ActFields.model_json_schema()
    header = {
        "name": FIELDS_HEADER,
        "in": "header",
        "required": False,
        "description": "Binary form v1 only (body image/jpeg or image/png), and required there: the step's other "
        "fields as one ASCII JSON object (non-ASCII characters as \\uXXXX escapes), checked as the JSON form's. "
        "Schema: ActFields.",
        "content": {"application/json": {"schema": fields}},
    }
    body = _body_schema(ActRequest)["requestBody"]
    body["content"].update({"image/jpeg": frame, "image/png": frame})
    return {"requestBody": body, "parameters": [header]}


fastapi_app = FastAPI(
    title="Mobile VLA policy API",
    version="1",
    description="Velocity commands for omniwheel robots from a camera frame, an instruction and the robot state. "
    'Errors: {"error": {"code", "message"}}.',
)
install_error_handlers(fastapi_app)


@serve.deployment(max_ongoing_requests=256, num_replicas=1, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(fastapi_app)
class PolicyIngress:
    """The HTTP face: one replica per node or more; holds no per-robot state (the memory token does)."""

    def __init__(self, settings: dict, primary=None, fallback=None, shadow=None, canary=None):
        self.settings = IngressConfig.model_validate(settings)
        self._auth = TokenVerifier.from_file(Path(self.settings.tokens_file))  # follows the file: revocation
        self._codec = MemoryCodec.from_file(Path(self.settings.memory_secret_file))  # never created here
        self._sink = FeedbackStore(self.settings.feedback_dir)  # a FeedbackSink: durable when append returns
        self._metrics = IngressMetrics()
        self._replica_id = f"{socket.gethostname()}:{os.getpid()}"
        versions = ServedVersions()
        self._router = BatchRouter(self.settings, primary, fallback, self._metrics, versions)
        pending, _ = ingress_limits(self.settings.max_pending_requests, self.settings.max_batch_size)
        self._admission = AdmissionGate(pending, self.settings.retry_after_s)
        self._watcher = AliasWatcher(self.settings, versions, self._router.backend_statuses)
        self._shadow = ShadowMirror(self.settings.shadow, shadow, self._metrics) if shadow is not None else None
        self._readiness = CachedStatus(self._router.backend_statuses)  # a probe costs no RPCs
        version_metrics = VersionMetrics()
        self._kpis = FleetKpis(version_metrics)  # per-version KPIs of live traffic (the rollout controller reads them)
        self._canary = None
        if canary is not None:
            self._canary = CanaryRoute(
                self.settings, canary, primary, self._metrics, version_metrics, self._kpis, versions
            )

    @fastapi_app.get("/healthz", responses=_ERRORS)
    async def healthz(self) -> Health:
        """Liveness: the ingress answers. No token needed."""
        return Health()

    @fastapi_app.get("/readyz", response_model=Readiness, response_model_exclude_none=True, responses=_ERRORS)
    async def readyz(self, request: Request):
        """Ready when some backend has a model loaded; each backend's state only for an operator token."""
        statuses = await self._readiness.get()
        if not any(s.loaded for s in statuses):
            return error_response(503, "not_ready", "no backend has a model loaded yet")
        grant = self._auth.grant_for(request.headers.get("authorization"))
        operator = grant is not None and grant.refusal("operator") is None
        return Readiness(backends=statuses if operator else None)

    @fastapi_app.get("/v1/model", response_model=ModelInfo | ModelSummary, responses=_ERRORS)
    async def model(self, request: Request):
        """The model the requests are checked against; with the operator scope also each backend's state
        and which one answers now.
        """
        grant = authorize(request, self._auth)
        self._watcher.ensure_running()
        side = self._watcher.side
        safety = self.settings.safety
        limits = effective_thresholds(safety, side.calibrated, side.control_hz, side.chunk)
        summary = ModelSummary(
            name=side.name,
            version=side.version,
            state_dim=side.state_dim,
            chunk=side.chunk,
            state_input=side.state_input,
            safety=SafetyInfo(
                enabled=safety.enabled,
                novelty=side.novelty,
                note=side.safety_note,
                thresholds=dict(vars(limits)),
                slow_factor=safety.slow_factor,
                handover_after_stops=safety.handover_after_stops,
            ),
        )
        if grant.refusal("operator") is not None:
            return JSONResponse(summary.model_dump(mode="json"))
        statuses = await self._router.backend_statuses()
        primary_current = self._router.primary_is_current
        active = next(
            (
                s.deployment
                for s in statuses
                if s.loaded and (s.role == "fallback" or (s.breaker == BreakerState.CLOSED and primary_current))
            ),
            None,
        )
        info = ModelInfo(
            **summary.model_dump(),
            alias=side.alias,
            uri=side.uri,
            backends=statuses,
            active=active,
            alias_version=self._router.versions.alias_version,
            from_cache=side.from_cache,
            watch_error=self._watcher.watch_error,
            shadow=self._shadow.summary() if self._shadow else None,
        )
        return JSONResponse(info.model_dump(mode="json"))

    @fastapi_app.post("/v1/act", response_model=ActResponse, responses=_ERRORS, openapi_extra=_act_schema())
    async def act(self, request: Request):
        """One control step for one robot: next action chunk, confidence and the new memory token.

        Two wire forms (docs/http_api.md): JSON with the frame as base64 `image`, or the binary form v1: the
        frame's bytes as the body (image/jpeg or image/png) and the other fields in the X-Act-Fields header.
        """
        start, arrival = time.perf_counter(), time.time()
        backend_tag, status = "none", 500
        self._watcher.ensure_running()
        try:
            grant = authorize(request, self._auth)
            # 429 + Retry-After past the replica's limit before the body is even parsed: shedding costs
            # the least it can in here (Serve's own limits in front shed before this handler runs)
            with self._admission.admit():
                sent = await read_act(request, self.settings.max_body_bytes)
                body = sent.fields
                permit(grant, "act", body.robot_id)
                step = await self._step_request(sent, arrival)
                routed, assigned, canary_failed = await self._route(step)
            result = routed.result
            if self._shadow is not None:
                self._shadow.copy(step, result)
            safety, confidence_now, stale_ms = self._safety_decision(body, step, result, arrival)
            token = self._codec.encode(
                RecurrentMemory(
                    result.model_name, result.model_version, body.robot_id, result.h, result.c, stops=safety.stops
                )
            )
            latency_ms = (time.perf_counter() - start) * 1000
            backend_tag, status = result.backend, 200
            self._observe(body.robot_id, routed, latency_ms)
            self._kpis.control_hz = self._watcher.side.control_hz
            self._kpis.answered(
                assigned or result.model_version,
                result.model_version,
                canary_failed or bool(routed.fallback_reason),
                result.confidence,
                safety.level,
                result.actions,
                latency_ms,
            )
            factor = speed_factor(safety.level, self.settings.safety.slow_factor)
            answer = ActResponse(
                actions=apply_level(result.actions, safety.level, self.settings.safety.slow_factor).tolist(),
                confidence=result.confidence,
                memory=token,
                model=ModelRef(name=result.model_name, version=result.model_version),
                backend=result.backend,
                memory_reset=result.memory_reset,
                latency_ms=round(latency_ms, 3),
                queue_ms=round(max(0.0, latency_ms - result.compute_ms), 3),
                compute_ms=round(result.compute_ms, 3),
                anchor_step=body.step,
                safety=SafetyDecision(
                    level=safety.level,
                    reasons=safety.reasons,
                    speed_factor=factor,
                    confidence_now=confidence_now,
                    novelty=result.novelty,
                    stale_ms=None if stale_ms is None else round(stale_ms, 3),
                ),
            )
            headers = {"X-Served-By": routed.served_by, "X-Fallback-Reason": routed.fallback_reason or "none"}
            return JSONResponse(answer.model_dump(mode="json"), headers=headers)
        except ApiError as exc:
            status = exc.status
            logger.info(json.dumps({"event": "act_refused", "status": exc.status, "code": exc.code}))
            raise
        finally:
            self._metrics.request("/v1/act", backend_tag, status)

    async def _step_request(self, sent: ActInput, arrival: float) -> StepRequest:
        """The checked request as the policy's input: state [S], frame [224, 224, 3], the verified memory,
        and the deadline (wall clock) past which the step is dropped, not computed.
        """
        side, body = self._watcher.side, sent.fields
        state = check_state(body.state, side.state_dim)
        limit = self.settings.max_image_pixels
        image = await decode_image(sent.image, limit, side.prepare_image, side.image_size, sent.formats)
        budget_s = step_budget_s(body.deadline_ms, self.settings.deadline_s, side.control_hz)
        step = StepRequest(
            robot_id=body.robot_id,
            image=image,
            state=state,
            instruction=body.instruction,
            deadline=arrival + budget_s,
        )
        if body.memory is not None:
            try:
                memory = self._codec.decode(body.memory)
            except MemoryTokenError as exc:
                raise ApiError(400, "invalid_memory", str(exc)) from None
            if memory.robot_id != body.robot_id:
                raise ApiError(400, "invalid_memory", "memory token belongs to another robot_id")
            step.memory_name, step.memory_version = memory.model_name, memory.model_version
            step.h, step.c = memory.h, memory.c
            step.safety_stops = memory.stops
        return step

    def _safety_decision(
        self, body: ActFields, step: StepRequest, result: StepResult, arrival: float
    ) -> tuple[Decision, float, float | None]:
        """The safety ladder's decision for this answer (serve/safety.py), counted in the metrics; with the
        executed step's confidence and the step's age (None without delay_ms) it was judged on.
        """
        config = self.settings.safety
        side = self._watcher.side
        confidence_now = result.confidence if result.confidence_now is None else result.confidence_now
        stale_ms = None if body.delay_ms is None else body.delay_ms + (time.time() - arrival) * 1000
        decision = Decision(NORMAL)
        if config.enabled:
            limits = effective_thresholds(config, result.thresholds, side.control_hz, side.chunk)
            inputs = SafetyInputs(confidence_now, result.novelty, stale_ms, step.safety_stops)
            decision = decide(inputs, limits, config.handover_after_stops)
        for reason in decision.reasons or ["none"]:
            self._metrics.safety.inc(tags={"level": decision.level, "reason": reason})
        if result.novelty is not None:
            self._metrics.novelty.observe(result.novelty, tags={"backend": result.backend})
        return decision, confidence_now, stale_ms

    def _observe(self, robot_id: str, routed, latency_ms: float) -> None:
        """Metrics and the one log line of an answered /v1/act."""
        result = routed.result
        if result.memory_reset:
            self._metrics.memory_resets.inc()
        self._metrics.latency_ms.observe(latency_ms, tags={"backend": result.backend})
        self._metrics.confidence.observe(result.confidence, tags={"backend": result.backend})
        event = {
            "event": "act",
            "robot_id": robot_id,
            "backend": result.backend,
            "fallback": routed.fallback_reason or None,
            "memory_reset": result.memory_reset,
            "latency_ms": round(latency_ms, 2),
        }
        logger.info(json.dumps(event))

    async def _route(self, step: StepRequest):
        """(the answer, the canary version the robot is assigned to or None, whether the canary failed it)."""
        if self._canary is None:
            return await self._router.route(step), None, False
        self._canary.ensure_running()
        return await self._canary.route(step, self._router)

    @fastapi_app.get("/v1/rollout", response_model=RolloutStatus, responses=_ERRORS)
    async def rollout(self, request: Request):
        """Operator scope: the canary as this ingress replica routes it (version, share of robots, whether it
        serves) and each model version's KPIs on live traffic since this replica started (counts and rates).
        """
        permit(authorize(request, self._auth), "operator")
        if self._canary is not None:
            self._canary.ensure_running()
        status = RolloutStatus(
            canary=self._canary.status() if self._canary is not None else None,
            kpis=self._kpis.snapshot(),
            replica=self._replica_id,
        )
        return JSONResponse(status.model_dump(mode="json"))

    @fastapi_app.post(
        "/v1/feedback",
        status_code=202,
        response_model=FeedbackAccepted,
        responses={**_ERRORS, 507: {"model": ErrorBody}},  # a full feedback disk
        openapi_extra=_body_schema(FeedbackRequest),
    )
    async def feedback(self, request: Request):
        """One executed step; 202 only once the record is durably stored."""
        status = 500
        try:
            grant = authorize(request, self._auth)
            body: FeedbackRequest = await read_json(request, FeedbackRequest, self.settings.max_body_bytes)
            permit(grant, "feedback", body.robot_id)
            side = self._watcher.side
            check_state(body.state, side.state_dim)
            # refuse what training could never read
            await decode_image(body.image, self.settings.max_image_pixels, side.prepare_image)
            record = body.model_dump(mode="json")
            record["received_at"] = time.time()
            record["model"] = {"name": side.name, "version": side.version}
            try:
                await asyncio.to_thread(self._sink.append, record)
            except DataError as exc:  # what the HTTP schema lets through but the store refuses
                raise ApiError(422, "invalid_request", str(exc)) from None
            except StorageFullError as exc:  # disk or quota full: nothing stored, nothing left behind
                logger.error("feedback store full: %s", exc)
                full = "feedback log is full; nothing stored, retry later"
                raise ApiError(507, "insufficient_storage", full, retry_after(30)) from None
            except OSError as exc:
                logger.error("feedback store failed: %s", exc)
                raise ApiError(503, "unavailable", "feedback could not be stored; retry") from None
            status = 202
            accepted = FeedbackAccepted(key=feedback_key(record))
            return JSONResponse(accepted.model_dump(mode="json"), status_code=202)
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self._metrics.request("/v1/feedback", "none", status)
