"""Issue 18's closed-loop safe stop: the serving safety ladder (serve/safety.py) applied to each executed
step of a closed-loop episode (slow scales, stop waits, handover ends the episode), next to the plain
run on the same seeds; its summary, JSON, metrics, CLI checks and the ablation table's columns."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.errors import ConfigError
from mobile_vla.evaluate.closed_loop import ClosedLoopReport, PolicySummary, safety_ladder_comparison
from mobile_vla.evaluate.commands import _print_summary
from mobile_vla.evaluate.rollout import (
    HANDOVER,
    SUCCESS,
    TIMEOUT,
    BackendPolicy,
    RolloutConfig,
    SafetyLadderPolicy,
    run_lockstep,
)
from mobile_vla.policy.config import PREVIOUS_COMMAND
from mobile_vla.policy.novelty import SafetyThresholds
from mobile_vla.runtime.backends import load_backend
from mobile_vla.serve.settings import SafetyConfig

ROOT = Path(__file__).resolve().parents[2]
AHEAD = (0.5, 0.0, 0.1)  # m/s, m/s, rad/s: what the stub model always commands
PASSABLE = 0.3  # m/s: the stub world refuses (a collision) any faster translation
GOAL_X = 0.4  # m: the stub world's target (8 slowed steps away)
CALIBRATED = SafetyThresholds(confidence_slow=0.5, confidence_stop=0.2)


class StubModel:
    """A model with a fixed command and a fixed confidence, shaped like BackendPolicy for the ladder."""

    needs_frames = True
    state_input = PREVIOUS_COMMAND
    state_dim = 3
    control_hz = 5.0
    chunk = 8
    safety_note = "stub"

    def __init__(self, confidence: float, thresholds: SafetyThresholds | None = CALIBRATED) -> None:
        self.confidence, self.safety_thresholds = confidence, thresholds
        self.safety_inputs = None

    def start(self, episodes) -> None:
        pass

    def reset_memory(self, slots) -> None:
        pass

    def act(self, slots, images, state, instructions, worlds):
        confidence = np.full(len(slots), self.confidence, np.float32)  # [B]
        self.safety_inputs = (confidence, None)
        return np.tile(np.array(AHEAD, np.float32), (len(slots), 1)), confidence  # [B, 3], [B]


class NarrowWorld:
    """One episode's stub world: a passage only a slow robot gets through (faster moves are refused)."""

    def __init__(self) -> None:
        self.agent = SimpleNamespace(pos=np.zeros(3))
        self.target, self.distractors, self.commands = "target", [], []

    def execute_action(self, action, control_hz) -> bool:
        self.commands.append(np.array(action, np.float32))
        if abs(float(action[0])) > PASSABLE:
            return False
        self.agent.pos[0] += float(action[0]) / control_hz
        return True

    def near(self, thing) -> bool:
        return thing == "target" and self.agent.pos[0] >= GOAL_X - 1e-6


class StubWorlds:
    """SceneSlots' interface over NarrowWorlds (no GL)."""

    def __init__(self, episodes: int) -> None:
        self.envs = [NarrowWorld() for _ in range(episodes)]
        self.active = 0

    def load(self, slot, scene):
        return np.zeros((8, 8, 3), np.uint8)

    def activate(self, slot):
        self.active = slot
        return self.envs[slot]

    def frame(self):
        return np.zeros((8, 8, 3), np.uint8)


def scenes(episodes: int, max_steps: int) -> list:
    return [
        SimpleNamespace(seed=i, split="val", instruction="go", max_steps=max_steps, agent=SimpleNamespace(x=0.0, z=0.0))
        for i in range(episodes)
    ]


def drive(policy, episodes: int = 2, max_steps: int = 50):
    worlds = StubWorlds(episodes)
    return run_lockstep(worlds, scenes(episodes, max_steps), policy, RolloutConfig()), worlds


def test_slow_scales_the_executed_command_and_the_collisions_fall():
    plain, plain_worlds = drive(StubModel(confidence=0.4))
    laddered, worlds = drive(SafetyLadderPolicy(StubModel(confidence=0.4), SafetyConfig(slow_factor=0.5)))
    for record in plain:  # without the ladder every full-speed move into the passage is refused
        assert (record.outcome, record.steps, record.collisions) == (TIMEOUT, 50, 50)
        assert record.safety_levels is None
    np.testing.assert_array_equal(plain_worlds.envs[0].commands[0], np.array(AHEAD, np.float32))
    for record, env in zip(laddered, worlds.envs, strict=True):  # 0.4 < confidence_slow 0.5: every step slowed
        assert (record.outcome, record.steps, record.collisions) == (SUCCESS, 8, 0)  # 0.25 m/s x 0.2 s x 8 = 0.4 m
        assert record.safety_levels == {"normal": 0, "slow": 8, "stop": 0, "handover": 0}
        np.testing.assert_allclose(np.stack(env.commands), np.tile(np.array(AHEAD) * 0.5, (8, 1)), rtol=1e-6)


def test_stop_waits_and_repeated_stops_hand_over():
    handed, worlds = drive(SafetyLadderPolicy(StubModel(confidence=0.1), SafetyConfig(handover_after_stops=3)))
    for record, env in zip(handed, worlds.envs, strict=True):
        assert (record.outcome, record.steps, record.collisions) == (HANDOVER, 3, 0)
        assert record.safety_levels == {"normal": 0, "slow": 0, "stop": 2, "handover": 1}
        assert not np.stack(env.commands).any()  # zero velocity at every step, the handover's included
        assert record.to_dict()["outcome"] == "handover"

    waited, _ = drive(SafetyLadderPolicy(StubModel(confidence=0.1), SafetyConfig(handover_after_stops=0)), 1, 20)
    assert (waited[0].outcome, waited[0].steps, waited[0].collisions) == (TIMEOUT, 20, 0)  # stopped to the limit
    assert waited[0].safety_levels["stop"] == 20


def test_the_config_overrides_calibration_and_a_ladder_that_cannot_act_is_refused():
    confident = SafetyLadderPolicy(StubModel(confidence=0.9), SafetyConfig(confidence_slow=0.95))
    records, _ = drive(confident, 1, 3)
    assert records[0].safety_levels["slow"] == 3
    off, _ = drive(SafetyLadderPolicy(StubModel(confidence=0.1), SafetyConfig(enabled=False)), 1, 3)
    assert off[0].safety_levels == {"normal": 3, "slow": 0, "stop": 0, "handover": 0} and off[0].collisions == 3
    with pytest.raises(ConfigError, match="--safety-ladder: no confidence or novelty threshold"):
        drive(SafetyLadderPolicy(StubModel(confidence=0.1, thresholds=None), SafetyConfig()), 1, 3)


def test_a_real_backend_feeds_the_ladder_its_executed_step_confidence(tiny_model_dir):
    backend = load_backend(tiny_model_dir, prefer=("torch",), threads=1)
    instructions = ["go to the red box", "go to the blue ball"]
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)  # [B, H, W, 3]
    state = np.zeros((2, 3), np.float32)  # [B, S]
    plain = BackendPolicy(backend)
    plain.start([("a", instructions[0]), ("b", instructions[1])])
    actions, _ = plain.act([0, 1], images, state, instructions, None)  # [B, 3]
    confidence_now, _ = plain.safety_inputs  # [B]
    assert confidence_now.shape == (2,) and ((confidence_now > 0) & (confidence_now < 1)).all()

    slowed = SafetyLadderPolicy(BackendPolicy(backend), SafetyConfig(confidence_slow=1.0, slow_factor=0.25))
    slowed.start([("a", instructions[0]), ("b", instructions[1])])
    scaled, _ = slowed.act([0, 1], images, state, instructions, None)
    np.testing.assert_allclose(scaled, actions * 0.25, rtol=1e-5, atol=1e-7)  # same fresh memory, same step
    assert [levels["slow"] for levels in slowed.levels] == [1, 1]


def ladder_rows() -> list[dict]:
    """Episode rows as rollout_seeds returns them with the ladder: plain run, expert, laddered run."""

    def run(outcome, collisions):
        return {"outcome": outcome, "collisions": collisions, "mean_confidence": 0.5, "steps": 10, "path_length": 1.0}

    rows = []
    for seed, (plain, safe, levels) in enumerate(
        [
            ((SUCCESS, 2), (SUCCESS, 0), {"normal": 6, "slow": 4, "stop": 0, "handover": 0}),
            ((TIMEOUT, 5), (HANDOVER, 0), {"normal": 2, "slow": 0, "stop": 7, "handover": 1}),
            ((TIMEOUT, 3), (SUCCESS, 1), {"normal": 10, "slow": 0, "stop": 0, "handover": 0}),
            ((SUCCESS, 0), (TIMEOUT, 2), {"normal": 5, "slow": 5, "stop": 0, "handover": 0}),
        ]
    ):
        row = {"seed": seed, **run(*plain), "safety_levels": None, "expert": run(SUCCESS, 0)}
        row["safety_ladder"] = {**run(*safe), "safety_levels": levels}
        rows.append(row)
    return rows


def test_handover_is_its_own_outcome_in_the_summary_json_and_metrics(capsys, tmp_path):
    rows = ladder_rows()
    expert = [r["expert"] for r in rows]
    ladder = PolicySummary.from_rows([r["safety_ladder"] for r in rows], expert)
    assert (ladder.successes, ladder.handover_rate, ladder.timeout_rate) == (2, 0.25, 0.25)
    assert ladder.wrong_target_rate == 0 and ladder.collisions_per_episode == pytest.approx(0.75)
    assert ladder.collision_rate == 0.5
    assert ladder.collisions_by_outcome[HANDOVER] == {"collided": 0, "no_collision": 1}
    assert ladder.slowed_share == pytest.approx(9 / 40) and ladder.stopped_share == pytest.approx(8 / 40)
    plain = PolicySummary.from_rows(rows, expert)
    assert HANDOVER not in plain.collisions_by_outcome and plain.handover_rate == 0

    report = ClosedLoopReport(
        split="val",
        model="m",
        model_name=None,
        model_version=None,
        run_id=None,
        seeds=[0, 1, 2, 3],
        policy=plain,
        expert=PolicySummary.from_rows(expert, expert),
        episodes=rows,
        settings={},
        seconds=1.0,
        safety_ladder=ladder,
    )
    document = json.loads(json.dumps(report.to_dict()))
    assert document["safety_ladder"]["handover_rate"] == 0.25
    assert document["policy"]["slowed_share"] is None  # no ladder on the plain run
    comparison = document["safety_ladder_comparison"]
    assert comparison == safety_ladder_comparison(rows)
    assert comparison["episodes"] == 4
    assert comparison["no_ladder"]["collisions_per_episode"] == pytest.approx(2.5)
    assert comparison["ladder"]["collisions_per_episode"] == pytest.approx(0.75)
    assert (comparison["success_gained"], comparison["success_lost"]) == (1, 1)
    assert (comparison["collisions_fewer"], comparison["collisions_more"]) == (3, 1)
    assert comparison["success_difference"] == 0.0
    metrics = report.metrics()
    assert metrics["closed_loop.val.ladder_handover_rate"] == 0.25
    assert metrics["closed_loop.val.ladder_collisions_per_episode"] == pytest.approx(0.75)
    assert (
        "closed_loop.val.ladder_success_rate"
        not in ClosedLoopReport(**{**vars(report), "safety_ladder": None}).metrics()
    )

    _print_summary({"val": {"closed_loop": report}}, tmp_path)  # `mobile-vla evaluate`'s tables
    printed = capsys.readouterr().out
    assert "split val: safety ladder (same seeds)" in printed
    assert "2.500" in printed and "0.750" in printed and "25.0%" in printed


def test_ablation_report_shows_the_ladder_columns_only_when_present(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("ablation_report", None)
    import ablation_report

    rows = ladder_rows()
    policy = {"episodes": 4, "success_rate": 0.5, "collisions_per_episode": 2.5, "collision_rate": 0.75}
    ladder = {**policy, "collisions_per_episode": 0.75, "collision_rate": 0.5, "handover_rate": 0.25}
    ladder.update(slowed_share=0.225, stopped_share=0.2)
    split = {
        "policy": policy,
        "safety_ladder": ladder,
        "safety_ladder_comparison": safety_ladder_comparison(rows),
        "outcomes": [r["outcome"] for r in rows],
        "ladder_outcomes": [r["safety_ladder"]["outcome"] for r in rows],
    }
    table, lines = ablation_report.safety_ladder_table(
        [("plain", {"splits": {"val": {"policy": policy}}}), ("x", {"splits": {"val": split}})]
    )
    assert [entry["row"] for entry in table] == ["x"] and len(lines) == 3
    assert "collisions / episode" in lines[0]
    assert "| x | 4 | 50.0% -> 50.0% | 2.50 -> 0.75 | 75.0% -> 50.0% | 25.0% | 22.5% | 20.0% |" in lines[2]
    assert "3 fewer / 1 more" in lines[2]
    assert ablation_report.safety_ladder_table([("plain", {"splits": {"val": {"policy": policy}}})]) == ([], [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--safety-ladder"], "--safety-ladder is for closed-loop evaluation"),
        (["--model", "expert", "--closed-loop", "--safety-ladder"], "give --model MODEL_URI"),
    ],
)
@pytest.mark.unseeded_home  # the arguments fail before any MLflow store is opened
def test_safety_ladder_argument_errors(argv, message, capsys, platform_home):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow  # two short MiniWorld episodes in a Ray task, driven three times (expert, plain, ladder)
def test_closed_loop_with_the_ladder_on_real_scenes(ray_cluster, tiny_model_dir):
    from mobile_vla.evaluate.closed_loop import evaluate_closed_loop

    with pytest.raises(ConfigError, match="--safety-ladder applies the serving ladder"):
        evaluate_closed_loop("expert", "val", 1, safety_ladder=True)
    stop_always = SafetyConfig(confidence_slow=1.0, confidence_stop=1.0, handover_after_stops=4)
    report = evaluate_closed_loop(
        str(tiny_model_dir),
        "val",
        2,
        episodes_per_task=2,
        record_frames=0,
        max_steps=8,
        progress=False,
        safety_ladder=stop_always,
    )
    assert report.safety_ladder.handover_rate == 1.0 and report.safety_ladder.collisions_per_episode == 0
    assert report.safety_ladder.stopped_share == 1.0
    assert report.settings["safety_ladder"]["handover_after_stops"] == 4
    assert report.settings["safety_limits"]["confidence_stop"] == 1.0
    for row in report.episodes:
        assert row["safety_levels"] is None and row["outcome"] != HANDOVER  # the plain run: no ladder
        safe = row["safety_ladder"]
        assert (safe["outcome"], safe["steps"], safe["collisions"]) == (HANDOVER, 4, 0)
        assert safe["safety_levels"] == {"normal": 0, "slow": 0, "stop": 3, "handover": 1}
        assert "limits" not in safe and len(safe["trajectory"]) == 5
    document = json.loads(json.dumps(report.to_dict()))
    assert document["safety_ladder_comparison"]["ladder"]["handover_rate"] == 1.0
