"""Canary rollout, the ingress's side: which robots the `@canary` version serves, and what each
version does on live traffic (its KPIs).

Sticky assignment. A robot's bucket is a stable hash of its robot id (BLAKE2b, not Python's salted
`hash`), a number in [0, 100): the robot is on the canary while its bucket is below the canary's
share (percent). Every ingress replica on every node computes the same bucket, so a robot stays on
one version across requests and replicas, and widening the share only adds robots (a robot on the
canary at 10% is still on it at 50%).

Where the share lives. The rollout controller (`serve.rollout`) writes it on the registered model
(`tracking.lifecycle.set_canary_share`); each ingress reads it with `@canary` every `alias_poll_s`
(`CanaryWatch`). The canary serves a robot only while `@canary` names a version other than the
champion's AND the canary deployment has that version loaded; otherwise every robot is the
champion's (a rollback moves `@canary` back to the champion's version and the share to 0).

KPIs. `FleetKpis` keeps, per model version, cumulative counts of the answers it gave on this
ingress replica: steps, fallbacks (a step assigned to the version that another deployment answered),
confidence (sum and a histogram), safety levels (serve/safety.py: slow, stop, handover), action
jerk of the answered chunk, latency, and divergence from the champion on mirrored steps. The same
numbers go to Prometheus labelled by version (`metrics.VersionMetrics`); `GET /v1/rollout` answers
the snapshot, from which the controller takes differences over its windows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from mobile_vla.serve.errors_http import ApiError
from mobile_vla.serve.router import BatchRouter, Routed, ServedVersions
from mobile_vla.serve.safety import HANDOVER, SLOW, STOP
from mobile_vla.serve.schemas import StepRequest
from mobile_vla.serve.settings import IngressConfig, ShadowConfig
from mobile_vla.serve.shadow import ShadowMirror
from mobile_vla.tracking.rollout import canary_state

logger = logging.getLogger("ray.serve")

BUCKETS = 10_000  # bucket resolution: shares are honoured to 0.01 percent
LATENCY_WINDOW = 2_000  # recent latencies kept per version for the p95
CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # histogram of answered confidences


def robot_bucket(robot_id: str) -> float:
    """The robot's place in [0, 100): the same on every replica, node and restart."""
    digest = hashlib.blake2b(robot_id.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % BUCKETS) * (100.0 / BUCKETS)


def on_canary(robot_id: str, share: float) -> bool:
    """Whether the canary serves this robot at `share` percent (0 none, 100 all)."""
    return share > 0 and robot_bucket(robot_id) < share


def action_jerk(actions: np.ndarray, control_hz: float = 1.0) -> float:
    """Mean magnitude of the chunk's second difference, |a[k+2] - 2 a[k+1] + a[k]| * hz^2 (units per s^2
    with control_hz; per step^2 with 1): how abruptly the commanded velocities change. actions [K, 3].
    """
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 3:
        return 0.0
    second = a[2:] - 2 * a[1:-1] + a[:-2]  # [K-2, 3]
    return float(np.linalg.norm(second, axis=1).mean() * control_hz**2)


@dataclass
class VersionKpis:
    """Cumulative counts of one version's answers on one ingress replica (JSON-ready)."""

    assigned: int = 0  # steps routed to this version (sticky assignment)
    answered: int = 0  # steps this version answered
    fallbacks: int = 0  # assigned steps another deployment answered (its fallback, or the champion for a canary)
    confidence_sum: float = 0.0
    confidence_hist: list[int] = field(default_factory=lambda: [0] * (len(CONFIDENCE_EDGES) + 1))
    slow: int = 0
    stop: int = 0  # stop or handover: the robot was told to stand still
    jerk_sum: float = 0.0
    latency_ms_sum: float = 0.0
    divergence_sum: float = 0.0  # axis_divergence of mirrored chunks (largest per-axis mean |a - a_champion|)
    divergence_n: int = 0

    def minus(self, earlier: VersionKpis) -> VersionKpis:
        """What happened between `earlier` and this snapshot (a window)."""
        out = VersionKpis()
        for name, value in vars(self).items():
            before = getattr(earlier, name)
            setattr(
                out,
                name,
                [a - b for a, b in zip(value, before, strict=True)] if isinstance(value, list) else value - before,
            )
        return out

    @classmethod
    def from_dict(cls, data: dict) -> VersionKpis:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    # derived, None without the steps to judge on
    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.assigned if self.assigned else None

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.answered if self.answered else None

    @property
    def safe_stop_rate(self) -> float | None:
        return self.stop / self.answered if self.answered else None

    @property
    def slow_rate(self) -> float | None:
        return self.slow / self.answered if self.answered else None

    @property
    def mean_jerk(self) -> float | None:
        return self.jerk_sum / self.answered if self.answered else None

    @property
    def mean_latency_ms(self) -> float | None:
        return self.latency_ms_sum / self.answered if self.answered else None

    @property
    def divergence(self) -> float | None:
        return self.divergence_sum / self.divergence_n if self.divergence_n else None

    def rates(self) -> dict[str, float | None]:
        """The KPIs the controller judges (and records on the MLflow version)."""
        return {
            "steps": float(self.answered),
            "fallback_rate": self.fallback_rate,
            "mean_confidence": self.mean_confidence,
            "safe_stop_rate": self.safe_stop_rate,
            "slow_rate": self.slow_rate,
            "mean_jerk": self.mean_jerk,
            "mean_latency_ms": self.mean_latency_ms,
            "divergence": self.divergence,
            "divergence_samples": float(self.divergence_n),
        }


class FleetKpis:
    """Per-version KPIs of this ingress replica, and the same numbers as Prometheus metrics."""

    def __init__(self, metrics=None, control_hz: float = 1.0):
        self._by_version: dict[str, VersionKpis] = {}
        self._latencies: dict[str, deque] = {}
        self._metrics = metrics  # metrics.VersionMetrics, or None (tests)
        self.control_hz = control_hz

    def _of(self, version: str) -> VersionKpis:
        if version not in self._by_version:
            self._by_version[version] = VersionKpis()
            self._latencies[version] = deque(maxlen=LATENCY_WINDOW)
        return self._by_version[version]

    def answered(
        self, assigned: str, served: str, fallback: bool, confidence: float, level: str, actions, latency_ms: float
    ) -> None:
        """One answered step: `assigned` is the version the robot is on, `served` the one that answered."""
        kpis = self._of(assigned)
        kpis.assigned += 1
        kpis.fallbacks += int(fallback)
        mine = self._of(served)
        jerk = action_jerk(actions, self.control_hz)
        mine.answered += 1
        mine.confidence_sum += confidence
        mine.confidence_hist[int(np.searchsorted(CONFIDENCE_EDGES, confidence, side="right"))] += 1
        mine.slow += int(level == SLOW)
        mine.stop += int(level in (STOP, HANDOVER))
        mine.jerk_sum += jerk
        mine.latency_ms_sum += latency_ms
        self._latencies[served].append(latency_ms)
        if self._metrics is not None:
            self._metrics.answered(assigned, served, fallback, confidence, level, jerk, latency_ms)

    def diverged(self, version: str, diff: float) -> None:
        """A mirrored step: `version`'s chunk differed from the champion's by `diff` (`axis_divergence`)."""
        kpis = self._of(version)
        kpis.divergence_sum += diff
        kpis.divergence_n += 1
        if self._metrics is not None:
            self._metrics.divergence.observe(diff, tags={"version": version})

    def snapshot(self) -> dict[str, dict]:
        """{version: counts + derived rates + recent p95 latency}: the body of GET /v1/rollout's `kpis`."""
        out = {}
        for version, kpis in self._by_version.items():
            recent = self._latencies[version]
            out[version] = {
                **asdict(kpis),
                "rates": kpis.rates(),
                "p95_latency_ms": float(np.percentile(recent, 95)) if recent else None,
            }
        return out


@dataclass
class CanaryView:
    """What the ingress routes on: the canary version, its share and whether it may serve now."""

    version: str | None = None  # where @canary points (None: no canary)
    share: float = 0.0  # percent of robots
    loaded: bool = False  # the canary deployment serves `version`
    champion: str | None = None  # the version the ingress's alias serves
    error: str | None = None  # the last failed look at the registry or the canary deployment

    @property
    def active(self) -> bool:
        return bool(self.version and self.share > 0 and self.loaded and self.version != self.champion)

    def serves(self, robot_id: str) -> bool:
        return self.active and on_canary(robot_id, self.share)


class CanaryWatch:
    """Polls `@canary` and its share from the registry, and which version the canary deployment serves."""

    def __init__(self, model_name: str, alias: str, poll_s: float, canary_status, champion_version):
        self.model_name, self.alias, self.poll_s = model_name, alias, poll_s
        self._status = canary_status  # async () -> BackendStatus of the canary deployment
        self._champion = champion_version  # () -> the version the main alias serves
        self.view = CanaryView()
        self._task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        if self._task is None and self.poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.poll_s)

    async def refresh(self) -> CanaryView:
        view = CanaryView(champion=self._champion())
        try:
            view.version, view.share = await asyncio.to_thread(canary_state, self.model_name, self.alias)
            if view.version is not None:
                status = await self._status()
                view.loaded = bool(status.loaded and status.model_version == view.version)
        except Exception as exc:  # keep routing as before; the view says why
            view = CanaryView(self.view.version, self.view.share, self.view.loaded, view.champion)
            view.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            logger.warning("canary watch failed: %s", view.error)
        if (view.version, view.share, view.active) != (self.view.version, self.view.share, self.view.active):
            logger.info(
                "canary %s at %.1f%% (%s)", view.version, view.share, "serving" if view.active else "not serving"
            )
        self.view = view
        return view


class CanaryStatus(BaseModel):
    """The canary as one ingress replica routes it."""

    alias: str
    version: str | None = Field(description="Where the canary alias points (null: no canary).")
    share: float = Field(description="Percent of robots on the canary (sticky by robot id).")
    loaded: bool = Field(description="The canary deployment serves that version.")
    active: bool = Field(description="Robots are routed to it now: a share > 0, loaded, not the champion's version.")
    champion: str | None
    error: str | None = Field(description="The last failed look at the registry or the canary deployment.")


class RolloutStatus(BaseModel):
    """`GET /v1/rollout` (operator scope): the canary and per-version KPIs of this ingress replica."""

    canary: CanaryStatus | None = Field(description="Null when the app serves no canary.")
    kpis: dict[str, dict] = Field(
        description="Per model version since this replica started: cumulative counts (assigned, answered, fallbacks, "
        "confidence_sum, confidence_hist, slow, stop, jerk_sum, latency_ms_sum, divergence_sum, divergence_n), "
        "`rates` derived from them and the recent `p95_latency_ms`. A window is the difference of two snapshots."
    )
    replica: str = Field(description="Which ingress replica answered (host:pid): each keeps its own counts.")


def axis_divergence(canary: np.ndarray, champion: np.ndarray) -> float:
    """The divergence of one mirrored step: the largest per-axis mean |canary - champion| over the chunk
    (actions [K, 3]: m/s, m/s, rad/s). A bug on one axis (a steering bias on angular_z) reads at its full
    size instead of a third of it, as a mean over all three axes would.
    """
    return float(np.abs(canary - champion).mean(axis=0).max())  # [K, 3] -> [3] -> max


class _Discard:
    """A histogram that records nothing: the mirror's diff goes to the per-version divergence instead."""

    def observe(self, value, tags=None) -> None:
        pass


class _MirrorMetrics:
    """What ShadowMirror records, under the canary mirror's own names (not the challenger shadow's)."""

    def __init__(self, version_metrics):
        self.shadow = version_metrics.mirror
        self.shadow_action_diff = _Discard()


class CanaryRoute:
    """The ingress's canary: sticky routing to the canary deployment, the champion for everyone else
    (and for a canary robot whose step the canary could not answer: a fallback of the canary), and a
    sample of canary steps mirrored to the champion's primary for the divergence KPI (`ShadowMirror`).
    """

    def __init__(self, settings: IngressConfig, canary, primary, metrics, version_metrics, kpis: FleetKpis, versions):
        config = settings.canary
        own = settings.model_copy(
            update={"primary_name": settings.canary_name or "CanaryPolicy", "fallback_name": None}
        )
        self._router = BatchRouter(own, canary, None, metrics, ServedVersions())
        self._version_metrics = version_metrics
        self.watch = CanaryWatch(
            settings.model_uri.removeprefix("models:/").split("/")[0].split("@")[0],
            config.alias,
            settings.alias_poll_s,
            self._canary_status,
            lambda: versions.alias_version,
        )
        self._mirror = None
        if config.mirror_rate > 0 and primary is not None:
            mirror = ShadowConfig(alias="champion", sample_rate=config.mirror_rate, max_in_flight=config.max_in_flight)
            self._mirror = ShadowMirror(
                mirror,
                primary,
                _MirrorMetrics(version_metrics),
                lambda served, mirrored, _: kpis.diverged(
                    served.model_version, axis_divergence(served.actions, mirrored.actions)
                ),
            )

    async def _canary_status(self):
        return (await self._router.backend_statuses())[0]

    def ensure_running(self) -> None:
        self.watch.ensure_running()

    async def route(self, step: StepRequest, champion: BatchRouter) -> tuple[Routed, str | None, bool]:
        """(the answer, the version the robot is assigned to or None for the champion's, whether the
        canary failed and the champion answered in its place).
        """
        view = self.watch.view
        if self._version_metrics is not None:
            self._version_metrics.canary_share.set(view.share if view.active else 0.0)
        if not view.serves(step.robot_id):
            return await champion.route(step), None, False
        try:
            routed = await self._router.route(step)
        except ApiError as exc:
            if exc.status != 503:  # the robot's own input (422), an overload (429), a passed deadline (504)
                raise
            return await champion.route(step), view.version, True
        if self._mirror is not None:
            self._mirror.copy(step, routed.result)
        return routed, view.version, False

    def status(self) -> CanaryStatus:
        view = self.watch.view
        return CanaryStatus(
            alias=self.watch.alias,
            version=view.version,
            share=view.share,
            loaded=view.loaded,
            active=view.active,
            champion=view.champion,
            error=view.error,
        )
