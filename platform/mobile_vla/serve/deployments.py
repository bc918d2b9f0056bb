"""Policy deployments: stateless replicas that run one recurrent step for a batch of robots.

`TensorRTPolicy` (GPU, the primary on GPU nodes) and `OnnxPolicy` (ONNX Runtime: CUDA provider on
a GPU, CPU provider otherwise; the fallback, or the primary on CPU-only machines) share one replica
body (`PolicyReplica`) and differ only in which runtime backends they accept (`POLICY_BACKENDS`).
Batching happens twice: the ingress gathers concurrent robots into one `step_batch` call (so
Serve's per-call cost is paid once per batch, not per robot), and `@serve.batch` here merges the
batches that arrive while the model runs (from several ingress replicas, or the ingress's next
batch) into one `backend.predict` call, run in a thread so the event loop keeps queueing.
`CONCURRENT_BATCHES` model runs may overlap, so the next batch is unpacked while one computes.

The model comes from `user_config` (`PolicyUserConfig`): `reconfigure()` runs at start and on every
user_config change without a restart. With `alias` set, each replica also follows the alias itself
(hot swap): a watcher thread polls the registry every `alias_poll_s`; when the alias points to
another version it prepares it (`_prepare_version`: the TensorRT engine fetch/build, minutes, off
the request path), loads it beside the old one, verifies it (signature + a probe step) and swaps the
reference in one assignment. Batches already running keep the model they started with; a version
that fails leaves the old one serving, counts in `mobile_vla_model_load_failures`, shows in
`info()` and is tried again with a capped backoff (`RETRY_FAILED_BASE_S` doubling to
`RETRY_FAILED_CAP_S`) until it or a later version loads. A failed alias check (registry down) is
retried the same way (`REGISTRY_RETRY_*`), shown in `info()` (`registry_error`) and cleared by the
next answer. With the registry down, a (re)starting replica loads the version the alias named when
this node last asked, from the verified local cache (`from_cache` in `info()`, the gauge
`mobile_vla_model_from_cache`). `check_health` (Serve's health period) fails a replica whose
loaded model no longer answers: Serve replaces it. Why each replica polls (not a controller pushing user_config):
nothing else has to run for an alias moved in the MLflow UI to take effect, and a replica that
restarts starts on the alias's current version.

The replica is also the one place an instruction is tokenised (the backend's instruction cache): a
batch the backend refuses (an instruction with more tokens than the model takes) is run robot by
robot, and only the robots at fault get a refusal (`StepFailure.refused`: a 422 at the ingress).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time

import numpy as np
from ray import serve

from mobile_vla.errors import DataError
from mobile_vla.serve.deploy_options import grpc_limit_shortfall
from mobile_vla.serve.heap import freeze_long_lived_heap
from mobile_vla.serve.metrics import PolicyMetrics
from mobile_vla.serve.model_versions import (
    LoadedModel,
    alias_target,
    load_model,
    probe_model,
    remembered_target,
    verify_model,
)
from mobile_vla.serve.retry import Backoff, bound_registry_calls
from mobile_vla.serve.schemas import BackendUnavailable, StepFailure, StepRequest, StepResult
from mobile_vla.serve.settings import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH_SIZE,
    ONNX,
    POLICY_BACKENDS,
    TENSORRT,
    PolicyUserConfig,
    needs_gpu,
)

logger = logging.getLogger("ray.serve")

CONCURRENT_BATCHES = 2  # model runs at once per replica: one prepares or returns while the other computes
RETRY_FAILED_BASE_S = 5.0  # a version that failed is tried again after this (e.g. its onnx/ got attached since),
RETRY_FAILED_CAP_S = 300.0  # doubling per further failure up to this (a TensorRT build that fails costs minutes)
REGISTRY_RETRY_BASE_S = 1.0  # a failed alias check: the next one after max(alias_poll_s, this), doubling,
REGISTRY_RETRY_CAP_S = 60.0  # up to this: a registry coming back is seen within a minute
HEALTH_PROBE_TIMEOUT_S = 10.0  # check_health's probe step must answer within this (Serve's own timeout is 30 s)


class PolicyReplica:
    """Shared body of the policy deployments; subclasses set `KIND` (which backends they accept)."""

    KIND: str = ""
    CONFIG: type[PolicyUserConfig] = PolicyUserConfig  # what user_config must hold

    def __init__(self):
        self._model: LoadedModel | None = None
        self._load_error: str | None = None
        self._config: PolicyUserConfig | None = None
        self._metrics = PolicyMetrics()
        self._batches = 0  # counters for info(): mean batch size = batched_requests / batches
        self._batched_requests = 0
        self._calls = 0  # step/step_batch calls: the ingress sends one per batch it gathered
        self._pending_version: str | None = None  # being prepared/loaded beside the serving model
        self._failed: dict | None = None  # {"version", "error"} of the last version that could not load
        self._load_retry = Backoff(RETRY_FAILED_BASE_S, RETRY_FAILED_CAP_S)  # when _failed's version is tried again
        self._registry = Backoff(REGISTRY_RETRY_BASE_S, REGISTRY_RETRY_CAP_S)  # failed alias checks
        self._batches_at_health_check = -1  # self._batches when check_health last looked
        bound_registry_calls()  # a registry that is down fails a call in seconds, not minutes of MLflow retries
        self._swaps = 0
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._follow_alias, name="alias-watcher", daemon=True)
        self._watcher.start()

    # -- model lifecycle -------------------------------------------------------------------------
    def _prepare_version(self, config: PolicyUserConfig) -> None:
        """What must exist before `config.model_uri` can load here; TensorRTPolicy fetches or builds
        the engine. Runs on the watcher thread while the old model keeps serving.
        """

    # -- hot swap: following the alias ------------------------------------------------------------
    def _follow_alias(self) -> None:
        while True:
            config = self._config
            if self._stop.wait(config.alias_poll_s if config and config.alias_poll_s > 0 else 1.0):
                return
            if not self._registry.due():
                continue
            try:
                self._check_alias()
            except Exception as exc:  # registry unreachable: keep serving, look again after a backoff
                self._registry_failed(f"alias check failed: {type(exc).__name__}: {exc}")
            else:
                if self._registry.succeeded():
                    logger.info("policy %s: the registry answers again", type(self).__name__)

    def _registry_failed(self, error: str) -> None:
        delay = self._registry.failed(error)
        self._metrics.registry_errors.inc()
        logger.warning(
            "policy %s: %s (failure %d; next try in %.0f s)", type(self).__name__, error, self._registry.failures, delay
        )

    def _check_alias(self) -> None:
        config = self._config
        if config is None:
            return
        target = alias_target(config)
        if target is None:
            return
        version = target.model_uri.rsplit("/", 1)[1]
        model, failed = self._model, self._failed
        if model is None and failed is None:
            return  # reconfigure() is still loading the first model: never load twice at once
        if model is not None and model.version == version:
            if failed is not None:
                self._failed = None  # the alias is back on what we serve (a rollback): nothing is wrong now
                self._load_retry.succeeded()
            if model.from_cache:  # the registry confirms the version the cache stood in for
                self._model = dataclasses.replace(model, from_cache=False)
                self._metrics.from_cache.set(0)
                logger.info("policy %s: registry reachable, version %s confirmed", type(self).__name__, version)
            return
        if failed and failed["version"] == version and not self._load_retry.due():
            return
        self._swap_to(target, version)

    def _swap_to(self, config: PolicyUserConfig, version: str) -> bool:
        """Prepare, load and verify `version` beside the serving model, then swap in one assignment."""
        old = self._model
        self._pending_version = version
        started = time.perf_counter()
        try:
            self._prepare_version(config)
            loaded = load_model(config, POLICY_BACKENDS[self.KIND])
            verify_model(loaded, version)
        except Exception as exc:  # the old model keeps serving
            if self._failed is None or self._failed["version"] != version:
                self._load_retry.succeeded()  # another version: its backoff starts afresh
            self._failed = {"version": version, "error": f"{type(exc).__name__}: {exc}"[:1000]}
            delay = self._load_retry.failed(self._failed["error"])
            self._metrics.load_failures.inc()
            logger.error(
                "policy %s: version %s failed to load, still serving %s (next try in %.0f s): %s",
                type(self).__name__,
                version,
                old.version if old else "nothing",
                delay,
                self._failed["error"],
            )
            return False
        finally:
            self._pending_version = None
        self._model, self._failed, self._load_error = loaded, None, None  # atomic swap
        self._load_retry.succeeded()
        self._metrics.from_cache.set(1 if loaded.from_cache else 0)
        freeze_long_lived_heap()
        self._swaps += 1
        self._metrics.swaps.inc()
        self._metrics.swap_seconds.observe(time.perf_counter() - started)
        logger.info(
            "policy %s: hot swap %s -> %s on %s in %.1f s",
            type(self).__name__,
            old.version if old else "none",
            loaded.version,
            loaded.backend.name,
            time.perf_counter() - started,
        )
        return True

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            stop.set()

    def reconfigure(self, user_config: dict) -> None:
        config = self.CONFIG.model_validate(user_config)
        self._check_batch_fits(config)
        shortfall = grpc_limit_shortfall(config.max_batch_size, dict(os.environ))  # a config that dropped our env
        if shortfall:
            logger.warning("policy %s: %s", type(self).__name__, shortfall)
        self._predict_chunks.set_max_batch_size(config.max_batch_size)
        self._predict_chunks.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        previous = self._config
        self._config = config
        if (
            previous is not None
            and previous.model_uri == config.model_uri
            and previous.fp16 == config.fp16
            and previous.int8 == config.int8
            and self._model is not None
        ):
            return  # batching change only
        try:  # a (re)started replica begins on the alias's current version, not the one pinned at deploy time
            config = alias_target(config) or config
        except Exception as exc:  # registry down: the version the alias named when this node last asked
            config = remembered_target(config) or config
            self._registry_failed(f"alias lookup failed, loading {config.model_uri}: {type(exc).__name__}: {exc}")
        try:
            loaded = load_model(config, POLICY_BACKENDS[self.KIND])
        except Exception as exc:  # stay up: the ingress routes around an unloaded replica
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.error("policy %s could not load %s: %s", type(self).__name__, config.model_uri, self._load_error)
            # the watcher tries again at once, with _prepare_version (e.g. build the missing TensorRT engine)
            self._failed = {"version": config.model_uri.rsplit("/", 1)[-1], "error": self._load_error}
            self._load_retry.succeeded()
            return
        self._model, self._load_error = loaded, None  # atomic swap: in-flight batches keep the old one
        self._metrics.from_cache.set(1 if loaded.from_cache else 0)
        if loaded.from_cache:
            logger.warning(
                "policy %s: the registry is unreachable; serving version %s from the local cache",
                type(self).__name__,
                loaded.version,
            )
        freeze_long_lived_heap()  # torch, ONNX Runtime, the model: never walked by a full collection mid-request
        logger.info(
            "policy %s serving %s version %s on %s",
            type(self).__name__,
            loaded.name,
            loaded.version,
            loaded.backend.name,
        )

    @staticmethod
    def _check_batch_fits(config: PolicyUserConfig) -> None:
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
            "pending_version": self._pending_version,
            "failed_version": self._failed["version"] if self._failed else None,
            "failed_error": self._failed["error"] if self._failed else None,
            "failed_retry_in_s": self._load_retry.retry_in_s() if self._failed else None,
            "from_cache": bool(model and model.from_cache),  # the registry was down when this version loaded
            "registry_error": self._registry.last_error,  # the last failed alias check; None once one succeeds
            "registry_failures": self._registry.failures,
            "swaps": self._swaps,
            "max_batch_size": self._config.max_batch_size if self._config else None,
            "batches": self._batches,
            "batched_requests": self._batched_requests,
            "calls": self._calls,
            # hits/misses of the backend's instruction cache: a miss is the one tokenisation of an instruction
            "instructions": dict(model.backend.cache_stats) if model else None,
        }

    async def step(self, request: StepRequest) -> StepResult:
        """One robot's step (the shadow copy uses this); the ingress sends whole batches to `step_batch`."""
        result = (await self.step_batch([request]))[0]
        if isinstance(result, StepFailure):
            raise RuntimeError(result.error)
        return result

    async def step_batch(self, requests: list[StepRequest]) -> list[StepResult | StepFailure]:
        """Steps for a batch the ingress already gathered: one call per batch, not per robot. Chunks
        arriving together (several ingress replicas, or a next batch while the model runs) are merged
        again by `_predict_chunks` up to `max_batch_size` samples. A robot whose request the model
        refuses gets a StepFailure in its slot; the rest of the chunk is answered.
        """
        self._calls += 1
        if self._model is None:
            raise BackendUnavailable(f"{type(self).__name__} has no model loaded: {self._load_error}")
        return await self._predict_chunks(requests) if requests else []

    @serve.batch(
        max_batch_size=DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S,
        max_concurrent_batches=CONCURRENT_BATCHES,
        batch_size_fn=lambda chunks: sum(len(chunk) for chunk in chunks),
    )
    async def _predict_chunks(self, chunks: list[list[StepRequest]]) -> list[list[StepResult | StepFailure]]:
        model = self._model  # one model for the whole batch, even if a swap lands meanwhile
        requests = [r for chunk in chunks for r in chunk]
        results = await self._predict_rows(model, requests)
        out, start = [], 0
        for chunk in chunks:
            out.append(results[start : start + len(chunk)])
            start += len(chunk)
        return out

    async def _predict_rows(self, model: LoadedModel, requests: list[StepRequest]) -> list[StepResult | StepFailure]:
        """Each robot alone where it must be, the rest as one batch: a step whose deadline passed is
        dropped, not computed (`expired`); a robot whose input the model cannot take is refused
        (`refused`: 422) before the batch runs, so it never fails its batch-mates.
        """
        now = time.time()
        out: list[StepResult | StepFailure | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            if request.expired(now):
                out[i] = StepFailure("deadline passed before the model ran this step", expired=True)
                continue
            usable = _usable_memory(model, request)
            problem = model.backend.row_problem(
                request.state, request.h if usable else None, request.c if usable else None
            )
            if problem is not None:
                out[i] = StepFailure(problem, refused=True)
        run = [i for i, outcome in enumerate(out) if outcome is None]
        if len(run) < len(requests):
            self._metrics.dropped_rows.inc(float(len(requests) - len(run)))
        if run:
            for i, result in zip(run, await self._predict_or_refuse(model, [requests[i] for i in run]), strict=True):
                out[i] = result
        return out

    async def _predict_or_refuse(
        self, model: LoadedModel, requests: list[StepRequest]
    ) -> list[StepResult | StepFailure]:
        """The batch in one predict; when the backend refuses its input (DataError, e.g. an instruction
        with too many tokens), each robot alone, so only the robots at fault are refused. Instructions
        that were fine stay tokenised in the tokenizer's cache: the retry tokenises nothing again.
        """
        try:
            return await self._predict(model, requests)
        except DataError as exc:
            if len(requests) == 1:
                return [StepFailure(str(exc), refused=True)]
        return [(await self._predict_or_refuse(model, [request]))[0] for request in requests]

    async def _predict(self, model: LoadedModel, requests: list[StepRequest]) -> list[StepResult | StepFailure]:
        """One backend call for the batch; a robot whose output is not finite gets a StepFailure alone."""
        B = len(requests)
        images = np.stack([r.image for r in requests])  # [B, H, W, C] uint8
        state = np.stack([r.state for r in requests]).astype(np.float32)  # [B, S]
        instructions = [r.instruction for r in requests]
        h0, c0 = model.backend.initial_memory(B)  # each [layers, B, hidden]
        h0, c0 = np.array(h0, dtype=np.float32), np.array(c0, dtype=np.float32)
        reset = []
        for b, r in enumerate(requests):
            usable = _usable_memory(model, r)
            if usable:
                h0[:, b], c0[:, b] = r.h, r.c
            reset.append(r.h is not None and not usable)
        start = time.perf_counter()
        out = await asyncio.to_thread(model.backend.predict, images, state, instructions, (h0, c0))
        compute_ms = (time.perf_counter() - start) * 1000
        self._metrics.batch_latency_ms.observe(compute_ms, tags={"backend": model.backend.name})
        self._metrics.batch_size.observe(B, tags={"backend": model.backend.name})
        self._metrics.sample_resources()
        self._batches += 1
        self._batched_requests += B
        h1, c1 = out.memory
        actions = np.asarray(out.actions, dtype=np.float32)  # [B, K, 3]
        confidence = np.asarray(out.confidence, dtype=np.float32)  # [B]
        confidence_now = None if out.confidence_now is None else np.asarray(out.confidence_now, np.float32)  # [B]
        novelty = None if out.novelty is None else np.asarray(out.novelty, dtype=np.float32)  # [B]
        safety = model.backend.safety  # the version's calibration (policy/novelty.py), or None
        thresholds = safety.thresholds if safety is not None else None
        broken = set(out.nonfinite_rows())
        if broken:
            self._metrics.nonfinite_rows.inc(float(len(broken)))
            logger.warning("policy %s: non-finite output for %d of %d robots", type(self).__name__, len(broken), B)
        return [
            StepFailure(f"{model.backend.name} gave a non-finite output for this robot")
            if b in broken
            else StepResult(
                actions[b],
                float(confidence[b]),
                np.asarray(h1[:, b]),
                np.asarray(c1[:, b]),
                model.name,
                model.version,
                model.backend.name,
                reset[b],
                confidence_now=None if confidence_now is None else float(confidence_now[b]),
                novelty=None if novelty is None else float(novelty[b]),
                thresholds=thresholds,
                compute_ms=compute_ms,
            )
            for b in range(B)
        ]

    async def check_health(self) -> None:
        """Serve's liveness check (every health period): raises, so Serve replaces this replica, when the
        loaded model no longer answers. Free while traffic flows: a batch the model ran since the last
        check is the proof; otherwise (idle, or every batch faulted) one probe step of one robot with
        a cached instruction must give finite actions within `HEALTH_PROBE_TIMEOUT_S`. An unloaded
        model is no reason to restart (the ingress falls back; a load is retried by the watcher).
        """
        model, batches = self._model, self._batches
        if model is None:
            return
        ran, self._batches_at_health_check = batches != self._batches_at_health_check, batches
        if ran:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(probe_model, model), HEALTH_PROBE_TIMEOUT_S)
        except Exception as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            logger.error("policy %s: health probe of version %s failed: %s", type(self).__name__, model.version, reason)
            raise RuntimeError(f"{type(self).__name__}: the loaded model failed its health probe: {reason}") from exc


def _usable_memory(model: LoadedModel, request: StepRequest) -> bool:
    """Whether the robot's memory token belongs to the served model (else the step starts from zero)."""
    return (
        request.h is not None
        and request.c is not None
        and request.memory_version == model.version
        and request.memory_name == model.name
        and request.h.shape == model.state_shape
        and request.c.shape == model.state_shape
    )


class TensorRTReplica(PolicyReplica):
    """Primary on GPU nodes: a TensorRT plan built for this GPU model and TensorRT version."""

    KIND = TENSORRT

    def _prepare_version(self, config: PolicyUserConfig) -> None:
        """A new version rarely has a plan for this GPU yet: fetch it from the version, else build and
        attach it (minutes; the ingress sends this version's traffic to the ONNX fallback meanwhile).
        The plan takes the config's `max_batch_size` in one call (a smaller one is rebuilt).
        """
        # Deferred: building an engine needs the exporter (torch, transformers, open_clip: ~1 GB and
        # seconds to import); importing it at the top put all that into every ONNX and ingress replica,
        # and a serving process that holds it answers slower (more heap for the GC to walk).
        from mobile_vla.serve.engine_provision import ensure_engine

        super()._prepare_version(config)
        ensure_engine(config.model_uri, fp16=config.fp16, max_batch_size=config.max_batch_size)


class OnnxReplica(PolicyReplica):
    """ONNX Runtime: the fallback beside TensorRT, or the primary on CPU-only machines."""

    KIND = ONNX


REPLICA_RESOURCES = {
    kind: {"num_gpus": 1, "num_cpus": 1} if needs_gpu(kind) else {"num_cpus": 1} for kind in POLICY_BACKENDS
}  # what a replica of each kind reserves


def policy_deployment(replica: type[PolicyReplica], name: str):
    """`replica` as a Serve deployment called `name`, with the resources its kind needs."""
    return serve.deployment(
        replica, name=name, max_ongoing_requests=64, ray_actor_options=dict(REPLICA_RESOURCES[replica.KIND])
    )


TensorRTPolicy = policy_deployment(TensorRTReplica, "TensorRTPolicy")
OnnxPolicy = policy_deployment(OnnxReplica, "OnnxPolicy")
POLICY_DEPLOYMENTS = {TENSORRT: TensorRTPolicy, ONNX: OnnxPolicy}
