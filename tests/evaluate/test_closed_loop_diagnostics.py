"""Issue 15's closed-loop diagnostics: the LSTM memory reset every N steps, the state a stuck robot is
fed (the command it keeps sending, or the velocity it realised: none), and the in-distribution (val)
split next to the held-out ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.errors import ConfigError
from mobile_vla.evaluate.closed_loop import (
    ClosedLoopReport,
    PolicySummary,
    memory_reset_steps,
    split_comparison,
)
from mobile_vla.evaluate.rollout import BackendPolicy, BetaMixPolicy, RolloutConfig
from mobile_vla.policy import build_policy, build_tokenizer, presets, save_policy
from mobile_vla.policy.config import MEASURED_VELOCITY, PREVIOUS_COMMAND
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.runtime.backends import load_backend

PUSH = (0.75, 0.0, 0.05)  # full speed ahead, a slight left turn: into the west wall of the probe room


def drive_into_a_wall(runs: list[tuple[str, int | None]], steps: int) -> list[dict]:
    """In a Ray worker (GL): a policy that always pushes west, fed by run_lockstep; what it was given."""
    from mobile_vla.evaluate.rollout import RolloutConfig, SceneSlots, run_lockstep
    from mobile_vla.sim.navigation_env import NavigationEnv  # GL: in the worker only
    from mobile_vla.sim.scenes import HEIGHTS, Placed, Pose, RoomSpec, SceneSpec

    def thing(kind, x, z, colour=None):
        return Placed(kind=kind, colour=colour, x=x, z=z, dir=0.0, height=HEIGHTS[kind])

    scene = SceneSpec(
        split="val",
        seed=1,
        layout_seed=1,
        room=RoomSpec(width=8, depth=8, wall_tex="brick_wall", floor_tex="asphalt", ceil_tex="ceiling_tiles"),
        agent=Pose(x=4.0, z=4.0, dir=math.pi),  # facing -x: 3.6 m of free floor to the west wall
        target=thing("box", 7.0, 7.0, "red"),
        distractors=[thing("ball", 7.0, 1.0, "blue")],
        obstacles=[thing("barrel", 1.0, 1.0)],
        domain_rand=False,
        instruction="go to the red box",
        template_ids=["go_to"],
        max_steps=steps,
    )

    class Pusher:
        needs_frames = False

        def __init__(self, state_input: str) -> None:
            self.state_input, self.states, self.resets = state_input, [], []

        def start(self, episodes) -> None:
            pass

        def reset_memory(self, slots) -> None:
            self.resets.append((len(self.states), list(slots)))

        def act(self, slots, images, state, instructions, worlds):
            self.states.append(state[0].copy())  # [3]
            return np.array([PUSH], np.float32), np.full(len(slots), np.nan, np.float32)

    worlds = SceneSlots(NavigationEnv(scene))
    out = []
    for state_input, every in runs:
        pusher = Pusher(state_input)
        record = run_lockstep(worlds, [scene], pusher, RolloutConfig(memory_reset_every=every))[0]
        out.append({"states": np.stack(pusher.states), "resets": pusher.resets, "record": record.to_dict()})
    return out


@pytest.mark.slow  # two 40-step MiniWorld episodes in a Ray task: ~13 s on a loaded 2-core box
def test_a_stuck_robot_reads_zero_velocity_only_with_the_measured_state(ray_cluster):
    steps = 40
    task = ray_cluster.remote(num_cpus=1)(drive_into_a_wall)
    measured, previous = ray_cluster.get(
        task.remote([(MEASURED_VELOCITY, 8), (PREVIOUS_COMMAND, None)], steps), timeout=300
    )
    push = np.array(PUSH, np.float32)
    for run in (measured, previous):
        record = run["record"]
        assert record["outcome"] == "timeout" and record["steps"] == steps
        assert 0 < record["collisions"] < steps  # it drove, then pushed into the wall
    refused = steps - measured["record"]["collisions"]  # the first refused step; all later ones are too
    np.testing.assert_array_equal(measured["states"][0], [0, 0, 0])  # an episode starts from rest
    np.testing.assert_array_equal(measured["states"][1 : refused + 1], np.tile(push, (refused, 1)))
    stuck = measured["states"][refused + 1 :]  # [steps - refused - 1, 3]
    assert len(stuck) > 5
    np.testing.assert_array_equal(stuck[:, :2], 0.0)  # no translation: the robot can tell it is stuck
    np.testing.assert_allclose(stuck[:, 2], PUSH[2])  # the turn still happened
    np.testing.assert_array_equal(previous["states"][1:], np.tile(push, (steps - 1, 1)))  # the copycat's view

    assert measured["resets"] == [(8, [0]), (16, [0]), (24, [0]), (32, [0])]  # before steps 8, 16, ...
    assert previous["resets"] == []


def test_backend_memory_reset_restarts_only_the_due_episodes(tiny_model_dir):
    policy = BackendPolicy(load_backend(tiny_model_dir, prefer=("torch",), threads=1))
    assert policy.state_input == PREVIOUS_COMMAND
    instructions = ["go to the red box", "go to the blue ball"]
    policy.start([("a", instructions[0]), ("b", instructions[1])])
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)  # [B, H, W, 3]
    state = np.zeros((2, 3), np.float32)  # [B, S]
    first, _ = policy.act([0, 1], images, state, instructions, None)  # [B, 3] from fresh memory
    policy.act([0, 1], images, state, instructions, None)
    carried = [m.copy() for m in policy.memory]  # (h, c) [layers, B, hidden]
    assert all(np.abs(m).sum() > 0 for m in carried)

    policy.reset_memory([1])
    for before, after in zip(carried, policy.memory, strict=True):
        np.testing.assert_array_equal(after[:, 0], before[:, 0])  # episode 0 keeps its memory
        assert not after[:, 1].any()  # episode 1 starts again from zero
    again, _ = policy.act([0, 1], images, state, instructions, None)
    np.testing.assert_allclose(again[1], first[1], atol=1e-6)  # fresh memory: the first step's answer
    assert not np.allclose(again[0], first[0], atol=1e-6)  # carried memory answers otherwise


def test_a_measured_velocity_model_asks_closed_loop_and_collect_for_that_state(tmp_path):
    config = presets.tiny().replace(state_input=MEASURED_VELOCITY)
    preprocessing = Preprocessing(
        action_low=[-0.2, -0.4, -1.0],
        action_high=[0.75, 0.4, 1.0],
        state_mean=[0.3, 0.0, 0.0],
        state_std=[0.3, 0.2, 0.5],
        window=config.window,
        chunk=config.chunk,
        state_input=MEASURED_VELOCITY,
        tokenizer=build_tokenizer(config),
    )
    save_policy(tmp_path / "policy", build_policy(config).eval(), preprocessing)
    learner = BackendPolicy(load_backend(tmp_path, prefer=("torch",), threads=1))
    assert learner.state_input == MEASURED_VELOCITY  # run_lockstep feeds the realised velocity
    assert BetaMixPolicy(learner, 0.5, [(0, 1)]).state_input == MEASURED_VELOCITY  # so does `collect`


def test_memory_reset_steps(tiny_model_dir):
    saved = json.loads((tiny_model_dir / "policy" / "preprocessing" / "preprocessing.json").read_text())
    assert memory_reset_steps("window", tiny_model_dir) == saved["window"] == 8
    assert memory_reset_steps("12", None) == memory_reset_steps(12, None) == 12
    assert memory_reset_steps(None, tiny_model_dir) is None
    for bad in ("0", "-3", "1.5", "often", True):
        with pytest.raises(ConfigError, match="--memory-reset-every"):
            memory_reset_steps(bad, None)
    with pytest.raises(ConfigError, match="records no training window"):
        memory_reset_steps("window", None)
    with pytest.raises(ConfigError, match="--memory-reset-every 0"):
        RolloutConfig(memory_reset_every=0)


def report(split: str, outcomes: list[str], in_distribution: bool, reset: int | None = None) -> ClosedLoopReport:
    rows = [
        {"outcome": o, "path_length": 2.0, "collisions": int(o == "timeout"), "steps": 10, "mean_confidence": 0.5}
        for o in outcomes
    ]
    expert = [{**row, "outcome": "success"} for row in rows]
    return ClosedLoopReport(
        split=split,
        model="m",
        model_name=None,
        model_version=None,
        run_id=None,
        seeds=list(range(len(rows))),
        policy=PolicySummary.from_rows(rows, expert),
        expert=PolicySummary.from_rows(expert, expert),
        episodes=[],
        settings={"in_distribution": in_distribution, "memory_reset_every": reset},
        seconds=0.0,
    )


def test_split_comparison_pools_each_kind_and_reports_the_gap():
    reports = [
        report("unseen_layout", ["success", "timeout", "timeout", "timeout"], False, 8),
        report("unseen_pair", ["success", "success", "wrong_target", "timeout"], False, 8),
        report("val", ["success", "success", "success", "timeout"], True, 8),
    ]
    comparison = split_comparison(reports)
    assert comparison["in_distribution_success"] == 0.75
    assert comparison["held_out_success"] == 3 / 8
    assert comparison["generalisation_gap"] == pytest.approx(0.75 - 3 / 8)
    assert comparison["splits"]["val"]["in_distribution"] is True
    layout = comparison["splits"]["unseen_layout"]
    assert (layout["in_distribution"], layout["episodes"], layout["success_rate"]) == (False, 4, 0.25)
    assert (layout["timeout_rate"], layout["memory_reset_every"], layout["expert_success_rate"]) == (0.75, 8, 1.0)
    only_held_out = split_comparison(reports[:2])
    assert only_held_out["in_distribution_success"] is None and only_held_out["generalisation_gap"] is None
    json.dumps(only_held_out, allow_nan=False)  # NaN written as null


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--with-val"], "--with-val is for closed-loop evaluation: add --closed-loop"),
        (["--model", "m", "--memory-reset-every", "8"], "--memory-reset-every is for closed-loop evaluation"),
        (["--model", "expert", "--closed-loop", "--memory-reset-every", "8"], "the expert has none"),
        (["--model", "m", "--closed-loop", "--memory-reset-every", "0"], "--memory-reset-every '0': expected"),
        (["--model", "m", "--closed-loop", "--memory-reset-every", "soon"], "--memory-reset-every 'soon'"),
    ],
)
def test_bad_diagnostic_arguments_are_one_line_errors(argv, message, capsys, platform_home):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow  # two splits of closed loop in Ray tasks (policy and expert)
def test_cli_runs_val_next_to_a_held_out_split_with_memory_resets(ray_cluster, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--closed-loop", "--split", "unseen_pair", "--with-val"]
    argv += ["--memory-reset-every", "window", "--episodes", "1", "--max-steps", "10", "--gifs", "0"]
    assert main([*argv, "--out", str(out), "--no-progress", "--no-log"]) == 0
    comparison = json.loads((out / "closed_loop_splits.json").read_text())
    assert list(comparison["splits"]) == ["unseen_pair", "val"]  # the held-out split stays primary
    assert comparison["splits"]["val"]["in_distribution"] and not comparison["splits"]["unseen_pair"]["in_distribution"]
    assert comparison["splits"]["val"]["memory_reset_every"] == 8  # "window": the model's W
    for split, seed in (("val", 1_000_000), ("unseen_pair", 3_000_000)):
        saved = json.loads((out / split / "closed_loop.json").read_text())
        assert saved["seeds"] == [seed, seed + 1]
        assert saved["settings"]["memory_reset_every"] == 8
        assert saved["settings"]["memory_reset_requested"] == "window"
        assert saved["settings"]["state_input"] == PREVIOUS_COMMAND
        assert saved["settings"]["in_distribution"] == (split == "val")
    printed = capsys.readouterr().out
    assert "in-distribution vs held-out" in printed and "every 8" in printed
