"""The canary rollout controller: widens `@canary`'s share of robots in steps while its live KPIs stay
within bounds of the champion's, rolls back the moment one does not, promotes it at the end.

    mobile-vla rollout start --version 7 --steps 10,50,100 --hold-s 20 --url http://127.0.0.1:8000

A job (one process, the CLI above), not a Serve deployment: it holds no state serving needs, and
what it changes lives in the registry (`tracking.rollout`), which every ingress follows within
`alias_poll_s`. If the controller dies mid-rollout the canary keeps its last share; `mobile-vla
rollout stop` rolls it back.

Per step: set the share, then every `poll_s` read the KPIs (`GET /v1/rollout`, operator token), take
the window since the step began (the difference of two cumulative snapshots) and `judge` it:
- `rollback` as soon as a bound is breached (judged once the canary answered `min_steps` steps in the
  window, or `min_divergence_samples` mirrored steps for the divergence bound);
- `widen` once the step has been held `hold_s` with enough steps and no breach;
- `hold` otherwise; a step that never gathers `min_steps` within `max_hold_s` rolls back ("not enough
  traffic to judge": a canary nobody drives is not evidence).
The champion's numbers over the same window are the baseline; at 100% the champion has no live
traffic, so the last window that had it stands in (divergence needs none: it is mirrored).
Every poll's KPIs land on the canary's MLflow version as metrics (`rollout.<kpi>`, step = poll),
every decision as tags (`rollout.step.<i>`, `rollout.outcome`, `rollout.reason`); alias moves go
through `audit.set_alias` with actor "rollout" and the reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import Field, field_validator

from mobile_vla.config import StrictModel
from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.serve.canary import VersionKpis
from mobile_vla.tracking import CHAMPION, get_version_by_alias, log_version_metrics, set_version_tags
from mobile_vla.tracking.rollout import (
    promote_canary,
    rollback_canary,
    set_canary_share,
    start_canary,
)

logger = logging.getLogger(__name__)

ROLLBACK, WIDEN, HOLD = "rollback", "widen", "hold"


class RolloutBounds(StrictModel):
    """When a canary is rolled back: each KPI against the champion's over the same window."""

    min_steps: int = Field(default=30, ge=1, description="canary steps in a window before any rate is judged")
    min_divergence_samples: int = Field(default=10, ge=1, description="mirrored steps before divergence is judged")
    require_divergence: bool = Field(
        default=True, description="widen only once divergence was judged (false when the app mirrors nothing)"
    )
    max_fallback_rate_increase: float = Field(default=0.05, ge=0, description="canary minus champion, absolute")
    max_safe_stop_rate_increase: float = Field(default=0.10, ge=0, description="stop/handover share, absolute")
    max_confidence_drop: float = Field(default=0.15, ge=0, description="champion minus canary mean confidence")
    max_jerk_ratio: float = Field(default=2.0, gt=0, description="canary mean jerk / champion's (+ jerk_floor)")
    jerk_floor: float = Field(default=0.05, ge=0, description="added to both jerks: ratios of near-zero mean nothing")
    max_divergence: float = Field(default=0.15, gt=0, description="largest per-axis mean |canary - champion|, mirrored")
    max_latency_ratio: float = Field(default=2.0, gt=0, description="canary mean latency / champion's")
    latency_floor_ms: float = Field(default=20.0, ge=0, description="added to both latencies before the ratio")


class RolloutPlan(StrictModel):
    """One rollout: which version, the share steps, how long each is held, and the bounds."""

    model: str = "mobile-vla-policy"
    version: str = Field(min_length=1)
    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0])
    hold_s: float = Field(default=20.0, gt=0, description="seconds each step is held within bounds before widening")
    max_hold_s: float | None = Field(default=None, gt=0, description="a step without min_steps by then rolls back")
    poll_s: float = Field(default=2.0, gt=0, description="seconds between KPI reads")
    promote: bool = Field(default=True, description="move @champion to the version after the last step")
    bounds: RolloutBounds = Field(default_factory=RolloutBounds)

    @field_validator("steps")
    @classmethod
    def _rising_percents(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("steps: at least one share (percent) is needed")
        if any(not 0 < s <= 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"steps = {steps}: expected rising percents in (0, 100], e.g. 10,50,100")
        return steps

    @property
    def hold_limit_s(self) -> float:
        return self.max_hold_s if self.max_hold_s is not None else 3 * self.hold_s


@dataclass
class Verdict:
    """The controller's decision on one window."""

    action: str  # rollback | widen | hold
    reasons: list[str] = field(default_factory=list)  # the breaches (rollback) or what is missing (hold)
    kpis: dict[str, float | None] = field(default_factory=dict)  # the canary's rates in the window

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) or "within every bound"


def _breaches(canary: VersionKpis, baseline: VersionKpis | None, bounds: RolloutBounds) -> list[str]:
    """Every bound the canary's window breaches (rates only once it has `min_steps` answers)."""
    out = []
    divergence = canary.divergence
    if divergence is not None and canary.divergence_n >= bounds.min_divergence_samples:
        if divergence > bounds.max_divergence:
            out.append(f"divergence {divergence:.3f} > max_divergence {bounds.max_divergence:g}")
    if canary.assigned < bounds.min_steps:
        return out
    base = baseline if baseline is not None and baseline.answered >= bounds.min_steps else None
    fallback = (canary.fallback_rate or 0.0) - ((base.fallback_rate or 0.0) if base else 0.0)
    if fallback > bounds.max_fallback_rate_increase:
        out.append(
            f"fallback rate {canary.fallback_rate:.3f}: +{fallback:.3f} on the champion's "
            f"(max_fallback_rate_increase {bounds.max_fallback_rate_increase:g})"
        )
    if canary.answered < bounds.min_steps:
        return out  # assigned but mostly answered elsewhere: the fallback bound speaks for it
    stops = (canary.safe_stop_rate or 0.0) - ((base.safe_stop_rate or 0.0) if base else 0.0)
    if stops > bounds.max_safe_stop_rate_increase:
        out.append(
            f"safe-stop rate {canary.safe_stop_rate:.3f}: +{stops:.3f} on the champion's "
            f"(max_safe_stop_rate_increase {bounds.max_safe_stop_rate_increase:g})"
        )
    if base is None:
        return out  # the rest are relative to a champion that answered in some window
    drop = base.mean_confidence - canary.mean_confidence
    if drop > bounds.max_confidence_drop:
        out.append(
            f"mean confidence {canary.mean_confidence:.3f}: {drop:.3f} under the champion's "
            f"(max_confidence_drop {bounds.max_confidence_drop:g})"
        )
    jerk = (canary.mean_jerk + bounds.jerk_floor) / (base.mean_jerk + bounds.jerk_floor)
    if jerk > bounds.max_jerk_ratio:
        out.append(
            f"action jerk {canary.mean_jerk:.3f}: {jerk:.2f}x the champion's {base.mean_jerk:.3f} "
            f"(max_jerk_ratio {bounds.max_jerk_ratio:g})"
        )
    latency = (canary.mean_latency_ms + bounds.latency_floor_ms) / (base.mean_latency_ms + bounds.latency_floor_ms)
    if latency > bounds.max_latency_ratio:
        out.append(
            f"latency {canary.mean_latency_ms:.1f} ms: {latency:.2f}x the champion's "
            f"(max_latency_ratio {bounds.max_latency_ratio:g})"
        )
    return out


def judge(
    canary: VersionKpis, baseline: VersionKpis | None, bounds: RolloutBounds, held_s: float, plan: RolloutPlan
) -> Verdict:
    """Rollback on any breach; widen once held `hold_s` with `min_steps` canary answers and (with
    `require_divergence`) `min_divergence_samples` mirrored steps, so no step widens on a bound it could not
    judge; else hold (and rollback when a step finds too little traffic within `max_hold_s`).
    """
    kpis = canary.rates()
    breaches = _breaches(canary, baseline, bounds)
    if breaches:
        return Verdict(ROLLBACK, breaches, kpis)
    missing = []
    if canary.answered < bounds.min_steps:
        missing.append(f"{canary.answered}/{bounds.min_steps} canary steps")
    if bounds.require_divergence and canary.divergence_n < bounds.min_divergence_samples:
        missing.append(f"{canary.divergence_n}/{bounds.min_divergence_samples} mirrored steps")
    if held_s >= plan.hold_s and not missing:
        return Verdict(WIDEN, [], kpis)
    if held_s >= plan.hold_limit_s and missing:
        why = f"not enough traffic to judge: {', '.join(missing)} in {held_s:.0f} s"
        return Verdict(ROLLBACK, [why], kpis)
    return Verdict(HOLD, missing or [f"held {held_s:.0f}/{plan.hold_s:g} s"], kpis)


class RegistryMoves:
    """What the controller changes, in the registry (a fake in tests)."""

    def champion(self, model: str) -> str | None:
        return get_version_by_alias(model, CHAMPION)

    def start(self, model: str, version: str, share: float, reason: str) -> None:
        start_canary(model, version, share, reason)

    def share(self, model: str, share: float) -> None:
        set_canary_share(model, share)

    def rollback(self, model: str, reason: str) -> None:
        rollback_canary(model, reason)

    def promote(self, model: str, version: str, reason: str) -> None:
        promote_canary(model, version, reason)

    def record(self, model: str, version: str, metrics: dict[str, float], tags: dict[str, str], step: int) -> None:
        if metrics:
            log_version_metrics(model, version, metrics, step=step)
        if tags:
            set_version_tags(model, version, tags)


class HttpKpis:
    """Reads `GET /v1/rollout` from an ingress with an operator token: {version: VersionKpis}."""

    def __init__(self, url: str, token: str, timeout_s: float = 10.0):
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)
        self._headers = {"Authorization": f"Bearer {token}"}

    def __call__(self) -> dict[str, VersionKpis]:
        response = self._client.get("/v1/rollout", headers=self._headers)
        if response.status_code != 200:
            raise ModelError(f"GET /v1/rollout answered {response.status_code}: {response.text[:300]}")
        return {version: VersionKpis.from_dict(counts) for version, counts in response.json()["kpis"].items()}

    def close(self) -> None:
        self._client.close()


@dataclass
class RolloutReport:
    """How a rollout ended and every decision on the way (JSON-ready)."""

    model: str
    version: str
    champion: str | None
    outcome: str = "running"  # promoted | widened (no promotion asked) | rolled_back
    reason: str = ""
    decisions: list[dict] = field(default_factory=list)  # one per poll: time, share, action, reasons, kpis
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def to_dict(self) -> dict:
        return dict(vars(self))


class RolloutController:
    """Runs one `RolloutPlan` against live KPIs (`read_kpis`) and the registry (`moves`)."""

    def __init__(
        self,
        plan: RolloutPlan,
        read_kpis: Callable[[], dict[str, VersionKpis]],
        moves: RegistryMoves | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_decision: Callable[[dict], None] | None = None,
    ):
        self.plan, self._read, self._moves = plan, read_kpis, moves or RegistryMoves()
        self._clock, self._sleep, self._on_decision = clock, sleep, on_decision
        self._polls = 0

    def run(self) -> RolloutReport:
        plan, moves = self.plan, self._moves
        champion = moves.champion(plan.model)
        if champion == plan.version:
            raise ModelError(f"models:/{plan.model}/{plan.version} is already @{CHAMPION}: nothing to roll out")
        report = RolloutReport(plan.model, plan.version, champion)
        steps = ",".join(f"{s:g}" for s in plan.steps)
        moves.start(plan.model, plan.version, plan.steps[0], f"rollout start: steps {steps}%, hold {plan.hold_s:g} s")
        moves.record(
            plan.model,
            plan.version,
            {},
            {"rollout.champion": str(champion), "rollout.steps": steps, "rollout.outcome": "running"},
            0,
        )
        baseline: VersionKpis | None = None
        for index, share in enumerate(plan.steps):
            if index > 0:
                moves.share(plan.model, share)
            verdict, baseline = self._hold_step(report, index, share, champion, baseline)
            moves.record(
                plan.model,
                plan.version,
                {},
                {f"rollout.step.{index}": f"{share:g}%: {verdict.action}: {verdict.reason}"[:4000]},
                self._polls,
            )
            if verdict.action == ROLLBACK:
                reason = f"at {share:g}%: {verdict.reason}"
                moves.rollback(plan.model, reason)
                return self._end(report, "rolled_back", reason)
        reason = f"held {steps}% within every bound"
        if plan.promote:
            moves.promote(plan.model, plan.version, reason)
            return self._end(report, "promoted", reason)
        return self._end(report, "widened", reason)

    def _hold_step(
        self, report: RolloutReport, index: int, share: float, champion: str | None, baseline: VersionKpis | None
    ) -> tuple[Verdict, VersionKpis | None]:
        """Polls until the step's verdict is rollback or widen; returns it and the champion baseline."""
        plan = self.plan
        started, before = self._clock(), self._read()
        while True:
            self._sleep(plan.poll_s)
            now = self._read()
            window = now.get(plan.version, VersionKpis()).minus(before.get(plan.version, VersionKpis()))
            if champion is not None:
                champ = now.get(champion, VersionKpis()).minus(before.get(champion, VersionKpis()))
                if champ.answered >= plan.bounds.min_steps:
                    baseline = champ  # the champion's live numbers over this window (at 100%: the last that had them)
            held = self._clock() - started
            verdict = judge(window, baseline, plan.bounds, held, plan)
            self._note(report, index, share, held, verdict)
            if verdict.action != HOLD:
                return verdict, baseline

    def _note(self, report: RolloutReport, index: int, share: float, held: float, verdict: Verdict) -> None:
        self._polls += 1
        entry = {
            "time": time.time(),
            "step": index,
            "share": share,
            "held_s": round(held, 2),
            "action": verdict.action,
            "reasons": verdict.reasons,
            "kpis": verdict.kpis,
        }
        report.decisions.append(entry)
        logger.info("rollout %s at %g%%: %s (%s)", self.plan.version, share, verdict.action, verdict.reason)
        metrics = {f"rollout.{k}": float(v) for k, v in verdict.kpis.items() if v is not None}
        metrics["rollout.share"] = share
        try:
            self._moves.record(self.plan.model, self.plan.version, metrics, {}, self._polls)
        except Exception as exc:  # a record that fails never stops a rollback
            logger.warning("rollout: could not record KPIs on the version: %s", exc)
        if self._on_decision is not None:
            self._on_decision(entry)

    def _end(self, report: RolloutReport, outcome: str, reason: str) -> RolloutReport:
        report.outcome, report.reason, report.ended = outcome, reason, time.time()
        self._moves.record(
            self.plan.model,
            self.plan.version,
            {},
            {"rollout.outcome": outcome, "rollout.reason": reason[:4000]},
            self._polls,
        )
        logger.info("rollout %s: %s (%s)", self.plan.version, outcome, reason)
        return report


def parse_steps(text: str) -> list[float]:
    """`10,50,100` -> [10.0, 50.0, 100.0] (ConfigError naming the bad value)."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--steps {text!r}: expected comma-separated percents, e.g. 10,50,100") from None


def write_report(report: RolloutReport, path: str | Path) -> None:
    """The report as JSON at `path` (folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
