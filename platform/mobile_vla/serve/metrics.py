"""Prometheus metrics, exported through Ray (`ray.serve.metrics`), not a /metrics route.

Why Ray's exporter: with several ingress and policy replicas behind the proxy, a per-replica
/metrics route would answer for one random replica per scrape. Ray aggregates every replica's
metrics on each node's metrics export port (`ray start --metrics-export-port=8080`; Ray writes
the targets to /tmp/ray/prom_metrics_service_discovery.json for Prometheus' file_sd). The names
below appear there with the prefix `ray_`, e.g. `ray_mobile_vla_requests_total`. Ray itself adds
node memory and GPU utilisation (`ray_node_mem_used`, `ray_node_gpus_utilization`); the replica
gauges here say which replica holds what.

Objects are created per replica (never at import time) because Ray metrics need a connected worker.
"""

from __future__ import annotations

import os
import time

import psutil
from ray.serve.metrics import Counter, Gauge, Histogram

SWAP_SECONDS_BOUNDARIES = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200]
ACTION_DIFF_BOUNDARIES = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128]
NOVELTY_BOUNDARIES = [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]
CONFIDENCE_BOUNDARIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


class IngressMetrics:
    """Per-request metrics of an ingress replica."""

    def __init__(self):
        self.requests = Counter(
            "mobile_vla_requests",
            "HTTP requests by route, backend and status.",
            tag_keys=("route", "backend", "status"),
        )
        self.latency_ms = Histogram(
            "mobile_vla_request_latency_ms",
            "Ingress latency of answered /v1/act calls.",
            boundaries=LATENCY_MS_BOUNDARIES,
            tag_keys=("backend",),
        )
        self.fallbacks = Counter(
            "mobile_vla_fallbacks", "Requests sent to the fallback, by reason.", tag_keys=("reason",)
        )
        self.confidence = Histogram(
            "mobile_vla_confidence",
            "Confidence of answered actions.",
            boundaries=CONFIDENCE_BOUNDARIES,
            tag_keys=("backend",),
        )
        self.memory_resets = Counter("mobile_vla_memory_resets", "Memory tokens dropped (other model version).")
        self.safety = Counter(
            "mobile_vla_safety_decisions",
            "Answered /v1/act steps by safety level (normal, slow, stop, handover) and reason (low_confidence, "
            "novel_frame, stale, consecutive_stops; none for normal). A step with two reasons counts under each.",
            tag_keys=("level", "reason"),
        )
        self.novelty = Histogram(
            "mobile_vla_novelty",
            "Novelty of answered frames (about 1 in distribution; versions with training statistics only).",
            boundaries=NOVELTY_BOUNDARIES,
            tag_keys=("backend",),
        )
        self.breaker_open = Gauge("mobile_vla_primary_breaker_open", "1 while the primary's circuit breaker is open.")
        self.registry_errors = registry_errors_counter()
        self.shadow = Counter(
            "mobile_vla_shadow_requests",
            "Copies of /v1/act sent to the shadow (challenger), by outcome: agree, disagree, error, dropped.",
            tag_keys=("outcome",),
        )
        self.shadow_action_diff = Histogram(
            "mobile_vla_shadow_action_diff",
            "Mean absolute difference of the champion's and the shadow's action chunks (m/s, rad/s).",
            boundaries=ACTION_DIFF_BOUNDARIES,
        )

    def request(self, route: str, backend: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "backend": backend, "status": str(status)})


JERK_BOUNDARIES = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]


class VersionMetrics:
    """Per-model-version KPIs of live /v1/act traffic (canary rollout, serve/canary.py), labelled by version."""

    def __init__(self):
        self.steps = Counter(
            "mobile_vla_version_steps",
            "Answered /v1/act steps by the version the robot is assigned to (sticky), the version that "
            "answered, and whether another deployment answered (fallback: true/false).",
            tag_keys=("assigned", "version", "fallback"),
        )
        self.confidence = Histogram(
            "mobile_vla_version_confidence",
            "Confidence of answered actions, by model version.",
            boundaries=CONFIDENCE_BOUNDARIES,
            tag_keys=("version",),
        )
        self.safety = Counter(
            "mobile_vla_version_safety", "Answered steps by version and safety level.", tag_keys=("version", "level")
        )
        self.jerk = Histogram(
            "mobile_vla_version_action_jerk",
            "Mean |second difference| of an answered action chunk times control rate squared, by version.",
            boundaries=JERK_BOUNDARIES,
            tag_keys=("version",),
        )
        self.latency_ms = Histogram(
            "mobile_vla_version_latency_ms",
            "Ingress latency of answered /v1/act steps, by version.",
            boundaries=LATENCY_MS_BOUNDARIES,
            tag_keys=("version",),
        )
        self.divergence = Histogram(
            "mobile_vla_version_divergence",
            "Mean absolute difference of a version's chunk from the champion's on mirrored steps (m/s, rad/s).",
            boundaries=ACTION_DIFF_BOUNDARIES,
            tag_keys=("version",),
        )
        self.canary_share = Gauge("mobile_vla_canary_share", "Percent of robots the @canary version serves now.")
        self.mirror = Counter(
            "mobile_vla_canary_mirror_requests",
            "Canary steps mirrored to the champion for the divergence KPI, by outcome: agree, disagree, error, "
            "dropped.",
            tag_keys=("outcome",),
        )

    def answered(
        self, assigned: str, served: str, fallback: bool, confidence: float, level: str, jerk: float, latency_ms: float
    ) -> None:
        tags = {"version": served}
        self.steps.inc(tags={"assigned": assigned, "version": served, "fallback": str(fallback).lower()})
        self.confidence.observe(confidence, tags=tags)
        self.safety.inc(tags={"version": served, "level": level})
        self.jerk.observe(jerk, tags=tags)
        self.latency_ms.observe(latency_ms, tags=tags)


class PolicyMetrics:
    """Per-batch, hot-swap and resource metrics of a policy replica."""

    def __init__(self):
        self.batch_size = Histogram(
            "mobile_vla_batch_size",
            "Requests per executed batch.",
            boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("backend",),
        )
        self.batch_latency_ms = Histogram(
            "mobile_vla_batch_latency_ms",
            "Backend predict time per batch.",
            boundaries=LATENCY_MS_BOUNDARIES,
            tag_keys=("backend",),
        )
        # Ray Serve tags these with the deployment and replica itself (the `deployment` tag is its own).
        self.swaps = Counter("mobile_vla_model_swaps", "Hot swaps to a new model version.")
        self.load_failures = Counter(
            "mobile_vla_model_load_failures", "New versions that failed to load (the old one kept serving)."
        )
        self.from_cache = Gauge(
            "mobile_vla_model_from_cache",
            "1 while this replica serves a version resolved from its local cache (the registry was unreachable).",
        )
        self.registry_errors = registry_errors_counter()
        self.swap_seconds = Histogram(
            "mobile_vla_model_swap_seconds",
            "Prepare + load + verify time of a hot swap.",
            boundaries=SWAP_SECONDS_BOUNDARIES,
        )
        self.dropped_rows = Counter(
            "mobile_vla_dropped_rows", "Robots answered without running the model: deadline passed or input refused."
        )
        self.nonfinite_rows = Counter(
            "mobile_vla_nonfinite_rows", "Robots whose model output was NaN/inf (failed alone, not their batch)."
        )
        self.memory_bytes = Gauge("mobile_vla_replica_memory_bytes", "Resident memory of this replica.")
        self.gpu_utilization = Gauge(
            "mobile_vla_replica_gpu_utilization", "GPU utilisation (0-100) seen by this replica."
        )
        self._last_sample = 0.0

    def sample_resources(self, every_s: float = 5.0) -> None:
        """RSS (and GPU utilisation where NVML is present), at most once per `every_s`."""
        now = time.monotonic()
        if now - self._last_sample < every_s:
            return
        self._last_sample = now
        self.memory_bytes.set(psutil.Process(os.getpid()).memory_info().rss)
        utilization = gpu_utilization()
        if utilization is not None:
            self.gpu_utilization.set(utilization)


def registry_errors_counter() -> Counter:
    """Failed registry calls of a replica (alias checks, version lookups, side loads): the same metric everywhere."""
    return Counter(
        "mobile_vla_registry_errors", "Model registry calls (alias checks, version loads) that failed; retried."
    )


def gpu_utilization() -> float | None:
    """Utilisation of the first visible GPU, or None without a GPU or NVML."""
    try:
        import pynvml  # nvidia-ml-py, present on GPU nodes with the [gpu] extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        handle = (
            pynvml.nvmlDeviceGetHandleByIndex(int(visible))
            if visible.isdigit()
            else pynvml.nvmlDeviceGetHandleByIndex(0)
        )
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # NVML without a driver: no GPU to report
        return None
