"""Policy deployments: stateless replicas that run one recurrent step for a batch of robots.

`TensorRTPolicy` (GPU, the primary on GPU nodes) and `OnnxPolicy` (ONNX Runtime: CUDA provider on
a GPU, CPU provider otherwise; the fallback, or the primary on CPU-only machines) share one class
body and differ only in which backends they accept. Requests from many robots are merged by
`@serve.batch` into one `backend.predict` call, run in a thread so the event loop keeps queueing.

The model comes from `user_config` (`PolicyUserConfig`): `reconfigure()` runs at start and on every
user_config change without a restart, loads the new version beside the old one and swaps the
reference in one assignment; a version that fails to load leaves the old one serving. All model
loading is in `_load_model()`, the one place hot swap (issue 8) extends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field
from ray import serve

from mobile_vla.config import StrictModel

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_S = 0.005


class FaultConfig(StrictModel):
    """TEST-ONLY fault injection, so tests and failover drills can make a primary fail or stall on
    purpose without mocking Ray Serve. It hits only robots whose id starts with `robot_prefix`, so
    a drill never touches the rest of the fleet. Never set in production configs."""

    mode: Literal["error", "slow"]
    robot_prefix: str = Field(default="drill-", min_length=1)
    delay_s: float = Field(default=1.0, ge=0, le=60)


class PolicyUserConfig(StrictModel):
    model_uri: str = Field(description="models:/NAME/VERSION (or a local model folder)")
    alias: str | None = None
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_S, ge=0, le=1)
    fp16: bool = False
    faults: list[FaultConfig] = Field(default_factory=list)


class BackendUnavailable(RuntimeError):
    """This replica has no model loaded (e.g. no TensorRT plan for this GPU): use the fallback."""


@dataclass
class StepRequest:
    """One robot's step, already validated and decoded by the ingress."""

    robot_id: str
    image: np.ndarray  # uint8 [H, W, C] = [224, 224, 3]
    state: np.ndarray  # float32 [S], raw (the backend normalises)
    instruction: str
    memory_version: str | None = None  # model version the memory belongs to
    memory_name: str | None = None
    h: np.ndarray | None = None  # float32 [layers, hidden]
    c: np.ndarray | None = None


@dataclass
class StepResult:
    actions: np.ndarray  # float32 [K, 3], de-normalised
    confidence: float
    h: np.ndarray  # float32 [layers, hidden]
    c: np.ndarray
    model_name: str
    model_version: str
    backend: str
    memory_reset: bool


@dataclass
class LoadedModel:
    backend: Any  # mobile_vla.export Backend
    name: str
    version: str
    alias: str | None
    uri: str
    state_shape: tuple[int, int]  # (layers, hidden) of one robot's h or c


class PolicyDeployment:
    """Shared body of both policy deployments; subclasses set `PREFER`."""

    PREFER: tuple[str, ...] = ()

    def __init__(self):
        from mobile_vla.serve.metrics import PolicyMetrics

        self._model: LoadedModel | None = None
        self._load_error: str | None = None
        self._config: PolicyUserConfig | None = None
        self._metrics = PolicyMetrics()
        self._batches = 0  # counters for info(): mean batch size = batched_requests / batches
        self._batched_requests = 0

    # -- model lifecycle -------------------------------------------------------------------------
    def _load_model(self, config: PolicyUserConfig) -> LoadedModel:
        """Resolves the URI and opens the first backend of PREFER that works on this machine."""
        from mobile_vla.export import load_backend
        from mobile_vla.tracking import resolve_model

        resolved = resolve_model(config.model_uri)
        backend = load_backend(resolved.path, prefer=self.PREFER, fp16=config.fp16)
        h, _ = backend.initial_memory(1)
        name = backend.model_name or resolved.name or "unknown"
        version = str(backend.model_version or resolved.version or "unknown")
        return LoadedModel(backend, name, version, config.alias or resolved.alias, config.model_uri,
                           (int(h.shape[0]), int(h.shape[2])))

    def reconfigure(self, user_config: dict) -> None:
        config = PolicyUserConfig.model_validate(user_config)
        self._check_batch_fits(config)
        self._predict_batch.set_max_batch_size(config.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        previous = self._config
        self._config = config
        if previous is not None and previous.model_uri == config.model_uri and previous.fp16 == config.fp16 \
                and self._model is not None:
            return  # batching or fault change only
        try:
            loaded = self._load_model(config)
        except Exception as exc:  # stay up: the ingress routes around an unloaded replica
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.error("policy %s could not load %s: %s", type(self).__name__, config.model_uri, self._load_error)
            return
        self._model, self._load_error = loaded, None  # atomic swap: in-flight batches keep the old one
        logger.info("policy %s serving %s version %s on %s", type(self).__name__, loaded.name, loaded.version,
                    loaded.backend.name)

    @staticmethod
    def _check_batch_fits(config: PolicyUserConfig) -> None:
        from ray import serve

        try:
            limit = serve.get_replica_context()._deployment_config.max_ongoing_requests
        except Exception:
            return
        if config.max_batch_size > limit:
            raise ValueError(
                f"max_batch_size = {config.max_batch_size} exceeds max_ongoing_requests = {limit}: "
                "batches could never fill; raise max_ongoing_requests"
            )

    # -- requests ---------------------------------------------------------------------------------
    async def info(self) -> dict:
        model = self._model
        return {
            "loaded": model is not None,
            "backend": model.backend.name if model else None,
            "skipped": dict(getattr(model.backend, "skipped", {}) or {}) if model else {},
            "model_name": model.name if model else None,
            "model_version": model.version if model else None,
            "alias": model.alias if model else None,
            "uri": model.uri if model else (self._config.model_uri if self._config else None),
            "error": self._load_error,
            "max_batch_size": self._config.max_batch_size if self._config else None,
            "batches": self._batches,
            "batched_requests": self._batched_requests,
        }

    async def step(self, request: StepRequest) -> StepResult:
        for fault in self._config.faults if self._config else ():  # TEST-ONLY (FaultConfig)
            if request.robot_id.startswith(fault.robot_prefix):
                if fault.mode == "slow":
                    await asyncio.sleep(fault.delay_s)
                else:
                    raise RuntimeError(f"injected fault for robots {fault.robot_prefix}* (user_config.faults)")
        if self._model is None:
            raise BackendUnavailable(f"{type(self).__name__} has no model loaded: {self._load_error}")
        return await self._predict_batch(request)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _predict_batch(self, requests: list[StepRequest]) -> list[StepResult]:
        model = self._model  # one model for the whole batch, even if a swap lands meanwhile
        B = len(requests)
        images = np.stack([r.image for r in requests])  # [B, H, W, C] uint8
        state = np.stack([r.state for r in requests]).astype(np.float32)  # [B, S]
        instructions = [r.instruction for r in requests]
        h0, c0 = model.backend.initial_memory(B)  # each [layers, B, hidden]
        h0, c0 = np.array(h0, dtype=np.float32), np.array(c0, dtype=np.float32)
        reset = []
        for b, r in enumerate(requests):
            usable = (
                r.h is not None and r.memory_version == model.version and r.memory_name == model.name
                and r.h.shape == model.state_shape and r.c.shape == model.state_shape
            )
            if usable:
                h0[:, b], c0[:, b] = r.h, r.c
            reset.append(r.h is not None and not usable)
        start = time.perf_counter()
        out = await asyncio.to_thread(model.backend.predict, images, state, instructions, (h0, c0))
        self._metrics.batch_latency_ms.observe((time.perf_counter() - start) * 1000, tags={"backend": model.backend.name})
        self._metrics.batch_size.observe(B, tags={"backend": model.backend.name})
        self._metrics.sample_resources()
        self._batches += 1
        self._batched_requests += B
        h1, c1 = out.memory
        actions = np.asarray(out.actions, dtype=np.float32)  # [B, K, 3]
        confidence = np.asarray(out.confidence, dtype=np.float32)  # [B]
        return [
            StepResult(actions[b], float(confidence[b]), np.asarray(h1[:, b]), np.asarray(c1[:, b]),
                       model.name, model.version, model.backend.name, reset[b])
            for b in range(B)
        ]

    def check_health(self) -> None:
        """An unloaded model is not a reason to restart (the ingress falls back); nothing else to check."""


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_gpus": 1, "num_cpus": 1})
class TensorRTPolicy(PolicyDeployment):
    """Primary on GPU nodes: a TensorRT plan built for this GPU model and TensorRT version."""

    PREFER = ("tensorrt",)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class OnnxPolicy(PolicyDeployment):
    """ONNX Runtime: the fallback beside TensorRT, or the primary on CPU-only machines."""

    PREFER = ("onnx-cuda", "onnx-cpu")


POLICY_CLASSES = {"tensorrt": TensorRTPolicy, "onnx": OnnxPolicy}
