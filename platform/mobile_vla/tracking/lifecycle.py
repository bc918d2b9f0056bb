"""The promotion gate: decide whether a challenger version replaces `@champion`, move the alias, and
record the decision on the version.

    decision = promote("mobile-vla-policy", from_alias="challenger", gate=GateConfig(min_episodes=200))

Metrics come from the versions' `metric.<key>` tags (written by `mobile_vla.tracking.log_version_metrics`
during training and evaluation). A metric the gate needs but a version lacks is a refusal naming it,
never a silent pass. Serving follows `@champion`, so this and a person moving the alias in the MLflow UI
have the same effect; the gate is the guard-rail for the automatic path.

The default rule, and why. Closed-loop success is what matters on robots, and both the challenger's
and the champion's rates are estimates from a finite set of episodes (200 seeds swing by about +-5
points). A wrong promotion puts a worse policy on every robot, while a missed one only delays a gain to
the next update, so by default (`success_rule = "superior"`) the challenger must be better beyond its
own sampling noise: the lower end of its Wilson 95% interval must reach the champion's point estimate
plus `min_success_delta`. Offline MAE may regress at most `max_offline_mae_regression` (relative), as a
cheap tripwire for broken label scaling that closed-loop success on a few scenes can hide.
`"non_inferior"` (upper end must reach the champion; point delta >= min_success_delta) is for fleets
that want faster, noisier updates; `"point"` compares point estimates only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from mobile_vla.config import StrictModel, load_config
from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.sim.success import wilson_interval
from mobile_vla.tracking.audit import set_alias
from mobile_vla.tracking.model_card import refresh_model_card
from mobile_vla.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    get_version_by_alias,
    get_version_metrics,
    get_version_tags,
    set_version_tags,
)

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS_CHAMPION"]  # the alias names, also importable from here


class GateConfig(StrictModel):
    """What a challenger must show before it drives the fleet. Metric names are the version tags'
    `metric.<key>` suffixes written by evaluation.
    """

    success_metric: str = "closed_loop.success_rate"
    episodes_metric: str = "closed_loop.episodes"
    offline_mae_metric: str = "offline.mae"
    collision_metric: str = "closed_loop.collision_rate"

    require_closed_loop: bool = True  # false: gate on offline metrics only (never the default: see module doc)
    min_episodes: int = Field(200, ge=1)  # closed-loop episodes each model must have been evaluated on
    success_rule: Literal["superior", "non_inferior", "point"] = "superior"
    min_success_delta: float = Field(0.0, ge=-1.0, le=1.0)
    min_success_rate: float = Field(0.0, ge=0.0, le=1.0)  # absolute floor, also for the very first champion
    max_offline_mae_regression: float | None = Field(0.05, ge=0.0)  # relative; null skips the offline check
    max_collision_rate_increase: float | None = Field(None, ge=0.0)  # absolute; null skips
    # Lower-is-better metrics the challenger must improve by at least this fraction, e.g. the online
    # update's {"online.corrected_mae": 0.05}: better where operators corrected the champion.
    require_improvement: dict[str, float] = Field(default_factory=dict)

    @field_validator("require_improvement")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not -1.0 < v < 1.0}
        if bad:
            raise ValueError(f"improvement fractions must be in (-1, 1), got {bad}")
        return value


def load_gate(path: str | Path | None = None, overrides: list[str] | None = None) -> GateConfig:
    return load_config(path, GateConfig, overrides)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GateResult:
    passed: bool
    checks: list[Check]
    missing: list[str] = field(default_factory=list)  # "version V: metric.key" the gate needed

    @property
    def reason(self) -> str:
        if self.missing:
            return "missing metrics: " + ", ".join(self.missing)
        failed = [c for c in self.checks if not c.passed]
        shown = failed if failed else self.checks
        prefix = "failed: " if failed else "passed: "
        return prefix + "; ".join(f"{c.name} ({c.detail})" for c in shown)


@dataclass
class PromotionDecision:
    name: str
    version: str
    decision: Literal["promoted", "rejected", "forced"]
    reason: str
    compared_to: str | None  # champion version at decision time, None for the first champion
    time: str
    checks: list[Check]

    @property
    def promoted(self) -> bool:
        return self.decision in ("promoted", "forced")

    def tags(self) -> dict[str, str]:
        return {
            "promotion.decision": self.decision,
            "promotion.reason": self.reason[:4900],  # MLflow caps tag values at 5000 characters
            "promotion.compared_to": self.compared_to or "none",
            "promotion.time": self.time,
            "promotion.checks": json.dumps([asdict(c) for c in self.checks])[:4900],
        }


def _need(metrics: dict[str, float], key: str, version: str, missing: list[str]) -> float | None:
    if key not in metrics:
        missing.append(f"version {version}: metric.{key}")
        return None
    return metrics[key]


def _success_check(gate: GateConfig, c_rate: float, c_n: float, p_rate: float) -> Check:
    """The challenger's closed-loop success against the champion's, by `gate.success_rule`."""
    low, high = wilson_interval(c_rate * c_n, c_n)
    target = p_rate + gate.min_success_delta
    if gate.success_rule == "superior":
        ok = low >= target
        detail = f"challenger Wilson low {low:.3f} >= champion {p_rate:.3f} + {gate.min_success_delta:.3f}"
    elif gate.success_rule == "non_inferior":
        ok = high >= p_rate and c_rate >= target
        detail = (
            f"challenger {c_rate:.3f} [{low:.3f}, {high:.3f}] vs champion {p_rate:.3f}, "
            f"min delta {gate.min_success_delta:.3f}"
        )
    else:
        ok = c_rate >= target
        detail = f"challenger {c_rate:.3f} >= champion {p_rate:.3f} + {gate.min_success_delta:.3f}"
    return Check(f"success_{gate.success_rule}", ok, detail)


def _closed_loop_checks(
    gate: GateConfig,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    cv: str,
    pv: str,
    missing: list[str],
) -> list[Check]:
    """Episodes, success floor, success against the champion and collisions (metrics lacking go to `missing`)."""
    checks: list[Check] = []
    c_rate = _need(challenger, gate.success_metric, cv, missing)
    c_n = _need(challenger, gate.episodes_metric, cv, missing)
    p_rate = p_n = None
    if champion is not None:
        p_rate = _need(champion, gate.success_metric, pv, missing)
        p_n = _need(champion, gate.episodes_metric, pv, missing)
    if c_rate is not None and c_n is not None:
        checks.append(Check("episodes", c_n >= gate.min_episodes, f"challenger {c_n:.0f} >= {gate.min_episodes}"))
        checks.append(
            Check("success_floor", c_rate >= gate.min_success_rate, f"{c_rate:.3f} >= {gate.min_success_rate:.3f}")
        )
        if p_rate is not None and p_n is not None:
            checks.append(
                Check("champion_episodes", p_n >= gate.min_episodes, f"champion {p_n:.0f} >= {gate.min_episodes}")
            )
            checks.append(_success_check(gate, c_rate, c_n, p_rate))

    if gate.max_collision_rate_increase is not None and champion is not None:
        c_col = _need(challenger, gate.collision_metric, cv, missing)
        p_col = _need(champion, gate.collision_metric, pv, missing)
        if c_col is not None and p_col is not None:
            limit = p_col + gate.max_collision_rate_increase
            checks.append(Check("collisions", c_col <= limit, f"{c_col:.3f} <= {limit:.3f}"))

    return checks


def evaluate_gate(
    gate: GateConfig,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    challenger_version: str = CHALLENGER,
    champion_version: str = CHAMPION,
) -> GateResult:
    """Pure function of the two versions' metrics: every check, and what was missing."""
    missing: list[str] = []
    cv, pv = challenger_version, champion_version
    checks = _closed_loop_checks(gate, challenger, champion, cv, pv, missing) if gate.require_closed_loop else []

    if gate.max_offline_mae_regression is not None and champion is not None:
        c_mae = _need(challenger, gate.offline_mae_metric, cv, missing)
        p_mae = _need(champion, gate.offline_mae_metric, pv, missing)
        if c_mae is not None and p_mae is not None:
            limit = p_mae * (1.0 + gate.max_offline_mae_regression)
            checks.append(Check("offline_mae", c_mae <= limit, f"{c_mae:.4f} <= {limit:.4f}"))
    for key, fraction in gate.require_improvement.items():
        if champion is None:
            continue
        c_val = _need(challenger, key, cv, missing)
        p_val = _need(champion, key, pv, missing)
        if c_val is not None and p_val is not None:
            limit = p_val * (1.0 - fraction)
            checks.append(Check(f"improves:{key}", c_val <= limit, f"{c_val:.4f} <= {limit:.4f}"))
    if not gate.require_closed_loop and champion is None and not checks:
        checks.append(Check("first_champion", True, "no champion yet and no closed-loop requirement"))

    if not checks and not missing:
        raise ConfigError("gate: every check is disabled (require_closed_loop = false and no offline check)")
    passed = not missing and all(c.passed for c in checks)
    return GateResult(passed=passed, checks=checks, missing=missing)


def resolve_candidate(name: str, version: str | None, from_alias: str | None) -> str:
    if version and from_alias:
        raise ConfigError("promote: give --version or --from-alias, not both")
    if version:
        _require_version(name, str(version))
        return str(version)
    alias = from_alias or CHALLENGER
    found = get_version_by_alias(name, alias)
    if found is None:
        raise ModelError(f"models:/{name}@{alias}: registered model '{name}' has no alias '{alias}'")
    return found


def _require_version(name: str, version: str) -> None:
    try:
        get_version_tags(name, version)
    except Exception as exc:
        raise ModelError(f"models:/{name}/{version}: no such registered model version ({exc})") from None


def promote(
    name: str,
    version: str | None = None,
    from_alias: str | None = None,
    gate: GateConfig | None = None,
    force: bool = False,
    actor: str = "promote",
    note: str = "",
) -> PromotionDecision:
    """Runs the gate for one version against the current champion; moves `@champion` if it passes
    (or if forced) and tags the version with the decision either way. The alias moves are recorded
    in the audit (`mobile_vla.tracking.audit`) with `actor` (e.g. "cli promote", "online-update") and,
    as the reason, the operator's `note` followed by the gate's decision.
    """
    gate = gate or GateConfig()
    candidate = resolve_candidate(name, version, from_alias)
    champion = get_version_by_alias(name, CHAMPION)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if champion == candidate:
        decision = PromotionDecision(
            name, candidate, "rejected", f"version {candidate} is already champion", champion, now, []
        )
        set_version_tags(name, candidate, decision.tags())
        return decision

    result = evaluate_gate(
        gate,
        get_version_metrics(name, candidate),
        get_version_metrics(name, champion) if champion else None,
        challenger_version=candidate,
        champion_version=champion or "-",
    )
    if result.passed:
        verdict = "promoted"
    elif force:
        verdict = "forced"
    else:
        verdict = "rejected"
    reason = result.reason if verdict != "forced" else f"forced by operator; gate {result.reason}"
    decision = PromotionDecision(name, candidate, verdict, reason, champion, now, result.checks)

    if decision.promoted:
        # Compare-and-set: refuse if someone moved the alias while the gate ran.
        if get_version_by_alias(name, CHAMPION) != champion:
            raise ModelError(f"models:/{name}@{CHAMPION} moved while the gate ran; run promote again")
        why = f"{decision.decision}: {decision.reason}"
        set_alias(name, CHAMPION, candidate, actor=actor, reason=f"operator: {note}; gate {why}" if note else why)
        if champion:
            kept = f"kept for rollback: @{CHAMPION} moved {champion} -> {candidate}"
            set_alias(name, PREVIOUS_CHAMPION, champion, actor=actor, reason=kept)
            set_version_tags(name, champion, {"promotion.superseded_by": candidate, "promotion.superseded_time": now})
            refresh_model_card(name, champion, champion_alias=CHAMPION)
    set_version_tags(name, candidate, decision.tags())
    refresh_model_card(name, candidate, champion_alias=CHAMPION)  # the card shows the gate's decision
    return decision
