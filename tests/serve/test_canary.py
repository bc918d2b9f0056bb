"""Canary rollout without Serve: sticky assignment by robot id, per-version KPIs, the controller's
decisions (rollback on a breach, widen when held within bounds, promote at the end) on a fake clock
and fake registry, and the registry side (`tracking.rollout`) on a real MLflow SQLite store with the
audit recording the controller's moves as actor "rollout" with why."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla.serve.canary import (
    CanaryView,
    FleetKpis,
    VersionKpis,
    action_jerk,
    axis_divergence,
    on_canary,
    robot_bucket,
)
from mobile_vla.serve.rollout import HOLD, ROLLBACK, WIDEN, RolloutBounds, RolloutController, RolloutPlan, judge

ROBOTS = [f"robot-{i:04d}" for i in range(4000)]


def test_robot_bucket_is_stable_and_spread():
    buckets = [robot_bucket(r) for r in ROBOTS]
    assert buckets == [robot_bucket(r) for r in ROBOTS]  # the same every call
    assert robot_bucket("r-17") == pytest.approx(robot_bucket("r-17"))
    assert all(0 <= b < 100 for b in buckets)
    assert robot_bucket("robot-0001") != robot_bucket("robot-0002")
    # a pinned value: BLAKE2b, never Python's per-process salted hash() (replicas must agree)
    assert robot_bucket("r-17") == pytest.approx(
        (int.from_bytes(__import__("hashlib").blake2b(b"r-17", digest_size=8).digest(), "big") % 10_000) / 100
    )


def test_divergence_is_the_largest_per_axis_mean_so_a_one_axis_bug_reads_at_full_size():
    champion = np.zeros((10, 3), dtype=np.float32)  # [K, 3]
    steering_bug = champion.copy()
    steering_bug[:, 2] = 0.45  # angular_z shifted on every step: a mean over all axes would read 0.15
    assert axis_divergence(steering_bug, champion) == pytest.approx(0.45)
    everywhere = champion + 0.1
    assert axis_divergence(everywhere, champion) == pytest.approx(0.1)
    assert axis_divergence(champion, champion) == 0.0


def test_on_canary_share_is_sticky_and_widening_only_adds_robots():
    at = {share: {r for r in ROBOTS if on_canary(r, share)} for share in (0, 10, 50, 100)}
    assert at[0] == set() and at[100] == set(ROBOTS)
    assert at[10] <= at[50] <= at[100]
    assert 0.08 < len(at[10]) / len(ROBOTS) < 0.12
    assert 0.46 < len(at[50]) / len(ROBOTS) < 0.54


def test_canary_view_serves_only_a_loaded_other_version_with_a_share():
    robot = next(r for r in ROBOTS if on_canary(r, 10))
    assert CanaryView("2", 10, True, "1").serves(robot)
    assert not CanaryView("2", 10, False, "1").serves(robot)  # not loaded yet
    assert not CanaryView("1", 10, True, "1").serves(robot)  # rolled back: @canary on the champion
    assert not CanaryView("2", 0, True, "1").serves(robot)
    assert not CanaryView(None, 10, True, "1").serves(robot)


def test_action_jerk_is_zero_for_steady_or_ramping_commands_and_grows_with_zigzag():
    steady = np.tile([0.3, 0.0, 0.1], (8, 1))
    ramp = np.outer(np.arange(8), [0.05, 0.0, 0.01])
    zigzag = steady.copy()
    zigzag[::2, 2] = -0.5
    assert action_jerk(steady) == 0.0 and action_jerk(ramp) == pytest.approx(0.0, abs=1e-12)
    assert action_jerk(zigzag) == pytest.approx(1.2) and action_jerk(zigzag, control_hz=5) == pytest.approx(30.0)
    assert action_jerk(steady[:2]) == 0.0


def test_fleet_kpis_count_the_assigned_and_the_answering_version_apart():
    kpis = FleetKpis()
    chunk = np.zeros((4, 3))
    kpis.answered("1", "1", False, 0.9, "normal", chunk, 10.0)
    before = {v: VersionKpis.from_dict(c) for v, c in kpis.snapshot().items()}
    kpis.answered("2", "2", False, 0.4, "stop", chunk, 30.0)
    kpis.answered("2", "1", True, 0.8, "normal", chunk, 12.0)  # the canary failed: the champion answered
    kpis.answered("2", "2", False, 0.5, "slow", chunk, 20.0)
    kpis.diverged("2", 0.3)
    snap = {v: VersionKpis.from_dict(c) for v, c in kpis.snapshot().items()}
    canary = snap["2"].minus(before.get("2", VersionKpis()))
    assert (canary.assigned, canary.answered, canary.fallbacks) == (3, 2, 1)
    assert canary.fallback_rate == pytest.approx(1 / 3) and canary.safe_stop_rate == 0.5
    assert canary.slow_rate == 0.5 and canary.mean_confidence == pytest.approx(0.45)
    assert canary.divergence == pytest.approx(0.3) and canary.mean_latency_ms == pytest.approx(25.0)
    champion = snap["1"].minus(before["1"])
    assert (champion.assigned, champion.answered) == (0, 1)  # answered for a canary robot, not assigned
    assert kpis.snapshot()["2"]["confidence_hist"][4] == 1  # 0.4 falls in [0.4, 0.5)


def window(
    steps=100, fallbacks=0, confidence=0.8, stops=0, jerk=0.1, latency=10.0, divergence=0.02, samples=10
) -> VersionKpis:
    return VersionKpis(
        assigned=steps,
        answered=steps - fallbacks,
        fallbacks=fallbacks,
        confidence_sum=confidence * (steps - fallbacks),
        stop=stops,
        jerk_sum=jerk * (steps - fallbacks),
        latency_ms_sum=latency * (steps - fallbacks),
        divergence_sum=(divergence or 0.0) * samples,
        divergence_n=samples,
    )


PLAN = RolloutPlan(version="2", steps=[10, 50, 100], hold_s=20, poll_s=2)
BOUNDS = RolloutBounds()


@pytest.mark.parametrize(
    ("canary", "needle"),
    [
        (window(divergence=0.4, samples=20), "divergence 0.400 > max_divergence"),
        (window(fallbacks=20), "fallback rate"),
        (window(stops=30), "safe-stop rate"),
        (window(confidence=0.5), "mean confidence"),
        (window(jerk=0.6), "action jerk"),
        (window(latency=80.0), "latency"),
    ],
)
def test_judge_rolls_back_on_each_breached_bound(canary, needle):
    verdict = judge(canary, window(), BOUNDS, held_s=4, plan=PLAN)
    assert verdict.action == ROLLBACK and needle in verdict.reason
    assert len(verdict.reasons) == 1


def test_judge_holds_until_enough_steps_and_time_then_widens():
    assert judge(window(steps=10), window(), BOUNDS, held_s=30, plan=PLAN).action == HOLD  # too few steps
    assert judge(window(), window(), BOUNDS, held_s=4, plan=PLAN).action == HOLD  # too short
    assert judge(window(), window(), BOUNDS, held_s=20, plan=PLAN).action == WIDEN
    # a few bad steps are no verdict yet, but divergence on enough mirrored steps is
    assert judge(window(steps=10, stops=10), window(), BOUNDS, 4, PLAN).action == HOLD
    early = judge(window(steps=5, divergence=0.5, samples=10), window(), BOUNDS, 4, PLAN)
    assert early.action == ROLLBACK
    starved = judge(window(steps=3), window(), BOUNDS, held_s=60, plan=PLAN)
    assert starved.action == ROLLBACK and "not enough traffic" in starved.reason


def test_judge_never_widens_on_a_divergence_it_could_not_judge():
    unmirrored = window(divergence=None, samples=3)  # enough steps, too few mirrored
    waiting = judge(unmirrored, window(), BOUNDS, held_s=30, plan=PLAN)
    assert waiting.action == HOLD and "3/10 mirrored steps" in waiting.reason
    no_mirror = BOUNDS.model_copy(update={"require_divergence": False})  # an app with mirror_rate 0
    assert judge(unmirrored, window(), no_mirror, held_s=30, plan=PLAN).action == WIDEN
    starved = judge(unmirrored, window(), BOUNDS, held_s=60, plan=PLAN)
    assert starved.action == ROLLBACK and "mirrored steps" in starved.reason


def test_judge_without_a_champion_baseline_uses_absolute_bounds_only():
    assert judge(window(confidence=0.2, jerk=5.0), None, BOUNDS, 20, PLAN).action == WIDEN
    assert judge(window(stops=20), None, BOUNDS, 20, PLAN).action == ROLLBACK


class FakeMoves:
    def __init__(self):
        self.calls, self.records = [], []

    def champion(self, model):
        return "1"

    def start(self, model, version, share, reason):
        self.calls.append(("start", version, share))

    def share(self, model, share):
        self.calls.append(("share", share))

    def rollback(self, model, reason):
        self.calls.append(("rollback", reason))

    def promote(self, model, version, reason):
        self.calls.append(("promote", version))

    def record(self, model, version, metrics, tags, step):
        self.records.append((metrics, tags))


class FakeFleet:
    """Cumulative KPIs that grow every poll: the champion's steady, the canary's from `canary_window`."""

    def __init__(self, canary_window):
        self.now, self.polls = 0.0, 0
        self.totals = {"1": VersionKpis(), "2": VersionKpis()}
        self.canary_window = canary_window

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.polls += 1
        for version, step in (("1", window(steps=50)), ("2", self.canary_window)):
            total = self.totals[version]
            self.totals[version] = VersionKpis.from_dict(
                {
                    k: getattr(total, k) + getattr(step, k)
                    for k in (
                        "assigned",
                        "answered",
                        "fallbacks",
                        "confidence_sum",
                        "stop",
                        "jerk_sum",
                        "latency_ms_sum",
                        "divergence_sum",
                        "divergence_n",
                    )
                }
            )

    def read(self):
        return dict(self.totals)


def test_controller_rolls_a_bad_release_back_at_the_first_step_and_records_why():
    fleet, moves = FakeFleet(window(steps=20, divergence=0.45, samples=10)), FakeMoves()
    report = RolloutController(PLAN, fleet.read, moves, clock=fleet.clock, sleep=fleet.sleep).run()
    assert report.outcome == "rolled_back" and "at 10%" in report.reason and "divergence" in report.reason
    assert moves.calls[0] == ("start", "2", 10) and moves.calls[-1][0] == "rollback"
    assert not any(call[0] in ("share", "promote") for call in moves.calls)
    assert fleet.now <= 2 * PLAN.poll_s  # judged on the first window with enough mirrored steps
    tags = {k: v for _, t in moves.records for k, v in t.items()}
    assert tags["rollout.outcome"] == "rolled_back" and "divergence" in tags["rollout.reason"]
    assert any("rollout.divergence" in m for m, _ in moves.records)


def test_controller_widens_a_good_release_to_100_and_promotes_it():
    fleet, moves = FakeFleet(window(steps=20, divergence=0.02, samples=10)), FakeMoves()
    report = RolloutController(PLAN, fleet.read, moves, clock=fleet.clock, sleep=fleet.sleep).run()
    assert report.outcome == "promoted"
    assert moves.calls == [("start", "2", 10), ("share", 50), ("share", 100), ("promote", "2")]
    assert [d["action"] for d in report.decisions].count(WIDEN) == 3
    assert fleet.now == pytest.approx(3 * PLAN.hold_s)


def test_rollout_plan_refuses_falling_or_out_of_range_steps():
    from pydantic import ValidationError

    for steps in ([50, 10], [0, 50], [10, 150], []):
        with pytest.raises(ValidationError, match="steps"):
            RolloutPlan(version="2", steps=steps)


def test_registry_moves_are_audited_as_rollout_with_why(platform_home, tmp_path):
    from mobile_vla.errors import ModelError
    from mobile_vla.tracking.audit import alias_history, set_alias
    from mobile_vla.tracking.rollout import canary_state, promote_canary, rollback_canary, start_canary
    from tests.tracking.test_lifecycle import MODEL, register_version

    v1, v2 = register_version(tmp_path, "a", None), register_version(tmp_path, "b", None)
    set_alias(MODEL, "champion", v1, actor="test")
    with pytest.raises(ModelError, match="already @champion"):
        start_canary(MODEL, v1, 10, "nothing to do")
    start_canary(MODEL, v2, 10, "rollout start: steps 10,100")
    assert canary_state(MODEL) == (v2, 10.0)
    assert rollback_canary(MODEL, "divergence 0.4 > 0.15") == v1
    assert canary_state(MODEL) == (v1, 0.0)
    back, started = alias_history(MODEL, "canary")
    assert (started.to_version, started.actor, started.reason) == (v2, "rollout", "rollout start: steps 10,100")
    assert (back.from_version, back.to_version, back.actor) == (v2, v1, "rollout")
    assert back.reason == "rollback: divergence 0.4 > 0.15"

    assert promote_canary(MODEL, v2, "held 10,100%") == v1
    champion = alias_history(MODEL, "champion")[0]
    assert (champion.to_version, champion.actor, champion.reason) == (v2, "rollout", "canary promoted: held 10,100%")
    assert alias_history(MODEL, "previous-champion")[0].to_version == v1
    assert canary_state(MODEL) == (v1, 0.0)  # @canary stays where the rollback left it; the share is 0


def test_rollout_cli_refuses_a_bad_plan_with_one_line_naming_it(capsys, tmp_path, monkeypatch):
    from mobile_vla.cli import main

    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path))  # no tokens file: a good plan would stop on the token
    assert main(["rollout", "start", "--version", "2", "--steps", "50,10"]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["rollout", "start", "--version", "2", "--set", "max_divergence=-1"]) == 2
    assert "max_divergence" in capsys.readouterr().err
    assert main(["rollout", "start", "--version", "2"]) == 2
    assert "--token-file" in capsys.readouterr().err
